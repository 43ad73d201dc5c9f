//! Deterministic "inference": token counting, pseudo-text and embedding vectors, all derived
//! from a hash of the request's semantic content so the same request always gets the same
//! answer, across runs and machines.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// A SHA-256 over a canonical rendering of JSON values.
pub(crate) type Hash = [u8; 32];

/// Hashes JSON values canonically: object keys sorted, every item tagged and length-prefixed,
/// so key order and whitespace never matter and no two different values collide by
/// concatenation.
pub(crate) fn canonical_hash(values: &[&Value]) -> Hash {
    let mut hasher = Sha256::new();
    for value in values {
        feed(&mut hasher, value);
    }
    hasher.finalize().into()
}

fn feed(hasher: &mut Sha256, value: &Value) {
    fn bytes(hasher: &mut Sha256, tag: u8, data: &[u8]) {
        hasher.update([tag]);
        hasher.update((data.len() as u64).to_le_bytes());
        hasher.update(data);
    }
    match value {
        Value::Null => hasher.update(b"n"),
        Value::Bool(b) => hasher.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => bytes(hasher, b'#', n.to_string().as_bytes()),
        Value::String(s) => bytes(hasher, b's', s.as_bytes()),
        Value::Array(items) => {
            hasher.update([b'[']);
            hasher.update((items.len() as u64).to_le_bytes());
            for item in items {
                feed(hasher, item);
            }
        }
        Value::Object(map) => feed_object(hasher, map),
    }
}

fn feed_object(hasher: &mut Sha256, map: &Map<String, Value>) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    hasher.update([b'{']);
    hasher.update((keys.len() as u64).to_le_bytes());
    for key in keys {
        hasher.update([b'k']);
        hasher.update((key.len() as u64).to_le_bytes());
        hasher.update(key.as_bytes());
        feed(hasher, &map[key]);
    }
}

/// [`canonical_hash`] of one JSON object, without cloning it into a `Value`.
pub(crate) fn canonical_hash_object(map: &Map<String, Value>) -> Hash {
    let mut hasher = Sha256::new();
    feed_object(&mut hasher, map);
    hasher.finalize().into()
}

/// The token count of a text: its number of whitespace-separated words. A deliberately
/// simple, documented approximation; the generated text obeys it exactly, so
/// `count_tokens(content) == usage.completion_tokens`.
pub(crate) fn count_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// SplitMix64: a tiny generator with a fixed, documented algorithm, so generated content does
/// not change when the `rand` crate changes its default generator.
struct SplitMix64(u64);

impl SplitMix64 {
    fn from_hash(hash: &Hash, offset: usize) -> Self {
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&hash[offset..offset + 8]);
        Self(u64::from_le_bytes(seed))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn next_signed_unit(&mut self) -> f64 {
        // 53 random bits -> [0, 1), then stretched.
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit * 2.0 - 1.0
    }
}

#[rustfmt::skip]
const VOCABULARY: &[&str] = &[
    "the", "a", "quiet", "river", "carries", "light", "across", "stone", "and", "every",
    "morning", "brings", "new", "questions", "to", "answer", "while", "engines", "hum", "in",
    "distant", "halls", "where", "batches", "wait", "for", "night", "shift", "workers", "who",
    "count", "tokens", "with", "patient", "care", "under", "amber", "lamps", "of", "old",
    "servers", "that", "never", "sleep", "but", "dream", "about", "queues", "moving", "slowly",
    "toward", "dawn", "as", "results", "return", "home", "one", "line", "at", "time",
];

/// Natural completion lengths are `MIN_NATURAL..=MAX_NATURAL` tokens before any cap.
const MIN_NATURAL: u64 = 8;
const MAX_NATURAL: u64 = 64;

/// One generated completion.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Completion {
    /// The text; exactly `tokens` whitespace-separated words, the first being `sim:<digest>`.
    pub(crate) text: String,
    /// Completion tokens, at most the cap.
    pub(crate) tokens: u64,
    /// `"length"` when the cap cut the natural length short, else `"stop"`.
    pub(crate) finish_reason: &'static str,
}

/// Generates the completion a request with semantic hash `hash` gets under a token cap.
///
/// The natural length is drawn from the hash; when it exceeds `cap` the text is cut to `cap`
/// tokens and finishes with `"length"`. The text begins `sim:` and the first 8 hex digits of
/// the hash, so a result can be traced back to its request.
pub(crate) fn completion(hash: &Hash, cap: u32) -> Completion {
    let mut rng = SplitMix64::from_hash(hash, 8);
    let natural = MIN_NATURAL + rng.next_u64() % (MAX_NATURAL - MIN_NATURAL + 1);
    let cap = u64::from(cap.max(1));
    let (tokens, finish_reason) = if natural > cap {
        (cap, "length")
    } else {
        (natural, "stop")
    };
    let mut text = format!("sim:{}", hex::encode(&hash[..4]));
    for i in 1..tokens {
        let word = VOCABULARY[(rng.next_u64() % VOCABULARY.len() as u64) as usize];
        text.push(' ');
        text.push_str(word);
        // A sentence break now and then makes it read like text; punctuation does not add
        // words, so the token count stays exact.
        let period = if i + 1 == tokens {
            finish_reason == "stop"
        } else {
            rng.next_u64().is_multiple_of(9)
        };
        if period {
            text.push('.');
        }
    }
    Completion {
        text,
        tokens,
        finish_reason,
    }
}

/// An L2-normalised embedding of `dim` components derived from `hash`.
pub(crate) fn embedding(hash: &Hash, dim: u32) -> Vec<f32> {
    let mut rng = SplitMix64::from_hash(hash, 0);
    let raw: Vec<f64> = (0..dim).map(|_| rng.next_signed_unit()).collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        // Practically unreachable; a unit vector along the first axis keeps the contract.
        let mut unit = vec![0.0; dim as usize];
        if let Some(first) = unit.first_mut() {
            *first = 1.0;
        }
        return unit;
    }
    raw.iter().map(|x| (x / norm) as f32).collect()
}

/// An f32 widened to the f64 whose shortest decimal form is the f32's own, so JSON shows
/// `0.35489747` rather than `0.35489746928215027`. (`ryu` on a stack buffer: `to_string`
/// took a third of the simulator's CPU when it answered embeddings at full speed.)
pub(crate) fn f32_for_json(value: f32) -> f64 {
    if !value.is_finite() {
        return f64::from(value);
    }
    ryu::Buffer::new()
        .format_finite(value)
        .parse()
        .unwrap_or(f64::from(value))
}

/// Standard base64 (RFC 4648, padded) of little-endian f32s: the `encoding_format: "base64"`
/// rendering OpenAI clients ask for by default.
pub(crate) fn base64_f32(values: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64(&bytes, ALPHABET)
}

fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_hash_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":[true,null,"x"]}"#).expect("json");
        let b: Value = serde_json::from_str(r#"{ "b": [true, null, "x"], "a": 1 }"#).expect("json");
        assert_eq!(canonical_hash(&[&a]), canonical_hash(&[&b]));
        if let Value::Object(map) = &b {
            assert_eq!(canonical_hash_object(map), canonical_hash(&[&a]));
        }
        let c = json!({"a": 1, "b": [true, null, "y"]});
        assert_ne!(canonical_hash(&[&a]), canonical_hash(&[&c]));
        // Concatenation does not collide.
        assert_ne!(
            canonical_hash(&[&json!("ab"), &json!("c")]),
            canonical_hash(&[&json!("a"), &json!("bc")])
        );
    }

    #[test]
    fn completion_is_deterministic_and_counts_exactly() {
        for seed in 0..200u8 {
            let hash = canonical_hash(&[&json!(seed)]);
            let c = completion(&hash, 1000);
            assert_eq!(c, completion(&hash, 1000));
            assert!((MIN_NATURAL..=MAX_NATURAL).contains(&c.tokens));
            assert_eq!(count_tokens(&c.text), c.tokens);
            assert_eq!(c.finish_reason, "stop");
            assert!(
                c.text
                    .starts_with(&format!("sim:{}", hex::encode(&hash[..4])))
            );
        }
    }

    #[test]
    fn completion_is_capped() {
        let hash = canonical_hash(&[&json!("cap")]);
        let c = completion(&hash, 1);
        assert_eq!(c.tokens, 1);
        assert_eq!(c.finish_reason, "length");
        assert_eq!(count_tokens(&c.text), 1);
        let c = completion(&hash, 5);
        assert_eq!((c.tokens, c.finish_reason), (5, "length"));
        assert_eq!(count_tokens(&c.text), 5);
    }

    #[test]
    fn embedding_is_normalised() {
        let hash = canonical_hash(&[&json!("embed")]);
        let v = embedding(&hash, 64);
        assert_eq!(v.len(), 64);
        let norm: f64 = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        assert_eq!(v, embedding(&hash, 64));
    }

    #[test]
    fn base64_known_vectors() {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        assert_eq!(base64(b"", A), "");
        assert_eq!(base64(b"f", A), "Zg==");
        assert_eq!(base64(b"fo", A), "Zm8=");
        assert_eq!(base64(b"foo", A), "Zm9v");
        assert_eq!(base64(b"foobar", A), "Zm9vYmFy");
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(f32_for_json(0.1).to_string(), "0.1");
    }

    #[test]
    fn json_floats_are_the_f32s_shortest_decimals() {
        let hash = canonical_hash(&[&json!("embeddings"), &json!("m"), &json!("x")]);
        let specials = [
            0.0,
            -0.0,
            1.0,
            f32::MIN_POSITIVE,
            f32::MAX,
            1e-7,
            -3.5e-12,
            123_456.79,
        ];
        for v in embedding(&hash, 256).into_iter().chain(specials) {
            let shortest: f64 = v.to_string().parse().unwrap();
            assert_eq!(f32_for_json(v).to_bits(), shortest.to_bits(), "{v}");
        }
    }

    #[test]
    fn tokens_are_words() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("  hello,   world!\n"), 2);
    }
}
