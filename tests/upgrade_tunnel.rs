//! End-to-end: HTTP/1.1 `Upgrade` tunnelling (WebSocket). Only a back end's `101` to
//! an upgrade request switches the client's connection, and then bytes flow both ways
//! until either side closes or the tunnel is idle for `idle_timeout`.
//!
//! The back end is a small hyper server on `[::1]:0` that answers `101` on `/ws…`
//! (and echoes every byte of the switched connection), and `200` elsewhere. The
//! client writes raw bytes over TCP to the real balancer (in-process, port 0). Every
//! read has a timeout; every loop is bounded.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{config, STEP};
use http::header::{HeaderMap, CONNECTION, UPGRADE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct EchoState {
    /// Path, headers and connection number of every request, in arrival order.
    seen: Mutex<Vec<(String, HeaderMap, usize)>>,
    connections: AtomicUsize,
    tunnels_opened: AtomicUsize,
    tunnels_closed: AtomicUsize,
}

/// The back end: `101 Switching Protocols` (`Upgrade: websocket`) on paths starting
/// with `/ws`, whatever the request, then an echo of the switched connection until
/// the balancer closes its side; `200 ok <path>` elsewhere. Keeps connections alive.
struct EchoBackend {
    addr: SocketAddr,
    state: Arc<EchoState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoBackend {
    async fn start() -> EchoBackend {
        let listener = TcpListener::bind("[::1]:0").await.expect("bind back end");
        let addr = listener.local_addr().expect("back end addr");
        let state = Arc::new(EchoState::default());
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let conn = st.connections.fetch_add(1, Ordering::SeqCst);
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(Arc::clone(&st), conn, req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        EchoBackend { addr, state, task }
    }

    fn seen(&self) -> Vec<(String, HeaderMap, usize)> {
        self.state.seen.lock().expect("lock").clone()
    }

    fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    fn tunnels(&self) -> (usize, usize) {
        (
            self.state.tunnels_opened.load(Ordering::SeqCst),
            self.state.tunnels_closed.load(Ordering::SeqCst),
        )
    }
}

async fn answer(
    st: Arc<EchoState>,
    conn: usize,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    st.seen
        .lock()
        .expect("lock")
        .push((path.clone(), req.headers().clone(), conn));
    if !path.starts_with("/ws") {
        return Ok(Response::new(Full::new(Bytes::from(format!(
            "ok {path}\n"
        )))));
    }
    let switched = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        // No switch when the request asked for none (hyper kept no upgrade for it).
        let Ok(upgraded) = switched.await else {
            return;
        };
        st.tunnels_opened.fetch_add(1, Ordering::SeqCst);
        let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
        let _ = tokio::io::copy(&mut rd, &mut wr).await;
        let _ = wr.shutdown().await;
        st.tunnels_closed.fetch_add(1, Ordering::SeqCst);
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(UPGRADE, http::HeaderValue::from_static("websocket"));
    resp.headers_mut()
        .insert(CONNECTION, http::HeaderValue::from_static("upgrade"));
    Ok(resp)
}

/// One pool `web` with the back end `echo` at `addr`; `limits`: a `[limits]` table.
fn one_pool(addr: SocketAddr, backend_extra: &str, limits: &str) -> String {
    config(
        "",
        &format!(
            r#"{limits}

[[routes]]
pool = "web"

[pools.web]
queue_timeout = "200ms"
backends = [{{ name = "echo", address = "{addr}"{backend_extra} }}]
"#
        ),
    )
}

const UPGRADE_REQUEST: &str = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, X-Secret\r\n\
X-Secret: 1\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// Reads one response head (to the empty line; nothing after it).
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let read = async {
        let mut byte = [0u8; 1];
        for _ in 0..64 * 1024 {
            if head.ends_with(b"\r\n\r\n") {
                return;
            }
            let n = s.read(&mut byte).await.expect("read head");
            assert_eq!(
                n,
                1,
                "closed mid-head: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        panic!("head too long");
    };
    tokio::time::timeout(STEP, read)
        .await
        .expect("head in time");
    String::from_utf8_lossy(&head).into_owned()
}

/// Reads one response: its head and a `Content-Length` body.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let head = read_head(s).await;
    let len: usize = header_of(&head, "content-length")
        .map(|v| v.parse().expect("content-length"))
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::time::timeout(STEP, s.read_exact(&mut body))
        .await
        .expect("body in time")
        .expect("read body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// The value of header `name` in a raw head (first match, any case).
fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// Writes `msg` and reads back exactly as many bytes.
async fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.expect("write into the tunnel");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(STEP, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read the echo");
    back
}

/// Opens a tunnel: the upgrade request, and its `101` head.
async fn open_tunnel(lb: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(lb).await.expect("connect");
    s.write_all(UPGRADE_REQUEST.as_bytes())
        .await
        .expect("write upgrade");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    (s, head)
}

/// Reads until the peer closes; the bytes read and how long it took.
async fn until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read to the end");
    (rest, start.elapsed())
}

const IN_FLIGHT: &str = r#"launchday_backend_in_flight{backend="echo",pool="web"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_is_tunnelled_both_ways_until_the_client_closes() {
    let backend = EchoBackend::start().await;
    let lb = common::Balancer::start(&one_pool(backend.addr, "", "")).await;
    let (mut s, head) = open_tunnel(lb.v4).await;
    assert_eq!(header_of(&head, "upgrade").as_deref(), Some("websocket"));
    assert_eq!(
        header_of(&head, "connection").map(|v| v.to_ascii_lowercase()),
        Some("upgrade".to_owned())
    );

    // What the back end got: the upgrade, and nothing else the client's Connection named.
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let (path, headers, _) = &seen[0];
    assert_eq!(path, "/ws");
    assert_eq!(headers["upgrade"], "websocket");
    assert_eq!(headers.get_all("connection").iter().count(), 1);
    assert_eq!(headers["connection"], "upgrade");
    assert_eq!(headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
    assert!(headers.get("x-secret").is_none(), "{headers:?}");

    for i in 0..5 {
        let msg = format!("message {i}: {}\n", "x".repeat(i * 1000));
        assert_eq!(echo(&mut s, msg.as_bytes()).await, msg.as_bytes());
    }
    // Not HTTP any more: what looks like a request is echoed, not answered.
    let fake = b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n";
    assert_eq!(echo(&mut s, fake).await, fake);
    assert_eq!(backend.seen().len(), 1);

    // The tunnel holds the back end's slot; the 101 counts as a 1xx.
    assert_eq!(lb.metric(IN_FLIGHT).await, Some(1.0));
    assert_eq!(
        lb.metric(r#"launchday_requests_total{backend="echo",code="1xx",pool="web"}"#)
            .await,
        Some(1.0)
    );

    // The client closes its side: the back end sees the end and closes too.
    s.shutdown().await.expect("shutdown");
    let (rest, _) = until_closed(&mut s, STEP).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    common::wait_until("the back end's side of the tunnel closed", || {
        backend.tunnels() == (1, 1)
    })
    .await;
    lb.wait_metric(IN_FLIGHT, 0.0).await;
    assert_eq!(backend.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_outlives_header_timeout_and_closes_after_idle_timeout() {
    let backend = EchoBackend::start().await;
    let limits = "[limits]\nheader_timeout = \"1s\"\nidle_timeout = \"3s\"";
    let lb = common::Balancer::start(&one_pool(backend.addr, "", limits)).await;
    let (mut s, _) = open_tunnel(lb.v6).await;

    // Quiet for twice the head deadline: no 408, the tunnel still echoes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(echo(&mut s, b"still there?").await, b"still there?");
    // Busy for longer than the idle timeout: a byte every half second keeps it.
    for i in 0..8u8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(echo(&mut s, &[b'a' + i]).await, [b'a' + i]);
    }

    // Then silence: closed after idle_timeout, with nothing written into the tunnel.
    let (rest, took) = until_closed(&mut s, STEP).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(6),
        "closed after {took:?}, idle_timeout is 3s"
    );
    common::wait_until("the back end's side of the tunnel closed", || {
        backend.tunnels() == (1, 1)
    })
    .await;
    lb.wait_metric(IN_FLIGHT, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_to_an_upgrade_request_leaves_the_client_connection_http() {
    let backend = EchoBackend::start().await;
    let lb = common::Balancer::start(&one_pool(backend.addr, "", "")).await;
    let mut s = TcpStream::connect(lb.v4).await.expect("connect");
    let refused = UPGRADE_REQUEST.replace("GET /ws ", "GET /no-ws ");
    s.write_all(refused.as_bytes()).await.expect("write");
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, "ok /no-ws\n");
    assert_eq!(backend.seen()[0].1["upgrade"], "websocket");

    // The same client connection carries a second request, as HTTP.
    s.write_all(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, "ok /second\n");
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen[1].1.get("upgrade").is_none());
    // The back end ignored the upgrade. The back-end connection that carried the
    // upgrade request was driven ready to switch, so it is closed rather than reused
    // (src/upstream.rs); the second request went out on a new one.
    assert_ne!(seen[0].2, seen[1].2);
    assert_eq!(backend.connections(), 2);
    assert_eq!(backend.tunnels(), (0, 0));
    lb.wait_metric(IN_FLIGHT, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_to_a_request_that_asked_for_no_upgrade_is_a_bad_gateway() {
    let backend = EchoBackend::start().await;
    let lb = common::Balancer::start(&one_pool(backend.addr, "", "")).await;
    // Plain, and not an upgrade request (no `upgrade` in Connection): no Upgrade is
    // forwarded, so the back end's 101 answers nothing that was asked.
    for (n, extra) in ["", "Upgrade: websocket\r\n"].into_iter().enumerate() {
        let mut s = TcpStream::connect(lb.v4).await.expect("connect");
        let req = format!("GET /ws-unasked HTTP/1.1\r\nHost: a\r\n{extra}\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let (head, _) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
        assert_eq!(
            header_of(&head, "x-launchday-error").as_deref(),
            Some("upstream_unasked_switch")
        );
        assert!(backend.seen()[n].1.get("upgrade").is_none());
        // The client's connection is still HTTP.
        s.write_all(b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(body, "ok /after\n");
    }
    // Each switched back-end connection was dropped, never reused.
    let seen = backend.seen();
    let paths: Vec<&str> = seen.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(paths, ["/ws-unasked", "/after", "/ws-unasked", "/after"]);
    assert_ne!(seen[0].2, seen[1].2);
    assert_ne!(seen[2].2, seen[3].2);
    assert_eq!(
        lb.metric(r#"launchday_requests_total{backend="echo",code="5xx",pool="web"}"#)
            .await,
        Some(2.0)
    );
    lb.wait_metric(IN_FLIGHT, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_request_with_a_body_is_refused() {
    let backend = EchoBackend::start().await;
    let lb = common::Balancer::start(&one_pool(backend.addr, "", "")).await;
    let upgrade = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n";
    for framing in [
        "Content-Length: 5\r\n\r\nhello",
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let out = common::raw(lb.v4, format!("{upgrade}{framing}").as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400 "), "{framing}: {out}");
        assert!(out.contains("upgrade_with_body"), "{framing}: {out}");
    }
    // An empty body is no body.
    let (mut s, _) = {
        let mut s = TcpStream::connect(lb.v4).await.expect("connect");
        let req = format!("{upgrade}Content-Length: 0\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        (s, head)
    };
    assert_eq!(echo(&mut s, b"hi").await, b"hi");
    assert_eq!(backend.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_counts_open_tunnels() {
    let backend = EchoBackend::start().await;
    let lb = common::Balancer::start(&one_pool(backend.addr, ", max_connections = 1", "")).await;
    let (mut s, _) = open_tunnel(lb.v4).await;
    assert_eq!(echo(&mut s, b"hold").await, b"hold");
    // The only slot is the tunnel's: a request waits its queue_timeout and is shed.
    let shed = common::get(lb.v4, "/plain").await;
    assert_eq!(
        shed.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        shed.text()
    );
    drop(s);
    lb.wait_metric(IN_FLIGHT, 0.0).await;
    let r = common::get(lb.v4, "/plain").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "ok /plain\n");
}

/// Connects, writes `bytes` and reads until the balancer closes; a reset (a refused
/// connection closed with our bytes unread) ends the read like a close.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        for _ in 0..10_000 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(STEP, read)
        .await
        .expect("closed in time");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_counts_as_an_open_connection_of_its_listener() {
    let backend = EchoBackend::start().await;
    let limits = "[limits]\nmax_connections = 1";
    let lb = common::Balancer::start(&one_pool(backend.addr, "", limits)).await;
    let (mut s, _) = open_tunnel(lb.v4).await;
    assert_eq!(echo(&mut s, b"hold").await, b"hold");
    let refused = exchange(lb.v4, b"").await;
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    assert!(refused.contains("too_many_connections"), "{refused}");
    // Once the tunnel is over, its connection no longer counts.
    drop(s);
    common::wait_until("the back end's side of the tunnel closed", || {
        backend.tunnels() == (1, 1)
    })
    .await;
    let request = b"GET /again HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let mut last = String::new();
    for _ in 0..500 {
        last = exchange(lb.v4, request).await;
        if last.starts_with("HTTP/1.1 200 ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(last.starts_with("HTTP/1.1 200 "), "{last}");
    assert!(last.ends_with("ok /again\n"), "{last}");
}
