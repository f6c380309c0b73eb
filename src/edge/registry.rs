//! The registry of snapshots: which entry answers a request, and reloads.
//!
//! The table (entries by exact path and query; for one path, entries for a host
//! before the one for any host) is immutable and swapped whole on a reload, like the
//! config snapshot: a request loads it once. A reload is validate → diff → swap: every
//! new spec whose page is unchanged ([`SnapshotSpec::same_page`]) keeps its entry (copy,
//! task, counters) and only takes the new `refresh` and `max_stale`; a renamed one gets
//! a new entry seeded with the old copy; the rest start fresh; entries no longer in
//! the config are stopped after the swap.
//!
//! Invariants: `serve` on a path that is not snapshotted costs one table load and one
//! hash lookup, and a hit takes no lock; only a request that must wait for a first
//! fetch clones an `Arc` and awaits. Reloads are serialized.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{header, HeaderMap, Method};
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::time::Instant;

use super::refresher::Entry;
use super::{EdgeError, Fetch, Hit, RefreshResult, SnapshotMetrics, SnapshotSpec, SnapshotStatus};

/// Every snapshot of the running config.
pub struct Snapshots {
    table: ArcSwap<Table>,
    fetcher: Arc<dyn Fetch>,
    metrics: SnapshotMetrics,
    runtime: Handle,
    reloading: Mutex<()>,
}

#[derive(Debug, Default)]
struct Table {
    /// In config order.
    entries: Vec<Arc<Entry>>,
    by_path: HashMap<Box<str>, Vec<Arc<Entry>>>,
}

impl Table {
    fn new(entries: Vec<Arc<Entry>>) -> Self {
        let mut by_path: HashMap<Box<str>, Vec<Arc<Entry>>> = HashMap::new();
        for e in &entries {
            by_path
                .entry(e.spec().path.as_str().into())
                .or_default()
                .push(Arc::clone(e));
        }
        for list in by_path.values_mut() {
            list.sort_by_key(|e| !e.has_host());
        }
        Table { entries, by_path }
    }

    fn find(&self, host: Option<&str>, path_and_query: &str) -> Option<&Arc<Entry>> {
        let candidates = self.by_path.get(path_and_query)?;
        let host = host.map(without_port);
        candidates.iter().find(|e| e.serves_host(host))
    }
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots")
            .field("table", &self.table.load())
            .finish_non_exhaustive()
    }
}

impl Snapshots {
    /// Starts one task per spec, each fetching right away. Call inside a Tokio runtime
    /// (the tasks run on it).
    pub fn new(
        specs: Vec<SnapshotSpec>,
        fetcher: Arc<dyn Fetch>,
        metrics: SnapshotMetrics,
    ) -> Result<Self, EdgeError> {
        let runtime = Handle::try_current().map_err(|_| EdgeError::NoRuntime)?;
        let snapshots = Snapshots {
            table: ArcSwap::from_pointee(Table::default()),
            fetcher,
            metrics,
            runtime,
            reloading: Mutex::new(()),
        };
        snapshots.reconfigure(specs)?;
        Ok(snapshots)
    }

    /// Applies a new config's specs (see the module docs). On error nothing changes.
    pub fn reconfigure(&self, specs: Vec<SnapshotSpec>) -> Result<(), EdgeError> {
        check(&specs)?;
        let _reloading = self.reloading.lock();
        let old = self.table.load_full();
        let mut entries = Vec::with_capacity(specs.len());
        let mut fresh = Vec::new();
        for spec in specs {
            let same = old.entries.iter().find(|e| e.spec().same_page(&spec));
            match same {
                Some(e) if e.name() == spec.name => {
                    e.retime(spec);
                    entries.push(Arc::clone(e));
                }
                _ => {
                    let metrics = self.metrics.entry(&spec.name);
                    let entry = Entry::new(spec, same.and_then(|e| e.page()), metrics);
                    self.metrics.track(&entry);
                    fresh.push(Arc::clone(&entry));
                    entries.push(entry);
                }
            }
        }
        let table = Arc::new(Table::new(entries));
        self.table.store(Arc::clone(&table));
        for e in fresh {
            e.start(Arc::clone(&self.fetcher), &self.runtime);
        }
        for e in &old.entries {
            if !table.entries.iter().any(|n| Arc::ptr_eq(n, e)) {
                e.stop();
            }
        }
        Ok(())
    }

    /// The answer from a snapshot for this request, or `None` to proxy it normally:
    /// not `GET`/`HEAD`, no snapshot for this host and path, a `Cookie` where cookies
    /// count, or no copy younger than `max_stale`. `host` is the request's host (a
    /// port is ignored, case too); `path_and_query` is matched exactly. Waits only
    /// while a snapshot's first fetch runs.
    pub async fn serve(
        &self,
        method: &Method,
        host: Option<&str>,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Option<Hit> {
        if *method != Method::GET && *method != Method::HEAD {
            return None;
        }
        let entry = {
            let table = self.table.load();
            let entry = table.find(host, path_and_query)?;
            if !entry.ignore_cookies && headers.contains_key(header::COOKIE) {
                return None;
            }
            // Read before the copy: a first fill that completes in between stored its
            // copy before it settled, so the copy is seen then.
            let filling = entry.filling();
            if let Some(hit) = entry.hit(method, headers, Instant::now()) {
                return Some(hit);
            }
            if !filling {
                return None;
            }
            Arc::clone(entry)
        };
        entry.first_fill().await;
        entry.hit(method, headers, Instant::now())
    }

    /// Asks the snapshot `name` (all of them with `None`) for a fetch now; returns
    /// how many were asked. Never a second fetch in flight: one running gets one
    /// more right after it.
    pub fn refresh_now(&self, name: Option<&str>) -> Result<usize, EdgeError> {
        let entries = self.select(name)?;
        for e in &entries {
            e.trigger();
        }
        Ok(entries.len())
    }

    /// Like [`Snapshots::refresh_now`], then waits for those fetches (at most a
    /// fetch in flight and the new one, each bounded by [`super::FETCH_TIMEOUT`]).
    /// Per snapshot, the result; `None` if it was removed meanwhile.
    pub async fn refresh_and_wait(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<(String, Option<RefreshResult>)>, EdgeError> {
        let asked: Vec<_> = self
            .select(name)?
            .into_iter()
            .map(|e| {
                let target = e.trigger();
                (e, target)
            })
            .collect();
        let mut out = Vec::with_capacity(asked.len());
        for (e, target) in asked {
            out.push((e.name().to_owned(), e.wait_done(target).await));
        }
        Ok(out)
    }

    /// Every snapshot's state, in config order.
    pub fn status(&self) -> Vec<SnapshotStatus> {
        let now = Instant::now();
        let table = self.table.load();
        table.entries.iter().map(|e| e.status(now)).collect()
    }

    /// Whether there are no snapshots (the request path may skip [`Snapshots::serve`]).
    pub fn is_empty(&self) -> bool {
        self.table.load().entries.is_empty()
    }

    fn select(&self, name: Option<&str>) -> Result<Vec<Arc<Entry>>, EdgeError> {
        let table = self.table.load();
        let chosen: Vec<_> = table
            .entries
            .iter()
            .filter(|e| name.is_none_or(|n| e.name() == n))
            .cloned()
            .collect();
        match name {
            Some(n) if chosen.is_empty() => Err(EdgeError::Unknown(n.to_owned())),
            _ => Ok(chosen),
        }
    }
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        for e in &self.table.load().entries {
            e.stop();
        }
    }
}

/// `host` without a `:port` suffix (`[v6]:port` keeps its brackets).
fn without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

/// Unique names, unique (host, path), paths that start with `/`.
fn check(specs: &[SnapshotSpec]) -> Result<(), EdgeError> {
    let mut names = std::collections::HashSet::new();
    let mut pages = std::collections::HashSet::new();
    for s in specs {
        if !s.path.starts_with('/') {
            return Err(EdgeError::Path {
                name: s.name.clone(),
                path: s.path.clone(),
            });
        }
        if !names.insert(s.name.as_str()) {
            return Err(EdgeError::DuplicateName(s.name.clone()));
        }
        let host = s.host.as_ref().map(|h| h.to_ascii_lowercase());
        if !pages.insert((host.clone(), s.path.as_str())) {
            return Err(EdgeError::Duplicate {
                host,
                path: s.path.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_ignored() {
        assert_eq!(without_port("example.org"), "example.org");
        assert_eq!(without_port("example.org:8080"), "example.org");
        assert_eq!(without_port("[::1]:8080"), "[::1]");
        assert_eq!(without_port("[::1]"), "[::1]");
        assert_eq!(without_port("example.org:"), "example.org");
    }

    #[test]
    fn config_errors() {
        let a = SnapshotSpec::new("a", "blog", "/");
        let mut b = SnapshotSpec::new("a", "blog", "/news");
        assert!(matches!(
            check(&[a.clone(), b.clone()]),
            Err(EdgeError::DuplicateName(_))
        ));
        b.name = "b".into();
        assert!(check(&[a.clone(), b.clone()]).is_ok());
        b.path = "/".into();
        assert!(matches!(
            check(&[a.clone(), b.clone()]),
            Err(EdgeError::Duplicate { .. })
        ));
        b.host = Some("blog.example".into());
        assert!(check(&[a.clone(), b]).is_ok());
        let bad = SnapshotSpec::new("c", "blog", "news");
        assert!(matches!(check(&[bad]), Err(EdgeError::Path { .. })));
    }

    #[test]
    fn needs_a_runtime() {
        let registry = prometheus::Registry::new();
        let metrics = SnapshotMetrics::register(&registry).expect("metrics");
        let fake = crate::edge::testing::FakeFetch::new(crate::edge::testing::Answer::Status(500));
        assert!(matches!(
            Snapshots::new(Vec::new(), fake, metrics),
            Err(EdgeError::NoRuntime)
        ));
    }
}
