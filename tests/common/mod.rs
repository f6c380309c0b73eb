//! Helpers for the end-to-end tests: recording back ends on `[::1]`, the real balancer
//! started in-process on port 0, and a small keep-alive HTTP/1.1 client.
//!
//! Everything binds port 0 on 127.0.0.1 or [::1]; nothing uses a fixed port. Every
//! wait is bounded.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client_http1;
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use launchday::server::Server;
use tokio::net::{TcpListener, TcpStream};

/// How long any single step of a test may take before it is a failure.
pub const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------
// Back ends
// ---------------------------------------------------------------------------------

/// One request as a back end received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Which TCP connection it came on (1, 2, ... in accept order).
    pub conn: u64,
    /// The balancer's address on that connection.
    pub peer: SocketAddr,
}

impl Seen {
    /// Every value of header `name`, as strings.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// The only value of header `name`; panics if there are several.
    pub fn one(&self, name: &str) -> Option<String> {
        let all = self.all(name);
        assert!(all.len() <= 1, "{name} sent {} times: {all:?}", all.len());
        all.into_iter().next()
    }
}

struct BackendState {
    name: String,
    /// Headers added to every answer.
    extra: HeaderMap,
    seen: Mutex<Vec<Seen>>,
    accepted: AtomicU64,
}

/// A recording back end: an HTTP/1.1 hyper server on `[::1]:0` that answers every
/// request `200` with the body `served by NAME\n` and the header `X-Backend: NAME`,
/// plus `X-Served-By` when it was started with its own label (or any other headers
/// given to [`Backend::with_headers`]).
#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<BackendState>,
}

impl Backend {
    /// A back end that sends no `X-Served-By` of its own.
    pub async fn start(name: &str) -> Backend {
        Self::with_headers(name, &[]).await
    }

    /// A back end that sends `X-Served-By: label` itself.
    pub async fn with_served_by(name: &str, label: &str) -> Backend {
        Self::with_headers(name, &[("x-served-by", label)]).await
    }

    /// A back end that adds `headers` to every answer.
    pub async fn with_headers(name: &str, headers: &[(&str, &str)]) -> Backend {
        let mut extra = HeaderMap::new();
        for (k, v) in headers {
            extra.append(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        let listener = TcpListener::bind("[::1]:0").await.expect("bind back end");
        let addr = listener.local_addr().expect("back end addr");
        let state = Arc::new(BackendState {
            name: name.to_owned(),
            extra,
            seen: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
        });
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let conn = st.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let st = Arc::clone(&st);
                let svc = service_fn(move |req: Request<Incoming>| {
                    let st = Arc::clone(&st);
                    async move { Ok::<_, Infallible>(answer(&st, req, conn, peer).await) }
                });
                tokio::spawn(async move {
                    let _ = server_http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, state }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    /// Number of requests received so far.
    pub fn count(&self) -> usize {
        self.state.seen.lock().expect("lock").len()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// The last request received; panics when there was none.
    pub fn last(&self) -> Seen {
        self.state
            .seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .unwrap_or_else(|| panic!("back end {} got no request", self.state.name))
    }
}

async fn answer(
    st: &BackendState,
    req: Request<Incoming>,
    conn: u64,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let mut resp = Response::new(Full::new(Bytes::from(format!("body error: {e}\n"))));
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            return resp;
        }
    };
    st.seen.lock().expect("lock").push(Seen {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
        conn,
        peer,
    });
    let mut resp = Response::new(Full::new(Bytes::from(format!("served by {}\n", st.name))));
    let h = resp.headers_mut();
    h.insert("x-backend", HeaderValue::from_str(&st.name).expect("name"));
    for (k, v) in &st.extra {
        h.append(k.clone(), v.clone());
    }
    resp
}

/// How a [`RawBackend`] treats each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMode {
    /// Answer one request, then close the connection without having said so (no
    /// `Connection: close`), like a keep-alive timeout firing right after.
    AnswerThenClose,
    /// Answer the first request; read the second one's head, then close without
    /// answering (the keep-alive timeout fired as the request arrived).
    DieOnSecond,
}

#[derive(Default)]
struct RawCounts {
    heads: AtomicUsize,
    answered: AtomicUsize,
    closed: AtomicUsize,
}

/// A back end on plain blocking sockets in its own thread, for connection behaviour
/// hyper would not produce. It answers `200` with the body `ok\n`, handles one
/// connection at a time (the tests send requests one after another) and at most
/// [`RawBackend::MAX_CONNECTIONS`] of them. Request bodies are not read.
pub struct RawBackend {
    pub addr: SocketAddr,
    counts: Arc<RawCounts>,
}

impl RawBackend {
    pub const MAX_CONNECTIONS: usize = 1000;

    pub fn start(mode: RawMode) -> RawBackend {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("[::1]:0").expect("bind raw back end");
        let addr = listener.local_addr().expect("addr");
        let counts = Arc::new(RawCounts::default());
        let c = Arc::clone(&counts);
        std::thread::spawn(move || {
            for stream in listener.incoming().take(Self::MAX_CONNECTIONS) {
                let Ok(mut s) = stream else { continue };
                let _ = s.set_read_timeout(Some(STEP));
                let requests = match mode {
                    RawMode::AnswerThenClose => 1,
                    RawMode::DieOnSecond => 2,
                };
                for n in 1..=requests {
                    if !read_head(&mut s) {
                        break;
                    }
                    c.heads.fetch_add(1, Ordering::SeqCst);
                    if mode == RawMode::DieOnSecond && n == 2 {
                        break;
                    }
                    // Counted before the write, so that a client who has the answer
                    // always sees it counted.
                    c.answered.fetch_add(1, Ordering::SeqCst);
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                        .is_err()
                    {
                        c.answered.fetch_sub(1, Ordering::SeqCst);
                        break;
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Both);
                drop(s);
                c.closed.fetch_add(1, Ordering::SeqCst);
            }
        });
        RawBackend { addr, counts }
    }

    /// Request heads received.
    pub fn heads(&self) -> usize {
        self.counts.heads.load(Ordering::SeqCst)
    }

    /// Requests answered.
    pub fn answered(&self) -> usize {
        self.counts.answered.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until at least `n` connections were closed.
    pub async fn wait_closed(&self, n: usize) {
        let start = std::time::Instant::now();
        while self.counts.closed.load(Ordering::SeqCst) < n {
            assert!(start.elapsed() < STEP, "back end closed fewer than {n}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Reads one request head (up to the blank line); false on EOF, error or timeout.
fn read_head(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte, so that nothing after the head is consumed.
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
        if head.len() > 64 * 1024 {
            return false;
        }
    }
    true
}

/// An address on `[::1]` where nothing listens (bound, then closed).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("[::1]:0").expect("bind");
    l.local_addr().expect("addr")
}

// ---------------------------------------------------------------------------------
// The balancer
// ---------------------------------------------------------------------------------

/// A whole config: `top` (top-level keys such as `trusted_proxies = [...]`), then the
/// admin listener on `127.0.0.1:0` and a public listener `public` on `127.0.0.1:0`
/// and `[::1]:0`, then `tables` (routes and pools).
pub fn config(top: &str, tables: &str) -> String {
    format!(
        r#"shutdown_grace = "1s"
{top}

[admin]
listen = ["127.0.0.1:0"]

[[listeners]]
name = "public"
bind = ["127.0.0.1:0", "[::1]:0"]

{tables}
"#
    )
}

/// Replaces every `{{name}}` in `template` with the address of back end `name`.
pub fn fill(template: &str, backends: &[&Backend]) -> String {
    let mut text = template.to_owned();
    for b in backends {
        text = text.replace(&format!("{{{{{}}}}}", b.name()), &b.addr.to_string());
    }
    assert!(
        !text.contains("{{"),
        "unfilled placeholder in config:\n{text}"
    );
    text
}

/// The running balancer and where to reach it.
pub struct Balancer {
    pub server: std::sync::Arc<Server>,
    /// The public listener's IPv4 address.
    pub v4: SocketAddr,
    /// The public listener's IPv6 address.
    pub v6: SocketAddr,
    /// The admin listener's address.
    pub admin: SocketAddr,
}

impl Balancer {
    /// Validates `toml` and starts the real balancer on this runtime.
    pub async fn start(toml: &str) -> Balancer {
        let snapshot = launchday::config::load_str(toml, Path::new("."), None)
            .unwrap_or_else(|e| panic!("config rejected:\n{e}\n--- config ---\n{toml}"));
        let server = Server::start(snapshot, prometheus::Registry::new())
            .await
            .expect("balancer starts");
        let find = |v4: bool| {
            server
                .bound()
                .iter()
                .map(|b| b.addr)
                .find(|a| a.is_ipv4() == v4)
                .expect("bound address of the family")
        };
        let (v4, v6) = (find(true), find(false));
        assert_ne!(v4.port(), 0);
        assert_ne!(v6.port(), 0);
        let admin = *server.admin_addrs().first().expect("admin address");
        assert_ne!(admin.port(), 0);
        Balancer {
            v4,
            v6,
            admin,
            server,
        }
    }

    /// `GET /metrics` on the admin listener; asserts 200.
    pub async fn metrics(&self) -> String {
        let r = get(self.admin, "/metrics").await;
        assert_eq!(r.status, StatusCode::OK, "admin /metrics: {}", r.text());
        r.text()
    }
}

/// The value of the series written exactly as `series` (name and labels in
/// Prometheus' sorted label order), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().expect("metric value"))
    })
}

// ---------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------

/// A response, read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Every value of header `name`.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// The only value of header `name`; panics if there are several.
    pub fn header(&self, name: &str) -> Option<String> {
        let all = self.all(name);
        assert!(all.len() <= 1, "{name} sent {} times: {all:?}", all.len());
        all.into_iter().next()
    }
}

/// One HTTP/1.1 client connection (keep-alive; requests are sent one after another).
pub struct Client {
    addr: SocketAddr,
    sender: client_http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let _ = stream.set_nodelay(true);
        let (sender, conn) = client_http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Client { addr, sender }
    }

    /// The address this client is connected to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `req` (adding `Host: <addr>` when it has none) and reads the whole answer.
    pub async fn send(&mut self, mut req: Request<Full<Bytes>>) -> Reply {
        if !req.headers().contains_key(HOST) {
            let host = HeaderValue::from_str(&self.addr.to_string()).expect("host");
            req.headers_mut().insert(HOST, host);
        }
        let round_trip = async {
            self.sender.ready().await.expect("connection ready");
            let resp = self.sender.send_request(req).await.expect("response");
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.expect("response body").to_bytes();
            Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        };
        tokio::time::timeout(STEP, round_trip)
            .await
            .expect("answer in time")
    }

    /// `GET path` with extra `headers`.
    pub async fn get_with(&mut self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(request(Method::GET, path, headers, Bytes::new()))
            .await
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Reply {
        self.get_with(path, &[]).await
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// A request with `headers` (appended in order, so a name may repeat) and `body`.
pub fn request(
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().expect("path");
    for (k, v) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    req
}

/// Writes `bytes` on a fresh connection and reads until the peer closes it (send
/// `Connection: close`). For requests the hyper client would not produce.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(bytes).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .expect("answer and close in time")
}

/// One `GET path` on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    Client::connect(addr).await.get(path).await
}

// ---------------------------------------------------------------------------------
// Added for tests/admission.rs: slow back ends, a base dir for the balancer, waiting
// for metrics.
// ---------------------------------------------------------------------------------

struct SlowState {
    name: String,
    delay: Duration,
    /// Answers wait (after `delay`) until this is `true`.
    gate: tokio::sync::watch::Sender<bool>,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    answered: AtomicUsize,
}

/// A recording back end on `[::1]:0` like [`Backend`], except that it takes `delay`
/// to answer each request and, while *held*, does not answer at all until released
/// (at most [`SlowBackend::MAX_HOLD`]). A request is recorded as soon as its body has
/// been read, before the delay.
#[derive(Clone)]
pub struct SlowBackend {
    pub addr: SocketAddr,
    state: Arc<SlowState>,
}

impl SlowBackend {
    /// Longest time a held answer waits for [`SlowBackend::release`].
    pub const MAX_HOLD: Duration = Duration::from_secs(30);

    /// A back end that answers every request after `delay`.
    pub async fn start(name: &str, delay: Duration) -> SlowBackend {
        Self::new(name, delay, true).await
    }

    /// A back end that answers nothing until [`SlowBackend::release`] (and then after
    /// `delay` from each request's arrival at the earliest).
    pub async fn held(name: &str, delay: Duration) -> SlowBackend {
        Self::new(name, delay, false).await
    }

    async fn new(name: &str, delay: Duration, open: bool) -> SlowBackend {
        let listener = TcpListener::bind("[::1]:0").await.expect("bind back end");
        let addr = listener.local_addr().expect("back end addr");
        let (gate, _) = tokio::sync::watch::channel(open);
        let state = Arc::new(SlowState {
            name: name.to_owned(),
            delay,
            gate,
            seen: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            answered: AtomicUsize::new(0),
        });
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            let mut accepted = 0u64;
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                accepted += 1;
                let conn = accepted;
                let st = Arc::clone(&st);
                let svc = service_fn(move |req: Request<Incoming>| {
                    let st = Arc::clone(&st);
                    async move { Ok::<_, Infallible>(slow_answer(&st, req, conn, peer).await) }
                });
                tokio::spawn(async move {
                    let _ = server_http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        SlowBackend { addr, state }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Stops answering (requests already waiting keep waiting).
    pub fn hold(&self) {
        self.state.gate.send_replace(false);
    }

    /// Answers every held request (each once its delay has passed) and new ones.
    pub fn release(&self) {
        self.state.gate.send_replace(true);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    /// Number of requests received so far.
    pub fn count(&self) -> usize {
        self.state.seen.lock().expect("lock").len()
    }

    /// Requests received and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests it ever had in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Requests answered so far.
    pub fn answered(&self) -> usize {
        self.state.answered.load(Ordering::SeqCst)
    }

    /// Waits (bounded by [`STEP`]) until it has received `n` requests.
    pub async fn wait_count(&self, n: usize) {
        wait_until(&format!("back end {} received {n}", self.name()), || {
            self.count() >= n
        })
        .await;
    }
}

async fn slow_answer(
    st: &SlowState,
    req: Request<Incoming>,
    conn: u64,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let arrived = tokio::time::Instant::now();
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let mut resp = Response::new(Full::new(Bytes::from(format!("body error: {e}\n"))));
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            return resp;
        }
    };
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    st.seen.lock().expect("lock").push(Seen {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
        conn,
        peer,
    });
    tokio::time::sleep_until(arrived + st.delay).await;
    let mut gate = st.gate.subscribe();
    let _ = tokio::time::timeout(SlowBackend::MAX_HOLD, gate.wait_for(|open| *open)).await;
    st.in_flight.fetch_sub(1, Ordering::SeqCst);
    st.answered.fetch_add(1, Ordering::SeqCst);
    let mut resp = Response::new(Full::new(Bytes::from(format!("served by {}\n", st.name))));
    resp.headers_mut()
        .insert("x-backend", HeaderValue::from_str(&st.name).expect("name"));
    resp
}

/// Polls `cond` every 2 ms until it holds; fails the test after [`STEP`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    for _ in 0..100_000 {
        if cond() {
            return;
        }
        assert!(start.elapsed() < STEP, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("gave up waiting until {what}");
}

impl Balancer {
    /// Like [`Balancer::start`], with relative paths in the config (the maintenance
    /// page) resolved against `base_dir`.
    pub async fn start_in(toml: &str, base_dir: &Path) -> Balancer {
        let snapshot = launchday::config::load_str(toml, base_dir, None)
            .unwrap_or_else(|e| panic!("config rejected:\n{e}\n--- config ---\n{toml}"));
        let server = Server::start(snapshot, prometheus::Registry::new())
            .await
            .expect("balancer starts");
        let find = |v4: bool| {
            server
                .bound()
                .iter()
                .map(|b| b.addr)
                .find(|a| a.is_ipv4() == v4)
                .expect("bound address of the family")
        };
        let (v4, v6) = (find(true), find(false));
        let admin = *server.admin_addrs().first().expect("admin address");
        Balancer {
            v4,
            v6,
            admin,
            server,
        }
    }

    /// The value of metric `series` now (see [`metric`]); `None` when absent.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric(&self.metrics().await, series)
    }

    /// Polls `/metrics` until `series` has `value`; fails the test after [`STEP`],
    /// showing the last value seen.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        let start = std::time::Instant::now();
        let mut last = None;
        for _ in 0..10_000 {
            last = self.metric(series).await;
            if last == Some(value) {
                return;
            }
            assert!(
                start.elapsed() < STEP,
                "timed out waiting for {series} == {value}; last {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("gave up waiting for {series} == {value}; last {last:?}");
    }

    /// `POST path` on the admin listener with `body`.
    pub async fn admin_post(&self, path: &str, body: &str) -> Reply {
        Client::connect(self.admin)
            .await
            .send(request(
                Method::POST,
                path,
                &[],
                Bytes::copy_from_slice(body.as_bytes()),
            ))
            .await
    }
}

// ---------------------------------------------------------------------------------
// Added for tests/reload.rs and tests/upgrade.rs: the real binary as a child process,
// and a client that reports failures instead of panicking (for tests under load).
// ---------------------------------------------------------------------------------

/// A free port on `ip` ("127.0.0.1" or "[::1]"): bound, then released, for the real
/// binary, whose config file needs fixed ports.
pub fn free_addr(ip: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind(format!("{ip}:0")).expect("bind");
    l.local_addr().expect("addr")
}

/// A `launchday` child process; killed if the test ends before it exited.
pub struct Process {
    pub child: std::process::Child,
    /// Where its stderr goes.
    pub log: std::path::PathBuf,
}

impl Process {
    /// Starts `launchday ARGS...` with its stderr in `log` (keep `log` out of the
    /// config file's directory: the file watcher sees that directory).
    pub fn spawn(args: &[&std::ffi::OsStr], log: &Path) -> Process {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_launchday"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("spawn launchday");
        Process {
            child,
            log: log.to_path_buf(),
        }
    }

    /// `launchday run -c CONFIG`.
    pub fn run(config: &Path, log: &Path) -> Process {
        Self::spawn(&["run".as_ref(), "-c".as_ref(), config.as_os_str()], log)
    }

    /// `launchday run -c CONFIG --upgrade`.
    pub fn upgrade(config: &Path, log: &Path) -> Process {
        Self::spawn(
            &[
                "run".as_ref(),
                "-c".as_ref(),
                config.as_os_str(),
                "--upgrade".as_ref(),
            ],
            log,
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `kill -SIG PID`.
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits up to `limit` for it to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        for _ in 0..100_000 {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if start.elapsed() >= limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// Waits (bounded by [`STEP`]) until its admin listener at `admin` answers
    /// `/metrics`; fails the test, with the log, if it exits first.
    pub async fn wait_ready(&mut self, admin: SocketAddr) {
        let start = std::time::Instant::now();
        for _ in 0..10_000 {
            if let Some(status) = self.exited() {
                panic!("launchday exited early ({status}):\n{}", self.log());
            }
            if let Ok(r) = try_get(admin, "/metrics").await {
                if r.status == StatusCode::OK {
                    return;
                }
            }
            assert!(
                start.elapsed() < STEP,
                "{admin} not serving /metrics after {STEP:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("gave up waiting for {admin}:\n{}", self.log());
    }

    /// Polls the metrics at `admin` until `series` satisfies `ok`; fails the test after
    /// [`STEP`] with the last value seen and the log. Returns the value.
    pub async fn wait_metric(
        &mut self,
        admin: SocketAddr,
        series: &str,
        ok: impl Fn(f64) -> bool,
    ) -> f64 {
        let start = std::time::Instant::now();
        let mut last = None;
        for _ in 0..10_000 {
            if let Ok(r) = try_get(admin, "/metrics").await {
                last = metric(&r.text(), series);
                if let Some(v) = last.filter(|v| ok(*v)) {
                    return v;
                }
            }
            if let Some(status) = self.exited() {
                panic!(
                    "launchday exited ({status}); {series} was {last:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < STEP,
                "timed out waiting on {series}; last {last:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "gave up waiting on {series}; last {last:?}:\n{}",
            self.log()
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The metrics at `admin` now (fresh connection); panics if they cannot be fetched.
pub async fn metrics_at(admin: SocketAddr) -> String {
    let r = try_get(admin, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("GET {admin}/metrics: {e}"));
    assert_eq!(r.status, StatusCode::OK);
    r.text()
}

/// How one request of a [`TryClient`] went.
#[derive(Debug)]
pub enum Attempt {
    /// Answered (any status).
    Answered(Reply),
    /// The connection was closed before the request was written: nothing was sent,
    /// so a client may reconnect and send it again.
    NotSent(String),
    /// The request was sent and no complete answer came.
    Failed(String),
}

/// A keep-alive HTTP/1.1 client connection that reports failures instead of
/// panicking (every step bounded by [`STEP`]).
pub struct TryClient {
    addr: SocketAddr,
    sender: client_http1::SendRequest<Full<Bytes>>,
}

impl TryClient {
    pub async fn connect(addr: SocketAddr) -> Result<TryClient, String> {
        let connect = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = client_http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake {addr}: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(TryClient { addr, sender })
        };
        tokio::time::timeout(STEP, connect)
            .await
            .unwrap_or_else(|_| Err(format!("connect {addr}: timed out")))
    }

    /// `GET path` with extra `headers` (and `Host: <addr>`).
    pub async fn get_with(&mut self, path: &str, headers: &[(&str, &str)]) -> Attempt {
        let mut req = request(Method::GET, path, headers, Bytes::new());
        let host = HeaderValue::from_str(&self.addr.to_string()).expect("host");
        req.headers_mut().insert(HOST, host);
        let round_trip = async {
            if let Err(e) = self.sender.ready().await {
                return Attempt::NotSent(format!("connection closed: {e}"));
            }
            let resp = match self.sender.try_send_request(req).await {
                Ok(r) => r,
                Err(mut e) => {
                    return match e.take_message() {
                        Some(_) => Attempt::NotSent(format!("not sent: {}", e.error())),
                        None => Attempt::Failed(format!("sent, no answer: {}", e.error())),
                    }
                }
            };
            let (parts, body) = resp.into_parts();
            match body.collect().await {
                Ok(b) => Attempt::Answered(Reply {
                    status: parts.status,
                    headers: parts.headers,
                    body: b.to_bytes(),
                }),
                Err(e) => Attempt::Failed(format!("answer body: {e}")),
            }
        };
        tokio::time::timeout(STEP, round_trip)
            .await
            .unwrap_or_else(|_| Attempt::Failed("no answer in time".into()))
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Attempt {
        self.get_with(path, &[]).await
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// One `GET path` on a fresh connection, failures reported as text.
pub async fn try_get(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    let mut c = TryClient::connect(addr).await?;
    match c.get(path).await {
        Attempt::Answered(r) => Ok(r),
        Attempt::NotSent(e) | Attempt::Failed(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------------
// Added for tests/health.rs: a back end that can be stopped and restarted on the
// same address and whose answers can be changed, and a scripted back end that
// writes fixed bytes (or nothing) after reading a request, then closes.
// ---------------------------------------------------------------------------------

struct ControlledState {
    name: String,
    /// Status of answers to anything but `/health`.
    status: std::sync::atomic::AtomicU16,
    /// Status of answers to `/health`.
    health_status: std::sync::atomic::AtomicU16,
    seen: Mutex<Vec<Seen>>,
    accepted: AtomicU64,
}

/// The accept loop and the connection tasks of one run of a [`ControlledBackend`].
#[derive(Default)]
struct ControlledRun {
    accept: Option<tokio::task::JoinHandle<()>>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

/// A recording back end on `[::1]` (HTTP/1.1, hyper) like [`Backend`]: it answers
/// `GET /health` with its health status (200 unless changed) and everything else with
/// its status (200 unless changed), the body `served by NAME\n` and `X-Backend: NAME`.
/// [`ControlledBackend::stop`] closes its listener and every open connection (new
/// connections are then refused); [`ControlledBackend::restart`] listens again on the
/// same address. Requests are recorded across runs.
pub struct ControlledBackend {
    pub addr: SocketAddr,
    state: Arc<ControlledState>,
    run: Mutex<ControlledRun>,
}

impl ControlledBackend {
    /// The path answered with the health status.
    pub const HEALTH_PATH: &'static str = "/health";

    /// A back end on `[::1]:0`.
    pub async fn start(name: &str) -> ControlledBackend {
        let listener = TcpListener::bind("[::1]:0").await.expect("bind back end");
        let addr = listener.local_addr().expect("back end addr");
        let b = ControlledBackend {
            addr,
            state: Arc::new(ControlledState {
                name: name.to_owned(),
                status: std::sync::atomic::AtomicU16::new(200),
                health_status: std::sync::atomic::AtomicU16::new(200),
                seen: Mutex::new(Vec::new()),
                accepted: AtomicU64::new(0),
            }),
            run: Mutex::new(ControlledRun::default()),
        };
        b.serve(listener);
        b
    }

    fn serve(&self, listener: TcpListener) {
        let st = Arc::clone(&self.state);
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let tracked = Arc::clone(&conns);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let conn = st.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let st = Arc::clone(&st);
                let svc = service_fn(move |req: Request<Incoming>| {
                    let st = Arc::clone(&st);
                    async move { Ok::<_, Infallible>(controlled_answer(&st, req, conn, peer).await) }
                });
                let task = tokio::spawn(async move {
                    let _ = server_http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                let mut all = tracked.lock().expect("lock");
                all.retain(|t| !t.is_finished());
                all.push(task);
            }
        });
        let mut run = self.run.lock().expect("lock");
        run.accept = Some(accept);
        run.conns = conns;
    }

    /// Closes the listener and every open connection, and waits until they are closed.
    pub async fn stop(&self) {
        let (accept, conns) = {
            let mut run = self.run.lock().expect("lock");
            let accept = run.accept.take();
            let conns: Vec<_> = run.conns.lock().expect("lock").drain(..).collect();
            (accept, conns)
        };
        if let Some(accept) = accept {
            accept.abort();
            let _ = tokio::time::timeout(STEP, accept).await;
        }
        // The accept task is gone: nothing adds connections any more.
        let late: Vec<_> = {
            let run = self.run.lock().expect("lock");
            let late = run.conns.lock().expect("lock").drain(..).collect();
            late
        };
        for t in conns.into_iter().chain(late) {
            t.abort();
            let _ = tokio::time::timeout(STEP, t).await;
        }
    }

    /// Listens again on the same address (after [`ControlledBackend::stop`]).
    pub async fn restart(&self) {
        let start = std::time::Instant::now();
        let listener = loop {
            let socket = tokio::net::TcpSocket::new_v6().expect("socket");
            socket.set_reuseaddr(true).expect("SO_REUSEADDR");
            match socket.bind(self.addr).and_then(|()| socket.listen(1024)) {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        start.elapsed() < STEP,
                        "cannot listen on {} again: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        self.serve(listener);
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Answers everything but `/health` with `status` from now on.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Answers `/health` with `status` from now on.
    pub fn set_health_status(&self, status: u16) {
        self.state.health_status.store(status, Ordering::SeqCst);
    }

    /// Every request received so far (health checks included), in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    /// The health-check requests (`/health`) received so far.
    pub fn health_requests(&self) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|s| s.uri.path() == Self::HEALTH_PATH)
            .collect()
    }

    /// Number of requests other than health checks received so far.
    pub fn traffic(&self) -> usize {
        self.state
            .seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.uri.path() != Self::HEALTH_PATH)
            .count()
    }

    /// TCP connections accepted so far (all runs).
    pub fn connections(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for ControlledBackend {
    fn drop(&mut self) {
        if let Ok(run) = self.run.get_mut() {
            if let Some(a) = run.accept.take() {
                a.abort();
            }
            if let Ok(mut conns) = run.conns.lock() {
                for t in conns.drain(..) {
                    t.abort();
                }
            }
        }
    }
}

async fn controlled_answer(
    st: &ControlledState,
    req: Request<Incoming>,
    conn: u64,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let mut resp = Response::new(Full::new(Bytes::from(format!("body error: {e}\n"))));
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            return resp;
        }
    };
    let health = parts.uri.path() == ControlledBackend::HEALTH_PATH;
    st.seen.lock().expect("lock").push(Seen {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
        conn,
        peer,
    });
    let status = if health {
        st.health_status.load(Ordering::SeqCst)
    } else {
        st.status.load(Ordering::SeqCst)
    };
    let mut resp = Response::new(Full::new(Bytes::from(format!("served by {}\n", st.name))));
    *resp.status_mut() = StatusCode::from_u16(status).expect("status");
    resp.headers_mut()
        .insert("x-backend", HeaderValue::from_str(&st.name).expect("name"));
    resp
}

/// One request as a [`ScriptedBackend`] read it.
#[derive(Debug, Clone)]
pub struct RawSeen {
    pub method: String,
    pub target: String,
    /// The whole head, as text.
    pub head: String,
    pub body: Bytes,
}

/// A back end on `[::1]` (tokio sockets) that, on every connection, reads one request
/// (head, and a body framed by `Content-Length` or chunked), records it, writes
/// `reply` verbatim (nothing at all when it is empty), waits `linger` and closes the
/// connection. For answers hyper would not produce: no answer at all, a body cut short.
pub struct ScriptedBackend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<RawSeen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedBackend {
    pub async fn start(reply: Vec<u8>, linger: Duration) -> ScriptedBackend {
        let listener = TcpListener::bind("[::1]:0").await.expect("bind back end");
        let addr = listener.local_addr().expect("back end addr");
        let seen: Arc<Mutex<Vec<RawSeen>>> = Arc::default();
        let recorded = Arc::clone(&seen);
        let reply = Bytes::from(reply);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let recorded = Arc::clone(&recorded);
                let reply = reply.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        STEP,
                        scripted_exchange(stream, &recorded, &reply, linger),
                    )
                    .await;
                });
            }
        });
        ScriptedBackend { addr, seen, task }
    }

    /// A back end that reads each request and closes without answering.
    pub async fn mute() -> ScriptedBackend {
        Self::start(Vec::new(), Duration::ZERO).await
    }

    /// Every request read so far.
    pub fn requests(&self) -> Vec<RawSeen> {
        self.seen.lock().expect("lock").clone()
    }

    /// Number of requests read so far.
    pub fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn scripted_exchange(
    mut s: TcpStream,
    recorded: &Mutex<Vec<RawSeen>>,
    reply: &[u8],
    linger: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // The head.
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let lower = head.to_ascii_lowercase();
    let length = lower.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    let chunked = lower
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    // The body: by length, or (roughly) up to the last chunk; then decoded for chunked.
    let complete = |buf: &[u8]| match (length, chunked) {
        (Some(n), _) => buf.len() >= head_end + n,
        (None, true) => buf[head_end..].ends_with(b"0\r\n\r\n"),
        (None, false) => true,
    };
    while !complete(&buf) {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let raw_body = &buf[head_end..];
    let body = if chunked {
        let mut out = Vec::new();
        let mut rest = raw_body;
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..eol])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .unwrap_or(0);
            if size == 0 || rest.len() < eol + 2 + size {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[(eol + 2 + size + 2).min(rest.len())..];
        }
        Bytes::from(out)
    } else {
        Bytes::copy_from_slice(&raw_body[..length.unwrap_or(0).min(raw_body.len())])
    };
    let mut words = head.split_whitespace();
    recorded.lock().expect("lock").push(RawSeen {
        method: words.next().unwrap_or("").to_owned(),
        target: words.next().unwrap_or("").to_owned(),
        head: head.clone(),
        body,
    });
    if !reply.is_empty() {
        let _ = s.write_all(reply).await;
        let _ = s.flush().await;
    }
    tokio::time::sleep(linger).await;
    let _ = s.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Added for tests/proxy_protocol.rs: extra keys on the public listener, a client whose
// connection starts with given bytes (a PROXY protocol header), and an exchange that
// tolerates the balancer dropping the connection.
// ---------------------------------------------------------------------------------

/// Like [`config`], with `listener` (e.g. `proxy_protocol = true`) added to the
/// public listener's table.
pub fn config_listener(top: &str, listener: &str, tables: &str) -> String {
    let text = config(top, tables);
    let name = "name = \"public\"\n";
    assert!(text.contains(name), "config() changed shape:\n{text}");
    text.replacen(name, &format!("{name}{listener}\n"), 1)
}

impl Client {
    /// Connects to `addr`, writes `preamble` (e.g. a PROXY protocol header), then
    /// speaks HTTP/1.1 on the same connection.
    pub async fn with_preamble(addr: SocketAddr, preamble: &[u8]) -> Client {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let _ = stream.set_nodelay(true);
        stream.write_all(preamble).await.expect("write preamble");
        let (sender, conn) = client_http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Client { addr, sender }
    }
}

/// Writes `bytes` on a fresh connection and reads until the peer closes or resets it
/// (a write error counts as closed too); returns what was read. For connections the
/// balancer is expected to drop, possibly with unread bytes (hence a reset).
pub async fn raw_until_closed(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut out = Vec::new();
        if s.write_all(bytes).await.is_ok() {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut chunk).await {
                out.extend_from_slice(&chunk[..n]);
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .expect("connection closed in time")
}

/// Reads one response (head, then a body framed by Content-Length or chunked) on a
/// keep-alive connection; returns the status and the whole response as text.
pub async fn read_response(s: &mut TcpStream) -> Result<(u16, String), String> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length = head.lines().find_map(|l| {
                    l.strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse::<usize>().ok())
                });
                let done = match length {
                    Some(n) => buf.len() >= end + 4 + n,
                    None if head.contains("transfer-encoding: chunked") => {
                        buf.ends_with(b"0\r\n\r\n")
                    }
                    None => true,
                };
                if done {
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
                    return Ok((status, text));
                }
            }
            if buf.len() > 1 << 20 {
                return Err("endless answer".into());
            }
            match s.read(&mut chunk).await {
                Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&buf))),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    };
    tokio::time::timeout(STEP, read)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}
