//! Overload benchmark: an origin that can serve N requests at a time, offered 10× its
//! capacity through launchday. Reports goodput (200s per second) against the origin's
//! capacity, the p99 latency of served requests and the p99 time to the maintenance
//! page. Targets (issue 4): goodput ≥ 95% of capacity, p99 time-to-maintenance < 10 ms.
//!
//! The origin and the balancer run in this process on one runtime (the balancer at
//! these rates is far from CPU-bound); the load generator runs open-loop on its own
//! runtime: each request starts on schedule on a new connection (a new visitor),
//! whether or not earlier ones have finished. Bounded: DURATION seconds.
//!
//! `cargo bench --bench overload` (env: OVERLOAD_N, OVERLOAD_SERVICE_MS, OVERLOAD_FACTOR,
//! OVERLOAD_SECS).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An origin with `n` workers, each taking `service` per request.
async fn origin(n: usize, service: Duration) -> SocketAddr {
    let listener = TcpListener::bind("[::1]:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("addr");
    let workers = Arc::new(Semaphore::new(n));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let workers = Arc::clone(&workers);
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let workers = Arc::clone(&workers);
                    async move {
                        let _permit = workers.acquire().await.expect("semaphore");
                        tokio::time::sleep(service).await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"origin page\n"),
                        )))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// (status, latency, completion time) of one request.
async fn one_request(addr: SocketAddr) -> Option<(u16, Duration, Instant)> {
    let start = Instant::now();
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header("host", "launch.example.org")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = send.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.ok()?;
    Some((status, start.elapsed(), Instant::now()))
}

fn p(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn main() {
    // cargo bench passes --bench; ignore arguments.
    let n = env("OVERLOAD_N", 8) as usize;
    let service = Duration::from_millis(env("OVERLOAD_SERVICE_MS", 50));
    let factor = env("OVERLOAD_FACTOR", 10);
    let secs = env("OVERLOAD_SECS", 10);
    let capacity = n as f64 / service.as_secs_f64();
    let offered = capacity * factor as f64;

    // The balancer's own runtime with the default scheduling, as `launchday run`
    // builds it (one worker).
    let server_rt =
        launchday::sched::runtime(1, launchday::sched::Scheduling::default(), Duration::ZERO)
            .expect("runtime");
    let lb = server_rt.block_on(async {
        let o = origin(n, service).await;
        let text = format!(
            r#"
[admin]
listen = []
[[listeners]]
name = "bench"
bind = ["127.0.0.1:0"]
[[routes]]
pool = "origin"
[pools.origin]
queue_depth = {depth}
queue_timeout = "1s"
backends = [{{ name = "origin", address = "{o}", max_connections = {n} }}]
"#,
            depth = n * 4,
        );
        let snap = launchday::config::load_str(&text, std::path::Path::new("."), None)
            .expect("bench config");
        let server = launchday::server::Server::start(snap, prometheus::Registry::new())
            .await
            .expect("start");
        let addr = server.bound()[0].addr;
        std::mem::forget(server); // lives until the process exits
        addr
    });

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let results = client_rt.block_on(async move {
        let interval = Duration::from_secs_f64(1.0 / offered);
        let total = (offered * secs as f64) as usize;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::with_capacity(total);
        let start = Instant::now();
        for _ in 0..total {
            ticker.tick().await;
            tasks.push(tokio::spawn(one_request(lb)));
        }
        let sent_for = start.elapsed();
        let mut out = Vec::with_capacity(total);
        for t in tasks {
            if let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_secs(10), t).await {
                out.push(r);
            }
        }
        (out, sent_for, total, start)
    });
    let (results, sent_for, total, start) = results;
    let mut ok: Vec<Duration> = results.iter().filter(|r| r.0 == 200).map(|r| r.1).collect();
    let mut shed: Vec<Duration> = results.iter().filter(|r| r.0 == 503).map(|r| r.1).collect();
    ok.sort();
    shed.sort();
    let failed = total - ok.len() - shed.len();
    // Steady state: 200s completed while the offered load was running.
    let in_window = results
        .iter()
        .filter(|r| r.0 == 200 && r.2.duration_since(start) <= sent_for)
        .count();
    let goodput = in_window as f64 / sent_for.as_secs_f64();
    println!("overload: origin N={n} service={service:?} capacity={capacity:.0} req/s, offered {offered:.0} req/s ({factor}x) for {secs} s");
    println!(
        "  requests {total}: 200 {}, 503 {}, other/failed {failed}",
        ok.len(),
        shed.len()
    );
    println!(
        "  goodput {goodput:.1} req/s = {:.1}% of capacity",
        100.0 * goodput / capacity
    );
    println!("  served:  p50 {:?}  p99 {:?}", p(&ok, 0.50), p(&ok, 0.99));
    println!(
        "  maintenance page: p50 {:?}  p99 {:?}",
        p(&shed, 0.50),
        p(&shed, 0.99)
    );
}
