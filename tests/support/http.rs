//! Plain HTTP calls the end-to-end tests share, for the cases the SDK cannot express (a
//! chosen filename, an exact status, a raw answer).

use reqwest::{Client, StatusCode};
use serde_json::Value;

/// The multipart boundary of [`upload_batch_file`]'s forms.
const BOUNDARY: &str = "nightshift-e2e-boundary";

/// Uploads `content` as a `batch` file named `filename` through `POST /v1/files`, with a
/// hand-built multipart form (the bytes go as they are: no trailing newline is added);
/// returns the status and the JSON answer, a file object or an error envelope.
pub async fn upload_batch_file(
    client: &Client,
    origin: &str,
    key: &str,
    filename: &str,
    content: &[u8],
) -> (StatusCode, Value) {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: application/jsonl\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    let resp = client
        .post(format!("{origin}/v1/files"))
        .bearer_auth(key)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await
        .expect("upload");
    let status = resp.status();
    let text = resp.text().await.expect("upload answer");
    let answer = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {e}: {text}"));
    (status, answer)
}

/// Uploads `content` as a `batch` file (see [`upload_batch_file`]) that must be accepted;
/// returns its id.
pub async fn upload_batch_file_id(
    client: &Client,
    origin: &str,
    key: &str,
    content: &[u8],
) -> String {
    let (status, file) = upload_batch_file(client, origin, key, "in.jsonl", content).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    file["id"].as_str().expect("file id").to_owned()
}
