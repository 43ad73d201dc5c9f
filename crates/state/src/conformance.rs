//! The conformance suite every [`LiveState`] adapter must pass.
//!
//! Each check takes a state that holds nothing for the batch ids it uses (give each run its own
//! key prefix, or a fresh adapter) and panics with a message on the first violation of the
//! port's contract. Adapters run them from their tests, one `#[tokio::test]` per check.
//! Checks take the state as an `Arc` so they can record from spawned tasks; run them on a
//! multi-threaded runtime so those tasks really run in parallel.
//!
//! Built with the `testsuite` feature only (an adapter's tests enable it through a
//! dev-dependency): an adapter's test file defines `async fn run(name: &str)`, which builds a
//! fresh adapter and calls [`run`], and declares one test per check with
//! [`conformance_tests!(run)`](crate::conformance_tests).

use std::collections::BTreeSet;
use std::sync::Arc;

use std::time::{Duration, Instant};

use crate::{
    LineOutcome, LiveCounts, LiveState, MAX_LINE, MAX_USAGE_PER_CALL, PermitGrant, PermitLease,
    StateError, Usage,
};

/// Every check of the suite, named once: calls `$then!` with `$args` followed by the checks'
/// names. Both [`run`] and each adapter's tests ([`conformance_tests!`](crate::conformance_tests))
/// are made from this list, so a check can be left out of neither, and a check written but not
/// listed is dead code.
#[doc(hidden)]
#[macro_export]
macro_rules! __state_conformance_checks {
    ($then:path { $($args:tt)* }) => {
        $then! { $($args)*
            record_then_counts,
            duplicates_within_one_call,
            duplicates_across_calls,
            concurrent_records_count_once,
            usage_sums_every_field,
            unknown_batch_is_empty,
            counts_many_keeps_order,
            cancel_flag,
            clear_removes_everything,
            batches_are_independent,
            invalid_input_is_refused_whole,
            large_calls_and_high_lines,
            ping,
            leases_share_the_cap,
            leases_converge_to_fair_shares,
            lease_release_and_expiry,
            leases_never_sum_above_the_cap,
            invalid_lease_is_refused,
        }
    };
}

macro_rules! dispatch {
    ($($check:ident,)+) => {
        /// Runs the check named `name` against `state`.
        ///
        /// # Panics
        /// When the check fails, or no check has that name.
        pub async fn run(name: &str, state: Arc<dyn LiveState>) {
            match name {
                $(stringify!($check) => $check(state).await,)+
                other => panic!("no live-state conformance check named {other:?}"),
            }
        }
    };
}

crate::__state_conformance_checks!(dispatch {});

/// The usage the suite gives line `line` when it succeeds: a different value in every field, so
/// that a field summed into another shows.
pub fn usage_of(line: u64) -> Usage {
    let input = line % 97 + 1;
    let output = line % 89 + 2;
    let mut usage = Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: input + output,
        ..Usage::default()
    };
    usage.input_tokens_details.cached_tokens = line % 13;
    usage.output_tokens_details.reasoning_tokens = line % 7 + 3;
    usage
}

/// The outcome the suite gives line `line`: every fifth line fails (without usage), the others
/// succeed with [`usage_of`].
pub fn outcome_of(line: u64) -> LineOutcome {
    if line.is_multiple_of(5) {
        LineOutcome::failed(line)
    } else {
        LineOutcome::succeeded(line, usage_of(line))
    }
}

/// What a batch must read after recording [`outcome_of`] of each of `lines` (duplicates
/// counted once).
pub fn expected(lines: impl IntoIterator<Item = u64>) -> LiveCounts {
    let mut counts = LiveCounts::default();
    for line in lines.into_iter().collect::<BTreeSet<_>>() {
        let outcome = outcome_of(line);
        if outcome.succeeded {
            counts.completed += 1;
        } else {
            counts.failed += 1;
        }
        counts.usage.merge(&outcome.usage);
    }
    counts
}

/// [`outcome_of`] each of `lines`, in order.
pub fn outcomes(lines: impl IntoIterator<Item = u64>) -> Vec<LineOutcome> {
    lines.into_iter().map(outcome_of).collect()
}

async fn record(state: &dyn LiveState, batch: &str, outcomes: &[LineOutcome]) -> u64 {
    state
        .record(batch, outcomes)
        .await
        .unwrap_or_else(|e| panic!("record {} lines of {batch}: {e}", outcomes.len()))
}

async fn counts(state: &dyn LiveState, batch: &str) -> LiveCounts {
    state
        .counts(batch)
        .await
        .unwrap_or_else(|e| panic!("counts of {batch}: {e}"))
}

fn assert_invalid<T: std::fmt::Debug>(result: crate::Result<T>, what: &str) {
    assert!(
        matches!(result, Err(StateError::InvalidInput(_))),
        "{what}: expected InvalidInput, got {result:?}"
    );
}

/// Records lines `1..=5000` of `batch` from one spawned task per entry of `states` (they may
/// be clones of one adapter, or several adapters over the same backend), with overlapping line
/// sets, each task recording its chunks of 100 twice (the second time in reverse order, as
/// redeliveries would). Asserts that the calls together report every line newly counted
/// exactly once and that the batch reads exactly [`expected`]`(1..=5000)`.
pub async fn concurrent_records(states: &[Arc<dyn LiveState>], batch: &str) {
    const LINES: u64 = 5000;
    let tasks = states.len() as u64;
    assert!(tasks > 0, "concurrent_records needs at least one state");
    // Task t covers a window three strides long starting at its own stride (the last ones run
    // into the end), plus lines 1..=200 that every task records.
    let stride = LINES.div_ceil(tasks);
    let mut handles = Vec::new();
    let mut all_lines = BTreeSet::new();
    for (t, state) in (0..tasks).zip(states) {
        let start = t * stride + 1;
        let end = (start + 3 * stride - 1).min(LINES);
        let lines: BTreeSet<u64> = (1..=200).chain(start..=end).collect();
        all_lines.extend(lines.iter().copied());
        let chunks: Vec<Vec<LineOutcome>> = outcomes(lines)
            .chunks(100)
            .map(<[LineOutcome]>::to_vec)
            .collect();
        let state = Arc::clone(state);
        let batch = batch.to_owned();
        handles.push(tokio::spawn(async move {
            let mut fresh = 0;
            for chunk in chunks.iter().chain(chunks.iter().rev()) {
                fresh += record(&*state, &batch, chunk).await;
            }
            fresh
        }));
    }
    assert_eq!(
        all_lines,
        (1..=LINES).collect::<BTreeSet<_>>(),
        "the tasks' line sets must cover every line"
    );
    let mut fresh = 0;
    for handle in handles {
        fresh += handle.await.expect("recording task panicked");
    }
    assert_eq!(
        fresh, LINES,
        "concurrent calls together must report each line newly counted exactly once"
    );
    assert_eq!(counts(&*states[0], batch).await, expected(1..=LINES));
}

async fn record_then_counts(state: Arc<dyn LiveState>) {
    let s = &*state;
    assert_eq!(record(s, "batch_rc", &outcomes(1..=10)).await, 10);
    let after_ten = counts(s, "batch_rc").await;
    assert_eq!(after_ten, expected(1..=10));
    assert_eq!((after_ten.completed, after_ten.failed), (8, 2));
    assert_eq!(after_ten.finished(), 10);
    // a later chunk adds to the same batch
    assert_eq!(record(s, "batch_rc", &outcomes(11..=25)).await, 15);
    assert_eq!(counts(s, "batch_rc").await, expected(1..=25));
    // lines need not come in order
    assert_eq!(record(s, "batch_rc", &outcomes([40, 31, 26])).await, 3);
    assert_eq!(
        counts(s, "batch_rc").await,
        expected((1..=25).chain([26, 31, 40]))
    );
}

async fn duplicates_within_one_call(state: Arc<dyn LiveState>) {
    let s = &*state;
    let call = [
        LineOutcome::succeeded(1, usage_of(1)),
        LineOutcome::failed(1),
        LineOutcome::succeeded(2, usage_of(2)),
        LineOutcome::succeeded(2, usage_of(200)),
        LineOutcome::failed(3),
        LineOutcome::succeeded(3, usage_of(3)),
        LineOutcome::failed(3),
    ];
    assert_eq!(
        record(s, "batch_dup", &call).await,
        3,
        "a line repeated in one call counts once"
    );
    // the first outcome of each line is the one counted
    let mut usage = usage_of(1);
    usage.merge(&usage_of(2));
    assert_eq!(
        counts(s, "batch_dup").await,
        LiveCounts {
            completed: 2,
            failed: 1,
            usage
        }
    );
}

async fn duplicates_across_calls(state: Arc<dyn LiveState>) {
    let s = &*state;
    let chunk = outcomes(1..=100);
    assert_eq!(record(s, "batch_redeliver", &chunk).await, 100);
    // the same chunk redelivered
    assert_eq!(record(s, "batch_redeliver", &chunk).await, 0);
    assert_eq!(counts(s, "batch_redeliver").await, expected(1..=100));
    // redelivered with different outcomes (a retried request that failed this time)
    let all_failed: Vec<_> = (1..=100).map(LineOutcome::failed).collect();
    assert_eq!(record(s, "batch_redeliver", &all_failed).await, 0);
    assert_eq!(counts(s, "batch_redeliver").await, expected(1..=100));
    // a partly new chunk counts only its new lines
    assert_eq!(record(s, "batch_redeliver", &outcomes(51..=150)).await, 50);
    assert_eq!(counts(s, "batch_redeliver").await, expected(1..=150));
    // one line at a time, again
    for line in [1, 75, 150] {
        assert_eq!(record(s, "batch_redeliver", &outcomes([line])).await, 0);
    }
    assert_eq!(counts(s, "batch_redeliver").await, expected(1..=150));
}

async fn concurrent_records_count_once(state: Arc<dyn LiveState>) {
    let states = vec![state; 8];
    concurrent_records(&states, "batch_concurrent").await;
}

async fn usage_sums_every_field(state: Arc<dyn LiveState>) {
    let s = &*state;
    let usage = |input, cached, output, reasoning, total| {
        let mut usage = Usage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: total,
            ..Usage::default()
        };
        usage.input_tokens_details.cached_tokens = cached;
        usage.output_tokens_details.reasoning_tokens = reasoning;
        usage
    };
    let call = [
        LineOutcome::succeeded(1, usage(1, 10, 100, 1_000, 10_000)),
        LineOutcome::succeeded(2, usage(2, 20, 200, 2_000, 20_000)),
        // usage is added as given, even for a failed line
        LineOutcome {
            line: 3,
            succeeded: false,
            usage: usage(4, 40, 400, 4_000, 40_000),
        },
    ];
    assert_eq!(record(s, "batch_usage", &call).await, 3);
    assert_eq!(
        counts(s, "batch_usage").await,
        LiveCounts {
            completed: 2,
            failed: 1,
            usage: usage(7, 70, 700, 7_000, 70_000)
        }
    );
    // large sums stay exact: a call may sum up to MAX_USAGE_PER_CALL per field, and the totals
    // over calls go beyond it
    let big = MAX_USAGE_PER_CALL;
    assert_eq!(
        record(
            s,
            "batch_usage_big",
            &[LineOutcome::succeeded(1, usage(big, big - 1, 1, 0, big))]
        )
        .await,
        1
    );
    assert_eq!(
        record(
            s,
            "batch_usage_big",
            &[
                LineOutcome::succeeded(2, usage(big - 3, 1, 0, 0, 12_345)),
                LineOutcome::succeeded(3, usage(2, 1, 0, 0, 0)),
            ]
        )
        .await,
        2
    );
    assert_eq!(
        counts(s, "batch_usage_big").await.usage,
        usage(2 * big - 1, big + 1, 1, 0, big + 12_345)
    );
}

async fn unknown_batch_is_empty(state: Arc<dyn LiveState>) {
    let s = &*state;
    assert_eq!(counts(s, "batch_nobody").await, LiveCounts::default());
    assert!(!s.is_cancelled("batch_nobody").await.expect("is_cancelled"));
    assert_eq!(
        s.counts_many(&["batch_nobody", "batch_nobody_either"])
            .await
            .expect("counts_many"),
        vec![LiveCounts::default(); 2]
    );
    s.clear("batch_nobody").await.expect("clear unknown");
    // reading or clearing creates nothing
    assert_eq!(counts(s, "batch_nobody").await, LiveCounts::default());
}

async fn counts_many_keeps_order(state: Arc<dyn LiveState>) {
    let s = &*state;
    assert_eq!(record(s, "batch_m1", &outcomes(1..=3)).await, 3);
    assert_eq!(record(s, "batch_m2", &outcomes([5])).await, 1);
    assert_eq!(record(s, "batch_m3", &outcomes(10..=30)).await, 21);
    let (m1, m2, m3) = (expected(1..=3), expected([5]), expected(10..=30));
    assert_eq!(
        s.counts_many(&[
            "batch_m2",
            "batch_m_unknown",
            "batch_m1",
            "batch_m3",
            "batch_m2"
        ])
        .await
        .expect("counts_many"),
        vec![m2, LiveCounts::default(), m1, m3, m2]
    );
    for (batch, want) in [("batch_m1", m1), ("batch_m2", m2), ("batch_m3", m3)] {
        assert_eq!(counts(s, batch).await, want, "{batch}");
    }
    assert!(
        s.counts_many(&[])
            .await
            .expect("counts_many of nothing")
            .is_empty()
    );
    // many at once
    let many: Vec<String> = (0..300).map(|i| format!("batch_m_many_{i}")).collect();
    let ids: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        s.counts_many(&ids).await.expect("counts_many of 300"),
        vec![LiveCounts::default(); 300]
    );
}

async fn cancel_flag(state: Arc<dyn LiveState>) {
    let s = &*state;
    let cancelled = |batch: &'static str| async move {
        s.is_cancelled(batch)
            .await
            .unwrap_or_else(|e| panic!("is_cancelled {batch}: {e}"))
    };
    assert!(!cancelled("batch_c1").await);
    s.set_cancelled("batch_c1").await.expect("set_cancelled");
    assert!(cancelled("batch_c1").await);
    s.set_cancelled("batch_c1")
        .await
        .expect("set_cancelled is idempotent");
    assert!(cancelled("batch_c1").await);
    assert!(
        !cancelled("batch_c2").await,
        "the flag is per batch, not global"
    );
    // the flag neither counts anything nor is lowered by recording
    assert_eq!(counts(s, "batch_c1").await, LiveCounts::default());
    assert_eq!(record(s, "batch_c1", &outcomes(1..=5)).await, 5);
    assert!(cancelled("batch_c1").await);
    assert_eq!(counts(s, "batch_c1").await, expected(1..=5));
    s.clear("batch_c1").await.expect("clear");
    assert!(!cancelled("batch_c1").await);
}

async fn clear_removes_everything(state: Arc<dyn LiveState>) {
    let s = &*state;
    assert_eq!(record(s, "batch_clear", &outcomes(1..=10)).await, 10);
    s.set_cancelled("batch_clear").await.expect("set_cancelled");
    s.clear("batch_clear").await.expect("clear");
    assert_eq!(counts(s, "batch_clear").await, LiveCounts::default());
    assert!(!s.is_cancelled("batch_clear").await.expect("is_cancelled"));
    s.clear("batch_clear").await.expect("clear is idempotent");
    // the per-line marks went too: a line recorded after clear counts again (which is why
    // only the finalizer clears, once no executor records lines of the batch any more)
    assert_eq!(record(s, "batch_clear", &outcomes(1..=10)).await, 10);
    assert_eq!(counts(s, "batch_clear").await, expected(1..=10));
    s.clear("batch_clear").await.expect("clear");
}

async fn batches_are_independent(state: Arc<dyn LiveState>) {
    let s = &*state;
    assert_eq!(record(s, "batch_x", &outcomes(1..=50)).await, 50);
    assert_eq!(
        record(s, "batch_y", &outcomes(1..=50)).await,
        50,
        "the same line numbers in another batch are other lines"
    );
    assert_eq!(record(s, "batch_y", &outcomes(51..=60)).await, 10);
    s.set_cancelled("batch_x").await.expect("set_cancelled");
    assert_eq!(counts(s, "batch_x").await, expected(1..=50));
    assert_eq!(counts(s, "batch_y").await, expected(1..=60));
    assert!(!s.is_cancelled("batch_y").await.expect("is_cancelled"));
    s.clear("batch_x").await.expect("clear");
    assert_eq!(counts(s, "batch_x").await, LiveCounts::default());
    assert_eq!(counts(s, "batch_y").await, expected(1..=60));
    // a batch id that extends another one is another batch
    assert_eq!(counts(s, "batch_x1").await, LiveCounts::default());
    assert_eq!(record(s, "batch_x1", &outcomes(1..=50)).await, 50);
}

async fn invalid_input_is_refused_whole(state: Arc<dyn LiveState>) {
    let s = &*state;
    let good = outcomes(1..=3);
    for bad_id in ["", "batch_{x}", "batch:x", "batch x", &"b".repeat(129)] {
        assert_invalid(s.record(bad_id, &good).await, "record with a bad id");
        assert_invalid(s.counts(bad_id).await, "counts with a bad id");
        assert_invalid(
            s.counts_many(&["batch_ok", bad_id]).await,
            "counts_many with a bad id",
        );
        assert_invalid(s.set_cancelled(bad_id).await, "set_cancelled with a bad id");
        assert_invalid(s.is_cancelled(bad_id).await, "is_cancelled with a bad id");
        assert_invalid(s.clear(bad_id).await, "clear with a bad id");
    }
    let mut huge = usage_of(1);
    huge.input_tokens = MAX_USAGE_PER_CALL;
    let bad_calls = [
        ("line 0", LineOutcome::failed(0)),
        ("a line above MAX_LINE", LineOutcome::failed(MAX_LINE + 1)),
        (
            "usage summing above the limit",
            LineOutcome::succeeded(4, huge),
        ),
    ];
    for (what, bad) in bad_calls {
        // the good lines of a refused call are not recorded either
        let mut call = good.clone();
        call.push(bad);
        assert_invalid(s.record("batch_valid", &call).await, what);
        assert_eq!(
            counts(s, "batch_valid").await,
            LiveCounts::default(),
            "{what}: a refused call must write nothing"
        );
    }
    assert_eq!(record(s, "batch_valid", &good).await, 3);
    assert_eq!(counts(s, "batch_valid").await, expected(1..=3));
    assert_eq!(record(s, "batch_valid", &[]).await, 0, "an empty call");
    assert_eq!(counts(s, "batch_valid").await, expected(1..=3));
}

async fn large_calls_and_high_lines(state: Arc<dyn LiveState>) {
    let s = &*state;
    // a big chunk is one call
    assert_eq!(
        record(s, "batch_large", &outcomes(1..=10_000)).await,
        10_000
    );
    assert_eq!(counts(s, "batch_large").await, expected(1..=10_000));
    // a 10-million-line batch finishing its last chunk first
    let high = [10_000_000, 9_999_999, 10_000_000];
    assert_eq!(record(s, "batch_high", &outcomes(high)).await, 2);
    assert_eq!(record(s, "batch_high", &outcomes([1, 9_999_999])).await, 1);
    assert_eq!(
        counts(s, "batch_high").await,
        expected([1, 9_999_999, 10_000_000])
    );
}

async fn ping(state: Arc<dyn LiveState>) {
    state.ping().await.expect("ping");
}

/// A lease call of the suite: a minute's ttl unless said otherwise.
fn lease<'a>(
    upstream: &'a str,
    holder: &'a str,
    want: u32,
    keep: u32,
    cap: u32,
) -> PermitLease<'a> {
    PermitLease {
        upstream,
        holder,
        want,
        keep,
        cap,
        ttl: Duration::from_secs(60),
    }
}

async fn take(state: &dyn LiveState, lease: PermitLease<'_>) -> PermitGrant {
    state
        .lease_permits(&lease)
        .await
        .unwrap_or_else(|e| panic!("lease {lease:?}: {e}"))
}

async fn leases_share_the_cap(state: Arc<dyn LiveState>) {
    let s = &*state;
    // Alone, a holder gets what it wants, up to the cap.
    let a = take(s, lease("up-1", "a", 100, 0, 8)).await;
    assert_eq!((a.granted, a.holders), (8, 1), "{a:?}");
    // A second holder finds no room, but its want lowers the first one's share.
    let b = take(s, lease("up-1", "b", 8, 0, 8)).await;
    assert_eq!((b.granted, b.share, b.holders), (0, 4, 2), "{b:?}");
    // The first keeps what it uses; asking again it learns its share.
    let a = take(s, lease("up-1", "a", 8, 8, 8)).await;
    assert_eq!((a.granted, a.share), (8, 4), "keep is honoured: {a:?}");
    // Once it gives back down to its share, the second gets the rest.
    let a = take(s, lease("up-1", "a", 8, 4, 8)).await;
    assert_eq!(a.granted, 4, "{a:?}");
    let b = take(s, lease("up-1", "b", 8, 0, 8)).await;
    assert_eq!(b.granted, 4, "{b:?}");
    // Another upstream is another cap.
    let c = take(s, lease("up-2", "a", 5, 0, 5)).await;
    assert_eq!((c.granted, c.holders), (5, 1), "{c:?}");
    // A small want leaves the rest to the others.
    let a = take(s, lease("up-1", "a", 1, 1, 8)).await;
    assert_eq!(a.granted, 1, "{a:?}");
    let b = take(s, lease("up-1", "b", 100, 4, 8)).await;
    assert_eq!((b.granted, b.share), (7, 7), "{b:?}");
}

async fn leases_converge_to_fair_shares(state: Arc<dyn LiveState>) {
    // Four holders that all want the whole cap, each renewing as an executor does: keeping
    // at most its last share. After two rounds each holds exactly its share.
    let s = &*state;
    let holders = ["h0", "h1", "h2", "h3"];
    let mut held = [0u32; 4];
    let mut share = [64u32; 4];
    for round in 0..3 {
        for (i, holder) in holders.iter().enumerate() {
            let keep = held[i].min(share[i]);
            let grant = take(s, lease("up-fair", holder, 64, keep, 64)).await;
            assert!(
                grant.granted >= keep,
                "round {round}: {grant:?} below keep {keep}"
            );
            held[i] = grant.granted;
            share[i] = grant.share;
            assert!(
                held.iter().sum::<u32>() <= 64,
                "round {round}: grants {held:?} above the cap"
            );
        }
    }
    assert_eq!(held, [16; 4], "fair shares after three rounds");
    // One holder wanting less lets the others share what it leaves.
    let low = take(s, lease("up-fair", "h0", 4, 4, 64)).await;
    assert_eq!(low.granted, 4);
    let grant = take(s, lease("up-fair", "h1", 64, 16, 64)).await;
    assert_eq!(grant.share, 20, "(64 - 4) / 3: {grant:?}");
}

async fn lease_release_and_expiry(state: Arc<dyn LiveState>) {
    let s = &*state;
    assert_eq!(take(s, lease("up-gone", "a", 10, 0, 10)).await.granted, 10);
    // Giving everything back frees the permits at once.
    let released = take(s, lease("up-gone", "a", 0, 0, 10)).await;
    assert_eq!((released.granted, released.holders), (0, 0), "{released:?}");
    assert_eq!(take(s, lease("up-gone", "b", 10, 0, 10)).await.granted, 10);
    // A holder that stops renewing (a dead executor) gives them back when its ttl runs out.
    let short = PermitLease {
        ttl: Duration::from_millis(300),
        ..lease("up-gone", "b", 10, 10, 10)
    };
    assert_eq!(take(s, short).await.granted, 10);
    assert_eq!(take(s, lease("up-gone", "c", 10, 0, 10)).await.granted, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let grant = take(s, lease("up-gone", "c", 10, 0, 10)).await;
        if grant.granted == 10 {
            assert_eq!(grant.holders, 1, "the dead lease is gone: {grant:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "an expired lease still held its permits after 10 s: {grant:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn leases_never_sum_above_the_cap(state: Arc<dyn LiveState>) {
    // A seeded random walk of holders behaving as executors do (keep at most what they were
    // granted): the grants never sum above the cap, and every one of them is at least its keep.
    let s = &*state;
    let cap = 10;
    let mut held = [0u32; 5];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |bound: u32| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        u32::try_from(seed % u64::from(bound)).unwrap_or(0)
    };
    let names = ["w0", "w1", "w2", "w3", "w4"];
    for step in 0..300 {
        let i = next(5) as usize;
        let want = next(cap + 3);
        let keep = next(held[i] + 1);
        let grant = take(s, lease("up-walk", names[i], want, keep, cap)).await;
        assert!(
            grant.granted >= keep,
            "step {step}: {grant:?} below keep {keep}"
        );
        assert!(
            grant.granted <= want.min(cap).max(keep),
            "step {step}: {grant:?} above want {want}"
        );
        held[i] = grant.granted;
        assert!(
            held.iter().sum::<u32>() <= cap,
            "step {step}: grants {held:?} sum above the cap {cap}"
        );
    }
}

async fn invalid_lease_is_refused(state: Arc<dyn LiveState>) {
    let s = &*state;
    for bad in [
        lease("", "a", 1, 0, 1),
        lease("up", "", 1, 0, 1),
        lease("up{x}", "a", 1, 0, 1),
        lease("up", "a:b", 1, 0, 1),
        lease("up", "a", 1, 0, 0),
        PermitLease {
            ttl: Duration::ZERO,
            ..lease("up", "a", 1, 0, 1)
        },
    ] {
        assert_invalid(s.lease_permits(&bad).await, &format!("{bad:?}"));
    }
    let long = "x".repeat(crate::MAX_LEASE_NAME_LEN + 1);
    assert_invalid(
        s.lease_permits(&lease(&long, "a", 1, 0, 1)).await,
        "a long upstream name",
    );
    // Nothing was taken.
    assert_eq!(take(s, lease("up", "a", 1, 0, 1)).await.granted, 1);
}

/// Declares the suite in an adapter's integration tests: one `#[tokio::test]` per check, each
/// calling `$run(name)` — an `async fn(&str)` of the test file that builds a fresh adapter and
/// gives it to [`run`](crate::conformance::run) with the check's name.
#[macro_export]
macro_rules! conformance_tests {
    ($run:path) => {
        $crate::__state_conformance_checks!($crate::conformance_tests { @declare $run; });
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
