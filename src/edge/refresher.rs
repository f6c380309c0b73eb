//! One snapshot: its copy, its schedule, and the task that fetches it.
//!
//! The task is the only caller of [`Fetch::fetch`] for its entry and awaits each
//! fetch before it considers the next, so there is never more than one in flight.
//! Fetches start at once, then `refresh` after the previous one started (at once if
//! that is past, e.g. after a slow fetch). A forced refresh ([`Entry::trigger`]) sets a
//! flag and wakes the task; a fetch that starts clears the flag, so any number of
//! triggers during a fetch give exactly one more fetch, right after it.
//!
//! Completed fetches are published on a `watch` channel (`completed`, the sequence
//! number of the last finished fetch, and its result), which is what the first
//! requests and [`Entry::wait_done`] wait on. When the task ends (stopped by a reload,
//! aborted, or its runtime shut down) a guard marks the entry stopped, so no waiter is
//! left hanging.
//!
//! Invariant: the request path ([`Entry::hit`]) takes no lock: two `ArcSwap` loads
//! and an atomic read for `max_stale`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{HeaderMap, Method, StatusCode};
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::metrics::EntryMetrics;
use super::page::{Page, PageError};
use super::{Fetch, FetchError, Hit, RefreshResult, SnapshotSpec, SnapshotStatus};
use super::{FETCH_TIMEOUT, MIN_REFRESH};

/// Interval between fetches while they fail and there is no copy to serve (when
/// shorter than `refresh`).
const RETRY: Duration = Duration::from_secs(1);

/// Why one refresh failed (logged; counted as `error`).
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Page(#[from] PageError),
    #[error("building the copy: {0}")]
    Join(#[from] tokio::task::JoinError),
}

#[derive(Debug, Default)]
struct Schedule {
    /// Fetches started so far.
    started: u64,
    /// A fetch was asked for that has not started yet.
    forced: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Done {
    /// Sequence number of the last finished fetch (0: none yet).
    completed: u64,
    last: Option<RefreshResult>,
    stopped: bool,
}

/// One snapshot's state, shared by its task and the request path.
#[derive(Debug)]
pub struct Entry {
    name: Arc<str>,
    pool: Arc<str>,
    host: Option<Box<str>>,
    pub(super) ignore_cookies: bool,
    spec: ArcSwap<SnapshotSpec>,
    max_stale_ns: AtomicU64,
    page: ArcSwapOption<Page>,
    /// Set once the first fetch finished or the task stopped: no request waits then.
    settled: AtomicBool,
    schedule: Mutex<Schedule>,
    wake: Notify,
    done: watch::Sender<Done>,
    metrics: EntryMetrics,
    task: Mutex<Option<AbortHandle>>,
}

impl Entry {
    /// An entry for `spec`, starting with `seed` as its copy (a renamed snapshot
    /// keeps its page). Not running until [`Entry::start`].
    pub fn new(spec: SnapshotSpec, seed: Option<Arc<Page>>, metrics: EntryMetrics) -> Arc<Self> {
        Arc::new(Entry {
            name: spec.name.as_str().into(),
            pool: spec.pool.as_str().into(),
            host: spec.host.as_deref().map(|h| h.to_ascii_lowercase().into()),
            ignore_cookies: spec.ignore_cookies,
            max_stale_ns: AtomicU64::new(nanos(spec.max_stale)),
            spec: ArcSwap::from_pointee(spec),
            page: ArcSwapOption::new(seed),
            settled: AtomicBool::new(false),
            schedule: Mutex::default(),
            wake: Notify::new(),
            done: watch::Sender::new(Done::default()),
            metrics,
            task: Mutex::new(None),
        })
    }

    /// The snapshot's name (its metric label).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current spec.
    pub fn spec(&self) -> Arc<SnapshotSpec> {
        self.spec.load_full()
    }

    /// Spawns the task on `runtime`.
    pub fn start(self: &Arc<Self>, fetcher: Arc<dyn Fetch>, runtime: &Handle) {
        let guard = StopGuard(Arc::clone(self));
        let entry = Arc::clone(self);
        let task = runtime.spawn(async move {
            let _guard = guard;
            entry.run(fetcher).await;
        });
        *self.task.lock() = Some(task.abort_handle());
    }

    /// Stops the task (dropping a fetch in flight); waiters fall through.
    pub fn stop(&self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
        self.mark_stopped();
    }

    fn mark_stopped(&self) {
        self.settled.store(true, Ordering::Release);
        self.done.send_modify(|d| d.stopped = true);
    }

    /// Takes the new `refresh` and `max_stale` of an unchanged page.
    pub fn retime(&self, spec: SnapshotSpec) {
        self.max_stale_ns
            .store(nanos(spec.max_stale), Ordering::Relaxed);
        self.spec.store(Arc::new(spec));
        self.wake.notify_one();
    }

    /// Whether this entry answers requests for `host` (already without port).
    pub fn serves_host(&self, host: Option<&str>) -> bool {
        match (&self.host, host) {
            (None, _) => true,
            (Some(ours), Some(theirs)) => ours.eq_ignore_ascii_case(theirs),
            (Some(_), None) => false,
        }
    }

    /// Whether this entry is for a host (rather than any).
    pub fn has_host(&self) -> bool {
        self.host.is_some()
    }

    /// The copy, good or not.
    pub fn page(&self) -> Option<Arc<Page>> {
        self.page.load_full()
    }

    fn max_stale(&self) -> Duration {
        Duration::from_nanos(self.max_stale_ns.load(Ordering::Relaxed))
    }

    /// The answer from the copy, if there is one younger than `max_stale`.
    pub fn hit(&self, method: &Method, headers: &HeaderMap, now: Instant) -> Option<Hit> {
        let page = self.page.load();
        let page = page.as_ref()?;
        if now.saturating_duration_since(page.fetched_at()) > self.max_stale() {
            return None;
        }
        self.metrics.hits.inc();
        Some(Hit {
            response: page.respond(method, headers, now),
            pool: Arc::clone(&self.pool),
        })
    }

    /// Whether the first fetch is still to finish (a request should wait for it).
    pub fn filling(&self) -> bool {
        !self.settled.load(Ordering::Acquire)
    }

    /// Waits until the first fetch finished or the task stopped.
    pub async fn first_fill(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| d.completed > 0 || d.stopped).await;
    }

    /// Asks for a fetch that starts after this call; returns its sequence number.
    pub fn trigger(&self) -> u64 {
        let target = {
            let mut s = self.schedule.lock();
            s.forced = true;
            s.started + 1
        };
        self.wake.notify_one();
        target
    }

    /// Waits until fetch `target` (or a later one) finished; its result, or `None`
    /// if the entry stopped first.
    pub async fn wait_done(&self, target: u64) -> Option<RefreshResult> {
        let mut rx = self.done.subscribe();
        let done = *rx
            .wait_for(|d| d.completed >= target || d.stopped)
            .await
            .ok()?;
        done.last.filter(|_| done.completed >= target)
    }

    /// Time since the last good copy was fetched, while the entry runs.
    pub fn age(&self, now: Instant) -> Option<Duration> {
        if self.done.borrow().stopped {
            return None;
        }
        let page = self.page.load();
        Some(now.saturating_duration_since(page.as_ref()?.fetched_at()))
    }

    /// The entry's state for the admin API.
    pub fn status(&self, now: Instant) -> SnapshotStatus {
        let spec = self.spec.load_full();
        let page = self.page.load_full();
        let done = *self.done.borrow();
        let age = page
            .as_ref()
            .map(|p| now.saturating_duration_since(p.fetched_at()));
        SnapshotStatus {
            name: spec.name.clone(),
            pool: spec.pool.clone(),
            host: spec.host.clone(),
            path: spec.path.clone(),
            refresh_seconds: spec.refresh.as_secs_f64(),
            max_stale_seconds: spec.max_stale.as_secs_f64(),
            age_seconds: age.map(|a| a.as_secs_f64()),
            serving: age.is_some_and(|a| a <= self.max_stale()),
            bytes: page.map(|p| p.identity().len()),
            fetches: done.completed,
            last_result: done.last,
        }
    }

    async fn run(self: Arc<Self>, fetcher: Arc<dyn Fetch>) {
        let mut last: Option<(Instant, bool)> = None;
        loop {
            if let Some((started, failed)) = last {
                self.wait_due(started, failed).await;
            }
            let (spec, seq) = {
                let mut s = self.schedule.lock();
                s.forced = false;
                s.started += 1;
                (self.spec.load_full(), s.started)
            };
            let started = Instant::now();
            let result = match self.refresh(&*fetcher, &spec).await {
                Ok(result) => result,
                Err(e) => {
                    tracing::warn!(snapshot = %self.name, error = %e, "snapshot refresh failed; keeping the last good copy");
                    RefreshResult::Error
                }
            };
            last = Some((started, result != RefreshResult::Ok));
            self.metrics.refreshes[result as usize].inc();
            self.settled.store(true, Ordering::Release);
            self.done.send_modify(|d| {
                d.completed = seq;
                d.last = Some(result);
            });
        }
    }

    /// Sleeps until the next fetch is due or forced.
    async fn wait_due(&self, started: Instant, failed: bool) {
        loop {
            if self.schedule.lock().forced {
                return;
            }
            let due = self.due(started, failed);
            tokio::select! {
                () = tokio::time::sleep_until(due) => return,
                // A trigger or new timing: look again.
                () = self.wake.notified() => {}
            }
        }
    }

    /// When the fetch after one that started at `started` is due: `refresh` later,
    /// but after a failure, once no copy can be served, every [`RETRY`]: every
    /// request reaches the back end meanwhile anyway, so one more costs nothing and
    /// a success ends that sooner.
    fn due(&self, started: Instant, failed: bool) -> Instant {
        let refresh = started + self.spec.load().refresh.max(MIN_REFRESH);
        if !failed {
            return refresh;
        }
        let retry = started + RETRY;
        let expires = self
            .page
            .load()
            .as_ref()
            .map(|p| p.fetched_at() + self.max_stale());
        match expires {
            Some(expires) => refresh.min(expires.max(retry)),
            None => refresh.min(retry),
        }
    }

    /// One fetch; on a `200`, the new copy is built (off the async threads) and
    /// swapped in.
    async fn refresh(
        &self,
        fetcher: &dyn Fetch,
        spec: &SnapshotSpec,
    ) -> Result<RefreshResult, RefreshError> {
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, fetcher.fetch(spec))
            .await
            .map_err(|_| FetchError::Timeout(FETCH_TIMEOUT))??;
        if fetched.status != StatusCode::OK {
            tracing::warn!(snapshot = %self.name, status = %fetched.status, "snapshot refresh got no 200; keeping the last good copy");
            return Ok(RefreshResult::Not200);
        }
        let fetched_at = Instant::now();
        let previous = self.page.load_full();
        let page = tokio::task::spawn_blocking(move || {
            Page::build(fetched, previous.as_deref(), fetched_at)
        })
        .await??;
        self.page.store(Some(Arc::new(page)));
        Ok(RefreshResult::Ok)
    }
}

/// Marks its entry stopped when the task ends, however it ends.
struct StopGuard(Arc<Entry>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.mark_stopped();
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
