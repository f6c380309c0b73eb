//! Metrics of edge snapshots, registered once per registry.
//!
//! - `launchday_snapshot_hits_total{snapshot}`: requests answered from a copy
//!   (`200` and `304`).
//! - `launchday_snapshot_refreshes_total{snapshot,result}`: finished fetches, `result`
//!   one of `ok`, `error`, `not_200`.
//! - `launchday_snapshot_age_seconds{snapshot}`: seconds since the last good copy was
//!   fetched, computed when the registry is gathered (a scrape), so it is exact at
//!   scrape time and costs the request path nothing. Absent before a snapshot's first
//!   good copy; it keeps growing past `max_stale` (the copy is then no longer served).
//!
//! Invariants: the families are created and registered once, in
//! [`SnapshotMetrics::register`]; an entry resolves its label handles once, when it is
//! created, so a hit is one atomic increment. Counters survive reloads (they must not
//! go backwards); the age series of a removed snapshot disappears at the next scrape.
//! Labels are bounded: snapshot names come from the config.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, Opts, Registry};
use tokio::time::Instant;

use super::refresher::Entry;
use super::RefreshResult;

/// Errors of this module: those of registering a family.
pub type MetricsError = prometheus::Error;

type Live = Arc<Mutex<Vec<Weak<Entry>>>>;

/// The snapshot metric families of one registry. Cheap to clone; every clone
/// shares the families.
#[derive(Clone)]
pub struct SnapshotMetrics {
    hits: IntCounterVec,
    refreshes: IntCounterVec,
    live: Live,
}

/// The label handles of one snapshot.
#[derive(Clone)]
pub struct EntryMetrics {
    pub hits: IntCounter,
    /// Indexed by [`RefreshResult`].
    pub refreshes: [IntCounter; 3],
}

impl std::fmt::Debug for SnapshotMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotMetrics").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EntryMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryMetrics")
            .field("hits", &self.hits.get())
            .finish_non_exhaustive()
    }
}

impl SnapshotMetrics {
    /// Creates the three families and registers them in `registry`. Call once per
    /// registry (a second call fails: the names are taken).
    pub fn register(registry: &Registry) -> Result<Self, MetricsError> {
        let hits = IntCounterVec::new(
            Opts::new(
                "launchday_snapshot_hits_total",
                "Requests answered from a snapshot's copy (200 and 304), by snapshot.",
            ),
            &["snapshot"],
        )?;
        let refreshes = IntCounterVec::new(
            Opts::new(
                "launchday_snapshot_refreshes_total",
                "Snapshot fetches finished, by snapshot and result (ok, error, not_200).",
            ),
            &["snapshot", "result"],
        )?;
        let age = GaugeVec::new(
            Opts::new(
                "launchday_snapshot_age_seconds",
                "Seconds since the snapshot's last good copy was fetched (at scrape time).",
            ),
            &["snapshot"],
        )?;
        let live: Live = Arc::default();
        let collector = AgeCollector {
            age,
            live: Arc::clone(&live),
        };
        registry.register(Box::new(hits.clone()))?;
        registry.register(Box::new(refreshes.clone()))?;
        registry.register(Box::new(collector))?;
        Ok(SnapshotMetrics {
            hits,
            refreshes,
            live,
        })
    }

    /// Resolves the label handles of snapshot `name`.
    pub(super) fn entry(&self, name: &str) -> EntryMetrics {
        EntryMetrics {
            hits: self.hits.with_label_values(&[name]),
            refreshes: RefreshResult::ALL
                .map(|r| self.refreshes.with_label_values(&[name, r.as_str()])),
        }
    }

    /// Reports `entry`'s age from now on, until it is stopped and dropped.
    pub(super) fn track(&self, entry: &Arc<Entry>) {
        self.live.lock().push(Arc::downgrade(entry));
    }
}

/// Sets the age gauges from the live entries whenever the registry is gathered.
struct AgeCollector {
    age: GaugeVec,
    live: Live,
}

impl Collector for AgeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.age.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // One lock for the whole update, so two scrapes cannot interleave.
        let mut live = self.live.lock();
        live.retain(|w| w.strong_count() > 0);
        self.age.reset();
        let now = Instant::now();
        for entry in live.iter().filter_map(Weak::upgrade) {
            if let Some(age) = entry.age(now) {
                self.age
                    .with_label_values(&[entry.name()])
                    .set(age.as_secs_f64());
            }
        }
        self.age.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::testing::{metrics_text, Answer, FakeFetch};
    use crate::edge::{SnapshotSpec, Snapshots};
    use std::time::Duration;

    #[test]
    fn registering_twice_in_one_registry_fails() {
        let r = Registry::new();
        let _m = SnapshotMetrics::register(&r).expect("first");
        assert!(SnapshotMetrics::register(&r).is_err());
        assert!(SnapshotMetrics::register(&Registry::new()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn hits_refreshes_and_age_at_scrape_time() {
        let registry = Registry::new();
        let metrics = SnapshotMetrics::register(&registry).expect("metrics");
        let fake = FakeFetch::new(Answer::Page("hello"));
        let specs = vec![SnapshotSpec::new("blog:/", "blog", "/")];
        let snaps = Snapshots::new(specs, fake.clone(), metrics).expect("snapshots");
        // No series before the first copy (an empty family is not rendered at all).
        assert!(!metrics_text(&registry).contains("launchday_snapshot_age_seconds"));
        let headers = http::HeaderMap::new();
        for _ in 0..3 {
            let hit = snaps.serve(&http::Method::GET, None, "/", &headers).await;
            assert!(hit.is_some());
        }
        tokio::time::sleep(Duration::from_secs(42)).await;
        let text = metrics_text(&registry);
        assert!(
            text.contains(r#"launchday_snapshot_hits_total{snapshot="blog:/"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"launchday_snapshot_refreshes_total{result="ok",snapshot="blog:/"} 1"#)
        );
        assert!(text.contains(
            r#"launchday_snapshot_refreshes_total{result="not_200",snapshot="blog:/"} 0"#
        ));
        assert!(
            text.contains("# TYPE launchday_snapshot_age_seconds gauge"),
            "{text}"
        );
        assert!(
            text.contains(r#"launchday_snapshot_age_seconds{snapshot="blog:/"} 42"#),
            "{text}"
        );
        // A removed snapshot's age goes away; its counters stay.
        snaps.reconfigure(Vec::new()).expect("reconfigure");
        let text = metrics_text(&registry);
        assert!(!text.contains("launchday_snapshot_age_seconds{"), "{text}");
        assert!(text.contains(r#"launchday_snapshot_hits_total{snapshot="blog:/"} 3"#));
    }
}
