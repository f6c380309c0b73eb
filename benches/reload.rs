//! Reload benchmark: how long a reload takes from trigger to the new config serving,
//! and what reloads every 200 ms cost the request path (p99 with and without).
//!
//! In-process: two origins on [::1], launchday on 127.0.0.1 (one runtime thread), a
//! closed-loop load of CLIENTS keep-alive connections on another runtime thread.
//! `cargo bench --bench reload` (env RELOAD_SECS, RELOAD_CLIENTS). Bounded.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn origin() -> SocketAddr {
    let listener = TcpListener::bind("[::1]:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"origin page\n"),
                    )))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn config(dir: &Path, a: SocketAddr, b: SocketAddr, wa: u32, wb: u32) {
    let text = format!(
        r#"upgrade_socket = "up.sock"
[admin]
listen = []
[[listeners]]
name = "bench"
bind = ["127.0.0.1:0"]
[[routes]]
pool = "p"
[pools.p]
backends = [
  {{ name = "a", address = "{a}", weight = {wa} }},
  {{ name = "b", address = "{b}", weight = {wb} }},
]
"#
    );
    let tmp = dir.join("launchday.toml.tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join("launchday.toml")).expect("rename");
}

/// Closed-loop load for `secs`: returns sorted latencies and the error count.
async fn load(addr: SocketAddr, clients: usize, secs: u64) -> (Vec<Duration>, usize) {
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let Ok(stream) = TcpStream::connect(addr).await else {
                return (lat, 1);
            };
            let _ = stream.set_nodelay(true);
            let Ok((mut send, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            else {
                return (lat, 1);
            };
            tokio::spawn(conn);
            while Instant::now() < stop {
                let req = hyper::Request::get("/")
                    .header("host", "bench")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let t = Instant::now();
                match send.send_request(req).await {
                    Ok(resp) if resp.status() == 200 => {
                        if resp.into_body().collect().await.is_err() {
                            errors += 1;
                        }
                        lat.push(t.elapsed());
                    }
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("join");
        all.extend(l);
        errors += e;
    }
    all.sort();
    (all, errors)
}

fn pct(v: &[Duration], q: f64) -> Duration {
    v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn main() {
    let secs = env("RELOAD_SECS", 10);
    let clients = env("RELOAD_CLIENTS", 20) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (server, lb, a, b) = server_rt.block_on(async {
        let (a, b) = (origin().await, origin().await);
        config(dir.path(), a, b, 1, 1);
        let path = dir.path().join("launchday.toml");
        let snap = launchday::config::load_file(&path).expect("config");
        let server = launchday::server::Server::start(snap, prometheus::Registry::new())
            .await
            .expect("start");
        launchday::reload::watch(Arc::clone(&server), path).expect("watch");
        let lb = server.bound()[0].addr;
        (server, lb, a, b)
    });
    let path = dir.path().join("launchday.toml");

    // 1. Reload latency, direct (POST /api/reload and SIGHUP take this path): 50 reloads.
    let mut direct = Vec::new();
    for i in 0..50u32 {
        config(dir.path(), a, b, 1 + i % 3, 1);
        let t = Instant::now();
        server_rt
            .block_on(server.reload_file(&path))
            .expect("reload");
        direct.push(t.elapsed());
    }
    direct.sort();
    // 2. Trigger → serving through the file watcher (includes the 200 ms debounce):
    //    write the file, then poll until the new weight is live.
    let mut watched = Vec::new();
    for i in 0..10u32 {
        let w = 100 + i;
        let t = Instant::now();
        config(dir.path(), a, b, w, 1);
        loop {
            let live = server.proxy().live();
            if live.pools[0].backends()[0].spec.weight == w {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "watcher never reloaded"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        watched.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    watched.sort();

    // 3. The request path with and without reloads every 200 ms.
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (quiet, quiet_err) = client_rt.block_on(load(lb, clients, secs));
    let reloading = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&reloading);
    let s2 = Arc::clone(&server);
    let p2 = path.clone();
    let d2 = dir.path().to_owned();
    let reloads = server_rt.spawn(async move {
        let mut n = 0u32;
        while flag.load(Ordering::Relaxed) {
            config(&d2, a, b, 1 + n % 2 * 2, 1);
            s2.reload_file(&p2).await.expect("reload");
            n += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        n
    });
    let (busy, busy_err) = client_rt.block_on(load(lb, clients, secs));
    reloading.store(false, Ordering::Relaxed);
    let n = server_rt.block_on(reloads).expect("join");

    println!(
        "reload: direct (SIGHUP / POST /api/reload path), 50 reloads: p50 {:?} p99 {:?} max {:?}",
        pct(&direct, 0.5),
        pct(&direct, 0.99),
        direct.last().copied().unwrap_or_default()
    );
    println!("reload: file write -> new weight serving (watcher, 200 ms debounce), 10 runs: p50 {:?} max {:?}",
        pct(&watched, 0.5), watched.last().copied().unwrap_or_default());
    println!("request path, {clients} keep-alive clients x {secs} s:");
    println!(
        "  no reloads:            {} req ({:.0}/s), p50 {:?} p99 {:?}, errors {quiet_err}",
        quiet.len(),
        quiet.len() as f64 / secs as f64,
        pct(&quiet, 0.5),
        pct(&quiet, 0.99)
    );
    println!("  reload every 200 ms:   {} req ({:.0}/s), p50 {:?} p99 {:?}, errors {busy_err}, {n} reloads",
        busy.len(), busy.len() as f64 / secs as f64, pct(&busy, 0.5), pct(&busy, 0.99));
}
