//! The conformance suite every [`MetadataStore`] adapter must pass.
//!
//! Checks create their own tenants (random names and keys), so they run in parallel against
//! one shared database and never see each other's rows.

use futures::future::BoxFuture;
use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::page::Order;
use nightshift_core::{FileId, TenantId, apikey};

use crate::{FileQuery, MetadataError, MetadataStore, Tenant};

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
