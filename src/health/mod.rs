//! Back-end health: the state machine fed by active checks and by passive
//! observation of real requests, and the slow-start ramp.
//!
//! - Active checks ([`check`]): `rise` consecutive successes bring a back end up,
//!   `fall` consecutive failures take it down. A back end of a pool with checks starts
//!   down and comes up at its first successful check (so a new or restarted balancer
//!   never sends traffic to a back end nobody has seen answer).
//! - Passive checks: `passive_failures` consecutive connect failures or 5xx answers
//!   take a back end out for `passive_cooldown`. When the cooldown ends it is tried
//!   again ("half-open"): one more failure takes it out again at once.
//! - Slow start: for `slow_start` after coming up, the back end's weight ramps
//!   linearly from 1 to its configured weight.
//!
//! Invariants: the request path reads only atomics unless a back end is benched by
//! passive checks or slow start is on; transitions are reported once (the caller logs
//! and counts them); the state lives in [`Health`], shared by every generation of a
//! back end across reloads.

pub mod check;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Why a back end is (not) serving, for logs and the status API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    /// Taken down by active checks (or not yet seen by them).
    Down,
    /// Taken out by passive checks until the cooldown ends.
    Benched,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Benched => "benched",
        }
    }
}

#[derive(Debug)]
struct Counters {
    successes: u32,
    failures: u32,
    passive_failures: u32,
    benched_until: Option<Instant>,
    /// Whether the back end was ever up (the first coming up needs one success and
    /// is not ramped: there is no cold cache to protect at start).
    ever_up: bool,
    /// When the back end last came back up (slow start); `None` = not ramping.
    up_since: Option<Instant>,
    since: Instant,
}

/// The health of one back end.
#[derive(Debug)]
pub struct Health {
    /// The active checks' verdict (always true without active checks).
    up: AtomicBool,
    /// Taken out by passive checks (cleared lazily once the cooldown is over).
    benched: AtomicBool,
    counters: Mutex<Counters>,
}

impl Health {
    /// A back end that is up (no active checks) or down until its first success.
    pub fn new(up: bool) -> Self {
        Health {
            up: AtomicBool::new(up),
            benched: AtomicBool::new(false),
            counters: Mutex::new(Counters {
                successes: 0,
                failures: 0,
                passive_failures: 0,
                benched_until: None,
                ever_up: up,
                up_since: None,
                since: Instant::now(),
            }),
        }
    }

    /// Whether the back end may get requests now.
    pub fn available(&self, now: Instant) -> bool {
        if !self.up.load(Ordering::Relaxed) {
            return false;
        }
        if !self.benched.load(Ordering::Relaxed) {
            return true;
        }
        let mut c = self.counters.lock();
        match c.benched_until {
            Some(until) if now < until => false,
            _ => {
                // Cooldown over: half-open, one more failure benches it again.
                c.benched_until = None;
                c.since = now;
                self.benched.store(false, Ordering::Relaxed);
                true
            }
        }
    }

    /// The state now (for the status API and metrics).
    pub fn state(&self, now: Instant) -> State {
        if !self.up.load(Ordering::Relaxed) {
            State::Down
        } else if !self.available(now) {
            State::Benched
        } else {
            State::Up
        }
    }

    /// Since when the current state holds.
    pub fn since(&self) -> Instant {
        self.counters.lock().since
    }

    /// Forces the active verdict (checks removed by a reload: every back end is up).
    pub fn set_up(&self, up: bool, now: Instant) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            let mut c = self.counters.lock();
            c.since = now;
            c.successes = 0;
            c.failures = 0;
            if up && c.ever_up {
                c.up_since = Some(now);
            }
            c.ever_up |= up;
        }
    }

    /// Records an active check; returns the new up/down verdict when it changed.
    /// The first success ever brings a back end up; after that it takes `rise`.
    pub fn check_result(&self, ok: bool, rise: u32, fall: u32, now: Instant) -> Option<bool> {
        let mut c = self.counters.lock();
        let up = self.up.load(Ordering::Relaxed);
        if ok {
            c.failures = 0;
            c.successes = c.successes.saturating_add(1);
            let first_ever = !c.ever_up;
            if !up && (c.successes >= rise || first_ever) {
                self.up.store(true, Ordering::Relaxed);
                c.up_since = (!first_ever).then_some(now);
                c.ever_up = true;
                c.since = now;
                c.successes = 0;
                return Some(true);
            }
        } else {
            c.successes = 0;
            c.failures = c.failures.saturating_add(1);
            if up && c.failures >= fall {
                self.up.store(false, Ordering::Relaxed);
                c.since = now;
                c.failures = 0;
                return Some(false);
            }
        }
        None
    }

    /// Records the outcome of a real request (`ok` = answered, not 5xx). Returns true
    /// when this benched the back end.
    pub fn passive_result(
        &self,
        ok: bool,
        threshold: u32,
        cooldown: Duration,
        now: Instant,
    ) -> bool {
        if threshold == 0 {
            return false;
        }
        let mut c = self.counters.lock();
        if ok {
            c.passive_failures = 0;
            return false;
        }
        c.passive_failures = c.passive_failures.saturating_add(1);
        if c.passive_failures >= threshold && !self.benched.load(Ordering::Relaxed) {
            c.benched_until = Some(now + cooldown);
            // Half-open after the cooldown: the next failure benches it again.
            c.passive_failures = threshold.saturating_sub(1);
            c.since = now;
            c.up_since = Some(now + cooldown);
            self.benched.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// The selection weight now, in units of 1/[`WEIGHT_SCALE`]: `weight` ramped
    /// linearly over `slow_start` since coming back up (at least one unit). Fixed
    /// point so that even weight 1 ramps smoothly; scaling every weight by the same
    /// factor leaves smooth round robin's order unchanged.
    pub fn effective_weight(&self, weight: u32, slow_start: Duration, now: Instant) -> u32 {
        let full = weight.saturating_mul(WEIGHT_SCALE);
        if slow_start.is_zero() || weight == 0 {
            return full;
        }
        let Some(since) = self.counters.lock().up_since else {
            return full;
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= slow_start {
            return full;
        }
        let share = elapsed.as_secs_f64() / slow_start.as_secs_f64();
        ((f64::from(full) * share).ceil() as u32).clamp(1, full)
    }
}

/// Selection weights are in units of 1/1000 of a configured weight.
pub const WEIGHT_SCALE: u32 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[tokio::test(start_paused = true)]
    async fn first_success_brings_up_then_fall_and_rise() {
        let h = Health::new(false);
        let t = Instant::now();
        assert!(!h.available(t));
        assert_eq!(h.check_result(false, 2, 3, t), None);
        assert_eq!(
            h.check_result(true, 2, 3, at(t, 1)),
            Some(true),
            "first success ever"
        );
        assert!(h.available(t));
        assert_eq!(h.check_result(false, 2, 3, at(t, 2)), None);
        assert_eq!(h.check_result(false, 2, 3, at(t, 3)), None);
        assert_eq!(
            h.check_result(true, 2, 3, at(t, 4)),
            None,
            "a success resets the failures"
        );
        assert_eq!(h.check_result(false, 2, 3, at(t, 5)), None);
        assert_eq!(h.check_result(false, 2, 3, at(t, 6)), None);
        assert_eq!(h.check_result(false, 2, 3, at(t, 7)), Some(false));
        assert_eq!(h.state(at(t, 7)), State::Down);
        assert_eq!(h.since(), at(t, 7));
        // Coming back now takes `rise` successes.
        assert_eq!(h.check_result(true, 2, 3, at(t, 8)), None);
        assert_eq!(h.check_result(true, 2, 3, at(t, 9)), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn passive_failures_bench_for_the_cooldown_then_half_open() {
        let h = Health::new(true);
        let t = Instant::now();
        let cool = Duration::from_secs(10);
        assert!(!h.passive_result(false, 3, cool, t));
        assert!(!h.passive_result(true, 3, cool, t), "success resets");
        assert!(!h.passive_result(false, 3, cool, t));
        assert!(!h.passive_result(false, 3, cool, t));
        assert!(h.passive_result(false, 3, cool, t));
        assert_eq!(h.state(at(t, 9_999)), State::Benched);
        assert!(!h.available(at(t, 9_999)));
        assert!(h.available(at(t, 10_000)), "cooldown over");
        // Half-open: one failure benches again.
        assert!(h.passive_result(false, 3, cool, at(t, 10_001)));
        assert!(!h.available(at(t, 10_002)));
        // Off when the threshold is 0.
        let off = Health::new(true);
        for _ in 0..10 {
            assert!(!off.passive_result(false, 0, cool, t));
        }
        assert!(off.available(t));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_linearly_from_one() {
        let h = Health::new(false);
        let t0 = Instant::now();
        let ramp = Duration::from_secs(30);
        let k = WEIGHT_SCALE;
        assert_eq!(h.check_result(true, 1, 1, t0), Some(true));
        assert_eq!(
            h.effective_weight(11, ramp, t0),
            11 * k,
            "first start: no ramp"
        );
        assert_eq!(h.check_result(false, 1, 1, t0), Some(false));
        let t = at(t0, 1000);
        assert_eq!(h.check_result(true, 1, 1, t), Some(true));
        assert_eq!(h.effective_weight(11, ramp, t), 1);
        assert_eq!(h.effective_weight(11, ramp, at(t, 15_000)), 11 * k / 2);
        assert_eq!(
            h.effective_weight(1, ramp, at(t, 3_000)),
            k / 10,
            "weight 1 ramps too"
        );
        assert_eq!(h.effective_weight(11, ramp, at(t, 30_000)), 11 * k);
        assert_eq!(h.effective_weight(11, Duration::ZERO, t), 11 * k, "off");
        // A back end up since start is not ramped.
        assert_eq!(Health::new(true).effective_weight(11, ramp, t), 11 * k);
    }
}
