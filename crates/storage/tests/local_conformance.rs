//! The object-storage conformance suite against the local-directory adapter, a fresh root per
//! check; then what the adapter does beyond the suite: keys that would escape the root,
//! temporary files of crashed writes, directories, reopening.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use nightshift_storage::conformance::pattern;
use nightshift_storage::{LocalStore, ObjectStore, StorageError};

/// The adapter's directory of writes in progress (see the `local` module docs).
const TMP_DIR: &str = ".nightshift-tmp";

async fn run(name: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LocalStore::open(dir.path()).await.expect("open");
    nightshift_storage::conformance::run(name, &store).await;
}

nightshift_storage::conformance_tests!(run);

/// Every file (not directory) under `dir`, recursively, relative to it, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path.strip_prefix(dir).expect("under dir").to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// Temporary files of writes: everything under the temporary directory but the lock files.
fn temp_files(root: &Path) -> Vec<PathBuf> {
    files_under(&root.join(TMP_DIR))
        .into_iter()
        .filter(|p| p.extension().is_none_or(|e| e != "lock"))
        .collect()
}

/// Polls `condition` until it holds; panics after a deadline.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn keys_that_could_escape_the_root_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("store");
    let store = LocalStore::open(&root).await.expect("open");
    std::fs::write(dir.path().join("outside"), b"secret").expect("write outside");
    for key in [
        "../outside",
        "a/../../outside",
        "/etc/passwd",
        "",
        "a//b",
        "a/./b",
        "trailing/",
        "nul\0byte",
        ".nightshift-tmp/x",
    ] {
        let refused = |r: Result<(), StorageError>, op: &str| {
            assert!(
                matches!(r, Err(StorageError::Backend(_))),
                "{op} {key:?}: expected a refusal, got {r:?}"
            );
        };
        refused(store.put(key, Bytes::from_static(b"x")).await, "put");
        refused(store.upload(key).await.map(drop), "upload");
        refused(store.get(key, None).await.map(drop), "get");
        refused(store.head(key).await.map(drop), "head");
        refused(store.delete(key).await, "delete");
    }
    for prefix in ["../", "a/../../", "/etc/", "a//"] {
        assert!(
            matches!(store.list(prefix).await, Err(StorageError::Backend(_))),
            "list {prefix:?}"
        );
        assert!(
            matches!(
                store.delete_prefix(prefix).await,
                Err(StorageError::Backend(_))
            ),
            "delete_prefix {prefix:?}"
        );
    }
    assert_eq!(
        std::fs::read(dir.path().join("outside")).expect("still there"),
        b"secret"
    );
    assert_eq!(
        files_under(dir.path()).len(),
        1 + 2,
        "outside + two lock files"
    );
    assert!(temp_files(&root).is_empty());
}

#[tokio::test]
async fn temporary_files_of_a_crashed_store_are_removed_at_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let live = LocalStore::open(root).await.expect("open");
    let mut in_flight = live.upload("kept/while-writing").await.expect("upload");
    in_flight.write(pattern(100_000, 9)).await.expect("write");

    // What a process killed mid-write leaves: its scratch directory with a partial file and
    // its lock file (no longer locked by anyone), and a stray file from an interrupted
    // clean-up.
    let tmp = root.join(TMP_DIR);
    std::fs::create_dir(tmp.join("dead")).expect("scratch");
    std::fs::write(tmp.join("dead/partial"), pattern(5000, 1)).expect("partial");
    std::fs::write(tmp.join("dead.lock"), b"").expect("lock file");
    std::fs::write(tmp.join("stray"), b"x").expect("stray");
    assert_eq!(
        temp_files(root).len(),
        2 + 1,
        "two left over, one in flight"
    );

    let reopened = LocalStore::open(root).await.expect("reopen");
    assert_eq!(
        temp_files(root).len(),
        1,
        "only the live store's write is left"
    );
    assert!(!tmp.join("dead").exists() && !tmp.join("dead.lock").exists());
    assert!(reopened.list("").await.expect("list").is_empty());

    // The live store's write was not disturbed.
    assert_eq!(in_flight.finish().await.expect("finish"), 100_000);
    let body = reopened
        .get("kept/while-writing", None)
        .await
        .expect("get")
        .collect()
        .await
        .expect("read");
    assert_eq!(body, pattern(100_000, 9));
    assert!(temp_files(root).is_empty());
}

#[tokio::test]
async fn an_aborted_upload_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let store = LocalStore::open(root).await.expect("open");

    let mut aborted = store.upload("a/aborted").await.expect("upload");
    aborted.write(pattern(1 << 20, 2)).await.expect("write");
    assert_eq!(temp_files(root).len(), 1);
    aborted.abort().await.expect("abort");
    assert!(temp_files(root).is_empty());

    let mut dropped = store.upload("a/dropped").await.expect("upload");
    dropped.write(pattern(1 << 20, 3)).await.expect("write");
    drop(dropped);
    eventually("the dropped upload's file is removed", || {
        temp_files(root).is_empty()
    })
    .await;

    // A finish that fails (a prefix of the key is an object) leaves nothing either.
    store
        .put("file", Bytes::from_static(b"f"))
        .await
        .expect("put");
    let mut failed = store.upload("file/under").await.expect("upload");
    failed.write(pattern(10, 4)).await.expect("write");
    assert!(matches!(
        failed.finish().await,
        Err(StorageError::Backend(_))
    ));
    eventually("the failed upload's file is removed", || {
        temp_files(root).is_empty()
    })
    .await;
    assert!(store.list("a").await.expect("list").is_empty());
    assert_eq!(
        files_under(root).len(),
        1 + 2,
        "the object and two lock files"
    );
}

#[tokio::test]
async fn objects_are_plain_files_and_survive_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let store = LocalStore::open(root).await.expect("open");
    store
        .put(
            "batches/b1/parts/00000001.jsonl",
            Bytes::from_static(b"{}\n"),
        )
        .await
        .expect("put");
    let mut up = store.upload("files/f1").await.expect("upload");
    up.write(Bytes::from_static(b"line\n"))
        .await
        .expect("write");
    up.finish().await.expect("finish");
    drop(store);

    assert_eq!(
        std::fs::read(root.join("batches/b1/parts/00000001.jsonl")).expect("file"),
        b"{}\n"
    );
    let store = LocalStore::open(root).await.expect("reopen");
    let keys: Vec<_> = store
        .list("")
        .await
        .expect("list")
        .into_iter()
        .map(|m| (m.key, m.size))
        .collect();
    assert_eq!(
        keys,
        [
            ("batches/b1/parts/00000001.jsonl".to_owned(), 3),
            ("files/f1".to_owned(), 5)
        ]
    );
}

#[tokio::test]
async fn list_matches_string_prefixes_not_directories() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LocalStore::open(dir.path()).await.expect("open");
    for key in ["a/b", "a/bc/d", "a/c", "ab", "b"] {
        store.put(key, Bytes::from_static(b"x")).await.expect("put");
    }
    let keys = |metas: Vec<nightshift_storage::ObjectMeta>| {
        metas.into_iter().map(|m| m.key).collect::<Vec<_>>()
    };
    assert_eq!(
        keys(store.list("a/b").await.expect("list")),
        ["a/b", "a/bc/d"]
    );
    assert_eq!(
        keys(store.list("a").await.expect("list")),
        ["a/b", "a/bc/d", "a/c", "ab"]
    );
    assert_eq!(keys(store.list("a/").await.expect("list")).len(), 3);
    assert_eq!(keys(store.list("").await.expect("list")).len(), 5);
    assert!(store.list("zzz/").await.expect("list").is_empty());
}

#[tokio::test]
async fn a_key_cannot_be_both_an_object_and_a_prefix_of_objects() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LocalStore::open(dir.path()).await.expect("open");
    store
        .put("a/b", Bytes::from_static(b"x"))
        .await
        .expect("put");
    assert!(matches!(
        store.put("a", Bytes::from_static(b"y")).await,
        Err(StorageError::Backend(_))
    ));
    assert!(matches!(
        store.put("a/b/c", Bytes::from_static(b"y")).await,
        Err(StorageError::Backend(_))
    ));
    // a directory is not an object
    assert!(store.head("a").await.expect("head").is_none());
    assert!(matches!(
        store.get("a", None).await,
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        store.get("a/b/c", None).await,
        Err(StorageError::NotFound(_))
    ));
    store
        .delete("a")
        .await
        .expect("deleting a directory's key is a no-op");
    assert_eq!(
        store.head("a/b").await.expect("head").map(|m| m.size),
        Some(1)
    );
}

#[tokio::test]
async fn deleting_removes_emptied_directories() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let store = LocalStore::open(root).await.expect("open");
    for key in ["x/y/z/1", "x/y/2", "x/yy/3", "x/keep"] {
        store.put(key, Bytes::from_static(b"x")).await.expect("put");
    }
    assert_eq!(store.delete_prefix("x/y").await.expect("delete prefix"), 3);
    assert!(!root.join("x/y").exists() && !root.join("x/yy").exists());
    assert!(root.join("x/keep").is_file());
    store.delete("x/keep").await.expect("delete");
    assert!(!root.join("x").exists());
    assert!(root.is_dir(), "the root stays");
    assert!(store.list("").await.expect("list").is_empty());
    // writing again recreates what it needs
    store.put("x/y/again", Bytes::new()).await.expect("put");
    assert_eq!(store.delete_prefix("").await.expect("delete all"), 1);
    assert!(!root.join("x").exists());
    store.ping().await.expect("ping");
}
