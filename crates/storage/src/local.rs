//! The local-directory adapter, for the single-process deployment (`nightshift standalone`)
//! and for tests: one file per object under a root directory.
//!
//! Layout under the root:
//! - the object `a/b/c` is the file `{root}/a/b/c`; directories are created on write and
//!   removed by `delete` and `delete_prefix` once empty;
//! - `{root}/.nightshift-tmp/` holds writes in progress and is never listed (a key may not
//!   start with it). Each open [`LocalStore`] writes into its own scratch directory
//!   `.nightshift-tmp/{id}/` and holds an exclusive lock on `.nightshift-tmp/{id}.lock` for as
//!   long as it lives; `.nightshift-tmp/open.lock` serialises opens.
//!
//! Durability and atomicity: a write (`put`, or an upload's `finish`) goes to a temporary file
//! in the scratch directory, which is fsynced, renamed to its key, and the directory it landed
//! in is fsynced (as is the parent of every directory the write had to create). A reader sees
//! the old object or the new one, never part of one, and once the write returned `Ok` the
//! object survives a crash of the process or of the machine. A crash mid-write leaves only a
//! temporary file, which the next [`LocalStore::open`] of the root removes: it deletes every
//! scratch directory whose lock no live store holds. Several stores (even in several
//! processes) may share a root. Deletes fsync the directory they changed too.
//!
//! Every filesystem call runs on tokio's blocking pool (directly, or through `tokio::fs`), and
//! downloads are streamed from the file in 64 KiB chunks.
//!
//! Unlike S3, a filesystem cannot hold both `a` and `a/b`: writing one while the other exists
//! fails with [`StorageError::Backend`]. nightshift's keys (`files/{id}`,
//! `batches/{id}/parts/{n}.jsonl`, …) never collide that way.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use crate::{ByteRange, ObjectBody, ObjectMeta, ObjectStore, ObjectUpload, Result, StorageError};

/// The directory of writes in progress, under the root. No key may start with it.
const TMP_DIR: &str = ".nightshift-tmp";
/// Held (exclusively, briefly) by every open while it cleans up and registers itself.
const OPEN_LOCK: &str = "open.lock";
/// Suffix of a store's lock file, next to its scratch directory.
const LOCK_SUFFIX: &str = ".lock";
/// Size of the chunks a download yields.
const READ_CHUNK: usize = 64 * 1024;
/// How many times a write tries to move its file into place when a concurrent delete keeps
/// pruning the (empty) directory it has just created.
const COMMIT_ATTEMPTS: usize = 8;

/// [`ObjectStore`] on a local directory. Cheap to clone (clones share one scratch directory).
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where the objects live.
    root: PathBuf,
    /// This store's temporary files: `{root}/.nightshift-tmp/{id}`.
    scratch: PathBuf,
    /// `{scratch}.lock`, exclusively locked while this store lives: tells a later `open` that
    /// the scratch directory is in use. Released when the process dies, however it dies.
    _lock: File,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

impl LocalStore {
    /// Opens the store rooted at `root`, creating the directory if needed, and removes the
    /// temporary files of writes that a crashed process left behind.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let inner = blocking(move || Inner::open(root)).await?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The file of `key`, once the key is known not to escape the root.
    fn path_of(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.inner.root.join(key))
    }
}

impl Inner {
    fn open(root: PathBuf) -> Result<Self> {
        fs::create_dir_all(&root).map_err(io_error("create the storage root", &root))?;
        let tmp = root.join(TMP_DIR);
        fs::create_dir_all(&tmp).map_err(io_error("create", &tmp))?;
        let open_lock_path = tmp.join(OPEN_LOCK);
        let open_lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&open_lock_path)
            .map_err(io_error("open", &open_lock_path))?;
        // Another open cleaning up now could otherwise take our lock file, created but not yet
        // locked, for a dead store's.
        open_lock
            .lock()
            .map_err(io_error("lock", &open_lock_path))?;
        remove_dead_scratch(&tmp)?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let lock_path = tmp.join(format!("{id}{LOCK_SUFFIX}"));
        let lock = File::create_new(&lock_path).map_err(io_error("create", &lock_path))?;
        lock.try_lock()
            .map_err(|e| StorageError::Backend(format!("lock {}: {e}", lock_path.display())))?;
        let scratch = tmp.join(&id);
        fs::create_dir(&scratch).map_err(io_error("create", &scratch))?;
        drop(open_lock);
        Ok(Self {
            root,
            scratch,
            _lock: lock,
        })
    }

    /// A fresh temporary file name in the scratch directory.
    fn temp_path(&self) -> PathBuf {
        self.scratch.join(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Moves a complete, fsynced temporary file to `dest` and makes that durable.
    fn commit(&self, temp: &Path, dest: &Path) -> Result<()> {
        let parent = dest.parent().unwrap_or(&self.root);
        let mut attempt = 1;
        loop {
            self.create_dirs(parent)?;
            match fs::rename(temp, dest) {
                Ok(()) => break,
                // A concurrent delete pruned the directory we just made: make it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < COMMIT_ATTEMPTS => {
                    attempt += 1;
                }
                Err(e) => return Err(io_error("move into place", dest)(e)),
            }
        }
        sync_dir(parent)
    }

    /// Creates `dir` (under the root) and its missing ancestors, fsyncing the parent of each
    /// directory created so that the new entry survives a crash.
    fn create_dirs(&self, dir: &Path) -> Result<()> {
        let relative = dir.strip_prefix(&self.root).map_err(|_| {
            StorageError::Backend(format!("{} is outside the storage root", dir.display()))
        })?;
        let mut current = self.root.clone();
        for part in relative.components() {
            let parent = current.clone();
            current.push(part);
            match fs::create_dir(&current) {
                Ok(()) => sync_dir(&parent)?,
                // A file there makes the next step (or the rename) fail with a clear error.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(StorageError::Backend(format!(
                        "create {}: {e} (is a prefix of the key an object?)",
                        current.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Removes `dir` and then its ancestors while they are empty, never the root; returns the
    /// deepest directory kept, whose entries changed.
    fn prune(&self, mut dir: PathBuf) -> PathBuf {
        while dir != self.root && dir.starts_with(&self.root) {
            // Not empty (or already gone): keep it and everything above.
            if fs::remove_dir(&dir).is_err() {
                break;
            }
            dir.pop();
        }
        dir
    }

    /// Every object whose key starts with `prefix` (string prefix, like S3: `a/b` matches
    /// `a/bc/d`), and the directories whose whole contents are under `prefix`.
    fn walk(&self, prefix: &str) -> Result<Walk> {
        let dir_key = match prefix.rfind('/') {
            Some(end) => &prefix[..end],
            None => "",
        };
        let valid = !prefix.contains('\0')
            && !prefix.starts_with('/')
            && (dir_key.is_empty() || check_key(dir_key).is_ok());
        if !valid {
            return Err(StorageError::Backend(format!(
                "invalid object key prefix {prefix:?}"
            )));
        }
        let mut walk = Walk::default();
        let mut pending = vec![(self.root.join(dir_key), dir_key.to_owned())];
        while let Some((dir, dir_key)) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(io_error("list", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_error("list", &dir))?;
                // Not a name we wrote: no key maps to it.
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if dir_key.is_empty() && name == TMP_DIR {
                    continue;
                }
                let key = if dir_key.is_empty() {
                    name
                } else {
                    format!("{dir_key}/{name}")
                };
                let file_type = entry.file_type().map_err(io_error("list", &entry.path()))?;
                if file_type.is_dir() {
                    let as_prefix = format!("{key}/");
                    if as_prefix.starts_with(prefix) {
                        walk.dirs.push(entry.path());
                        pending.push((entry.path(), key));
                    } else if prefix.starts_with(&as_prefix) {
                        pending.push((entry.path(), key));
                    }
                } else if file_type.is_file() && key.starts_with(prefix) {
                    let size = match entry.metadata() {
                        Ok(meta) => meta.len(),
                        // deleted while we listed
                        Err(e) if is_missing(&e) => continue,
                        Err(e) => return Err(io_error("stat", &entry.path())(e)),
                    };
                    walk.objects.push((ObjectMeta { key, size }, entry.path()));
                }
            }
        }
        walk.objects.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        Ok(walk)
    }
}

/// What [`Inner::walk`] found.
#[derive(Default)]
struct Walk {
    /// The objects, in key order, with their files.
    objects: Vec<(ObjectMeta, PathBuf)>,
    /// Directories entirely under the prefix (emptied by deleting the prefix).
    dirs: Vec<PathBuf>,
}

/// Removes the scratch directories (and stray files) of stores that are gone: a lock file
/// that can be locked belongs to no live store. Called under the open lock.
fn remove_dead_scratch(tmp: &Path) -> Result<()> {
    let entries = fs::read_dir(tmp).map_err(io_error("list", tmp))?;
    for entry in entries {
        let entry = entry.map_err(io_error("list", tmp))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == OPEN_LOCK {
            continue;
        }
        if let Some(id) = name.strip_suffix(LOCK_SUFFIX) {
            let lock = File::open(&path).map_err(io_error("open", &path))?;
            match lock.try_lock() {
                Ok(()) => {
                    let scratch = tmp.join(id);
                    tracing::info!(path = %scratch.display(), "removing the temporary files of a store that is gone");
                    remove_all(&scratch)?;
                    remove_all(&path)?;
                }
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(e)) => return Err(io_error("lock", &path)(e)),
            }
        } else if !tmp.join(format!("{name}{LOCK_SUFFIX}")).exists() {
            // A lock file is always made before its directory and removed after it: this is
            // left over from an interrupted clean-up.
            remove_all(&path)?;
        }
    }
    Ok(())
}

/// Removes a file or a directory tree; a missing one is fine.
fn remove_all(path: &Path) -> Result<()> {
    let removed = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if !is_missing(&e) => Err(io_error("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Refuses keys that are not a plain relative path under the root.
fn check_key(key: &str) -> Result<()> {
    let segments = || key.split('/');
    let why = if key.is_empty() {
        "it is empty"
    } else if key.contains('\0') {
        "it contains a NUL byte"
    } else if key.starts_with('/') {
        "it is absolute"
    } else if segments().any(str::is_empty) {
        "it has an empty segment"
    } else if segments().any(|s| s == "." || s == "..") {
        "it has a `.` or `..` segment"
    } else if segments().next() == Some(TMP_DIR) {
        "its first segment is reserved for temporary files"
    } else {
        return Ok(());
    };
    Err(StorageError::Backend(format!(
        "invalid object key {key:?}: {why}"
    )))
}

/// Not there: the path, or one of its ancestors, is missing or not a directory.
fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn io_error(what: &str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let context = format!("{what} {}", path.display());
    move |e| StorageError::Backend(format!("{context}: {e}"))
}

/// Makes the entries of `dir` (a file renamed or removed there) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync", dir))
}

/// Runs blocking filesystem work off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StorageError::Backend(format!("filesystem task: {e}")))?
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        let dest = self.path_of(key)?;
        let inner = self.inner.clone();
        blocking(move || {
            let temp = inner.temp_path();
            let written = File::create_new(&temp)
                .and_then(|mut file| {
                    file.write_all(&body)?;
                    file.sync_all()
                })
                .map_err(io_error("write", &temp))
                .and_then(|()| inner.commit(&temp, &dest));
            if written.is_err() {
                let _ = fs::remove_file(&temp);
            }
            written
        })
        .await
    }

    async fn upload(&self, key: &str) -> Result<Box<dyn ObjectUpload>> {
        let dest = self.path_of(key)?;
        let temp = self.inner.temp_path();
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .await
            .map_err(io_error("create", &temp))?;
        Ok(Box::new(LocalUpload {
            store: self.clone(),
            dest,
            temp,
            file: Some(file),
            size: 0,
            done: false,
        }))
    }

    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<ObjectBody> {
        let path = self.path_of(key)?;
        let not_found = || StorageError::NotFound(key.to_owned());
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if is_missing(&e) => return Err(not_found()),
            Err(e) => return Err(io_error("open", &path)(e)),
        };
        let meta = file.metadata().await.map_err(io_error("stat", &path))?;
        if !meta.is_file() {
            return Err(not_found());
        }
        let object_size = meta.len();
        let (start, end) = match range {
            None => (0, object_size),
            Some(range) => {
                range
                    .resolve(object_size)
                    .ok_or_else(|| StorageError::InvalidRange {
                        key: key.to_owned(),
                        size: object_size,
                    })?
            }
        };
        if start > 0 {
            file.seek(SeekFrom::Start(start))
                .await
                .map_err(io_error("seek", &path))?;
        }
        // The file is never written in place (writes rename a new file over it), so the open
        // handle reads one consistent version to the end.
        let stream = ReaderStream::with_capacity(file.take(end - start), READ_CHUNK)
            .map_err(move |e| StorageError::Backend(format!("read {}: {e}", path.display())));
        Ok(ObjectBody {
            object_size,
            start,
            end,
            stream: Box::pin(stream),
        })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path_of(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                size: meta.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(io_error("stat", &path)(e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        let inner = self.inner.clone();
        blocking(move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                // no such object (a directory is not one)
                Err(e) if is_missing(&e) || e.kind() == io::ErrorKind::IsADirectory => {
                    return Ok(());
                }
                Err(e) => return Err(io_error("remove", &path)(e)),
            }
            let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
            sync_if_present(&inner.prune(parent))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let inner = self.inner.clone();
        let prefix = prefix.to_owned();
        let walk = blocking(move || inner.walk(&prefix)).await?;
        Ok(walk.objects.into_iter().map(|(meta, _)| meta).collect())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let inner = self.inner.clone();
        let prefix = prefix.to_owned();
        blocking(move || {
            let walk = inner.walk(&prefix)?;
            let mut removed = 0;
            let mut changed: BTreeSet<PathBuf> = walk.dirs.into_iter().collect();
            for (_, path) in walk.objects {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if is_missing(&e) => continue,
                    Err(e) => return Err(io_error("remove", &path)(e)),
                }
                if let Some(parent) = path.parent() {
                    changed.insert(parent.to_path_buf());
                }
            }
            // Deepest first, so a directory has lost its empty subdirectories when it is tried.
            let kept: BTreeSet<PathBuf> = changed
                .into_iter()
                .rev()
                .map(|dir| inner.prune(dir))
                .collect();
            for dir in kept {
                sync_if_present(&dir)?;
            }
            Ok(removed)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        let inner = self.inner.clone();
        blocking(move || {
            // Writable, on a filesystem that answers: write and remove a probe file.
            let probe = inner.temp_path();
            let written = File::create_new(&probe).and_then(|mut file| file.write_all(b"ping"));
            let removed = fs::remove_file(&probe);
            written
                .and(removed)
                .map_err(io_error("write a probe file in", &inner.scratch))
        })
        .await
    }
}

/// [`sync_dir`], unless a concurrent delete has just removed the directory.
fn sync_if_present(dir: &Path) -> Result<()> {
    match File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if !is_missing(&e) => Err(io_error("sync", dir)(e)),
        _ => Ok(()),
    }
}

/// A streamed write into a temporary file, renamed to its key by `finish`.
struct LocalUpload {
    /// Keeps the scratch directory (and its lock) alive.
    store: LocalStore,
    /// The object's file.
    dest: PathBuf,
    /// Where the bytes go until `finish`.
    temp: PathBuf,
    /// `None` once `finish` or `abort` took it.
    file: Option<tokio::fs::File>,
    size: u64,
    /// Finished or aborted: the temporary file is gone (renamed or removed).
    done: bool,
}

impl LocalUpload {
    fn file(&mut self) -> Result<&mut tokio::fs::File> {
        self.file
            .as_mut()
            .ok_or_else(|| StorageError::Backend("upload already failed".into()))
    }
}

#[async_trait]
impl ObjectUpload for LocalUpload {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        let temp = self.temp.clone();
        self.file()?
            .write_all(&chunk)
            .await
            .map_err(io_error("write", &temp))?;
        self.size += chunk.len() as u64;
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| StorageError::Backend("upload already failed".into()))?;
        // tokio writes in the background: flush to see every write's error, then fsync.
        file.flush().await.map_err(io_error("write", &self.temp))?;
        file.sync_all()
            .await
            .map_err(io_error("sync", &self.temp))?;
        drop(file);
        let inner = self.store.inner.clone();
        let (temp, dest) = (self.temp.clone(), self.dest.clone());
        // On error the temporary file, if still there, is removed by `drop`.
        blocking(move || inner.commit(&temp, &dest)).await?;
        self.done = true;
        Ok(self.size)
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.done = true;
        drop(self.file.take());
        match tokio::fs::remove_file(&self.temp).await {
            Err(e) if !is_missing(&e) => Err(io_error("remove", &self.temp)(e)),
            _ => Ok(()),
        }
    }
}

impl Drop for LocalUpload {
    /// An upload dropped half-way (the client hung up, the handler was cancelled) removes its
    /// temporary file, off the async runtime when there is one.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        drop(self.file.take());
        let temp = std::mem::take(&mut self.temp);
        let remove = move || {
            if let Err(e) = fs::remove_file(&temp)
                && !is_missing(&e)
            {
                tracing::warn!(path = %temp.display(), error = %e, "could not remove an abandoned upload");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_could_escape_the_root_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "../x",
            "a/../../x",
            "a/./b",
            ".",
            "a//b",
            "a/",
            "a\0b",
            ".nightshift-tmp/x",
            ".nightshift-tmp",
        ] {
            assert!(
                matches!(check_key(bad), Err(StorageError::Backend(_))),
                "{bad:?} accepted"
            );
        }
        for good in [
            "a",
            "files/file-abc",
            "batches/b/parts/00000001.jsonl",
            "..a",
            "a..",
            ".hidden",
            "a/.nightshift-tmp",
            "sp ace/ünï",
        ] {
            check_key(good).unwrap_or_else(|e| panic!("{good:?} refused: {e}"));
        }
    }
}
