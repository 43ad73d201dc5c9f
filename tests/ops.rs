//! The dashboards and alert rules against running services: every metric a Grafana panel
//! (`helm/nightshift/dashboards/*.json`) or an alert rule (`helm/nightshift/files/alerts.yaml`)
//! reads is exported by a service of a real-process stack, with the labels the query uses; and
//! every `nightshift_*` family the services export or declare is on a panel or listed, with a
//! reason, in `helm/nightshift/dashboards/unpanelled.txt`.
//!
//! The stack runs one small batch that exercises success, an upstream failure and a retry, a
//! batch that fails validation, a refused upload, a download, a deleted file and a file whose
//! expiry the test moves into the past; the scheduler is then restarted so that its start-up
//! sweep reclaims that file. Every service's `/metrics` is scraped before and after (the union
//! counts: a restart resets counters).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nightshift_e2e::cluster::Cluster;
use nightshift_e2e::eventually;
use nightshift_inference_sim::SimConfig;
use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{self, Expr, LabelModifier, VectorSelector};

/// Prometheus's own series, which no service exports: alert rules may read them.
const PROMETHEUS_SERIES: [&str; 1] = ["up"];
/// Labels Prometheus attaches to every scraped series (target labels), not the services.
const TARGET_LABELS: [&str; 3] = ["namespace", "job", "instance"];
/// Grafana's variables, replaced by values PromQL parses, as Grafana does before querying.
const GRAFANA_VARIABLES: [(&str, &str); 5] = [
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    ("$__range", "1h"),
    ("${namespace}", ".*"),
    ("$namespace", ".*"),
];

/// Drives the stack through the paths whose metrics the dashboards show.
const DRIVE: &str = r#"
import io
import openai
from nstest import emit
from pipeline import c, chat_line, upload_lines, wait, check_exactly_once

# success, an upstream 400 (not retried), a 503 that succeeds on retry, 503s that exhaust retries
lines = [chat_line(f"ok-{i}") for i in range(6)] + [
    chat_line("rejected", sim={"status": 400}),
    chat_line("retried", sim={"fail_times": 1, "status": 503}),
    chat_line("exhausted", sim={"status": 503}),
]
b = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/chat/completions", completion_window="24h")
done = wait(b.id, {"completed", "failed", "expired", "cancelled"})
assert done.status == "completed", done
check_exactly_once(done, [l["custom_id"] for l in lines])  # downloads both result files

# an input that fails validation (no method, url or body)
bad = c.files.create(file=("bad.jsonl", io.BytesIO(b'{"custom_id": "x"}\n')), purpose="batch")
failed = wait(c.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h").id, {"failed"})
assert failed.errors and failed.errors.data, failed

# an upload refused while it streams
try:
    c.files.create(file=("empty.jsonl", io.BytesIO(b"")), purpose="batch")
    raise AssertionError("an empty upload was accepted")
except openai.BadRequestError:
    pass

c.files.delete(bad.id)

# a file to expire (the test ages it), for the sweeper
soon = c.files.create(file=("soon.jsonl", io.BytesIO(b'{"custom_id": "s"}\n')), purpose="batch",
                      expires_after={"anchor": "created_at", "seconds": 3600})
emit(expiring=soon.id)
"#;

#[tokio::test]
async fn dashboards_and_alerts_read_only_exported_metrics() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf();
    let queries = queries(&root);
    let used = used_metrics(&queries);

    let sim = SimConfig {
        base_latency_ms: 5,
        ..SimConfig::default()
    };
    let mut cluster = Cluster::start(sim).await.expect("cluster");
    let key = cluster.tenant("ops").await.expect("tenant");
    let expiring = drive(&root, &cluster.origin, &key).await;
    // Let an hour pass for that file: its expiry moves into the past.
    sqlx::query("UPDATE files SET expires_at = expires_at - 3601 WHERE id = $1")
        .bind(&expiring)
        .execute(cluster.metadata.pool())
        .await
        .expect("age the file");

    let instances = ["gateway", "scheduler", "executor-1", "finalizer"];
    let mut exported = Exported::default();
    for name in instances {
        exported.add(&scrape(cluster.port(name)).await);
    }
    // A fresh scheduler sweeps at start-up: the expired file is reclaimed.
    cluster.kill9("scheduler").await.expect("kill scheduler");
    cluster.spawn("scheduler").await.expect("restart scheduler");
    // Sampled gauges (queue depths, batches by status) appear on the sampler's schedule: scrape
    // until everything the dashboards read is there, or a deadline passes.
    let exported = RefCell::new(exported);
    let sampled = eventually(
        "every series the dashboards read",
        Duration::from_secs(60),
        || async {
            for name in instances {
                let text = scrape(cluster.port(name)).await;
                exported.borrow_mut().add(&text);
            }
            let exported = exported.borrow();
            let missing: Vec<&String> = used
                .keys()
                .filter(|m| !PROMETHEUS_SERIES.contains(&m.as_str()) && !exported.has_series(m))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            Err(format!("missing {missing:?}"))
        },
    )
    .await;
    let exported = exported.into_inner();
    cluster.stop().await.expect("stop");

    let mut problems = Vec::new();
    if let Err(e) = sampled {
        problems.push(format!("{e:#}"));
    }
    // (a) every metric read is exported, with the labels the query filters or groups on
    for (metric, uses) in &used {
        if PROMETHEUS_SERIES.contains(&metric.as_str()) {
            continue;
        }
        let Some(labels) = exported.series.get(metric) else {
            problems.push(format!(
                "{metric} is read by {} but no service exports it",
                uses.sources.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
            continue;
        };
        for label in &uses.labels {
            if !labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                problems.push(format!(
                    "{metric} has no label `{label}` (it has {labels:?}); read by {:?}",
                    uses.sources
                ));
            }
        }
        for (label, value) in &uses.values {
            let known = exported.values.get(&(metric.clone(), label.clone()));
            if !known.is_some_and(|v| v.contains(value)) {
                problems.push(format!(
                    "{metric} never has {label}=\"{value}\" (seen: {known:?}); read by {:?}",
                    uses.sources
                ));
            }
        }
    }
    // (b) every exported family is on a panel or deliberately unpanelled
    let panelled: BTreeSet<String> = used
        .iter()
        .filter(|(_, u)| u.sources.iter().any(|s| s.contains(".json: ")))
        .filter_map(|(m, _)| exported.family_of(m).or(Some(m.clone())))
        .collect();
    let unpanelled = unpanelled(&root);
    for family in exported.families.keys() {
        if family.starts_with("nightshift_")
            && !panelled.contains(family)
            && !unpanelled.contains(family)
        {
            problems.push(format!(
                "{family} is exported but on no dashboard panel and not in helm/nightshift/dashboards/unpanelled.txt"
            ));
        }
    }
    // (c) the unpanelled list names declared families that are indeed on no panel, and every
    // declared family is accounted for (on a panel, or listed)
    let declared = declared_families(&root);
    for family in &unpanelled {
        if !declared.contains(family) {
            problems.push(format!(
                "unpanelled.txt lists {family}, which no crates/*/src/**/metrics.rs declares"
            ));
        }
        if panelled.contains(family) {
            problems.push(format!(
                "unpanelled.txt lists {family}, which a panel shows"
            ));
        }
    }
    for family in &declared {
        if !panelled.contains(family) && !unpanelled.contains(family) {
            problems.push(format!(
                "{family} is declared in a metrics.rs but on no panel and not in unpanelled.txt"
            ));
        }
    }
    let missing: Vec<&String> = used
        .keys()
        .filter(|m| !PROMETHEUS_SERIES.contains(&m.as_str()) && !exported.has_series(m))
        .collect();
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}\nmetrics read but not exported: {missing:?}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// Every PromQL expression of the dashboards and alert rules, with where it comes from.
fn queries(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dir = root.join("helm/nightshift/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("dashboards dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards in {}", dir.display());
    for path in files {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let text = std::fs::read_to_string(&path).expect("dashboard");
        let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
        for panel in dash["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let title = panel["title"].as_str().unwrap_or("?");
                    out.push((format!("{name}: {title}"), expr.to_owned()));
                }
            }
        }
    }
    let alerts = root.join("helm/nightshift/files/alerts.yaml");
    let text = std::fs::read_to_string(&alerts).expect("alerts.yaml");
    let exprs = alert_exprs(&text);
    let rules = text
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(exprs.len(), rules, "one expr per alert rule in alerts.yaml");
    for (alert, expr) in exprs {
        out.push((format!("alerts.yaml: {alert}"), expr));
    }
    out
}

/// `(alert, expr)` pairs of a Prometheus rule file: each `expr:` either on its line or a block
/// scalar (`>-`, `|-`, ...) of the lines indented below it. Folding does not matter: PromQL
/// reads a newline as a space. (The file's YAML as a whole is checked by `make ops-check`.)
fn alert_exprs(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut alert = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            alert = name.trim().to_owned();
        } else if let Some(value) = trimmed.strip_prefix("expr:") {
            let value = value.trim();
            if value.starts_with(['>', '|']) {
                let indent = line.len() - trimmed.len();
                let mut body = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    body.push(next.trim());
                    i += 1;
                }
                out.push((alert.clone(), body.join("\n")));
            } else {
                let unquoted = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                    .unwrap_or(value);
                out.push((alert.clone(), unquoted.to_owned()));
            }
        }
        i += 1;
    }
    out
}

/// What the queries read of one metric (a series name: `x_bucket`, not the family `x`).
#[derive(Default, Debug)]
struct Uses {
    /// Where it is read (dashboard panel or alert).
    sources: BTreeSet<String>,
    /// Labels matched on or grouped by.
    labels: BTreeSet<String>,
    /// `quantile`/`le` values asked for: a summary's quantiles are fixed by the exporter.
    values: BTreeSet<(String, String)>,
}

fn used_metrics(queries: &[(String, String)]) -> BTreeMap<String, Uses> {
    let mut used: BTreeMap<String, Uses> = BTreeMap::new();
    for (source, expr) in queries {
        let mut promql = expr.clone();
        for (var, value) in GRAFANA_VARIABLES {
            promql = promql.replace(var, value);
        }
        assert!(
            !promql.contains('$'),
            "{source}: unknown Grafana variable in {expr}"
        );
        let ast = parser::parse(&promql)
            .unwrap_or_else(|e| panic!("{source}: PromQL does not parse: {e}\n{expr}"));
        let mut found = Vec::new();
        walk(&ast, &[], &mut found);
        assert!(!found.is_empty(), "{source}: reads no metric: {expr}");
        for (selector, grouping) in found {
            let name = selector_name(&selector)
                .unwrap_or_else(|| panic!("{source}: a selector without a metric name: {expr}"));
            let uses = used.entry(name).or_default();
            uses.sources.insert(source.clone());
            for m in selector_matchers(&selector) {
                if m.name == "__name__" {
                    continue;
                }
                uses.labels.insert(m.name.clone());
                if matches!(m.op, MatchOp::Equal) && (m.name == "quantile" || m.name == "le") {
                    uses.values.insert((m.name.clone(), m.value.clone()));
                }
            }
            uses.labels.extend(grouping);
        }
    }
    used
}

fn selector_name(vs: &VectorSelector) -> Option<String> {
    vs.name.clone().or_else(|| {
        selector_matchers(vs)
            .into_iter()
            .find(|m| m.name == "__name__" && matches!(m.op, MatchOp::Equal))
            .map(|m| m.value.clone())
    })
}

fn selector_matchers(vs: &VectorSelector) -> Vec<&Matcher> {
    vs.matchers
        .matchers
        .iter()
        .chain(vs.matchers.or_matchers.iter().flatten())
        .collect()
}

/// Collects every vector selector under `expr`, with the labels the innermost aggregation
/// above it groups by (`sum by (upstream) (...)`: the selector must carry `upstream`; an outer
/// aggregation groups the inner one's output, not the selector).
fn walk(expr: &Expr, grouping: &[String], out: &mut Vec<(VectorSelector, Vec<String>)>) {
    match expr {
        Expr::Aggregate(a) => {
            let inner = match &a.modifier {
                Some(LabelModifier::Include(labels)) => labels.labels.clone(),
                _ => Vec::new(),
            };
            walk(&a.expr, &inner, out);
            if let Some(param) = &a.param {
                walk(param, &[], out);
            }
        }
        Expr::Unary(u) => walk(&u.expr, grouping, out),
        Expr::Binary(b) => {
            walk(&b.lhs, grouping, out);
            walk(&b.rhs, grouping, out);
        }
        Expr::Paren(p) => walk(&p.expr, grouping, out),
        Expr::Subquery(s) => walk(&s.expr, grouping, out),
        Expr::VectorSelector(vs) => out.push((vs.clone(), grouping.to_vec())),
        Expr::MatrixSelector(ms) => out.push((ms.vs.clone(), grouping.to_vec())),
        Expr::Call(call) => {
            for arg in &call.args.args {
                walk(arg, grouping, out);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// What the services export, accumulated over scrapes.
#[derive(Default)]
struct Exported {
    /// Family → its `# TYPE`.
    families: BTreeMap<String, String>,
    /// Series name → label names seen on it.
    series: BTreeMap<String, BTreeSet<String>>,
    /// (series name, label) → values seen, for `quantile` and `le` only.
    values: BTreeMap<(String, String), BTreeSet<String>>,
}

impl Exported {
    /// Adds one Prometheus text exposition.
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    self.families.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            let labels = self.series.entry(name.to_owned()).or_default();
            if line[name_end..].starts_with('{') {
                let body = &line[name_end + 1..line.rfind('}').unwrap_or(line.len())];
                for (label, value) in parse_labels(body) {
                    if label == "quantile" || label == "le" {
                        self.values
                            .entry((name.to_owned(), label.clone()))
                            .or_default()
                            .insert(value);
                    }
                    labels.insert(label);
                }
            }
        }
    }

    fn has_series(&self, name: &str) -> bool {
        self.series.contains_key(name)
    }

    /// The family a series belongs to (`x_bucket` → `x` for a histogram).
    fn family_of(&self, series: &str) -> Option<String> {
        if self.families.contains_key(series) {
            return Some(series.to_owned());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = series.strip_suffix(suffix)?;
            matches!(
                self.families.get(base).map(String::as_str),
                Some("histogram" | "summary")
            )
            .then(|| base.to_owned())
        })
    }
}

/// `a="x",b="y"` → pairs (values unescaped enough for comparison).
fn parse_labels(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(eq) = rest.find('=') {
        let name = rest[..eq].trim().trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 1..];
        let Some(value_start) = after.find('"') else {
            break;
        };
        let value_body = &after[value_start + 1..];
        let mut end = 0;
        let mut escaped = false;
        for (i, c) in value_body.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = i;
                    break;
                }
                _ => escaped = false,
            }
        }
        out.push((name, value_body[..end].replace("\\\"", "\"")));
        rest = &value_body[(end + 1).min(value_body.len())..];
    }
    out
}

/// The families listed in `unpanelled.txt` (first word of each line that is not a comment).
fn unpanelled(root: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root.join("helm/nightshift/dashboards/unpanelled.txt"))
        .expect("unpanelled.txt");
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Every `"nightshift_…"` name declared in a `metrics.rs` of the crates.
fn declared_families(root: &Path) -> BTreeSet<String> {
    fn visit(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                visit(&path, out);
            } else if path.file_name().is_some_and(|n| n == "metrics.rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for krate in std::fs::read_dir(root.join("crates"))
        .expect("crates")
        .flatten()
    {
        visit(&krate.path().join("src"), &mut files);
    }
    let mut out = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for piece in text.split('"').skip(1).step_by(2) {
            if piece.starts_with("nightshift_")
                && piece
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                out.insert(piece.to_owned());
            }
        }
    }
    out
}

/// Runs [`DRIVE`] with the e2e virtualenv's Python and the helpers of `tests/python`; returns
/// the id of the file to expire.
async fn drive(root: &Path, origin: &str, key: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("ops_drive.py");
    std::fs::write(&script, DRIVE).expect("script");
    let python = nightshift_e2e::python_bin().expect("python");
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(&script)
        .env("PYTHONPATH", root.join("tests/python"))
        .env("NS_ORIGIN", origin)
        .env("NS_BASE_URL", format!("{origin}/v1"))
        .env("NS_API_KEY", key)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("the drive script timed out")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drive script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("result line");
    last["expiring"].as_str().expect("file id").to_owned()
}

/// `GET /metrics` of a loopback port, over HTTP/1.0 (the harness needs no HTTP client).
async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("connect to :{port}: {e}"));
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut text))
        .await
        .expect("scrape timed out")
        .expect("read");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200"),
        "{head}"
    );
    body.to_owned()
}
