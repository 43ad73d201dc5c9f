//! The conformance suite every [`MetadataStore`] adapter must pass.
//!
//! Checks create their own tenants (random names and keys), so they run in parallel against
//! one shared database and never see each other's rows.

use futures::future::BoxFuture;
use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::page::Order;
use nightshift_core::{FileId, TenantId, apikey};

use nightshift_core::BatchId;
use nightshift_core::batch::{BatchRecord, BatchStatus, RequestCounts};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::validation::BatchError;

use crate::{
    CancelOutcome, Ending, FileQuery, MetadataError, MetadataStore, Tenant, ValidationOutcome,
};

/// A named check.
pub type Check = (&'static str, fn(&dyn MetadataStore) -> BoxFuture<'_, ()>);

/// Every check of the suite.
pub const CHECKS: &[Check] = &[
    ("tenants_and_keys", |s| Box::pin(tenants_and_keys(s))),
    ("files_are_scoped_to_their_tenant", |s| {
        Box::pin(files_are_scoped_to_their_tenant(s))
    }),
    ("list_pages_and_cursors", |s| {
        Box::pin(list_pages_and_cursors(s))
    }),
    ("expiry_delete_and_sweep", |s| {
        Box::pin(expiry_delete_and_sweep(s))
    }),
    ("ping", |s| Box::pin(ping(s))),
    ("batch_validation_and_cancel", |s| {
        Box::pin(batch_validation_and_cancel(s))
    }),
    ("batch_list_pages", |s| Box::pin(batch_list_pages(s))),
    ("batch_keeps_its_trace_context", |s| {
        Box::pin(batch_keeps_its_trace_context(s))
    }),
    ("a_batch_finished_after_its_deadline_expires", |s| {
        Box::pin(a_batch_finished_after_its_deadline_expires(s))
    }),
    ("stalled_finalizations_are_claimed_once_per_period", |s| {
        Box::pin(stalled_finalizations_are_claimed_once_per_period(s))
    }),
];

async fn new_tenant(store: &dyn MetadataStore) -> Tenant {
    store
        .create_tenant("conformance", &apikey::digest(&apikey::generate()))
        .await
        .expect("create tenant")
}

fn file(
    tenant: &TenantId,
    created_at_us: i64,
    purpose: Purpose,
    expires_at: Option<i64>,
) -> FileRecord {
    let id = FileId::generate();
    FileRecord {
        storage_key: FileRecord::storage_key_for(&id),
        id,
        tenant_id: tenant.clone(),
        bytes: 123,
        created_at: created_at_us / 1_000_000,
        created_at_us,
        expires_at,
        filename: "input.jsonl".into(),
        purpose,
    }
}

const NOW: i64 = 1_800_000_000;

async fn tenants_and_keys(store: &dyn MetadataStore) {
    let key = apikey::generate();
    let hash = apikey::digest(&key);
    let t = store.create_tenant("acme", &hash).await.expect("create");
    assert_eq!(t.name, "acme");
    assert_eq!(
        store.tenant_by_key(&hash).await.expect("lookup"),
        Some(t.clone())
    );
    assert_eq!(
        store
            .tenant_by_key(&apikey::digest("ns-unknown"))
            .await
            .expect("lookup"),
        None
    );
    // a key belongs to one tenant only
    assert!(matches!(
        store.create_tenant("other", &hash).await,
        Err(MetadataError::Conflict(_))
    ));
    // ensure_tenant is idempotent and returns the owner of the key
    let boot = apikey::digest(&apikey::generate());
    let a = store.ensure_tenant("boot", &boot).await.expect("ensure");
    let b = store
        .ensure_tenant("boot", &boot)
        .await
        .expect("ensure again");
    assert_eq!(a, b);
    assert_eq!(
        store
            .ensure_tenant("x", &hash)
            .await
            .expect("ensure existing"),
        t
    );
    // racing ensures agree on one tenant
    let race = apikey::digest(&apikey::generate());
    let (r1, r2) = futures::join!(
        store.ensure_tenant("r", &race),
        store.ensure_tenant("r", &race)
    );
    assert_eq!(r1.expect("r1"), r2.expect("r2"));
}

async fn files_are_scoped_to_their_tenant(store: &dyn MetadataStore) {
    let a = new_tenant(store).await;
    let b = new_tenant(store).await;
    let f = file(&a.id, NOW * 1_000_000, Purpose::Batch, None);
    store.insert_file(&f).await.expect("insert");
    assert_eq!(
        store.get_file(&a.id, &f.id, NOW).await.expect("get"),
        Some(f.clone())
    );
    assert_eq!(
        store.get_file(&b.id, &f.id, NOW).await.expect("get other"),
        None
    );
    assert_eq!(
        store
            .delete_file(&b.id, &f.id, NOW)
            .await
            .expect("delete other"),
        None
    );
    assert!(
        store
            .get_file(&a.id, &f.id, NOW)
            .await
            .expect("still there")
            .is_some()
    );
    let q = FileQuery {
        purpose: None,
        limit: 100,
        order: Order::Desc,
        after: None,
    };
    assert!(
        store
            .list_files(&b.id, &q, NOW)
            .await
            .expect("list other")
            .files
            .is_empty()
    );
    // a cursor from another tenant is unknown here
    let q_after = FileQuery {
        after: Some(f.id.clone()),
        ..q.clone()
    };
    let page = store.list_files(&b.id, &q_after, NOW).await.expect("list");
    assert!(page.files.is_empty() && !page.has_more);
    assert!(matches!(
        store.insert_file(&f).await,
        Err(MetadataError::Conflict(_))
    ));
}

async fn list_pages_and_cursors(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    let base = NOW * 1_000_000;
    let mut files = Vec::new();
    for i in 0..23i64 {
        // pairs share a timestamp: ties must be broken by id, stably
        let purpose = if i % 3 == 0 {
            Purpose::FineTune
        } else {
            Purpose::Batch
        };
        let f = file(&t.id, base + (i / 2), purpose, None);
        store.insert_file(&f).await.expect("insert");
        files.push(f);
    }
    let mut expected_asc = files.clone();
    expected_asc
        .sort_by(|a, b| (a.created_at_us, a.id.as_str()).cmp(&(b.created_at_us, b.id.as_str())));
    let expected_desc: Vec<_> = expected_asc.iter().rev().cloned().collect();
    for (order, expected) in [(Order::Asc, &expected_asc), (Order::Desc, &expected_desc)] {
        for limit in [1u32, 5, 10, 23, 100] {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let q = FileQuery {
                    purpose: None,
                    limit,
                    order,
                    after: after.clone(),
                };
                let page = store.list_files(&t.id, &q, NOW).await.expect("list");
                assert!(page.files.len() <= limit as usize);
                assert!(
                    !page.files.is_empty() || !page.has_more,
                    "empty page with has_more"
                );
                seen.extend(page.files.iter().cloned());
                if !page.has_more {
                    break;
                }
                after = page.files.last().map(|f| f.id.clone());
            }
            assert_eq!(&seen, expected, "order {order:?} limit {limit}");
        }
    }
    // purpose filter
    let q = FileQuery {
        purpose: Some(Purpose::FineTune),
        limit: 100,
        order: Order::Asc,
        after: None,
    };
    let page = store.list_files(&t.id, &q, NOW).await.expect("list");
    assert_eq!(page.files.len(), 8);
    assert!(page.files.iter().all(|f| f.purpose == Purpose::FineTune));
    // exact has_more at the boundary
    let q = FileQuery {
        purpose: None,
        limit: 23,
        order: Order::Desc,
        after: None,
    };
    assert!(
        !store
            .list_files(&t.id, &q, NOW)
            .await
            .expect("list")
            .has_more
    );
    let q = FileQuery { limit: 22, ..q };
    assert!(
        store
            .list_files(&t.id, &q, NOW)
            .await
            .expect("list")
            .has_more
    );
    // an unknown cursor gives an empty page
    let q = FileQuery {
        after: Some(FileId::generate()),
        ..q
    };
    let page = store.list_files(&t.id, &q, NOW).await.expect("list");
    assert!(page.files.is_empty() && !page.has_more);
    // a cursor whose file was deleted meanwhile still moves forward
    let victim = &expected_desc[4];
    store
        .delete_file(&t.id, &victim.id, NOW)
        .await
        .expect("delete")
        .expect("was visible");
    let q = FileQuery {
        purpose: None,
        limit: 3,
        order: Order::Desc,
        after: Some(victim.id.clone()),
    };
    let page = store.list_files(&t.id, &q, NOW).await.expect("list");
    assert_eq!(page.files, expected_desc[5..8].to_vec());
}

async fn expiry_delete_and_sweep(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    let base = NOW * 1_000_000;
    let expired = file(&t.id, base, Purpose::Batch, Some(NOW));
    let later = file(&t.id, base + 1, Purpose::Batch, Some(NOW + 60));
    let forever = file(&t.id, base + 2, Purpose::UserData, None);
    for f in [&expired, &later, &forever] {
        store.insert_file(f).await.expect("insert");
    }
    // expiry is evaluated at the caller's `now`: expires_at <= now is gone
    assert_eq!(
        store.get_file(&t.id, &expired.id, NOW).await.expect("get"),
        None
    );
    assert!(
        store
            .get_file(&t.id, &expired.id, NOW - 1)
            .await
            .expect("get")
            .is_some()
    );
    assert!(
        store
            .get_file(&t.id, &later.id, NOW)
            .await
            .expect("get")
            .is_some()
    );
    let q = FileQuery {
        purpose: None,
        limit: 100,
        order: Order::Asc,
        after: None,
    };
    let ids: Vec<_> = store
        .list_files(&t.id, &q, NOW)
        .await
        .expect("list")
        .files
        .into_iter()
        .map(|f| f.id)
        .collect();
    assert_eq!(ids, vec![later.id.clone(), forever.id.clone()]);
    // an expired file cannot be deleted by the client (it is already gone)
    assert_eq!(
        store
            .delete_file(&t.id, &expired.id, NOW)
            .await
            .expect("delete"),
        None
    );
    // delete hides at once, exactly once
    let gone = store
        .delete_file(&t.id, &forever.id, NOW)
        .await
        .expect("delete");
    assert_eq!(gone.as_ref().map(|f| &f.id), Some(&forever.id));
    assert_eq!(
        store
            .delete_file(&t.id, &forever.id, NOW)
            .await
            .expect("delete twice"),
        None
    );
    assert_eq!(
        store.get_file(&t.id, &forever.id, NOW).await.expect("get"),
        None
    );
    // the sweeper sees deleted and expired files, not live ones (other tests' rows filtered)
    let ours = |files: Vec<FileRecord>| -> Vec<FileId> {
        files
            .into_iter()
            .filter(|f| f.tenant_id == t.id)
            .map(|f| f.id)
            .collect()
    };
    let sweep = ours(store.sweepable_files(NOW, 10_000).await.expect("sweepable"));
    assert!(
        sweep.contains(&expired.id) && sweep.contains(&forever.id),
        "{sweep:?}"
    );
    assert!(!sweep.contains(&later.id));
    for id in &sweep {
        store.purge_file(id).await.expect("purge");
        store.purge_file(id).await.expect("purge is idempotent");
    }
    let sweep = ours(store.sweepable_files(NOW, 10_000).await.expect("sweepable"));
    assert!(sweep.is_empty());
    assert!(
        store
            .get_file(&t.id, &later.id, NOW)
            .await
            .expect("get")
            .is_some()
    );
}

async fn ping(store: &dyn MetadataStore) {
    store.ping().await.expect("ping");
}

fn batch(tenant: &TenantId, created_at_us: i64) -> BatchRecord {
    BatchRecord {
        id: BatchId::generate(),
        tenant_id: tenant.clone(),
        endpoint: "/v1/chat/completions".into(),
        input_file_id: FileId::generate().to_string(),
        completion_window: "24h".into(),
        status: BatchStatus::Validating,
        model: None,
        errors: vec![],
        metadata: Some([("team".to_string(), "ml".to_string())].into()),
        output_expires_after_secs: 3600,
        output_file_id: None,
        error_file_id: None,
        created_at_us,
        in_progress_at: None,
        expires_at: created_at_us / 1_000_000 + 86_400,
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts::default(),
        usage: Default::default(),
        traceparent: None,
    }
}

/// A batch keeps the trace context it was created with, in every record the store returns
/// (reads, transitions, dispatch candidates).
async fn batch_keeps_its_trace_context(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    let traced = BatchRecord {
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        ..batch(&t.id, NOW * 1_000_000)
    };
    let untraced = batch(&t.id, NOW * 1_000_000 + 1);
    for b in [&traced, &untraced] {
        store.insert_batch(b).await.expect("insert");
        assert_eq!(
            store.get_batch(&t.id, &b.id).await.expect("get"),
            Some(b.clone())
        );
        let ready = ValidationOutcome::Ready {
            model: "m".into(),
            total: 1,
            chunks: vec![ChunkSpan {
                index: 0,
                byte_start: 0,
                byte_end: 10,
                first_line: 1,
                line_count: 1,
            }],
        };
        let running = store
            .finish_validation(&b.id, &ready, NOW + 1)
            .await
            .expect("finish")
            .expect("moved");
        assert_eq!(running.traceparent, b.traceparent);
        let candidates = store.dispatch_candidates().await.expect("candidates");
        let candidate = candidates
            .iter()
            .find(|c| c.batch.id == b.id)
            .expect("a candidate");
        assert_eq!(candidate.batch.traceparent, b.traceparent);
    }
}

async fn batch_validation_and_cancel(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    let other = new_tenant(store).await;
    let b = batch(&t.id, NOW * 1_000_000);
    store.insert_batch(&b).await.expect("insert");
    assert!(matches!(
        store.insert_batch(&b).await,
        Err(MetadataError::Conflict(_))
    ));
    assert_eq!(
        store.get_batch(&t.id, &b.id).await.expect("get"),
        Some(b.clone())
    );
    assert_eq!(
        store.get_batch(&other.id, &b.id).await.expect("get other"),
        None
    );
    assert_eq!(store.batch(&b.id).await.expect("batch"), Some(b.clone()));
    assert_eq!(
        store
            .cancel_batch(&other.id, &b.id, NOW)
            .await
            .expect("cancel other"),
        None
    );

    // validation succeeds: in_progress, with its chunks, in one step
    let chunks = vec![
        ChunkSpan {
            index: 0,
            byte_start: 0,
            byte_end: 100,
            first_line: 1,
            line_count: 2,
        },
        ChunkSpan {
            index: 1,
            byte_start: 100,
            byte_end: 150,
            first_line: 3,
            line_count: 1,
        },
    ];
    let ready = ValidationOutcome::Ready {
        model: "m".into(),
        total: 3,
        chunks: chunks.clone(),
    };
    let running = store
        .finish_validation(&b.id, &ready, NOW + 1)
        .await
        .expect("finish")
        .expect("moved");
    assert_eq!(running.status, BatchStatus::InProgress);
    assert_eq!(
        (running.in_progress_at, running.model.as_deref()),
        (Some(NOW + 1), Some("m"))
    );
    assert_eq!(
        running.request_counts,
        RequestCounts {
            total: 3,
            completed: 0,
            failed: 0
        }
    );
    assert_eq!(store.chunks(&b.id).await.expect("chunks"), chunks);
    // compare-and-set: a second ending changes nothing
    let failed = ValidationOutcome::Failed { errors: vec![] };
    assert_eq!(
        store
            .finish_validation(&b.id, &failed, NOW + 2)
            .await
            .expect("again"),
        None
    );

    // cancel: in_progress → cancelling, then idempotent
    match store
        .cancel_batch(&t.id, &b.id, NOW + 3)
        .await
        .expect("cancel")
    {
        Some(CancelOutcome::Cancelling(c)) => {
            assert_eq!(
                (c.status, c.cancelling_at),
                (BatchStatus::Cancelling, Some(NOW + 3))
            );
        }
        other => panic!("expected Cancelling, got {other:?}"),
    }
    assert!(matches!(
        store.cancel_batch(&t.id, &b.id, NOW + 4).await.expect("cancel again"),
        Some(CancelOutcome::AlreadyCancelled(c)) if c.cancelling_at == Some(NOW + 3)
    ));

    // a batch cancelled while validating is not resurrected by validation
    let v = batch(&t.id, NOW * 1_000_000 + 1);
    store.insert_batch(&v).await.expect("insert");
    store
        .cancel_batch(&t.id, &v.id, NOW)
        .await
        .expect("cancel")
        .expect("exists");
    assert_eq!(
        store
            .finish_validation(&v.id, &ready, NOW)
            .await
            .expect("finish"),
        None
    );
    assert!(store.chunks(&v.id).await.expect("chunks").is_empty());

    // validation fails: failed with errors; a failed batch cannot be cancelled
    let f = batch(&t.id, NOW * 1_000_000 + 2);
    store.insert_batch(&f).await.expect("insert");
    let errors = vec![BatchError {
        code: "invalid_json_line".into(),
        line: Some(2),
        message: "bad".into(),
        param: None,
    }];
    let done = store
        .finish_validation(
            &f.id,
            &ValidationOutcome::Failed {
                errors: errors.clone(),
            },
            NOW + 5,
        )
        .await
        .expect("finish")
        .expect("moved");
    assert_eq!(
        (done.status, done.failed_at, done.errors.clone()),
        (BatchStatus::Failed, Some(NOW + 5), errors)
    );
    assert!(matches!(
        store.cancel_batch(&t.id, &f.id, NOW).await.expect("cancel"),
        Some(CancelOutcome::Terminal(b)) if b.status == BatchStatus::Failed
    ));
    let validating = store
        .batches_with_status(&[BatchStatus::Cancelling])
        .await
        .expect("by status");
    assert!(validating.iter().any(|x| x.id == b.id) && validating.iter().any(|x| x.id == v.id));
    assert!(!validating.iter().any(|x| x.id == f.id));
}

async fn batch_list_pages(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    let other = new_tenant(store).await;
    let mut all = Vec::new();
    for i in 0..25i64 {
        let b = batch(&t.id, NOW * 1_000_000 + i / 2); // pairs share a timestamp
        store.insert_batch(&b).await.expect("insert");
        all.push(b);
    }
    store
        .insert_batch(&batch(&other.id, NOW * 1_000_000))
        .await
        .expect("insert other");
    all.sort_by(|a, b| (b.created_at_us, b.id.as_str()).cmp(&(a.created_at_us, a.id.as_str())));
    let want: Vec<BatchId> = all.iter().map(|b| b.id.clone()).collect();
    for limit in [1u32, 7, 25, 100] {
        let mut seen = Vec::new();
        let mut after: Option<BatchId> = None;
        loop {
            let page = store
                .list_batches(&t.id, limit, after.as_ref())
                .await
                .expect("list");
            assert!(!page.batches.is_empty() || !page.has_more);
            seen.extend(page.batches.iter().map(|b| b.id.clone()));
            if !page.has_more {
                break;
            }
            after = page.batches.last().map(|b| b.id.clone());
        }
        assert_eq!(seen, want, "limit {limit}");
    }
    let unknown = BatchId::generate();
    let page = store
        .list_batches(&t.id, 10, Some(&unknown))
        .await
        .expect("list");
    assert!(page.batches.is_empty() && !page.has_more);
}

/// A batch whose last chunk is done after its deadline, before the expiry sweep saw it, ends
/// `expired` (its late lines were cut as `batch_expired`); one done in time ends `completed`.
async fn a_batch_finished_after_its_deadline_expires(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    for (late, want) in [(false, Ending::Completed), (true, Ending::Expired)] {
        let b = batch(&t.id, NOW * 1_000_000 + i64::from(late));
        store.insert_batch(&b).await.expect("insert");
        let ready = ValidationOutcome::Ready {
            model: "m".into(),
            total: 1,
            chunks: vec![ChunkSpan {
                index: 0,
                byte_start: 0,
                byte_end: 10,
                first_line: 1,
                line_count: 1,
            }],
        };
        store
            .finish_validation(&b.id, &ready, NOW + 1)
            .await
            .expect("finish")
            .expect("moved");
        store
            .claim_next_chunk(&b.id)
            .await
            .expect("claim")
            .expect("a chunk");
        assert!(store.complete_chunk(&b.id, 0).await.expect("complete"));
        let now = if late { b.expires_at } else { b.expires_at - 1 };
        let finalizing = store
            .request_finalize(&b.id, now)
            .await
            .expect("request")
            .expect("ready to finalize");
        assert_eq!(finalizing.status, BatchStatus::Finalizing);
        assert_eq!(
            store.ending(&b.id).await.expect("ending"),
            Some(want),
            "late: {late}"
        );
    }
}

async fn stalled_finalizations_are_claimed_once_per_period(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    // a cancelled batch with nothing in flight is asked to finalize at NOW
    let b = batch(&t.id, NOW * 1_000_000);
    store.insert_batch(&b).await.expect("insert");
    store
        .cancel_batch(&t.id, &b.id, NOW)
        .await
        .expect("cancel")
        .expect("exists");
    assert!(
        store
            .request_finalize(&b.id, NOW)
            .await
            .expect("request")
            .is_some()
    );
    let ours = |v: Vec<BatchRecord>| v.into_iter().filter(|x| x.id == b.id).count();
    // not stalled yet
    assert_eq!(
        ours(
            store
                .claim_stalled_finalizations(NOW - 1, NOW + 10)
                .await
                .expect("claim")
        ),
        0
    );
    // stalled: claimed once, then not again until another period has passed
    assert_eq!(
        ours(
            store
                .claim_stalled_finalizations(NOW, NOW + 300)
                .await
                .expect("claim")
        ),
        1
    );
    assert_eq!(
        ours(
            store
                .claim_stalled_finalizations(NOW + 299, NOW + 301)
                .await
                .expect("claim")
        ),
        0
    );
    assert_eq!(
        ours(
            store
                .claim_stalled_finalizations(NOW + 300, NOW + 600)
                .await
                .expect("claim")
        ),
        1
    );
    // a terminal batch is never claimed
    let commit = crate::BatchCommit {
        batch: b.id.clone(),
        output_file: None,
        error_file: None,
        completed: 0,
        failed: 0,
        usage: Default::default(),
    };
    let done = store
        .commit_batch(&commit, NOW + 601)
        .await
        .expect("commit")
        .expect("exists");
    assert_eq!(done.status, BatchStatus::Cancelled);
    assert_eq!(
        ours(
            store
                .claim_stalled_finalizations(i64::MAX, NOW + 900)
                .await
                .expect("claim")
        ),
        0
    );
}

/// Declares the suite in an adapter's integration tests: one `#[tokio::test]` per check of
/// [`CHECKS`], each calling `$run(name)` — an `async fn(&str)` of the test file that builds a
/// fresh adapter and runs the named check — and a test that fails when a check of [`CHECKS`]
/// is not declared here.
#[macro_export]
macro_rules! conformance_tests {
    ($run:path) => {
        $crate::conformance_tests!(@declare $run;
            tenants_and_keys,
            files_are_scoped_to_their_tenant,
            list_pages_and_cursors,
            expiry_delete_and_sweep,
            ping,
            batch_validation_and_cancel,
            batch_list_pages,
            a_batch_finished_after_its_deadline_expires,
            batch_keeps_its_trace_context,
            stalled_finalizations_are_claimed_once_per_period,
        );
    };
    (@declare $run:path; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $run(stringify!($name)).await
            }
        )+

        #[test]
        fn every_check_is_run() {
            let declared = [$(stringify!($name)),+];
            for (name, _) in $crate::conformance::CHECKS {
                assert!(
                    declared.contains(name),
                    "conformance check {name} is missing from conformance_tests!"
                );
            }
        }
    };
}
