//! The object-storage port.
//!
//! nightshift keeps file bytes (batch inputs and outputs) and executor result parts in object
//! storage. Services depend on the [`ObjectStore`] trait; binaries choose the adapter: [`S3Store`]
//! (AWS S3, Garage, Ceph RGW, R2, MinIO — path-style, custom endpoint) in production;
//! [`LocalStore`] (one file per object under a local directory) for the single-process
//! deployment and tests. Every adapter must pass the conformance suite (`conformance`, built
//! with the `testsuite` feature).
//!
//! Contract shared by all adapters:
//! - keys are relative to the store's own prefix (or root), `/`-separated, never starting
//!   with `/`; [`LocalStore`] also refuses empty, `.` and `..` segments and NUL bytes;
//! - writes are whole-object: an object appears complete or not at all (no reader ever sees a
//!   half-written object), and writing a key again replaces it;
//! - `delete` of a missing key succeeds (idempotent);
//! - memory is bounded by the adapter's configuration, never by object size: uploads are
//!   streamed through an [`ObjectUpload`], downloads come back as a byte stream.

use std::fmt;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

#[cfg(feature = "testsuite")]
pub mod conformance;
mod local;
mod s3;

pub use local::LocalStore;
pub use s3::{S3Config, S3Store};

/// Errors of the object-storage port.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object not found: {0}")]
    NotFound(String),
    /// The requested range starts past the end of the object.
    #[error("range not satisfiable for object {key} of {size} bytes")]
    InvalidRange { key: String, size: u64 },
    /// The backend failed or is unreachable. The message is for operators, not clients.
    #[error("object storage error: {0}")]
    Backend(String),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A stream of an object's bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send + 'static>>;

/// Which bytes of an object to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `start..` to the end.
    From(u64),
    /// `start..end`, `end` exclusive.
    Bounded { start: u64, end: u64 },
    /// The last `n` bytes.
    Suffix(u64),
}

impl ByteRange {
    /// The HTTP `Range` header value for this range (`bytes=…`, inclusive end).
    pub fn to_http_header(self) -> String {
        match self {
            Self::From(start) => format!("bytes={start}-"),
            Self::Bounded { start, end } => format!("bytes={start}-{}", end.saturating_sub(1)),
            Self::Suffix(n) => format!("bytes=-{n}"),
        }
    }

    /// Resolves against an object of `size` bytes: `(start, end_exclusive)`, or `None` when
    /// no byte of the object is in the range (a 416).
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        let (start, end) = match self {
            Self::From(start) => (start, size),
            Self::Bounded { start, end } => (start, end.min(size)),
            Self::Suffix(n) => (size.saturating_sub(n), size),
        };
        (start < end).then_some((start, end))
    }
}

/// Size and key of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
}

/// A (possibly ranged) read.
pub struct ObjectBody {
    /// Size of the whole object.
    pub object_size: u64,
    /// The bytes returned: `start..end` (end exclusive) of the object.
    pub start: u64,
    pub end: u64,
    pub stream: ByteStream,
}

impl ObjectBody {
    /// Number of bytes the stream yields.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the whole stream into memory. For small objects and tests only.
    pub async fn collect(self) -> Result<Bytes> {
        use futures::TryStreamExt;
        let chunks: Vec<Bytes> = self.stream.try_collect().await?;
        Ok(chunks.concat().into())
    }
}

impl fmt::Debug for ObjectBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectBody")
            .field("object_size", &self.object_size)
            .field("start", &self.start)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

/// The object-storage port.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug + 'static {
    /// Writes a whole small object in one request (result parts, tests).
    async fn put(&self, key: &str, body: Bytes) -> Result<()>;

    /// Starts a streamed write of `key`. Nothing is visible under `key` until
    /// [`ObjectUpload::finish`] succeeds; dropping the upload unfinished abandons it.
    async fn upload(&self, key: &str) -> Result<Box<dyn ObjectUpload>>;

    /// Reads an object, or a range of it. `NotFound` for a missing key, `InvalidRange` when
    /// the range holds no byte of the object.
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<ObjectBody>;

    /// The object's size, or `None` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;

    /// Deletes an object. Deleting a missing key succeeds.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Every object whose key starts with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Deletes every object under `prefix`; returns how many there were.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64>;

    /// Whether the backend answers (readiness).
    async fn ping(&self) -> Result<()>;
}

/// A streamed write in progress. Memory use is bounded by the adapter's part size.
#[async_trait]
pub trait ObjectUpload: Send {
    /// Appends bytes to the object.
    async fn write(&mut self, chunk: Bytes) -> Result<()>;
    /// Makes the object visible; returns its size.
    async fn finish(self: Box<Self>) -> Result<u64>;
    /// Abandons the write and releases what it held; nothing becomes visible.
    async fn abort(self: Box<Self>) -> Result<()>;
}
