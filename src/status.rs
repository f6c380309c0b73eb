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
