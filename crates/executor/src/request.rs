//! Reading one input line of a batch: its `custom_id`, and its `body` as the raw JSON bytes
//! the user wrote.
//!
//! The body is forwarded to the upstream verbatim — same bytes, same key order, same
//! whitespace, same number spelling — so nothing the user wrote is lost in translation (a
//! float like `0.10000000000000001`, a huge integer, a key order a server cares about). The
//! workspace's `serde_json` has no `raw_value` feature, so the body's byte span is found by
//! a small scanner over the top-level object, after `serde_json` has checked that the whole
//! line is valid JSON: the scanner then only has to find where values end, never to judge
//! them.

use bytes::Bytes;
use serde::de::IgnoredAny;

/// One request of a chunk, ready to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// 1-based line number in the batch's input file.
    pub line: u64,
    /// The line's `custom_id`, unescaped.
    pub custom_id: String,
    /// The line's `body`: the exact bytes of its JSON object, a zero-copy slice of the line.
    pub body: Bytes,
}

/// Why an input line is not a request. Validation refuses all of these before a batch runs,
/// so meeting one in a chunk means the chunk's byte range is wrong (or the input changed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("not valid JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("no string \"custom_id\"")]
    CustomId,
    #[error("no object \"body\"")]
    Body,
}

/// Parses one line (its content, without the terminator) into a [`Request`].
///
/// The line must be a JSON object with a string `custom_id` and an object `body`; other keys
/// are ignored. When a key repeats (which validation refuses) the last one wins, as with
/// `serde_json::Value`.
///
/// # Errors
/// [`InvalidRequest`] saying what is missing.
pub fn parse_line(line: u64, bytes: &Bytes) -> Result<Request, InvalidRequest> {
    serde_json::from_slice::<IgnoredAny>(bytes)
        .map_err(|error| InvalidRequest::NotJson(error.to_string()))?;
    let mut scanner = Scanner { bytes, pos: 0 };
    scanner.skip_ws();
    if !scanner.eat(b'{') {
        return Err(InvalidRequest::NotAnObject);
    }
    let mut custom_id = None;
    let mut body = None;
    scanner.skip_ws();
    if !scanner.eat(b'}') {
        loop {
            scanner.skip_ws();
            let key = scanner.value_span();
            scanner.skip_ws();
            scanner.eat(b':');
            scanner.skip_ws();
            let value = scanner.value_span();
            let key = &bytes[key.0..key.1];
            if key_is(key, "custom_id") {
                custom_id = Some(value);
            } else if key_is(key, "body") {
                body = Some(value);
            }
            scanner.skip_ws();
            if !scanner.eat(b',') {
                break;
            }
        }
    }
    let custom_id = custom_id
        .and_then(|(start, end)| serde_json::from_slice::<String>(&bytes[start..end]).ok())
        .ok_or(InvalidRequest::CustomId)?;
    let body = body
        .filter(|&(start, _)| bytes.get(start) == Some(&b'{'))
        .map(|(start, end)| bytes.slice(start..end))
        .ok_or(InvalidRequest::Body)?;
    Ok(Request {
        line,
        custom_id,
        body,
    })
}

/// Whether the JSON string literal `literal` (quotes included) spells `name`. Keys are
/// almost always written plainly; an escaped one (`"bo\u0064y"`) is decoded to compare.
fn key_is(literal: &[u8], name: &str) -> bool {
    if !literal.contains(&b'\\') {
        return literal.len() == name.len() + 2
            && &literal[1..literal.len() - 1] == name.as_bytes();
    }
    serde_json::from_slice::<String>(literal).is_ok_and(|key| key == name)
}

/// Finds value boundaries in JSON that is known to be valid.
struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// Skips the value starting here; returns its span `[start, end)`.
    fn value_span(&mut self) -> (usize, usize) {
        let start = self.pos;
        match self.peek() {
            Some(b'"') => self.skip_string(),
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                while let Some(byte) = self.peek() {
                    match byte {
                        b'"' => {
                            self.skip_string();
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.pos += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    self.pos += 1;
                }
            }
            // A number, `true`, `false` or `null`: runs until a delimiter.
            _ => {
                while let Some(byte) = self.peek() {
                    if matches!(byte, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.pos += 1;
                }
            }
        }
        (start, self.pos)
    }

    /// Skips a string literal starting at its opening quote, past its closing quote.
    fn skip_string(&mut self) {
        self.pos += 1;
        while let Some(byte) = self.peek() {
            self.pos += 1;
            match byte {
                b'\\' => self.pos += 1,
                b'"' => return,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Request, InvalidRequest> {
        parse_line(7, &Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn the_body_is_kept_byte_for_byte() {
        let body = r#"{ "model" : "m",  "messages":[{"role":"user","content":"a \"}{][ b"}], "temperature": 0.10000000000000001, "n": 123456789012345678901234567890 }"#;
        let line = format!(
            r#"{{"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {body}, "extra": [1, {{"x": "}}"}}]}}"#
        );
        let request = parse(&line).unwrap();
        assert_eq!(request.line, 7);
        assert_eq!(request.custom_id, "req-1");
        assert_eq!(&request.body[..], body.as_bytes());
    }

    #[test]
    fn keys_in_any_order_escaped_or_repeated() {
        let request =
            parse(r#"  {"body":{"a":{}} ,"url":"/v1/x","custom_\u0069d":"\u00e9\n\"q\"" }  "#)
                .unwrap();
        assert_eq!(request.custom_id, "é\n\"q\"");
        assert_eq!(&request.body[..], br#"{"a":{}}"#);
        let request = parse(r#"{"custom_id":"a","body":{"n":1},"bo\u0064y":{"n":2}}"#).unwrap();
        assert_eq!(&request.body[..], br#"{"n":2}"#);
        let request = parse(r#"{"custom_id":"a","body":{"s":"\\"},"z":null}"#).unwrap();
        assert_eq!(&request.body[..], br#"{"s":"\\"}"#);
    }

    #[test]
    fn lines_that_are_not_requests_are_refused() {
        assert!(matches!(
            parse(r#"{"custom_id": "a""#),
            Err(InvalidRequest::NotJson(_))
        ));
        assert!(matches!(parse(""), Err(InvalidRequest::NotJson(_))));
        assert_eq!(parse("[1]"), Err(InvalidRequest::NotAnObject));
        assert_eq!(parse("{}"), Err(InvalidRequest::CustomId));
        assert_eq!(
            parse(r#"{"custom_id": 3, "body": {}}"#),
            Err(InvalidRequest::CustomId)
        );
        assert_eq!(parse(r#"{"custom_id": "a"}"#), Err(InvalidRequest::Body));
        assert_eq!(
            parse(r#"{"custom_id": "a", "body": "{}"}"#),
            Err(InvalidRequest::Body)
        );
        assert_eq!(
            parse(r#"{"custom_id": "a", "body": null}"#),
            Err(InvalidRequest::Body)
        );
    }
}
