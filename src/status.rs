//! `GET /api/status`: the live state as JSON — pools, back ends with their weight,
//! effective weight, state and since when, in-flight requests and queue depth.
//!
//! Back-end states: `up`; `down` (active checks); `benched` (passive checks, until the
//! cooldown ends); `drained` (weight 0); `slow_start` (ramping after coming up);
//! `backup_active` (a backup serving because no primary is up); `backup_idle`.

use serde::Serialize;
use tokio::time::Instant;

use crate::health::{State, WEIGHT_SCALE};
use crate::proxy::Proxy;

#[derive(Serialize)]
pub struct Status {
    pub version: &'static str,
    pub config: Option<String>,
    pub pools: Vec<PoolStatus>,
}

#[derive(Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub maintenance: bool,
    pub queue_depth: usize,
    pub queue_limit: usize,
    pub service_time_seconds: Option<f64>,
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
    pub backup: bool,
    pub state: &'static str,
    /// Seconds since the health state last changed.
    pub since_seconds: f64,
}

/// The current status.
pub fn status(proxy: &Proxy) -> Status {
    let live = proxy.live();
    let now = Instant::now();
    let pools = live
        .pools
        .iter()
        .zip(&live.snapshot.pools)
        .map(|(pool, spec)| {
            let backends = pool.backends();
            let primary_up = backends
                .iter()
                .any(|b| !b.spec.backup && b.spec.weight > 0 && b.health().available(now));
            PoolStatus {
                name: pool.name().to_owned(),
                maintenance: pool.in_maintenance(),
                queue_depth: pool.queue_depth(),
                queue_limit: spec.queue_depth,
                service_time_seconds: pool.service_time().map(|d| d.as_secs_f64()),
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
pub fn page(proxy: &Proxy) -> String {
    let s = status(proxy);
    let mut html = String::from(concat!(
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<meta http-equiv=refresh content=2><title>launchday status</title><style>",
        "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}",
        "table{border-collapse:collapse;margin-bottom:1.5rem}",
        "td,th{padding:.25rem .6rem;border-bottom:1px solid #ddd;text-align:left}",
        ".bar{background:#e8e8e8;width:10rem;height:.8rem}.bar i{display:block;height:100%;background:#4a7}",
        ".up{color:#175}.down,.benched{color:#b22}.slow_start,.backup_active{color:#a60}.drained,.backup_idle{color:#777}",
        "</style></head><body><h1>launchday</h1>"
    ));
    html.push_str(&format!(
        "<p>version {} &middot; config {}</p>",
        s.version,
        escape(s.config.as_deref().unwrap_or("built-in"))
    ));
    for p in &s.pools {
        let total: f64 = p.backends.iter().map(|b| b.effective_weight).sum();
        html.push_str(&format!(
            "<h2>{}{}</h2><p>queue {} / {}{}</p><table><tr><th>back end</th><th>state</th><th>since</th>\
             <th>weight</th><th>effective</th><th>share of new requests</th><th>in flight</th></tr>",
            escape(&p.name),
            if p.maintenance { " &mdash; in maintenance" } else { "" },
            p.queue_depth,
            p.queue_limit,
            p.service_time_seconds
                .map(|t| format!(" &middot; service time {:.0} ms", t * 1000.0))
                .unwrap_or_default(),
        ));
        for b in &p.backends {
            let share = if total > 0.0 {
                b.effective_weight / total
            } else {
                0.0
            };
            html.push_str(&format!(
                "<tr><td>{}</td><td class={}>{}</td><td>{:.0} s</td><td>{}</td><td>{:.2}</td>\
                 <td><div class=bar><i style=\"width:{:.1}%\"></i></div> {:.1}%</td><td>{}{}</td></tr>",
                escape(&b.name),
                b.state,
                b.state,
                b.since_seconds,
                b.weight,
                b.effective_weight,
                share * 100.0,
                share * 100.0,
                b.in_flight,
                b.max_connections.map(|m| format!(" / {m}")).unwrap_or_default(),
            ));
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>\n");
    html
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
