//! `nightshift batch submit`: upload a JSONL file (streamed, with a byte progress bar) and
//! create a batch of it.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::Ctx;
use super::client::Batch;
use super::download;
use super::watch;

#[derive(Args)]
pub struct SubmitArgs {
    /// The requests: one `{"custom_id", "method", "url", "body"}` object per line.
    file: PathBuf,
    /// The endpoint (`/v1/chat/completions`, …); default: the `url` every line has.
    #[arg(long)]
    endpoint: Option<String>,
    /// How long the batch may take (the server decides which windows it accepts).
    #[arg(long, default_value = "24h")]
    completion_window: String,
    /// Metadata of the batch, `KEY=VALUE` (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    metadata: Vec<(String, String)>,
    /// Then watch the batch until it ends and download its results (to `--output`); the
    /// exit code is the watch's.
    #[arg(long)]
    wait: bool,
    /// With `--wait`: where the results go (output and error lines together); default
    /// `<batch id>_results.jsonl`.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// With `--wait`: seconds between two polls of the batch.
    #[arg(long, default_value_t = 2.0)]
    interval: f64,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

pub async fn submit(ctx: &Ctx, args: SubmitArgs) -> anyhow::Result<u8> {
    let endpoint = match args.endpoint {
        Some(endpoint) => endpoint,
        None => {
            let path = args.file.clone();
            tokio::task::spawn_blocking(move || detect_endpoint(&path)).await??
        }
    };
    let metadata: Map<String, Value> = args
        .metadata
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let batch = upload_and_create(
        ctx,
        &args.file,
        &endpoint,
        &args.completion_window,
        &metadata,
    )
    .await?;
    if !args.wait {
        if ctx.json {
            ctx.print_json(&batch.raw);
        } else {
            println!("{}", batch.id);
            ctx.note(format!(
                "watch it with: nightshift batch watch {}\nresults with: nightshift batch download {} -o results.jsonl",
                batch.id, batch.id
            ));
        }
        return Ok(super::exit::OK);
    }
    ctx.note(format!("batch {} created; watching it", batch.id));
    let (code, batch) = watch::follow(ctx, &batch.id, args.interval).await?;
    if code == super::exit::INTERRUPTED {
        return Ok(code);
    }
    let output = args
        .output
        .unwrap_or_else(|| PathBuf::from(format!("{}_results.jsonl", batch.id)));
    if batch.output_file_id.is_some() || batch.error_file_id.is_some() {
        let written = download::plain(ctx, &batch, &output, None).await?;
        ctx.note(written.describe(&output, None));
    }
    if ctx.json {
        ctx.print_json(&batch.raw);
    }
    Ok(code)
}

/// Uploads `file` and creates a batch of it; notes both for people.
pub async fn upload_and_create(
    ctx: &Ctx,
    file: &Path,
    endpoint: &str,
    completion_window: &str,
    metadata: &Map<String, Value>,
) -> anyhow::Result<Batch> {
    let bar = ctx.bytes_bar("upload");
    let uploaded = ctx.client.upload(file, &bar).await;
    bar.finish_and_clear();
    let uploaded = uploaded.with_context(|| format!("upload of {}", file.display()))?;
    let file_id = uploaded
        .get("id")
        .and_then(Value::as_str)
        .context("the uploaded file has no id")?;
    ctx.note(format!(
        "uploaded {} ({}) as {file_id}",
        file.display(),
        indicatif::HumanBytes(uploaded.get("bytes").and_then(Value::as_u64).unwrap_or(0))
    ));
    let batch = ctx
        .client
        .create_batch(file_id, endpoint, completion_window, metadata)
        .await
        .context("create the batch")?;
    ctx.note(format!(
        "created batch {} ({endpoint}, window {completion_window})",
        batch.id
    ));
    Ok(batch)
}

#[derive(Deserialize)]
struct LineUrl {
    #[serde(default)]
    url: Option<String>,
}

/// The endpoint of a batch file: the `url` of its lines, which must all agree. Reads the
/// file line by line (bounded memory).
pub fn detect_endpoint(path: &Path) -> anyhow::Result<String> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    detect_endpoint_in(std::io::BufReader::with_capacity(256 * 1024, file))
        .with_context(|| format!("{}", path.display()))
}

fn detect_endpoint_in(mut reader: impl BufRead) -> anyhow::Result<String> {
    let mut endpoint: Option<(String, u64)> = None;
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let url = serde_json::from_slice::<LineUrl>(&line)
            .with_context(|| format!("line {number} is not a JSON object"))?
            .url
            .with_context(|| format!("line {number} has no `url` (or pass --endpoint)"))?;
        match &endpoint {
            None => endpoint = Some((url, number)),
            Some((first, first_line)) if *first != url => bail!(
                "line {number} is for {url} but line {first_line} for {first}: a batch has one endpoint"
            ),
            Some(_) => {}
        }
    }
    match endpoint {
        Some((url, _)) => Ok(url),
        None => bail!("the file holds no request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(text: &str) -> anyhow::Result<String> {
        detect_endpoint_in(text.as_bytes())
    }

    #[test]
    fn the_endpoint_is_the_url_every_line_shares() {
        let text = "{\"custom_id\":\"a\",\"url\":\"/v1/embeddings\",\"body\":{}}\n\n\
                    {\"custom_id\":\"b\",\"url\":\"/v1/embeddings\",\"body\":{}}\r\n";
        assert_eq!(detect(text).expect("endpoint"), "/v1/embeddings");
    }

    #[test]
    fn lines_that_disagree_name_both_lines() {
        let text = "{\"url\":\"/v1/chat/completions\"}\n{\"url\":\"/v1/chat/completions\"}\n\
                    {\"url\":\"/v1/embeddings\"}\n";
        let e = detect(text).expect_err("two endpoints");
        assert_eq!(
            e.to_string(),
            "line 3 is for /v1/embeddings but line 1 for /v1/chat/completions: a batch has one endpoint"
        );
    }

    #[test]
    fn a_line_without_url_or_not_json_is_named() {
        let e = detect("{\"url\":\"/v1/x\"}\n{\"custom_id\":\"b\"}\n").expect_err("no url");
        assert!(e.to_string().starts_with("line 2 has no `url`"), "{e}");
        let e = detect("not json\n").expect_err("not json");
        assert_eq!(e.to_string(), "line 1 is not a JSON object");
        let e = detect("\n\n").expect_err("empty");
        assert_eq!(e.to_string(), "the file holds no request");
    }

    #[test]
    fn metadata_is_key_equals_value() {
        assert_eq!(
            parse_key_value("team=a=b").expect("kv"),
            ("team".into(), "a=b".into())
        );
        assert!(parse_key_value("=x").is_err());
        assert!(parse_key_value("novalue").is_err());
    }
}
