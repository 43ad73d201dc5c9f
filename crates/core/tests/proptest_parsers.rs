//! Property tests: the parsers that take a client's bytes never panic, and every answer they
//! give is bounded and in the shape the API promises (issue 11). Case counts are modest so the
//! suite stays fast; `PROPTEST_CASES` raises them for a longer hunt.

use nightshift_core::ErrorKind;
use nightshift_core::batch::{CreateBatch, CreateBatchBody};
use nightshift_core::jsonl::{JsonlItem, JsonlSplitter};
use nightshift_core::sniff::Sniffer;
use nightshift_core::validation::{
    LineValidator, MAX_ERROR_MESSAGE_CHARS, TOO_MANY_ERRORS, ValidationLimits,
};
use proptest::prelude::*;

const ENDPOINTS: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
];

/// Bytes that look like JSONL often enough to reach deep into the validator: fragments of
/// valid request lines, JSON punctuation, escapes, invalid UTF-8, and line breaks, mixed
/// with arbitrary bytes.
fn jsonl_like() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        Just(br#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}"#.to_vec()),
        Just(br#"{"custom_id": "#.to_vec()),
        Just(br#""body": {"model": "#.to_vec()),
        Just(br#""url": "/v1/embeddings", "input": ["#.to_vec()),
        Just(b"\"\\u0000\\ud800\\\"\"".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b" \t ".to_vec()),
        Just(b"{}[]:,".to_vec()),
        Just(b"\xff\xfe\xc3".to_vec()),
        Just(b"null true 1e999 -0".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..64),
    ];
    proptest::collection::vec(fragment, 0..40).prop_map(|parts| parts.concat())
}

/// Feeds `input` to the splitter in chunks cut at `cuts`, validates every item, and checks
/// the report's promises.
fn validate(endpoint: &str, input: &[u8], cuts: &[usize], limits: ValidationLimits) {
    let mut splitter = JsonlSplitter::new(limits.max_line_bytes);
    let mut validator = LineValidator::new(endpoint, limits);
    let mut fed = 0;
    let mut items = 0u64;
    let mut last_end = 0;
    let mut push = |item: JsonlItem, validator: &mut LineValidator| {
        assert!(item.offset() >= last_end, "items in order");
        assert!(item.end() >= item.offset());
        last_end = item.end();
        items += 1;
        validator.push_item(&item);
    };
    for &cut in cuts {
        let cut = cut.min(input.len()).max(fed);
        splitter.feed(input[fed..cut].to_vec());
        fed = cut;
        while let Some(item) = splitter.next_item() {
            push(item, &mut validator);
        }
    }
    splitter.feed(input[fed..].to_vec());
    splitter.finish();
    while let Some(item) = splitter.next_item() {
        push(item, &mut validator);
    }
    assert!(
        last_end <= input.len() as u64,
        "items stay within the input"
    );
    let report = validator.finish(input.len() as u64, |m| m == "m");
    assert!(report.errors.len() <= limits.max_errors);
    assert!(report.error_count >= report.errors.len() as u64);
    assert_eq!(report.ok(), report.error_count == 0);
    if !report.ok() {
        let listed = report.listed_errors();
        assert!(!listed.is_empty(), "a failed report lists something");
        assert!(listed.len() <= limits.max_errors + 1);
        assert_eq!(
            listed.last().map(|e| e.code == TOO_MANY_ERRORS),
            Some(report.is_truncated()),
        );
    }
    for e in &report.errors {
        assert!(
            e.message.chars().count() <= MAX_ERROR_MESSAGE_CHARS + 1,
            "{e:?}"
        );
        assert!(!e.code.is_empty());
        assert!(e.line.is_none_or(|l| l >= 1 && l <= items.max(1)), "{e:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_line_validator_takes_any_bytes(
        endpoint in prop::sample::select(ENDPOINTS.to_vec()),
        input in jsonl_like(),
        cuts in proptest::collection::vec(0usize..4096, 0..6),
        max_line_bytes in prop_oneof![Just(16usize), Just(200), Just(1 << 20)],
        max_errors in 0usize..20,
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        let limits = ValidationLimits {
            max_lines: 50,
            max_errors,
            max_line_bytes,
            max_file_bytes: 1 << 30,
        };
        validate(endpoint, &input, &cuts, limits);
    }

    #[test]
    fn the_line_validator_takes_raw_bytes(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        validate(ENDPOINTS[0], &input, &[], ValidationLimits::default());
    }

    /// The upload's JSONL check: any bytes, cut anywhere, are accepted or refused alike, without
    /// a panic;
    /// "fine" means UTF-8 throughout and a first line that is a JSON object.
    #[test]
    fn the_upload_sniffer_takes_any_bytes(input in jsonl_like(), cut in 0usize..512) {
        let cut = cut.min(input.len());
        let whole = sniff(&[&input]);
        // the same verdict (which of two faults is named first may depend on the cut)
        prop_assert_eq!(sniff(&[&input[..cut], &input[cut..]]).is_ok(), whole.is_ok());
        if whole.is_ok() {
            prop_assert!(std::str::from_utf8(&input).is_ok());
            let first = input.split(|b| *b == b'\n').next().unwrap_or_default();
            // (IgnoredAny: the sniffer checks syntax, not number ranges)
            let parsed = serde_json::from_slice::<serde::de::IgnoredAny>(first);
            let opens = first.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
            prop_assert!(
                parsed.is_ok() && opens,
                "accepted a first line that is no JSON object: {:?}",
                String::from_utf8_lossy(first)
            );
        }
    }

    /// `POST /v1/batches` bodies: any bytes are either parameters or a 400 naming what is
    /// wrong — never a panic, never another class of error.
    #[test]
    fn create_batch_bodies_are_accepted_or_a_400(body in create_body_like()) {
        let windows = vec!["24h".to_owned(), "1h".to_owned()];
        if let Ok(parsed) = serde_json::from_slice::<CreateBatchBody>(&body) {
            match CreateBatch::check(parsed, &windows) {
                Ok(c) => {
                    prop_assert!(!c.input_file_id.is_empty());
                    prop_assert!(ENDPOINTS.contains(&c.endpoint.as_str()));
                }
                Err(e) => {
                    prop_assert_eq!(e.kind, ErrorKind::InvalidRequest);
                    prop_assert!(e.kind.http_status() == 400);
                    prop_assert!(!e.message.is_empty());
                }
            }
        }
    }
}

fn sniff(chunks: &[&[u8]]) -> Result<(), nightshift_core::sniff::SniffError> {
    let mut sniffer = Sniffer::new();
    for chunk in chunks {
        sniffer.push(chunk)?;
    }
    sniffer.finish()
}

/// JSON objects with the create parameters' keys holding values of every JSON type (and
/// sometimes an unknown key or broken JSON).
fn create_body_like() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        prop_oneof![
            Just("24h".to_owned()),
            Just("/v1/chat/completions".to_owned()),
            Just("created_at".to_owned()),
            ".{0,80}",
        ]
        .prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("anchor".to_owned()),
                    Just("seconds".to_owned()),
                    ".{0,70}"
                ],
                inner,
                0..20,
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    let key = prop_oneof![
        Just("input_file_id"),
        Just("endpoint"),
        Just("completion_window"),
        Just("metadata"),
        Just("output_expires_after"),
        Just("unexpected"),
    ];
    let object = proptest::collection::btree_map(key, value, 0..6).prop_map(|m| {
        serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            .to_string()
            .into_bytes()
    });
    prop_oneof![
        4 => object,
        1 => proptest::collection::vec(any::<u8>(), 0..256),
    ]
}
