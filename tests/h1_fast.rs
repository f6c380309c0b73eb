//! End-to-end: launchday's own HTTP/1.1 loop for simple requests (`h1_server`, the
//! "fast path") and its hand-over to hyper, seen from raw client sockets. The real
//! balancer runs in-process on port 0 (127.0.0.1 and [::1]) in front of back ends on
//! `[::1]`.
//!
//! Covered: pipelined requests answered in order; `HEAD` keeps the length and sends
//! no body; fast and hyper requests (a body) mixed on one connection, sequentially,
//! pipelined, and after the connection went back to the fast loop; a chunked answer
//! (paced and large) relayed intact; an answer cut short closes the connection and is
//! never followed by a second one; a head split over several writes; `Connection:
//! close` versus `keep-alive`; a graceful shutdown with requests in flight on both
//! paths; `date` and a single `content-length` on every answer; a request the
//! balancer refuses itself on the fast path closes the connection; the prebuilt
//! page answers follow a reload at once and the clock's second.
//!
//! Every wait is bounded ([`STEP`] per response, explicit timeouts elsewhere).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{config, metric, Backend, Balancer, ScriptedBackend, SlowBackend, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longer than `PARK_AFTER` (1 s) plus the time to notice: hyper has handed the
/// connection back to the fast loop by then.
const PAST_PARKING: Duration = Duration::from_millis(1700);

/// The maintenance page (pool `closed`) is served under this prefix; everything else
/// goes to pool `web`.
const MAINT: &str = "/maint/";

// ---------------------------------------------------------------------------------
// A raw HTTP/1.1 client that reads exactly one response at a time
// ---------------------------------------------------------------------------------

/// One response, parsed from the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// The status line.
    line: String,
    /// The head as sent, without the blank line.
    raw_head: String,
    /// Header fields in wire order, names lower-cased.
    headers: Vec<(String, String)>,
    /// The body, de-chunked when it was chunked.
    body: Vec<u8>,
    /// It was framed by `transfer-encoding: chunked`.
    chunked: bool,
}

impl Resp {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The only value of `name`; panics if there are several.
    fn one(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(all.len() <= 1, "{name} sent {} times: {self:?}", all.len());
        all.first().copied()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether `connection` holds the token `close`.
    fn says_close(&self) -> bool {
        self.all("connection")
            .iter()
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

/// One client connection; bytes read past a response are kept for the next one, so
/// pipelined answers are parsed exactly where they start.
struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
}

/// Where one chunked body ends, or `Ok(None)` if more bytes are needed.
fn dechunk(bytes: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = bytes[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text = String::from_utf8_lossy(&bytes[at..at + eol]).into_owned();
        let size_text = size_text.split(';').next().unwrap_or("").trim().to_owned();
        let size = usize::from_str_radix(&size_text, 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        at += eol + 2;
        if size == 0 {
            // Trailers (none expected), then the blank line.
            loop {
                let Some(eol) = bytes[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if bytes.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&bytes[at..at + size]);
        if &bytes[at + size..at + size + 2] != b"\r\n" {
            return Err(format!("chunk of {size} not followed by CRLF"));
        }
        at += size + 2;
    }
}

impl Wire {
    async fn connect(addr: SocketAddr) -> Wire {
        let s = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let _ = s.set_nodelay(true);
        Wire { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(STEP, self.s.write_all(bytes))
            .await
            .expect("write in time")
            .expect("write");
    }

    /// Reads more bytes; an error at EOF.
    async fn more(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 16 * 1024];
        match self.s.read(&mut chunk).await {
            Ok(0) => Err(format!(
                "closed with {} unparsed bytes: {:?}",
                self.buf.len(),
                String::from_utf8_lossy(&self.buf)
            )),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// Reads exactly one response. `head_request`: it answers a `HEAD` (no body,
    /// whatever the headers say). The response must start at the first byte not yet
    /// consumed.
    async fn try_response(&mut self, head_request: bool) -> Result<Resp, String> {
        let read = async {
            let end = loop {
                let n = self.buf.len().min(9);
                if self.buf[..n] != b"HTTP/1.1 "[..n] {
                    return Err(format!(
                        "not the start of a response: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ));
                }
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i;
                }
                self.more().await?;
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let line = lines.next().unwrap_or("").to_owned();
            let status: u16 = line
                .get(9..12)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("bad status line {line:?}"))?;
            let mut headers = Vec::new();
            for l in lines {
                let (n, v) = l
                    .split_once(':')
                    .ok_or_else(|| format!("bad header line {l:?}"))?;
                headers.push((n.to_ascii_lowercase(), v.trim().to_owned()));
            }
            let start = end + 4;
            let mut resp = Resp {
                status,
                line,
                raw_head: head.clone(),
                headers,
                body: Vec::new(),
                chunked: false,
            };
            let bodiless =
                head_request || status == 204 || status == 304 || (100..200).contains(&status);
            let chunked = resp
                .all("transfer-encoding")
                .iter()
                .any(|v| v.to_ascii_lowercase().contains("chunked"));
            let length = resp.all("content-length").first().map(|v| {
                v.parse::<usize>()
                    .unwrap_or_else(|_| panic!("content-length {v:?}"))
            });
            if bodiless {
                self.buf.drain(..start);
            } else if chunked {
                resp.chunked = true;
                loop {
                    if let Some((body, used)) = dechunk(&self.buf[start..])? {
                        resp.body = body;
                        self.buf.drain(..start + used);
                        break;
                    }
                    self.more().await?;
                }
            } else if let Some(n) = length {
                while self.buf.len() < start + n {
                    self.more()
                        .await
                        .map_err(|e| format!("body shorter than content-length {n}: {e}"))?;
                }
                resp.body = self.buf[start..start + n].to_vec();
                self.buf.drain(..start + n);
            } else {
                return Err(format!("response without framing: {resp:?}"));
            }
            Ok(resp)
        };
        tokio::time::timeout(STEP, read)
            .await
            .unwrap_or_else(|_| Err("no complete response in time".into()))
    }

    async fn response(&mut self) -> Resp {
        self.try_response(false).await.expect("a response")
    }

    async fn head_response(&mut self) -> Resp {
        self.try_response(true).await.expect("a response to HEAD")
    }

    /// Reads until the balancer closes (or resets) the connection, within `within`;
    /// returns every byte not consumed by an earlier response. Panics if it stays
    /// open.
    async fn closed(&mut self, within: Duration) -> Vec<u8> {
        let read = async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        if tokio::time::timeout(within, read).await.is_err() {
            panic!(
                "connection still open after {within:?}; read {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
        std::mem::take(&mut self.buf)
    }

    /// Whether the connection is still open and silent for `window`.
    async fn stays_open(&mut self, window: Duration) -> bool {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(window, self.s.read(&mut chunk)).await {
            Err(_) => true,
            Ok(Ok(n)) if n > 0 => panic!(
                "unexpected bytes on an idle connection: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Ok(_) => false,
        }
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: site.example\r\n\r\n")
}

fn head(path: &str) -> String {
    format!("HEAD {path} HTTP/1.1\r\nHost: site.example\r\n\r\n")
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: site.example\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

// ---------------------------------------------------------------------------------
// Configs and back ends
// ---------------------------------------------------------------------------------

/// Pool `closed` (manual maintenance, no back ends) under [`MAINT`], extra `routes`
/// (TOML route tables), and pool `web` (back end `app` at `app`) for the rest.
fn lb_config(app: SocketAddr, routes: &str, pools: &str) -> String {
    config(
        "",
        &format!(
            r#"
[[routes]]
path_prefix = "{MAINT}"
pool = "closed"

{routes}

[[routes]]
pool = "web"

[pools.closed]
maintenance = true
backends = []

[pools.web]
backends = [{{ name = "app", address = "{app}" }}]

{pools}

[limits]
idle_timeout = "30s"
"#
        ),
    )
}

/// A route `prefix` to a pool `name` of one back end at `addr`: (route, pool).
fn extra_pool(prefix: &str, name: &str, addr: SocketAddr) -> (String, String) {
    (
        format!("[[routes]]\npath_prefix = \"{prefix}\"\npool = \"{name}\"\n"),
        format!("[pools.{name}]\nbackends = [{{ name = \"{name}-b\", address = \"{addr}\" }}]\n"),
    )
}

/// A keep-alive back end on `[::1]:0` whose answers are chunked: `chunks` one after
/// another, `pause` apart (the first without delay), then the last chunk. Request
/// bodies are not expected.
async fn chunky_backend(chunks: Arc<Vec<Vec<u8>>>, pause: Duration) -> SocketAddr {
    let listener = TcpListener::bind("[::1]:0").await.expect("bind back end");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let chunks = Arc::clone(&chunks);
            tokio::spawn(tokio::time::timeout(STEP, async move {
                let mut buf = Vec::new();
                let mut piece = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut piece).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&piece[..n]),
                        }
                    };
                    buf.drain(..end);
                    let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                    if s.write_all(head).await.is_err() {
                        return;
                    }
                    for (i, c) in chunks.iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(pause).await;
                        }
                        let mut frame = format!("{:x}\r\n", c.len()).into_bytes();
                        frame.extend_from_slice(c);
                        frame.extend_from_slice(b"\r\n");
                        if s.write_all(&frame).await.is_err() {
                            return;
                        }
                    }
                    if s.write_all(b"0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            }));
        }
    });
    addr
}

/// Waits until connecting to `addr` is refused (the listener has stopped).
async fn wait_refused(addr: SocketAddr) {
    let start = std::time::Instant::now();
    loop {
        match tokio::time::timeout(STEP, TcpStream::connect(addr)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ => {}
        }
        assert!(start.elapsed() < STEP, "{addr} still accepting");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Checks the framing headers every answer must have: one `date` (an HTTP date near
/// now) and exactly one `content-length`, equal to `expected_len`.
fn assert_dated_and_sized(r: &Resp, expected_len: usize, what: &str) {
    let dates = r.all("date");
    assert_eq!(dates.len(), 1, "{what}: one date header: {r:?}");
    let when = httpdate::parse_http_date(dates[0])
        .unwrap_or_else(|e| panic!("{what}: date {:?} is not an HTTP date: {e}", dates[0]));
    let skew = match when.duration_since(SystemTime::now()) {
        Ok(ahead) => ahead,
        Err(behind) => behind.duration(),
    };
    assert!(
        skew < Duration::from_secs(5),
        "{what}: date off by {skew:?}"
    );
    assert_eq!(
        r.all("content-length"),
        [expected_len.to_string().as_str()],
        "{what}: exactly one content-length: {r:?}"
    );
    assert!(r.all("transfer-encoding").is_empty(), "{what}: {r:?}");
}

// ---------------------------------------------------------------------------------
// 1. Pipelining
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pipelined_gets_in_one_write_get_three_answers_in_order() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config(app.addr, "", "")).await;
    for addr in [lb.v4, lb.v6] {
        let mut w = Wire::connect(addr).await;
        let all = format!(
            "{}{}{}",
            get("/maint/one"),
            get("/two"),
            get("/maint/three")
        );
        w.send(all.as_bytes()).await;
        let first = w.response().await;
        let second = w.response().await;
        let third = w.response().await;
        for (r, status) in [(&first, 503), (&second, 200), (&third, 503)] {
            assert_eq!(r.status, status, "{r:?}");
            assert!(!r.chunked, "{r:?}");
            assert_eq!(
                r.one("content-length"),
                Some(r.body.len().to_string().as_str()),
                "{r:?}"
            );
            assert!(!r.says_close(), "{r:?}");
        }
        assert_eq!(first.line, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(second.line, "HTTP/1.1 200 OK");
        assert_eq!(second.text(), "served by app\n");
        assert_eq!(second.one("x-backend"), Some("app"));
        assert_eq!(first.body, third.body, "the same maintenance page twice");
        assert!(
            first.text().contains("<html") || first.text().contains("<!"),
            "{first:?}"
        );
        assert!(w.buf.is_empty(), "nothing after the third answer");
        // And the connection still serves.
        w.send(get("/four").as_bytes()).await;
        assert_eq!(w.response().await.status, 200);
    }
    let paths: Vec<String> = app.requests().iter().map(|r| r.uri.to_string()).collect();
    assert_eq!(paths, ["/two", "/four", "/two", "/four"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_proxied_gets_are_answered_in_order() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config(app.addr, "", "")).await;
    let mut w = Wire::connect(lb.v4).await;
    let all: String = (0..20).map(|i| get(&format!("/p/{i}"))).collect();
    w.send(all.as_bytes()).await;
    for i in 0..20 {
        let r = w.response().await;
        assert_eq!(r.status, 200, "answer {i}: {r:?}");
        assert_eq!(r.text(), "served by app\n", "answer {i}");
    }
    assert!(w.stays_open(Duration::from_millis(200)).await);
    let paths: Vec<String> = app.requests().iter().map(|r| r.uri.to_string()).collect();
    let want: Vec<String> = (0..20).map(|i| format!("/p/{i}")).collect();
    assert_eq!(
        paths, want,
        "each request reached the back end once, in order"
    );
}

// ---------------------------------------------------------------------------------
// 2. HEAD
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_the_maintenance_page_has_get_s_length_and_no_body() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config(app.addr, "", "")).await;
    let mut w = Wire::connect(lb.v4).await;
    w.send(get("/maint/page").as_bytes()).await;
    let full = w.response().await;
    assert_eq!(full.status, 503, "{full:?}");
    assert!(!full.body.is_empty());
    let length = full.body.len().to_string();
    assert_eq!(full.one("content-length"), Some(length.as_str()));

    // Sequential: HEAD, then GET; the GET's answer must start right after the
    // HEAD's head (no body bytes in between).
    w.send(head("/maint/page").as_bytes()).await;
    let h = w.head_response().await;
    assert_eq!(h.status, 503, "{h:?}");
    assert_eq!(h.one("content-length"), Some(length.as_str()), "{h:?}");
    assert!(h.all("transfer-encoding").is_empty(), "{h:?}");
    assert!(!h.says_close(), "{h:?}");
    assert!(
        w.buf.is_empty(),
        "bytes after the HEAD answer's head: {:?}",
        String::from_utf8_lossy(&w.buf)
    );
    w.send(get("/maint/page").as_bytes()).await;
    let again = w.response().await;
    assert_eq!(again.status, 503, "{again:?}");
    assert_eq!(again.body, full.body);

    // Pipelined: HEAD, GET, HEAD in one write.
    let all = format!(
        "{}{}{}",
        head("/maint/x"),
        get("/maint/y"),
        head("/maint/z")
    );
    w.send(all.as_bytes()).await;
    let h1 = w.head_response().await;
    let g = w.response().await;
    let h2 = w.head_response().await;
    assert_eq!(h1.one("content-length"), Some(length.as_str()), "{h1:?}");
    assert_eq!(g.body, full.body, "{g:?}");
    assert_eq!(h2.one("content-length"), Some(length.as_str()), "{h2:?}");
    // Nothing may follow the last HEAD's head.
    assert!(w.stays_open(Duration::from_millis(300)).await);
    assert!(w.buf.is_empty(), "{:?}", String::from_utf8_lossy(&w.buf));
}

// ---------------------------------------------------------------------------------
// 3. Fast path and hyper on one connection
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_then_post_with_a_body_then_get_on_one_connection() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config(app.addr, "", "")).await;
    let mut w = Wire::connect(lb.v4).await;

    w.send(get("/maint/first").as_bytes()).await;
    let r = w.response().await;
    assert_eq!(r.status, 503, "{r:?}");

    let body = "name=launch&day=1&payload=".to_owned() + &"x".repeat(3000);
    w.send(post("/submit", &body).as_bytes()).await;
    let r = w.response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "served by app\n");
    assert!(!r.says_close(), "{r:?}");

    w.send(get("/after").as_bytes()).await;
    let r = w.response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "served by app\n");

    // Idle past PARK_AFTER: hyper hands the connection back to the fast loop, which
    // serves the next request on it.
    tokio::time::sleep(PAST_PARKING).await;
    w.send(get("/maint/later").as_bytes()).await;
    let r = w.response().await;
    assert_eq!(r.status, 503, "{r:?}");
    w.send(get("/later").as_bytes()).await;
    let r = w.response().await;
    assert_eq!(r.status, 200, "{r:?}");

    let seen = app.requests();
    let summary: Vec<(String, String)> = seen
        .iter()
        .map(|s| (s.method.to_string(), s.uri.to_string()))
        .collect();
    assert_eq!(
        summary,
        [
            ("POST".to_owned(), "/submit".to_owned()),
            ("GET".to_owned(), "/after".to_owned()),
            ("GET".to_owned(), "/later".to_owned()),
        ]
    );
    assert_eq!(seen[0].body, body.as_bytes(), "the whole body, once");
    assert!(seen[1].body.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_post_get_pipelined_in_one_write_are_each_served_once_in_order() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config(app.addr, "", "")).await;
    let mut w = Wire::connect(lb.v6).await;
    let body = "a=1&b=2";
    let all = format!(
        "{}{}{}{}",
        get("/maint/a"),
        post("/b", body),
        get("/c"),
        get("/maint/d")
    );
    w.send(all.as_bytes()).await;
    let statuses = [503, 200, 200, 503];
    for (i, want) in statuses.into_iter().enumerate() {
        let r = w.response().await;
        assert_eq!(r.status, want, "answer {i}: {r:?}");
        assert_eq!(
            r.one("content-length"),
            Some(r.body.len().to_string().as_str()),
            "answer {i}"
        );
    }
    assert!(w.stays_open(Duration::from_millis(200)).await);
    let seen = app.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].method, http::Method::POST);
    assert_eq!(seen[0].uri, "/b");
    assert_eq!(seen[0].body, body.as_bytes());
    assert_eq!(seen[1].method, http::Method::GET);
    assert_eq!(seen[1].uri, "/c");
    assert!(seen[1].body.is_empty());
}

// ---------------------------------------------------------------------------------
// 4. A chunked answer from the back end
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_answer_arrives_intact_and_the_connection_stays_usable() {
    let big: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let chunks = Arc::new(vec![
        b"hello".to_vec(),
        b", chunked ".to_vec(),
        big,
        b"world\n".to_vec(),
    ]);
    let expected: Vec<u8> = chunks.concat();
    let chunky = chunky_backend(Arc::clone(&chunks), Duration::from_millis(30)).await;
    let app = Backend::start("app").await;
    let (route, pool) = extra_pool("/chunked/", "chunky", chunky);
    let lb = Balancer::start(&lb_config(app.addr, &route, &pool)).await;

    let mut w = Wire::connect(lb.v4).await;
    for i in 0..2 {
        w.send(get("/chunked/x").as_bytes()).await;
        let r = w.response().await;
        assert_eq!(r.status, 200, "answer {i}: {:?}", r.line);
        assert!(
            r.chunked || r.one("content-length").is_some(),
            "answer {i} framed: {:?}",
            r.headers
        );
        assert!(
            !(r.chunked && r.one("content-length").is_some()),
            "answer {i} has both framings: {:?}",
            r.headers
        );
        assert_eq!(r.body.len(), expected.len(), "answer {i}");
        assert!(r.body == expected, "answer {i}: body differs");
        assert!(!r.says_close(), "answer {i}: {:?}", r.headers);
        // The next request on the same connection: another pool, then the
        // maintenance page.
        w.send(get("/after-chunked").as_bytes()).await;
        let r = w.response().await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), "served by app\n");
        w.send(get("/maint/after").as_bytes()).await;
        assert_eq!(w.response().await.status, 503);
    }

    // Pipelined behind a chunked answer.
    let all = format!("{}{}", get("/chunked/y"), get("/z"));
    w.send(all.as_bytes()).await;
    let r = w.response().await;
    assert!(r.body == expected, "pipelined chunked body differs");
    let r = w.response().await;
    assert_eq!(r.text(), "served by app\n", "{r:?}");
}

// ---------------------------------------------------------------------------------
// 5. An answer cut short
// ---------------------------------------------------------------------------------

/// Checks what a client got for a request whose back-end answer announced 100 bytes
/// and sent 10: at most one answer, and if it is the 200, no more than the 10 bytes
/// of body and never a complete 100-byte body (then the connection must have closed).
fn assert_short_single_answer(all: &[u8], what: &str) {
    let text = String::from_utf8_lossy(all);
    assert!(
        text.matches("HTTP/1.1 ").count() <= 1,
        "{what}: more than one answer after a cut body: {text:?}"
    );
    if text.is_empty() {
        return;
    }
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: incomplete head: {text:?}"))
        + 4;
    let head = text[..end].to_ascii_lowercase();
    if head.starts_with("http/1.1 200") {
        let body = &all[end..];
        if head.contains("transfer-encoding: chunked") {
            // The terminating chunk must not be there: the body was not complete.
            assert!(
                !body.ends_with(b"0\r\n\r\n"),
                "{what}: a cut body ended as if complete: {text:?}"
            );
        } else {
            assert!(
                body.len() <= 10,
                "{what}: {} body bytes for 10 sent: {text:?}",
                body.len()
            );
            assert!(body.len() < 100, "{what}: {text:?}");
        }
        assert!(
            !body.windows(9).any(|w| w == b"HTTP/1.1 "),
            "{what}: {text:?}"
        );
    } else {
        // A local error instead (the cut seen before the head went out).
        assert!(head.starts_with("http/1.1 5"), "{what}: {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_short_closes_the_connection_without_a_second_answer() {
    let cut = ScriptedBackend::start(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\n0123456789"
            .to_vec(),
        Duration::ZERO,
    )
    .await;
    let app = Backend::start("app").await;
    let (route, pool) = extra_pool("/cut/", "cut", cut.addr);
    let lb = Balancer::start(&lb_config(app.addr, &route, &pool)).await;

    // One request (after one served on the fast path), keep-alive: the connection
    // must close after the short answer.
    let mut w = Wire::connect(lb.v4).await;
    w.send(get("/maint/warm").as_bytes()).await;
    assert_eq!(w.response().await.status, 503);
    w.send(get("/cut/one").as_bytes()).await;
    let rest = w.closed(Duration::from_secs(5)).await;
    assert!(!rest.is_empty(), "no answer at all to /cut/one");
    assert_short_single_answer(&rest, "single");

    // Pipelined: a second request right behind it must not be answered on this
    // connection (its answer would be read as the rest of the first body).
    let mut w = Wire::connect(lb.v6).await;
    let all = format!("{}{}", get("/cut/two"), get("/maint/never"));
    w.send(all.as_bytes()).await;
    let rest = w.closed(Duration::from_secs(5)).await;
    assert_short_single_answer(&rest, "pipelined");

    // Through hyper (a request with a body): the same rule.
    let mut w = Wire::connect(lb.v4).await;
    let all = format!("{}{}", post("/cut/three", "abc"), get("/maint/never"));
    w.send(all.as_bytes()).await;
    let rest = w.closed(Duration::from_secs(5)).await;
    assert_short_single_answer(&rest, "hyper");
    assert!(
        cut.count() >= 3,
        "the back end saw {} requests",
        cut.count()
    );
}

// ---------------------------------------------------------------------------------
// 6. A head in pieces
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_split_over_three_writes_is_served() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config(app.addr, "", "")).await;
    let mut w = Wire::connect(lb.v4).await;
    for (path, status) in [("/maint/split", 503), ("/split/path?q=1", 200)] {
        let whole = format!(
            "GET {path} HTTP/1.1\r\nHost: site.example\r\nUser-Agent: pieces/1\r\nAccept: */*\r\n\r\n"
        );
        let bytes = whole.as_bytes();
        let (a, b, c) = (&bytes[..7], &bytes[7..30], &bytes[30..]);
        for (i, piece) in [a, b, c].into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            w.send(piece).await;
        }
        let r = w.response().await;
        assert_eq!(r.status, status, "{path}: {r:?}");
    }
    // The last blank line alone in its own write.
    let whole = get("/split/crlf");
    let (a, b) = whole.split_at(whole.len() - 2);
    w.send(a.as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    w.send(b.as_bytes()).await;
    assert_eq!(w.response().await.status, 200);

    let seen = app.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].uri, "/split/path?q=1");
    assert_eq!(seen[0].one("user-agent").as_deref(), Some("pieces/1"));
    assert_eq!(seen[0].one("accept").as_deref(), Some("*/*"));
    assert_eq!(seen[1].uri, "/split/crlf");
}

// ---------------------------------------------------------------------------------
// 7. Connection: close and keep-alive
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_is_answered_then_closed_and_keep_alive_stays_open() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config(app.addr, "", "")).await;

    for path in ["/maint/bye", "/bye"] {
        let mut w = Wire::connect(lb.v4).await;
        // Served on the fast path first, then the close request (hyper's).
        w.send(get("/maint/hello").as_bytes()).await;
        assert_eq!(w.response().await.status, 503);
        let req = format!("GET {path} HTTP/1.1\r\nHost: site.example\r\nConnection: close\r\n\r\n");
        w.send(req.as_bytes()).await;
        let r = w.response().await;
        assert!(r.status == 200 || r.status == 503, "{path}: {r:?}");
        assert!(r.says_close(), "{path}: answer says close: {r:?}");
        let rest = w.closed(Duration::from_secs(3)).await;
        assert!(
            rest.is_empty(),
            "{path}: bytes after the answer: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    // A close request as the very first one, with a request pipelined behind it that
    // must never be answered.
    let mut w = Wire::connect(lb.v6).await;
    let all = format!(
        "GET /first HTTP/1.1\r\nHost: site.example\r\nConnection: close\r\n\r\n{}",
        get("/never")
    );
    w.send(all.as_bytes()).await;
    let r = w.response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.says_close(), "{r:?}");
    let rest = w.closed(Duration::from_secs(3)).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));

    // keep-alive (either case): the connection stays for more requests.
    let mut w = Wire::connect(lb.v4).await;
    for (i, value) in ["keep-alive", "Keep-Alive", "keep-alive"]
        .into_iter()
        .enumerate()
    {
        let path = if i == 1 { "/maint/ka" } else { "/ka" };
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: site.example\r\nConnection: {value}\r\n\r\n");
        w.send(req.as_bytes()).await;
        let r = w.response().await;
        assert!(r.status == 200 || r.status == 503, "request {i}: {r:?}");
        assert!(!r.says_close(), "request {i}: {r:?}");
    }
    assert!(w.stays_open(Duration::from_millis(300)).await);

    let paths: Vec<String> = app.requests().iter().map(|r| r.uri.to_string()).collect();
    assert_eq!(paths, ["/bye", "/first", "/ka", "/ka"]);
}

// ---------------------------------------------------------------------------------
// 8. Graceful shutdown
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_requests_in_flight_with_connection_close_then_closes() {
    let slow = SlowBackend::held("slow", Duration::ZERO).await;
    let lb = Balancer::start(&lb_config(slow.addr, "", "")).await;

    // An idle connection that was served once (fast path).
    let mut idle = Wire::connect(lb.v4).await;
    idle.send(get("/maint/idle").as_bytes()).await;
    assert_eq!(idle.response().await.status, 503);

    // Served once, then a GET in flight on the fast path.
    let mut fast = Wire::connect(lb.v4).await;
    fast.send(get("/maint/warm").as_bytes()).await;
    assert_eq!(fast.response().await.status, 503);
    fast.send(get("/slow-get").as_bytes()).await;
    slow.wait_count(1).await;

    // A POST (hyper) in flight.
    let mut hyper = Wire::connect(lb.v6).await;
    hyper.send(post("/slow-post", "payload").as_bytes()).await;
    slow.wait_count(2).await;

    let server = Arc::clone(&lb.server);
    let shutdown = tokio::spawn(async move { server.shutdown(Duration::from_secs(10)).await });
    wait_refused(lb.v4).await;
    wait_refused(lb.v6).await;

    // The idle connection closes at once, while the others are still in flight.
    let rest = idle.closed(Duration::from_secs(3)).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert_eq!(slow.answered(), 0);
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the requests in flight"
    );

    slow.release();
    for (name, w) in [("fast path", &mut fast), ("hyper", &mut hyper)] {
        let r = w.response().await;
        assert_eq!(r.status, 200, "{name}: {r:?}");
        assert_eq!(r.text(), "served by slow\n", "{name}");
        assert!(r.says_close(), "{name}: connection: close expected: {r:?}");
        let rest = w.closed(Duration::from_secs(3)).await;
        assert!(
            rest.is_empty(),
            "{name}: bytes after the answer: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    let drained = tokio::time::timeout(STEP, shutdown)
        .await
        .expect("shutdown in time")
        .expect("shutdown task");
    assert!(drained, "every connection finished within the grace period");
    let seen: Vec<String> = slow.requests().iter().map(|r| r.uri.to_string()).collect();
    assert_eq!(seen, ["/slow-get", "/slow-post"]);
}

/// The maintenance page answered at once (no handler) to a request that arrives
/// while the balancer stops: it says `connection: close`, and the connection closes
/// after it, the page whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintenance_page_asked_for_during_shutdown_says_close_then_closes() {
    let slow = SlowBackend::held("slow", Duration::ZERO).await;
    let lb = Balancer::start(&lb_config(slow.addr, "", "")).await;

    // A connection accepted before the shutdown, its first request not yet sent
    // (a connection is not stopped before its first request).
    let mut late = Wire::connect(lb.v4).await;
    let open = "launchday_connections{listener=\"public\"}";
    let deadline = tokio::time::Instant::now() + STEP;
    while metric(&lb.metrics().await, open) != Some(1.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection accepted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A request in flight keeps the balancer stopping (not stopped) meanwhile.
    let mut busy = Wire::connect(lb.v6).await;
    busy.send(get("/slow-get").as_bytes()).await;
    slow.wait_count(1).await;

    let server = Arc::clone(&lb.server);
    let shutdown = tokio::spawn(async move { server.shutdown(Duration::from_secs(10)).await });
    wait_refused(lb.v4).await;

    late.send(get("/maint/late").as_bytes()).await;
    let r = late.response().await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.says_close(), "connection: close expected: {r:?}");
    assert!(r.text().contains("<html"), "the page: {r:?}");
    assert_dated_and_sized(&r, r.body.len(), "page while stopping");
    let rest = late.closed(Duration::from_secs(3)).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));

    slow.release();
    assert_eq!(busy.response().await.status, 200);
    let drained = tokio::time::timeout(STEP, shutdown)
        .await
        .expect("shutdown in time")
        .expect("shutdown task");
    assert!(drained);
}

// ---------------------------------------------------------------------------------
// 9. date and content-length
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_answers_carry_a_date_and_exactly_one_content_length() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config(app.addr, "", "")).await;
    let mut w = Wire::connect(lb.v4).await;

    w.send(get("/maint/page").as_bytes()).await;
    let page = w.response().await;
    assert_eq!(page.status, 503);
    assert_dated_and_sized(&page, page.body.len(), "maintenance page");

    w.send(head("/maint/page").as_bytes()).await;
    let h = w.head_response().await;
    assert_dated_and_sized(&h, page.body.len(), "HEAD maintenance page");

    w.send(get("/proxied").as_bytes()).await;
    let r = w.response().await;
    assert_eq!(r.status, 200);
    assert_dated_and_sized(&r, "served by app\n".len(), "proxied answer");

    w.send(head("/proxied").as_bytes()).await;
    let r = w.head_response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.all("date").len(), 1, "HEAD proxied: {r:?}");
    assert!(
        r.all("content-length").len() <= 1,
        "HEAD proxied: at most one content-length: {r:?}"
    );

    // Header names go out lower-case (as hyper writes them).
    for r in [&page, &h] {
        for l in r.raw_head.split("\r\n").skip(1) {
            let name = l.split(':').next().unwrap_or("");
            assert_eq!(name, name.to_ascii_lowercase(), "{:?}", r.raw_head);
        }
    }
    assert!(w.stays_open(Duration::from_millis(200)).await);
}

// ---------------------------------------------------------------------------------
// 10. Refusals on the fast path close the connection
// ---------------------------------------------------------------------------------

/// A simple request the balancer refuses itself (no `Host`, two of them, a target
/// over `max_uri_bytes`) is answered with `connection: close` and the connection
/// closes: a request pipelined behind it is neither answered nor forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_simple_request_is_answered_with_close_and_nothing_after_it_is_served() {
    let app = Backend::start("app").await;
    let text = lb_config(app.addr, "", "").replace(
        "idle_timeout = \"30s\"",
        "idle_timeout = \"30s\"\nmax_uri_bytes = 300",
    );
    let lb = Balancer::start(&text).await;
    let long = format!("/{}", "a".repeat(400));
    let cases = [
        (
            "missing host",
            400,
            "GET /x HTTP/1.1\r\nAccept: */*\r\n\r\n".to_owned(),
        ),
        (
            "two hosts",
            400,
            "GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n".to_owned(),
        ),
        (
            "long target",
            414,
            format!("GET {long} HTTP/1.1\r\nHost: site.example\r\n\r\n"),
        ),
    ];
    for (what, status, req) in cases {
        for warm in [false, true] {
            let mut w = Wire::connect(lb.v4).await;
            if warm {
                w.send(get("/maint/first").as_bytes()).await;
                assert_eq!(w.response().await.status, 503, "{what}");
            }
            let all = format!("{req}{}", get("/smuggled"));
            w.send(all.as_bytes()).await;
            let r = w.response().await;
            assert_eq!(r.status, status, "{what} (warm {warm}): {r:?}");
            assert!(r.says_close(), "{what} (warm {warm}): {r:?}");
            assert_eq!(
                r.one("content-length"),
                Some(r.body.len().to_string().as_str()),
                "{what}"
            );
            let rest = w.closed(Duration::from_secs(3)).await;
            assert!(
                rest.is_empty(),
                "{what} (warm {warm}): bytes after the refusal: {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
    }
    assert_eq!(app.count(), 0, "{:?}", app.requests());
}

// ---------------------------------------------------------------------------------
// Prebuilt page answers (src/page_cache.rs)
// ---------------------------------------------------------------------------------

/// The own loop sends a maintenance page from its worker's prebuilt answer for the
/// second: a reload's new page (here a new analytics snippet) is served at once on
/// the same keep-alive connection, in the same second; the `date` line follows the
/// clock across seconds; `HEAD` and `GET` keep their framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_page_is_served_at_once_and_the_date_follows_the_clock() {
    let app = Backend::start("app").await;
    let with = |snippet: &str| {
        lb_config(
            app.addr,
            "",
            &format!("[maintenance]\nanalytics = \"<i>{snippet}</i>\"\n"),
        )
    };
    let lb = Balancer::start(&with("first")).await;
    let mut w = Wire::connect(lb.v4).await;
    for _ in 0..3 {
        w.send(get("/maint/a").as_bytes()).await;
        let r = w.response().await;
        assert_eq!(r.status, 503, "{r:?}");
        assert!(r.text().contains("<i>first</i>"), "{r:?}");
        assert_dated_and_sized(&r, r.body.len(), "cached page");
    }
    let snapshot = launchday::config::load_str(&with("second"), std::path::Path::new("."), None)
        .expect("config");
    lb.server.apply(snapshot).await.expect("reload");
    w.send(get("/maint/b").as_bytes()).await;
    let r = w.response().await;
    assert!(
        r.text().contains("<i>second</i>") && !r.text().contains("<i>first</i>"),
        "the old page after a reload: {r:?}"
    );
    assert_dated_and_sized(&r, r.body.len(), "reloaded page");
    w.send(head("/maint/c").as_bytes()).await;
    let h = w.head_response().await;
    assert_eq!(h.one("content-length"), r.one("content-length"), "{h:?}");
    assert!(w.buf.is_empty(), "bytes after the HEAD answer's head");
    // Past the next second boundary the same answer carries the new date.
    let before = r.one("date").map(str::to_owned);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    w.send(get("/maint/d").as_bytes()).await;
    let later = w.response().await;
    assert_eq!(later.body, r.body);
    assert_ne!(later.one("date").map(str::to_owned), before, "a stale date");
}
