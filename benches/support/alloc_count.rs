//! The allocation counter's driver, shared by `benches/allocs.rs` (the figures) and
//! `tests/allocs.rs` (the bound): the real balancer in-process, a raw-socket client
//! and an origin that allocate nothing per request, so every allocation counted
//! during the measured window is the balancer's.

use std::alloc::System;
use std::net::SocketAddr;
use std::path::Path;

use stats_alloc::{Region, StatsAlloc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// `X-Served-By`: a name the `http` crate has no constant for, as back ends send.
const PAGE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nX-Served-By: origin\r\nContent-Length: 1000\r\n\r\n";

/// An origin that answers every request on a connection with a fixed 1000-byte page,
/// reading into a fixed buffer: no allocation per request.
pub async fn origin() -> SocketAddr {
    let listener = TcpListener::bind("[::1]:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("addr");
    let mut answer = PAGE.to_vec();
    answer.extend(std::iter::repeat_n(b'x', 1000));
    let answer: &'static [u8] = Box::leak(answer.into_boxed_slice());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let mut have = 0;
                loop {
                    let Ok(n) = s.read(&mut buf[have..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    // Requests have no body here: answer each complete head.
                    while let Some(end) = find(&buf[..have], b"\r\n\r\n") {
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                }
            });
        }
    });
    addr
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends `n` GETs on one keep-alive connection and reads each answer whole.
/// A request as wrk sends it (and as the allocation figures were first taken).
pub const SHORT: &[u8] = b"GET / HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: allocs\r\n\r\n";
/// A request as a browser sends it: standard fields and the `Sec-*` ones the `http`
/// crate has no constant for.
pub const BROWSER: &[u8] = b"GET / HTTP/1.1\r\nHost: bench.example\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36\r\n\
sec-ch-ua: \"Chromium\";v=\"131\", \"Not_A Brand\";v=\"24\"\r\nsec-ch-ua-mobile: ?0\r\n\
sec-ch-ua-platform: \"Linux\"\r\nUpgrade-Insecure-Requests: 1\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
Sec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-User: ?1\r\n\
Sec-Fetch-Dest: document\r\nReferer: https://news.example/\r\nAccept-Encoding: gzip, deflate, br\r\n\
Accept-Language: en-GB,en;q=0.9\r\nCookie: session=abcdef0123456789\r\nPriority: u=0, i\r\n\r\n";

async fn drive(addr: SocketAddr, req: &[u8], n: usize, buf: &mut [u8]) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    for _ in 0..n {
        s.write_all(req).await.expect("write");
        let mut have = 0;
        loop {
            let got = s.read(&mut buf[have..]).await.expect("read");
            assert!(got > 0, "connection closed");
            have += got;
            let Some(end) = find(&buf[..have], b"\r\n\r\n") else {
                continue;
            };
            let head = std::str::from_utf8(&buf[..end]).expect("ascii head");
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if have >= end + 4 + len {
                break;
            }
        }
    }
}

/// Allocations and bytes per request (reallocations counted as allocations) over
/// `measured` keep-alive requests `req` after `warmup`, through the balancer
/// started on `toml`.
pub async fn measure(
    counter: &'static StatsAlloc<System>,
    toml: &str,
    req: &[u8],
    warmup: usize,
    measured: usize,
) -> (f64, f64) {
    let snapshot =
        launchday::config::load_str(toml, Path::new("."), None).expect("bench config is valid");
    let server = launchday::server::Server::start(snapshot, prometheus::Registry::new())
        .await
        .expect("balancer starts");
    let addr = server.bound()[0].addr;
    let mut buf = vec![0u8; 64 * 1024];
    drive(addr, req, warmup, &mut buf).await;
    let region = Region::new(counter);
    drive(addr, req, measured, &mut buf).await;
    let stats = region.change();
    let per = (stats.allocations + stats.reallocations) as f64 / measured as f64;
    let bytes =
        (stats.bytes_allocated + stats.bytes_reallocated.max(0) as usize) as f64 / measured as f64;
    server.shutdown(std::time::Duration::from_secs(1)).await;
    (per, bytes)
}

/// The three hot paths' configs around `origin`: (name, config).
pub fn configs(origin: SocketAddr) -> [(&'static str, String); 3] {
    let head = "[admin]\nlisten = []\n[[listeners]]\nname = \"bench\"\nbind = [\"127.0.0.1:0\"]\n\
                [[routes]]\npool = \"p\"\n";
    let pool = format!("[pools.p]\nbackends = [{{ name = \"o\", address = \"{origin}\" }}]\n");
    [
        (
            "maintenance page",
            format!("{head}[pools.p]\nmaintenance = true\nbackends = []\n"),
        ),
        (
            "snapshot hit",
            format!("{head}{pool}[[snapshots]]\npool = \"p\"\npaths = [\"/\"]\n"),
        ),
        ("proxied request", format!("{head}{pool}")),
    ]
}

/// One measurement of [`every_path`].
pub struct Count {
    pub path: &'static str,
    pub head: &'static str,
    pub allocations: f64,
    pub bytes: f64,
}

/// Measures every path (maintenance page, snapshot hit, proxied request) with
/// both heads ([`SHORT`], [`BROWSER`]) on a one-worker runtime, as a bench and a
/// test both want it.
pub fn every_path(
    counter: &'static StatsAlloc<System>,
    warmup: usize,
    measured: usize,
) -> Vec<Count> {
    // The balancer's own runtime with the default policy, as `launchday run` builds it.
    let rt = launchday::sched::runtime(
        1,
        launchday::sched::Scheduling::default(),
        std::time::Duration::ZERO,
    )
    .expect("runtime");
    rt.block_on(async {
        let origin = origin().await;
        let mut out = Vec::new();
        for (path, toml) in configs(origin) {
            for (head, req) in [("short", SHORT), ("browser", BROWSER)] {
                let (allocations, bytes) = measure(counter, &toml, req, warmup, measured).await;
                out.push(Count {
                    path,
                    head,
                    allocations,
                    bytes,
                });
            }
        }
        out
    })
}
