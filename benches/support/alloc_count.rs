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

const PAGE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 1000\r\n\r\n";

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
async fn drive(addr: SocketAddr, n: usize, buf: &mut [u8]) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let req = b"GET / HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: allocs\r\n\r\n";
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
/// `measured` keep-alive GETs after `warmup`, through the balancer started on `toml`.
pub async fn measure(
    counter: &'static StatsAlloc<System>,
    toml: &str,
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
    drive(addr, warmup, &mut buf).await;
    let region = Region::new(counter);
    drive(addr, measured, &mut buf).await;
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
