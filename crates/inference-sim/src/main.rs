//! `inference-sim`: the simulator as a process. Flags and `INFERENCE_SIM_*` variables map
//! one-to-one to `SimConfig` fields; see the crate README.

use std::net::SocketAddr;

use clap::{CommandFactory, FromArgMatches, Parser};
use nightshift_inference_sim::{SimConfig, serve};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "inference-sim", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "INFERENCE_SIM_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    #[command(flatten)]
    config: SimConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("nightshift=info,inference_sim=info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    // The about is set here: the flattened SimConfig's doc comment would replace it.
    let matches = Cli::command()
        .about("OpenAI-compatible upstream inference simulator")
        .long_about(None)
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    cli.config.validate()?;
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "inference simulator listening");
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    serve(cli.config, listener, shutdown).await?;
    Ok(())
}

/// Cancels `shutdown` at the first SIGINT or SIGTERM; a second SIGINT then exits at once.
async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => _ = signal.recv().await,
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, () = terminate => {} }
    shutdown.cancel();
    tokio::spawn(async {
        _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
}
