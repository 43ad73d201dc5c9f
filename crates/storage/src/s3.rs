//! The S3 adapter: AWS S3 or any S3-compatible service (Garage, Ceph RGW, R2, MinIO).
//!
//! It sticks to the operations every one of them implements (put, ranged get, head, delete,
//! batch delete, list v2, multipart upload) and never relies on conditional writes, which
//! Garage ignores.

use std::sync::Arc;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as AwsByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::{Bytes, BytesMut};
use nightshift_core::secret::Secret;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::{ByteRange, ObjectBody, ObjectMeta, ObjectStore, ObjectUpload, Result, StorageError};

/// S3 smallest allowed part (but the last): 5 MiB.
const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// How to reach the bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL (`http://127.0.0.1:3900` for the dev Garage); unset = AWS's own.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Static credentials; when unset the AWS default chain is used (env, profile, IRSA, IMDS).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// Every key this store touches lives under this prefix (`""` = the bucket's root). Lets
    /// several deployments or test runs share one bucket.
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), which self-hosted services need.
    pub force_path_style: bool,
    /// Multipart part size in bytes (≥ 5 MiB). An upload buffers at most
    /// `part_size × (1 + upload_concurrency)` bytes.
    pub part_size: usize,
    /// Parts of one upload sent concurrently.
    pub upload_concurrency: usize,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: Some("http://127.0.0.1:3900".into()),
            region: "us-east-1".into(),
            bucket: "nightshift".into(),
            access_key_id: None,
            secret_access_key: None,
            prefix: String::new(),
            force_path_style: true,
            part_size: 8 * 1024 * 1024,
            upload_concurrency: 2,
        }
    }
}

/// [`ObjectStore`] over S3.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: Arc<str>,
    /// Normalised: empty, or ending in `/`.
    prefix: Arc<str>,
    part_size: usize,
    upload_concurrency: usize,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Builds the client. Does no I/O: reachability is [`ObjectStore::ping`]'s business.
    pub async fn new(config: &S3Config) -> Result<Self> {
        if config.part_size < MIN_PART_SIZE {
            return Err(StorageError::Backend(format!(
                "storage.part_size must be at least {MIN_PART_SIZE} bytes"
            )));
        }
        let region = Region::new(config.region.clone());
        let mut builder = match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => aws_sdk_s3::config::Builder::new()
                .behavior_version(BehaviorVersion::latest())
                .region(region)
                .credentials_provider(Credentials::new(
                    id,
                    secret.expose(),
                    None,
                    None,
                    "nightshift-config",
                )),
            _ => {
                let shared = aws_config::defaults(BehaviorVersion::latest())
                    .region(region)
                    .load()
                    .await;
                aws_sdk_s3::config::Builder::from(&shared)
            }
        };
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        // Checksums only where S3 requires them: several S3-compatible services reject the
        // SDK's newer default (trailing checksums on every upload).
        let conf = builder
            .force_path_style(config.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        let prefix = match config.prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        Ok(Self {
            client: Client::from_conf(conf),
            bucket: config.bucket.as_str().into(),
            prefix: prefix.into(),
            part_size: config.part_size,
            upload_concurrency: config.upload_concurrency.max(1),
        })
    }

    /// The same bucket seen under a further prefix (tests isolate themselves this way).
    pub fn with_prefix(&self, prefix: &str) -> Self {
        let mut me = self.clone();
        me.prefix = format!("{}{}/", self.prefix, prefix.trim_matches('/')).into();
        me
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Creates the bucket if it does not exist (dev and tests; production buckets are made by
    /// the operator).
    pub async fn ensure_bucket(&self) -> Result<()> {
        if self.ping().await.is_ok() {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&*self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(backend("create bucket", e)),
        }
    }
}

fn backend<E, R>(what: &str, err: SdkError<E, R>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let detail = match &err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            format!(
                "{}: {}",
                e.code().unwrap_or("unknown"),
                e.message().unwrap_or("")
            )
        }
        other => format!(
            "{}",
            aws_smithy_types::error::display::DisplayErrorContext(other)
        ),
    };
    StorageError::Backend(format!("{what}: {detail}"))
}

/// Parses `bytes a-b/size` into the object's total size.
fn total_from_content_range(header: &str) -> Option<u64> {
    header.rsplit('/').next()?.trim().parse().ok()
}

fn into_stream(body: AwsByteStream) -> crate::ByteStream {
    Box::pin(futures::stream::unfold(body, |mut body| async move {
        match body.next().await {
            None => None,
            Some(Ok(bytes)) => Some((Ok(bytes), body)),
            Some(Err(e)) => Some((Err(StorageError::Backend(format!("read body: {e}"))), body)),
        }
    }))
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        self.client
            .put_object()
            .bucket(&*self.bucket)
            .key(self.full_key(key))
            .body(AwsByteStream::from(body))
            .send()
            .await
            .map_err(|e| backend("put object", e))?;
        Ok(())
    }

    async fn upload(&self, key: &str) -> Result<Box<dyn ObjectUpload>> {
        Ok(Box::new(S3Upload {
            store: self.clone(),
            key: self.full_key(key),
            buf: BytesMut::new(),
            upload_id: None,
            next_part: 1,
            in_flight: JoinSet::new(),
            parts: Vec::new(),
            size: 0,
            done: false,
        }))
    }

    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<ObjectBody> {
        let mut req = self
            .client
            .get_object()
            .bucket(&*self.bucket)
            .key(self.full_key(key));
        if let Some(r) = range {
            req = req.range(r.to_http_header());
        }
        let out = match req.send().await {
            Ok(out) => out,
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                if let SdkError::ServiceError(se) = &e
                    && se.err().is_no_such_key()
                {
                    return Err(StorageError::NotFound(key.to_owned()));
                }
                return Err(match status {
                    Some(404) => StorageError::NotFound(key.to_owned()),
                    Some(416) => {
                        let size = self.head(key).await?.map(|m| m.size).unwrap_or(0);
                        StorageError::InvalidRange {
                            key: key.to_owned(),
                            size,
                        }
                    }
                    _ => backend("get object", e),
                });
            }
        };
        let len = u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0);
        let (object_size, start) = match (range, out.content_range()) {
            (Some(_), Some(cr)) => {
                let total = total_from_content_range(cr).ok_or_else(|| {
                    StorageError::Backend(format!("unparsable Content-Range {cr:?}"))
                })?;
                let start = cr
                    .trim_start_matches("bytes ")
                    .split('-')
                    .next()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                (total, start)
            }
            _ => (len, 0),
        };
        Ok(ObjectBody {
            object_size,
            start,
            end: start + len,
            stream: into_stream(out.body),
        })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        match self
            .client
            .head_object()
            .bucket(&*self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                size: u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0),
            })),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(backend("head object", e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&*self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| backend("delete object", e))?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let full_prefix = self.full_key(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&*self.bucket)
                .prefix(&full_prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| backend("list objects", e))?;
            for obj in page.contents() {
                if let Some(k) = obj.key() {
                    out.push(ObjectMeta {
                        key: k.strip_prefix(&*self.prefix).unwrap_or(k).to_owned(),
                        size: u64::try_from(obj.size().unwrap_or(0)).unwrap_or(0),
                    });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated().unwrap_or(false) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let objects = self.list(prefix).await?;
        let count = objects.len() as u64;
        for batch in objects.chunks(1000) {
            let ids = batch
                .iter()
                .map(|o| {
                    ObjectIdentifier::builder()
                        .key(self.full_key(&o.key))
                        .build()
                        .map_err(|e| StorageError::Backend(format!("delete request: {e}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| StorageError::Backend(format!("delete request: {e}")))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&*self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| backend("delete objects", e))?;
            if let Some(err) = out.errors().first() {
                return Err(StorageError::Backend(format!(
                    "delete objects: {} {}",
                    err.key().unwrap_or(""),
                    err.message().unwrap_or("")
                )));
            }
        }
        Ok(count)
    }

    async fn ping(&self) -> Result<()> {
        self.client
            .head_bucket()
            .bucket(&*self.bucket)
            .send()
            .await
            .map_err(|e| backend("head bucket", e))?;
        Ok(())
    }
}

/// A streamed upload: a single PUT when the object fits in one part, a multipart upload
/// otherwise, with up to `upload_concurrency` parts in flight.
struct S3Upload {
    store: S3Store,
    /// Full key (store prefix included).
    key: String,
    /// Bytes not yet sent (< part_size, but for the moment a write lands).
    buf: BytesMut,
    /// Set once the multipart upload has been created (on the first full part).
    upload_id: Option<String>,
    next_part: i32,
    /// Part uploads under way; each yields its completed part.
    in_flight: JoinSet<Result<CompletedPart>>,
    parts: Vec<CompletedPart>,
    size: u64,
    /// Finished or aborted: nothing to clean up on drop.
    done: bool,
}

impl S3Upload {
    async fn send_part(&mut self, body: Bytes) -> Result<()> {
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let out = self
                    .store
                    .client
                    .create_multipart_upload()
                    .bucket(&*self.store.bucket)
                    .key(&self.key)
                    .send()
                    .await
                    .map_err(|e| backend("create multipart upload", e))?;
                let id = out
                    .upload_id()
                    .ok_or_else(|| StorageError::Backend("no upload id returned".into()))?
                    .to_owned();
                self.upload_id = Some(id.clone());
                id
            }
        };
        while self.in_flight.len() >= self.store.upload_concurrency {
            self.join_one().await?;
        }
        let number = self.next_part;
        self.next_part += 1;
        let client = self.store.client.clone();
        let bucket = self.store.bucket.clone();
        let key = self.key.clone();
        self.in_flight.spawn(async move {
            let out = client
                .upload_part()
                .bucket(&*bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(AwsByteStream::from(body))
                .send()
                .await
                .map_err(|e| backend("upload part", e))?;
            // ETag only: copying a part checksum into the completion list makes some services
            // (Garage) reject the upload when it was created without a checksum algorithm.
            Ok(CompletedPart::builder()
                .set_e_tag(out.e_tag().map(str::to_owned))
                .part_number(number)
                .build())
        });
        Ok(())
    }

    async fn join_one(&mut self) -> Result<()> {
        if let Some(joined) = self.in_flight.join_next().await {
            let part = joined.map_err(|e| StorageError::Backend(format!("part task: {e}")))??;
            self.parts.push(part);
        }
        Ok(())
    }

    async fn abort_remote(&mut self) -> Result<()> {
        self.done = true;
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        if let Some(id) = self.upload_id.take() {
            self.store
                .client
                .abort_multipart_upload()
                .bucket(&*self.store.bucket)
                .key(&self.key)
                .upload_id(id)
                .send()
                .await
                .map_err(|e| backend("abort multipart upload", e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectUpload for S3Upload {
    async fn write(&mut self, mut chunk: Bytes) -> Result<()> {
        self.size += chunk.len() as u64;
        let part_size = self.store.part_size;
        while !chunk.is_empty() {
            // Each part gets a buffer of exactly `part_size`: growing one buffer by doubling
            // and splitting parts off it would pin up to twice the part size per part in
            // flight.
            if self.buf.is_empty() && self.buf.capacity() < part_size {
                self.buf = BytesMut::with_capacity(part_size);
            }
            let take = (part_size - self.buf.len()).min(chunk.len());
            self.buf.extend_from_slice(&chunk.split_to(take));
            if self.buf.len() == part_size {
                let part = std::mem::take(&mut self.buf).freeze();
                if let Err(e) = self.send_part(part).await {
                    let _ = self.abort_remote().await;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64> {
        if self.upload_id.is_none() {
            let body = std::mem::take(&mut self.buf).freeze();
            self.done = true;
            self.store
                .client
                .put_object()
                .bucket(&*self.store.bucket)
                .key(&self.key)
                .body(AwsByteStream::from(body))
                .send()
                .await
                .map_err(|e| backend("put object", e))?;
            return Ok(self.size);
        }
        let result: Result<()> = async {
            if !self.buf.is_empty() {
                let last = std::mem::take(&mut self.buf).freeze();
                self.send_part(last).await?;
            }
            while !self.in_flight.is_empty() {
                self.join_one().await?;
            }
            let mut parts = std::mem::take(&mut self.parts);
            parts.sort_by_key(|p| p.part_number());
            let upload_id = self.upload_id.clone().unwrap_or_default();
            self.store
                .client
                .complete_multipart_upload()
                .bucket(&*self.store.bucket)
                .key(&self.key)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| backend("complete multipart upload", e))?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                self.done = true;
                Ok(self.size)
            }
            Err(e) => {
                let _ = self.abort_remote().await;
                Err(e)
            }
        }
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.abort_remote().await
    }
}

impl Drop for S3Upload {
    /// An upload dropped half-way (the client hung up, the handler was cancelled) must not
    /// leave a multipart upload holding storage: abort it in the background.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.in_flight.abort_all();
        if let (Some(id), Ok(rt)) = (self.upload_id.take(), tokio::runtime::Handle::try_current()) {
            let client = self.store.client.clone();
            let bucket = self.store.bucket.clone();
            let key = std::mem::take(&mut self.key);
            rt.spawn(async move {
                if let Err(e) = client
                    .abort_multipart_upload()
                    .bucket(&*bucket)
                    .key(&key)
                    .upload_id(id)
                    .send()
                    .await
                {
                    tracing::warn!(key = %key, error = %e, "could not abort an abandoned multipart upload");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_total() {
        assert_eq!(total_from_content_range("bytes 0-99/1000"), Some(1000));
        assert_eq!(total_from_content_range("bytes */1000"), Some(1000));
        assert_eq!(total_from_content_range("garbage"), None);
    }
}
