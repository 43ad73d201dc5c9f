//! Reading one input line of a batch: its `custom_id`, and its `body` as the raw JSON bytes
//! the user wrote.
//!
//! The body is forwarded to the upstream verbatim — same bytes, same key order, same
//! whitespace, same number spelling — so nothing the user wrote is lost in translation (a
//! float like `0.10000000000000001`, a huge integer, a key order a server cares about).
//! `serde_json` reads the line's top-level object with each value left as a [`RawValue`]:
//! the whole line is checked as JSON, and the body is a slice of the line, never re-encoded.

use std::collections::HashMap;

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

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
    // Keys are unescaped (`"bo\u0064y"` is `body`); values stay the bytes they were.
    let fields: HashMap<String, &RawValue> =
        serde_json::from_slice(bytes).map_err(|error| not_an_object(bytes, error))?;
    let custom_id = fields
        .get("custom_id")
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        .ok_or(InvalidRequest::CustomId)?;
    let body = fields
        .get("body")
        .map(|raw| raw.get())
        .filter(|raw| raw.starts_with('{'))
        .map(|raw| bytes.slice_ref(raw.as_bytes()))
        .ok_or(InvalidRequest::Body)?;
    Ok(Request {
        line,
        custom_id,
        body,
    })
}

/// Why a line did not read as an object: a syntax error, or valid JSON of another kind. A
/// type error is reported the moment the first byte is not `{`, before the rest is read, so
/// the rest is checked to tell the two apart.
fn not_an_object(bytes: &[u8], error: serde_json::Error) -> InvalidRequest {
    if !error.is_data() {
        return InvalidRequest::NotJson(error.to_string());
    }
    match serde_json::from_slice::<IgnoredAny>(bytes) {
        Ok(_) => InvalidRequest::NotAnObject,
        Err(error) => InvalidRequest::NotJson(error.to_string()),
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
        assert_eq!(parse(r#" "{}" "#), Err(InvalidRequest::NotAnObject));
        for not_json in [
            "[1, }",
            "nul",
            r#"{"custom_id": "a", "body": {}} x"#,
            r#"{"custom_id": "a", "body": {"a": 1,}}"#,
        ] {
            assert!(
                matches!(parse(not_json), Err(InvalidRequest::NotJson(_))),
                "{not_json}"
            );
        }
        let not_utf8 = Bytes::from_static(b"{\"custom_id\": \"a\", \"body\": {\"s\": \"\xff\"}}");
        assert!(matches!(
            parse_line(1, &not_utf8),
            Err(InvalidRequest::NotJson(_))
        ));
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
