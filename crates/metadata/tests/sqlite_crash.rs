//! A committed transaction of the SQLite adapter survives `kill -9` of its process, with either
//! `synchronous` setting.
//!
//! The test runs itself again as a child process (this test binary, filtered to the same
//! test), which commits and says so on stdout, then waits forever; the parent kills it with
//! SIGKILL — no shutdown, no destructors, the WAL not checkpointed — and reopens the file.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nightshift_core::apikey;
use nightshift_metadata::{MetadataStore, SqliteConfig, SqliteStore, SqliteSync};

/// Set in the child: the database file it writes to.
const CHILD_DB: &str = "NIGHTSHIFT_TEST_SQLITE_CHILD_DB";
/// What the child prints once its transaction has committed.
const COMMITTED: &str = "committed key hash: ";

/// The child process, killed if the parent's test fails before killing it on purpose.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(path: &Path, synchronous: SqliteSync) -> SqliteConfig {
    SqliteConfig {
        path: path.to_owned(),
        synchronous,
        ..SqliteConfig::default()
    }
}

/// The child's part: commit a tenant, report its key, then never return.
async fn child(path: &Path, synchronous: SqliteSync) -> ! {
    let store = SqliteStore::open(&config(path, synchronous))
        .await
        .expect("child open");
    let hash = apikey::digest(&apikey::generate());
    store
        .create_tenant("survivor", &hash)
        .await
        .expect("child commit");
    println!("{COMMITTED}{hash}");
    std::future::pending::<()>().await;
    unreachable!("pending never resolves")
}

async fn committed_then_killed(test_name: &str, synchronous: SqliteSync) {
    if let Ok(path) = std::env::var(CHILD_DB) {
        child(Path::new(&path), synchronous).await;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metadata.sqlite");
    let mut proc = KillOnDrop(
        Command::new(std::env::current_exe().expect("test binary"))
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DB, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child"),
    );
    let stdout = proc.0.stdout.take().expect("child stdout");
    let hash = BufReader::new(stdout)
        .lines()
        .map(|l| l.expect("child output"))
        // libtest may have written `test <name> ... ` on the same line first
        .find_map(|l| l.split_once(COMMITTED).map(|(_, hash)| hash.to_owned()))
        .expect("the child reports its commit");
    proc.0.kill().expect("kill -9 the child");
    proc.0.wait().expect("reap the child");

    let store = SqliteStore::open(&config(&path, synchronous))
        .await
        .expect("reopen");
    let tenant = store.tenant_by_key(&hash).await.expect("lookup");
    assert_eq!(tenant.map(|t| t.name).as_deref(), Some("survivor"));
}

#[tokio::test]
async fn a_commit_survives_kill_9_with_synchronous_full() {
    committed_then_killed(
        "a_commit_survives_kill_9_with_synchronous_full",
        SqliteSync::Full,
    )
    .await;
}

#[tokio::test]
async fn a_commit_survives_kill_9_with_synchronous_normal() {
    committed_then_killed(
        "a_commit_survives_kill_9_with_synchronous_normal",
        SqliteSync::Normal,
    )
    .await;
}
