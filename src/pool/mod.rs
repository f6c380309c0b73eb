//! A pool of back ends: admission and selection in one step.
//!
//! [`Pool::acquire`] either returns a [`Lease`] on one back end, chosen by smooth
//! weighted round robin among the back ends with free capacity, or says why the
//! request must be answered locally ([`Shed`]). The lease holds one unit of the back
//! end's `max_connections`; dropping it (on success, error or client gone) frees it.
//! Choosing and counting happen under the same lock, so no request is admitted
//! without a back end, and `in_flight` never exceeds `max_connections`.
//!
//! Backups (`backup = true`) are only chosen while no primary back end can take
//! requests at all (every primary drained); a primary that is merely full does not
//! spill onto the backups.

pub mod select;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::{BackendSpec, PoolSpec};
use crate::metrics::{BackendMetrics, Metrics, PoolMetrics};
use crate::upstream::Upstream;
use select::SmoothWrr;

/// Why a request was not given a back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shed {
    /// The pool is in manual maintenance.
    #[error("pool in maintenance")]
    Manual,
    /// No back end can take requests (none configured, all drained or full).
    #[error("no back end available")]
    NoBackend,
}

impl Shed {
    /// The `reason` label / `X-Launchday-Error` value.
    pub fn reason(self) -> &'static str {
        match self {
            Shed::Manual => "manual",
            Shed::NoBackend => "no_backend",
        }
    }
}

/// One back end of a pool, as the request path sees it.
pub struct Backend {
    pub spec: BackendSpec,
    pub upstream: Arc<Upstream>,
    pub metrics: BackendMetrics,
    in_flight: AtomicU32,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.spec.name)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Backend {
    /// Requests in flight to this back end now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn has_capacity(&self) -> bool {
        self.spec
            .max_connections
            .is_none_or(|max| self.in_flight() < max)
    }
}

/// A pool: its settings, back ends and selector.
pub struct Pool {
    pub spec: PoolSpec,
    pub metrics: PoolMetrics,
    backends: Vec<Backend>,
    selector: Mutex<SmoothWrr>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.spec.name)
            .finish()
    }
}

impl Pool {
    /// Builds the runtime pool. `upstream(addr)` gives the connection pool for an
    /// address (shared between pools and kept across reloads by the caller).
    pub fn new(
        spec: PoolSpec,
        metrics: &Metrics,
        mut upstream: impl FnMut(std::net::SocketAddr) -> Arc<Upstream>,
    ) -> Self {
        let backends: Vec<Backend> = spec
            .backends
            .iter()
            .map(|b| Backend {
                metrics: metrics.backend(&spec.name, &b.name, b.weight),
                upstream: upstream(b.address),
                spec: b.clone(),
                in_flight: AtomicU32::new(0),
            })
            .collect();
        Pool {
            metrics: metrics.pool(&spec.name),
            selector: Mutex::new(SmoothWrr::new(backends.len())),
            backends,
            spec,
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The back ends, in config order.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Admits a request and picks its back end, or says why not.
    pub fn acquire(self: &Arc<Self>) -> Result<Lease, Shed> {
        if self.spec.maintenance {
            return Err(Shed::Manual);
        }
        let backends = &self.backends;
        let any_primary = backends.iter().any(|b| !b.spec.backup && b.spec.weight > 0);
        let mut selector = self.selector.lock();
        let picked = selector.pick(|i| {
            let b = &backends[i];
            if b.spec.backup == any_primary || !b.has_capacity() {
                0
            } else {
                b.spec.weight
            }
        });
        let index = picked.ok_or(Shed::NoBackend)?;
        // Counted under the selector lock: capacity checks above see every lease.
        let b = &backends[index];
        b.in_flight.fetch_add(1, Ordering::Relaxed);
        drop(selector);
        b.metrics.in_flight.inc();
        Ok(Lease {
            pool: Arc::clone(self),
            index,
        })
    }
}

/// One unit of a back end's capacity, held for as long as its request lives.
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("pool", &self.pool.spec.name)
            .field("backend", &self.backend().spec.name)
            .finish()
    }
}

impl Lease {
    /// The back end this lease is on.
    pub fn backend(&self) -> &Backend {
        &self.pool.backends[self.index]
    }

    /// The pool it belongs to.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let b = &self.pool.backends[self.index];
        b.in_flight.fetch_sub(1, Ordering::Relaxed);
        b.metrics.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendSpec, PoolSpec};
    use std::time::Duration;

    fn backend(name: &str, weight: u32, max: Option<u32>, backup: bool) -> BackendSpec {
        BackendSpec {
            name: name.into(),
            address_text: "[::1]:1".into(),
            address: "[::1]:1".parse().expect("addr"),
            weight,
            max_connections: max,
            served_by: None,
            backup,
        }
    }

    fn pool(backends: Vec<BackendSpec>, maintenance: bool) -> Arc<Pool> {
        let spec = PoolSpec {
            name: "p".into(),
            queue_depth: 4,
            queue_timeout: Duration::from_secs(1),
            maintenance,
            backends,
            health_check: None,
        };
        let m = Metrics::new(prometheus::Registry::new()).expect("metrics");
        Arc::new(Pool::new(spec, &m, Upstream::new))
    }

    fn name(l: &Lease) -> &str {
        &l.backend().spec.name
    }

    #[test]
    fn full_back_end_is_skipped_and_lease_drop_frees_it() {
        let p = pool(
            vec![
                backend("a", 1, Some(1), false),
                backend("b", 1, None, false),
            ],
            false,
        );
        let first = p.acquire().expect("a");
        assert_eq!(name(&first), "a");
        // a is full: every pick goes to b while the lease is held.
        let held: Vec<Lease> = (0..5).map(|_| p.acquire().expect("b")).collect();
        assert!(held.iter().all(|l| name(l) == "b"));
        assert_eq!(p.backends()[0].in_flight(), 1);
        assert_eq!(p.backends()[1].in_flight(), 5);
        drop(first);
        drop(held);
        assert_eq!(p.backends()[0].in_flight(), 0);
        assert_eq!(p.backends()[1].in_flight(), 0);
        assert_eq!(p.backends()[0].metrics.in_flight.get(), 0);
    }

    #[test]
    fn all_full_or_drained_is_no_backend() {
        let p = pool(
            vec![
                backend("a", 1, Some(1), false),
                backend("d", 0, None, false),
            ],
            false,
        );
        let _l = p.acquire().expect("a");
        assert_eq!(p.acquire().err(), Some(Shed::NoBackend));
    }

    #[test]
    fn maintenance_sheds_manual() {
        let p = pool(vec![], true);
        assert_eq!(p.acquire().err(), Some(Shed::Manual));
    }

    #[test]
    fn backups_only_when_no_primary_can_take_requests() {
        let p = pool(
            vec![
                backend("a", 1, None, false),
                backend("spare", 1, None, true),
            ],
            false,
        );
        for _ in 0..10 {
            assert_eq!(name(&p.acquire().expect("a")), "a");
        }
        let drained = pool(
            vec![
                backend("a", 0, None, false),
                backend("spare", 1, None, true),
            ],
            false,
        );
        assert_eq!(name(&drained.acquire().expect("spare")), "spare");
    }
}
