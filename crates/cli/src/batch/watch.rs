//! `nightshift batch watch`: poll a batch and show its progress until it ends.

use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::client::Batch;
use super::{Ctx, exit};

#[derive(Args)]
pub struct WatchArgs {
    /// The batch id.
    id: String,
    /// Seconds between two polls of the batch.
    #[arg(long, default_value_t = 2.0)]
    interval: f64,
}

pub async fn watch_command(ctx: &Ctx, args: WatchArgs) -> anyhow::Result<u8> {
    let (code, batch) = follow(ctx, &args.id, args.interval).await?;
    if ctx.json && code != exit::INTERRUPTED {
        ctx.print_json(&batch.raw);
    }
    Ok(code)
}

/// The exit code a batch's ending gives.
pub fn exit_code(status: &str) -> u8 {
    match status {
        "failed" => exit::FAILED,
        "expired" => exit::EXPIRED,
        "cancelled" => exit::CANCELLED,
        _ => exit::OK,
    }
}

/// Polls `GET /batches/{id}` every `interval` seconds until the batch is terminal, drawing a
/// progress bar (or, without a terminal, a line per change on stderr). Ctrl-C stops the
/// watch (the batch keeps running): [`exit::INTERRUPTED`] and the last batch seen.
pub async fn follow(ctx: &Ctx, id: &str, interval: f64) -> anyhow::Result<(u8, Batch)> {
    let interval = Duration::from_secs_f64(interval.clamp(0.05, 3600.0));
    let bar = ctx.bar(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner:.green} {prefix} [{bar:20.cyan/blue}] {pos}/{len} done · {msg} · ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(id.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut last_line = String::new();
    let mut last: Option<Batch> = None;
    // when and at how many finished requests the rate is measured from
    let mut since: Option<(std::time::Instant, u64)> = None;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let batch = tokio::select! {
            batch = ctx.client.batch(id) => batch,
            _ = &mut interrupted => return Ok(stop(ctx, &bar, id, last)),
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        let done = batch.counts().completed + batch.counts().failed;
        let (start, done_then) = *since.get_or_insert((std::time::Instant::now(), done));
        let elapsed = start.elapsed().as_secs_f64();
        let rate = if elapsed > 0.5 {
            (done - done_then.min(done)) as f64 / elapsed
        } else {
            0.0
        };
        show(ctx, &bar, &batch, rate, &mut last_line);
        if batch.is_terminal() {
            bar.finish();
            let counts = batch.counts();
            ctx.note(format!(
                "batch {} {}: {} completed, {} failed of {}",
                batch.id, batch.status, counts.completed, counts.failed, counts.total
            ));
            return Ok((exit_code(&batch.status), batch));
        }
        last = Some(batch);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = &mut interrupted => return Ok(stop(ctx, &bar, id, last)),
        }
    }
}

fn show(ctx: &Ctx, bar: &ProgressBar, batch: &Batch, rate: f64, last_line: &mut String) {
    let counts = batch.counts();
    let message = format!(
        "{} · {} failed · {rate:.1} req/s",
        batch.status, counts.failed
    );
    bar.set_length(counts.total);
    bar.set_position(counts.completed + counts.failed);
    bar.set_message(message.clone());
    if !ctx.bars && !ctx.json {
        let line = format!(
            "{} {}: {}/{} done ({} completed, {} failed)",
            batch.id,
            batch.status,
            counts.completed + counts.failed,
            counts.total,
            counts.completed,
            counts.failed
        );
        if line != *last_line {
            eprintln!("{line}");
            *last_line = line;
        }
    }
}

/// Ctrl-C: the watch ends, the batch does not.
fn stop(ctx: &Ctx, bar: &ProgressBar, id: &str, last: Option<Batch>) -> (u8, Batch) {
    bar.abandon();
    eprintln!("batch {id} keeps running; resume with: nightshift batch watch {id}");
    let batch = last.unwrap_or_else(|| Batch {
        id: id.to_owned(),
        status: "unknown".into(),
        endpoint: None,
        input_file_id: None,
        output_file_id: None,
        error_file_id: None,
        completion_window: None,
        created_at: None,
        request_counts: None,
        raw: serde_json::Value::Null,
    });
    if ctx.json {
        ctx.print_json(&batch.raw);
    }
    (exit::INTERRUPTED, batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ending_has_its_exit_code() {
        assert_eq!(exit_code("completed"), 0);
        let codes = [
            exit_code("failed"),
            exit_code("expired"),
            exit_code("cancelled"),
        ];
        assert_eq!(codes, [3, 4, 5]);
    }
}
