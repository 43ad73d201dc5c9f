//! The conformance suite every [`MetadataStore`] adapter must pass.
//!
//! Checks create their own tenants (random names and keys), so they run in parallel against
//! one shared database and never see each other's rows.
//!
//! Built with the `testsuite` feature only (an adapter's tests enable it through a
//! dev-dependency): an adapter's test file defines `async fn run(name: &str)`, which builds a
//! fresh store and calls [`run`], and declares one test per check with
//! [`conformance_tests!(run)`](crate::conformance_tests).

use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::page::Order;
use nightshift_core::{FileId, TenantId, apikey};

use nightshift_core::BatchId;
use nightshift_core::batch::{BatchRecord, BatchStatus, PartTally, RequestCounts};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::results::Usage;
use nightshift_core::validation::BatchError;

use crate::{
    CancelOutcome, DispatchAccount, DispatchCandidate, Ending, FileQuery, IdempotencyClaim,
    Inserted, LeasePolicy, MetadataError, MetadataStore, Quota, QuotaExceeded, QuotaOverrides,
    QuotaUsage, Quotas, REQUEST_LIMIT_EXCEEDED, RetryFilter, RetrySource, Tenant,
    ValidationOutcome,
};
use nightshift_core::idempotency::IdempotentKind;

/// Every check of the suite, named once: calls `$then!` with `$args` followed by the checks'
/// names. Both [`run`] and each adapter's tests ([`conformance_tests!`](crate::conformance_tests))
/// are made from this list, so a check can be left out of neither, and a check written but not
/// listed is dead code.
#[doc(hidden)]
#[macro_export]
macro_rules! __metadata_conformance_checks {
    ($then:path { $($args:tt)* }) => {
        $then! { $($args)*
            tenants_and_keys,
            files_are_scoped_to_their_tenant,
            list_pages_and_cursors,
            expiry_delete_and_sweep,
            ping,
            batch_validation_and_cancel,
            batch_list_pages,
            batch_keeps_its_trace_context,
            a_batch_finished_after_its_deadline_expires,
            stalled_finalizations_are_claimed_once_per_period,
            chunks_are_claimed_with_a_lease,
            the_lease_sweep_redrives_gives_up_and_waits,
            failed_chunks_end_their_batch_with_their_failure,
            done_chunks_keep_their_first_part_tally,
            endings_are_bounded_by_leases_and_grace,
            validating_batches_expire_at_their_deadline,
            inputs_outlive_their_batches,
            one_finalizer_holds_the_lease,
            a_cancel_while_finalizing_keeps_the_ending,
            idempotency_keys_name_one_object_for_a_day,
            idempotency_key_races_make_one_object,
            retries_are_linked_to_their_parent,
            dispatch_accounts_are_replaced_whole,
            quota_overrides_replace_the_defaults,
            the_active_batch_quota_refuses_one_more,
            the_enqueued_request_quota_fails_the_batch_at_validation,
            the_stored_bytes_quota_counts_visible_files,
            concurrent_creates_cannot_overshoot_a_quota,
        }
    };
}

macro_rules! dispatch {
    ($($check:ident,)+) => {
        /// Runs the check named `name` against `store`.
        ///
        /// # Panics
        /// When the check fails, or no check has that name.
        pub async fn run(name: &str, store: &dyn MetadataStore) {
            match name {
                $(stringify!($check) => $check(store).await,)+
                other => panic!("no metadata conformance check named {other:?}"),
            }
        }
    };
}

crate::__metadata_conformance_checks!(dispatch {});

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
            .finish_validation(&b.id, &ready, NOW + 1, &Quotas::UNLIMITED)
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
        .finish_validation(&b.id, &ready, NOW + 1, &Quotas::UNLIMITED)
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
            .finish_validation(&b.id, &failed, NOW + 2, &Quotas::UNLIMITED)
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
            .finish_validation(&v.id, &ready, NOW, &Quotas::UNLIMITED)
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
            &Quotas::UNLIMITED,
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
            .finish_validation(&b.id, &ready, NOW + 1, &Quotas::UNLIMITED)
            .await
            .expect("finish")
            .expect("moved");
        store
            .claim_next_chunk(&b.id, NOW + 1, 120)
            .await
            .expect("claim")
            .expect("a chunk");
        assert!(
            store
                .complete_chunk(&b.id, 0, None)
                .await
                .expect("complete")
        );
        let now = if late { b.expires_at } else { b.expires_at - 1 };
        let finalizing = store
            .request_finalize(&b.id, now, 60)
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
            .request_finalize(&b.id, NOW, 60)
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

// Lease checks sweep and expire across the whole database (other checks' rows included), so
// each works in a time window of its own, far from the others': a sweep at a window's `now`
// sees the other windows' batches either past their deadline (earlier windows: left alone)
// or with leases still live (later windows).
const WINDOW: i64 = 10_000_000;
/// Deadline of a window's batches: its `t0` + this (well inside the window).
const WINDOW_DEADLINE: i64 = 100_000;

/// An `in_progress` batch created at `t0` with its deadline at `t0 + WINDOW_DEADLINE`, cut into
/// `n` one-line chunks.
async fn running_batch(
    store: &dyn MetadataStore,
    tenant: &TenantId,
    t0: i64,
    n: u32,
) -> BatchRecord {
    let b = BatchRecord {
        expires_at: t0 + WINDOW_DEADLINE,
        ..batch(tenant, t0 * 1_000_000)
    };
    store.insert_batch(&b).await.expect("insert");
    let chunks = (0..n)
        .map(|i| ChunkSpan {
            index: i,
            byte_start: u64::from(i) * 10,
            byte_end: u64::from(i) * 10 + 10,
            first_line: u64::from(i) + 1,
            line_count: 1,
        })
        .collect();
    let ready = ValidationOutcome::Ready {
        model: "m".into(),
        total: u64::from(n),
        chunks,
    };
    store
        .finish_validation(&b.id, &ready, t0, &Quotas::UNLIMITED)
        .await
        .expect("finish")
        .expect("moved")
}

/// Asks `request_finalize` and expects the batch not to be ready (or already asked).
async fn finalize_refused(store: &dyn MetadataStore, id: &BatchId, now: i64, grace: i64) {
    let answer = store
        .request_finalize(id, now, grace)
        .await
        .expect("request_finalize");
    assert!(answer.is_none(), "not ready at {now}: {answer:?}");
}

/// Asks `request_finalize` and expects it granted (`why` says why it must be).
async fn finalize_granted(
    store: &dyn MetadataStore,
    id: &BatchId,
    now: i64,
    grace: i64,
    why: &str,
) -> BatchRecord {
    store
        .request_finalize(id, now, grace)
        .await
        .expect("request_finalize")
        .unwrap_or_else(|| panic!("{why}"))
}

async fn claim(
    store: &dyn MetadataStore,
    b: &BatchRecord,
    now: i64,
    lease: i64,
) -> crate::LeasedChunk {
    store
        .claim_next_chunk(&b.id, now, lease)
        .await
        .expect("claim")
        .expect("a pending chunk")
}

fn commit_of(b: &BatchRecord) -> crate::BatchCommit {
    crate::BatchCommit {
        batch: b.id.clone(),
        output_file: None,
        error_file: None,
        completed: 0,
        failed: 0,
        usage: Default::default(),
    }
}

/// Claims count attempts and lease the chunk; a release gives the attempt back; heartbeats
/// renew dispatched chunks only; a restart's extension never shortens a lease.
async fn chunks_are_claimed_with_a_lease(store: &dyn MetadataStore) {
    let t0 = NOW + WINDOW;
    let t = new_tenant(store).await;
    let b = running_batch(store, &t.id, t0, 2).await;
    let first = claim(store, &b, t0 + 1, 30).await;
    assert_eq!(
        (first.batch.clone(), first.span.index, first.attempt),
        (b.id.clone(), 0, 1)
    );
    // a release (the publish failed) gives the chunk and its attempt back
    store.release_chunk(&b.id, 0).await.expect("release");
    let again = claim(store, &b, t0 + 2, 30).await;
    assert_eq!((again.span.index, again.attempt), (0, 1));
    let second = claim(store, &b, t0 + 2, 30).await;
    assert_eq!((second.span.index, second.attempt), (1, 1));
    assert!(
        store
            .claim_next_chunk(&b.id, t0 + 2, 30)
            .await
            .expect("claim")
            .is_none()
    );
    let dispatched = store.dispatched_chunks(&b.id).await.expect("dispatched");
    assert_eq!(dispatched, vec![again.clone(), second.clone()]);
    // no executor reported either running yet: both wait in the queue
    let queued = |candidates: Vec<DispatchCandidate>| {
        candidates
            .iter()
            .find(|c| c.batch.id == b.id)
            .map(|c| (c.in_flight, c.queued))
    };
    assert_eq!(
        queued(store.dispatch_candidates().await.expect("candidates")),
        Some((2, 2))
    );
    // heartbeats renew a dispatched chunk (and mark it started), not a done one
    assert!(
        store
            .renew_chunk_lease(&b.id, 0, t0 + 10, 30)
            .await
            .expect("renew")
    );
    assert!(
        store
            .complete_chunk(&b.id, 1, None)
            .await
            .expect("complete")
    );
    assert!(
        !store
            .renew_chunk_lease(&b.id, 1, t0 + 10, 30)
            .await
            .expect("renew done")
    );
    assert!(
        !store
            .extend_chunk_lease(&b.id, 1, t0 + 99)
            .await
            .expect("extend done")
    );
    assert!(
        store
            .extend_chunk_lease(&b.id, 0, t0 + 20)
            .await
            .expect("extend")
    );
    // the lease (t0 + 40 after the heartbeat) was not shortened to t0 + 20: a sweep at t0 + 30
    // leaves the chunk alone
    let policy = LeasePolicy {
        lease_secs: 30,
        max_attempts: 1,
        tasks_waiting: false,
    };
    let sweep = store
        .sweep_chunk_leases(t0 + 30, &policy)
        .await
        .expect("sweep");
    assert!(
        !sweep
            .failed
            .iter()
            .chain(&sweep.redrive)
            .any(|c| c.batch == b.id),
        "{sweep:?}"
    );
    let candidates = store.dispatch_candidates().await.expect("candidates");
    let c = candidates
        .iter()
        .find(|c| c.batch.id == b.id)
        .expect("candidate");
    assert_eq!((c.in_flight, c.queued, c.pending), (1, 0, 0));
    // no chunk is handed out past the deadline
    let late = running_batch(store, &t.id, t0 + 3, 1).await;
    assert!(
        store
            .claim_next_chunk(&late.id, late.expires_at, 30)
            .await
            .expect("claim")
            .is_none()
    );
}

/// Expired leases: a started chunk is re-driven until its attempts run out, then given up; a
/// chunk no executor started waits while tasks are queued and is re-driven (for free) when
/// none are; chunks of an ending batch are left alone.
async fn the_lease_sweep_redrives_gives_up_and_waits(store: &dyn MetadataStore) {
    let t0 = NOW + 2 * WINDOW;
    let t = new_tenant(store).await;
    let b = running_batch(store, &t.id, t0, 4).await;
    for _ in 0..4 {
        claim(store, &b, t0, 10).await;
    }
    let ending = running_batch(store, &t.id, t0, 1).await;
    claim(store, &ending, t0, 10).await;
    store
        .cancel_batch(&t.id, &ending.id, t0 + 1)
        .await
        .expect("cancel")
        .expect("exists");
    assert!(
        store
            .renew_chunk_lease(&b.id, 0, t0 + 5, 10)
            .await
            .expect("renew")
    );
    let mine = |v: &[crate::LeasedChunk]| -> Vec<(u32, u32)> {
        let mut v: Vec<_> = v
            .iter()
            .filter(|c| c.batch == b.id || c.batch == ending.id)
            .map(|c| {
                assert_eq!(c.batch, b.id, "a chunk of an ending batch was swept");
                (c.span.index, c.attempt)
            })
            .collect();
        v.sort_unstable();
        v
    };
    let policy = |tasks_waiting| LeasePolicy {
        lease_secs: 10,
        max_attempts: 2,
        tasks_waiting,
    };
    // nothing expired yet
    let sweep = store
        .sweep_chunk_leases(t0 + 9, &policy(false))
        .await
        .expect("sweep");
    assert!(mine(&sweep.redrive).is_empty() && mine(&sweep.failed).is_empty());
    // chunk 0 (started) is re-driven as attempt 2; 1..3 (never started, tasks queued) wait
    let sweep = store
        .sweep_chunk_leases(t0 + 20, &policy(true))
        .await
        .expect("sweep");
    assert_eq!(mine(&sweep.redrive), vec![(0, 2)]);
    assert!(mine(&sweep.failed).is_empty());
    assert!(sweep.extended >= 3, "{sweep:?}");
    // a re-driven chunk must be reported running again before its next expiry counts
    assert!(
        store
            .renew_chunk_lease(&b.id, 0, t0 + 25, 10)
            .await
            .expect("renew")
    );
    // at t0 + 40: chunk 0 ran out of attempts; 1..3 were lost (no task queued): re-driven free
    let sweep = store
        .sweep_chunk_leases(t0 + 40, &policy(false))
        .await
        .expect("sweep");
    assert_eq!(mine(&sweep.redrive), vec![(1, 1), (2, 1), (3, 1)]);
    assert_eq!(mine(&sweep.failed), vec![(0, 2)]);
    // the same sweep again finds nothing: every lease was renewed or ended
    let sweep = store
        .sweep_chunk_leases(t0 + 40, &policy(false))
        .await
        .expect("sweep");
    assert!(mine(&sweep.redrive).is_empty() && mine(&sweep.failed).is_empty());
    let states = store.chunk_states(&b.id).await.expect("states");
    assert_eq!(
        states[0].failure.as_deref(),
        Some("the chunk was given up after 2 attempts (its executors stopped reporting)")
    );
    assert!(!states[0].done && states[1..].iter().all(|c| c.failure.is_none() && !c.done));
    // a failed chunk frees its slot; a late heartbeat does not revive it
    assert!(
        !store
            .renew_chunk_lease(&b.id, 0, t0 + 41, 10)
            .await
            .expect("renew")
    );
    let candidates = store.dispatch_candidates().await.expect("candidates");
    let c = candidates
        .iter()
        .find(|c| c.batch.id == b.id)
        .expect("candidate");
    assert_eq!((c.in_flight, c.pending), (3, 0));
    // its complete part reported after all: done
    assert!(
        store
            .complete_chunk(&b.id, 0, None)
            .await
            .expect("complete")
    );
    let states = store.chunk_states(&b.id).await.expect("states");
    assert!(states[0].done && states[0].failure.is_none());
    // past the deadline, nothing is swept: the batch ends instead
    let sweep = store
        .sweep_chunk_leases(b.expires_at, &policy(false))
        .await
        .expect("sweep");
    assert!(mine(&sweep.redrive).is_empty() && mine(&sweep.failed).is_empty());
}

/// A chunk given up (its executor reported it can never run) is not retried: its batch is
/// finalized with its failure once every other chunk is done, and ends `completed`.
async fn failed_chunks_end_their_batch_with_their_failure(store: &dyn MetadataStore) {
    let t0 = NOW + 3 * WINDOW;
    let t = new_tenant(store).await;
    let b = running_batch(store, &t.id, t0, 2).await;
    claim(store, &b, t0, 30).await;
    claim(store, &b, t0, 30).await;
    assert!(
        store
            .fail_chunk(&b.id, 0, "input gone")
            .await
            .expect("fail")
    );
    assert!(
        !store
            .fail_chunk(&b.id, 0, "again")
            .await
            .expect("fail twice")
    );
    finalize_refused(store, &b.id, t0 + 1, 60).await;
    assert!(
        store
            .complete_chunk(&b.id, 1, None)
            .await
            .expect("complete")
    );
    assert!(!store.fail_chunk(&b.id, 1, "late").await.expect("fail done"));
    let states = store.chunk_states(&b.id).await.expect("states");
    assert_eq!(
        states
            .iter()
            .map(|c| (c.done, c.failure.as_deref()))
            .collect::<Vec<_>>(),
        vec![(false, Some("input gone")), (true, None)]
    );
    let finalizing = finalize_granted(store, &b.id, t0 + 2, 60, "ready").await;
    assert_eq!(finalizing.status, BatchStatus::Finalizing);
    assert_eq!(
        store.ending(&b.id).await.expect("ending"),
        Some(Ending::Completed)
    );
}

/// A done chunk keeps the part tally of the report that made it done; a later report (a
/// redelivery, another run) changes nothing, and a chunk done without one has none.
async fn done_chunks_keep_their_first_part_tally(store: &dyn MetadataStore) {
    let t0 = NOW + 3 * WINDOW;
    let t = new_tenant(store).await;
    let b = running_batch(store, &t.id, t0, 2).await;
    claim(store, &b, t0, 30).await;
    claim(store, &b, t0, 30).await;
    let first = PartTally {
        bytes: 1 << 40,
        crc32: u32::MAX,
        completed: 7,
        failed: 2,
        usage: Usage {
            input_tokens: 11,
            output_tokens: 3,
            total_tokens: 14,
            ..Usage::default()
        },
    };
    let other = PartTally { crc32: 1, ..first };
    assert!(
        store
            .complete_chunk(&b.id, 0, Some(&first))
            .await
            .expect("complete")
    );
    assert!(
        !store
            .complete_chunk(&b.id, 0, Some(&other))
            .await
            .expect("complete again")
    );
    assert!(
        store
            .complete_chunk(&b.id, 1, None)
            .await
            .expect("complete")
    );
    let states = store.chunk_states(&b.id).await.expect("states");
    assert_eq!(
        states.iter().map(|c| (c.done, c.part)).collect::<Vec<_>>(),
        vec![(true, Some(first)), (true, None)]
    );
}

/// A cancelled or expiring batch is finalized with dispatched chunks once their leases all
/// expired, or once the ending grace has passed whatever the leases say; a batch running to
/// its end never is.
async fn endings_are_bounded_by_leases_and_grace(store: &dyn MetadataStore) {
    let t0 = NOW + 4 * WINDOW;
    let grace = 60;
    let t = new_tenant(store).await;

    // running to its end: a live or an expired lease, it waits for its chunk
    let running = running_batch(store, &t.id, t0, 1).await;
    claim(store, &running, t0, 10).await;
    for now in [t0 + 1, t0 + 500] {
        finalize_refused(store, &running.id, now, grace).await;
    }

    // cancelled, its chunk's lease live and renewed: it waits for the grace, not longer
    let cancelled = running_batch(store, &t.id, t0, 2).await;
    claim(store, &cancelled, t0, 1000).await;
    store
        .cancel_batch(&t.id, &cancelled.id, t0 + 10)
        .await
        .expect("cancel")
        .expect("exists");
    finalize_refused(store, &cancelled.id, t0 + 69, grace).await;
    let asked =
        finalize_granted(store, &cancelled.id, t0 + 70, grace, "the grace has passed").await;
    assert_eq!(asked.status, BatchStatus::Cancelling);
    assert_eq!(
        store.ending(&cancelled.id).await.expect("ending"),
        Some(Ending::Cancelled)
    );
    // asked once
    finalize_refused(store, &cancelled.id, t0 + 71, grace).await;

    // cancelled, its chunk's lease expired (the executor is gone): at once
    let orphan = running_batch(store, &t.id, t0, 1).await;
    claim(store, &orphan, t0, 5).await;
    store
        .cancel_batch(&t.id, &orphan.id, t0 + 1)
        .await
        .expect("cancel")
        .expect("exists");
    finalize_refused(store, &orphan.id, t0 + 4, grace).await;
    assert!(
        store
            .request_finalize(&orphan.id, t0 + 5, grace)
            .await
            .expect("ask")
            .is_some()
    );

    // past its deadline (marked or not), a live lease holds it for the grace only
    let expiring = running_batch(store, &t.id, t0, 1).await;
    let deadline = expiring.expires_at;
    claim(store, &expiring, deadline - 1, 10_000).await;
    finalize_refused(store, &expiring.id, deadline, grace).await;
    finalize_refused(store, &expiring.id, deadline + grace - 1, grace).await;
    let asked = finalize_granted(
        store,
        &expiring.id,
        deadline + grace,
        grace,
        "the grace has passed",
    )
    .await;
    assert_eq!(asked.status, BatchStatus::Finalizing);
    assert_eq!(
        store.ending(&expiring.id).await.expect("ending"),
        Some(Ending::Expired)
    );
    let done = store
        .commit_batch(&commit_of(&expiring), deadline + grace + 1)
        .await
        .expect("commit")
        .expect("exists");
    assert_eq!(done.status, BatchStatus::Expired);
}

/// A batch still validating at its deadline (its input could not be read) expires at once:
/// no chunks, and a validation finishing late changes nothing.
async fn validating_batches_expire_at_their_deadline(store: &dyn MetadataStore) {
    // Other checks' validating batches have a 24 h deadline: this one's is much earlier.
    let t = new_tenant(store).await;
    let b = BatchRecord {
        expires_at: NOW + 100,
        ..batch(&t.id, NOW * 1_000_000)
    };
    store.insert_batch(&b).await.expect("insert");
    let ours = |v: Vec<BatchRecord>| v.into_iter().filter(|x| x.id == b.id).collect::<Vec<_>>();
    assert!(ours(store.expire_due(NOW + 99).await.expect("expire")).is_empty());
    let expired = ours(store.expire_due(NOW + 100).await.expect("expire"));
    assert_eq!(expired.len(), 1);
    assert_eq!(
        (expired[0].status, expired[0].expired_at),
        (BatchStatus::Expired, Some(NOW + 100))
    );
    assert!(ours(store.expire_due(NOW + 101).await.expect("expire")).is_empty());
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
    assert_eq!(
        store
            .finish_validation(&b.id, &ready, NOW + 102, &Quotas::UNLIMITED)
            .await
            .expect("finish"),
        None
    );
    assert!(store.chunks(&b.id).await.expect("chunks").is_empty());
    let got = store.batch(&b.id).await.expect("get").expect("exists");
    assert_eq!(got.status, BatchStatus::Expired);
}

/// A deleted or expired file is hidden at once, but the sweeper gets its bytes only once no
/// unfinished batch reads it.
async fn inputs_outlive_their_batches(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    let deleted = file(&t.id, NOW * 1_000_000, Purpose::Batch, None);
    let expiring = file(&t.id, NOW * 1_000_000 + 1, Purpose::Batch, Some(NOW + 10));
    let idle = file(&t.id, NOW * 1_000_000 + 2, Purpose::Batch, None);
    for f in [&deleted, &expiring, &idle] {
        store.insert_file(f).await.expect("insert");
    }
    let reader = |f: &FileRecord, i: i64| BatchRecord {
        input_file_id: f.id.to_string(),
        ..batch(&t.id, NOW * 1_000_000 + i)
    };
    let (a, b) = (reader(&deleted, 0), reader(&expiring, 1));
    store.insert_batch(&a).await.expect("insert");
    store.insert_batch(&b).await.expect("insert");
    for f in [&deleted, &idle] {
        store
            .delete_file(&t.id, &f.id, NOW + 1)
            .await
            .expect("delete")
            .expect("visible");
    }
    let tenant = &t.id;
    let sweepable = |now| async move {
        store
            .sweepable_files(now, 10_000)
            .await
            .expect("sweepable")
            .into_iter()
            .filter(|f| &f.tenant_id == tenant)
            .map(|f| f.id)
            .collect::<Vec<_>>()
    };
    // hidden at once, whoever reads them, but still there as they were when the batches
    // were created
    for f in [&deleted, &idle] {
        assert_eq!(
            store.get_file(&t.id, &f.id, NOW + 1).await.expect("get"),
            None
        );
        assert_eq!(
            store.file_as_of(&t.id, &f.id, NOW).await.expect("as of"),
            Some(f.clone())
        );
        assert_eq!(
            store
                .file_as_of(&t.id, &f.id, NOW + 2)
                .await
                .expect("as of"),
            None
        );
    }
    assert_eq!(
        store
            .file_as_of(&t.id, &expiring.id, NOW + 9)
            .await
            .expect("as of"),
        Some(expiring.clone())
    );
    assert_eq!(
        store
            .file_as_of(&t.id, &expiring.id, NOW + 10)
            .await
            .expect("as of"),
        None
    );
    let stranger = new_tenant(store).await;
    assert_eq!(
        store
            .file_as_of(&stranger.id, &deleted.id, NOW)
            .await
            .expect("as of"),
        None
    );
    assert_eq!(
        store
            .get_file(&t.id, &expiring.id, NOW + 10)
            .await
            .expect("get"),
        None
    );
    // bytes kept while a batch that is not terminal reads them (validating, then running)
    assert_eq!(sweepable(NOW + 10).await, vec![idle.id.clone()]);
    assert!(store.input_in_use(&deleted.id).await.expect("in use"));
    assert!(store.input_in_use(&expiring.id).await.expect("in use"));
    assert!(!store.input_in_use(&idle.id).await.expect("in use"));
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
        .finish_validation(&a.id, &ready, NOW + 2, &Quotas::UNLIMITED)
        .await
        .expect("finish")
        .expect("moved");
    store.purge_file(&idle.id).await.expect("purge");
    assert!(sweepable(NOW + 10).await.is_empty());
    // a cancelled batch still reads its input until it is finalized
    store
        .cancel_batch(&t.id, &a.id, NOW + 3)
        .await
        .expect("cancel")
        .expect("exists");
    assert!(
        store
            .request_finalize(&a.id, NOW + 3, 60)
            .await
            .expect("ask")
            .is_some()
    );
    assert!(sweepable(NOW + 10).await.is_empty());
    store
        .commit_batch(&commit_of(&a), NOW + 4)
        .await
        .expect("commit")
        .expect("exists");
    assert_eq!(sweepable(NOW + 10).await, vec![deleted.id.clone()]);
    assert!(!store.input_in_use(&deleted.id).await.expect("in use"));
    // a batch failed in validation reads nothing any more
    store
        .finish_validation(
            &b.id,
            &ValidationOutcome::Failed { errors: vec![] },
            NOW + 5,
            &Quotas::UNLIMITED,
        )
        .await
        .expect("finish")
        .expect("moved");
    let mut both = sweepable(NOW + 10).await;
    both.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    let mut want = vec![deleted.id.clone(), expiring.id.clone()];
    want.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    assert_eq!(both, want);
}

/// One holder at a time: a lease is granted when free, renewed by its holder, taken over only
/// once expired, released by its holder only; a batch not being finalized grants none; a
/// stalled finalization is re-published only while nobody holds the lease.
async fn one_finalizer_holds_the_lease(store: &dyn MetadataStore) {
    let t0 = NOW + 5 * WINDOW;
    let t = new_tenant(store).await;
    let b = running_batch(store, &t.id, t0, 1).await;
    // not asked to finalize yet
    let no = store
        .lease_finalization(&b.id, "a", t0, 30)
        .await
        .expect("lease");
    assert_eq!((no.granted, no.holder), (false, None));
    store
        .cancel_batch(&t.id, &b.id, t0)
        .await
        .expect("cancel")
        .expect("exists");
    finalize_granted(store, &b.id, t0, 60, "nothing in flight").await;
    let a = store
        .lease_finalization(&b.id, "a", t0, 30)
        .await
        .expect("lease");
    assert_eq!((a.granted, a.expires_at), (true, Some(t0 + 30)));
    let other = store
        .lease_finalization(&b.id, "b", t0 + 1, 30)
        .await
        .expect("lease");
    assert_eq!(
        (other.granted, other.holder.as_deref(), other.expires_at),
        (false, Some("a"), Some(t0 + 30))
    );
    let renewed = store
        .lease_finalization(&b.id, "a", t0 + 10, 30)
        .await
        .expect("renew");
    assert_eq!((renewed.granted, renewed.expires_at), (true, Some(t0 + 40)));
    let id = &b.id;
    let stalled = |now| async move {
        store
            .claim_stalled_finalizations(i64::MAX, now)
            .await
            .expect("claim")
            .into_iter()
            .any(|x| &x.id == id)
    };
    // a slow finalization keeping its lease is not published again
    assert!(!stalled(t0 + 39).await);
    assert!(
        !store
            .lease_finalization(&b.id, "b", t0 + 39, 30)
            .await
            .expect("lease")
            .granted
    );
    // its holder died: the lease expires and another takes it over
    let b_lease = store
        .lease_finalization(&b.id, "b", t0 + 40, 30)
        .await
        .expect("lease");
    assert_eq!((b_lease.granted, b_lease.expires_at), (true, Some(t0 + 70)));
    assert!(
        !store
            .release_finalization(&b.id, "a")
            .await
            .expect("release")
    );
    assert!(
        !store
            .lease_finalization(&b.id, "a", t0 + 41, 30)
            .await
            .expect("lease")
            .granted
    );
    assert!(
        store
            .release_finalization(&b.id, "b")
            .await
            .expect("release")
    );
    // released: free for anyone, and a stalled job may be published again
    assert!(stalled(t0 + 42).await);
    assert!(
        store
            .lease_finalization(&b.id, "a", t0 + 43, 30)
            .await
            .expect("lease")
            .granted
    );
    // terminal: no lease
    store
        .commit_batch(&commit_of(&b), t0 + 44)
        .await
        .expect("commit")
        .expect("exists");
    let end = store
        .lease_finalization(&b.id, "c", t0 + 100, 30)
        .await
        .expect("lease");
    assert_eq!((end.granted, end.holder), (false, None));
}

/// A cancel that arrives while the batch is being finalized changes nothing: a batch whose
/// chunks all ran ends `completed`, and the cancel answers with the batch as it is.
async fn a_cancel_while_finalizing_keeps_the_ending(store: &dyn MetadataStore) {
    let t0 = NOW + 6 * WINDOW;
    let t = new_tenant(store).await;
    let b = running_batch(store, &t.id, t0, 1).await;
    claim(store, &b, t0, 30).await;
    assert!(
        store
            .complete_chunk(&b.id, 0, None)
            .await
            .expect("complete")
    );
    let finalizing = finalize_granted(store, &b.id, t0 + 1, 60, "ready").await;
    match store
        .cancel_batch(&t.id, &b.id, t0 + 2)
        .await
        .expect("cancel")
    {
        Some(CancelOutcome::Finalizing(same)) => assert_eq!(same, finalizing),
        other => panic!("expected Finalizing, got {other:?}"),
    }
    let after = store.batch(&b.id).await.expect("get").expect("exists");
    assert_eq!(after, finalizing);
    assert_eq!(
        store.ending(&b.id).await.expect("ending"),
        Some(Ending::Completed)
    );
    let done = store
        .commit_batch(&commit_of(&b), t0 + 3)
        .await
        .expect("commit")
        .expect("exists");
    assert_eq!(
        (done.status, done.cancelling_at, done.cancelled_at),
        (BatchStatus::Completed, None, None)
    );
    assert!(matches!(
        store.cancel_batch(&t.id, &b.id, t0 + 4).await.expect("cancel"),
        Some(CancelOutcome::Terminal(x)) if x.status == BatchStatus::Completed
    ));
}

fn key_claim(key: &str, kind: IdempotentKind, hash: &str, at: i64) -> IdempotencyClaim {
    IdempotencyClaim {
        key: key.into(),
        kind,
        request_hash: hash.into(),
        created_at: at,
    }
}

/// A key claimed with a file or a batch names it for 24 hours, per tenant: a second insert
/// with the live key records nothing and returns the first claim; an expired key is claimed
/// anew and swept.
async fn idempotency_keys_name_one_object_for_a_day(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    let other = new_tenant(store).await;
    let now = NOW;
    let first = file(&t.id, now * 1_000_000, Purpose::Batch, None);
    let c = key_claim("k-1", IdempotentKind::File, "h1", now);
    assert_eq!(
        store
            .insert_file_once(&first, Some(&c), &Quotas::UNLIMITED)
            .await
            .expect("insert"),
        Inserted::Created
    );
    let record = store
        .idempotency_record(&t.id, "k-1", now + 10)
        .await
        .expect("lookup")
        .expect("live");
    assert_eq!(record.object_id, first.id.as_str());
    assert_eq!(record.kind, IdempotentKind::File);
    assert_eq!(record.request_hash, "h1");
    // the same key again, whatever the request: nothing recorded, the first claim returned
    let second = file(&t.id, now * 1_000_000 + 1, Purpose::Batch, None);
    let again = key_claim("k-1", IdempotentKind::File, "h2", now + 10);
    assert_eq!(
        store
            .insert_file_once(&second, Some(&again), &Quotas::UNLIMITED)
            .await
            .expect("insert"),
        Inserted::Replayed(record.clone())
    );
    assert_eq!(
        store
            .get_file(&t.id, &second.id, now + 10)
            .await
            .expect("get"),
        None
    );
    // a batch with the tenant's live key records nothing either
    let b = batch(&t.id, now * 1_000_000);
    assert_eq!(
        store
            .insert_batch_once(
                &b,
                None,
                Some(&key_claim("k-1", IdempotentKind::Batch, "h3", now)),
                &Quotas::UNLIMITED
            )
            .await
            .expect("insert"),
        Inserted::Replayed(record.clone())
    );
    assert_eq!(store.get_batch(&t.id, &b.id).await.expect("get"), None);
    // keys are per tenant
    assert_eq!(
        store
            .idempotency_record(&other.id, "k-1", now)
            .await
            .expect("lookup"),
        None
    );
    let theirs = batch(&other.id, now * 1_000_000);
    assert_eq!(
        store
            .insert_batch_once(
                &theirs,
                None,
                Some(&key_claim("k-1", IdempotentKind::Batch, "h", now)),
                &Quotas::UNLIMITED
            )
            .await
            .expect("insert"),
        Inserted::Created
    );
    assert!(
        store
            .get_batch(&other.id, &theirs.id)
            .await
            .expect("get")
            .is_some()
    );
    // without a key, inserts are plain
    let plain = file(&t.id, now * 1_000_000 + 2, Purpose::Batch, None);
    assert_eq!(
        store
            .insert_file_once(&plain, None, &Quotas::UNLIMITED)
            .await
            .expect("insert"),
        Inserted::Created
    );
    // 24 hours later the key is no longer live: ignored, then claimed anew
    let day = nightshift_core::idempotency::IDEMPOTENCY_TTL_SECS;
    assert_eq!(
        store
            .idempotency_record(&t.id, "k-1", now + day)
            .await
            .expect("lookup"),
        None
    );
    let later = batch(&t.id, (now + day) * 1_000_000);
    assert_eq!(
        store
            .insert_batch_once(
                &later,
                None,
                Some(&key_claim("k-1", IdempotentKind::Batch, "h4", now + day)),
                &Quotas::UNLIMITED
            )
            .await
            .expect("insert"),
        Inserted::Created
    );
    let renewed = store
        .idempotency_record(&t.id, "k-1", now + day)
        .await
        .expect("lookup")
        .expect("live again");
    assert_eq!(renewed.object_id, later.id.as_str());
    assert_eq!(renewed.kind, IdempotentKind::Batch);
    // the sweep removes keys past their day, and only those
    assert!(
        store
            .sweep_idempotency_keys(now + day, 100)
            .await
            .expect("sweep")
            >= 1,
        "the other tenant's key of NOW is past its day"
    );
    assert!(
        store
            .idempotency_record(&t.id, "k-1", now + day)
            .await
            .expect("lookup")
            .is_some()
    );
    assert_eq!(
        store
            .idempotency_record(&other.id, "k-1", now + day - 1)
            .await
            .expect("lookup"),
        None,
        "swept"
    );
}

/// Concurrent inserts claiming one key record one object; every other one gets the winner's
/// claim.
async fn idempotency_key_races_make_one_object(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    let now = NOW;
    let attempts = (0..8).map(|i| {
        let f = file(&t.id, now * 1_000_000 + i, Purpose::Batch, None);
        let c = key_claim("race", IdempotentKind::File, "same", now);
        async move {
            let outcome = store
                .insert_file_once(&f, Some(&c), &Quotas::UNLIMITED)
                .await
                .expect("insert");
            (f.id, outcome)
        }
    });
    let outcomes = futures::future::join_all(attempts).await;
    let created: Vec<&FileId> = outcomes
        .iter()
        .filter(|(_, o)| *o == Inserted::Created)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(created.len(), 1, "{outcomes:?}");
    for (_, outcome) in &outcomes {
        if let Inserted::Replayed(r) = outcome {
            assert_eq!(r.object_id, created[0].as_str());
        }
    }
    let page = store
        .list_files(
            &t.id,
            &FileQuery {
                purpose: None,
                limit: 100,
                order: Order::Asc,
                after: None,
            },
            now,
        )
        .await
        .expect("list");
    assert_eq!(page.files.len(), 1);
}

/// A retry batch records where its input comes from, and its parent lists it.
async fn retries_are_linked_to_their_parent(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    let other = new_tenant(store).await;
    let parent = batch(&t.id, NOW * 1_000_000);
    store.insert_batch(&parent).await.expect("parent");
    let plain = batch(&t.id, NOW * 1_000_000 + 1);
    store.insert_batch(&plain).await.expect("plain");
    assert_eq!(store.retry_source(&plain.id).await.expect("source"), None);
    let mut children = Vec::new();
    for i in 0..3 {
        let child = batch(&t.id, NOW * 1_000_000 + 10 + i);
        let source = RetrySource {
            batch: child.id.clone(),
            tenant: t.id.clone(),
            retry_of: parent.id.clone(),
            filter: RetryFilter {
                error_codes: vec!["batch_expired".into()],
                status_codes: vec![429],
                status_classes: vec![5],
            },
        };
        assert_eq!(
            store
                .insert_batch_once(&child, Some(&source), None, &Quotas::UNLIMITED)
                .await
                .expect("child"),
            Inserted::Created
        );
        assert_eq!(
            store.retry_source(&child.id).await.expect("source"),
            Some(source)
        );
        children.push(child.id);
    }
    let page = store
        .list_retries(&t.id, &parent.id, 2, None)
        .await
        .expect("list");
    let ids: Vec<&BatchId> = page.batches.iter().map(|b| &b.id).collect();
    assert_eq!(ids, [&children[2], &children[1]], "newest first");
    assert!(page.has_more);
    let rest = store
        .list_retries(&t.id, &parent.id, 2, Some(&children[1]))
        .await
        .expect("list");
    let ids: Vec<&BatchId> = rest.batches.iter().map(|b| &b.id).collect();
    assert_eq!(ids, [&children[0]]);
    assert!(!rest.has_more);
    // another tenant sees none; a batch with no retries has none
    assert!(
        store
            .list_retries(&other.id, &parent.id, 10, None)
            .await
            .expect("list")
            .batches
            .is_empty()
    );
    assert!(
        store
            .list_retries(&t.id, &plain.id, 10, None)
            .await
            .expect("list")
            .batches
            .is_empty()
    );
}

/// Declares the suite in an adapter's integration tests: one `#[tokio::test]` per check, each
/// calling `$run(name)` — an `async fn(&str)` of the test file that builds a fresh adapter and
/// gives it to [`run`](crate::conformance::run) with the check's name.
#[macro_export]
macro_rules! conformance_tests {
    ($run:path) => {
        $crate::__metadata_conformance_checks!($crate::conformance_tests { @declare $run; });
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

/// The dispatcher's fairness accounts. The one check that writes them: saving replaces the
/// whole set.
async fn dispatch_accounts_are_replaced_whole(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    let other = new_tenant(store).await;
    let account = |model: &str, tenant: &Tenant, served: u64| DispatchAccount {
        model: model.into(),
        tenant: tenant.id.clone(),
        served,
    };
    let sorted = |mut accounts: Vec<DispatchAccount>| {
        accounts.sort();
        accounts
    };
    let first = vec![
        account("model-a", &t, 4000),
        account("model-a", &other, 3500),
        account("model-b", &t, 7),
        // the largest count a store keeps
        account("model-c", &other, i64::MAX as u64),
    ];
    store.save_dispatch_accounts(&first).await.expect("save");
    assert_eq!(
        sorted(store.dispatch_accounts().await.expect("accounts")),
        sorted(first)
    );
    // counts move, a tenant without work on a model is left out and forgotten
    let second = vec![account("model-a", &t, 4500), account("model-b", &other, 9)];
    store.save_dispatch_accounts(&second).await.expect("save");
    assert_eq!(
        sorted(store.dispatch_accounts().await.expect("accounts")),
        sorted(second)
    );
    // a count beyond what the store keeps is refused, and the accounts stay as they were
    let refused = store
        .save_dispatch_accounts(&[account("model-a", &t, u64::MAX)])
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(store.dispatch_accounts().await.expect("accounts").len(), 2);
    store.save_dispatch_accounts(&[]).await.expect("save none");
    assert!(
        store
            .dispatch_accounts()
            .await
            .expect("accounts")
            .is_empty()
    );
}

/// The defaults the quota checks below run with (0 = unlimited).
fn limits(active: u64, enqueued: u64, stored: u64) -> Quotas {
    Quotas {
        max_active_batches: active,
        max_enqueued_requests: enqueued,
        max_stored_bytes: stored,
    }
}

fn over_quota<T: std::fmt::Debug>(r: crate::Result<T>) -> QuotaExceeded {
    match r {
        Err(MetadataError::QuotaExceeded(e)) => e,
        other => panic!("expected a quota refusal, got {other:?}"),
    }
}

fn ready(total: u64) -> ValidationOutcome {
    ValidationOutcome::Ready {
        model: "m".into(),
        total,
        chunks: vec![ChunkSpan {
            index: 0,
            byte_start: 0,
            byte_end: 10,
            first_line: 1,
            line_count: u32::try_from(total).expect("a small batch"),
        }],
    }
}

/// Overrides are per tenant, start empty (the defaults apply), are replaced as a whole, and
/// an unknown tenant has none and cannot get any.
async fn quota_overrides_replace_the_defaults(store: &dyn MetadataStore) {
    let t = new_tenant(store).await;
    let other = new_tenant(store).await;
    assert_eq!(
        store.tenant_quotas(&t.id).await.expect("read"),
        Some(QuotaOverrides::default())
    );
    let set = QuotaOverrides {
        max_active_batches: Some(3),
        max_enqueued_requests: Some(0),
        max_stored_bytes: None,
    };
    assert!(
        store
            .set_tenant_quotas(&t.id, &set, NOW)
            .await
            .expect("set")
    );
    assert_eq!(store.tenant_quotas(&t.id).await.expect("read"), Some(set));
    assert_eq!(
        set.over(&limits(10, 20, 30)),
        limits(3, 0, 30),
        "each override, else its default"
    );
    assert_eq!(
        store.tenant_quotas(&other.id).await.expect("read"),
        Some(QuotaOverrides::default()),
        "another tenant keeps the defaults"
    );
    let back = QuotaOverrides {
        max_stored_bytes: Some(7),
        ..QuotaOverrides::default()
    };
    assert!(
        store
            .set_tenant_quotas(&t.id, &back, NOW + 1)
            .await
            .expect("set")
    );
    assert_eq!(store.tenant_quotas(&t.id).await.expect("read"), Some(back));
    let unknown = TenantId::generate();
    assert_eq!(store.tenant_quotas(&unknown).await.expect("read"), None);
    assert!(
        !store
            .set_tenant_quotas(&unknown, &set, NOW)
            .await
            .expect("set")
    );
    let listed = store.list_tenants().await.expect("list");
    let at = |id: &TenantId| listed.iter().position(|x| &x.id == id).expect("listed");
    assert!(at(&t.id) < at(&other.id), "oldest first");
    assert_eq!(
        store.quota_usage(&t.id, NOW).await.expect("usage"),
        QuotaUsage::default()
    );
}

/// A tenant at its `max_active_batches` gets a refusal and nothing is recorded; a batch that
/// ends frees its place; an override beats the default (0: unlimited); another tenant and a
/// replayed idempotency key are not refused.
async fn the_active_batch_quota_refuses_one_more(store: &dyn MetadataStore) {
    let quotas = limits(2, 0, 0);
    let t = new_tenant(store).await;
    let first = batch(&t.id, NOW * 1_000_000);
    let c = key_claim("k", IdempotentKind::Batch, "h", NOW);
    assert_eq!(
        store
            .insert_batch_once(&first, None, Some(&c), &quotas)
            .await
            .expect("first"),
        Inserted::Created
    );
    let second = batch(&t.id, NOW * 1_000_000 + 1);
    store
        .insert_batch_once(&second, None, None, &quotas)
        .await
        .expect("second");
    let third = batch(&t.id, NOW * 1_000_000 + 2);
    let refused = over_quota(store.insert_batch_once(&third, None, None, &quotas).await);
    assert_eq!(
        refused,
        QuotaExceeded {
            quota: Quota::ActiveBatches,
            limit: 2,
            held: 2,
            adding: 1
        }
    );
    assert_eq!(
        store.batch(&third.id).await.expect("read"),
        None,
        "nothing recorded"
    );
    // the same request again (its key is live) is answered, not refused
    let again = batch(&t.id, NOW * 1_000_000 + 3);
    assert!(matches!(
        store
            .insert_batch_once(&again, None, Some(&c), &quotas)
            .await,
        Ok(Inserted::Replayed(_))
    ));
    // another tenant has its own count
    let other = new_tenant(store).await;
    store
        .insert_batch_once(&batch(&other.id, NOW * 1_000_000), None, None, &quotas)
        .await
        .expect("another tenant");
    // an ended batch no longer counts
    store
        .finish_validation(
            &first.id,
            &ValidationOutcome::Failed { errors: vec![] },
            NOW + 1,
            &quotas,
        )
        .await
        .expect("fail")
        .expect("moved");
    store
        .insert_batch_once(&third, None, None, &quotas)
        .await
        .expect("a place was freed");
    assert_eq!(
        store
            .quota_usage(&t.id, NOW)
            .await
            .expect("usage")
            .active_batches,
        2
    );
    // overrides: one more place, then none at all
    let fourth = batch(&t.id, NOW * 1_000_000 + 4);
    over_quota(store.insert_batch_once(&fourth, None, None, &quotas).await);
    let three = QuotaOverrides {
        max_active_batches: Some(3),
        ..QuotaOverrides::default()
    };
    store
        .set_tenant_quotas(&t.id, &three, NOW)
        .await
        .expect("set");
    store
        .insert_batch_once(&fourth, None, None, &quotas)
        .await
        .expect("under the override");
    let fifth = batch(&t.id, NOW * 1_000_000 + 5);
    assert_eq!(
        over_quota(store.insert_batch_once(&fifth, None, None, &quotas).await).limit,
        3
    );
    let unlimited = QuotaOverrides {
        max_active_batches: Some(0),
        ..QuotaOverrides::default()
    };
    store
        .set_tenant_quotas(&t.id, &unlimited, NOW)
        .await
        .expect("set");
    store
        .insert_batch_once(&fifth, None, None, &quotas)
        .await
        .expect("unlimited");
}

/// A validated batch whose lines would take its tenant's active batches past
/// `max_enqueued_requests` fails with `request_limit_exceeded` and gets no chunks; one that
/// fits exactly runs.
async fn the_enqueued_request_quota_fails_the_batch_at_validation(store: &dyn MetadataStore) {
    let quotas = limits(0, 10, 0);
    let t = new_tenant(store).await;
    let [a, b, c] = [0, 1, 2].map(|i| batch(&t.id, NOW * 1_000_000 + i));
    for x in [&a, &b, &c] {
        store.insert_batch(x).await.expect("insert");
    }
    let running = store
        .finish_validation(&a.id, &ready(6), NOW + 1, &quotas)
        .await
        .expect("finish")
        .expect("moved");
    assert_eq!(running.status, BatchStatus::InProgress);
    let failed = store
        .finish_validation(&b.id, &ready(5), NOW + 1, &quotas)
        .await
        .expect("finish")
        .expect("moved");
    assert_eq!(failed.status, BatchStatus::Failed);
    assert_eq!(failed.errors.len(), 1);
    assert_eq!(failed.errors[0].code, REQUEST_LIMIT_EXCEEDED);
    assert!(
        failed.errors[0].message.contains("10"),
        "{}",
        failed.errors[0].message
    );
    assert!(store.chunks(&b.id).await.expect("chunks").is_empty());
    let fits = store
        .finish_validation(&c.id, &ready(4), NOW + 1, &quotas)
        .await
        .expect("finish")
        .expect("moved");
    assert_eq!(
        fits.status,
        BatchStatus::InProgress,
        "6 + 4 is the limit, not past it"
    );
    assert_eq!(
        store.quota_usage(&t.id, NOW + 1).await.expect("usage"),
        QuotaUsage {
            active_batches: 2,
            enqueued_requests: 10,
            stored_bytes: 0
        }
    );
    // another tenant, and an override, are their own
    let other = new_tenant(store).await;
    let d = batch(&other.id, NOW * 1_000_000);
    store.insert_batch(&d).await.expect("insert");
    let more = QuotaOverrides {
        max_enqueued_requests: Some(100),
        ..QuotaOverrides::default()
    };
    store
        .set_tenant_quotas(&other.id, &more, NOW)
        .await
        .expect("set");
    let big = store
        .finish_validation(&d.id, &ready(50), NOW + 1, &quotas)
        .await
        .expect("finish")
        .expect("moved");
    assert_eq!(big.status, BatchStatus::InProgress);
}

/// Stored bytes are the tenant's visible files: a file that would pass `max_stored_bytes` is
/// refused and not recorded; a deleted or expired one no longer counts.
async fn the_stored_bytes_quota_counts_visible_files(store: &dyn MetadataStore) {
    let quotas = limits(0, 0, 300);
    let t = new_tenant(store).await;
    let at = |i: i64| NOW * 1_000_000 + i;
    let one = file(&t.id, at(0), Purpose::Batch, None);
    let two = file(&t.id, at(1), Purpose::Batch, Some(NOW + 10));
    for f in [&one, &two] {
        store
            .insert_file_once(f, None, &quotas)
            .await
            .expect("insert");
    }
    let three = file(&t.id, at(2), Purpose::Batch, None);
    assert_eq!(
        over_quota(store.insert_file_once(&three, None, &quotas).await),
        QuotaExceeded {
            quota: Quota::StoredBytes,
            limit: 300,
            held: 246,
            adding: 123
        }
    );
    assert_eq!(
        store.get_file(&t.id, &three.id, NOW).await.expect("get"),
        None
    );
    store
        .delete_file(&t.id, &one.id, NOW)
        .await
        .expect("delete");
    store
        .insert_file_once(&three, None, &quotas)
        .await
        .expect("a deleted file frees its bytes");
    assert_eq!(
        store
            .quota_usage(&t.id, NOW)
            .await
            .expect("usage")
            .stored_bytes,
        246
    );
    // past its expiry, `two` no longer counts
    let later = file(&t.id, (NOW + 10) * 1_000_000, Purpose::Batch, None);
    store
        .insert_file_once(&later, None, &quotas)
        .await
        .expect("an expired file frees its bytes");
    assert_eq!(
        store
            .quota_usage(&t.id, NOW + 10)
            .await
            .expect("usage")
            .stored_bytes,
        246
    );
}

/// Creates racing for a tenant's last places: exactly the quota is admitted, batches and
/// bytes alike.
async fn concurrent_creates_cannot_overshoot_a_quota(store: &dyn MetadataStore) {
    let quotas = limits(3, 0, 1000);
    let t = new_tenant(store).await;
    let creates = (0..10).map(|i| {
        let b = batch(&t.id, NOW * 1_000_000 + i);
        async move { store.insert_batch_once(&b, None, None, &quotas).await }
    });
    let outcomes = futures::future::join_all(creates).await;
    let created = outcomes.iter().filter(|o| o.is_ok()).count();
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Err(MetadataError::QuotaExceeded(_))))
        .count();
    assert_eq!((created, refused), (3, 7), "{outcomes:?}");
    let uploads = (0..16).map(|i| {
        let f = file(&t.id, NOW * 1_000_000 + i, Purpose::Batch, None);
        async move { store.insert_file_once(&f, None, &quotas).await }
    });
    let outcomes = futures::future::join_all(uploads).await;
    let stored = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(stored, 8, "8 × 123 bytes fit in 1000: {outcomes:?}");
    assert_eq!(
        store.quota_usage(&t.id, NOW).await.expect("usage"),
        QuotaUsage {
            active_batches: 3,
            enqueued_requests: 0,
            stored_bytes: 984
        }
    );
}
