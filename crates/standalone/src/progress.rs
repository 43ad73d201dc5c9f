//! Progress on the terminal: one line per batch state change, and a throughput line at a
//! steady pace while batches run. Nothing is printed while nothing happens.
//!
//! It watches the metadata store (the batches in a non-terminal status) and the live counts,
//! so it shows what the API shows; it never changes anything.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use nightshift_core::batch::{BatchRecord, BatchStatus};
use nightshift_core::ids::BatchId;
use nightshift_metadata::MetadataStore;
use nightshift_state::{LiveCounts, LiveState};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often progress looks, and how often it reports throughput.
#[derive(Debug, Clone)]
pub struct ProgressSettings {
    /// How often the batches are looked at (state changes appear within this).
    pub poll: Duration,
    /// How often a throughput line is printed while batches run.
    pub throughput_every: Duration,
}

impl Default for ProgressSettings {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(1),
            throughput_every: Duration::from_secs(10),
        }
    }
}

const ACTIVE: [BatchStatus; 4] = [
    BatchStatus::Validating,
    BatchStatus::InProgress,
    BatchStatus::Finalizing,
    BatchStatus::Cancelling,
];

/// The progress reporter of a standalone process.
pub struct Progress {
    settings: ProgressSettings,
    metadata: Arc<dyn MetadataStore>,
    state: Arc<dyn nightshift_state::LiveState>,
    out: Box<dyn Write + Send>,
    /// Ids of batches as they are created ([`nightshift_metadata::SqlStore::subscribe_created`]).
    created: Option<mpsc::UnboundedReceiver<BatchId>>,
    tracker: Tracker,
}

impl Progress {
    pub fn new(
        settings: ProgressSettings,
        metadata: Arc<dyn MetadataStore>,
        state: Arc<dyn LiveState>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Self {
            settings,
            metadata,
            state,
            out,
            created: None,
            tracker: Tracker::default(),
        }
    }

    /// Also follows the batches announced on `created`, so one that starts and ends between
    /// two looks still gets its line.
    pub(crate) fn follow_created(mut self, created: mpsc::UnboundedReceiver<BatchId>) -> Self {
        self.created = Some(created);
        self
    }

    /// Reports until `stop` is cancelled.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut poll = tokio::time::interval(self.settings.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_report = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = poll.tick() => {}
            }
            let throughput = last_report.elapsed() >= self.settings.throughput_every;
            match self.look(throughput).await {
                Ok(lines) => {
                    if throughput {
                        last_report = tokio::time::Instant::now();
                    }
                    for line in lines {
                        // A closed terminal is no reason to stop the product.
                        let _ = writeln!(self.out, "{line}");
                    }
                    let _ = self.out.flush();
                }
                // Transient (the store is busy): the next poll catches up.
                Err(e) => tracing::debug!(error = %e, "progress: cannot read batches"),
            }
        }
    }

    async fn look(&mut self, throughput: bool) -> Result<Vec<String>, String> {
        let now = nightshift_core::time::now_unix();
        if let Some(created) = &mut self.created {
            while let Ok(id) = created.try_recv() {
                self.tracker.pending.insert(id);
            }
        }
        let active = self
            .metadata
            .batches_with_status(&ACTIVE)
            .await
            .map_err(|e| e.to_string())?;
        let ids: Vec<&str> = active.iter().map(|b| b.id.as_str()).collect();
        let live = self
            .state
            .counts_many(&ids)
            .await
            .map_err(|e| e.to_string())?;
        let mut ended = Vec::new();
        for id in self.tracker.gone(&active) {
            if let Some(batch) = self.metadata.batch(&id).await.map_err(|e| e.to_string())? {
                ended.push(batch);
            }
        }
        let mut lines = self.tracker.observe(now, &active, &live, &ended);
        if throughput && let Some(line) = self.tracker.throughput(now) {
            lines.push(line);
        }
        Ok(lines)
    }
}

/// What progress remembers of a batch it has seen running.
#[derive(Debug, Clone)]
struct Seen {
    status: BatchStatus,
    finished: u64,
    total: u64,
}

/// The pure part of progress: snapshots in, lines out.
#[derive(Debug, Default)]
struct Tracker {
    seen: BTreeMap<BatchId, Seen>,
    /// Batches announced as created and not seen yet.
    pending: BTreeSet<BatchId>,
    /// `(unix seconds, requests finished)` of the last throughput line.
    last: Option<(i64, u64)>,
    /// Requests finished by batches that ended since the last throughput line.
    ended_finished: u64,
}

impl Tracker {
    /// Batches seen running, or announced, that are not in `active`.
    fn gone(&self, active: &[BatchRecord]) -> Vec<BatchId> {
        self.seen
            .keys()
            .chain(&self.pending)
            .filter(|id| !active.iter().any(|b| &b.id == *id))
            .cloned()
            .collect()
    }

    fn observe(
        &mut self,
        now: i64,
        active: &[BatchRecord],
        live: &[LiveCounts],
        ended: &[BatchRecord],
    ) -> Vec<String> {
        let mut lines = Vec::new();
        // A "gone" batch read back still running changed status between the two reads: the
        // next look sees it among the active ones.
        for batch in ended.iter().filter(|b| b.status.is_terminal()) {
            let already = match self.seen.remove(&batch.id) {
                Some(seen) => seen.finished,
                None if self.pending.remove(&batch.id) => 0,
                None => continue,
            };
            let counts = batch.request_counts;
            self.ended_finished += (counts.completed + counts.failed).saturating_sub(already);
            lines.push(line(now, batch, &ending(batch)));
        }
        for (i, batch) in active.iter().enumerate() {
            self.pending.remove(&batch.id);
            let counts = live.get(i).copied().unwrap_or_default();
            let previous = self.seen.insert(
                batch.id.clone(),
                Seen {
                    status: batch.status,
                    finished: counts.finished(),
                    total: batch.request_counts.total,
                },
            );
            if previous.is_some_and(|p| p.status == batch.status) {
                continue;
            }
            let detail = match batch.status {
                BatchStatus::Validating => format!(
                    "{} {} from {}",
                    batch.endpoint, batch.completion_window, batch.input_file_id
                ),
                BatchStatus::InProgress => format!(
                    "{} requests{}",
                    thousands(batch.request_counts.total),
                    batch
                        .model
                        .as_deref()
                        .map(|m| format!(" for {m}"))
                        .unwrap_or_default()
                ),
                BatchStatus::Finalizing => format!(
                    "writing the results of {} requests",
                    thousands(counts.finished().max(batch.request_counts.total))
                ),
                BatchStatus::Cancelling => format!(
                    "{} of {} requests done; stopping the rest",
                    thousands(counts.finished()),
                    thousands(batch.request_counts.total)
                ),
                _ => String::new(),
            };
            lines.push(line(now, batch, &detail));
        }
        lines
    }

    /// One line for every running batch together: requests done, rate since the last line, time
    /// left at that rate. `None` when nothing runs.
    fn throughput(&mut self, now: i64) -> Option<String> {
        let running: Vec<&Seen> = self
            .seen
            .values()
            .filter(|s| s.status == BatchStatus::InProgress)
            .collect();
        let finished_running: u64 = running.iter().map(|s| s.finished).sum();
        let total_running: u64 = running.iter().map(|s| s.total).sum();
        let total_finished = finished_running + self.ended_finished;
        let last = self.last.replace((now, total_finished));
        if running.is_empty() {
            self.last = None;
            self.ended_finished = 0;
            return None;
        }
        let rate = last.and_then(|(at, finished)| {
            let secs = now - at;
            (secs > 0).then(|| total_finished.saturating_sub(finished) as f64 / secs as f64)
        });
        let left = total_running.saturating_sub(finished_running);
        let rate_text = match rate {
            Some(r) if r > 0.0 => format!(
                ", {} req/s, ~{} left",
                rate_str(r),
                duration((left as f64 / r).ceil() as i64)
            ),
            Some(_) => ", 0 req/s".to_owned(),
            None => String::new(),
        };
        let percent = (finished_running * 100)
            .checked_div(total_running)
            .unwrap_or(0);
        Some(format!(
            "{} {} running: {} of {} requests ({percent}%){rate_text}",
            clock(now),
            match running.len() {
                1 => "1 batch".to_owned(),
                n => format!("{n} batches"),
            },
            thousands(finished_running),
            thousands(total_running),
        ))
    }
}

fn ending(batch: &BatchRecord) -> String {
    let c = batch.request_counts;
    let took = batch
        .completed_at
        .or(batch.failed_at)
        .or(batch.expired_at)
        .or(batch.cancelled_at)
        .map(|end| format!(" in {}", duration(end - batch.created_at())))
        .unwrap_or_default();
    match batch.status {
        BatchStatus::Failed => {
            let why = batch
                .errors
                .first()
                .map(|e| format!(": {}", e.message))
                .unwrap_or_default();
            let more = match batch.errors.len() {
                0 | 1 => String::new(),
                n => format!(" (and {} more errors)", n - 1),
            };
            format!("validation failed{why}{more}")
        }
        _ => {
            let files = [
                batch.output_file_id.as_ref().map(|f| format!("output {f}")),
                batch.error_file_id.as_ref().map(|f| format!("errors {f}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ");
            let files = if files.is_empty() {
                String::new()
            } else {
                format!(" → {files}")
            };
            format!(
                "{} succeeded, {} failed of {}{took}{files}",
                thousands(c.completed),
                thousands(c.failed),
                thousands(c.total)
            )
        }
    }
}

fn line(now: i64, batch: &BatchRecord, detail: &str) -> String {
    format!(
        "{} {}  {:<11} {detail}",
        clock(now),
        batch.id,
        batch.status.as_str()
    )
    .trim_end()
    .to_owned()
}

/// `HH:MM:SS` (UTC) of a Unix time.
fn clock(unix: i64) -> String {
    let s = unix.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn duration(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs / 60 % 60),
    }
}

fn rate_str(rate: f64) -> String {
    if rate >= 100.0 {
        thousands(rate.round() as u64)
    } else {
        format!("{rate:.1}")
    }
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use nightshift_core::batch::RequestCounts;
    use nightshift_core::ids::{FileId, TenantId};

    use super::*;

    fn batch(id: &str, status: BatchStatus, total: u64) -> BatchRecord {
        BatchRecord {
            id: BatchId::parse(id).unwrap(),
            tenant_id: TenantId::generate(),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: "file-in".into(),
            completion_window: "24h".into(),
            status,
            model: Some("sim-chat".into()),
            errors: Vec::new(),
            metadata: None,
            output_expires_after_secs: 0,
            output_file_id: None,
            error_file_id: None,
            created_at_us: 1_000 * 1_000_000,
            in_progress_at: None,
            expires_at: 0,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts {
                total,
                ..RequestCounts::default()
            },
            usage: Default::default(),
            traceparent: None,
        }
    }

    fn live(completed: u64) -> LiveCounts {
        LiveCounts {
            completed,
            ..LiveCounts::default()
        }
    }

    #[test]
    fn one_line_per_state_change_and_none_while_nothing_changes() {
        let mut t = Tracker::default();
        let id = "batch_aaaaaaaaaaaaaaaaaaaaaaaa";
        let lines = t.observe(
            3600,
            &[batch(id, BatchStatus::Validating, 0)],
            &[live(0)],
            &[],
        );
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("01:00:00 batch_"), "{}", lines[0]);
        assert!(lines[0].contains("validating"));

        let running = batch(id, BatchStatus::InProgress, 1500);
        let lines = t.observe(3601, std::slice::from_ref(&running), &[live(10)], &[]);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].contains("1,500 requests for sim-chat"),
            "{}",
            lines[0]
        );
        // the same state again: nothing
        assert!(
            t.observe(3602, std::slice::from_ref(&running), &[live(700)], &[])
                .is_empty()
        );

        let mut done = batch(id, BatchStatus::Completed, 1500);
        done.request_counts.completed = 1498;
        done.request_counts.failed = 2;
        done.completed_at = Some(1_075);
        done.output_file_id = Some(FileId::generate());
        assert_eq!(t.gone(&[]), vec![done.id.clone()]);
        let lines = t.observe(3603, &[], &[], &[done]);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0]
                .contains("completed   1,498 succeeded, 2 failed of 1,500 in 1m15s → output file-"),
            "{}",
            lines[0]
        );
        assert!(t.gone(&[]).is_empty());
    }

    #[test]
    fn throughput_counts_the_requests_done_between_two_lines() {
        let mut t = Tracker::default();
        let a = batch(
            "batch_aaaaaaaaaaaaaaaaaaaaaaaa",
            BatchStatus::InProgress,
            10_000,
        );
        let b = batch(
            "batch_bbbbbbbbbbbbbbbbbbbbbbbb",
            BatchStatus::InProgress,
            100,
        );
        t.observe(0, &[a.clone(), b.clone()], &[live(0), live(0)], &[]);
        let first = t.throughput(0).unwrap();
        assert!(
            first.ends_with("2 batches running: 0 of 10,100 requests (0%)"),
            "{first}"
        );

        // b ends with 100 done; a has done 1,900: 2,000 in 10 s
        t.observe(10, std::slice::from_ref(&a), &[live(1_900)], &[]);
        let mut b_done = b.clone();
        b_done.status = BatchStatus::Completed;
        b_done.request_counts.completed = 100;
        t.observe(10, std::slice::from_ref(&a), &[live(1_900)], &[b_done]);
        let line = t.throughput(10).unwrap();
        assert!(
            line.ends_with("1 batch running: 1,900 of 10,000 requests (19%), 200 req/s, ~41s left"),
            "{line}"
        );

        // nothing running: no line, and the next run starts afresh
        let mut a_done = a.clone();
        a_done.status = BatchStatus::Completed;
        t.observe(20, &[], &[], &[a_done]);
        assert_eq!(t.throughput(20), None);
    }

    #[test]
    fn a_batch_announced_and_ended_between_two_looks_still_gets_its_line() {
        let mut t = Tracker::default();
        let id = BatchId::parse("batch_dddddddddddddddddddddddd").unwrap();
        t.pending.insert(id.clone());
        assert_eq!(t.gone(&[]), vec![id.clone()]);
        // read back still validating (it changed between the two reads): wait
        let mut b = batch(id.as_str(), BatchStatus::Validating, 0);
        assert!(t.observe(0, &[], &[], std::slice::from_ref(&b)).is_empty());
        b.status = BatchStatus::Completed;
        b.request_counts.completed = 2;
        b.request_counts.total = 2;
        let lines = t.observe(1, &[], &[], &[b]);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].contains("completed   2 succeeded, 0 failed of 2"),
            "{}",
            lines[0]
        );
        assert!(t.gone(&[]).is_empty());
    }

    #[test]
    fn a_failed_validation_says_why() {
        let mut t = Tracker::default();
        let id = "batch_cccccccccccccccccccccccc";
        t.observe(0, &[batch(id, BatchStatus::Validating, 0)], &[live(0)], &[]);
        let mut failed = batch(id, BatchStatus::Failed, 0);
        failed.errors = vec![nightshift_core::validation::BatchError {
            code: "invalid_json_line".into(),
            message: "Line 3 is not valid JSON.".into(),
            param: None,
            line: Some(3),
        }];
        let lines = t.observe(1, &[], &[], &[failed]);
        assert!(
            lines[0].ends_with("failed      validation failed: Line 3 is not valid JSON."),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(61), "1m01s");
        assert_eq!(duration(7_300), "2h01m");
        assert_eq!(clock(86_399), "23:59:59");
        assert_eq!(rate_str(2_781.4), "2,781");
        assert_eq!(rate_str(3.25), "3.2");
    }
}
