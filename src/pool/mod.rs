//! A pool of back ends: admission and selection in one step.
//!
//! [`Pool::acquire`] resolves either to a [`Lease`] on one back end, chosen by smooth
//! weighted round robin among the back ends with free capacity, or to the reason the
//! request must get the maintenance page ([`Shed`]). A request that finds every back
//! end full waits in the pool's bounded queue:
//!
//! - `queue_depth` waiters at most; an arrival at a full queue is shed (`queue_full`),
//!   except that a write displaces the newest waiting read (which is shed instead).
//!   A write is shed only when the queue holds nothing but writes.
//! - Writes are served before reads; FIFO within a class.
//! - An arrival whose predicted wait — its position × the pool's service-time estimate
//!   ÷ the pool's capacity (Σ `max_connections`) — exceeds `queue_timeout` is shed at
//!   once (`predicted_wait`); a waiter still waiting after `queue_timeout` is shed
//!   (`queue_timeout`).
//! - A freed slot is handed straight to the next waiter (no polling).
//!
//! Invariants: one lock guards selection, in-flight counts and the queue, so no
//! request is admitted without a back end and `in_flight` never exceeds
//! `max_connections`. A lease holds one unit of capacity; dropping it (success, error,
//! client gone) releases it and serves the next waiter. A waiter whose client goes
//! away leaves the queue at once. Nothing is dropped while the lock is held that could
//! take the lock again (a lease refused by a vanished waiter is defused first).
//!
//! Backups (`backup = true`) are only chosen while every primary back end is drained.
//!
//! Reload ([`Pool::reconfigure`]): a pool keeps its identity (and so its queue, whose
//! waiters keep their place, and its service-time estimate) across reloads; back ends
//! are matched by name and keep their in-flight count (shared [`Load`]) and their
//! round-robin position, so `max_connections` stays exact when a reload changes it
//! and a new weight applies to the very next pick. A removed back end takes no new
//! requests; the leases on it finish normally.

pub mod estimate;
pub mod select;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::{BackendSpec, Class, PoolSpec};
use crate::health::Health;
use crate::metrics::{BackendMetrics, Metrics, PoolMetrics};
use crate::upstream::Upstream;
use estimate::ServiceTime;
use select::SmoothWrr;

/// Why a request was not given a back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Shed {
    /// The pool is in manual maintenance.
    #[error("pool in maintenance")]
    Manual,
    /// No back end can take requests at all (none configured, or all drained).
    #[error("no back end available")]
    NoBackend,
    /// The queue was full (or this read was displaced by a write).
    #[error("queue full")]
    QueueFull,
    /// Waited `queue_timeout` in the queue.
    #[error("waited too long in the queue")]
    QueueTimeout,
    /// Predicted to wait longer than `queue_timeout`.
    #[error("predicted wait too long")]
    PredictedWait,
}

impl Shed {
    /// Every reason, in `reason` label order.
    pub const ALL: [Shed; 5] = [
        Shed::QueueFull,
        Shed::QueueTimeout,
        Shed::PredictedWait,
        Shed::NoBackend,
        Shed::Manual,
    ];

    /// The `reason` label / `X-Launchday-Error` value.
    pub fn reason(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueTimeout => "queue_timeout",
            Shed::PredictedWait => "predicted_wait",
            Shed::NoBackend => "no_backend",
            Shed::Manual => "manual",
        }
    }
}

/// A back end's load and health, shared by every generation of the back end across
/// reloads.
#[derive(Debug)]
pub struct Load {
    /// Changed only under the pool lock; read anywhere.
    in_flight: AtomicU32,
    pub health: Health,
}

impl Load {
    fn new(up: bool) -> Self {
        Load {
            in_flight: AtomicU32::new(0),
            health: Health::new(up),
        }
    }
}

/// One back end of a pool, as configured by one snapshot.
pub struct Backend {
    pub spec: BackendSpec,
    /// The name, shared (access-log lines).
    name: Arc<str>,
    pub upstream: Arc<Upstream>,
    pub metrics: BackendMetrics,
    load: Arc<Load>,
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
        self.load.in_flight.load(Ordering::Relaxed)
    }

    fn full(&self) -> bool {
        self.spec
            .max_connections
            .is_some_and(|max| self.in_flight() >= max)
    }

    /// The name, shared.
    pub fn name_arc(&self) -> Arc<str> {
        Arc::clone(&self.name)
    }

    /// Its health (shared across reloads).
    pub fn health(&self) -> &Health {
        &self.load.health
    }

    /// Weight > 0 and healthy.
    fn serving(&self, now: Instant) -> bool {
        self.spec.weight > 0 && self.load.health.available(now)
    }
}

type Reply = oneshot::Sender<Result<Lease, Shed>>;

struct Waiter {
    id: u64,
    tx: Reply,
    since: Instant,
}

/// Everything guarded by the pool lock.
struct State {
    queue_depth: usize,
    queue_timeout: std::time::Duration,
    slow_start: std::time::Duration,
    passive_failures: u32,
    passive_cooldown: std::time::Duration,
    backends: Vec<Arc<Backend>>,
    swrr: SmoothWrr,
    writes: VecDeque<Waiter>,
    reads: VecDeque<Waiter>,
    next_id: u64,
    service: ServiceTime,
}

impl State {
    fn depth(&self) -> usize {
        self.writes.len() + self.reads.len()
    }

    fn queue(&mut self, class: Class) -> &mut VecDeque<Waiter> {
        match class {
            Class::Write => &mut self.writes,
            Class::Read => &mut self.reads,
        }
    }

    fn set_backends(&mut self, backends: Vec<Arc<Backend>>, current: Vec<i64>) {
        self.backends = backends;
        self.swrr = SmoothWrr::with_current(current);
    }

    /// Whether some primary can take requests now (else the backups serve).
    fn any_primary(&self, now: Instant) -> bool {
        self.backends
            .iter()
            .any(|b| !b.spec.backup && b.serving(now))
    }

    /// Σ max_connections of the back ends that serve now (`None`: some unlimited).
    fn capacity(&self, now: Instant) -> Option<u64> {
        let primary = self.any_primary(now);
        self.backends
            .iter()
            .filter(|b| b.spec.backup != primary && b.serving(now))
            .map(|b| b.spec.max_connections.map(u64::from))
            .sum()
    }
}

/// Manual maintenance: the config's value, and the admin API's switch (which wins
/// until switched again, across reloads).
#[derive(Debug, Default)]
struct Maintenance {
    config: AtomicBool,
    /// 0 = follow the config, 1 = on, 2 = off.
    switch: std::sync::atomic::AtomicU8,
}

impl Maintenance {
    fn on(&self) -> bool {
        match self.switch.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => self.config.load(Ordering::Relaxed),
        }
    }
}

/// A pool: its settings, back ends, selector and queue.
pub struct Pool {
    name: Arc<str>,
    pub metrics: PoolMetrics,
    maintenance: Maintenance,
    state: Mutex<State>,
    /// Active health-check settings and tasks of the current config.
    checks: Mutex<(
        Option<crate::config::HealthCheckSpec>,
        Vec<tokio::task::JoinHandle<()>>,
    )>,
    retries: std::sync::atomic::AtomicU32,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for t in self.checks.get_mut().1.drain(..) {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("name", &self.name).finish()
    }
}

impl Pool {
    /// Builds the runtime pool. `upstream(addr)` gives the connection pool for an
    /// address (shared between pools and kept across reloads by the caller).
    pub fn new(
        spec: PoolSpec,
        metrics: &Metrics,
        upstream: impl FnMut(std::net::SocketAddr) -> Arc<Upstream>,
    ) -> Self {
        let pool = Pool {
            name: spec.name.as_str().into(),
            metrics: metrics.pool(&spec.name),
            maintenance: Maintenance::default(),
            state: Mutex::new(State {
                queue_depth: 0,
                queue_timeout: std::time::Duration::ZERO,
                slow_start: std::time::Duration::ZERO,
                passive_failures: 0,
                passive_cooldown: std::time::Duration::ZERO,
                backends: Vec::new(),
                swrr: SmoothWrr::new(0),
                writes: VecDeque::new(),
                reads: VecDeque::new(),
                next_id: 0,
                service: ServiceTime::default(),
            }),
            checks: Mutex::new((None, Vec::new())),
            retries: std::sync::atomic::AtomicU32::new(0),
        };
        pool.configure(spec, metrics, upstream);
        pool
    }

    /// (Re)starts the active health checks of the current config (a no-op outside a
    /// tokio runtime). Called after `new`/`reconfigure`.
    pub fn start_checks(self: &Arc<Self>) {
        let backends = self.backends();
        let mut checks = self.checks.lock();
        for t in checks.1.drain(..) {
            t.abort();
        }
        if let (Some(spec), Ok(_)) = (&checks.0, tokio::runtime::Handle::try_current()) {
            checks.1 = crate::health::check::spawn(self, &backends, spec);
        }
    }

    /// Records an active check of `backend`; logs and counts transitions, and serves
    /// waiters when a back end comes up.
    pub fn check_result(
        self: &Arc<Self>,
        backend: &Backend,
        ok: bool,
        spec: &crate::config::HealthCheckSpec,
    ) {
        backend.metrics.checks[usize::from(!ok)].inc();
        let now = Instant::now();
        let Some(up) = backend
            .load
            .health
            .check_result(ok, spec.rise, spec.fall, now)
        else {
            return;
        };
        backend.metrics.up.set(i64::from(up));
        if up {
            tracing::info!(pool = %self.name, backend = %backend.spec.name, "back end up (health check)");
            let mut st = self.state.lock();
            self.dispatch(&mut st);
        } else {
            tracing::warn!(pool = %self.name, backend = %backend.spec.name, "back end down (health check)");
        }
    }

    /// Records the outcome of a real request to `backend` (passive checks).
    pub fn passive_result(&self, backend: &Backend, ok: bool) {
        let (threshold, cooldown) = {
            let st = self.state.lock();
            (st.passive_failures, st.passive_cooldown)
        };
        if backend
            .load
            .health
            .passive_result(ok, threshold, cooldown, Instant::now())
        {
            tracing::warn!(pool = %self.name, backend = %backend.spec.name, cooldown = ?cooldown,
                "back end taken out after {threshold} consecutive failures");
        }
    }

    /// How many times a failed request may be tried on another back end.
    pub fn retries(&self) -> u32 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Applies a new snapshot's settings for this pool (same name), keeping the queue,
    /// the estimate, and each same-named back end's load and round-robin position.
    /// Waiters that the new settings can serve are served at once.
    pub fn reconfigure(
        self: &Arc<Self>,
        spec: PoolSpec,
        metrics: &Metrics,
        upstream: impl FnMut(std::net::SocketAddr) -> Arc<Upstream>,
    ) {
        self.configure(spec, metrics, upstream);
        self.start_checks();
        let mut st = self.state.lock();
        if st.backends.iter().all(|b| b.spec.weight == 0) {
            let waiters = take_waiters(&mut st);
            self.metrics.queue_depth.set(0);
            drop(st);
            for w in waiters {
                let _ = w.tx.send(Err(Shed::NoBackend));
            }
        } else {
            self.dispatch(&mut st);
        }
    }

    fn configure(
        &self,
        spec: PoolSpec,
        metrics: &Metrics,
        mut upstream: impl FnMut(std::net::SocketAddr) -> Arc<Upstream>,
    ) {
        let mut st = self.state.lock();
        let checked = spec.health_check.is_some();
        let now = Instant::now();
        let mut backends = Vec::with_capacity(spec.backends.len());
        let mut current = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let old = st.backends.iter().position(|o| o.spec.name == b.name);
            let load = match old {
                Some(i) => Arc::clone(&st.backends[i].load),
                // With active checks a new back end waits for its first success.
                None => Arc::new(Load::new(!checked)),
            };
            if !checked {
                load.health.set_up(true, now);
            }
            current.push(old.map_or(0, |i| st.swrr.current(i)));
            let backend = Backend {
                name: b.name.as_str().into(),
                metrics: metrics.backend(&spec.name, &b.name, b.weight),
                upstream: upstream(b.address),
                spec: b.clone(),
                load,
            };
            backend
                .metrics
                .up
                .set(i64::from(backend.load.health.available(now)));
            backends.push(Arc::new(backend));
        }
        for gone in st
            .backends
            .iter()
            .filter(|o| !spec.backends.iter().any(|b| b.name == o.spec.name))
        {
            metrics.forget_backend(&spec.name, &gone.spec.name);
        }
        st.set_backends(backends, current);
        st.queue_depth = spec.queue_depth;
        st.queue_timeout = spec.queue_timeout;
        st.slow_start = spec.slow_start;
        st.passive_failures = spec.passive_failures;
        st.passive_cooldown = spec.passive_cooldown;
        self.retries.store(spec.retries, Ordering::Relaxed);
        self.checks.lock().0 = spec.health_check.clone();
        self.maintenance
            .config
            .store(spec.maintenance, Ordering::Relaxed);
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool's name, shared.
    pub fn name_arc(&self) -> Arc<str> {
        Arc::clone(&self.name)
    }

    /// The back ends now, in config order.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.state.lock().backends.clone()
    }

    /// Requests waiting in the queue now.
    pub fn queue_depth(&self) -> usize {
        self.state.lock().depth()
    }

    /// The current service-time estimate.
    pub fn service_time(&self) -> Option<std::time::Duration> {
        self.state.lock().service.get()
    }

    /// Whether the pool is in manual maintenance.
    pub fn in_maintenance(&self) -> bool {
        self.maintenance.on()
    }

    /// Switches manual maintenance (the switch outlives reloads); turning it on sheds
    /// every waiter (`manual`).
    pub fn set_maintenance(&self, on: bool) {
        self.maintenance
            .switch
            .store(if on { 1 } else { 2 }, Ordering::Relaxed);
        if on {
            let mut st = self.state.lock();
            let waiters = take_waiters(&mut st);
            self.metrics.queue_depth.set(0);
            drop(st);
            for w in waiters {
                let _ = w.tx.send(Err(Shed::Manual));
            }
        }
    }

    /// Admits a request of `class` and picks its back end, waiting in the queue if
    /// every back end is full, or says why it must be shed.
    pub async fn acquire(self: &Arc<Self>, class: Class) -> Result<Lease, Shed> {
        if self.in_maintenance() {
            return Err(Shed::Manual);
        }
        let arrived = Instant::now();
        let (id, deadline, mut rx) = {
            let mut st = self.state.lock();
            if let Some(lease) = self.try_lease(&mut st, None) {
                return Ok(lease);
            }
            let now = Instant::now();
            if !st.backends.iter().any(|b| b.serving(now)) {
                return Err(Shed::NoBackend);
            }
            let position = match class {
                Class::Write => st.writes.len() + 1,
                Class::Read => st.depth() + 1,
            };
            if let (Some(service), Some(capacity)) = (st.service.get(), st.capacity(now)) {
                let predicted = service.mul_f64(position as f64 / capacity.max(1) as f64);
                if predicted > st.queue_timeout {
                    return Err(Shed::PredictedWait);
                }
            }
            let mut displaced = None;
            if st.depth() >= st.queue_depth {
                if class == Class::Write && !st.reads.is_empty() {
                    displaced = st.reads.pop_back();
                } else {
                    return Err(Shed::QueueFull);
                }
            }
            let (tx, rx) = oneshot::channel();
            let id = st.next_id;
            st.next_id += 1;
            st.queue(class).push_back(Waiter {
                id,
                tx,
                since: arrived,
            });
            self.metrics.queue_depth.set(st.depth() as i64);
            let deadline = arrived + st.queue_timeout;
            drop(st);
            if let Some(w) = displaced {
                self.shed_waiter(w, Shed::QueueFull);
            }
            (id, deadline, rx)
        };
        let mut guard = WaitGuard {
            pool: self,
            id,
            class,
            armed: true,
        };
        let result = match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(Ok(result)) => {
                guard.armed = false;
                result
            }
            // The sender is only dropped after sending; treat a lost one as no back end.
            Ok(Err(_)) => {
                guard.armed = false;
                Err(Shed::NoBackend)
            }
            Err(_) => {
                guard.armed = false;
                if self.remove_waiter(id, class) {
                    self.metrics
                        .queue_wait
                        .observe(arrived.elapsed().as_secs_f64());
                    Err(Shed::QueueTimeout)
                } else {
                    // Served (or displaced) at the last moment: the answer is in the channel.
                    rx.try_recv().unwrap_or(Err(Shed::QueueTimeout))
                }
            }
        };
        drop(guard);
        result
    }

    fn shed_waiter(&self, w: Waiter, why: Shed) {
        self.metrics
            .queue_wait
            .observe(w.since.elapsed().as_secs_f64());
        let _ = w.tx.send(Err(why));
    }

    /// Removes waiter `id`; false if it was no longer queued.
    fn remove_waiter(&self, id: u64, class: Class) -> bool {
        let mut st = self.state.lock();
        let q = st.queue(class);
        let Some(pos) = q.iter().position(|w| w.id == id) else {
            return false;
        };
        let removed = q.remove(pos);
        self.metrics.queue_depth.set(st.depth() as i64);
        drop(st);
        drop(removed);
        true
    }

    /// Picks a back end with free capacity and takes one unit of it, preferring any
    /// back end but `avoid` (a retry goes elsewhere when it can).
    fn try_lease(
        self: &Arc<Self>,
        st: &mut MutexGuard<'_, State>,
        avoid: Option<&Backend>,
    ) -> Option<Lease> {
        let now = Instant::now();
        // A retry that avoids the only live primary may go to a backup.
        let any_primary = st.backends.iter().any(|b| {
            !b.spec.backup
                && b.serving(now)
                && !avoid.is_some_and(|a| std::ptr::eq(a.load.as_ref(), b.load.as_ref()))
        });
        let slow_start = st.slow_start;
        let State { swrr, backends, .. } = &mut **st;
        let weight = |b: &Backend, avoid: Option<&Backend>| {
            let avoided = avoid.is_some_and(|a| std::ptr::eq(a.load.as_ref(), b.load.as_ref()));
            if b.spec.backup == any_primary || avoided || b.full() || !b.serving(now) {
                0
            } else {
                b.load
                    .health
                    .effective_weight(b.spec.weight, slow_start, now)
            }
        };
        let index = swrr.pick(|i| weight(&backends[i], avoid))?;
        let b = &backends[index];
        b.load.in_flight.fetch_add(1, Ordering::Relaxed);
        b.metrics.in_flight.inc();
        Some(Lease {
            pool: Arc::clone(self),
            backend: Arc::clone(b),
            started: Some(now),
            armed: true,
        })
    }

    /// For a retry: a back end other than `failed` if one has room now, else the
    /// queue like any request (so retries respect `max_connections` and the queue).
    pub async fn acquire_retry(
        self: &Arc<Self>,
        class: Class,
        failed: &Backend,
    ) -> Result<Lease, Shed> {
        if self.in_maintenance() {
            return Err(Shed::Manual);
        }
        {
            let mut st = self.state.lock();
            if let Some(lease) = self.try_lease(&mut st, Some(failed)) {
                return Ok(lease);
            }
        }
        self.acquire(class).await
    }

    /// Gives one unit of `backend` back and hands free capacity to waiters.
    /// `started`: when its request began, to observe its service time (`None`: a
    /// tunnel, whose service time was observed when it opened).
    fn release(self: &Arc<Self>, backend: &Backend, started: Option<Instant>) {
        let now = Instant::now();
        let mut st = self.state.lock();
        backend.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        backend.metrics.in_flight.dec();
        if let Some(started) = started {
            st.service
                .observe(now.saturating_duration_since(started), now);
        }
        self.dispatch(&mut st);
    }

    /// Serves waiters, writes first, while a back end has free capacity.
    fn dispatch(self: &Arc<Self>, st: &mut MutexGuard<'_, State>) {
        while st.depth() > 0 {
            let Some(lease) = self.try_lease(st, None) else {
                break;
            };
            let waiter = match st.writes.pop_front() {
                Some(w) => w,
                None => match st.reads.pop_front() {
                    Some(w) => w,
                    None => {
                        undo(lease);
                        break;
                    }
                },
            };
            self.metrics.queue_depth.set(st.depth() as i64);
            self.metrics
                .queue_wait
                .observe(waiter.since.elapsed().as_secs_f64());
            if let Err(Ok(refused)) = waiter.tx.send(Ok(lease)) {
                // The client went away between leaving the queue and now.
                undo(refused);
            }
        }
    }
}

fn take_waiters(st: &mut State) -> Vec<Waiter> {
    let mut waiters: Vec<Waiter> = st.writes.drain(..).collect();
    waiters.extend(st.reads.drain(..));
    waiters
}

/// Returns a lease's unit without taking the pool lock (the caller holds it).
fn undo(mut lease: Lease) {
    lease.armed = false;
    lease.backend.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    lease.backend.metrics.in_flight.dec();
}

/// Takes a waiter out of the queue if its request goes away while waiting.
struct WaitGuard<'a> {
    pool: &'a Arc<Pool>,
    id: u64,
    class: Class,
    armed: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.remove_waiter(self.id, self.class);
        }
    }
}

/// One unit of a back end's capacity, held for as long as its request lives.
pub struct Lease {
    pool: Arc<Pool>,
    backend: Arc<Backend>,
    /// When its request began; `None` once it became a tunnel ([`Lease::into_tunnel`]).
    started: Option<Instant>,
    /// False once given back under the lock by [`undo`].
    armed: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("pool", &self.pool.name)
            .field("backend", &self.backend.spec.name)
            .finish()
    }
}

impl Lease {
    /// The back end this lease is on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The back end, shared.
    pub fn backend_arc(&self) -> Arc<Backend> {
        Arc::clone(&self.backend)
    }

    /// The pool it belongs to.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Its request became a tunnel (the back end answered `101`). The service time
    /// of the request, the handshake, is observed now; the lease is then held for as
    /// long as the tunnel lasts (so `max_connections` counts open tunnels), and its
    /// release observes nothing more: a long tunnel is not a slow back end.
    pub fn into_tunnel(&mut self) {
        if let Some(started) = self.started.take() {
            let now = Instant::now();
            self.pool
                .state
                .lock()
                .service
                .observe(now.saturating_duration_since(started), now);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed {
            self.pool.release(&self.backend, self.started);
        }
    }
}

#[cfg(test)]
mod tests;
