//! What one batch request's upstream call produced, and its result line.

use bytes::Bytes;
use nightshift_core::results::{BatchRequestId, NoResponseCode, ResponseBody, ResultLine, Usage};

/// The end of [`Upstream::call`](super::Upstream::call): everything its result line needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// The upstream answered: a 2xx, a non-retryable status, or the last answer of a retried
    /// request (retries exhausted, the deadline too close for another attempt, or the batch
    /// cancelled in between). Also the answer to report when later attempts got no answer at
    /// all.
    Response {
        /// The HTTP status.
        status: u16,
        /// The upstream's `x-request-id` header, or an id of ours (`nightshift-` and 24
        /// alphanumerics) when it sent none.
        request_id: String,
        /// The body, exactly as received.
        body: Bytes,
        /// A 2xx body already read as a JSON object, and its usage, when the call did
        /// ([`ResponseBody::from_json_with_usage`]); `None`: not read yet (it is then, once).
        checked: Option<(ResponseBody, Usage)>,
        /// HTTP attempts made, this one included.
        attempts: u32,
    },
    /// No HTTP answer to report.
    NoResponse {
        /// `batch_cancelled` / `batch_expired`: no attempt was sent (the batch was cancelled,
        /// or its deadline passed, before the first one). `request_timeout`: the last attempt
        /// got no answer in time (the attempt timeout, or the deadline). `upstream_unreachable`:
        /// the last attempt failed to connect or lost its connection. `response_too_large`:
        /// the answer's body was larger than the upstream's `max_response_bytes`.
        code: NoResponseCode,
        /// Human-readable detail for `error.message`; never the upstream's URL.
        message: String,
        /// HTTP attempts made (0 for `batch_cancelled` / `batch_expired`).
        attempts: u32,
    },
}

impl CallOutcome {
    /// The status a 2xx answer whose body is not a JSON object is reported with (Bad
    /// Gateway: the upstream's answer was invalid), so it lands in the error file.
    pub const INVALID_SUCCESS_BODY_STATUS: u16 = 502;

    /// HTTP attempts made.
    pub fn attempts(&self) -> u32 {
        match self {
            Self::Response { attempts, .. } | Self::NoResponse { attempts, .. } => *attempts,
        }
    }

    /// The answer's status, if there is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Response { status, .. } => Some(*status),
            Self::NoResponse { .. } => None,
        }
    }

    /// The result line for input line `id` / `custom_id`:
    ///
    /// - a 2xx whose body is a JSON object: an output-file line with the body as is (line
    ///   breaks flattened, see [`ResponseBody::from_json`]);
    /// - a 2xx whose body is not a JSON object: an error-file line with status
    ///   [`INVALID_SUCCESS_BODY_STATUS`](Self::INVALID_SUCCESS_BODY_STATUS) and the body
    ///   wrapped by [`ResponseBody::from_upstream`] (whose message names the original 2xx);
    /// - any other status: an error-file line with that status and the body, wrapped by
    ///   [`ResponseBody::from_upstream`] when it is not a JSON object;
    /// - no response: an error-file line with `error: {code, message}`.
    pub fn into_result_line(self, id: BatchRequestId, custom_id: &str) -> ResultLine {
        self.into_result(id, custom_id).0
    }

    /// [`into_result_line`](Self::into_result_line) and the line's usage
    /// ([`ResultLine::usage`]), the body read once.
    pub fn into_result(self, id: BatchRequestId, custom_id: &str) -> (ResultLine, Usage) {
        match self {
            Self::Response {
                status,
                request_id,
                body,
                checked,
                ..
            } => {
                let (status_code, body, usage) = if (200..300).contains(&status) {
                    match checked.map_or_else(|| ResponseBody::from_json_with_usage(&body), Ok) {
                        Ok((body, usage)) => (status, body, usage),
                        Err(_) => (
                            Self::INVALID_SUCCESS_BODY_STATUS,
                            ResponseBody::from_upstream(status, &body),
                            Usage::default(),
                        ),
                    }
                } else {
                    (
                        status,
                        ResponseBody::from_upstream(status, &body),
                        Usage::default(),
                    )
                };
                let line = ResultLine::response(id, custom_id, status_code, request_id, body);
                (line, usage)
            }
            Self::NoResponse { code, message, .. } => (
                ResultLine::no_response(id, custom_id, code, Some(message)),
                Usage::default(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn line(outcome: CallOutcome) -> (bool, Value) {
        let line = outcome.into_result_line(BatchRequestId::for_line("batch_x", 3), "c-1");
        let value = serde_json::from_slice(&line.to_json_line()).unwrap();
        (line.is_success(), value)
    }

    fn response(status: u16, body: &'static [u8]) -> CallOutcome {
        CallOutcome::Response {
            status,
            request_id: "req_1".into(),
            body: Bytes::from_static(body),
            checked: None,
            attempts: 2,
        }
    }

    #[test]
    fn success_keeps_the_body_object() {
        let outcome = response(200, b"{\"id\": \"chatcmpl-1\",\n \"usage\": {}}");
        assert_eq!(outcome.attempts(), 2);
        assert_eq!(outcome.status(), Some(200));
        let (success, value) = line(outcome);
        assert!(success);
        assert_eq!(
            value,
            json!({
                "id": BatchRequestId::for_line("batch_x", 3).as_str(),
                "custom_id": "c-1",
                "response": {"status_code": 200, "request_id": "req_1",
                             "body": {"id": "chatcmpl-1", "usage": {}}},
                "error": null
            })
        );
    }

    #[test]
    fn a_success_without_a_json_object_is_an_error_line() {
        for body in [&b"[1, 2]"[..], b"{\"trunc", b"<html>ok</html>"] {
            let (success, value) = line(CallOutcome::Response {
                status: 200,
                request_id: "req_2".into(),
                body: Bytes::copy_from_slice(body),
                checked: None,
                attempts: 5,
            });
            assert!(!success);
            assert_eq!(value["response"]["status_code"], 502);
            assert_eq!(value["response"]["request_id"], "req_2");
            let message = value["response"]["body"]["error"]["message"]
                .as_str()
                .unwrap();
            assert!(message.contains("HTTP 200"), "{message}");
            assert_eq!(value["response"]["body"]["error"]["type"], "upstream_error");
            assert_eq!(value["error"], Value::Null);
        }
    }

    #[test]
    fn error_statuses_keep_their_body_or_get_it_wrapped() {
        let (success, value) = line(response(
            400,
            br#"{"error": {"message": "bad", "type": "invalid_request_error"}}"#,
        ));
        assert!(!success);
        assert_eq!(value["response"]["status_code"], 400);
        assert_eq!(value["response"]["body"]["error"]["message"], "bad");

        let (success, value) = line(response(503, b"<html>busy</html>"));
        assert!(!success);
        assert_eq!(value["response"]["status_code"], 503);
        let message = value["response"]["body"]["error"]["message"]
            .as_str()
            .unwrap();
        assert!(
            message.contains("HTTP 503") && message.contains("busy"),
            "{message}"
        );
    }

    #[test]
    fn no_response_lines_carry_code_and_message() {
        let outcome = CallOutcome::NoResponse {
            code: NoResponseCode::UpstreamUnreachable,
            message: "connection refused".into(),
            attempts: 5,
        };
        assert_eq!(outcome.status(), None);
        let (success, value) = line(outcome);
        assert!(!success);
        assert_eq!(value["response"], Value::Null);
        assert_eq!(
            value["error"],
            json!({"code": "upstream_unreachable", "message": "connection refused"})
        );
    }
}
