//! End-to-end: slow and idle clients, connection limits and upstream timeouts
//! (issue #8, `[limits]`): slowloris heads get 408 at `header_timeout` however they
//! trickle, silent connections are closed, idle keep-alive connections are closed at
//! `idle_timeout` (and the idle wait is not part of the head deadline), stalled bodies
//! get 408 at `body_timeout`, `max_connections` refuses the excess with 503, and back
//! ends that do not answer or cannot be reached are given up on in time.
//!
//! Everything is real sockets on 127.0.0.1 / [::1] and real time, so timeouts are short
//! and timing windows generous (a noisy 2-core machine). Every read has a deadline.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{config, Attempt, Backend, Balancer, ScriptedBackend, SlowBackend, TryClient, STEP};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SEC: Duration = Duration::from_secs(1);

/// One pool `web` (with `pool` settings) of `backends` (name, address) behind a
/// catch-all route, and `[limits]` with `limits`.
fn lb_config(limits: &str, pool: &str, backends: &[(&str, SocketAddr)]) -> String {
    let entries: Vec<String> = backends
        .iter()
        .map(|(n, a)| format!("  {{ name = \"{n}\", address = \"{a}\" }}"))
        .collect();
    config(
        "",
        &format!(
            "[[routes]]\npool = \"web\"\n\n[pools.web]\n{pool}\nbackends = [\n{}\n]\n\n[limits]\n{limits}\n",
            entries.join(",\n")
        ),
    )
}

/// Asserts `d` is within `lo..=hi` milliseconds.
fn assert_ms(what: &str, d: Duration, lo: u128, hi: u128) {
    let took = d.as_millis();
    assert!(
        lo <= took && took <= hi,
        "{what}: took {took} ms, expected {lo}..={hi} ms"
    );
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let _ = s.set_nodelay(true);
    s
}

/// How a connection ended while we read it to the end.
#[derive(Debug)]
struct Closed {
    /// Everything read.
    bytes: Vec<u8>,
    /// When it was closed (EOF or reset), measured from `since`; `None` if still open
    /// at the deadline.
    at: Option<Duration>,
    /// "eof", "reset: ..." or "open".
    how: String,
}

impl Closed {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Closed with a FIN after `bytes`.
    fn eof_at(&self) -> Duration {
        assert_eq!(self.how, "eof", "connection not closed cleanly: {self:?}");
        self.at.expect("closed")
    }
}

/// Reads `s` until the peer closes it or `limit` after `since` has passed.
async fn read_until_closed(s: &mut TcpStream, since: Instant, limit: Duration) -> Closed {
    let deadline = tokio::time::Instant::from_std(since + limit);
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return closed(bytes, None, "open".into()),
            Ok(Ok(0)) => return closed(bytes, Some(since.elapsed()), "eof".into()),
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return closed(bytes, Some(since.elapsed()), format!("reset: {e}")),
        }
        assert!(bytes.len() < 1 << 20, "endless answer");
    }
}

fn closed(bytes: Vec<u8>, at: Option<Duration>, how: String) -> Closed {
    Closed { bytes, at, how }
}

/// Sends a small GET on `s` and reads the answer.
async fn get_on(s: &mut TcpStream) -> Result<(u16, String), String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: site.example\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    common::read_response(s).await
}

// ---------------------------------------------------------------------------------
// 1, 2: the head deadline
// ---------------------------------------------------------------------------------

/// Sends `GET / HTTP/1.1\r\nHo`, then one more byte of a head that never ends every
/// 500 ms (at 0.25 s, 0.75 s, ...: away from whole seconds, so that no byte races the
/// close and turns it into a reset) until an answer starts; reads until closed (at
/// most `header_timeout` + 3 s after its first byte).
async fn slowloris(addr: SocketAddr, header_timeout: Duration) -> Closed {
    let filler: Vec<u8> = [&b"st: slow.example\r\n"[..], &b"X-Pad: y\r\n".repeat(20)].concat();
    let Ok(Ok(mut s)) = tokio::time::timeout(STEP, TcpStream::connect(addr)).await else {
        return closed(Vec::new(), None, "connect failed".into());
    };
    let started = Instant::now();
    if s.write_all(b"GET / HTTP/1.1\r\nHo").await.is_err() {
        return closed(Vec::new(), None, "first write failed".into());
    }
    let give_up = tokio::time::Instant::from_std(started + header_timeout + 3 * SEC);
    let mut next_write = tokio::time::Instant::from_std(started) + Duration::from_millis(250);
    let (mut reply, mut buf, mut i) = (Vec::new(), [0u8; 1024], 0);
    for _ in 0..10_000 {
        let until = if reply.is_empty() {
            next_write.min(give_up)
        } else {
            give_up
        };
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Err(_) if until >= give_up => return closed(reply, None, "open".into()),
            Err(_) => {
                // Once the peer closed, writes may fail: keep reading regardless.
                let _ = s.write_all(&filler[i % filler.len()..][..1]).await;
                i += 1;
                next_write += Duration::from_millis(500);
            }
            Ok(Ok(0)) => return closed(reply, Some(started.elapsed()), "eof".into()),
            Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return closed(reply, Some(started.elapsed()), format!("reset: {e}")),
        }
    }
    closed(reply, None, "too many reads".into())
}

/// How many slowloris connections fit the descriptor budget (both ends are in this
/// process): up to 300, keeping 200 descriptors spare.
fn slowloris_count() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024);
    (soft.saturating_sub(200) / 2).min(300)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_get_408_at_the_head_deadline_while_others_are_served_fast() {
    let header_timeout = 2 * SEC;
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config(
        "header_timeout = \"2s\"",
        "",
        &[("app", app.addr)],
    ))
    .await;

    let count = slowloris_count();
    assert!(count >= 100, "only {count} connections fit the fd limit");
    let slow: Vec<_> = (0..count)
        .map(|i| {
            let addr = if i % 2 == 0 { lb.v4 } else { lb.v6 };
            tokio::spawn(slowloris(addr, header_timeout))
        })
        .collect();

    // Meanwhile: requests one after another for 4 s, alternately on a fresh connection
    // and on one kept-alive connection.
    let mut kept = TryClient::connect(lb.v6).await.expect("keep-alive client");
    let (start, mut latencies, mut failures) = (Instant::now(), Vec::new(), Vec::new());
    for i in 0..20_000 {
        if start.elapsed() >= 4 * SEC {
            break;
        }
        let t = Instant::now();
        let attempt = if i % 2 == 0 {
            match TryClient::connect(lb.v4).await {
                Ok(mut c) => c.get("/fresh").await,
                Err(e) => Attempt::Failed(e),
            }
        } else {
            kept.get("/kept").await
        };
        latencies.push(t.elapsed());
        match attempt {
            Attempt::Answered(r) if r.status == StatusCode::OK => {}
            other => failures.push(format!("request {i}: {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        latencies.len() >= 100,
        "only {} requests in 4 s",
        latencies.len()
    );
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99).div_ceil(100) - 1];
    eprintln!("{} normal requests in 4 s, p99 {p99:?}", latencies.len());
    assert!(
        p99 < Duration::from_millis(50),
        "p99 {p99:?} over {} requests (max {:?})",
        latencies.len(),
        latencies.last()
    );

    // Every slow connection: 408, then closed, at header_timeout after its first byte
    // (trickling bytes did not push the deadline back).
    let (lo, hi) = (
        header_timeout - Duration::from_millis(250),
        header_timeout + SEC,
    );
    let mut bad = Vec::new();
    for (i, task) in slow.into_iter().enumerate() {
        let s = tokio::time::timeout(STEP, task)
            .await
            .expect("slow connection ends")
            .expect("task");
        let text = s.text();
        let in_time = s.at.is_some_and(|d| d >= lo && d <= hi);
        if !text.starts_with("HTTP/1.1 408") || !in_time {
            bad.push(format!(
                "#{i}: closed {:?} ({}) after {:?}",
                s.at, s.how, text
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {count} slow connections wrong, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_silently_at_the_head_deadline() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config(
        "header_timeout = \"1s\"",
        "",
        &[("app", app.addr)],
    ))
    .await;
    for addr in [lb.v4, lb.v6] {
        let mut s = connect(addr).await;
        let c = read_until_closed(&mut s, Instant::now(), 4 * SEC).await;
        assert!(
            c.bytes.is_empty(),
            "{addr}: silent connection got {:?}",
            c.text()
        );
        assert_ms("silent connection closed", c.eof_at(), 750, 2000);
    }
}

// ---------------------------------------------------------------------------------
// 3: idle keep-alive connections
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_silently_at_the_idle_timeout() {
    let app = Backend::start("app").await;
    let limits = "header_timeout = \"5s\"\nidle_timeout = \"1s\"";
    let lb = Balancer::start(&lb_config(limits, "", &[("app", app.addr)])).await;
    let mut s = connect(lb.v4).await;
    let (status, text) = get_on(&mut s).await.expect("first request");
    assert_eq!(status, 200, "{text}");
    let c = read_until_closed(&mut s, Instant::now(), 7 * SEC).await;
    assert!(c.bytes.is_empty(), "idle connection got {:?}", c.text());
    // Closed at idle_timeout (1 s), not at header_timeout (5 s).
    assert_ms("idle connection closed", c.eof_at(), 750, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_within_the_idle_timeout_is_served_on_the_same_connection() {
    let app = Backend::start("app").await;
    let limits = "header_timeout = \"5s\"\nidle_timeout = \"1s\"";
    let lb = Balancer::start(&lb_config(limits, "", &[("app", app.addr)])).await;
    let mut s = connect(lb.v6).await;
    for i in 0..3 {
        let (status, text) = get_on(&mut s)
            .await
            .unwrap_or_else(|e| panic!("request {i} on the kept-alive connection: {e}"));
        assert_eq!(status, 200, "request {i}: {text}");
        assert!(text.ends_with("served by app\n"), "request {i}: {text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(app.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_wait_does_not_count_against_the_head_deadline() {
    let app = Backend::start("app").await;
    let limits = "header_timeout = \"1s\"\nidle_timeout = \"3s\"";
    let lb = Balancer::start(&lb_config(limits, "", &[("app", app.addr)])).await;
    let mut s = connect(lb.v4).await;
    let (status, text) = get_on(&mut s).await.expect("first request");
    assert_eq!(status, 200, "{text}");
    // Idle for 2 s: longer than header_timeout, shorter than idle_timeout.
    tokio::time::sleep(2 * SEC).await;
    let (status, text) = get_on(&mut s)
        .await
        .unwrap_or_else(|e| panic!("second request after 2 s idle: {e}"));
    assert_eq!(status, 200, "{text}");
    assert_eq!(app.count(), 2);
}

// ---------------------------------------------------------------------------------
// 4: request bodies
// ---------------------------------------------------------------------------------

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
const POST: &[u8] = b"POST /upload HTTP/1.1\r\nHost: site.example\r\nContent-Length: 100\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_gets_408_and_never_reaches_the_back_end_complete() {
    let app = ScriptedBackend::start(OK.to_vec(), Duration::ZERO).await;
    let limits = "body_timeout = \"1s\"";
    let lb = Balancer::start(&lb_config(limits, "retries = 0", &[("app", app.addr)])).await;
    let mut s = connect(lb.v4).await;
    s.write_all(&[POST, &[b'x'; 10]].concat())
        .await
        .expect("write");
    let stalled = Instant::now();
    let c = read_until_closed(&mut s, stalled, 6 * SEC).await;
    // Nothing can have been answered: the back end only answers complete bodies.
    assert!(
        c.text().starts_with("HTTP/1.1 408"),
        "stalled body got {c:?}"
    );
    let at = c.at.unwrap_or_else(|| panic!("not closed: {c:?}"));
    assert_ms("stalled body answered and closed", at, 750, 2500);
    // Give an abort time to reach the back end, then: no complete request there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in app.requests() {
        assert!(r.body.len() < 100, "back end got the whole body: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_in_pieces_with_pauses_below_the_body_timeout_is_served() {
    let app = ScriptedBackend::start(OK.to_vec(), Duration::ZERO).await;
    let lb = Balancer::start(&lb_config(
        "body_timeout = \"1s\"",
        "",
        &[("app", app.addr)],
    ))
    .await;
    let mut s = connect(lb.v6).await;
    s.write_all(POST).await.expect("write head");
    let body: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
    // 10 pieces, 300 ms apart: 3 s in all, each pause well below body_timeout.
    for (i, piece) in body.chunks(10).enumerate() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(piece)
            .await
            .unwrap_or_else(|e| panic!("piece {i}: {e}"));
    }
    let (status, text) = common::read_response(&mut s).await.expect("answer");
    assert_eq!(status, 200, "{text}");
    let seen = app.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].body, body);
}

// ---------------------------------------------------------------------------------
// 5: max_connections
// ---------------------------------------------------------------------------------

const REFUSED: &str = r#"launchday_connections_refused_total{listener="public"}"#;

/// Connects and waits up to 300 ms for the balancer to refuse: `Err(answer)` when it
/// wrote something and closed, `Ok(stream)` when it kept the connection.
async fn try_admitted(addr: SocketAddr) -> Result<TcpStream, Closed> {
    let mut s = connect(addr).await;
    let c = read_until_closed(&mut s, Instant::now(), Duration::from_millis(300)).await;
    match (c.at, c.bytes.is_empty()) {
        (None, true) => Ok(s),
        _ => Err(c),
    }
}

/// A connection the balancer keeps, retrying (bounded) while it refuses with 503;
/// counts the refusals.
async fn admit(addr: SocketAddr, refused: &mut u32) -> TcpStream {
    let start = Instant::now();
    loop {
        match try_admitted(addr).await {
            Ok(s) => return s,
            Err(c) => assert!(c.text().starts_with("HTTP/1.1 503"), "refused with {c:?}"),
        }
        *refused += 1;
        assert!(
            start.elapsed() < 3 * SEC,
            "still refused after closes ({refused} refusals)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_the_excess_with_503_and_admits_again_after_closes() {
    let app = Backend::start("app").await;
    let limits = "header_timeout = \"30s\"\nmax_connections = 20";
    let lb = Balancer::start(&lb_config(limits, "", &[("app", app.addr)])).await;

    let mut open = Vec::new();
    for _ in 0..20 {
        open.push(connect(lb.v4).await);
    }
    // Connections are accepted in order: these 20 are counted before the next one.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut s = connect(lb.v4).await;
    let c = read_until_closed(&mut s, Instant::now(), 3 * SEC).await;
    assert!(
        c.text().starts_with("HTTP/1.1 503"),
        "21st connection got {c:?}"
    );
    assert!(c.eof_at() < SEC, "21st connection closed after {:?}", c.at);
    drop(s);
    lb.wait_metric(REFUSED, 1.0).await;

    // The 20 open connections are unaffected.
    for (i, s) in open.iter_mut().enumerate().step_by(4) {
        let (status, text) = get_on(s)
            .await
            .unwrap_or_else(|e| panic!("open connection {i}: {e}"));
        assert_eq!(status, 200, "open connection {i}: {text}");
    }

    // Close 5: new connections are admitted again (once the balancer saw the closes).
    open.truncate(15);
    let mut refused = 1;
    let mut fresh = admit(lb.v4, &mut refused).await;
    let (status, text) = get_on(&mut fresh)
        .await
        .expect("request on an admitted connection");
    assert_eq!(status, 200, "{text}");
    for _ in 0..4 {
        open.push(admit(lb.v4, &mut refused).await);
    }
    // 15 + fresh + 4 = 20 again: the next is refused.
    let c = read_until_closed(&mut connect(lb.v4).await, Instant::now(), 3 * SEC).await;
    assert!(
        c.text().starts_with("HTTP/1.1 503"),
        "connection 21 again got {c:?}"
    );
    refused += 1;
    lb.wait_metric(REFUSED, f64::from(refused)).await;
}

// ---------------------------------------------------------------------------------
// 6: upstream timeouts
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_back_end_that_never_answers_gives_504_at_the_upstream_read_timeout() {
    let mute = SlowBackend::held("mute", Duration::ZERO).await;
    let limits = "upstream_read_timeout = \"1s\"";
    let lb = Balancer::start(&lb_config(limits, "retries = 0", &[("mute", mute.addr)])).await;
    let mut c = TryClient::connect(lb.v4).await.expect("connect");
    let t = Instant::now();
    let attempt = c.get("/").await;
    let took = t.elapsed();
    match attempt {
        Attempt::Answered(r) => assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text()),
        other => panic!("no answer: {other:?}"),
    }
    assert_ms("504", took, 750, 2500);
    assert_eq!(mute.count(), 1, "the back end got the request");
    mute.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_in_the_response_body_longer_than_the_upstream_read_timeout_cuts_it() {
    // 10 of 100 body bytes, then 4 s of silence before the back end closes.
    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789".to_vec();
    let app = ScriptedBackend::start(reply, 4 * SEC).await;
    let limits = "upstream_read_timeout = \"1s\"";
    let lb = Balancer::start(&lb_config(limits, "retries = 0", &[("app", app.addr)])).await;
    let mut s = connect(lb.v6).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: site.example\r\n\r\n")
        .await
        .expect("write");
    let c = read_until_closed(&mut s, Instant::now(), 8 * SEC).await;
    let text = c.text();
    assert!(text.starts_with("HTTP/1.1 200"), "{c:?}");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(body.len() < 100, "cut body looks complete: {c:?}");
    let at = c.at.unwrap_or_else(|| panic!("not closed: {c:?}"));
    assert_ms("cut response closed", at, 750, 2500);
}

/// A listener on `[::1]` whose accept queue is full (backlog 0, never accepted), so
/// that further SYNs are dropped and connects hang; with the connections filling it.
/// `None` if this kernel does not make a connect hang that way.
fn hung_listener() -> Option<(socket2::Socket, Vec<std::net::TcpStream>, SocketAddr)> {
    use socket2::{Domain, Socket, Type};
    let l = Socket::new(Domain::IPV6, Type::STREAM, None).expect("socket");
    l.bind(&"[::1]:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind");
    l.listen(0).expect("listen");
    let addr = l.local_addr().expect("addr").as_socket().expect("inet");
    let mut fill = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => fill.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Some((l, fill, addr)),
            Err(_) => return None,
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_hangs_fails_at_the_upstream_connect_timeout_and_is_retried() {
    let Some((_listener, _fill, hung)) = hung_listener() else {
        eprintln!("SKIPPED: cannot make a connect to [::1] hang on this kernel");
        return;
    };
    let good = Backend::start("good").await;
    let limits = "upstream_connect_timeout = \"1s\"";
    // Equal weights: the first pick is the first in config order, the hung one.
    let backends = [("hung", hung), ("good", good.addr)];
    let lb = Balancer::start(&lb_config(limits, "retries = 1", &backends)).await;
    let mut c = TryClient::connect(lb.v4).await.expect("connect");
    let t = Instant::now();
    let attempt = c.get("/").await;
    let took = t.elapsed();
    match attempt {
        Attempt::Answered(r) => {
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            assert_eq!(r.text(), "served by good\n");
        }
        other => panic!("no answer: {other:?}"),
    }
    assert_ms("retried after the connect timeout", took, 750, 2500);
    lb.wait_metric(
        r#"launchday_retries_total{pool="web",reason="connect_failed"}"#,
        1.0,
    )
    .await;
}
