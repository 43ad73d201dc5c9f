//! `nightshift batch`: a client of any OpenAI-compatible Batch API (nightshift's, OpenAI's),
//! with progress bars: submit a JSONL file, watch a batch, list/show/cancel, download its
//! results (optionally in the input's order), retry its failed requests.

mod client;
mod download;
mod join;
mod show;
mod submit;
mod watch;

use std::io::IsTerminal;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use client::{ApiError, Client};

/// Exit codes of `nightshift batch` (also in `--help`).
pub mod exit {
    /// The command did what it was asked; a watched batch ended `completed`.
    pub const OK: u8 = 0;
    /// An error: the server's answer (printed with its HTTP status), the network, a file.
    pub const ERROR: u8 = 1;
    /// The watched batch ended `failed` (its input was rejected).
    pub const FAILED: u8 = 3;
    /// The watched batch ended `expired` (its completion window passed).
    pub const EXPIRED: u8 = 4;
    /// The watched batch ended `cancelled`.
    pub const CANCELLED: u8 = 5;
    /// Ctrl-C stopped the watch; the batch keeps running.
    pub const INTERRUPTED: u8 = 130;
}

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success; a watched batch ended `completed` (some requests may still have failed: see
       its error file)
  1    error: the server's message and HTTP status are printed on one line
  2    usage error
  3    the watched batch ended `failed` (its input was rejected; `show` lists why)
  4    the watched batch ended `expired`
  5    the watched batch ended `cancelled`
  130  Ctrl-C stopped watching; the batch keeps running";

#[derive(Args)]
#[command(after_long_help = EXIT_CODES_HELP, after_help = EXIT_CODES_HELP)]
pub struct BatchArgs {
    /// The API's base URL, `/v1` included.
    #[arg(
        long,
        global = true,
        env = "OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    base_url: String,
    /// The API key (sent as a bearer token).
    #[arg(long, global = true, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print the API's JSON objects instead of text for people (no progress bars).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: BatchCommand,
}

#[derive(Subcommand)]
enum BatchCommand {
    /// Upload a JSONL file of requests and create a batch of it; prints the batch id.
    #[command(after_help = EXIT_CODES_HELP)]
    Submit(submit::SubmitArgs),
    /// Follow a batch with a live progress bar until it ends (Ctrl-C leaves it running).
    #[command(after_help = EXIT_CODES_HELP)]
    Watch(watch::WatchArgs),
    /// Batches, newest first.
    List(show::ListArgs),
    /// A batch: status, request counts, usage, errors, files.
    Show(show::IdArgs),
    /// Cancel a batch (finished requests keep their results).
    Cancel(show::IdArgs),
    /// Download a batch's results: the output and error files.
    Download(download::DownloadArgs),
    /// Re-run a finished batch's failed requests as a new batch.
    #[command(long_about = RETRY_HELP)]
    Retry(download::RetryArgs),
}

const RETRY_HELP: &str = "\
Re-run a finished batch's failed requests as a new batch.

If the server has a retry route (POST /batches/{id}/retry: nightshift does, see its docs/api.md)
it is used: the server builds the new batch's input from the failed lines, and lists the new
batch under GET /batches?retry_of=<id>; --completion-window is passed on. Otherwise the client does
it: it collects the custom_ids that failed (every line of the error file, and output lines
whose response.status_code is 400 or more), takes those lines from the input (the --input file,
else the batch's input file downloaded from the server), uploads them as a new file and creates
a new batch with the same endpoint and completion window and metadata {\"retry_of\": \"<id>\"}.
Prints the new batch's id (nothing is created when no request failed).";

/// What every subcommand gets: the client and how to print.
pub struct Ctx {
    client: Client,
    /// `--json`: API objects on stdout, no progress bars, no prose.
    json: bool,
    /// Progress bars are drawn (stdout is a terminal and not `--json`).
    bars: bool,
}

impl Ctx {
    /// A byte progress bar (hidden unless [`Ctx::bars`]).
    fn bytes_bar(&self, prefix: &str) -> ProgressBar {
        let bar = self.bar(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(prefix.to_owned());
        bar
    }

    fn bar(&self, len: u64) -> ProgressBar {
        if self.bars {
            ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stdout())
        } else {
            ProgressBar::hidden()
        }
    }

    /// A line for people, on stderr (stdout carries ids and JSON for scripts).
    fn note(&self, text: impl std::fmt::Display) {
        if !self.json {
            eprintln!("{text}");
        }
    }

    fn print_json(&self, value: &serde_json::Value) {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
        );
    }
}

/// Runs `nightshift batch …`; returns the process's exit code. Errors are printed as one line.
pub fn main(args: BatchArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return exit::ERROR;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", one_line(&e));
            exit::ERROR
        }
    }
}

/// `error: <message>` on one line: the API's message and status, else the error chain.
fn one_line(e: &anyhow::Error) -> String {
    let text = match e.downcast_ref::<ApiError>() {
        Some(api) => {
            let context: Vec<String> = e
                .chain()
                .take_while(|c| c.downcast_ref::<ApiError>().is_none())
                .map(ToString::to_string)
                .collect();
            if context.is_empty() {
                api.to_string()
            } else {
                format!("{}: {api}", context.join(": "))
            }
        }
        None => format!("{e:#}"),
    };
    format!("error: {}", text.replace(['\n', '\r'], " "))
}

async fn run(args: BatchArgs) -> anyhow::Result<u8> {
    let ctx = Ctx {
        client: Client::new(&args.base_url, args.api_key)?,
        json: args.json,
        bars: !args.json && std::io::stdout().is_terminal(),
    };
    match args.command {
        BatchCommand::Submit(a) => submit::submit(&ctx, a).await,
        BatchCommand::Watch(a) => watch::watch_command(&ctx, a).await,
        BatchCommand::List(a) => show::list(&ctx, a).await,
        BatchCommand::Show(a) => show::show(&ctx, a).await,
        BatchCommand::Cancel(a) => show::cancel(&ctx, a).await,
        BatchCommand::Download(a) => download::download_command(&ctx, a).await,
        BatchCommand::Retry(a) => download::retry(&ctx, a).await,
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a Unix time (no time-zone database needed).
fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    #[test]
    fn unix_times_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_767_225_599), "2025-12-31 23:59:59 UTC");
    }

    #[test]
    fn an_api_error_prints_as_one_line_with_its_context() {
        let api = ApiError::from_body(
            StatusCode::CONFLICT,
            br#"{"error":{"message":"Cannot cancel a batch with status 'completed'.","code":null}}"#,
        );
        let e = anyhow::Error::new(api).context("cancel batch_1");
        assert_eq!(
            one_line(&e),
            "error: cancel batch_1: Cannot cancel a batch with status 'completed'. (HTTP 409)"
        );
        let e = anyhow::anyhow!("first\nsecond").context("reading x");
        assert_eq!(one_line(&e), "error: reading x: first second");
    }
}
