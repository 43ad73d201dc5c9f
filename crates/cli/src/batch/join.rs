//! Joining result lines back to the input lines by `custom_id`, in bounded memory.
//!
//! A batch's output and error files are in no particular order; a person wants them in the
//! input's order, and a retry wants the input lines of the failed requests. Neither may hold
//! a million lines (or a million ids) in memory, so both are two external sorts:
//!
//! 1. one sort by `custom_id` of the input's ids (with their line numbers) and the result
//!    lines, so each id is followed by its results;
//! 2. one sort by input line number of what the first one paired up.
//!
//! A [`Sorter`] holds records up to a byte budget, then writes them sorted to a spill file
//! (a "run") in a temporary directory; reading merges the runs (k-way, at most [`FAN_IN`]
//! files at once, merging in several passes beyond that). Memory is the budget plus one
//! buffered reader per run being merged, whatever the number of lines.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Runs merged at once; more are merged in passes, so open files stay few.
const FAN_IN: usize = 64;

/// What a record costs in memory besides its bytes (two `Vec` headers and the tuple).
const RECORD_OVERHEAD: usize = 56;

/// A record: sorted by key, then by payload.
type Record = (Vec<u8>, Vec<u8>);

/// An external sort of records: in memory up to `budget` bytes, then sorted runs on disk.
pub struct Sorter {
    /// This sort's own directory of spill files (created at the first spill, deleted with
    /// the sorted records).
    dir: Option<tempfile::TempDir>,
    /// Where that directory goes.
    parent: PathBuf,
    /// Bytes held in memory (records' bytes plus their overhead) before a spill.
    budget: usize,
    held: usize,
    records: Vec<Record>,
    runs: Vec<PathBuf>,
    /// Names the next run file.
    next_run: usize,
    /// Runs written, merge passes included (for the tests and `--verbose` diagnostics).
    pub spills: usize,
}

impl Sorter {
    /// Spill files go to a directory of their own under `parent`.
    pub fn new(parent: &Path, budget: usize) -> Self {
        Self {
            dir: None,
            parent: parent.to_owned(),
            budget: budget.max(1),
            held: 0,
            records: Vec::new(),
            runs: Vec::new(),
            next_run: 0,
            spills: 0,
        }
    }

    pub fn push(&mut self, key: Vec<u8>, payload: Vec<u8>) -> io::Result<()> {
        self.held += key.len() + payload.len() + RECORD_OVERHEAD;
        self.records.push((key, payload));
        if self.held >= self.budget {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> io::Result<()> {
        let mut records = std::mem::take(&mut self.records);
        self.held = 0;
        records.sort_unstable();
        let path = self.run_path()?;
        let mut out = BufWriter::with_capacity(64 * 1024, File::create(&path)?);
        for (key, payload) in &records {
            write_record(&mut out, key, payload)?;
        }
        out.flush()?;
        self.runs.push(path);
        Ok(())
    }

    fn run_path(&mut self) -> io::Result<PathBuf> {
        let dir = match &self.dir {
            Some(dir) => dir,
            None => self.dir.insert(
                tempfile::Builder::new()
                    .prefix("nightshift-sort-")
                    .tempdir_in(&self.parent)?,
            ),
        };
        let path = dir.path().join(format!("run-{}", self.next_run));
        self.next_run += 1;
        self.spills += 1;
        Ok(path)
    }

    /// Every record pushed, sorted. Without spills it is an in-memory sort.
    pub fn finish(mut self) -> io::Result<(Sorted, usize)> {
        if self.runs.is_empty() {
            let mut records = std::mem::take(&mut self.records);
            records.sort_unstable();
            return Ok((Sorted::Memory(records.into_iter()), self.spills));
        }
        if !self.records.is_empty() {
            self.spill()?;
        }
        // merge in passes until one merge of at most FAN_IN runs is left
        while self.runs.len() > FAN_IN {
            let batch: Vec<PathBuf> = self.runs.drain(..FAN_IN).collect();
            let path = self.run_path()?;
            let mut out = BufWriter::with_capacity(64 * 1024, File::create(&path)?);
            let mut merge = Merge::open(&batch)?;
            while let Some((key, payload)) = merge.next_record()? {
                write_record(&mut out, &key, &payload)?;
            }
            out.flush()?;
            drop(merge);
            for done in batch {
                std::fs::remove_file(done)?;
            }
            self.runs.push(path);
        }
        let merge = Merge::open(&self.runs)?;
        Ok((
            Sorted::Runs {
                merge,
                _dir: self.dir,
            },
            self.spills,
        ))
    }
}

fn write_record(out: &mut impl Write, key: &[u8], payload: &[u8]) -> io::Result<()> {
    out.write_all(&(key.len() as u32).to_le_bytes())?;
    out.write_all(key)?;
    out.write_all(&(payload.len() as u32).to_le_bytes())?;
    out.write_all(payload)
}

fn read_record(input: &mut impl Read) -> io::Result<Option<Record>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut key = vec![0; u32::from_le_bytes(len) as usize];
    input.read_exact(&mut key)?;
    input.read_exact(&mut len)?;
    let mut payload = vec![0; u32::from_le_bytes(len) as usize];
    input.read_exact(&mut payload)?;
    Ok(Some((key, payload)))
}

/// A record at the head of a run: (key, payload, run index), smallest first.
type Head = Reverse<(Vec<u8>, Vec<u8>, usize)>;

/// A k-way merge of sorted runs.
pub struct Merge {
    readers: Vec<BufReader<File>>,
    /// The smallest unread record of each run, tagged with the run.
    heads: BinaryHeap<Head>,
}

impl Merge {
    fn open(runs: &[PathBuf]) -> io::Result<Self> {
        let mut readers = Vec::with_capacity(runs.len());
        let mut heads = BinaryHeap::with_capacity(runs.len());
        for (i, path) in runs.iter().enumerate() {
            let mut reader = BufReader::with_capacity(32 * 1024, File::open(path)?);
            if let Some((key, payload)) = read_record(&mut reader)? {
                heads.push(Reverse((key, payload, i)));
            }
            readers.push(reader);
        }
        Ok(Self { readers, heads })
    }

    fn next_record(&mut self) -> io::Result<Option<Record>> {
        let Some(Reverse((key, payload, i))) = self.heads.pop() else {
            return Ok(None);
        };
        if let Some((k, p)) = read_record(&mut self.readers[i])? {
            self.heads.push(Reverse((k, p, i)));
        }
        Ok(Some((key, payload)))
    }
}

/// The records of a [`Sorter`], in order.
pub enum Sorted {
    Memory(std::vec::IntoIter<Record>),
    Runs {
        merge: Merge,
        /// The directory of the runs, deleted when the records have been read.
        _dir: Option<tempfile::TempDir>,
    },
}

impl Sorted {
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        match self {
            Sorted::Memory(records) => Ok(records.next()),
            Sorted::Runs { merge, .. } => merge.next_record(),
        }
    }
}

/// Reads `path` line by line (without the `\n` / `\r\n`), skipping blank lines, calling `f`
/// with the 1-based line number.
fn for_each_line(
    path: &Path,
    mut f: impl FnMut(u64, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut reader = BufReader::with_capacity(
        256 * 1024,
        File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
    );
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        number += 1;
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        f(number, &line).with_context(|| format!("{} line {number}", path.display()))?;
    }
}

#[derive(Deserialize)]
struct CustomId<'a> {
    #[serde(borrow)]
    custom_id: Cow<'a, str>,
}

fn custom_id(line: &[u8]) -> anyhow::Result<Vec<u8>> {
    let id: CustomId = serde_json::from_slice(line).context("not a JSON line with a custom_id")?;
    Ok(id.custom_id.into_owned().into_bytes())
}

#[derive(Deserialize)]
struct ResultLine<'a> {
    #[serde(borrow)]
    custom_id: Cow<'a, str>,
    #[serde(default)]
    response: Option<ResultResponse>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct ResultResponse {
    #[serde(default)]
    status_code: Option<u16>,
}

impl ResultLine<'_> {
    /// A request that did not succeed: an `error`, no response, or a non-2xx status.
    fn failed(&self) -> bool {
        self.error.is_some()
            || match &self.response {
                None => true,
                Some(r) => !matches!(r.status_code, Some(200..=299)),
            }
    }
}

/// What [`results_in_input_order`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct JoinStats {
    /// Result lines written.
    pub lines: u64,
    /// Input requests without any result line (a batch that has not ended, or lost lines).
    pub without_result: u64,
    /// Result lines whose custom_id is not in the input (written last, in id order).
    pub unmatched: u64,
    /// Spill files written by both sorts.
    pub spills: usize,
}

/// Writes every line of the `results` files, each tagged with its file's `dest`, to `sink`
/// in the order of the input line with the same `custom_id` (results of ids absent from the
/// input come last). Only the input's ids are read, not its bodies. Memory: about `budget`
/// bytes plus the merge buffers; spill files go to `tmp`.
pub fn results_in_input_order(
    input: &Path,
    results: &[(&Path, u8)],
    budget: usize,
    tmp: &Path,
    mut sink: impl FnMut(u8, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<JoinStats> {
    let mut stats = JoinStats::default();
    let mut by_id = Sorter::new(tmp, budget);
    // the input's ids: payload [0, line number]; results: payload [1, dest, line]
    for_each_line(input, |number, line| {
        let mut payload = vec![0];
        payload.extend_from_slice(&number.to_be_bytes());
        by_id.push(custom_id(line)?, payload)?;
        Ok(())
    })?;
    for (path, dest) in results {
        for_each_line(path, |_, line| {
            let mut payload = Vec::with_capacity(line.len() + 2);
            payload.extend_from_slice(&[1, *dest]);
            payload.extend_from_slice(line);
            by_id.push(custom_id(line)?, payload)?;
            Ok(())
        })?;
    }
    let (mut sorted, spills) = by_id.finish()?;
    stats.spills += spills;

    // pair each result with the line number of the id just before it
    let mut by_line = Sorter::new(tmp, budget);
    let mut current: Option<(Vec<u8>, [u8; 8], bool)> = None;
    while let Some((id, payload)) = sorted.next_record()? {
        if payload.first() == Some(&0) {
            if let Some((_, _, false)) = current {
                stats.without_result += 1;
            }
            let number: [u8; 8] = payload[1..9].try_into().context("corrupt spill record")?;
            current = Some((id, number, false));
            continue;
        }
        let number = match &mut current {
            Some((current_id, number, seen)) if *current_id == id => {
                *seen = true;
                *number
            }
            _ => {
                stats.unmatched += 1;
                u64::MAX.to_be_bytes()
            }
        };
        let mut key = number.to_vec();
        key.extend_from_slice(&id);
        by_line.push(key, payload[1..].to_vec())?;
    }
    if let Some((_, _, false)) = current {
        stats.without_result += 1;
    }
    drop(sorted);
    let (mut sorted, spills) = by_line.finish()?;
    stats.spills += spills;
    while let Some((_, payload)) = sorted.next_record()? {
        sink(payload[0], &payload[1..])?;
        stats.lines += 1;
    }
    Ok(stats)
}

/// Writes to `sink`, in input order, the input lines whose requests failed according to the
/// `results` files (a result line with an `error`, no `response`, or a non-2xx status).
/// Returns how many. Memory as [`results_in_input_order`].
pub fn failed_input_lines(
    input: &Path,
    results: &[&Path],
    budget: usize,
    tmp: &Path,
    mut sink: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut by_id = Sorter::new(tmp, budget);
    // failed ids: payload [0]; input lines: payload [1, line number, line]
    for path in results {
        for_each_line(path, |_, line| {
            let result: ResultLine = serde_json::from_slice(line).context("not a result line")?;
            if result.failed() {
                by_id.push(result.custom_id.into_owned().into_bytes(), vec![0])?;
            }
            Ok(())
        })?;
    }
    for_each_line(input, |number, line| {
        let mut payload = Vec::with_capacity(line.len() + 9);
        payload.push(1);
        payload.extend_from_slice(&number.to_be_bytes());
        payload.extend_from_slice(line);
        by_id.push(custom_id(line)?, payload)?;
        Ok(())
    })?;
    let (mut sorted, _) = by_id.finish()?;
    let mut by_line = Sorter::new(tmp, budget);
    let mut failed: Option<Vec<u8>> = None;
    while let Some((id, payload)) = sorted.next_record()? {
        if payload.first() == Some(&0) {
            failed = Some(id);
        } else if failed.as_ref() == Some(&id) {
            by_line.push(payload[1..9].to_vec(), payload[9..].to_vec())?;
        }
    }
    drop(sorted);
    let (mut sorted, _) = by_line.finish()?;
    let mut selected = 0;
    while let Some((_, line)) = sorted.next_record()? {
        sink(&line)?;
        selected += 1;
    }
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
        let path = dir.join(name);
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(&path, text).expect("write");
        path
    }

    fn input_line(id: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"m"}}}}"#
        )
    }

    fn result_line(id: &str, status: u16) -> String {
        format!(
            r#"{{"id":"r","custom_id":"{id}","response":{{"status_code":{status},"body":{{}}}},"error":null}}"#
        )
    }

    /// Ids whose sorted order is not the input order, results shuffled across two files.
    fn fixture(dir: &Path, n: usize) -> (PathBuf, PathBuf, PathBuf, Vec<String>) {
        let ids: Vec<String> = (0..n).map(|i| format!("req-{}", (i * 7919) % n)).collect();
        let input = write(
            dir,
            "input.jsonl",
            &ids.iter().map(|id| input_line(id)).collect::<Vec<_>>(),
        );
        let mut out = Vec::new();
        let mut err = Vec::new();
        for (i, id) in ids.iter().enumerate().rev() {
            if i % 5 == 0 {
                err.push(result_line(id, 400));
            } else {
                out.push(result_line(id, 200));
            }
        }
        out.reverse();
        out.rotate_left(n / 3);
        (
            input,
            write(dir, "out.jsonl", &out),
            write(dir, "err.jsonl", &err),
            ids,
        )
    }

    fn ids_of(lines: &[(u8, Vec<u8>)]) -> Vec<String> {
        lines
            .iter()
            .map(|(_, l)| String::from_utf8(custom_id(l).expect("id")).expect("utf8"))
            .collect()
    }

    #[test]
    fn results_come_back_in_input_order_in_memory_and_with_spills() {
        let dir = tempfile::tempdir().expect("tmp");
        let (input, out, err, ids) = fixture(dir.path(), 1000);
        for budget in [usize::MAX, 4096, 200] {
            let mut lines = Vec::new();
            let stats = results_in_input_order(
                &input,
                &[(&out, 0), (&err, 1)],
                budget,
                dir.path(),
                |dest, line| {
                    lines.push((dest, line.to_vec()));
                    Ok(())
                },
            )
            .expect("join");
            assert_eq!(ids_of(&lines), ids, "budget {budget}");
            assert_eq!(
                (stats.lines, stats.without_result, stats.unmatched),
                (1000, 0, 0)
            );
            // each line kept the file it came from
            for (i, (dest, _)) in lines.iter().enumerate() {
                assert_eq!(*dest, u8::from(i % 5 == 0), "line {i}");
            }
            match budget {
                usize::MAX => assert_eq!(stats.spills, 0),
                // more runs than one merge takes: merge passes ran
                200 => assert!(stats.spills > 2 * FAN_IN, "{} spills", stats.spills),
                _ => assert!(stats.spills > 10, "{budget}: {} spills", stats.spills),
            }
        }
        // the spill directories went with the sorts: only the fixture is left
        let left = std::fs::read_dir(dir.path()).expect("dir").count();
        assert_eq!(left, 3, "spill directories are deleted");
    }

    #[test]
    fn missing_and_unknown_results_are_counted_and_unknown_ones_come_last() {
        let dir = tempfile::tempdir().expect("tmp");
        let input = write(
            dir.path(),
            "in.jsonl",
            &[
                input_line("b"),
                String::new(),
                input_line("a"),
                input_line("c"),
            ],
        );
        let out = write(
            dir.path(),
            "out.jsonl",
            &[
                result_line("zzz", 200),
                result_line("c", 200),
                result_line("b", 200),
            ],
        );
        let mut lines = Vec::new();
        let stats = results_in_input_order(&input, &[(&out, 0)], 64, dir.path(), |d, l| {
            lines.push((d, l.to_vec()));
            Ok(())
        })
        .expect("join");
        assert_eq!(ids_of(&lines), ["b", "c", "zzz"]);
        assert_eq!((stats.without_result, stats.unmatched), (1, 1));
    }

    #[test]
    fn failed_lines_are_selected_from_both_files_in_input_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let input = write(
            dir.path(),
            "in.jsonl",
            &["d", "a", "c", "b", "e"].map(input_line),
        );
        let out = write(
            dir.path(),
            "out.jsonl",
            &[
                result_line("a", 200),
                result_line("b", 500),
                result_line("e", 200),
            ],
        );
        let err = write(
            dir.path(),
            "err.jsonl",
            &[
                r#"{"id":"r","custom_id":"c","response":null,"error":{"code":"batch_expired","message":"m"}}"#.to_owned(),
                result_line("d", 429),
            ],
        );
        for budget in [usize::MAX, 1] {
            let mut picked = Vec::new();
            let n = failed_input_lines(&input, &[&out, &err], budget, dir.path(), |l| {
                picked.push(String::from_utf8(l.to_vec()).expect("utf8"));
                Ok(())
            })
            .expect("select");
            assert_eq!(n, 3);
            assert_eq!(picked, ["d", "c", "b"].map(input_line));
        }
    }

    #[test]
    fn a_line_without_custom_id_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().expect("tmp");
        let input = write(dir.path(), "in.jsonl", &[input_line("a"), "{}".into()]);
        let err = results_in_input_order(&input, &[], 1024, dir.path(), |_, _| Ok(()))
            .expect_err("no custom_id");
        assert!(format!("{err:#}").contains("in.jsonl line 2"), "{err:#}");
    }

    /// Peak memory of the join of 1M lines (about 600 MB of result lines) with the default
    /// budget; run with `cargo test --release -p nightshift-cli -- --ignored --nocapture
    /// million`. Measured: see docs/operations.md ("nightshift batch download").
    #[test]
    #[ignore = "a measurement: 1M lines (seconds in release, minutes in debug)"]
    fn million_lines_join_in_bounded_memory() {
        let dir = tempfile::tempdir().expect("tmp");
        let n = 1_000_000usize;
        // written streaming, so the fixture itself takes no memory
        let open = |name: &str| BufWriter::new(File::create(dir.path().join(name)).expect("file"));
        let (mut input, mut out, mut err) = (open("in"), open("out"), open("err"));
        for i in 0..n {
            writeln!(input, "{}", input_line(&format!("req-{}", (i * 7919) % n))).expect("w");
        }
        // the results in reverse order, with a 400-byte body each
        let body = "x".repeat(400);
        for i in (0..n).rev() {
            let id = format!("req-{}", (i * 7919) % n);
            let file = if i % 5 == 0 { &mut err } else { &mut out };
            writeln!(file, r#"{{"id":"r","custom_id":"{id}","response":{{"status_code":200,"body":{{"t":"{body}"}}}},"error":null}}"#).expect("w");
        }
        for mut file in [input, out, err] {
            file.flush().expect("flush");
        }
        let (input, out, err) = (
            dir.path().join("in"),
            dir.path().join("out"),
            dir.path().join("err"),
        );
        let before = peak_rss_kib();
        let mut sink = BufWriter::new(File::create(dir.path().join("joined")).expect("out"));
        let stats = results_in_input_order(
            &input,
            &[(&out, 0), (&err, 1)],
            super::super::download::DEFAULT_JOIN_BUDGET,
            dir.path(),
            |_, line| {
                sink.write_all(line)?;
                sink.write_all(b"\n")?;
                Ok(())
            },
        )
        .expect("join");
        assert_eq!(stats.lines, n as u64);
        let after = peak_rss_kib();
        println!(
            "1M lines: peak RSS {before} KiB before (fixture), {after} KiB after; {} spills",
            stats.spills
        );
        assert!(after < 256 * 1024, "peak RSS {after} KiB");
    }

    fn peak_rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    }
}
