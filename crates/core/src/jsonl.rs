//! Streaming JSONL line splitting with exact byte offsets.
//!
//! A batch input file is read once from object storage as a stream of byte chunks whose
//! boundaries fall anywhere, including inside a line or between a `\r` and its `\n`.
//! [`JsonlSplitter`] turns those chunks into [`JsonlItem`]s: complete lines carrying their
//! 1-based number and their byte range in the file, or, for a line longer than the configured
//! limit, only its number and range ([`OversizedLine`]) — its bytes are skipped, never buffered.
//! Memory is therefore bounded by the chunks in hand plus one line of at most
//! `max_line_bytes + 1` bytes.
//!
//! The same splitter serves two readers:
//! - validation and chunking, reading the whole file from offset 0 and line 1;
//! - executors, reading one chunk's byte range, with [`JsonlSplitter::starting_at`] so the line
//!   numbers and offsets they see are those of the whole file.
//!
//! Line rules: lines end in `\n`; a `\r` just before the `\n` (or just before end of input) is
//! dropped from the content, so `\r\n` files read like `\n` files. A `\n` at end of input ends
//! the last line and does not open an empty one. An empty line anywhere else is a line like any
//! other (its content is empty); deciding that it is an error is validation's business.

use std::collections::VecDeque;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

/// One complete line of a JSONL file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number in the file.
    pub number: u64,
    /// Byte offset in the file of the line's first byte.
    pub offset: u64,
    /// Byte offset just past the line's terminator (`\n`), or the end of input for a last line
    /// without one. `end - offset` is the line's full size on disk.
    pub end: u64,
    /// The line's content, without the `\n` and without a `\r` right before it. Zero-copy when
    /// the line lies inside one input chunk.
    pub bytes: Bytes,
}

impl Line {
    /// True when the content is empty or only JSON whitespace (space, tab, carriage return).
    ///
    /// Such a line holds no request: validation rejects it in the middle of a file and ignores
    /// it at the end, and chunking never makes it part of a chunk's line count.
    pub fn is_blank(&self) -> bool {
        is_blank(&self.bytes)
    }
}

/// A line longer than the splitter's `max_line_bytes`: only where it is, not what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OversizedLine {
    /// 1-based line number in the file.
    pub number: u64,
    /// Byte offset in the file of the line's first byte.
    pub offset: u64,
    /// Byte offset just past the line's terminator, or the end of input.
    pub end: u64,
}

/// What the splitter yields, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JsonlItem {
    /// A line within the size limit.
    Line(Line),
    /// A line over the size limit; its bytes were skipped.
    Oversized(OversizedLine),
}

impl JsonlItem {
    /// The item's 1-based line number.
    pub fn number(&self) -> u64 {
        match self {
            Self::Line(line) => line.number,
            Self::Oversized(line) => line.number,
        }
    }

    /// Byte offset of the item's first byte.
    pub fn offset(&self) -> u64 {
        match self {
            Self::Line(line) => line.offset,
            Self::Oversized(line) => line.offset,
        }
    }

    /// Byte offset just past the item's terminator (or end of input).
    pub fn end(&self) -> u64 {
        match self {
            Self::Line(line) => line.end,
            Self::Oversized(line) => line.end,
        }
    }
}

/// True when `bytes` is empty or only JSON whitespace other than `\n` (space, tab, `\r`).
pub fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r'))
}

/// Incremental JSONL splitter: [`feed`](Self::feed) chunks, pull items with
/// [`next_item`](Self::next_item), call [`finish`](Self::finish) at end of input and pull the
/// rest.
///
/// Items come out in file order with consecutive line numbers. A line is yielded as soon as
/// its `\n` has been fed; the last line, if it has no `\n`, only after `finish`.
///
/// ```
/// use nightshift_core::jsonl::{JsonlItem, JsonlSplitter};
///
/// let mut splitter = JsonlSplitter::new(1024);
/// splitter.feed(&b"{\"a\":1}\r\n{\"b\""[..]);
/// splitter.feed(&b":2}"[..]);
/// splitter.finish();
/// let lines: Vec<_> = splitter.drain().collect();
/// assert_eq!(lines.len(), 2);
/// let JsonlItem::Line(second) = &lines[1] else { panic!() };
/// assert_eq!((second.number, second.offset, second.end), (2, 9, 16));
/// assert_eq!(&second.bytes[..], b"{\"b\":2}");
/// ```
#[derive(Debug)]
pub struct JsonlSplitter {
    /// Content limit of a line (terminators excluded); longer lines become `Oversized`.
    max_line_bytes: usize,
    /// Fed chunks not yet scanned; the front one may be partly scanned (already split off).
    queue: VecDeque<Bytes>,
    /// Bytes of the current line that came from earlier, fully scanned chunks. Never longer
    /// than `max_line_bytes + 1` (the `+ 1` leaves room for a `\r` before the `\n`).
    partial: BytesMut,
    /// The current line has been found too long: its remaining bytes are skipped.
    skipping: bool,
    /// Number of the current (not yet yielded) line.
    line_number: u64,
    /// File offset of the current line's first byte.
    line_start: u64,
    /// File offset of the first byte of `queue`'s front: every byte before it is scanned.
    position: u64,
    /// `finish` was called: no more input, the unterminated tail is a line.
    finished: bool,
}

impl JsonlSplitter {
    /// A splitter for a whole file: first line is number 1 at offset 0.
    ///
    /// `max_line_bytes` bounds a line's content (without terminators); a longer line is
    /// yielded as [`JsonlItem::Oversized`].
    pub fn new(max_line_bytes: usize) -> Self {
        Self {
            max_line_bytes,
            queue: VecDeque::new(),
            partial: BytesMut::new(),
            skipping: false,
            line_number: 1,
            line_start: 0,
            position: 0,
            finished: false,
        }
    }

    /// Sets where the input starts in the file: the first byte fed is at `base_offset` and
    /// begins line `first_line_number`. For an executor reading one chunk's byte range, pass
    /// the chunk's `first_line` and `byte_start`. Call before feeding anything.
    pub fn starting_at(mut self, first_line_number: u64, base_offset: u64) -> Self {
        debug_assert!(
            self.position == self.line_start && self.queue.is_empty(),
            "starting_at must be called before any input is fed"
        );
        self.line_number = first_line_number;
        self.line_start = base_offset;
        self.position = base_offset;
        self
    }

    /// The line size limit this splitter enforces.
    pub fn max_line_bytes(&self) -> usize {
        self.max_line_bytes
    }

    /// Number the next yielded item will carry.
    pub fn next_line_number(&self) -> u64 {
        self.line_number
    }

    /// File offset just past every byte fed so far (base offset + bytes fed). After `finish`
    /// and a full drain this is the end of the input: for a whole file, its size.
    pub fn fed_end(&self) -> u64 {
        self.position + self.queue.iter().map(|c| c.len() as u64).sum::<u64>()
    }

    /// Appends a chunk of input. Cheap: the chunk is queued, scanned by `next_item`.
    ///
    /// # Panics
    /// If called after [`finish`](Self::finish): input after its end is a caller bug.
    pub fn feed(&mut self, chunk: impl Into<Bytes>) {
        assert!(!self.finished, "JsonlSplitter::feed called after finish");
        let chunk = chunk.into();
        if !chunk.is_empty() {
            self.queue.push_back(chunk);
        }
    }

    /// Marks the end of input. Items still pending, and a last line without `\n`, are then
    /// yielded by [`next_item`](Self::next_item). Idempotent.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// The next complete item, or `None` when more input (or `finish`) is needed — or, after
    /// `finish`, when everything has been yielded.
    pub fn next_item(&mut self) -> Option<JsonlItem> {
        while let Some(front) = self.queue.front_mut() {
            match front.iter().position(|&b| b == b'\n') {
                Some(newline) => {
                    let mut head = front.split_to(newline + 1);
                    if front.is_empty() {
                        self.queue.pop_front();
                    }
                    self.position += head.len() as u64;
                    head.truncate(newline);
                    return Some(self.complete_line(head));
                }
                None => {
                    let Some(chunk) = self.queue.pop_front() else {
                        break;
                    };
                    self.position += chunk.len() as u64;
                    self.absorb(&chunk);
                }
            }
        }
        if self.finished && self.position > self.line_start {
            return Some(self.complete_line(Bytes::new()));
        }
        None
    }

    /// Iterates over the items available now (see [`next_item`](Self::next_item)).
    pub fn drain(&mut self) -> impl Iterator<Item = JsonlItem> + '_ {
        std::iter::from_fn(move || self.next_item())
    }

    /// Splits one complete input held in memory (e.g. a chunk's byte range): feeds it,
    /// finishes, and yields every item.
    pub fn split_all(mut self, input: impl Into<Bytes>) -> impl Iterator<Item = JsonlItem> {
        self.feed(input);
        self.finish();
        std::iter::from_fn(move || self.next_item())
    }

    /// Drives the splitter over a byte stream (e.g. an S3 `GetObject` body), yielding items
    /// as they complete, then the last unterminated line when the stream ends.
    ///
    /// A stream error is passed through and ends the output: the pending partial line is
    /// dropped, never reported as a (truncated) line.
    pub fn split_stream<S, E>(self, input: S) -> impl Stream<Item = Result<JsonlItem, E>>
    where
        S: Stream<Item = Result<Bytes, E>>,
    {
        struct State<S> {
            splitter: JsonlSplitter,
            input: Pin<Box<S>>,
            /// The input ended or failed: stop pulling it.
            input_done: bool,
            /// The input failed: yield nothing more.
            failed: bool,
        }

        let state = State {
            splitter: self,
            input: Box::pin(input),
            input_done: false,
            failed: false,
        };
        futures::stream::unfold(state, |mut state| async move {
            if state.failed {
                return None;
            }
            loop {
                if let Some(item) = state.splitter.next_item() {
                    return Some((Ok(item), state));
                }
                if state.input_done {
                    return None;
                }
                match state.input.next().await {
                    Some(Ok(chunk)) => state.splitter.feed(chunk),
                    Some(Err(error)) => {
                        state.input_done = true;
                        state.failed = true;
                        return Some((Err(error), state));
                    }
                    None => {
                        state.input_done = true;
                        state.splitter.finish();
                    }
                }
            }
        })
    }

    /// Adds a chunk that holds no `\n` to the current line, switching to skipping mode once
    /// the line cannot fit.
    fn absorb(&mut self, chunk: &[u8]) {
        if self.skipping {
            return;
        }
        if self.partial.len() + chunk.len() > self.max_line_bytes.saturating_add(1) {
            self.skipping = true;
            self.partial = BytesMut::new();
        } else {
            self.partial.extend_from_slice(chunk);
        }
    }

    /// Ends the current line with `tail` (its last bytes, terminator removed) at the current
    /// position, and starts the next line there.
    fn complete_line(&mut self, tail: Bytes) -> JsonlItem {
        let number = self.line_number;
        let offset = self.line_start;
        let end = self.position;
        self.line_number += 1;
        self.line_start = end;

        if self.skipping {
            self.skipping = false;
            return JsonlItem::Oversized(OversizedLine {
                number,
                offset,
                end,
            });
        }

        let total = self.partial.len() + tail.len();
        let ends_in_cr = tail
            .last()
            .or_else(|| self.partial.last())
            .is_some_and(|&b| b == b'\r');
        let content_len = total - usize::from(ends_in_cr);
        if content_len > self.max_line_bytes {
            self.partial.clear();
            return JsonlItem::Oversized(OversizedLine {
                number,
                offset,
                end,
            });
        }

        let mut bytes = if self.partial.is_empty() {
            tail
        } else {
            self.partial.extend_from_slice(&tail);
            self.partial.split().freeze()
        };
        bytes.truncate(content_len);
        JsonlItem::Line(Line {
            number,
            offset,
            end,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Feeds `input` in pieces of the given sizes (cycled), then finishes.
    fn split_in_pieces(input: &[u8], sizes: &[usize], max: usize) -> Vec<JsonlItem> {
        let mut splitter = JsonlSplitter::new(max);
        let mut items = Vec::new();
        let mut rest = input;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            splitter.feed(Bytes::copy_from_slice(&rest[..n]));
            items.extend(splitter.drain());
            rest = &rest[n..];
            i += 1;
        }
        splitter.finish();
        items.extend(splitter.drain());
        items
    }

    fn line(number: u64, offset: u64, end: u64, bytes: &[u8]) -> JsonlItem {
        JsonlItem::Line(Line {
            number,
            offset,
            end,
            bytes: Bytes::copy_from_slice(bytes),
        })
    }

    fn oversized(number: u64, offset: u64, end: u64) -> JsonlItem {
        JsonlItem::Oversized(OversizedLine {
            number,
            offset,
            end,
        })
    }

    #[test]
    fn empty_input_yields_nothing() {
        assert_eq!(split_in_pieces(b"", &[1], 100), vec![]);
        let mut s = JsonlSplitter::new(10);
        s.finish();
        assert_eq!(s.next_item(), None);
    }

    #[test]
    fn trailing_newline_does_not_add_an_empty_line() {
        let expected = vec![line(1, 0, 2, b"a"), line(2, 2, 4, b"b")];
        assert_eq!(split_in_pieces(b"a\nb\n", &[100], 100), expected);
        assert_eq!(
            split_in_pieces(b"a\nb", &[100], 100),
            vec![line(1, 0, 2, b"a"), line(2, 2, 3, b"b")]
        );
    }

    #[test]
    fn lone_newline_is_one_empty_line() {
        assert_eq!(split_in_pieces(b"\n", &[1], 10), vec![line(1, 0, 1, b"")]);
    }

    #[test]
    fn blank_lines_in_the_middle_are_reported() {
        assert_eq!(
            split_in_pieces(b"a\n\n \r\nb\n\n", &[100], 100),
            vec![
                line(1, 0, 2, b"a"),
                line(2, 2, 3, b""),
                line(3, 3, 6, b" "),
                line(4, 6, 8, b"b"),
                line(5, 8, 9, b""),
            ]
        );
    }

    #[test]
    fn crlf_is_stripped_even_when_split_across_chunks() {
        let input = b"ab\r\ncd\r\nef\r";
        let expected = vec![
            line(1, 0, 4, b"ab"),
            line(2, 4, 8, b"cd"),
            line(3, 8, 11, b"ef"),
        ];
        for size in 1..=input.len() {
            assert_eq!(
                split_in_pieces(input, &[size], 100),
                expected,
                "size {size}"
            );
        }
    }

    #[test]
    fn only_one_trailing_cr_is_stripped_and_inner_cr_kept() {
        assert_eq!(
            split_in_pieces(b"a\rb\r\r\n", &[2], 100),
            vec![line(1, 0, 6, b"a\rb\r")]
        );
    }

    #[test]
    fn line_exactly_at_limit_is_kept_and_crlf_does_not_count() {
        assert_eq!(
            split_in_pieces(b"abcd\r\nabcde\n", &[1], 4),
            vec![line(1, 0, 6, b"abcd"), oversized(2, 6, 12)]
        );
        // Same with the whole input in one chunk (the zero-copy path).
        assert_eq!(
            split_in_pieces(b"abcd\r\nabcde\n", &[100], 4),
            vec![line(1, 0, 6, b"abcd"), oversized(2, 6, 12)]
        );
    }

    #[test]
    fn oversized_line_is_skipped_without_buffering() {
        let mut input = b"ok\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 10_000));
        input.extend(b"\nfine\nyyyyyyyyyyyy");
        let items = split_in_pieces(&input, &[7, 3, 100], 8);
        assert_eq!(
            items,
            vec![
                line(1, 0, 3, b"ok"),
                oversized(2, 3, 10_004),
                line(3, 10_004, 10_009, b"fine"),
                oversized(4, 10_009, 10_021),
            ]
        );

        // While skipping, the buffer never holds more than max_line_bytes + 1 bytes.
        let mut splitter = JsonlSplitter::new(8);
        for _ in 0..1000 {
            splitter.feed(&b"xxxxxxx"[..]);
            assert_eq!(splitter.next_item(), None);
            assert!(splitter.partial.len() <= 9);
        }
        splitter.feed(&b"\n"[..]);
        assert_eq!(splitter.next_item(), Some(oversized(1, 0, 7001)));
    }

    #[test]
    fn zero_limit_accepts_only_empty_lines() {
        assert_eq!(
            split_in_pieces(b"\na\n\r\n", &[1], 0),
            vec![line(1, 0, 1, b""), oversized(2, 1, 3), line(3, 3, 5, b"")]
        );
    }

    #[test]
    fn starting_at_offsets_numbers_and_offsets() {
        let splitter = JsonlSplitter::new(100).starting_at(41, 1000);
        let items: Vec<_> = splitter.split_all(&b"x\nyy\n"[..]).collect();
        assert_eq!(
            items,
            vec![line(41, 1000, 1002, b"x"), line(42, 1002, 1005, b"yy")]
        );
    }

    #[test]
    fn fed_end_tracks_the_input_end() {
        let mut s = JsonlSplitter::new(100).starting_at(1, 10);
        s.feed(&b"ab\ncd"[..]);
        assert_eq!(s.fed_end(), 15);
        let _ = s.drain().count();
        s.finish();
        let _ = s.drain().count();
        assert_eq!(s.fed_end(), 15);
        assert_eq!(s.next_line_number(), 3);
    }

    #[test]
    fn lines_inside_one_chunk_are_zero_copy() {
        let input = Bytes::from_static(b"hello\nworld\n");
        let items: Vec<_> = JsonlSplitter::new(100).split_all(input.clone()).collect();
        let JsonlItem::Line(first) = &items[0] else {
            panic!("expected a line")
        };
        assert_eq!(first.bytes.as_ptr(), input.as_ptr());
    }

    #[test]
    #[should_panic(expected = "after finish")]
    fn feeding_after_finish_panics() {
        let mut s = JsonlSplitter::new(10);
        s.finish();
        s.feed(&b"x"[..]);
    }

    /// Reference splitter: the obvious whole-buffer implementation.
    fn reference(input: &[u8], max: usize) -> Vec<JsonlItem> {
        let mut items = Vec::new();
        let mut offset = 0usize;
        let mut number = 1u64;
        while offset < input.len() {
            let (content_end, end) = match input[offset..].iter().position(|&b| b == b'\n') {
                Some(i) => (offset + i, offset + i + 1),
                None => (input.len(), input.len()),
            };
            let mut content = &input[offset..content_end];
            if content.last() == Some(&b'\r') {
                content = &content[..content.len() - 1];
            }
            items.push(if content.len() > max {
                oversized(number, offset as u64, end as u64)
            } else {
                line(number, offset as u64, end as u64, content)
            });
            number += 1;
            offset = end;
        }
        items
    }

    #[test]
    fn random_inputs_match_the_reference_for_any_chunking() {
        let mut rng = StdRng::seed_from_u64(0x6e69_6768_7473);
        for _ in 0..500 {
            let len = rng.random_range(0..200);
            let input: Vec<u8> = (0..len)
                .map(|_| match rng.random_range(0..10) {
                    0 | 1 => b'\n',
                    2 => b'\r',
                    _ => b'a' + rng.random_range(0..3),
                })
                .collect();
            let max = rng.random_range(0..20);
            let sizes: Vec<usize> = (0..5).map(|_| rng.random_range(1..30)).collect();
            assert_eq!(
                split_in_pieces(&input, &sizes, max),
                reference(&input, max),
                "input {:?} max {max} sizes {sizes:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[tokio::test]
    async fn split_stream_yields_every_line_then_ends() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"{\"a\":")),
            Ok(Bytes::from_static(b"1}\n{\"b\":2}\r")),
            Ok(Bytes::from_static(b"\nlast")),
        ];
        let items: Vec<_> = JsonlSplitter::new(100)
            .split_stream(futures::stream::iter(chunks))
            .collect()
            .await;
        let items: Vec<_> = items.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            items,
            vec![
                line(1, 0, 8, b"{\"a\":1}"),
                line(2, 8, 17, b"{\"b\":2}"),
                line(3, 17, 21, b"last"),
            ]
        );
    }

    #[tokio::test]
    async fn split_stream_stops_at_an_error_without_a_truncated_line() {
        let chunks: Vec<Result<Bytes, &str>> = vec![
            Ok(Bytes::from_static(b"one\ntwo-partial")),
            Err("connection reset"),
            Ok(Bytes::from_static(b"never read\n")),
        ];
        let items: Vec<_> = JsonlSplitter::new(100)
            .split_stream(futures::stream::iter(chunks))
            .collect()
            .await;
        assert_eq!(
            items,
            vec![Ok(line(1, 0, 4, b"one")), Err("connection reset")]
        );
    }

    #[test]
    fn is_blank_accepts_only_json_whitespace() {
        assert!(is_blank(b""));
        assert!(is_blank(b" \t\r"));
        assert!(!is_blank(b" x "));
        assert!(!is_blank("\u{a0}".as_bytes()));
    }
}
