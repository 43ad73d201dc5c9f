//! Cutting a validated batch input into chunks by byte range.
//!
//! A chunk is the unit of work an executor takes from the queue: a run of consecutive request
//! lines, identified by its byte range in the input file so the executor reads it with one
//! ranged GET. [`ChunkPlanner`] sees the lines once, in order (during validation's pass), and
//! emits each [`ChunkSpan`] as soon as it closes, so the scheduler can persist chunk boundaries
//! incrementally in bounded memory.
//!
//! Packing is greedy: a chunk takes lines until the next one would break a budget (lines or
//! bytes), then closes. A line larger than the byte budget on its own still makes a chunk (of
//! one line): no line is ever split or dropped.
//!
//! Blank lines are not requests. A valid input only has them at its end (validation rejects
//! them elsewhere), and they are left out of every span: spans then tile the file exactly from
//! the first line to the end of the last request. In an invalid input, a blank line between two
//! requests falls inside or between spans without being counted; such inputs are never
//! executed, but every non-blank line is still covered exactly once.

use crate::jsonl::{JsonlSplitter, Line};

/// One chunk: a contiguous byte range of the input holding `line_count` consecutive requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkSpan {
    /// 0-based position of the chunk in the file; chunks are emitted in index order.
    pub index: u32,
    /// File offset of the chunk's first line.
    pub byte_start: u64,
    /// File offset just past the chunk's last line, its terminator included (exclusive end).
    pub byte_end: u64,
    /// 1-based number of the chunk's first line.
    pub first_line: u64,
    /// Requests in the chunk (blank lines are not counted). Always at least 1.
    pub line_count: u32,
}

impl ChunkSpan {
    /// Size of the byte range.
    pub fn byte_len(&self) -> u64 {
        self.byte_end - self.byte_start
    }

    /// The byte range as an HTTP `Range` header value (`bytes=start-last`, inclusive end).
    pub fn http_range(&self) -> String {
        format!(
            "bytes={}-{}",
            self.byte_start,
            self.byte_end.saturating_sub(1)
        )
    }

    /// A splitter for reading this chunk's bytes: the lines it yields carry the file's own
    /// line numbers and offsets.
    pub fn splitter(&self, max_line_bytes: usize) -> JsonlSplitter {
        JsonlSplitter::new(max_line_bytes).starting_at(self.first_line, self.byte_start)
    }
}

/// Greedy chunk packing under a line budget and a byte budget.
///
/// Push every line of the file in order with [`push`](Self::push), then call
/// [`finish`](Self::finish). Each call returns the span it closed, if any.
#[derive(Debug)]
pub struct ChunkPlanner {
    /// Most requests per chunk (at least 1).
    max_lines: u32,
    /// Most bytes per chunk, unless a single line is larger.
    max_bytes: u64,
    /// The chunk being filled, if any.
    open: Option<ChunkSpan>,
    /// Index the next opened chunk gets.
    next_index: u32,
}

impl ChunkPlanner {
    /// A planner closing a chunk before it would exceed `max_lines_per_chunk` requests or
    /// `max_bytes_per_chunk` bytes (terminators included). A line budget of 0 is taken as 1.
    pub fn new(max_lines_per_chunk: u32, max_bytes_per_chunk: u64) -> Self {
        Self {
            max_lines: max_lines_per_chunk.max(1),
            max_bytes: max_bytes_per_chunk,
            open: None,
            next_index: 0,
        }
    }

    /// Adds the next line of the file. Returns the chunk this line closed (the previous one,
    /// when the line does not fit in it). Blank lines are skipped (see the module doc).
    pub fn push(&mut self, line: &Line) -> Option<ChunkSpan> {
        if line.is_blank() {
            return None;
        }
        self.push_range(line.number, line.offset, line.end)
    }

    /// Adds the next request line, given by its number and byte range (for callers that do
    /// not hold a [`Line`], e.g. an oversized one).
    pub fn push_range(&mut self, number: u64, offset: u64, end: u64) -> Option<ChunkSpan> {
        if let Some(open) = &mut self.open {
            let fits_lines = open.line_count < self.max_lines;
            let fits_bytes = end.saturating_sub(open.byte_start) <= self.max_bytes;
            if fits_lines && fits_bytes {
                open.line_count += 1;
                open.byte_end = end;
                return None;
            }
        }
        let index = self.next_index;
        self.next_index += 1;
        self.open.replace(ChunkSpan {
            index,
            byte_start: offset,
            byte_end: end,
            first_line: number,
            line_count: 1,
        })
    }

    /// Chunks opened so far (closed ones plus the one being filled).
    pub fn chunk_count(&self) -> u32 {
        self.next_index
    }

    /// Ends the file: returns the last chunk, if any line was pushed.
    pub fn finish(self) -> Option<ChunkSpan> {
        self.open
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::jsonl::JsonlItem;
    use bytes::Bytes;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn lines_of(input: &[u8]) -> Vec<Line> {
        JsonlSplitter::new(usize::MAX)
            .split_all(input.to_vec())
            .map(|item| match item {
                JsonlItem::Line(line) => line,
                JsonlItem::Oversized(_) => unreachable!("no limit"),
            })
            .collect()
    }

    fn plan(lines: &[Line], max_lines: u32, max_bytes: u64) -> Vec<ChunkSpan> {
        let mut planner = ChunkPlanner::new(max_lines, max_bytes);
        let mut spans: Vec<_> = lines.iter().filter_map(|l| planner.push(l)).collect();
        spans.extend(planner.finish());
        spans
    }

    fn span(
        index: u32,
        byte_start: u64,
        byte_end: u64,
        first_line: u64,
        line_count: u32,
    ) -> ChunkSpan {
        ChunkSpan {
            index,
            byte_start,
            byte_end,
            first_line,
            line_count,
        }
    }

    #[test]
    fn no_lines_no_chunks() {
        assert_eq!(plan(&[], 10, 100), vec![]);
        assert_eq!(plan(&lines_of(b"\n\n"), 10, 100), vec![]);
    }

    #[test]
    fn line_budget_closes_chunks() {
        let lines = lines_of(b"a\nb\nc\nd\ne\n");
        assert_eq!(
            plan(&lines, 2, 1000),
            vec![
                span(0, 0, 4, 1, 2),
                span(1, 4, 8, 3, 2),
                span(2, 8, 10, 5, 1)
            ]
        );
    }

    #[test]
    fn byte_budget_counts_terminators_and_is_inclusive() {
        // Lines of 4 bytes each ("aaa\n"); a budget of 8 holds exactly two.
        let lines = lines_of(b"aaa\nbbb\nccc\n");
        assert_eq!(
            plan(&lines, 100, 8),
            vec![span(0, 0, 8, 1, 2), span(1, 8, 12, 3, 1)]
        );
        // \r\n counts too: 5 bytes per line, budget 8 holds one.
        let lines = lines_of(b"aaa\r\nbbb\r\n");
        assert_eq!(
            plan(&lines, 100, 8),
            vec![span(0, 0, 5, 1, 1), span(1, 5, 10, 2, 1)]
        );
    }

    #[test]
    fn a_line_over_the_byte_budget_is_a_chunk_of_its_own() {
        let lines = lines_of(b"a\nbbbbbbbbbbbb\nc\nd");
        assert_eq!(
            plan(&lines, 100, 4),
            vec![
                span(0, 0, 2, 1, 1),
                span(1, 2, 15, 2, 1),
                span(2, 15, 18, 3, 2)
            ]
        );
    }

    #[test]
    fn zero_budgets_give_one_line_per_chunk() {
        let lines = lines_of(b"a\nb\n");
        let expected = vec![span(0, 0, 2, 1, 1), span(1, 2, 4, 2, 1)];
        assert_eq!(plan(&lines, 0, 1000), expected);
        assert_eq!(plan(&lines, 1000, 0), expected);
    }

    #[test]
    fn trailing_blank_lines_are_left_out() {
        let lines = lines_of(b"a\nb\n\n \r\n");
        assert_eq!(plan(&lines, 10, 100), vec![span(0, 0, 4, 1, 2)]);
    }

    #[test]
    fn mid_file_blank_lines_are_not_counted() {
        let lines = lines_of(b"a\n\nb\n");
        assert_eq!(plan(&lines, 10, 100), vec![span(0, 0, 5, 1, 2)]);
    }

    #[test]
    fn span_helpers() {
        let s = span(3, 100, 250, 41, 7);
        assert_eq!(s.byte_len(), 150);
        assert_eq!(s.http_range(), "bytes=100-249");
        let mut splitter = s.splitter(1000);
        splitter.feed(&b"x\n"[..]);
        let JsonlItem::Line(line) = splitter.next_item().unwrap() else {
            panic!("expected a line")
        };
        assert_eq!((line.number, line.offset, line.end), (41, 100, 102));
    }

    /// A random JSONL-ish file: lines of random length, `\n` or `\r\n` endings, maybe no final
    /// terminator, maybe trailing blank lines, and mid-file blank lines if `mid_blanks`.
    fn random_file(rng: &mut StdRng, mid_blanks: bool) -> Vec<u8> {
        let mut file = Vec::new();
        let lines = rng.random_range(0..60);
        for i in 0..lines {
            if mid_blanks && rng.random_bool(0.15) {
                file.extend(if rng.random_bool(0.5) {
                    &b"\n"[..]
                } else {
                    &b" \r\n"[..]
                });
            }
            let len = if rng.random_bool(0.05) {
                rng.random_range(50..300)
            } else {
                rng.random_range(1..40)
            };
            file.extend((0..len).map(|_| b'a' + rng.random_range(0..26)));
            let last = i + 1 == lines;
            if !last || rng.random_bool(0.7) {
                file.extend(if rng.random_bool(0.3) {
                    &b"\r\n"[..]
                } else {
                    &b"\n"[..]
                });
            }
        }
        if lines > 0 && file.ends_with(b"\n") && rng.random_bool(0.2) {
            file.extend(b"\n\r\n");
        }
        file
    }

    fn check_properties(file: &[u8], max_lines: u32, max_bytes: u64, contiguous: bool) {
        let lines = lines_of(file);
        let requests: Vec<&Line> = lines.iter().filter(|l| !l.is_blank()).collect();
        let spans = plan(&lines, max_lines, max_bytes);
        let context = format!(
            "file {:?} max_lines {max_lines} max_bytes {max_bytes}",
            String::from_utf8_lossy(file)
        );

        // Every request is in exactly one span, in order; the counts add up.
        let total: u64 = spans.iter().map(|s| u64::from(s.line_count)).sum();
        assert_eq!(total, requests.len() as u64, "{context}");

        let mut next_request = 0usize;
        for (i, s) in spans.iter().enumerate() {
            assert_eq!(s.index as usize, i, "{context}");
            assert!(s.line_count >= 1, "{context}");
            assert!(s.line_count <= max_lines.max(1), "{context}");
            assert!(s.byte_len() <= max_bytes || s.line_count == 1, "{context}");

            let first = requests[next_request];
            assert_eq!(
                (s.first_line, s.byte_start),
                (first.number, first.offset),
                "{context}"
            );
            let last = requests[next_request + s.line_count as usize - 1];
            assert_eq!(s.byte_end, last.end, "{context}");

            // Reading the span's bytes back yields exactly its requests.
            let range = Bytes::copy_from_slice(&file[s.byte_start as usize..s.byte_end as usize]);
            let read: Vec<Line> = s
                .splitter(usize::MAX)
                .split_all(range)
                .map(|item| match item {
                    JsonlItem::Line(line) => line,
                    JsonlItem::Oversized(_) => unreachable!("no limit"),
                })
                .filter(|l| !l.is_blank())
                .collect();
            let expected: Vec<Line> = requests[next_request..next_request + s.line_count as usize]
                .iter()
                .map(|l| (*l).clone())
                .collect();
            assert_eq!(read, expected, "{context}");

            // Greedy: a chunk closed only because the next request would not fit.
            if let Some(next) = spans.get(i + 1) {
                let next_first = requests[next_request + s.line_count as usize];
                assert_eq!(next.first_line, next_first.number, "{context}");
                let would_be = next_first.end - s.byte_start;
                assert!(
                    s.line_count == max_lines.max(1) || would_be > max_bytes,
                    "{context}"
                );
                if contiguous {
                    assert_eq!(next.byte_start, s.byte_end, "{context}");
                    assert_eq!(
                        next.first_line,
                        s.first_line + u64::from(s.line_count),
                        "{context}"
                    );
                }
            }
            next_request += s.line_count as usize;
        }

        if contiguous {
            // The spans tile the file from its start to the end of its last request.
            if let (Some(first), Some(last)) = (spans.first(), spans.last()) {
                assert_eq!(first.byte_start, 0, "{context}");
                assert_eq!(last.byte_end, requests.last().unwrap().end, "{context}");
            }
        }
    }

    #[test]
    fn random_files_are_covered_exactly_within_budgets() {
        let mut rng = StdRng::seed_from_u64(0x0063_6875_6e6b);
        for _ in 0..400 {
            let file = random_file(&mut rng, false);
            let max_lines = rng.random_range(0..12);
            let max_bytes = rng.random_range(0..200);
            check_properties(&file, max_lines, max_bytes, true);
        }
    }

    #[test]
    fn random_files_with_mid_file_blanks_still_cover_every_request() {
        let mut rng = StdRng::seed_from_u64(0x626c_616e_6b73);
        for _ in 0..400 {
            let file = random_file(&mut rng, true);
            let max_lines = rng.random_range(1..12);
            let max_bytes = rng.random_range(1..200);
            check_properties(&file, max_lines, max_bytes, false);
        }
    }
}
