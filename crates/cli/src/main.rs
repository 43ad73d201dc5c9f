//! `nightshift`: runs one service, or all of them in one process, administers a deployment,
//! and submits and follows batches on any OpenAI-compatible Batch API (`nightshift batch`).

mod admin_quotas;
mod admin_webhooks;
mod batch;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use nightshift_cli::config;

#[derive(Parser)]
#[command(
    name = "nightshift",
    version,
    about = "A self-hostable, OpenAI-compatible Batch API"
)]
struct Cli {
    /// TOML configuration file; `NIGHTSHIFT_<SECTION>__<KEY>` variables override it.
    #[arg(long, short, global = true, env = "NIGHTSHIFT_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long, global = true)]
    dump_config: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The HTTP API (OpenAI Files and Batches).
    Gateway,
    /// The control plane (gRPC); owns the metadata store.
    Scheduler,
    /// Runs chunks of batch requests against the upstreams (scale it horizontally).
    Executor,
    /// Assembles finished batches' output and error files.
    Finalizer,
    /// Everything in one process, with no infrastructure: files in a directory, SQLite,
    /// an in-process queue. Serves the same API.
    Standalone(run::StandaloneArgs),
    /// Administration through the scheduler: the configured one, or with `--data-dir` that of
    /// a running `nightshift standalone`.
    Admin(run::AdminArgs),
    /// A client of any OpenAI-compatible Batch API: submit, watch (with progress bars), list,
    /// show, cancel, download, retry.
    Batch(batch::BatchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // a client of a remote API: no server configuration to load
    if let Command::Batch(args) = cli.command {
        std::process::exit(i32::from(batch::main(args)));
    }
    let mut config = config::Config::load(cli.config.as_deref(), config::process_env())
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    if let Command::Standalone(args) = &cli.command {
        args.apply(&mut config);
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    if cli.dump_config {
        print!("{}", config.dump());
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Gateway => run::gateway(config).await,
            Command::Scheduler => run::scheduler(config).await,
            Command::Executor => run::executor(config).await,
            Command::Finalizer => run::finalizer(config).await,
            Command::Standalone(args) => run::standalone(config, args).await,
            Command::Admin(cmd) => run::admin(config, cmd).await,
            Command::Batch(_) => unreachable!("handled before the configuration"),
        }
    })
}
