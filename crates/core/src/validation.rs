//! Validation of a batch input file, one line at a time, in bounded memory.
//!
//! The scheduler streams the input once through [`crate::jsonl::JsonlSplitter`] and hands every
//! item to a [`LineValidator`]; at end of input, [`LineValidator::finish`] adds the file-level
//! checks and returns a [`ValidationReport`]. A batch whose report is not [`ok`] goes to `failed`
//! with the report's errors as its `errors.data` (see `docs/openai-compat.md`, "Validation").
//!
//! Each line must be `{"custom_id": str, "method": "POST", "url": <batch endpoint>, "body": {..}}`.
//! Other top-level keys are ignored. Validation goes on after an error so one pass reports every
//! problem (up to [`ValidationLimits::max_errors`] entries); a line may yield several errors.
//!
//! Choices where OpenAI's behaviour is not documented:
//! - A key that is absent or `null` is `missing_required_parameter`; a key of the wrong JSON type
//!   (e.g. a numeric `custom_id`) is `invalid_value`, with OpenAI's "Invalid type for ..." wording.
//!   Problems inside `body` are all `invalid_request`, with params like `body.model`.
//! - Blank lines (empty or whitespace-only) at the end of the file are ignored and not counted;
//!   a blank line followed by a request is `invalid_json_line`.
//! - A line over [`ValidationLimits::max_line_bytes`] is `line_too_large` (a code of ours: OpenAI
//!   has no equivalent that we know of).
//! - A line repeating a key (`{"custom_id": "a", "custom_id": "b", ..}`) is `invalid_json_line`.
//! - `body.model` is required for every endpoint, moderations included: it routes the batch.
//!   A name longer than [`MAX_MODEL_CHARS`] is `invalid_request` and is not kept as the batch's
//!   model.
//! - Lines past [`ValidationLimits::max_lines`] are counted but not checked; the file fails
//!   with `too_many_tasks` anyway.
//!
//! Memory: one 128-bit hash per `custom_id` of the first `max_lines` lines (a `HashSet<u128>`:
//! 16 bytes per entry plus the table's slack, at most about 2.3 × 16 bytes per line right after
//! it grows), the batch's model name, and at most `max_errors` errors. Nothing else grows with
//! the input.
//!
//! [`ok`]: ValidationReport::ok

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::jsonl::{JsonlItem, Line};

/// Most characters in a model name: in a line's `body.model` (more is `invalid_request`, with
/// OpenAI's "string too long" wording) and in the routing table's `models`. The batch's model
/// is copied into every chunk task, log line and span, so it must not grow with the line.
/// Real names are far shorter: `meta-llama/Llama-3.1-8B-Instruct` is 32, a Hugging Face repo
/// id at most 96 plus its owner, an OpenAI fine-tune id under 100.
pub const MAX_MODEL_CHARS: usize = 256;

/// Most characters in a `custom_id` (more is `invalid_value` naming `custom_id`, with OpenAI's
/// "string too long" wording). OpenAI documents no maximum; nightshift chooses one because the
/// id is copied into every result line and error message. UUIDs are 36, most ids far shorter.
pub const MAX_CUSTOM_ID_CHARS: usize = 512;

/// Most characters in one error's `message`: what a message quotes is already cut short, and
/// this bounds the rest (a parser's text), so a failed batch's `errors` stays small.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 1024;

/// The code of the last entry of a failed batch's `errors.data` when more errors were found
/// than listed (see [`ValidationReport::listed_errors`]).
pub const TOO_MANY_ERRORS: &str = "too_many_errors";

/// Bounds on what one batch input may hold and on how much validation reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidationLimits {
    /// Most requests (lines) a batch may hold; more is `too_many_tasks`.
    pub max_lines: u64,
    /// Most entries in [`ValidationReport::errors`]; further errors are only counted.
    pub max_errors: usize,
    /// Most bytes in one line's content (terminator excluded); more is `line_too_large`. The
    /// caller's [`JsonlSplitter`](crate::jsonl::JsonlSplitter) should use the same limit.
    pub max_line_bytes: usize,
    /// Most bytes in the input file; more is `file_too_large`.
    pub max_file_bytes: u64,
}

impl Default for ValidationLimits {
    /// OpenAI's documented limits (50,000 requests, 200 MB), 1000 reported errors, and 16 MiB
    /// per line (room for a few base64 images in one request).
    fn default() -> Self {
        Self {
            max_lines: 50_000,
            max_errors: 1000,
            max_line_bytes: 16 * 1024 * 1024,
            max_file_bytes: 200 * 1024 * 1024,
        }
    }
}

/// The codes validation reports, as they appear in the Batch object's `errors.data[].code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValidationCode {
    /// Not UTF-8, not JSON, not an object, a repeated key, or a blank line mid-file.
    InvalidJsonLine,
    /// `custom_id`, `method`, `url` or `body` is absent or `null`.
    MissingRequiredParameter,
    /// `method` is not `POST`, or a required key has the wrong JSON type.
    InvalidValue,
    /// `url` is not the batch's endpoint.
    InvalidUrl,
    /// A `custom_id` already used by an earlier line.
    DuplicateCustomId,
    /// `body.stream` is `true`.
    StreamingUnsupported,
    /// The body lacks what the endpoint needs (`model`, `messages`, `input`, `prompt`), or the
    /// input file cannot be read (used by the scheduler with `param: "input_file_id"`).
    InvalidRequest,
    /// `body.model` differs from the model of the first line that has one.
    ModelMismatch,
    /// No upstream serves the batch's model.
    ModelNotFound,
    /// The file holds no request.
    EmptyFile,
    /// More lines than [`ValidationLimits::max_lines`].
    TooManyTasks,
    /// More bytes than [`ValidationLimits::max_file_bytes`].
    FileTooLarge,
    /// A line longer than [`ValidationLimits::max_line_bytes`] (nightshift's own code).
    LineTooLarge,
    /// The batch's endpoint is one an operator declared for some upstreams, but not for the
    /// one serving the batch's model (nightshift's own code).
    EndpointNotServed,
}

impl ValidationCode {
    /// The wire string, e.g. `"invalid_json_line"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJsonLine => "invalid_json_line",
            Self::MissingRequiredParameter => "missing_required_parameter",
            Self::InvalidValue => "invalid_value",
            Self::InvalidUrl => "invalid_url",
            Self::DuplicateCustomId => "duplicate_custom_id",
            Self::StreamingUnsupported => "streaming_unsupported",
            Self::InvalidRequest => "invalid_request",
            Self::ModelMismatch => "model_mismatch",
            Self::ModelNotFound => "model_not_found",
            Self::EmptyFile => "empty_file",
            Self::TooManyTasks => "too_many_tasks",
            Self::FileTooLarge => "file_too_large",
            Self::LineTooLarge => "line_too_large",
            Self::EndpointNotServed => "endpoint_not_served",
        }
    }
}

impl fmt::Display for ValidationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a Batch object's `errors.data`: serialises as
/// `{"code": str, "line": int|null, "message": str, "param": str|null}`, every key present.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, utoipa::ToSchema)]
pub struct BatchError {
    /// Machine-readable code, e.g. `duplicate_custom_id` (see [`ValidationCode`]).
    pub code: String,
    /// 1-based input line the error is about; `None` for file-level errors.
    #[schema(required = true)]
    pub line: Option<u64>,
    /// Human-readable explanation, in the style of OpenAI's messages.
    pub message: String,
    /// The offending parameter (`custom_id`, `body.model`, ...), if any.
    #[schema(required = true)]
    pub param: Option<String>,
}

impl BatchError {
    /// An error with a [`ValidationCode`].
    pub fn new(
        code: ValidationCode,
        line: Option<u64>,
        message: impl Into<String>,
        param: Option<&str>,
    ) -> Self {
        Self {
            code: code.as_str().to_owned(),
            line,
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }
}

/// The outcome of validating one input file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationReport {
    /// File-level errors first, then line errors in line order; at most `max_errors` entries.
    pub errors: Vec<BatchError>,
    /// How many errors were found in all, including those left out of `errors`.
    pub error_count: u64,
    /// Lines holding a request or an error; blank lines at the end of the file are not
    /// counted. For a valid file, the batch's `request_counts.total`.
    pub total_lines: u64,
    /// The batch's model: `body.model` of the first line that has one.
    pub model: Option<String>,
}

impl ValidationReport {
    /// True when no error was found (even one left out of `errors` by the cap).
    pub fn ok(&self) -> bool {
        self.error_count == 0
    }

    /// True when errors were found beyond those listed.
    pub fn is_truncated(&self) -> bool {
        self.error_count > self.errors.len() as u64
    }

    /// The errors as a failed batch lists them in `errors.data`: those kept (at most
    /// `max_errors`), then — when more were found — one last entry, code
    /// [`TOO_MANY_ERRORS`], saying how many more there were. A client thus always learns the
    /// total, and the list (and the Batch object) stays bounded.
    pub fn listed_errors(&self) -> Vec<BatchError> {
        let mut listed = self.errors.clone();
        if self.is_truncated() {
            let more = self.error_count - self.errors.len() as u64;
            listed.push(BatchError {
                code: TOO_MANY_ERRORS.to_owned(),
                line: None,
                message: format!(
                    "{more} more errors were found and are not listed; only the first {} are. \
                     Fix these and validate again to see the rest.",
                    self.errors.len()
                ),
                param: None,
            });
        }
        listed
    }
}

/// What the routing table says of a batch's model, for [`LineValidator::finish_routed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelRoute {
    /// An upstream serves the model, on the batch's endpoint.
    Served,
    /// No upstream serves the model: `model_not_found`.
    NotFound,
    /// The upstream serving the model does not declare the batch's (operator-declared)
    /// endpoint: `endpoint_not_served`.
    EndpointNotServed,
}

/// The endpoint-specific body requirement, derived from the batch's endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyRule {
    /// `/v1/chat/completions`: `messages` must be an array.
    ChatMessages,
    /// `/v1/completions`: `prompt` must be present.
    CompletionsPrompt,
    /// `/v1/embeddings`, `/v1/moderations`: `input` must be present.
    Input,
    /// Any other endpoint (e.g. `/v1/responses`): only `model` is required.
    ModelOnly,
}

impl BodyRule {
    fn for_endpoint(endpoint: &str) -> Self {
        match endpoint {
            "/v1/chat/completions" => Self::ChatMessages,
            "/v1/completions" => Self::CompletionsPrompt,
            "/v1/embeddings" | "/v1/moderations" => Self::Input,
            _ => Self::ModelOnly,
        }
    }
}

/// The batch's model and the first line that named it.
#[derive(Clone, Debug)]
struct SeenModel {
    name: String,
    line: u64,
}

/// Checks a batch input line by line. Feed it every item of the file in order (lines via
/// [`push`](Self::push), oversized ones via [`push_oversized`](Self::push_oversized), or either
/// via [`push_item`](Self::push_item)), then call [`finish`](Self::finish).
#[derive(Debug)]
pub struct LineValidator {
    /// The batch's endpoint: every line's `url` must equal it.
    endpoint: String,
    /// What `body` must hold for this endpoint.
    rule: BodyRule,
    limits: ValidationLimits,
    /// Errors kept for the report (at most `limits.max_errors`).
    errors: Vec<BatchError>,
    /// Errors found in all.
    error_count: u64,
    /// Lines counted so far (see [`ValidationReport::total_lines`]).
    total_lines: u64,
    /// xxh3-128 of every `custom_id` seen (unescaped UTF-8), for duplicate detection. A false
    /// duplicate needs a 128-bit collision: negligible at any batch size.
    custom_ids: HashSet<u128>,
    /// The batch's model, once a line names one.
    model: Option<SeenModel>,
    /// Blank lines not yet judged: `(first line number, count)` of a run of consecutive blank
    /// lines. They are errors if a non-blank line follows, ignored if the file ends.
    blank_run: Option<(u64, u64)>,
}

impl LineValidator {
    /// A validator for a batch on `endpoint` (e.g. `/v1/chat/completions`).
    pub fn new(endpoint: &str, limits: ValidationLimits) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            rule: BodyRule::for_endpoint(endpoint),
            limits,
            errors: Vec::new(),
            error_count: 0,
            total_lines: 0,
            custom_ids: HashSet::new(),
            model: None,
            blank_run: None,
        }
    }

    /// True once more lines than `max_lines` were pushed: the file will fail with
    /// `too_many_tasks`, so a caller may stop reading (the report then under-counts lines).
    pub fn is_over_line_limit(&self) -> bool {
        self.total_lines > self.limits.max_lines
    }

    /// Checks one item from the splitter.
    pub fn push_item(&mut self, item: &JsonlItem) {
        match item {
            JsonlItem::Line(line) => self.push(line),
            JsonlItem::Oversized(line) => self.push_oversized(line.number),
        }
    }

    /// Checks one line. Lines must come in file order.
    pub fn push(&mut self, line: &Line) {
        if line.is_blank() {
            match &mut self.blank_run {
                Some((first, count)) if *first + *count == line.number => *count += 1,
                _ => {
                    self.flush_blank_run();
                    self.blank_run = Some((line.number, 1));
                }
            }
            return;
        }
        self.flush_blank_run();
        if self.count_line() {
            self.check_line(line.number, &line.bytes);
        }
    }

    /// Records line `number` as longer than `max_line_bytes` (`line_too_large`).
    pub fn push_oversized(&mut self, number: u64) {
        self.flush_blank_run();
        if self.count_line() {
            let message = format!(
                "This line is longer than {} bytes, the most a single request may take.",
                self.limits.max_line_bytes
            );
            self.record(ValidationCode::LineTooLarge, Some(number), message, None);
        }
    }

    /// Ends validation: adds the file-level checks and returns the report.
    ///
    /// `file_bytes` is the input's size; `model_is_served` answers whether some upstream serves
    /// a model name (called at most once, only if a line named a model).
    pub fn finish(
        self,
        file_bytes: u64,
        model_is_served: impl Fn(&str) -> bool,
    ) -> ValidationReport {
        self.finish_routed(file_bytes, |model| {
            if model_is_served(model) {
                ModelRoute::Served
            } else {
                ModelRoute::NotFound
            }
        })
    }

    /// [`finish`](Self::finish), where `route` also says whether the upstream serving the
    /// model serves the batch's endpoint: [`ModelRoute::EndpointNotServed`] fails the batch
    /// with `endpoint_not_served` on the line that named the model.
    pub fn finish_routed(
        mut self,
        file_bytes: u64,
        route: impl Fn(&str) -> ModelRoute,
    ) -> ValidationReport {
        // A blank run still pending ends the file: trailing blank lines are fine.
        self.blank_run = None;

        let mut file_errors = Vec::new();
        if file_bytes > self.limits.max_file_bytes {
            file_errors.push(BatchError::new(
                ValidationCode::FileTooLarge,
                None,
                format!(
                    "The input file is {file_bytes} bytes; a batch input file may be at most {} bytes.",
                    self.limits.max_file_bytes
                ),
                None,
            ));
        }
        if self.total_lines == 0 {
            file_errors.push(BatchError::new(
                ValidationCode::EmptyFile,
                None,
                "The input file is empty: a batch needs at least one request.",
                None,
            ));
        }
        if self.total_lines > self.limits.max_lines {
            file_errors.push(BatchError::new(
                ValidationCode::TooManyTasks,
                None,
                format!(
                    "The input file has {} lines; a batch may hold at most {} requests.",
                    self.total_lines, self.limits.max_lines
                ),
                None,
            ));
        }
        if let Some(model) = &self.model {
            match route(&model.name) {
                ModelRoute::Served => {}
                ModelRoute::NotFound => file_errors.push(BatchError::new(
                    ValidationCode::ModelNotFound,
                    Some(model.line),
                    format!(
                        "The model {} does not exist or is not served by this deployment.",
                        quoted(&model.name)
                    ),
                    Some("body.model"),
                )),
                ModelRoute::EndpointNotServed => file_errors.push(BatchError::new(
                    ValidationCode::EndpointNotServed,
                    Some(model.line),
                    format!(
                        "The model {} is not served on {} by this deployment: the upstream \
                         serving it does not declare that endpoint.",
                        quoted(&model.name),
                        self.endpoint
                    ),
                    Some("body.model"),
                )),
            }
        }

        self.error_count += file_errors.len() as u64;
        let mut errors = file_errors;
        errors.append(&mut self.errors);
        errors.truncate(self.limits.max_errors);
        ValidationReport {
            errors,
            error_count: self.error_count,
            total_lines: self.total_lines,
            model: self.model.map(|m| m.name),
        }
    }

    /// Counts a line; true if it is within `max_lines` and so must be checked.
    fn count_line(&mut self) -> bool {
        self.total_lines += 1;
        self.total_lines <= self.limits.max_lines
    }

    fn record(
        &mut self,
        code: ValidationCode,
        line: Option<u64>,
        message: impl Into<String>,
        param: Option<&str>,
    ) {
        self.error_count += 1;
        if self.errors.len() < self.limits.max_errors {
            let mut message: String = message.into();
            if let Some((cut, _)) = message.char_indices().nth(MAX_ERROR_MESSAGE_CHARS) {
                message.truncate(cut);
                message.push('…');
            }
            self.errors
                .push(BatchError::new(code, line, message, param));
        }
    }

    /// The pending blank lines are followed by a request: each is an error.
    fn flush_blank_run(&mut self) {
        let Some((first, count)) = self.blank_run.take() else {
            return;
        };
        for number in first..first + count {
            if self.count_line() {
                self.record(
                    ValidationCode::InvalidJsonLine,
                    Some(number),
                    "This line is blank; blank lines are only allowed at the end of the file.",
                    None,
                );
            }
        }
    }

    fn check_line(&mut self, number: u64, bytes: &[u8]) {
        let line = Some(number);
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => {
                let message = format!(
                    "This line is not valid UTF-8 (invalid byte at column {}).",
                    error.valid_up_to() + 1
                );
                self.record(ValidationCode::InvalidJsonLine, line, message, None);
                return;
            }
        };
        let raw = match serde_json::from_str::<ObjectOr<RawLine<'_>>>(text) {
            Ok(ObjectOr::Object(raw)) => raw,
            Ok(ObjectOr::Other(kind)) => {
                let message = format!(
                    "Each line must be a JSON object with 'custom_id', 'method', 'url' and 'body', \
                     but this line is {}.",
                    kind.phrase()
                );
                self.record(ValidationCode::InvalidJsonLine, line, message, None);
                return;
            }
            Err(error) => {
                let message = if error.is_data() {
                    format!(
                        "This line is not a valid request object: {}.",
                        without_position(&error)
                    )
                } else {
                    format!(
                        "This line is not parseable as valid JSON: {} (column {}).",
                        without_position(&error),
                        error.column()
                    )
                };
                self.record(ValidationCode::InvalidJsonLine, line, message, None);
                return;
            }
        };

        match raw.custom_id {
            Some(Field::Str(custom_id)) if custom_id.chars().nth(MAX_CUSTOM_ID_CHARS).is_some() => {
                let message = format!(
                    "Invalid 'custom_id': string too long. Expected a string with maximum \
                     length {MAX_CUSTOM_ID_CHARS}, but got a string with length {} instead.",
                    custom_id.chars().count()
                );
                self.record(
                    ValidationCode::InvalidValue,
                    line,
                    message,
                    Some("custom_id"),
                );
            }
            Some(Field::Str(custom_id)) => {
                let hash = xxhash_rust::xxh3::xxh3_128(custom_id.as_bytes());
                if !self.custom_ids.insert(hash) {
                    let message = format!(
                        "The custom_id {} is already used by an earlier line; \
                         custom_id must be unique for each request in a batch.",
                        quoted(&custom_id)
                    );
                    self.record(
                        ValidationCode::DuplicateCustomId,
                        line,
                        message,
                        Some("custom_id"),
                    );
                }
            }
            other => self.check_type(number, "custom_id", "a string", other.as_ref()),
        }

        match raw.method {
            Some(Field::Str(method)) if method == "POST" => {}
            Some(Field::Str(method)) => {
                let message = format!(
                    "Invalid value: {}. Supported values are: 'POST'.",
                    quoted(&method)
                );
                self.record(ValidationCode::InvalidValue, line, message, Some("method"));
            }
            other => self.check_type(number, "method", "a string", other.as_ref()),
        }

        match raw.url {
            Some(Field::Str(url)) if url == self.endpoint => {}
            Some(Field::Str(url)) => {
                let message = format!(
                    "The URL provided for this request ({}) does not match the batch's endpoint ('{}').",
                    quoted(&url),
                    self.endpoint
                );
                self.record(ValidationCode::InvalidUrl, line, message, Some("url"));
            }
            other => self.check_type(number, "url", "a string", other.as_ref()),
        }

        match raw.body {
            Some(ObjectOr::Object(body)) => self.check_body(number, body),
            Some(ObjectOr::Other(kind)) => {
                self.check_type(number, "body", "an object", Some(&Field::Other(kind)));
            }
            None => self.check_type(number, "body", "an object", None),
        }
    }

    /// Reports a required top-level key that is absent/null (`missing_required_parameter`) or
    /// not of the `expected` type (`invalid_value`). Only called when the value is unusable.
    fn check_type(&mut self, number: u64, param: &str, expected: &str, value: Option<&Field<'_>>) {
        match value {
            None | Some(Field::Other(Kind::Null)) => {
                let message = format!("Missing required parameter: '{param}'.");
                self.record(
                    ValidationCode::MissingRequiredParameter,
                    Some(number),
                    message,
                    Some(param),
                );
            }
            Some(field) => {
                let message = format!(
                    "Invalid type for '{param}': expected {expected}, but got {} instead.",
                    field.kind().phrase()
                );
                self.record(
                    ValidationCode::InvalidValue,
                    Some(number),
                    message,
                    Some(param),
                );
            }
        }
    }

    fn check_body(&mut self, number: u64, body: RawBody<'_>) {
        let line = Some(number);
        if let Some(Kind::Bool(true)) = body.stream {
            self.record(
                ValidationCode::StreamingUnsupported,
                line,
                "Streaming is not supported in a batch: remove 'stream' from the body or set it to false.",
                Some("body.stream"),
            );
        }

        match body.model {
            Some(Field::Str(model)) if model.chars().nth(MAX_MODEL_CHARS).is_some() => {
                let message = format!(
                    "Invalid 'body.model': string too long. Expected a string with maximum \
                     length {MAX_MODEL_CHARS}, but got a string with length {} instead.",
                    model.chars().count()
                );
                self.record(
                    ValidationCode::InvalidRequest,
                    line,
                    message,
                    Some("body.model"),
                );
            }
            Some(Field::Str(model)) if !model.is_empty() => match &self.model {
                None => {
                    self.model = Some(SeenModel {
                        name: model.into_owned(),
                        line: number,
                    });
                }
                Some(seen) if seen.name == model => {}
                Some(seen) => {
                    let message = format!(
                        "The model {} does not match the model {} of line {}; \
                         every request in a batch must use the same model.",
                        quoted(&model),
                        quoted(&seen.name),
                        seen.line
                    );
                    self.record(
                        ValidationCode::ModelMismatch,
                        line,
                        message,
                        Some("body.model"),
                    );
                }
            },
            Some(Field::Str(_)) => self.record(
                ValidationCode::InvalidRequest,
                line,
                "Invalid value for 'body.model': the model name must not be empty.",
                Some("body.model"),
            ),
            other => {
                self.body_requirement(number, "body.model", "a string", other.map(|f| f.kind()))
            }
        }

        match self.rule {
            BodyRule::ChatMessages => match body.messages {
                Some(Kind::Array) => {}
                other => self.body_requirement(number, "body.messages", "an array", other),
            },
            BodyRule::CompletionsPrompt => {
                if matches!(body.prompt, None | Some(Kind::Null)) {
                    self.body_requirement(number, "body.prompt", "", None);
                }
            }
            BodyRule::Input => {
                if matches!(body.input, None | Some(Kind::Null)) {
                    self.body_requirement(number, "body.input", "", None);
                }
            }
            BodyRule::ModelOnly => {}
        }
    }

    /// Reports a body key that is absent/null or not of the `expected` type (`invalid_request`).
    fn body_requirement(&mut self, number: u64, param: &str, expected: &str, value: Option<Kind>) {
        let message = match value {
            None | Some(Kind::Null) => format!("Missing required parameter: '{param}'."),
            Some(kind) => format!(
                "Invalid type for '{param}': expected {expected}, but got {} instead.",
                kind.phrase()
            ),
        };
        self.record(
            ValidationCode::InvalidRequest,
            Some(number),
            message,
            Some(param),
        );
    }
}

/// A user value for a message: in single quotes, cut to 64 characters.
fn quoted(value: &str) -> String {
    const MAX_CHARS: usize = 64;
    match value.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("'{}…'", &value[..cut]),
        None => format!("'{value}'"),
    }
}

/// serde_json's error text without its " at line L column C" suffix (always line 1 here).
fn without_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rsplit_once(" at line ") {
        Some((head, _)) => head.to_owned(),
        None => text,
    }
}

// ---------------------------------------------------------------------------------------------
// Borrowed, allocation-light views of a line. Only the keys validation looks at are kept; every
// other value is skipped with `IgnoredAny`. Strings borrow from the line unless they hold
// escapes.

/// The JSON type of a value, and a boolean's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Null,
    Bool(bool),
    Number,
    String,
    Array,
    Object,
}

impl Kind {
    /// "an array", "null", ...: how messages name the type.
    fn phrase(self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "a boolean",
            Self::Number => "a number",
            Self::String => "a string",
            Self::Array => "an array",
            Self::Object => "an object",
        }
    }
}

/// A value whose string content matters (`custom_id`, `method`, `url`, `model`).
#[derive(Debug)]
enum Field<'a> {
    Str(Cow<'a, str>),
    Other(Kind),
}

impl Field<'_> {
    fn kind(&self) -> Kind {
        match self {
            Self::Str(_) => Kind::String,
            Self::Other(kind) => *kind,
        }
    }
}

/// Visits any JSON value; keeps string content only when `KEEP_STR`.
struct FieldVisitor<const KEEP_STR: bool>;

impl<'de, const KEEP_STR: bool> Visitor<'de> for FieldVisitor<KEEP_STR> {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Field::Other(Kind::Bool(v)))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Field::Other(Kind::Number))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Field::Other(Kind::Number))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Field::Other(Kind::Number))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Other(Kind::Null))
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Other(Kind::Null))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(if KEEP_STR {
            Field::Str(Cow::Borrowed(v))
        } else {
            Field::Other(Kind::String)
        })
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(if KEEP_STR {
            Field::Str(Cow::Owned(v.to_owned()))
        } else {
            Field::Other(Kind::String)
        })
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(if KEEP_STR {
            Field::Str(Cow::Owned(v))
        } else {
            Field::Other(Kind::String)
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::Other(Kind::Array))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::Other(Kind::Object))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldVisitor::<true>)
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(deserializer.deserialize_any(FieldVisitor::<false>)?.kind())
    }
}

/// An object parsed as `T`, or the type of whatever other value stood there. Unlike a derived
/// struct, it never accepts an array in place of an object.
enum ObjectOr<T> {
    Object(T),
    Other(Kind),
}

struct ObjectOrVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectOrVisitor<T> {
    type Value = ObjectOr<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map)).map(ObjectOr::Object)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other(Kind::Bool(v)))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other(Kind::Number))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other(Kind::Number))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other(Kind::Number))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other(Kind::Null))
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other(Kind::Null))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other(Kind::String))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(ObjectOr::Other(Kind::Array))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectOrVisitor(PhantomData))
    }
}

/// The keys of a line validation reads. Absent and `null` both read as `None`.
#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(borrow)]
    custom_id: Option<Field<'a>>,
    #[serde(borrow)]
    method: Option<Field<'a>>,
    #[serde(borrow)]
    url: Option<Field<'a>>,
    #[serde(borrow)]
    body: Option<ObjectOr<RawBody<'a>>>,
}

/// The keys of a body validation reads; only `model` keeps its string.
#[derive(Deserialize)]
struct RawBody<'a> {
    #[serde(borrow)]
    model: Option<Field<'a>>,
    stream: Option<Kind>,
    messages: Option<Kind>,
    input: Option<Kind>,
    prompt: Option<Kind>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::jsonl::JsonlSplitter;

    const CHAT: &str = "/v1/chat/completions";

    fn chat_line(custom_id: &str, model: &str) -> String {
        format!(
            r#"{{"custom_id": "{custom_id}", "method": "POST", "url": "/v1/chat/completions", "body": {{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}}}"#
        )
    }

    fn validate_with(
        endpoint: &str,
        input: &[u8],
        limits: ValidationLimits,
        served: &[&str],
    ) -> ValidationReport {
        let mut validator = LineValidator::new(endpoint, limits);
        for item in JsonlSplitter::new(limits.max_line_bytes).split_all(input.to_vec()) {
            validator.push_item(&item);
        }
        validator.finish(input.len() as u64, |m| served.contains(&m))
    }

    fn validate(input: &str) -> ValidationReport {
        validate_with(
            CHAT,
            input.as_bytes(),
            ValidationLimits::default(),
            &["gpt-4o-mini"],
        )
    }

    fn codes(report: &ValidationReport) -> Vec<(&str, Option<u64>, Option<&str>)> {
        report
            .errors
            .iter()
            .map(|e| (e.code.as_str(), e.line, e.param.as_deref()))
            .collect()
    }

    #[test]
    fn a_valid_file_passes_and_names_its_model() {
        let input = format!(
            "{}\n{}\n",
            chat_line("a", "gpt-4o-mini"),
            chat_line("b", "gpt-4o-mini")
        );
        let report = validate(&input);
        assert!(report.ok(), "{:?}", report.errors);
        assert_eq!(report.total_lines, 2);
        assert_eq!(report.model.as_deref(), Some("gpt-4o-mini"));
        assert!(!report.is_truncated());
    }

    #[test]
    fn crlf_endings_and_no_trailing_newline_are_fine() {
        let input = format!(
            "{}\r\n{}",
            chat_line("a", "gpt-4o-mini"),
            chat_line("b", "gpt-4o-mini")
        );
        let report = validate(&input);
        assert!(report.ok(), "{:?}", report.errors);
        assert_eq!(report.total_lines, 2);
    }

    #[test]
    fn trailing_blank_lines_are_ignored_but_mid_file_ones_are_errors() {
        let ok = format!("{}\n\n \r\n\t\n", chat_line("a", "gpt-4o-mini"));
        let report = validate(&ok);
        assert!(report.ok(), "{:?}", report.errors);
        assert_eq!(report.total_lines, 1);

        let bad = format!(
            "\n{}\n\n  \n{}\n\n",
            chat_line("a", "gpt-4o-mini"),
            chat_line("b", "gpt-4o-mini")
        );
        let report = validate(&bad);
        assert_eq!(
            codes(&report),
            vec![
                ("invalid_json_line", Some(1), None),
                ("invalid_json_line", Some(3), None),
                ("invalid_json_line", Some(4), None),
            ]
        );
        assert_eq!(
            report.errors[0].message,
            "This line is blank; blank lines are only allowed at the end of the file."
        );
        assert_eq!(report.total_lines, 5);
    }

    #[test]
    fn empty_and_blank_only_files_are_empty_file() {
        for input in ["", "\n", "\r\n\n  \n"] {
            let report = validate(input);
            assert_eq!(
                codes(&report),
                vec![("empty_file", None, None)],
                "{input:?}"
            );
            assert_eq!(
                report.errors[0].message,
                "The input file is empty: a batch needs at least one request."
            );
            assert_eq!(report.total_lines, 0);
            assert_eq!(report.model, None);
        }
    }

    #[test]
    fn not_json_not_utf8_and_not_an_object_are_invalid_json_line() {
        let mut input = b"{\"custom_id\": \n[1, 2]\n\"just a string\"\nnull\n".to_vec();
        input.extend(b"{\"custom_id\": \"\xff\"}\n");
        input.extend(b"{\"custom_id\": \"a\", \"custom_id\": \"b\"}\n");
        input.extend(b"{} trailing\n");
        let report = validate_with(CHAT, &input, ValidationLimits::default(), &[]);
        assert_eq!(
            codes(&report),
            (1..=7)
                .map(|n| ("invalid_json_line", Some(n), None))
                .collect::<Vec<_>>()
        );
        let messages: Vec<_> = report.errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            vec![
                "This line is not parseable as valid JSON: EOF while parsing a value (column 14).",
                "Each line must be a JSON object with 'custom_id', 'method', 'url' and 'body', but this line is an array.",
                "Each line must be a JSON object with 'custom_id', 'method', 'url' and 'body', but this line is a string.",
                "Each line must be a JSON object with 'custom_id', 'method', 'url' and 'body', but this line is null.",
                "This line is not valid UTF-8 (invalid byte at column 16).",
                "This line is not a valid request object: duplicate field `custom_id`.",
                "This line is not parseable as valid JSON: trailing characters (column 4).",
            ]
        );
    }

    #[test]
    fn missing_and_mistyped_top_level_keys() {
        let input = concat!(
            r#"{}"#,
            "\n",
            r#"{"custom_id": null, "method": 1, "url": ["x"], "body": "text"}"#,
            "\n",
        );
        let report = validate(input);
        assert_eq!(
            codes(&report),
            vec![
                ("missing_required_parameter", Some(1), Some("custom_id")),
                ("missing_required_parameter", Some(1), Some("method")),
                ("missing_required_parameter", Some(1), Some("url")),
                ("missing_required_parameter", Some(1), Some("body")),
                ("missing_required_parameter", Some(2), Some("custom_id")),
                ("invalid_value", Some(2), Some("method")),
                ("invalid_value", Some(2), Some("url")),
                ("invalid_value", Some(2), Some("body")),
            ]
        );
        assert_eq!(
            report.errors[0].message,
            "Missing required parameter: 'custom_id'."
        );
        assert_eq!(
            report.errors[5].message,
            "Invalid type for 'method': expected a string, but got a number instead."
        );
        assert_eq!(
            report.errors[6].message,
            "Invalid type for 'url': expected a string, but got an array instead."
        );
        assert_eq!(
            report.errors[7].message,
            "Invalid type for 'body': expected an object, but got a string instead."
        );
    }

    #[test]
    fn numeric_custom_id_is_invalid_value() {
        let input = r#"{"custom_id": 7, "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini", "messages": []}}"#;
        let report = validate(input);
        assert_eq!(
            codes(&report),
            vec![("invalid_value", Some(1), Some("custom_id"))]
        );
        assert_eq!(
            report.errors[0].message,
            "Invalid type for 'custom_id': expected a string, but got a number instead."
        );
    }

    #[test]
    fn method_must_be_post_and_url_the_endpoint() {
        let input = r#"{"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {"model": "gpt-4o-mini", "messages": []}}"#;
        let report = validate(input);
        assert_eq!(
            codes(&report),
            vec![
                ("invalid_value", Some(1), Some("method")),
                ("invalid_url", Some(1), Some("url")),
            ]
        );
        assert_eq!(
            report.errors[0].message,
            "Invalid value: 'GET'. Supported values are: 'POST'."
        );
        assert_eq!(
            report.errors[1].message,
            "The URL provided for this request ('/v1/embeddings') does not match the batch's endpoint ('/v1/chat/completions')."
        );
    }

    #[test]
    fn lowercase_post_is_rejected() {
        let input = chat_line("a", "gpt-4o-mini").replace("\"POST\"", "\"post\"");
        assert_eq!(
            codes(&validate(&input)),
            vec![("invalid_value", Some(1), Some("method"))]
        );
    }

    #[test]
    fn duplicate_custom_ids_flag_second_and_later_occurrences() {
        let input = [
            chat_line("x", "gpt-4o-mini"),
            chat_line("y", "gpt-4o-mini"),
            chat_line("x", "gpt-4o-mini"),
            chat_line("x", "gpt-4o-mini"),
        ]
        .join("\n");
        let report = validate(&input);
        assert_eq!(
            codes(&report),
            vec![
                ("duplicate_custom_id", Some(3), Some("custom_id")),
                ("duplicate_custom_id", Some(4), Some("custom_id")),
            ]
        );
        assert_eq!(
            report.errors[0].message,
            "The custom_id 'x' is already used by an earlier line; custom_id must be unique for each request in a batch."
        );
    }

    #[test]
    fn escaped_and_literal_unicode_custom_ids_are_the_same_id() {
        let input = [
            chat_line(r"caf\u00e9", "gpt-4o-mini"),
            chat_line("café", "gpt-4o-mini"),
            chat_line(r"\ud83d\ude00", "gpt-4o-mini"),
            chat_line("😀", "gpt-4o-mini"),
            chat_line(r#"quote\"d"#, "gpt-4o-mini"),
            chat_line(r#"quote\u0022d"#, "gpt-4o-mini"),
            chat_line("cafe", "gpt-4o-mini"),
        ]
        .join("\n");
        let report = validate(&input);
        assert_eq!(
            codes(&report),
            vec![
                ("duplicate_custom_id", Some(2), Some("custom_id")),
                ("duplicate_custom_id", Some(4), Some("custom_id")),
                ("duplicate_custom_id", Some(6), Some("custom_id")),
            ]
        );
        assert!(report.errors[0].message.contains("'café'"));
        assert!(report.errors[1].message.contains("'😀'"));
    }

    #[test]
    fn duplicates_are_found_across_many_lines() {
        let mut input = String::new();
        for i in 0..20_000u32 {
            input.push_str(&chat_line(&format!("req-{i}"), "gpt-4o-mini"));
            input.push('\n');
        }
        for i in (0..20_000u32).step_by(997) {
            input.push_str(&chat_line(&format!("req-{i}"), "gpt-4o-mini"));
            input.push('\n');
        }
        let report = validate(&input);
        let expected: Vec<_> = (0..(20_000u32).div_ceil(997) as u64)
            .map(|k| ("duplicate_custom_id", Some(20_001 + k), Some("custom_id")))
            .collect();
        assert_eq!(codes(&report), expected);
    }

    #[test]
    fn empty_custom_id_is_allowed_once() {
        let input = [chat_line("", "gpt-4o-mini"), chat_line("", "gpt-4o-mini")].join("\n");
        assert_eq!(
            codes(&validate(&input)),
            vec![("duplicate_custom_id", Some(2), Some("custom_id"))]
        );
    }

    #[test]
    fn stream_true_is_unsupported_but_false_is_fine() {
        let line = |stream: &str| {
            format!(
                r#"{{"custom_id": "{stream}", "method": "POST", "url": "/v1/chat/completions", "body": {{"model": "gpt-4o-mini", "messages": [], "stream": {stream}}}}}"#
            )
        };
        let input = [line("true"), line("false"), line("null")].join("\n");
        let report = validate(&input);
        assert_eq!(
            codes(&report),
            vec![("streaming_unsupported", Some(1), Some("body.stream"))]
        );
        assert_eq!(
            report.errors[0].message,
            "Streaming is not supported in a batch: remove 'stream' from the body or set it to false."
        );
    }

    #[test]
    fn body_requirements_for_chat() {
        let input = concat!(
            r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}"#,
            "\n",
            r#"{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"model": 4, "messages": "hi"}}"#,
            "\n",
            r#"{"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "", "messages": null}}"#,
        );
        let report = validate(input);
        assert_eq!(
            codes(&report),
            vec![
                ("invalid_request", Some(1), Some("body.model")),
                ("invalid_request", Some(1), Some("body.messages")),
                ("invalid_request", Some(2), Some("body.model")),
                ("invalid_request", Some(2), Some("body.messages")),
                ("invalid_request", Some(3), Some("body.model")),
                ("invalid_request", Some(3), Some("body.messages")),
            ]
        );
        let messages: Vec<_> = report.errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            vec![
                "Missing required parameter: 'body.model'.",
                "Missing required parameter: 'body.messages'.",
                "Invalid type for 'body.model': expected a string, but got a number instead.",
                "Invalid type for 'body.messages': expected an array, but got a string instead.",
                "Invalid value for 'body.model': the model name must not be empty.",
                "Missing required parameter: 'body.messages'.",
            ]
        );
        assert_eq!(report.model, None);
    }

    #[test]
    fn model_names_are_bounded_in_characters() {
        let longest = "é".repeat(MAX_MODEL_CHARS);
        let report = validate_with(
            CHAT,
            chat_line("a", &longest).as_bytes(),
            ValidationLimits::default(),
            &[longest.as_str()],
        );
        assert!(report.ok(), "{:?}", report.errors);
        assert_eq!(report.model.as_deref(), Some(longest.as_str()));

        let huge = "m".repeat(10 * 1024);
        let input = [
            chat_line("a", &huge),
            chat_line("b", &"m".repeat(MAX_MODEL_CHARS + 1)),
            chat_line("c", "served"),
        ]
        .join("\n");
        let report = validate_with(
            CHAT,
            input.as_bytes(),
            ValidationLimits::default(),
            &["served"],
        );
        assert_eq!(
            codes(&report),
            vec![
                ("invalid_request", Some(1), Some("body.model")),
                ("invalid_request", Some(2), Some("body.model")),
            ]
        );
        assert_eq!(
            report.errors[0].message,
            "Invalid 'body.model': string too long. Expected a string with maximum length 256, \
             but got a string with length 10240 instead."
        );
        assert_eq!(
            report.model.as_deref(),
            Some("served"),
            "an overlong name is never the batch's model"
        );
    }

    #[test]
    fn body_requirements_for_embeddings_completions_and_responses() {
        let line = |url: &str, body: &str| {
            format!(r#"{{"custom_id": "x", "method": "POST", "url": "{url}", "body": {body}}}"#)
        };
        let limits = ValidationLimits::default();
        let served = ["m"];

        let emb = "/v1/embeddings";
        let report = validate_with(
            emb,
            line(emb, r#"{"model": "m", "input": null}"#).as_bytes(),
            limits,
            &served,
        );
        assert_eq!(
            codes(&report),
            vec![("invalid_request", Some(1), Some("body.input"))]
        );
        assert!(
            validate_with(
                emb,
                line(emb, r#"{"model": "m", "input": ["a", "b"]}"#).as_bytes(),
                limits,
                &served
            )
            .ok()
        );

        let cmp = "/v1/completions";
        let report = validate_with(
            cmp,
            line(cmp, r#"{"model": "m"}"#).as_bytes(),
            limits,
            &served,
        );
        assert_eq!(
            codes(&report),
            vec![("invalid_request", Some(1), Some("body.prompt"))]
        );
        assert_eq!(
            report.errors[0].message,
            "Missing required parameter: 'body.prompt'."
        );

        let resp = "/v1/responses";
        assert!(
            validate_with(
                resp,
                line(resp, r#"{"model": "m"}"#).as_bytes(),
                limits,
                &served
            )
            .ok()
        );
    }

    #[test]
    fn every_line_must_use_the_first_model() {
        let input = [
            r#"{"custom_id": "0", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}"#.to_owned(),
            chat_line("a", "gpt-4o-mini"),
            chat_line("b", "other-model"),
            chat_line("c", "gpt-4o-mini"),
        ]
        .join("\n");
        let report = validate(&input);
        assert_eq!(
            codes(&report),
            vec![
                ("invalid_request", Some(1), Some("body.model")),
                ("model_mismatch", Some(3), Some("body.model")),
            ]
        );
        assert_eq!(
            report.errors[1].message,
            "The model 'other-model' does not match the model 'gpt-4o-mini' of line 2; every request in a batch must use the same model."
        );
        assert_eq!(report.model.as_deref(), Some("gpt-4o-mini"));
    }

    #[test]
    fn unserved_model_is_model_not_found_on_its_first_line() {
        let input = format!(
            "{}\n{}\n",
            chat_line("a", "llama-9000"),
            chat_line("b", "llama-9000")
        );
        let report = validate(&input);
        assert_eq!(
            codes(&report),
            vec![("model_not_found", Some(1), Some("body.model"))]
        );
        assert_eq!(
            report.errors[0].message,
            "The model 'llama-9000' does not exist or is not served by this deployment."
        );
        assert_eq!(report.model.as_deref(), Some("llama-9000"));
    }

    #[test]
    fn a_model_whose_upstream_lacks_a_declared_endpoint_is_endpoint_not_served() {
        let input = r#"{"custom_id": "a", "method": "POST", "url": "/v1/rerank", "body": {"model": "bge", "query": "q", "documents": ["d"]}}"#;
        let run = |route: ModelRoute| {
            let mut validator = LineValidator::new("/v1/rerank", ValidationLimits::default());
            for item in JsonlSplitter::new(1 << 20).split_all(input.as_bytes().to_vec()) {
                validator.push_item(&item);
            }
            validator.finish_routed(input.len() as u64, |m| {
                assert_eq!(m, "bge");
                route
            })
        };
        assert!(run(ModelRoute::Served).ok());
        let report = run(ModelRoute::EndpointNotServed);
        assert_eq!(
            codes(&report),
            vec![("endpoint_not_served", Some(1), Some("body.model"))]
        );
        assert!(
            report.errors[0].message.contains("/v1/rerank"),
            "{:?}",
            report.errors
        );
        let report = run(ModelRoute::NotFound);
        assert_eq!(
            codes(&report),
            vec![("model_not_found", Some(1), Some("body.model"))]
        );
    }

    #[test]
    fn served_predicate_is_not_called_without_a_model() {
        let validator = LineValidator::new(CHAT, ValidationLimits::default());
        let report = validator.finish(0, |_| panic!("must not be called"));
        assert_eq!(codes(&report), vec![("empty_file", None, None)]);
    }

    #[test]
    fn too_many_tasks_stops_checking_past_the_limit() {
        let limits = ValidationLimits {
            max_lines: 3,
            ..ValidationLimits::default()
        };
        let mut input = String::new();
        for i in 0..3 {
            input.push_str(&chat_line(&i.to_string(), "gpt-4o-mini"));
            input.push('\n');
        }
        input.push_str("not json\n");
        input.push_str(&chat_line("0", "gpt-4o-mini"));
        input.push('\n');
        let mut validator = LineValidator::new(CHAT, limits);
        for item in JsonlSplitter::new(1 << 20).split_all(input.clone().into_bytes()) {
            validator.push_item(&item);
        }
        assert!(validator.is_over_line_limit());
        let report = validator.finish(input.len() as u64, |_| true);
        assert_eq!(codes(&report), vec![("too_many_tasks", None, None)]);
        assert_eq!(
            report.errors[0].message,
            "The input file has 5 lines; a batch may hold at most 3 requests."
        );
        assert_eq!(report.total_lines, 5);
    }

    #[test]
    fn file_too_large_is_a_file_level_error_listed_first() {
        let limits = ValidationLimits {
            max_file_bytes: 10,
            ..ValidationLimits::default()
        };
        let input = format!("{}\nnope\n", chat_line("a", "gpt-4o-mini"));
        let report = validate_with(CHAT, input.as_bytes(), limits, &["gpt-4o-mini"]);
        assert_eq!(
            codes(&report),
            vec![
                ("file_too_large", None, None),
                ("invalid_json_line", Some(2), None)
            ]
        );
        assert_eq!(
            report.errors[0].message,
            format!(
                "The input file is {} bytes; a batch input file may be at most 10 bytes.",
                input.len()
            )
        );
    }

    #[test]
    fn oversized_lines_are_line_too_large_and_keep_numbering() {
        let limits = ValidationLimits {
            max_line_bytes: 200,
            ..ValidationLimits::default()
        };
        let big = chat_line(&"x".repeat(300), "gpt-4o-mini");
        let input = format!(
            "{}\n{big}\n{}\n",
            chat_line("a", "gpt-4o-mini"),
            chat_line("a", "gpt-4o-mini")
        );
        let report = validate_with(CHAT, input.as_bytes(), limits, &["gpt-4o-mini"]);
        assert_eq!(
            codes(&report),
            vec![
                ("line_too_large", Some(2), None),
                ("duplicate_custom_id", Some(3), Some("custom_id")),
            ]
        );
        assert_eq!(
            report.errors[0].message,
            "This line is longer than 200 bytes, the most a single request may take."
        );
        assert_eq!(report.total_lines, 3);
    }

    #[test]
    fn listed_errors_end_with_how_many_more() {
        let limits = ValidationLimits {
            max_errors: 3,
            ..ValidationLimits::default()
        };
        let report = validate_with(CHAT, "x\n".repeat(10).as_bytes(), limits, &[]);
        let listed = report.listed_errors();
        assert_eq!(listed.len(), 4);
        assert_eq!(listed[..3], report.errors[..]);
        assert_eq!(listed[3].code, TOO_MANY_ERRORS);
        assert_eq!((listed[3].line, listed[3].param.as_deref()), (None, None));
        assert!(
            listed[3].message.starts_with("7 more errors"),
            "{}",
            listed[3].message
        );
        // nothing added when every error is listed
        let report = validate_with(CHAT, b"x\n", limits, &[]);
        assert_eq!(report.listed_errors(), report.errors);
    }

    #[test]
    fn custom_ids_are_bounded_in_characters() {
        let longest = "é".repeat(MAX_CUSTOM_ID_CHARS);
        let over = "i".repeat(MAX_CUSTOM_ID_CHARS + 1);
        let input = [
            chat_line(&longest, "gpt-4o-mini"),
            chat_line(&over, "gpt-4o-mini"),
        ]
        .join("\n");
        let report = validate_with(
            CHAT,
            input.as_bytes(),
            ValidationLimits::default(),
            &["gpt-4o-mini"],
        );
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        let e = &report.errors[0];
        assert_eq!(
            (e.code.as_str(), e.line, e.param.as_deref()),
            ("invalid_value", Some(2), Some("custom_id"))
        );
        assert!(e.message.contains("maximum length 512"), "{}", e.message);
        assert!(e.message.len() < 200, "the id is not echoed");
    }

    #[test]
    fn errors_are_capped_but_counted() {
        let limits = ValidationLimits {
            max_errors: 5,
            ..ValidationLimits::default()
        };
        let input = "x\n".repeat(100);
        let report = validate_with(CHAT, input.as_bytes(), limits, &[]);
        assert_eq!(report.errors.len(), 5);
        assert_eq!(report.error_count, 100);
        assert!(report.is_truncated());
        assert!(!report.ok());
        assert_eq!(report.errors[4].line, Some(5));

        let none = ValidationLimits {
            max_errors: 0,
            ..ValidationLimits::default()
        };
        let report = validate_with(CHAT, b"x\n", none, &[]);
        assert!(report.errors.is_empty());
        assert!(!report.ok());
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let long = "é".repeat(100);
        let input = [
            chat_line(&long, "gpt-4o-mini"),
            chat_line(&long, "gpt-4o-mini"),
        ]
        .join("\n");
        let report = validate(&input);
        let expected = format!("The custom_id '{}…' is already", "é".repeat(64));
        assert!(
            report.errors[0].message.starts_with(&expected),
            "{}",
            report.errors[0].message
        );
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let input = r#"{"custom_id": "a", "extra": {"deep": [1, {"x": null}]}, "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini", "messages": [], "temperature": 0.2, "metadata": {"k": "v"}}}"#;
        assert!(validate(input).ok());
    }

    #[test]
    fn batch_error_serialises_like_openai() {
        let error = BatchError::new(
            ValidationCode::DuplicateCustomId,
            Some(3),
            "dup",
            Some("custom_id"),
        );
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"code":"duplicate_custom_id","line":3,"message":"dup","param":"custom_id"}"#
        );
        let file_level = BatchError::new(ValidationCode::EmptyFile, None, "empty", None);
        assert_eq!(
            serde_json::to_string(&file_level).unwrap(),
            r#"{"code":"empty_file","line":null,"message":"empty","param":null}"#
        );
        let back: BatchError =
            serde_json::from_str(&serde_json::to_string(&error).unwrap()).unwrap();
        assert_eq!(back, error);
    }

    #[test]
    fn validation_codes_have_their_wire_names() {
        let all = [
            (ValidationCode::InvalidJsonLine, "invalid_json_line"),
            (
                ValidationCode::MissingRequiredParameter,
                "missing_required_parameter",
            ),
            (ValidationCode::InvalidValue, "invalid_value"),
            (ValidationCode::InvalidUrl, "invalid_url"),
            (ValidationCode::DuplicateCustomId, "duplicate_custom_id"),
            (
                ValidationCode::StreamingUnsupported,
                "streaming_unsupported",
            ),
            (ValidationCode::InvalidRequest, "invalid_request"),
            (ValidationCode::ModelMismatch, "model_mismatch"),
            (ValidationCode::ModelNotFound, "model_not_found"),
            (ValidationCode::EmptyFile, "empty_file"),
            (ValidationCode::TooManyTasks, "too_many_tasks"),
            (ValidationCode::FileTooLarge, "file_too_large"),
            (ValidationCode::LineTooLarge, "line_too_large"),
            (ValidationCode::EndpointNotServed, "endpoint_not_served"),
        ];
        for (code, name) in all {
            assert_eq!(code.as_str(), name);
            assert_eq!(code.to_string(), name);
        }
    }
}
