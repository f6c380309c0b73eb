//! Active health checks: one task per back end of a pool with `[health_check]`.
//!
//! Each task waits a random part of the interval first and then ±10% around it, so
//! back ends are not probed in lockstep. A probe is a fresh connection (never one of
//! the request path's keep-alive connections) carrying `GET path` with the configured
//! `Host` (or the back end's address); it succeeds when the status is in
//! `expect_status` (default any 2xx/3xx) within `timeout`. Tasks hold only a weak
//! reference to their pool and are aborted when the pool is reconfigured or dropped.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::HealthCheckSpec;
use crate::pool::{Backend, Pool};

/// Starts one checker per back end.
pub fn spawn(
    pool: &Arc<Pool>,
    backends: &[Arc<Backend>],
    spec: &HealthCheckSpec,
) -> Vec<JoinHandle<()>> {
    backends
        .iter()
        .map(|b| {
            let pool = Arc::downgrade(pool);
            let backend = Arc::clone(b);
            let spec = spec.clone();
            tokio::spawn(run(pool, backend, spec))
        })
        .collect()
}

async fn run(pool: Weak<Pool>, backend: Arc<Backend>, spec: HealthCheckSpec) {
    let first = spec.interval.mul_f64(fastrand::f64());
    tokio::time::sleep(first).await;
    loop {
        let ok = probe(&backend, &spec).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.check_result(&backend, ok, &spec);
        drop(pool);
        let jitter = 0.9 + 0.2 * fastrand::f64();
        tokio::time::sleep(spec.interval.mul_f64(jitter)).await;
    }
}

/// One probe: true when the back end answered an expected status in time.
pub async fn probe(backend: &Backend, spec: &HealthCheckSpec) -> bool {
    let deadline = Instant::now() + spec.timeout;
    let status = tokio::time::timeout_at(deadline, request(backend, spec)).await;
    match status {
        Ok(Some(code)) if spec.expect_status.is_empty() => (200..400).contains(&code),
        Ok(Some(code)) => spec.expect_status.contains(&code),
        _ => false,
    }
}

async fn request(backend: &Backend, spec: &HealthCheckSpec) -> Option<u16> {
    let stream = TcpStream::connect(backend.spec.address).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    let driver = tokio::spawn(conn);
    let host = spec.host.as_deref().unwrap_or(&backend.spec.address_text);
    let req = hyper::Request::get(spec.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "launchday-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = send.send_request(req).await.ok();
    driver.abort();
    resp.map(|r| r.status().as_u16())
}
