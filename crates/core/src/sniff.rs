//! Checks an upload while it streams past, without holding it: that a `purpose=batch` file is
//! UTF-8 throughout and starts like JSONL (its first line is a JSON object).
//!
//! Line *structure* is not checked here: that is the batch's asynchronous validation, which
//! reports every bad line with its number. The upload only refuses what is certainly not a
//! JSONL file, so the client hears about it at once.

use serde::de::IgnoredAny;

/// How much of the first line is kept to parse it. A longer first line is only checked to
/// start with `{`; the batch validation judges it fully later.
pub const FIRST_LINE_LIMIT: usize = 1 << 20;

/// Why an upload is not acceptable as a batch input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniffError {
    #[error("The file is empty.")]
    Empty,
    #[error("The file is not valid UTF-8 (invalid byte sequence at byte offset {offset}).")]
    NotUtf8 { offset: u64 },
    #[error("The file is not valid JSONL: {reason}.")]
    NotJsonl { reason: &'static str },
}

/// Streaming checker. Feed every chunk to [`Sniffer::push`], then call [`Sniffer::finish`].
#[derive(Debug, Default)]
pub struct Sniffer {
    /// Bytes seen so far.
    seen: u64,
    /// An incomplete UTF-8 sequence carried over from the end of the previous chunk (≤ 3 bytes).
    carry: Vec<u8>,
    /// The first line's bytes while it is still being read (up to [`FIRST_LINE_LIMIT`]).
    first_line: Vec<u8>,
    /// Whether the first line has been judged.
    first_line_done: bool,
}

impl Sniffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Total bytes pushed.
    pub fn bytes_seen(&self) -> u64 {
        self.seen
    }

    /// Checks the next chunk. Errors are final: stop feeding after one.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), SniffError> {
        self.check_utf8(chunk)?;
        if !self.first_line_done {
            let room = FIRST_LINE_LIMIT - self.first_line.len();
            match chunk.iter().position(|&b| b == b'\n') {
                Some(nl) if nl <= room => {
                    self.first_line.extend_from_slice(&chunk[..nl]);
                    self.judge_first_line(true)?;
                }
                _ if chunk.len() >= room => {
                    self.first_line.extend_from_slice(&chunk[..room]);
                    self.judge_first_line(false)?;
                }
                _ => self.first_line.extend_from_slice(chunk),
            }
        }
        self.seen += chunk.len() as u64;
        Ok(())
    }

    /// Final checks once the stream has ended.
    pub fn finish(mut self) -> Result<(), SniffError> {
        if self.seen == 0 {
            return Err(SniffError::Empty);
        }
        if !self.carry.is_empty() {
            return Err(SniffError::NotUtf8 {
                offset: self.seen - self.carry.len() as u64,
            });
        }
        if !self.first_line_done {
            self.judge_first_line(true)?;
        }
        Ok(())
    }

    fn check_utf8(&mut self, chunk: &[u8]) -> Result<(), SniffError> {
        // Complete a sequence split across chunks, byte by byte (at most 3 more bytes).
        let mut rest = chunk;
        while !self.carry.is_empty() {
            let Some((&b, tail)) = rest.split_first() else {
                return Ok(());
            };
            self.carry.push(b);
            rest = tail;
            match std::str::from_utf8(&self.carry) {
                Ok(_) => self.carry.clear(),
                Err(e) if e.error_len().is_none() && self.carry.len() < 4 => {}
                Err(_) => {
                    return Err(SniffError::NotUtf8 {
                        offset: self.seen - (self.carry.len() as u64 - 1),
                    });
                }
            }
        }
        let consumed = (chunk.len() - rest.len()) as u64;
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(()),
            Err(e) => match e.error_len() {
                // Incomplete sequence at the very end: wait for the next chunk.
                None => {
                    self.carry.extend_from_slice(&rest[e.valid_up_to()..]);
                    Ok(())
                }
                Some(_) => Err(SniffError::NotUtf8 {
                    offset: self.seen + consumed + e.valid_up_to() as u64,
                }),
            },
        }
    }

    /// `complete`: whether `first_line` holds the whole line (else it was cut at the limit).
    fn judge_first_line(&mut self, complete: bool) -> Result<(), SniffError> {
        self.first_line_done = true;
        let mut line: &[u8] = &self.first_line;
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        let start = line.iter().position(|b| !b.is_ascii_whitespace());
        let Some(start) = start else {
            return Err(SniffError::NotJsonl {
                reason: "the first line is empty",
            });
        };
        if line[start] != b'{' {
            return Err(SniffError::NotJsonl {
                reason: "the first line is not a JSON object",
            });
        }
        if complete && serde_json::from_slice::<IgnoredAny>(line).is_err() {
            return Err(SniffError::NotJsonl {
                reason: "the first line is not valid JSON",
            });
        }
        self.first_line = Vec::new();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sniff_chunks(chunks: &[&[u8]]) -> Result<(), SniffError> {
        let mut s = Sniffer::new();
        for c in chunks {
            s.push(c)?;
        }
        s.finish()
    }

    fn sniff_every_split(data: &[u8]) -> Result<(), SniffError> {
        let whole = sniff_chunks(&[data]);
        for cut in 0..=data.len() {
            let (a, b) = data.split_at(cut);
            assert_eq!(sniff_chunks(&[a, b]), whole, "split at {cut}");
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(sniff_chunks(&bytes), whole, "byte by byte");
        whole
    }

    #[test]
    fn accepts_jsonl() {
        assert_eq!(sniff_every_split(b"{\"a\":1}\n{\"b\":2}\n"), Ok(()));
        assert_eq!(sniff_every_split(b"{\"a\":1}"), Ok(()));
        assert_eq!(sniff_every_split(b"{\"a\":1}\r\n{\"b\":2}\r\n"), Ok(()));
        assert_eq!(sniff_every_split("{\"é\":\"😀\"}\n".as_bytes()), Ok(()));
        // later lines are the batch validation's business
        assert_eq!(sniff_every_split(b"{\"a\":1}\nnot json\n"), Ok(()));
    }

    #[test]
    fn rejects_non_jsonl() {
        assert_eq!(sniff_every_split(b""), Err(SniffError::Empty));
        assert!(matches!(
            sniff_every_split(b"hello world\n"),
            Err(SniffError::NotJsonl { .. })
        ));
        assert!(matches!(
            sniff_every_split(b"[1,2]\n"),
            Err(SniffError::NotJsonl { .. })
        ));
        assert!(matches!(
            sniff_every_split(b"{\"a\":\n"),
            Err(SniffError::NotJsonl { .. })
        ));
        assert!(matches!(
            sniff_every_split(b"\n{\"a\":1}\n"),
            Err(SniffError::NotJsonl { .. })
        ));
    }

    #[test]
    fn rejects_invalid_utf8_with_offset() {
        assert_eq!(
            sniff_every_split(b"{\"a\":\"\xff\"}\n"),
            Err(SniffError::NotUtf8 { offset: 6 })
        );
        // a truncated multi-byte sequence at EOF
        assert_eq!(
            sniff_every_split(b"{\"a\":1}\n\xe2\x82"),
            Err(SniffError::NotUtf8 { offset: 8 })
        );
        // an overlong/invalid continuation split across chunks
        assert_eq!(
            sniff_every_split(b"{\"a\":1}\n\xe2\x28\xa1"),
            Err(SniffError::NotUtf8 { offset: 8 })
        );
    }

    #[test]
    fn long_first_line_is_only_checked_to_start_like_an_object() {
        let mut data = b"{\"pad\":\"".to_vec();
        data.extend(std::iter::repeat_n(b'x', FIRST_LINE_LIMIT + 10));
        data.extend_from_slice(b"\"}\n");
        assert_eq!(sniff_chunks(&[&data]), Ok(()));
        let mut s = Sniffer::new();
        for c in data.chunks(4096) {
            s.push(c).unwrap();
        }
        assert_eq!(s.bytes_seen(), data.len() as u64);
        assert_eq!(s.finish(), Ok(()));
    }
}
