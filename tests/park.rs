//! End-to-end: idle keep-alive connections are parked (hyper's state released after
//! `PARK_AFTER` of idleness, see `launchday::park`) without the client noticing: the
//! next request on the same connection is served, bytes of a next request that came
//! early are not lost, a response whose body pauses is not cut, the idle deadline
//! still closes the connection, and a shutdown closes parked connections at once.
//!
//! Real sockets and real time (parking happens after 1 s), generous windows.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{config, metric, Backend, Balancer, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PARKED: &str = "launchday_connections_parked{listener=\"public\"}";

/// Longer than `PARK_AFTER` (1 s) plus the time to notice.
const PAST_PARKING: Duration = Duration::from_millis(1700);

fn lb_config(limits: &str, backend: SocketAddr) -> String {
    config(
        "",
        &format!(
            "[[routes]]\npool = \"web\"\n\n[pools.web]\nbackends = [{{ name = \"app\", address = \"{backend}\" }}]\n\n[limits]\n{limits}\n"
        ),
    )
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let _ = s.set_nodelay(true);
    s
}

/// Reads one response on a keep-alive connection; returns its status and text.
async fn read_response(s: &mut TcpStream) -> (u16, String) {
    common::read_response(s).await.expect("answer")
}

async fn get_on(s: &mut TcpStream, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: site.example\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    read_response(s).await
}

async fn parked(lb: &Balancer) -> f64 {
    metric(&lb.metrics().await, PARKED).expect("parked gauge")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_parked_and_serves_its_next_request() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config("idle_timeout = \"30s\"", app.addr)).await;
    let mut s = connect(lb.v6).await;
    let (status, text) = get_on(&mut s, "/one").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        parked(&lb).await,
        0.0,
        "a connection just used is not parked"
    );
    tokio::time::sleep(PAST_PARKING).await;
    assert_eq!(parked(&lb).await, 1.0, "idle for over 1 s: parked");
    let (status, text) = get_on(&mut s, "/two").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("served by app\n"), "{text}");
    assert_eq!(parked(&lb).await, 0.0, "unparked by its request");
    // Both requests came over the one client connection, in order.
    let paths: Vec<String> = app.requests().iter().map(|r| r.uri.to_string()).collect();
    assert_eq!(paths, ["/one", "/two"]);
    // Parked again after the second request, and still served.
    tokio::time::sleep(PAST_PARKING).await;
    assert_eq!(parked(&lb).await, 1.0);
    let (status, _) = get_on(&mut s, "/three").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_of_a_next_request_read_before_parking_is_not_lost() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config("idle_timeout = \"30s\"", app.addr)).await;
    let mut s = connect(lb.v4).await;
    // One write: a whole request, then the first bytes of the next one.
    s.write_all(b"GET /first HTTP/1.1\r\nHost: site.example\r\n\r\nGET /second HTTP/1.1\r\nHo")
        .await
        .expect("write");
    let (status, text) = read_response(&mut s).await;
    assert_eq!(status, 200, "{text}");
    tokio::time::sleep(PAST_PARKING).await;
    s.write_all(b"st: site.example\r\n\r\n")
        .await
        .expect("write");
    let (status, text) = read_response(&mut s).await;
    assert_eq!(status, 200, "{text}");
    let paths: Vec<String> = app.requests().iter().map(|r| r.uri.to_string()).collect();
    assert_eq!(paths, ["/first", "/second"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_started_before_parking_still_gets_its_408_at_header_timeout() {
    let app = Backend::start("app").await;
    let limits = "header_timeout = \"2s\"\nidle_timeout = \"30s\"";
    let lb = Balancer::start(&lb_config(limits, app.addr)).await;
    let mut s = connect(lb.v4).await;
    // The second head never ends: it must not keep the connection open by being
    // handed from one parked hyper connection to the next.
    s.write_all(b"GET /first HTTP/1.1\r\nHost: site.example\r\n\r\nGET /second HTTP/1.1\r\nHo")
        .await
        .expect("write");
    let (status, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "connection still open after 8 s");
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    let took = started.elapsed();
    // 1 s until it could be parked, then header_timeout (2 s) for the head.
    assert!(
        took >= Duration::from_millis(1500) && took <= Duration::from_secs(5),
        "408 after {took:?}"
    );
    assert_eq!(app.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_closed_at_idle_timeout() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config("idle_timeout = \"3s\"", app.addr)).await;
    let mut s = connect(lb.v4).await;
    let (status, _) = get_on(&mut s, "/").await;
    assert_eq!(status, 200);
    let answered = Instant::now();
    tokio::time::sleep(PAST_PARKING).await;
    assert_eq!(parked(&lb).await, 1.0);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("clean close");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    let took = answered.elapsed();
    assert!(
        took >= Duration::from_millis(2700) && took <= Duration::from_millis(4500),
        "closed {took:?} after the answer, idle_timeout is 3 s"
    );
    assert_eq!(parked(&lb).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_parked_connections_at_once() {
    let app = Backend::start("app").await;
    let lb = Balancer::start(&lb_config("idle_timeout = \"30s\"", app.addr)).await;
    let mut s = connect(lb.v4).await;
    let (status, _) = get_on(&mut s, "/").await;
    assert_eq!(status, 200);
    tokio::time::sleep(PAST_PARKING).await;
    assert_eq!(parked(&lb).await, 1.0);
    let started = Instant::now();
    let drained = lb.server.shutdown(Duration::from_secs(10)).await;
    assert!(drained, "every connection finished within the grace period");
    assert!(
        started.elapsed() < STEP,
        "shutdown took {:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut rest))
        .await
        .expect("closed")
        .expect("clean close");
    assert!(rest.is_empty());
}

/// A back end whose answers send half their body, pause for `pause`, then the rest.
/// `framed`: with a `Content-Length`, any number of requests per connection; else
/// the body ends when the back end closes the connection.
async fn pausing_backend(pause: Duration, framed: bool) -> SocketAddr {
    let listener = TcpListener::bind("[::1]:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
                    buf.drain(..end);
                    let head: &[u8] = if framed {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst"
                    } else {
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nfirst"
                    };
                    if s.write_all(head).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                    if s.write_all(b"-half").await.is_err() || !framed {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_pauses_is_not_cut_by_parking() {
    let backend = pausing_backend(Duration::from_millis(1800), true).await;
    let lb = Balancer::start(&lb_config(
        "idle_timeout = \"30s\"\nupstream_read_timeout = \"10s\"",
        backend,
    ))
    .await;
    let mut s = connect(lb.v4).await;
    for i in 0..2 {
        let (status, text) = get_on(&mut s, "/").await;
        assert_eq!(status, 200, "request {i}: {text}");
        assert!(text.ends_with("\r\n\r\nfirst-half"), "request {i}: {text}");
    }
}

/// An HTTP/1.0 client gets a body of unknown length delimited by the end of the
/// connection: the close after the body must reach it at once, however long the body
/// paused (a connection is never parked while an answer is being written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_delimited_answer_that_pauses_still_ends_with_the_close() {
    let backend = pausing_backend(Duration::from_millis(1800), false).await;
    let lb = Balancer::start(&lb_config(
        "idle_timeout = \"30s\"\nupstream_read_timeout = \"10s\"",
        backend,
    ))
    .await;
    let mut s = connect(lb.v4).await;
    s.write_all(b"GET / HTTP/1.0\r\nHost: site.example\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut all))
        .await
        .expect("closed within 8 s")
        .expect("clean close");
    let text = String::from_utf8_lossy(&all);
    assert!(text.ends_with("\r\n\r\nfirst-half"), "{text}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "closed {took:?} after the request"
    );
}
