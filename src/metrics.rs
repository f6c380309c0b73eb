//! Prometheus metrics: one registry, created once and passed in.
//!
//! Families are registered exactly once in [`Metrics::new`]. The request path never
//! formats a label: per pool and per back end the label handles are resolved once
//! (when a snapshot is activated) into [`PoolMetrics`] and [`BackendMetrics`].
//! Labels are bounded: pool and back-end names come from the config, `code` is one of
//! five classes; never a path or a client address. Units are base units (seconds).

use std::sync::Arc;

use crate::config::Class;
use crate::hll::HyperLogLog;
use crate::pool::Shed;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// The label value for answers generated locally (404, maintenance page, ...).
pub const LOCAL_BACKEND: &str = "-";

const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every metric family of the balancer, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    backend_weight: IntGaugeVec,
    backend_in_flight: IntGaugeVec,
    shed: IntCounterVec,
    queue_depth: IntGaugeVec,
    queue_wait: HistogramVec,
    maintenance_pages: IntCounterVec,
    beacons: IntCounter,
    unique_visitors: IntGauge,
    visitors: Arc<HyperLogLog>,
    backend_up: IntGaugeVec,
    health_checks: IntCounterVec,
    retries: IntCounterVec,
    access_log_dropped: IntCounter,
    connections: IntGaugeVec,
    connections_parked: IntGaugeVec,
    connections_refused: IntCounterVec,
    snapshots: crate::edge::SnapshotMetrics,
}

/// The connection metrics of one listener.
#[derive(Clone)]
pub struct ListenerMetrics {
    /// Open client connections (also the count `max_connections` is checked against).
    pub open: IntGauge,
    /// Open connections that are parked (see [`crate::conn`]): idle, holding no
    /// HTTP state.
    pub parked: IntGauge,
    /// Connections refused at `max_connections`.
    pub refused: IntCounter,
}

impl Metrics {
    /// Registers every family in `registry`.
    pub fn new(registry: Registry) -> Result<Self, MetricsError> {
        let requests = IntCounterVec::new(
            Opts::new(
                "launchday_requests_total",
                "Requests answered, by pool, back end (- when answered locally) and status class.",
            ),
            &["pool", "backend", "code"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "launchday_request_duration_seconds",
                "Time from request head received to response head sent, by pool.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["pool"],
        )?;
        let backend_weight = IntGaugeVec::new(
            Opts::new(
                "launchday_backend_weight",
                "Configured weight of each back end (0 = drained).",
            ),
            &["pool", "backend"],
        )?;
        let backend_in_flight = IntGaugeVec::new(
            Opts::new(
                "launchday_backend_in_flight",
                "Requests currently in flight to each back end.",
            ),
            &["pool", "backend"],
        )?;
        let shed = IntCounterVec::new(
            Opts::new(
                "launchday_shed_total",
                "Requests answered with the maintenance page, by pool, reason and class.",
            ),
            &["pool", "reason", "class"],
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "launchday_queue_depth",
                "Requests waiting in each pool's queue.",
            ),
            &["pool"],
        )?;
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "launchday_queue_wait_seconds",
                "Time requests spent in a pool's queue (served, timed out or displaced).",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
            ]),
            &["pool"],
        )?;
        let maintenance_pages = IntCounterVec::new(
            Opts::new(
                "launchday_maintenance_pages_total",
                "Maintenance pages served, by pool.",
            ),
            &["pool"],
        )?;
        let beacons = IntCounter::new(
            "launchday_maintenance_beacons_total",
            "First-party beacons fired by maintenance pages that a browser rendered.",
        )?;
        let unique_visitors = IntGauge::new(
            "launchday_maintenance_unique_visitors",
            "Estimated distinct client addresses that were served the maintenance page (HyperLogLog, about 1% error).",
        )?;
        let backend_up = IntGaugeVec::new(
            Opts::new(
                "launchday_backend_up",
                "1 while the back end may get requests (health checks), else 0.",
            ),
            &["pool", "backend"],
        )?;
        let health_checks = IntCounterVec::new(
            Opts::new(
                "launchday_health_checks_total",
                "Active health checks, by result (success, failure).",
            ),
            &["pool", "backend", "result"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "launchday_retries_total",
                "Requests tried again on another back end, by reason (connect_failed, failed_before_response).",
            ),
            &["pool", "reason"],
        )?;
        let access_log_dropped = IntCounter::new(
            "launchday_access_log_dropped_total",
            "Access-log lines dropped because the writer could not keep up.",
        )?;
        let connections = IntGaugeVec::new(
            Opts::new(
                "launchday_connections",
                "Open client connections, by listener.",
            ),
            &["listener"],
        )?;
        let connections_parked = IntGaugeVec::new(
            Opts::new(
                "launchday_connections_parked",
                "Idle keep-alive connections parked: their HTTP state released, waiting in the kernel.",
            ),
            &["listener"],
        )?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "launchday_connections_refused_total",
                "Client connections refused because the listener was at max_connections.",
            ),
            &["listener"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "launchday_build_info",
                "Always 1; the version label says which build is running.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // CPU seconds, resident memory, open and maximum file descriptors, start time:
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds...
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        for c in [
            Box::new(build_info) as Box<dyn prometheus::core::Collector>,
            Box::new(access_log_dropped.clone()),
            Box::new(connections.clone()),
            Box::new(connections_parked.clone()),
            Box::new(connections_refused.clone()),
            Box::new(backend_up.clone()),
            Box::new(health_checks.clone()),
            Box::new(retries.clone()),
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(backend_weight.clone()),
            Box::new(backend_in_flight.clone()),
            Box::new(shed.clone()),
            Box::new(queue_depth.clone()),
            Box::new(queue_wait.clone()),
            Box::new(maintenance_pages.clone()),
            Box::new(beacons.clone()),
            Box::new(unique_visitors.clone()),
        ] {
            registry.register(c)?;
        }
        let snapshots = crate::edge::SnapshotMetrics::register(&registry)?;
        Ok(Metrics {
            snapshots,
            registry,
            requests,
            duration,
            backend_weight,
            backend_in_flight,
            shed,
            queue_depth,
            queue_wait,
            maintenance_pages,
            beacons,
            unique_visitors,
            visitors: Arc::new(HyperLogLog::new()),
            backend_up,
            health_checks,
            retries,
            access_log_dropped,
            connections,
            connections_parked,
            connections_refused,
        })
    }

    /// The edge-snapshot metric families.
    pub fn snapshots(&self) -> &crate::edge::SnapshotMetrics {
        &self.snapshots
    }

    /// The connection metrics of the listener `name` (the same handles for every
    /// bind address of a listener, so its limit covers all of them).
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        ListenerMetrics {
            open: self.connections.with_label_values(&[name]),
            parked: self.connections_parked.with_label_values(&[name]),
            refused: self.connections_refused.with_label_values(&[name]),
        }
    }

    /// The registry (for families registered by other modules).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Label handles for one pool.
    pub fn pool(&self, pool: &str) -> PoolMetrics {
        PoolMetrics {
            duration: self.duration.with_label_values(&[pool]),
            local: CodeCounters::new(&self.requests, pool, LOCAL_BACKEND),
            shed: Shed::ALL.map(|r| {
                [Class::Read, Class::Write]
                    .map(|c| self.shed.with_label_values(&[pool, r.reason(), c.as_str()]))
            }),
            queue_depth: self.queue_depth.with_label_values(&[pool]),
            queue_wait: self.queue_wait.with_label_values(&[pool]),
            maintenance_pages: self.maintenance_pages.with_label_values(&[pool]),
            retries: ["connect_failed", "failed_before_response"]
                .map(|r| self.retries.with_label_values(&[pool, r])),
        }
    }

    /// Label handles for one back end; sets its weight gauge.
    pub fn backend(&self, pool: &str, backend: &str, weight: u32) -> BackendMetrics {
        let w = self.backend_weight.with_label_values(&[pool, backend]);
        w.set(i64::from(weight));
        BackendMetrics {
            requests: CodeCounters::new(&self.requests, pool, backend),
            in_flight: self.backend_in_flight.with_label_values(&[pool, backend]),
            up: self.backend_up.with_label_values(&[pool, backend]),
            checks: ["success", "failure"]
                .map(|r| self.health_checks.with_label_values(&[pool, backend, r])),
        }
    }

    /// Removes the per-back-end gauges of a back end a reload removed (its request
    /// counters stay: counters must not go backwards).
    pub fn forget_backend(&self, pool: &str, backend: &str) {
        let _ = self.backend_weight.remove_label_values(&[pool, backend]);
        let _ = self.backend_in_flight.remove_label_values(&[pool, backend]);
        let _ = self.backend_up.remove_label_values(&[pool, backend]);
    }

    /// Counters for requests that matched no route (`pool="-"`, `backend="-"`).
    pub fn unrouted(&self) -> CodeCounters {
        CodeCounters::new(&self.requests, LOCAL_BACKEND, LOCAL_BACKEND)
    }

    /// The counter of dropped access-log lines.
    pub fn access_log_dropped(&self) -> IntCounter {
        self.access_log_dropped.clone()
    }

    /// Beacons so far.
    pub fn beacons(&self) -> u64 {
        self.beacons.get()
    }

    /// The unique-visitor estimate now.
    pub fn unique_visitors(&self) -> f64 {
        self.visitors.estimate()
    }

    /// Counts one beacon.
    pub fn beacon(&self) {
        self.beacons.inc();
    }

    /// Counts a client that was served the maintenance page.
    pub fn visitor(&self, ip: std::net::IpAddr) {
        self.visitors.insert(ip);
    }

    /// The Prometheus text format (0.0.4) of every family.
    pub fn render(&self) -> Vec<u8> {
        self.unique_visitors
            .set(self.visitors.estimate().round() as i64);
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; an error here would mean a metric
        // with invalid label data, which `with_label_values` already rejects.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

/// One `launchday_requests_total` counter per status class, for one (pool, back end).
#[derive(Clone)]
pub struct CodeCounters([IntCounter; 5]);

impl CodeCounters {
    fn new(family: &IntCounterVec, pool: &str, backend: &str) -> Self {
        CodeCounters(CODE_CLASSES.map(|c| family.with_label_values(&[pool, backend, c])))
    }

    /// Counts one answer with `status`.
    pub fn inc(&self, status: http::StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.0[class].inc();
    }

    /// All answers counted so far.
    pub fn total(&self) -> u64 {
        self.0.iter().map(IntCounter::get).sum()
    }
}

/// Pre-resolved handles of one pool.
#[derive(Clone)]
pub struct PoolMetrics {
    pub duration: Histogram,
    /// Answers generated locally for this pool (`backend="-"`).
    pub local: CodeCounters,
    /// `launchday_shed_total`, indexed `[reason in Shed::ALL order][read, write]`.
    shed: [[IntCounter; 2]; 5],
    pub queue_depth: IntGauge,
    pub queue_wait: Histogram,
    pub maintenance_pages: IntCounter,
    /// `launchday_retries_total`: [connect_failed, failed_before_response].
    pub retries: [IntCounter; 2],
}

impl PoolMetrics {
    /// Counts one shed request.
    pub fn shed(&self, reason: Shed, class: Class) {
        let r = Shed::ALL.iter().position(|&s| s == reason).unwrap_or(0);
        let c = usize::from(class == Class::Write);
        self.shed[r][c].inc();
    }

    /// Shed requests so far, by reason (in [`Shed::ALL`] order), both classes.
    pub fn shed_by_reason(&self) -> [u64; 5] {
        self.shed.each_ref().map(|[r, w]| r.get() + w.get())
    }
}

/// Pre-resolved handles of one back end.
#[derive(Clone)]
pub struct BackendMetrics {
    pub requests: CodeCounters,
    pub in_flight: IntGauge,
    pub up: IntGauge,
    /// `launchday_health_checks_total`: [success, failure].
    pub checks: [IntCounter; 2],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_help_and_labels() {
        let m = Metrics::new(Registry::new()).expect("metrics");
        let b = m.backend("blog", "pi", 1);
        b.requests.inc(http::StatusCode::OK);
        b.requests.inc(http::StatusCode::BAD_GATEWAY);
        b.in_flight.set(3);
        m.pool("blog").duration.observe(0.01);
        m.unrouted().inc(http::StatusCode::NOT_FOUND);
        let text = String::from_utf8(m.render()).expect("utf8");
        assert!(text.contains("# HELP launchday_requests_total"));
        assert!(text.contains("# TYPE launchday_requests_total counter"));
        assert!(text.contains(r#"launchday_requests_total{backend="pi",code="2xx",pool="blog"} 1"#));
        assert!(text.contains(r#"launchday_requests_total{backend="pi",code="5xx",pool="blog"} 1"#));
        assert!(text.contains(r#"launchday_requests_total{backend="-",code="4xx",pool="-"} 1"#));
        assert!(text.contains(r#"launchday_backend_weight{backend="pi",pool="blog"} 1"#));
        assert!(text.contains(r#"launchday_backend_in_flight{backend="pi",pool="blog"} 3"#));
        assert!(text.contains("launchday_request_duration_seconds_bucket{pool=\"blog\""));
        assert!(text.contains(&format!(
            "launchday_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        for process in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(&format!("# TYPE {process}")), "{process}");
        }
    }

    #[test]
    fn registering_twice_in_one_registry_fails() {
        let r = Registry::new();
        let _m = Metrics::new(r.clone()).expect("first");
        assert!(Metrics::new(r).is_err());
    }
}
