//! A moving estimate of a pool's service time, for "queue earlier".
//!
//! An exponentially weighted moving average whose weight depends on the time since
//! the previous sample: `alpha = 1 - exp(-dt / TAU)`, at least `MIN_ALPHA`. At high
//! request rates every sample still moves the estimate by `MIN_ALPHA`, so it follows a
//! slowdown within a few dozen requests; at low rates (back ends doing 10 pages/s)
//! each sample weighs more, so it still adapts within about `TAU`–`3·TAU` seconds.

use std::time::Duration;

use tokio::time::Instant;

/// Time constant of the average.
pub const TAU: Duration = Duration::from_secs(1);
/// Smallest weight of one sample.
pub const MIN_ALPHA: f64 = 0.05;

/// The service-time estimate of one pool.
#[derive(Debug, Clone, Default)]
pub struct ServiceTime {
    seconds: f64,
    last: Option<Instant>,
}

impl ServiceTime {
    /// Adds one observed service time, finished at `now`.
    pub fn observe(&mut self, sample: Duration, now: Instant) {
        let x = sample.as_secs_f64();
        match self.last {
            None => self.seconds = x,
            Some(prev) => {
                let dt = now.saturating_duration_since(prev).as_secs_f64();
                let alpha = (1.0 - (-dt / TAU.as_secs_f64()).exp()).clamp(MIN_ALPHA, 1.0);
                self.seconds += alpha * (x - self.seconds);
            }
        }
        self.last = Some(now);
    }

    /// The estimate, or `None` before the first sample.
    pub fn get(&self) -> Option<Duration> {
        self.last
            .map(|_| Duration::from_secs_f64(self.seconds.max(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_a_slowdown_and_a_recovery_within_seconds() {
        let mut s = ServiceTime::default();
        assert_eq!(s.get(), None);
        let fast = Duration::from_millis(50);
        let slow = Duration::from_secs(1);
        // 100 req/s at 50 ms.
        for _ in 0..500 {
            tokio::time::advance(Duration::from_millis(10)).await;
            s.observe(fast, Instant::now());
        }
        assert!((s.get().expect("est").as_secs_f64() - 0.05).abs() < 0.001);
        // Back ends slow to 1 s; completions drop to 10/s. Within 3 s the estimate is
        // most of the way there.
        for _ in 0..30 {
            tokio::time::advance(Duration::from_millis(100)).await;
            s.observe(slow, Instant::now());
        }
        assert!(
            s.get().expect("est") > Duration::from_millis(900),
            "{:?}",
            s.get()
        );
        // Recovery at 100 req/s: within a second it is back under 100 ms.
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(10)).await;
            s.observe(fast, Instant::now());
        }
        assert!(
            s.get().expect("est") < Duration::from_millis(100),
            "{:?}",
            s.get()
        );
    }
}
