//! `nightshift batch download` and `nightshift batch retry`: a batch's result files, as they
//! are or joined back to the input's order, and a new batch of its failed requests.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;

use super::client::{ApiError, Batch};
use super::submit::upload_and_create;
use super::{Ctx, exit, join};

/// Memory the external sort of `--in-input-order` and of `retry` may hold by default.
pub const DEFAULT_JOIN_BUDGET: usize = 64 * 1024 * 1024;

#[derive(Args)]
pub struct DownloadArgs {
    /// The batch id.
    id: String,
    /// Where the results go: the output file's lines, then the error file's (unless
    /// `--errors`), or every line in the input's order with `--in-input-order`. `-` is
    /// stdout. Default: `<batch id>_results.jsonl`.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Write the error file's lines (failed requests) here instead of into `--output`.
    #[arg(long)]
    errors: Option<PathBuf>,
    /// Order the results as the input's lines (joined on custom_id), streaming: memory stays
    /// about `--sort-memory` whatever the batch's size (spills go to $TMPDIR).
    #[arg(long)]
    in_input_order: bool,
    /// With `--in-input-order`: a local copy of the input file (else it is downloaded).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Memory budget of the external sort, in MiB.
    #[arg(long, default_value_t = DEFAULT_JOIN_BUDGET >> 20, value_name = "MIB")]
    sort_memory: usize,
}

#[derive(Args)]
pub struct RetryArgs {
    /// The batch id (a finished batch).
    id: String,
    /// A local copy of the batch's input file (else it is downloaded from the server).
    #[arg(long)]
    input: Option<PathBuf>,
    /// The new batch's completion window (default: the original's).
    #[arg(long)]
    completion_window: Option<String>,
    /// Memory budget of the external sort that picks the failed lines, in MiB.
    #[arg(long, default_value_t = DEFAULT_JOIN_BUDGET >> 20, value_name = "MIB")]
    sort_memory: usize,
}

/// What a download wrote.
#[derive(Debug, Default)]
pub struct Written {
    pub output_lines: u64,
    pub error_lines: u64,
    pub bytes: u64,
}

impl Written {
    pub fn describe(&self, output: &Path, errors: Option<&Path>) -> String {
        match errors {
            Some(errors) => format!(
                "wrote {} result lines to {} and {} error lines to {}",
                self.output_lines,
                output.display(),
                self.error_lines,
                errors.display()
            ),
            None => format!(
                "wrote {} lines to {} ({} succeeded, {} failed)",
                self.output_lines + self.error_lines,
                output.display(),
                self.output_lines,
                self.error_lines
            ),
        }
    }
}

pub async fn download_command(ctx: &Ctx, args: DownloadArgs) -> anyhow::Result<u8> {
    let batch = ctx.client.batch(&args.id).await?;
    if batch.output_file_id.is_none() && batch.error_file_id.is_none() {
        if batch.is_terminal() {
            bail!(
                "batch {} ended {} without results (`nightshift batch show {}` says why)",
                batch.id,
                batch.status,
                batch.id
            );
        }
        bail!(
            "batch {} is {}: its results exist once it ends (`nightshift batch watch {}`)",
            batch.id,
            batch.status,
            batch.id
        );
    }
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}_results.jsonl", batch.id)));
    let written = if args.in_input_order {
        in_input_order(ctx, &batch, &args, &output).await?
    } else {
        plain(ctx, &batch, &output, args.errors.as_deref()).await?
    };
    if ctx.json {
        ctx.print_json(&json!({
            "batch": batch.raw,
            "output": output,
            "errors": args.errors,
            "output_lines": written.output_lines,
            "error_lines": written.error_lines,
        }));
    } else {
        ctx.note(written.describe(&output, args.errors.as_deref()));
    }
    Ok(exit::OK)
}

/// Opens `path` for writing; `-` is stdout.
async fn create(path: &Path) -> anyhow::Result<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> {
    if path == Path::new("-") {
        return Ok(Box::new(tokio::io::stdout()));
    }
    let file = tokio::fs::File::create(path)
        .await
        .with_context(|| format!("cannot create {}", path.display()))?;
    Ok(Box::new(tokio::io::BufWriter::with_capacity(
        256 * 1024,
        file,
    )))
}

/// Counts the lines going through to the inner writer.
struct LineCount<W> {
    inner: W,
    lines: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for LineCount<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            let n = *n;
            self.lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        }
        poll
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The output file then the error file, streamed as they come, into `output` (the error
/// file into `errors` when given).
pub async fn plain(
    ctx: &Ctx,
    batch: &Batch,
    output: &Path,
    errors: Option<&Path>,
) -> anyhow::Result<Written> {
    let bar = ctx.bytes_bar("download");
    let mut written = Written::default();
    let mut out = LineCount {
        inner: create(output).await?,
        lines: 0,
    };
    if let Some(id) = &batch.output_file_id {
        written.bytes += ctx.client.download_to(id, &mut out, &bar).await?;
    }
    written.output_lines = out.lines;
    if let Some(id) = &batch.error_file_id {
        match errors {
            Some(path) => {
                let mut err = LineCount {
                    inner: create(path).await?,
                    lines: 0,
                };
                written.bytes += ctx.client.download_to(id, &mut err, &bar).await?;
                err.inner.shutdown().await?;
                written.error_lines = err.lines;
            }
            None => {
                written.bytes += ctx.client.download_to(id, &mut out, &bar).await?;
                written.error_lines = out.lines - written.output_lines;
            }
        }
    }
    out.inner.shutdown().await?;
    bar.finish_and_clear();
    Ok(written)
}

/// Downloads `file_id` to `dir/name`.
async fn fetch(ctx: &Ctx, file_id: &str, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let bar = ctx.bytes_bar(name);
    let mut file = tokio::io::BufWriter::new(tokio::fs::File::create(&path).await?);
    ctx.client
        .download_to(file_id, &mut file, &bar)
        .await
        .with_context(|| format!("download of {file_id}"))?;
    file.shutdown().await?;
    bar.finish_and_clear();
    Ok(path)
}

/// The result files and the input (downloaded unless `local_input`) in a temporary directory.
async fn fetch_all(
    ctx: &Ctx,
    batch: &Batch,
    local_input: Option<&Path>,
    tmp: &Path,
) -> anyhow::Result<(PathBuf, Option<PathBuf>, Option<PathBuf>)> {
    let input = match local_input {
        Some(path) => path.to_owned(),
        None => {
            let id = batch
                .input_file_id
                .as_deref()
                .context("the batch has no input_file_id: pass --input")?;
            fetch(ctx, id, tmp, "input").await?
        }
    };
    let output = match &batch.output_file_id {
        Some(id) => Some(fetch(ctx, id, tmp, "output").await?),
        None => None,
    };
    let errors = match &batch.error_file_id {
        Some(id) => Some(fetch(ctx, id, tmp, "errors").await?),
        None => None,
    };
    Ok((input, output, errors))
}

fn spinner(ctx: &Ctx, message: &str) -> indicatif::ProgressBar {
    let bar = ctx.bar(0);
    bar.set_style(indicatif::ProgressStyle::default_spinner());
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}

/// Every result line, in the order of the input line of the same custom_id.
async fn in_input_order(
    ctx: &Ctx,
    batch: &Batch,
    args: &DownloadArgs,
    output: &Path,
) -> anyhow::Result<Written> {
    let tmp = tempfile::tempdir().context("a temporary directory for the sort")?;
    let (input, out_file, err_file) =
        fetch_all(ctx, batch, args.input.as_deref(), tmp.path()).await?;
    let bar = spinner(ctx, "joining results to the input's order");
    let output = output.to_owned();
    let errors = args.errors.clone();
    let budget = args.sort_memory.max(1) * 1024 * 1024;
    let written = tokio::task::spawn_blocking(move || -> anyhow::Result<Written> {
        let open = |path: &Path| -> anyhow::Result<Box<dyn Write>> {
            if path == Path::new("-") {
                return Ok(Box::new(std::io::BufWriter::new(std::io::stdout().lock())));
            }
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            Ok(Box::new(std::io::BufWriter::with_capacity(256 * 1024, file)))
        };
        let mut out = open(&output)?;
        let mut err = errors.as_deref().map(open).transpose()?;
        let mut results: Vec<(&Path, u8)> = Vec::new();
        if let Some(p) = &out_file {
            results.push((p, 0));
        }
        if let Some(p) = &err_file {
            results.push((p, 1));
        }
        let mut written = Written::default();
        let stats = join::results_in_input_order(&input, &results, budget, tmp.path(), {
            let written = &mut written;
            move |dest, line| {
                let sink = match (dest, err.as_mut()) {
                    (1, Some(err)) => err,
                    _ => &mut out,
                };
                sink.write_all(line)?;
                sink.write_all(b"\n")?;
                written.bytes += line.len() as u64 + 1;
                if dest == 1 {
                    written.error_lines += 1;
                } else {
                    written.output_lines += 1;
                }
                Ok(())
            }
        })?;
        if stats.without_result > 0 || stats.unmatched > 0 {
            eprintln!(
                "note: {} input requests have no result line yet; {} result lines match no input line (written last)",
                stats.without_result, stats.unmatched
            );
        }
        Ok(written)
    })
    .await??;
    bar.finish_and_clear();
    Ok(written)
}

pub async fn retry(ctx: &Ctx, args: RetryArgs) -> anyhow::Result<u8> {
    let mut body = Map::new();
    if let Some(window) = &args.completion_window {
        body.insert("completion_window".into(), Value::String(window.clone()));
    }
    match ctx
        .client
        .retry_on_server(&args.id, &Value::Object(body))
        .await
    {
        Ok(Some(batch)) => {
            ctx.note(format!("the server retried {} as {}", args.id, batch.id));
            print_new(ctx, &batch);
            return Ok(exit::OK);
        }
        Ok(None) => {}
        // The server read the batch's results and found no failed request: as below.
        Err(e)
            if e.downcast_ref::<ApiError>()
                .is_some_and(|api| api.code.as_deref() == Some("nothing_to_retry")) =>
        {
            ctx.note(format!(
                "batch {} has no failed request: nothing to retry",
                args.id
            ));
            if ctx.json {
                ctx.print_json(&Value::Null);
            }
            return Ok(exit::OK);
        }
        Err(e) => return Err(e.context("retry on the server")),
    }
    let batch = ctx.client.batch(&args.id).await?;
    if !batch.is_terminal() {
        bail!(
            "batch {} is {}: retry it once it has ended",
            batch.id,
            batch.status
        );
    }
    let endpoint = batch
        .endpoint
        .clone()
        .context("the batch has no endpoint")?;
    let tmp = tempfile::tempdir().context("a temporary directory")?;
    let (input, out_file, err_file) =
        fetch_all(ctx, &batch, args.input.as_deref(), tmp.path()).await?;
    let retry_file = tmp.path().join(format!("{}_retry.jsonl", batch.id));
    let budget = args.sort_memory.max(1) * 1024 * 1024;
    let selected = {
        let retry_file = retry_file.clone();
        let dir = tmp.path().to_owned();
        tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let mut sink = std::io::BufWriter::new(std::fs::File::create(&retry_file)?);
            let results: Vec<&Path> = out_file
                .iter()
                .chain(&err_file)
                .map(|p| p.as_path())
                .collect();
            let n = join::failed_input_lines(&input, &results, budget, &dir, |line| {
                sink.write_all(line)?;
                sink.write_all(b"\n")?;
                Ok(())
            })?;
            sink.flush()?;
            Ok(n)
        })
        .await??
    };
    if selected == 0 {
        ctx.note(format!(
            "batch {} has no failed request: nothing to retry",
            batch.id
        ));
        if ctx.json {
            ctx.print_json(&Value::Null);
        }
        return Ok(exit::OK);
    }
    ctx.note(format!(
        "{selected} failed requests of {} to retry",
        batch.id
    ));
    let window = args
        .completion_window
        .or(batch.completion_window.clone())
        .unwrap_or_else(|| "24h".into());
    let mut metadata = Map::new();
    metadata.insert("retry_of".into(), Value::String(batch.id.clone()));
    let new = upload_and_create(ctx, &retry_file, &endpoint, &window, &metadata).await?;
    print_new(ctx, &new);
    Ok(exit::OK)
}

fn print_new(ctx: &Ctx, batch: &Batch) {
    if ctx.json {
        ctx.print_json(&batch.raw);
    } else {
        println!("{}", batch.id);
        ctx.note(format!(
            "watch it with: nightshift batch watch {}",
            batch.id
        ));
    }
}
