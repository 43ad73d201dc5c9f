//! The adaptive concurrency limit of one upstream: slow start, then additive increase and
//! multiplicative decrease (AIMD), as TCP congestion control does with its window; under a
//! ceiling set by the permit lease this executor holds of the upstream's shared cap.
//!
//! # Rules
//!
//! - **Admission.** An attempt needs a permit; permits are granted in FIFO order while fewer
//!   than the *effective limit* — `min(limit, ceiling)` — attempts are in flight. After a
//!   decrease the in-flight count may exceed it (attempts already sent are not recalled); no
//!   permit is granted until it has fallen below.
//! - **Ceiling.** What this executor may use of the upstream's `max_concurrency`: the
//!   permits its lease holds (`permits` module), or `max_concurrency` when nothing shares the
//!   upstream. Set from outside ([`Limiter::set_ceiling`]); the limit itself only grows while
//!   the ceiling does not hold it back (a limit above what may be sent would be untested).
//! - **Slow start.** From `initial_concurrency`, every success of a full window adds 1 to
//!   the limit — so the limit doubles every round trip, as TCP's slow start does — until the
//!   first congestion signal. With a 50 ms upstream the limit goes from 8 to 64 in about three
//!   round trips.
//! - **Multiplicative decrease.** A 429 cuts the effective limit to 9/10 (at least by 1,
//!   never below 1): a 429 says the upstream is just at its capacity, so a small step back
//!   keeps it busy (the sawtooth then averages 95 % of the capacity, where halving would give
//!   75 %). An attempt that used its whole configured timeout halves it: a server that stops
//!   answering is overloaded, not just full. Either ends the slow start for good. Only once
//!   per overload episode: a signal from an attempt admitted *before* the last decrease is
//!   ignored, since it reports the overload already reacted to. This "one decrease per
//!   window" needs no clock — a burst of 429s answering one wave of requests cuts the limit
//!   once, while 429s to requests sent at the reduced limit cut it again; so a full upstream
//!   sees a 429 or two per sawtooth, never a storm.
//! - **Additive increase.** After the slow start, `limit` successes grow the limit by 1, up
//!   to `max_concurrency` (one per round trip). Only successes of attempts admitted since the
//!   last decrease, into a full window, count (in either phase). Since the last decrease:
//!   attempts sent at the old limit say nothing about the new one. Into a full window: a
//!   limit the workload never reaches has not been tested, so it must not grow (otherwise a
//!   quiet period would inflate it to the maximum and the next burst would overload the
//!   upstream). An attempt admitted into a full window is one that filled the last free
//!   slot, or one that had to wait for a slot: under a backlog every attempt counts. A success is a 2xx or a non-retryable 4xx: the upstream answered promptly.
//! - Other outcomes (5xx, connection errors, malformed bodies, attempts cut short by the batch
//!   deadline) are neutral.
//!
//! # Implementation
//!
//! A `tokio` [`Semaphore`] holds the free slots, so waiters are served in FIFO order and
//! waiting is cancel-safe (a dropped `acquire` leaves the queue). The bookkeeping sits in a
//! `Mutex` that is never held across an `.await`. Permits taken from the semaphore are
//! forgotten at once and given back by hand on release, so a release can decide, under the
//! lock, whether the slot returns. Invariant: `free + in_flight - debt == effective`, where
//! `debt` counts slots to swallow on release because the effective limit shrank below the
//! number of attempts in flight (`Semaphore::forget_permits` can only remove free slots).
//! A `Mutex` + `Notify` design would do too, but would need its own waiter queue to be fair.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, Semaphore};

use crate::metrics;

/// What an attempt's end tells the limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    /// The upstream answered promptly: counts toward an increase.
    Success,
    /// The upstream is full (a 429): cut the limit to 9/10 (once per window).
    Congestion,
    /// The upstream stopped answering (a full-length timeout): halve the limit (once per
    /// window).
    Overload,
    /// Says nothing about load.
    Neutral,
}

/// One upstream's limiter.
#[derive(Debug)]
pub(crate) struct Limiter {
    /// Free slots. Never closed.
    semaphore: Semaphore,
    /// The limit and the counters the rules need.
    state: Mutex<State>,
    /// Ceiling of the limit (`max_concurrency`).
    max: u32,
    /// Woken when the limiter wants more than its ceiling allows (the lease then asks).
    wants_more: Notify,
    /// The limit and in-flight gauges, looked up once: they are set on every acquire and
    /// release.
    limit_gauge: ::metrics::Gauge,
    in_flight_gauge: ::metrics::Gauge,
}

#[derive(Debug)]
struct State {
    /// The current limit, 1..=max.
    limit: u32,
    /// What the lease allows, 0..=max (`max` when nothing shares the upstream).
    ceiling: u32,
    /// Permits held right now.
    in_flight: u32,
    /// Attempts waiting for a permit right now.
    waiting: u32,
    /// Slots to swallow on release instead of freeing (the effective limit shrank below
    /// `in_flight`).
    debt: u32,
    /// Sequence number of the last permit granted (1-based).
    issued: u64,
    /// `issued` at the last decrease: congestion signals of permits up to it are ignored.
    recovery_mark: u64,
    /// Full-window successes since the last change of the limit (additive phase).
    successes: u32,
    /// Still in the slow start: no congestion signal seen yet.
    slow_start: bool,
}

impl State {
    fn effective(&self) -> u32 {
        self.limit.min(self.ceiling)
    }
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

/// Counts an attempt as waiting for a permit while it exists (cancel-safe).
struct Waiting<'a>(&'a Limiter);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.waiting = state.waiting.saturating_sub(1);
    }
}

impl Limiter {
    /// A limiter starting at `initial` (clamped to 1..=max) with ceiling `max` (at least 1),
    /// in slow start, alone on its upstream (its ceiling is `max` until
    /// [`set_ceiling`](Self::set_ceiling)).
    pub(crate) fn new(name: Arc<str>, initial: u32, max: u32) -> Self {
        let max = max.max(1);
        let initial = initial.clamp(1, max);
        let labels = [(metrics::LABEL_UPSTREAM, Arc::clone(&name))];
        let limiter = Self {
            limit_gauge: ::metrics::gauge!(metrics::UPSTREAM_LIMIT, &labels),
            in_flight_gauge: ::metrics::gauge!(metrics::UPSTREAM_IN_FLIGHT, &labels),
            semaphore: Semaphore::new(initial as usize),
            state: Mutex::new(State {
                limit: initial,
                ceiling: max,
                in_flight: 0,
                waiting: 0,
                debt: 0,
                issued: 0,
                recovery_mark: 0,
                successes: 0,
                slow_start: true,
            }),
            max,
            wants_more: Notify::new(),
        };
        limiter.publish(&limiter.lock());
        limiter
    }

    /// Waits for a slot (FIFO). Cancel-safe. `None` only if the semaphore were closed, which
    /// never happens.
    pub(crate) async fn acquire(&self) -> Option<Permit<'_>> {
        let (slot, waited) = match self.semaphore.try_acquire() {
            Ok(slot) => (slot, false),
            Err(_) => {
                let waiting = {
                    let mut state = self.lock();
                    state.waiting += 1;
                    self.ask_if_held_back(&state);
                    Waiting(self)
                };
                let slot = self.semaphore.acquire().await.ok()?;
                drop(waiting);
                (slot, true)
            }
        };
        // From here on the slot is accounted by hand; no await until the state is updated.
        slot.forget();
        let mut state = self.lock();
        state.in_flight += 1;
        state.issued += 1;
        let permit = Permit {
            limiter: self,
            seq: state.issued,
            // An attempt that had to wait was held back by a full window (a backlog).
            window_full: waited || state.in_flight >= state.effective(),
            signal: Signal::Neutral,
        };
        self.publish(&state);
        Some(permit)
    }

    /// The current limit (the AIMD one, before the ceiling).
    pub(crate) fn limit(&self) -> u32 {
        self.lock().limit
    }

    /// What the lease allows right now.
    pub(crate) fn ceiling(&self) -> u32 {
        self.lock().ceiling
    }

    /// Permits held right now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.lock().in_flight
    }

    /// The ceiling of `max_concurrency`.
    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// Resolves when the limiter wants more than its ceiling allows (see
    /// [`wanted`](Self::wanted)); at most one wake-up is stored.
    pub(crate) async fn wants_more(&self) {
        self.wants_more.notified().await;
    }

    /// Sets what the lease allows (clamped to `0..=max`): admission follows at once.
    pub(crate) fn set_ceiling(&self, ceiling: u32) {
        let mut state = self.lock();
        let before = state.effective();
        state.ceiling = ceiling.min(self.max);
        self.retarget(&mut state, before);
        self.publish(&state);
    }

    /// Prepares a lease renewal: returns `(want, keep)` and lowers the ceiling to `keep`
    /// until the answer comes (so the permits in use never exceed what the lease records).
    ///
    /// `want` is [`wanted`](Self::wanted); `keep` is what this executor keeps whatever the
    /// others want — what it uses, and otherwise no more than its ceiling, its want and its
    /// last fair `share`.
    pub(crate) fn prepare_renewal(&self, share: u32) -> (u32, u32) {
        let mut state = self.lock();
        let want = self.wanted_in(&state);
        let keep = state.in_flight.max(state.ceiling.min(want).min(share));
        let before = state.effective();
        state.ceiling = state.ceiling.min(keep);
        self.retarget(&mut state, before);
        self.publish(&state);
        (want, keep)
    }

    /// How many permits this limiter would use now: its demand (in flight + waiting), up to
    /// room to grow — twice the limit in slow start (the limit doubles every round trip),
    /// one more in the additive phase — and never above `max`.
    #[cfg(test)]
    pub(crate) fn wanted(&self) -> u32 {
        self.wanted_in(&self.lock())
    }

    fn wanted_in(&self, state: &State) -> u32 {
        let demand = state.in_flight.saturating_add(state.waiting);
        let room = if state.slow_start {
            state.limit.saturating_mul(2)
        } else {
            state.limit.saturating_add(1)
        };
        demand.min(room).min(self.max)
    }

    /// Wakes the lease when the ceiling, not the limit, holds attempts back.
    fn ask_if_held_back(&self, state: &State) {
        if self.wanted_in(state) > state.ceiling {
            self.wants_more.notify_one();
        }
    }

    fn release(&self, seq: u64, window_full: bool, signal: Signal) {
        let mut state = self.lock();
        let before = state.effective();
        state.in_flight = state.in_flight.saturating_sub(1);
        match signal {
            Signal::Congestion | Signal::Overload if seq > state.recovery_mark => {
                let effective = state.effective();
                let target = match signal {
                    Signal::Overload => effective / 2,
                    _ => (effective * 9 / 10).min(effective.saturating_sub(1)),
                };
                state.limit = target.max(1);
                state.recovery_mark = state.issued;
                state.successes = 0;
                state.slow_start = false;
            }
            Signal::Success
                if window_full && seq > state.recovery_mark && state.limit < self.max =>
            {
                // Grow only while the limit, not the lease, is what holds attempts back.
                if state.limit <= state.ceiling {
                    if state.slow_start {
                        state.limit += 1;
                    } else {
                        state.successes += 1;
                        if state.successes >= state.limit {
                            state.limit += 1;
                            state.successes = 0;
                        }
                    }
                }
            }
            Signal::Congestion | Signal::Overload | Signal::Success | Signal::Neutral => {}
        }
        // Whatever the limit's change adds or removes, then this permit's own slot (after a
        // decrease, so that a debt swallows it rather than a waiter taking it).
        self.retarget(&mut state, before);
        self.free_one(&mut state);
        self.ask_if_held_back(&state);
        self.publish(&state);
    }

    /// Moves the semaphore from effective limit `before` to the current one.
    fn retarget(&self, state: &mut State, before: u32) {
        let after = state.effective();
        if after > before {
            for _ in before..after {
                self.free_one(state);
            }
        } else if after < before {
            let cut = before - after;
            let removed = self.semaphore.forget_permits(cut as usize);
            // `removed <= cut` by contract of `forget_permits`.
            state.debt += cut - u32::try_from(removed).unwrap_or(cut);
        }
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
        self.limit_gauge.set(f64::from(state.effective()));
        self.in_flight_gauge.set(f64::from(state.in_flight));
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

    use std::collections::VecDeque;
    use std::pin::Pin;

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
    fn a_burst_of_overload_halves_once() {
        let limiter = limiter(8, 16);
        for permit in take(&limiter, 8) {
            permit.finish(Signal::Overload);
        }
        assert_eq!(limiter.limit(), 4);
        assert_eq!(limiter.in_flight(), 0);
        // Attempts admitted after the decrease report a new episode.
        let permits = take(&limiter, 4);
        assert!(blocked(&limiter));
        for permit in permits {
            permit.finish(Signal::Overload);
        }
        assert_eq!(limiter.limit(), 2);
        for _ in 0..3 {
            take(&limiter, 1).remove(0).finish(Signal::Overload);
        }
        assert_eq!(limiter.limit(), 1, "never below 1");
        let permit = take(&limiter, 1);
        assert!(blocked(&limiter));
        drop(permit);
    }

    #[test]
    fn a_429_steps_back_a_tenth_at_least_one() {
        let limiter = limiter(64, 64);
        let mut limits = Vec::new();
        for _ in 0..4 {
            let permits = take(&limiter, limiter.limit() as usize);
            // A whole wave answered 429: one decrease.
            for permit in permits {
                permit.finish(Signal::Congestion);
            }
            limits.push(limiter.limit());
        }
        assert_eq!(limits, [57, 51, 45, 40]);
        let small = super::tests::limiter(5, 5);
        take(&small, 1).remove(0).finish(Signal::Congestion);
        assert_eq!(small.limit(), 4, "at least one less");
        let one = super::tests::limiter(1, 5);
        take(&one, 1).remove(0).finish(Signal::Congestion);
        assert_eq!(one.limit(), 1, "never below 1");
    }

    #[test]
    fn shrinking_below_in_flight_holds_admission_until_it_drains() {
        let limiter = limiter(8, 8);
        let mut permits = take(&limiter, 8);
        permits.pop().unwrap().finish(Signal::Overload);
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

    /// A backlog of requests: one acquire always waits behind the held permits, as requests
    /// queued behind the limit do, and takes each slot as it frees up.
    struct Backlog<'a> {
        limiter: &'a Limiter,
        next: Pin<Box<dyn Future<Output = Option<Permit<'a>>> + 'a>>,
        held: VecDeque<Permit<'a>>,
    }

    impl<'a> Backlog<'a> {
        fn new(limiter: &'a Limiter) -> Self {
            let mut backlog = Self {
                limiter,
                next: Box::pin(limiter.acquire()),
                held: VecDeque::new(),
            };
            backlog.fill();
            backlog
        }

        fn fill(&mut self) {
            while let Some(permit) = self.next.as_mut().now_or_never() {
                self.held.push_back(permit.unwrap());
                self.next = Box::pin(self.limiter.acquire());
            }
        }

        /// Ends the `n` oldest attempts with `signal`.
        fn finish(&mut self, n: usize, signal: Signal) {
            for _ in 0..n {
                self.held.pop_front().unwrap().finish(signal);
                self.fill();
            }
        }

        /// Ends every attempt in flight with `signal`: one round trip.
        fn round_trip(&mut self, signal: Signal) {
            self.finish(self.held.len(), signal);
        }
    }

    #[test]
    fn slow_start_doubles_every_round_trip_until_congestion() {
        // The latency-bound case of issue 10: start at 8, capacity 64.
        let limiter = limiter(8, 64);
        let mut backlog = Backlog::new(&limiter);
        assert_eq!(backlog.held.len(), 8);
        let mut limits = Vec::new();
        for _ in 0..5 {
            backlog.round_trip(Signal::Success);
            limits.push(limiter.limit());
        }
        // The first window was not full until its last admission; then ×2 per round trip.
        assert_eq!(limits, [9, 18, 36, 64, 64]);
        assert_eq!(backlog.held.len(), 64);
        // The first 429 ends the slow start, and its slot is not reused.
        backlog.finish(1, Signal::Congestion);
        assert_eq!(limiter.limit(), 57);
        assert_eq!(limiter.in_flight(), 63);
        // The 63 attempts sent before the decrease say nothing; then a window of 57 grows by 1.
        backlog.finish(63, Signal::Success);
        assert_eq!((limiter.limit(), limiter.in_flight()), (57, 57));
        backlog.finish(56, Signal::Success);
        assert_eq!(limiter.limit(), 57);
        backlog.finish(1, Signal::Success);
        assert_eq!(limiter.limit(), 58, "one per window of successes");
        backlog.round_trip(Signal::Success);
        assert_eq!(limiter.limit(), 59);
    }

    #[test]
    fn full_windows_of_success_grow_by_one_up_to_max_after_slow_start() {
        let limiter = limiter(2, 4);
        // End the slow start at once.
        take(&limiter, 1).remove(0).finish(Signal::Congestion);
        assert_eq!(limiter.limit(), 1);
        let held = take(&limiter, 1);
        let held = cycle(&limiter, held, 1, Signal::Success);
        assert_eq!(limiter.limit(), 2);
        let held = cycle(&limiter, held, 1, Signal::Success);
        // The first of the two was admitted below a full window: its success does not count.
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
        let held = cycle(&limiter, held, 3, Signal::Neutral);
        let held = cycle(&limiter, held, 1, Signal::Overload);
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

    #[test]
    fn the_ceiling_bounds_admission_and_growth() {
        let limiter = limiter(8, 64);
        limiter.set_ceiling(0);
        assert!(blocked(&limiter), "no lease, no request");
        assert!(
            limiter.wants_more().now_or_never().is_some(),
            "a waiting attempt asks the lease for more"
        );
        limiter.set_ceiling(3);
        let held = take(&limiter, 3);
        assert!(blocked(&limiter));
        // Successes do not grow a limit the ceiling holds back.
        let held = cycle(&limiter, held, 30, Signal::Success);
        assert_eq!((limiter.limit(), held.len()), (8, 3));
        // Demand 3 in flight + 1 waiting, slow start room 16: it wants 4.
        let waiting = limiter.acquire();
        futures::pin_mut!(waiting);
        assert!((&mut waiting).now_or_never().is_none());
        assert_eq!(limiter.wanted(), 4);
        // The lease grows: the waiter gets its slot at once.
        limiter.set_ceiling(10);
        let fourth = (&mut waiting)
            .now_or_never()
            .expect("granted")
            .expect("open");
        assert_eq!(limiter.in_flight(), 4);
        let mut held = held;
        held.push(fourth);
        // A lower ceiling holds admission until in-flight attempts drain below it.
        limiter.set_ceiling(2);
        assert!(blocked(&limiter));
        held.truncate(2);
        assert!(blocked(&limiter), "2 in flight under a ceiling of 2");
        held.truncate(1);
        held.extend(take(&limiter, 1));
        assert!(blocked(&limiter));
        drop(held);
    }

    #[test]
    fn renewals_keep_what_is_used_and_give_back_beyond_the_share() {
        let limiter = limiter(8, 64);
        limiter.set_ceiling(10);
        let held = take(&limiter, 6);
        // Demand 6, slow start: it wants 6; it keeps what it uses.
        assert_eq!(limiter.prepare_renewal(64), (6, 6));
        assert_eq!(limiter.ceiling(), 6);
        assert!(
            blocked(&limiter),
            "nothing starts beyond what the lease will record"
        );
        limiter.set_ceiling(10);
        // A share below what is in flight keeps what is in flight.
        assert_eq!(limiter.prepare_renewal(4).1, 6);
        drop(held);
        // Idle, it keeps nothing and wants nothing.
        limiter.set_ceiling(10);
        assert_eq!(limiter.prepare_renewal(64), (0, 0));
        assert_eq!(limiter.ceiling(), 0);
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
