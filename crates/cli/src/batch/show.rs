//! `nightshift batch list | show | cancel`.

use anyhow::Context;
use clap::Args;
use serde_json::Value;

use super::client::Batch;
use super::{Ctx, exit, utc};

#[derive(Args)]
pub struct IdArgs {
    /// The batch id.
    id: String,
}

#[derive(Args)]
pub struct ListArgs {
    /// Only batches in this status (validating, in_progress, finalizing, completed, failed,
    /// expired, cancelling, cancelled).
    #[arg(long)]
    status: Option<String>,
    /// At most this many batches.
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

pub async fn list(ctx: &Ctx, args: ListArgs) -> anyhow::Result<u8> {
    let mut found: Vec<Batch> = Vec::new();
    let mut after: Option<String> = None;
    // pages of the server's maximum when filtering (the filter is client-side)
    let page_size = if args.status.is_some() {
        100
    } else {
        args.limit.clamp(1, 100) as u32
    };
    while found.len() < args.limit {
        let page = ctx
            .client
            .list(after.as_deref(), page_size)
            .await
            .context("list batches")?;
        after = page.data.last().map(|b| b.id.clone());
        found.extend(
            page.data
                .into_iter()
                .filter(|b| args.status.as_ref().is_none_or(|s| *s == b.status)),
        );
        if !page.has_more || after.is_none() {
            break;
        }
    }
    found.truncate(args.limit);
    if ctx.json {
        ctx.print_json(&Value::Array(found.into_iter().map(|b| b.raw).collect()));
        return Ok(exit::OK);
    }
    if found.is_empty() {
        ctx.note("no batches");
        return Ok(exit::OK);
    }
    let rows: Vec<[String; 5]> = found
        .iter()
        .map(|b| {
            let c = b.counts();
            [
                b.id.clone(),
                b.status.clone(),
                b.endpoint.clone().unwrap_or_default(),
                format!(
                    "{}/{} ({} failed)",
                    c.completed + c.failed,
                    c.total,
                    c.failed
                ),
                b.created_at.map(utc).unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["ID", "STATUS", "ENDPOINT", "DONE", "CREATED"], &rows)
    );
    Ok(exit::OK)
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

pub async fn show(ctx: &Ctx, args: IdArgs) -> anyhow::Result<u8> {
    let batch = ctx.client.batch(&args.id).await?;
    if ctx.json {
        ctx.print_json(&batch.raw);
    } else {
        print!("{}", summary(&batch.raw));
    }
    Ok(exit::OK)
}

pub async fn cancel(ctx: &Ctx, args: IdArgs) -> anyhow::Result<u8> {
    let batch = ctx
        .client
        .cancel(&args.id)
        .await
        .with_context(|| format!("cancel {}", args.id))?;
    if ctx.json {
        ctx.print_json(&batch.raw);
    } else {
        println!("{} {}", batch.id, batch.status);
    }
    Ok(exit::OK)
}

/// A Batch object for people: one `label  value` line per field that is set.
pub fn summary(b: &Value) -> String {
    let text = |key: &str| b.get(key).and_then(Value::as_str).map(str::to_owned);
    let int = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |label: &str, value: Option<String>| {
        if let Some(value) = value {
            rows.push((label.to_owned(), value));
        }
    };
    row("endpoint", text("endpoint"));
    row("model", text("model"));
    row("completion window", text("completion_window"));
    for (key, label) in [
        ("created_at", "created"),
        ("in_progress_at", "in progress"),
        ("expires_at", "expires"),
        ("finalizing_at", "finalizing"),
        ("completed_at", "completed"),
        ("failed_at", "failed"),
        ("expired_at", "expired"),
        ("cancelling_at", "cancelling"),
        ("cancelled_at", "cancelled"),
    ] {
        row(label, b.get(key).and_then(Value::as_i64).map(utc));
    }
    if let Some(c) = b.get("request_counts").filter(|c| c.is_object()) {
        row(
            "requests",
            Some(format!(
                "{} total, {} completed, {} failed",
                int(c, "total"),
                int(c, "completed"),
                int(c, "failed")
            )),
        );
    }
    if let Some(u) = b.get("usage").filter(|u| u.is_object()) {
        let detail = |outer: &str, inner: &str| {
            u.get(outer)
                .and_then(|d| d.get(inner))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        row(
            "usage",
            Some(format!(
                "{} input tokens ({} cached), {} output ({} reasoning), {} total",
                int(u, "input_tokens"),
                detail("input_tokens_details", "cached_tokens"),
                int(u, "output_tokens"),
                detail("output_tokens_details", "reasoning_tokens"),
                int(u, "total_tokens")
            )),
        );
    }
    row("input file", text("input_file_id"));
    row("output file", text("output_file_id"));
    row("error file", text("error_file_id"));
    if let Some(m) = b.get("metadata").and_then(Value::as_object) {
        let pairs: Vec<String> = m
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                )
            })
            .collect();
        if !pairs.is_empty() {
            row("metadata", Some(pairs.join(", ")));
        }
    }
    let errors = b
        .get("errors")
        .and_then(|e| e.get("data"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = format!(
        "{}  {}\n",
        text("id").unwrap_or_default(),
        text("status").unwrap_or_default()
    );
    for (label, value) in rows {
        out.push_str(&format!("  {label:<18} {value}\n"));
    }
    if !errors.is_empty() {
        out.push_str(&format!("  errors ({}):\n", errors.len()));
        for e in errors.iter().take(20) {
            let line = e
                .get("line")
                .and_then(Value::as_u64)
                .map(|l| format!("line {l}: "))
                .unwrap_or_default();
            out.push_str(&format!(
                "    {line}{}: {}\n",
                e.get("code").and_then(Value::as_str).unwrap_or("error"),
                e.get("message").and_then(Value::as_str).unwrap_or("")
            ));
        }
        if errors.len() > 20 {
            out.push_str(&format!(
                "    … {} more (--json shows all)\n",
                errors.len() - 20
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_has_counts_usage_files_and_errors() {
        let batch = serde_json::json!({
            "id": "batch_1", "status": "failed", "endpoint": "/v1/chat/completions",
            "model": null, "completion_window": "24h", "created_at": 0, "failed_at": 60,
            "in_progress_at": null, "input_file_id": "file-in", "output_file_id": null,
            "error_file_id": "file-err",
            "request_counts": {"total": 3, "completed": 1, "failed": 2},
            "usage": {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 1},
                      "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 12},
            "metadata": {"team": "a"},
            "errors": {"object": "list", "data": [
                {"code": "invalid_url", "line": 2, "message": "wrong url", "param": "url"},
                {"code": "empty_file", "line": null, "message": "empty", "param": null}]}
        });
        let text = summary(&batch);
        assert_eq!(
            text,
            "batch_1  failed\n\
             \x20 endpoint           /v1/chat/completions\n\
             \x20 completion window  24h\n\
             \x20 created            1970-01-01 00:00:00 UTC\n\
             \x20 failed             1970-01-01 00:01:00 UTC\n\
             \x20 requests           3 total, 1 completed, 2 failed\n\
             \x20 usage              5 input tokens (1 cached), 7 output (0 reasoning), 12 total\n\
             \x20 input file         file-in\n\
             \x20 error file         file-err\n\
             \x20 metadata           team=a\n\
             \x20 errors (2):\n\
             \x20   line 2: invalid_url: wrong url\n\
             \x20   empty_file: empty\n"
        );
    }

    #[test]
    fn tables_align_their_columns() {
        let rows = [
            ["batch_a".to_owned(), "completed".to_owned()],
            ["b".to_owned(), "x".to_owned()],
        ];
        assert_eq!(
            table(&["ID", "STATUS"], &rows),
            "ID       STATUS\nbatch_a  completed\nb        x\n"
        );
    }
}
