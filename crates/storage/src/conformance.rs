//! The conformance suite every [`ObjectStore`] adapter must pass.
//!
//! Each check takes a store that is empty under its prefix (give each run its own prefix) and
//! panics with a message on the first violation of the port's contract. Adapters run them from
//! their integration tests, one `#[tokio::test]` per check.
//!
//! Built with the `testsuite` feature only (an adapter's tests enable it through a
//! dev-dependency): an adapter's test file defines `async fn run(name: &str)`, which builds a
//! fresh adapter and calls [`run`], and declares one test per check with
//! [`conformance_tests!(run)`](crate::conformance_tests).

use bytes::Bytes;

use crate::{ByteRange, ObjectStore, StorageError};

/// Every check of the suite, named once: calls `$then!` with `$args` followed by the checks'
/// names. Both [`run`] and each adapter's tests ([`conformance_tests!`](crate::conformance_tests))
/// are made from this list, so a check can be left out of neither, and a check written but not
/// listed is dead code.
#[doc(hidden)]
#[macro_export]
macro_rules! __storage_conformance_checks {
    ($then:path { $($args:tt)* }) => {
        $then! { $($args)*
            put_get_head_delete,
            ranges,
            missing_objects,
            streamed_upload_small,
            streamed_upload_multipart,
            aborted_upload_leaves_nothing,
            overwrite_replaces,
            list_and_delete_prefix,
            ping,
        }
    };
}

macro_rules! dispatch {
    ($($check:ident,)+) => {
        /// Runs the check named `name` against `store`.
        ///
        /// # Panics
        /// When the check fails, or no check has that name.
        pub async fn run(name: &str, store: &dyn ObjectStore) {
            match name {
                $(stringify!($check) => $check(store).await,)+
                other => panic!("no object-storage conformance check named {other:?}"),
            }
        }
    };
}

crate::__storage_conformance_checks!(dispatch {});

/// Deterministic pseudo-random bytes (so failures are reproducible).
pub fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(u32::from(seed) % 31) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

async fn read(store: &dyn ObjectStore, key: &str, range: Option<ByteRange>) -> Bytes {
    store
        .get(key, range)
        .await
        .unwrap_or_else(|e| panic!("get {key} {range:?}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("read {key}: {e}"))
}

async fn put_get_head_delete(store: &dyn ObjectStore) {
    let data = pattern(10_000, 1);
    store.put("a/one", data.clone()).await.expect("put");
    let body = store.get("a/one", None).await.expect("get");
    assert_eq!(
        (body.object_size, body.start, body.end),
        (10_000, 0, 10_000)
    );
    assert_eq!(body.collect().await.expect("collect"), data);
    let meta = store.head("a/one").await.expect("head").expect("exists");
    assert_eq!((meta.key.as_str(), meta.size), ("a/one", 10_000));
    store.delete("a/one").await.expect("delete");
    assert!(store.head("a/one").await.expect("head").is_none());
    // deleting again is fine
    store.delete("a/one").await.expect("idempotent delete");
    // empty objects exist too
    store.put("a/empty", Bytes::new()).await.expect("put empty");
    assert_eq!(
        store.head("a/empty").await.expect("head").map(|m| m.size),
        Some(0)
    );
    assert!(read(store, "a/empty", None).await.is_empty());
}

async fn ranges(store: &dyn ObjectStore) {
    let data = pattern(1000, 2);
    store.put("r", data.clone()).await.expect("put");
    let cases = [
        (ByteRange::Bounded { start: 0, end: 10 }, 0..10),
        (
            ByteRange::Bounded {
                start: 990,
                end: 1000,
            },
            990..1000,
        ),
        (
            ByteRange::Bounded {
                start: 500,
                end: 5000,
            },
            500..1000,
        ),
        (ByteRange::From(999), 999..1000),
        (ByteRange::Suffix(7), 993..1000),
        (ByteRange::Suffix(5000), 0..1000),
    ];
    for (range, expect) in cases {
        let body = store.get("r", Some(range)).await.expect("ranged get");
        assert_eq!(body.object_size, 1000, "{range:?}");
        assert_eq!(
            (body.start, body.end),
            (expect.start as u64, expect.end as u64),
            "{range:?}"
        );
        assert_eq!(
            body.collect().await.expect("read"),
            data.slice(expect),
            "{range:?}"
        );
    }
    for bad in [
        ByteRange::From(1000),
        ByteRange::Bounded {
            start: 2000,
            end: 3000,
        },
    ] {
        match store.get("r", Some(bad)).await {
            Err(StorageError::InvalidRange { size, .. }) => assert_eq!(size, 1000),
            other => panic!("{bad:?}: expected InvalidRange, got {other:?}"),
        }
    }
}

async fn missing_objects(store: &dyn ObjectStore) {
    assert!(matches!(
        store.get("nope", None).await,
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        store.get("nope", Some(ByteRange::From(0))).await,
        Err(StorageError::NotFound(_))
    ));
    assert!(store.head("nope").await.expect("head").is_none());
}

async fn streamed_upload_small(store: &dyn ObjectStore) {
    let mut up = store.upload("s/small").await.expect("upload");
    up.write(Bytes::from_static(b"hello "))
        .await
        .expect("write");
    up.write(Bytes::from_static(b"world")).await.expect("write");
    // nothing is visible before finish
    assert!(store.head("s/small").await.expect("head").is_none());
    assert_eq!(up.finish().await.expect("finish"), 11);
    assert_eq!(
        read(store, "s/small", None).await,
        Bytes::from_static(b"hello world")
    );
}

async fn streamed_upload_multipart(store: &dyn ObjectStore) {
    // 21 MiB in odd-sized writes: several parts whatever the adapter's part size (≥ 5 MiB).
    let data = pattern(21 * 1024 * 1024 + 123, 3);
    let mut up = store.upload("s/big").await.expect("upload");
    let mut offset = 0;
    for (i, size) in [1, 4096, 3 * 1024 * 1024 + 7, 65_537]
        .iter()
        .cycle()
        .enumerate()
    {
        if offset >= data.len() {
            break;
        }
        let end = (offset + size).min(data.len());
        up.write(data.slice(offset..end))
            .await
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
        offset = end;
    }
    assert!(
        store.head("s/big").await.expect("head").is_none(),
        "visible before finish"
    );
    assert_eq!(up.finish().await.expect("finish"), data.len() as u64);
    let back = read(store, "s/big", None).await;
    assert_eq!(back.len(), data.len());
    assert!(
        back == data,
        "multipart object differs from what was written"
    );
    let tail = read(store, "s/big", Some(ByteRange::Suffix(1000))).await;
    assert_eq!(tail, data.slice(data.len() - 1000..));
}

async fn aborted_upload_leaves_nothing(store: &dyn ObjectStore) {
    let mut up = store.upload("ab/x").await.expect("upload");
    up.write(pattern(11 * 1024 * 1024, 4)).await.expect("write");
    up.abort().await.expect("abort");
    assert!(store.head("ab/x").await.expect("head").is_none());
    let mut up = store.upload("ab/y").await.expect("upload");
    up.write(pattern(100, 5)).await.expect("write");
    drop(up);
    assert!(store.head("ab/y").await.expect("head").is_none());
    assert!(store.list("ab/").await.expect("list").is_empty());
}

async fn overwrite_replaces(store: &dyn ObjectStore) {
    store.put("o", pattern(5000, 6)).await.expect("put");
    store
        .put("o", Bytes::from_static(b"short"))
        .await
        .expect("put again");
    assert_eq!(read(store, "o", None).await, Bytes::from_static(b"short"));
    let mut up = store.upload("o").await.expect("upload");
    up.write(Bytes::from_static(b"streamed"))
        .await
        .expect("write");
    up.finish().await.expect("finish");
    assert_eq!(
        read(store, "o", None).await,
        Bytes::from_static(b"streamed")
    );
}

async fn list_and_delete_prefix(store: &dyn ObjectStore) {
    // more than one listing page on services that page at 1000
    let keys: Vec<String> = (0..1005).map(|i| format!("l/p/{i:05}")).collect();
    futures::future::try_join_all(keys.iter().map(|k| store.put(k, Bytes::from_static(b"x"))))
        .await
        .expect("puts");
    store
        .put("l/q/other", Bytes::from_static(b"yy"))
        .await
        .expect("put");
    let listed = store.list("l/p/").await.expect("list");
    assert_eq!(
        listed.iter().map(|m| m.key.clone()).collect::<Vec<_>>(),
        keys
    );
    assert!(listed.iter().all(|m| m.size == 1));
    assert_eq!(
        store.delete_prefix("l/p/").await.expect("delete prefix"),
        1005
    );
    assert!(store.list("l/p/").await.expect("list").is_empty());
    let rest = store.list("l/").await.expect("list");
    assert_eq!(rest.len(), 1);
    assert_eq!((rest[0].key.as_str(), rest[0].size), ("l/q/other", 2));
    assert_eq!(
        store.delete_prefix("l/none/").await.expect("empty prefix"),
        0
    );
}

async fn ping(store: &dyn ObjectStore) {
    store.ping().await.expect("ping");
}

/// Declares the suite in an adapter's integration tests: one `#[tokio::test]` per check, each
/// calling `$run(name)` — an `async fn(&str)` of the test file that builds a fresh adapter and
/// gives it to [`run`](crate::conformance::run) with the check's name.
#[macro_export]
macro_rules! conformance_tests {
    ($run:path) => {
        $crate::__storage_conformance_checks!($crate::conformance_tests { @declare $run; });
    };
    (@declare $run:path; $($check:ident,)+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $run(stringify!($check)).await
            }
        )+
    };
}
