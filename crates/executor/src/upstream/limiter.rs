//! The adaptive concurrency limit of one upstream: additive increase, multiplicative decrease
//! (AIMD), as TCP congestion control does with its window.
//!
//! # Rules
//!
//! - **Admission.** An attempt needs a permit; permits are granted in FIFO order while fewer
//!   than `limit` attempts are in flight. After a decrease the in-flight count may exceed the
//!   new limit (attempts already sent are not recalled); no permit is granted until it has
//!   fallen below the limit.
//! - **Multiplicative decrease.** A congestion signal (a 429, or an attempt that used its
//!   whole configured timeout) halves the limit, never below 1. Only once per overload
//!   episode: a signal from an attempt admitted *before* the last decrease is ignored, since it
//!   reports the overload already reacted to. This "one decrease per window" needs no clock —
//!   a burst of 429s answering one wave of requests halves the limit once, while 429s to
//!   requests sent at the reduced limit halve it again.
//! - **Additive increase.** After `limit` successes (a 2xx or a non-retryable 4xx: the
//!   upstream answered promptly) the limit grows by 1, up to `max_concurrency`. Only
//!   successes of attempts admitted since the last decrease, into a full window, count. Since
//!   the last decrease: attempts sent at the old limit say nothing about the new one. Into a
//!   full window: a limit the workload never reaches has not been tested, so it must not grow
//!   (otherwise a quiet period would inflate it to the maximum and the next burst would
//!   overload the upstream). A backlog of requests keeps the window full, so under load every
//!   attempt counts.
//! - Other outcomes (5xx, connection errors, malformed bodies, attempts cut short by the batch
//!   deadline) are neutral.
//!
//! # Implementation
//!
//! A `tokio` [`Semaphore`] holds the free slots, so waiters are served in FIFO order and
//! waiting is cancel-safe (a dropped `acquire` leaves the queue). The bookkeeping sits in a
//! `Mutex` that is never held across an `.await`. Permits taken from the semaphore are
//! forgotten at once and given back by hand on release, so a release can decide, under the
//! lock, whether the slot returns. Invariant: `free + in_flight - debt == limit`, where
//! `debt` counts slots to swallow on release because the limit shrank below the number of
//! attempts in flight (`Semaphore::forget_permits` can only remove free slots).
//! A `Mutex` + `Notify` design would do too, but would need its own waiter queue to be fair.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Semaphore;

use crate::metrics;

/// What an attempt's end tells the limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    /// The upstream answered promptly: counts toward an increase.
    Success,
    /// The upstream is overloaded: halve the limit (once per window).
    Congestion,
    /// Says nothing about load.
    Neutral,
}

/// One upstream's AIMD limiter.
#[derive(Debug)]
pub(crate) struct Limiter {
    /// Free slots. Never closed.
    semaphore: Semaphore,
    /// The limit and the counters the rules need.
    state: Mutex<State>,
    /// Ceiling of the limit (`max_concurrency`).
    max: u32,
    /// The upstream's name, as the metric label.
    name: Arc<str>,
}

#[derive(Debug)]
struct State {
    /// The current limit, 1..=max.
    limit: u32,
    /// Permits held right now.
    in_flight: u32,
    /// Slots to swallow on release instead of freeing (the limit shrank below `in_flight`).
    debt: u32,
    /// Sequence number of the last permit granted (1-based).
    issued: u64,
    /// `issued` at the last decrease: congestion signals of permits up to it are ignored.
    recovery_mark: u64,
    /// Full-window successes since the last change of the limit.
    successes: u32,
}

/// Permission to send one attempt. Dropping it releases the slot as [`Signal::Neutral`];
/// [`finish`](Self::finish) releases it with what the attempt showed.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    limiter: &'a Limiter,
    /// This permit's sequence number (see [`State::issued`]).
    seq: u64,
    /// Whether the window was full when it was granted (see the increase rule).
    window_full: bool,
    /// The signal to release with.
    signal: Signal,
}

impl Permit<'_> {
    /// Releases the slot, reporting `signal`.
    pub(crate) fn finish(mut self, signal: Signal) {
        self.signal = signal;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.limiter
            .release(self.seq, self.window_full, self.signal);
    }
}

impl Limiter {
    /// A limiter starting at `initial` (clamped to 1..=max) with ceiling `max` (at least 1).
    pub(crate) fn new(name: Arc<str>, initial: u32, max: u32) -> Self {
        let max = max.max(1);
        let initial = initial.clamp(1, max);
        let limiter = Self {
            semaphore: Semaphore::new(initial as usize),
            state: Mutex::new(State {
                limit: initial,
                in_flight: 0,
                debt: 0,
                issued: 0,
                recovery_mark: 0,
                successes: 0,
            }),
            max,
            name,
        };
        limiter.publish(&limiter.lock());
        limiter
    }

    /// Waits for a slot (FIFO). Cancel-safe. `None` only if the semaphore were closed, which
    /// never happens.
    pub(crate) async fn acquire(&self) -> Option<Permit<'_>> {
        let slot = self.semaphore.acquire().await.ok()?;
        // From here on the slot is accounted by hand; no await until the state is updated.
        slot.forget();
        let mut state = self.lock();
        state.in_flight += 1;
        state.issued += 1;
        let permit = Permit {
            limiter: self,
            seq: state.issued,
            window_full: state.in_flight >= state.limit,
            signal: Signal::Neutral,
        };
        self.publish(&state);
        Some(permit)
    }

    /// The current limit.
    pub(crate) fn limit(&self) -> u32 {
        self.lock().limit
    }

    /// Permits held right now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.lock().in_flight
    }

    fn release(&self, seq: u64, window_full: bool, signal: Signal) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        match signal {
            Signal::Congestion if seq > state.recovery_mark => {
                let target = (state.limit / 2).max(1);
                let cut = state.limit - target;
                let removed = self.semaphore.forget_permits(cut as usize);
                // `removed <= cut` by contract of `forget_permits`.
                state.debt += cut - u32::try_from(removed).unwrap_or(cut);
                state.limit = target;
                state.recovery_mark = state.issued;
                state.successes = 0;
            }
            Signal::Success if window_full && seq > state.recovery_mark => {
                state.successes += 1;
                if state.successes >= state.limit && state.limit < self.max {
                    state.limit += 1;
                    state.successes = 0;
                    self.free_one(&mut state);
                }
            }
            Signal::Congestion | Signal::Success | Signal::Neutral => {}
        }
        // This permit's own slot.
        self.free_one(&mut state);
        self.publish(&state);
    }

    /// Returns one slot: pays a debt first, else frees it.
    fn free_one(&self, state: &mut State) {
        if state.debt > 0 {
            state.debt -= 1;
        } else {
            self.semaphore.add_permits(1);
        }
    }

    fn publish(&self, state: &State) {
        let labels = [(metrics::LABEL_UPSTREAM, Arc::clone(&self.name))];
        ::metrics::gauge!(metrics::UPSTREAM_LIMIT, &labels).set(f64::from(state.limit));
        ::metrics::gauge!(metrics::UPSTREAM_IN_FLIGHT, &labels).set(f64::from(state.in_flight));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is a few
        // arithmetic steps that cannot panic half-way.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    //! Synchronous on purpose: outside a runtime, tokio's cooperative budget never turns a
    //! ready `acquire` into `Pending`, so `now_or_never` tells exactly whether a slot is free.

    use super::*;
    use futures::FutureExt;

    fn limiter(initial: u32, max: u32) -> Limiter {
        Limiter::new(Arc::from("test"), initial, max)
    }

    fn try_take(limiter: &Limiter) -> Option<Permit<'_>> {
        limiter
            .acquire()
            .now_or_never()
            .map(|permit| permit.unwrap())
    }

    fn take(limiter: &Limiter, n: usize) -> Vec<Permit<'_>> {
        (0..n)
            .map(|i| try_take(limiter).unwrap_or_else(|| panic!("permit {i} refused")))
            .collect()
    }

    fn blocked(limiter: &Limiter) -> bool {
        try_take(limiter).is_none()
    }

    /// Runs `n` attempts at saturation: each frees a slot with `signal` and the next takes it
    /// at once, as a backlog of requests does. Returns the permits still held.
    fn cycle<'a>(
        limiter: &'a Limiter,
        mut held: Vec<Permit<'a>>,
        n: usize,
        signal: Signal,
    ) -> Vec<Permit<'a>> {
        for _ in 0..n {
            held.remove(0).finish(signal);
            while let Some(permit) = try_take(limiter) {
                held.push(permit);
            }
        }
        held
    }

    #[test]
    fn admits_at_most_limit() {
        let limiter = limiter(2, 10);
        let permits = take(&limiter, 2);
        assert_eq!(limiter.in_flight(), 2);
        assert!(blocked(&limiter));
        drop(permits);
        assert_eq!(limiter.in_flight(), 0);
        assert_eq!(limiter.limit(), 2, "neutral releases change nothing");
        let permits = take(&limiter, 2);
        assert!(blocked(&limiter));
        drop(permits);
    }

    #[test]
    fn a_burst_of_congestion_halves_once() {
        let limiter = limiter(8, 16);
        for permit in take(&limiter, 8) {
            permit.finish(Signal::Congestion);
        }
        assert_eq!(limiter.limit(), 4);
        assert_eq!(limiter.in_flight(), 0);
        // Attempts admitted after the decrease report a new episode.
        let permits = take(&limiter, 4);
        assert!(blocked(&limiter));
        for permit in permits {
            permit.finish(Signal::Congestion);
        }
        assert_eq!(limiter.limit(), 2);
        for _ in 0..3 {
            take(&limiter, 1).remove(0).finish(Signal::Congestion);
        }
        assert_eq!(limiter.limit(), 1, "never below 1");
        let permit = take(&limiter, 1);
        assert!(blocked(&limiter));
        drop(permit);
    }

    #[test]
    fn shrinking_below_in_flight_holds_admission_until_it_drains() {
        let limiter = limiter(8, 8);
        let mut permits = take(&limiter, 8);
        permits.pop().unwrap().finish(Signal::Congestion);
        assert_eq!(limiter.limit(), 4);
        assert_eq!(limiter.in_flight(), 7);
        for _ in 0..3 {
            permits.pop().unwrap().finish(Signal::Neutral);
            assert!(blocked(&limiter), "in flight {}", limiter.in_flight());
        }
        assert_eq!(limiter.in_flight(), 4);
        permits.pop().unwrap().finish(Signal::Neutral);
        let more = take(&limiter, 1);
        assert_eq!(limiter.in_flight(), 4);
        assert!(blocked(&limiter));
        drop((permits, more));
        assert_eq!(limiter.in_flight(), 0);
        let permits = take(&limiter, 4);
        assert!(blocked(&limiter));
        drop(permits);
    }

    #[test]
    fn full_windows_of_success_grow_by_one_up_to_max() {
        let limiter = limiter(2, 4);
        let held = take(&limiter, 2);
        // The first was admitted below a full window: its success does not count.
        let held = cycle(&limiter, held, 1, Signal::Success);
        assert_eq!(limiter.limit(), 2);
        let held = cycle(&limiter, held, 2, Signal::Success);
        assert_eq!(limiter.limit(), 3);
        assert_eq!(held.len(), 3, "the new slot was used at once");
        let held = cycle(&limiter, held, 100, Signal::Success);
        assert_eq!(limiter.limit(), 4, "capped at max");
        assert_eq!(held.len(), 4);
        assert!(blocked(&limiter));
    }

    #[test]
    fn successes_below_a_full_window_do_not_grow() {
        let limiter = limiter(4, 64);
        for _ in 0..100 {
            for permit in take(&limiter, 3) {
                permit.finish(Signal::Success);
            }
        }
        assert_eq!(limiter.limit(), 4);
    }

    #[test]
    fn growth_counts_only_attempts_admitted_since_the_last_decrease() {
        let limiter = limiter(4, 8);
        let held = take(&limiter, 4);
        let held = cycle(&limiter, held, 3, Signal::Success);
        let held = cycle(&limiter, held, 1, Signal::Congestion);
        assert_eq!(limiter.limit(), 2);
        // 3 in flight at limit 2: no admission until two of them end.
        assert_eq!(held.len(), 3);
        assert!(blocked(&limiter));
        let held = cycle(&limiter, held, 3, Signal::Success);
        assert_eq!(limiter.limit(), 2, "they were sent at the old limit");
        assert_eq!(held.len(), 2);
        let held = cycle(&limiter, held, 1, Signal::Success);
        assert_eq!(limiter.limit(), 2);
        let held = cycle(&limiter, held, 1, Signal::Success);
        assert_eq!(limiter.limit(), 3);
        drop(held);
    }

    /// Random acquires and releases with random signals: the accounting invariant holds
    /// after every step, and a permit is granted exactly when below the limit.
    #[test]
    fn invariant_holds_under_random_operations() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let limiter = limiter(4, 12);
        let mut rng = StdRng::seed_from_u64(7);
        let mut held = Vec::new();
        let (mut grew, mut shrank) = (false, false);
        for _ in 0..20_000 {
            let before = (limiter.limit(), limiter.in_flight());
            if rng.random_bool(0.55) {
                match try_take(&limiter) {
                    Some(permit) => {
                        assert!(before.1 < before.0, "granted at {before:?}");
                        held.push(permit);
                    }
                    None => assert!(before.1 >= before.0, "refused at {before:?}"),
                }
            } else if !held.is_empty() {
                let permit = held.swap_remove(rng.random_range(0..held.len()));
                let signal = match rng.random_range(0..10) {
                    0 => Signal::Congestion,
                    1..=2 => Signal::Neutral,
                    _ => Signal::Success,
                };
                permit.finish(signal);
            }
            let state = limiter.lock();
            let free = limiter.semaphore.available_permits() as u64;
            assert_eq!(
                free + u64::from(state.in_flight) - u64::from(state.debt),
                u64::from(state.limit),
                "{state:?}"
            );
            assert!((1..=12).contains(&state.limit));
            assert!(state.debt == 0 || free == 0, "{state:?}");
            grew |= state.limit > before.0;
            shrank |= state.limit < before.0;
        }
        assert!(grew && shrank, "the walk exercised both directions");
    }

    #[test]
    fn initial_is_clamped() {
        assert_eq!(limiter(0, 4).limit(), 1);
        assert_eq!(limiter(9, 4).limit(), 4);
        assert_eq!(limiter(3, 0).limit(), 1);
    }
}
