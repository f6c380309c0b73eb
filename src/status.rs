//! `GET /api/status`: the live state as JSON — pools, back ends with their weight,
//! effective weight, state and since when, in-flight requests and queue depth.
//!
//! Back-end states: `up`; `down` (active checks); `benched` (passive checks, until the
//! cooldown ends); `drained` (weight 0); `slow_start` (ramping after coming up);
//! `backup_active` (a backup serving because no primary is up); `backup_idle`.

use serde::Serialize;
use tokio::time::Instant;

use crate::health::{State, WEIGHT_SCALE};
use crate::history::History;
use crate::proxy::Proxy;

#[derive(Serialize)]
pub struct Status {
    pub version: &'static str,
    pub config: Option<String>,
    /// First-party beacons fired by maintenance pages.
    pub maintenance_beacons: u64,
    /// Estimated distinct clients shown the maintenance page.
    pub maintenance_unique_visitors: u64,
    pub pools: Vec<PoolStatus>,
}

#[derive(Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub maintenance: bool,
    pub queue_depth: usize,
    pub queue_limit: usize,
    pub service_time_seconds: Option<f64>,
    /// Over the last 10 s.
    pub requests_per_second: f64,
    pub shed_per_second: f64,
    /// Requests shed so far, by reason.
    pub shed: std::collections::BTreeMap<&'static str, u64>,
    pub maintenance_pages: u64,
    /// Requests per second over the last minute, oldest first.
    pub sparkline: Vec<u64>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub address: String,
    pub weight: u32,
    /// The weight selection uses now (lower while slow-starting; 0 when not serving).
    pub effective_weight: f64,
    pub max_connections: Option<u32>,
    pub in_flight: u32,
    /// Over the last 10 s.
    pub requests_per_second: f64,
    /// Share of the pool's proxied requests over the last 10 s.
    pub traffic_share: f64,
    /// Share of the pool's configured weight.
    pub configured_share: f64,
    pub backup: bool,
    pub state: &'static str,
    /// Seconds since the health state last changed.
    pub since_seconds: f64,
}

/// The current status.
pub fn status(proxy: &Proxy, history: &History) -> Status {
    let live = proxy.live();
    let now = Instant::now();
    let pools = live
        .pools
        .iter()
        .zip(&live.snapshot.pools)
        .map(|(pool, spec)| {
            let backends = pool.backends();
            let rates = history.rates(pool.name());
            let total_weight: u64 = backends.iter().map(|b| u64::from(b.spec.weight)).sum();
            let primary_up = backends
                .iter()
                .any(|b| !b.spec.backup && b.spec.weight > 0 && b.health().available(now));
            PoolStatus {
                name: pool.name().to_owned(),
                maintenance: pool.in_maintenance(),
                queue_depth: pool.queue_depth(),
                queue_limit: spec.queue_depth,
                service_time_seconds: pool.service_time().map(|d| d.as_secs_f64()),
                requests_per_second: rates.requests_per_second,
                shed_per_second: rates.shed_per_second,
                shed: crate::pool::Shed::ALL
                    .iter()
                    .map(|r| r.reason())
                    .zip(pool.metrics.shed_by_reason())
                    .collect(),
                maintenance_pages: pool.metrics.maintenance_pages.get(),
                sparkline: rates.sparkline.clone(),
                backends: backends
                    .iter()
                    .map(|b| {
                        let health = b.health().state(now);
                        let scaled =
                            b.health()
                                .effective_weight(b.spec.weight, spec.slow_start, now);
                        let ramping = scaled < b.spec.weight.saturating_mul(WEIGHT_SCALE);
                        let effective = f64::from(scaled) / f64::from(WEIGHT_SCALE);
                        let state = match health {
                            State::Down => "down",
                            State::Benched => "benched",
                            State::Up if b.spec.weight == 0 => "drained",
                            State::Up if b.spec.backup && primary_up => "backup_idle",
                            State::Up if b.spec.backup => "backup_active",
                            State::Up if ramping => "slow_start",
                            State::Up => "up",
                        };
                        BackendStatus {
                            name: b.spec.name.clone(),
                            address: b.spec.address.to_string(),
                            weight: b.spec.weight,
                            effective_weight: if health == State::Up { effective } else { 0.0 },
                            max_connections: b.spec.max_connections,
                            in_flight: b.in_flight(),
                            requests_per_second: rates
                                .backends
                                .get(&b.spec.name)
                                .map_or(0.0, |r| r.0),
                            traffic_share: rates.backends.get(&b.spec.name).map_or(0.0, |r| r.1),
                            configured_share: if total_weight == 0 {
                                0.0
                            } else {
                                f64::from(b.spec.weight) / total_weight as f64
                            },
                            backup: b.spec.backup,
                            state,
                            since_seconds: now
                                .saturating_duration_since(b.health().since())
                                .as_secs_f64(),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    Status {
        maintenance_beacons: proxy.metrics().beacons(),
        maintenance_unique_visitors: proxy.metrics().unique_visitors().round() as u64,
        version: env!("CARGO_PKG_VERSION"),
        config: live
            .snapshot
            .source
            .as_ref()
            .map(|p| p.display().to_string()),
        pools,
    }
}

/// `GET /status`: the same as [`status`], as a page a person reads at a glance
/// (served from memory, no external assets, refreshes itself every 2 s).
pub fn page(proxy: &Proxy, history: &History) -> String {
    let s = status(proxy, history);
    let mut html = String::from(concat!(
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<meta http-equiv=refresh content=2><title>launchday status</title><style>",
        "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}",
        "table{border-collapse:collapse;margin-bottom:1.5rem}",
        "td,th{padding:.25rem .6rem;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}",
        ".bar{background:#e8e8e8;width:10rem;height:.6rem;margin:.1rem 0}.bar i{display:block;height:100%}",
        ".got i{background:#4a7}.want i{background:#99a}",
        ".up{color:#175}.down,.benched{color:#b22}.slow_start,.backup_active{color:#a60}.drained,.backup_idle{color:#777}",
        "svg{vertical-align:middle}",
        "</style></head><body><h1>launchday</h1>"
    ));
    html.push_str(&format!(
        "<p>version {} &middot; config {} &middot; maintenance page: {} beacons, ~{} unique visitors</p>",
        s.version,
        escape(s.config.as_deref().unwrap_or("built-in")),
        s.maintenance_beacons,
        s.maintenance_unique_visitors,
    ));
    for p in &s.pools {
        let shed: Vec<String> = p
            .shed
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        html.push_str(&format!(
            "<h2>{}{}</h2><p>{:.1} req/s {} &middot; shed {:.1}/s ({}) &middot; queue {} / {}{} &middot; {} maintenance pages</p>\
             <table><tr><th>back end</th><th>state</th><th>since</th><th>weight</th>\
             <th>traffic share (green) vs configured share (grey)</th><th>req/s</th><th>in flight</th></tr>",
            escape(&p.name),
            if p.maintenance { " &mdash; in maintenance" } else { "" },
            p.requests_per_second,
            sparkline(&p.sparkline),
            p.shed_per_second,
            if shed.is_empty() { "none".to_owned() } else { shed.join(", ") },
            p.queue_depth,
            p.queue_limit,
            p.service_time_seconds
                .map(|t| format!(" &middot; service time {:.0} ms", t * 1000.0))
                .unwrap_or_default(),
            p.maintenance_pages,
        ));
        for b in &p.backends {
            html.push_str(&format!(
                "<tr><td>{}</td><td class={}>{}</td><td>{:.0} s</td><td>{} ({:.2})</td>\
                 <td><div class=\"bar got\"><i style=\"width:{:.1}%\"></i></div>\
                 <div class=\"bar want\"><i style=\"width:{:.1}%\"></i></div>\
                 {:.1}% of traffic, {:.1}% configured</td><td>{:.1}</td><td>{}{}</td></tr>",
                escape(&b.name),
                b.state,
                b.state,
                b.since_seconds,
                b.weight,
                b.effective_weight,
                b.traffic_share * 100.0,
                b.configured_share * 100.0,
                b.traffic_share * 100.0,
                b.configured_share * 100.0,
                b.requests_per_second,
                b.in_flight,
                b.max_connections
                    .map(|m| format!(" / {m}"))
                    .unwrap_or_default(),
            ));
        }
        if p.backends.is_empty() {
            html.push_str("<tr><td colspan=7>no back ends</td></tr>");
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>\n");
    html
}

/// A tiny inline SVG of per-second values (no external assets).
fn sparkline(values: &[u64]) -> String {
    let max = values.iter().copied().max().unwrap_or(0).max(1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{},{:.1}", i * 2, 20.0 - 18.0 * (*v as f64) / max))
        .collect();
    format!(
        "<svg width=120 height=20 role=img aria-label=\"requests per second, last minute\">\
         <polyline fill=none stroke=#4a7 stroke-width=1.5 points=\"{}\"/></svg>",
        points.join(" ")
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
