//! Recent rates for the status page and API: once a second, the request and shed
//! counters of every pool and back end are sampled into a ring of
//! [`SAMPLES`] cumulative values, from which rates, traffic shares and sparklines are
//! derived. Sampling reads counters only; the request path is not involved.
//!
//! Invariant: at most `SAMPLES` values per series; series of pools and back ends no
//! longer configured are dropped at the next sample.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use crate::proxy::Proxy;

/// Samples kept (one a second).
pub const SAMPLES: usize = 61;
/// Window for rates and traffic shares.
pub const WINDOW: usize = 10;

#[derive(Debug, Default, Clone)]
struct Series(VecDeque<u64>);

impl Series {
    fn push(&mut self, v: u64) {
        if self.0.len() == SAMPLES {
            self.0.pop_front();
        }
        self.0.push_back(v);
    }

    /// Increase over the last `n` seconds (fewer if not sampled that long).
    fn delta(&self, n: usize) -> (u64, usize) {
        let len = self.0.len();
        if len < 2 {
            return (0, 0);
        }
        let span = n.min(len - 1);
        (self.0[len - 1].saturating_sub(self.0[len - 1 - span]), span)
    }

    /// Per-second increases, oldest first.
    fn per_second(&self) -> Vec<u64> {
        self.0
            .iter()
            .zip(self.0.iter().skip(1))
            .map(|(a, b)| b.saturating_sub(*a))
            .collect()
    }
}

#[derive(Debug, Default)]
struct PoolSeries {
    requests: Series,
    shed: Series,
    backends: HashMap<String, Series>,
}

/// The sampled history.
#[derive(Debug, Default)]
pub struct History {
    pools: Mutex<HashMap<String, PoolSeries>>,
}

/// Rates of one pool over the last [`WINDOW`] seconds.
#[derive(Debug, Clone, Default)]
pub struct PoolRates {
    pub requests_per_second: f64,
    pub shed_per_second: f64,
    /// Requests per second over the last minute, oldest first.
    pub sparkline: Vec<u64>,
    /// Back end name → (requests per second, share of the pool's proxied requests).
    pub backends: HashMap<String, (f64, f64)>,
}

impl History {
    /// Samples every second until the proxy is gone.
    pub fn spawn(proxy: &Arc<Proxy>) -> Arc<History> {
        let history = Arc::new(History::default());
        let weak: Weak<Proxy> = Arc::downgrade(proxy);
        let h = Arc::clone(&history);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(proxy) = weak.upgrade() else { return };
                h.sample(&proxy);
            }
        });
        history
    }

    /// Takes one sample of every counter.
    pub fn sample(&self, proxy: &Proxy) {
        let live = proxy.live();
        let mut pools = self.pools.lock();
        pools.retain(|name, _| live.pools.iter().any(|p| p.name() == name));
        for pool in &live.pools {
            let entry = pools.entry(pool.name().to_owned()).or_default();
            let backends = pool.backends();
            entry
                .backends
                .retain(|name, _| backends.iter().any(|b| &b.spec.name == name));
            let mut proxied = 0;
            for b in &backends {
                let n = b.metrics.requests.total();
                proxied += n;
                entry
                    .backends
                    .entry(b.spec.name.clone())
                    .or_default()
                    .push(n);
            }
            entry.requests.push(proxied + pool.metrics.local.total());
            entry.shed.push(pool.metrics.shed_by_reason().iter().sum());
        }
    }

    /// Rates of `pool`.
    pub fn rates(&self, pool: &str) -> PoolRates {
        let pools = self.pools.lock();
        let Some(p) = pools.get(pool) else {
            return PoolRates::default();
        };
        let rate = |s: &Series| {
            let (d, span) = s.delta(WINDOW);
            if span == 0 {
                0.0
            } else {
                d as f64 / span as f64
            }
        };
        let deltas: HashMap<&String, u64> = p
            .backends
            .iter()
            .map(|(n, s)| (n, s.delta(WINDOW).0))
            .collect();
        let total: u64 = deltas.values().sum();
        PoolRates {
            requests_per_second: rate(&p.requests),
            shed_per_second: rate(&p.shed),
            sparkline: p.requests.per_second(),
            backends: p
                .backends
                .iter()
                .map(|(n, s)| {
                    let share = if total == 0 {
                        0.0
                    } else {
                        deltas[n] as f64 / total as f64
                    };
                    (n.clone(), (rate(s), share))
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_keeps_a_bounded_window_and_derives_rates() {
        let mut s = Series::default();
        for i in 0..100u64 {
            s.push(i * 10);
        }
        assert_eq!(s.0.len(), SAMPLES);
        assert_eq!(s.delta(WINDOW), (100, WINDOW));
        assert_eq!(s.per_second().len(), SAMPLES - 1);
        assert!(s.per_second().iter().all(|&d| d == 10));
        let mut short = Series::default();
        short.push(5);
        assert_eq!(short.delta(WINDOW), (0, 0));
        short.push(8);
        assert_eq!(short.delta(WINDOW), (3, 1));
    }
}
