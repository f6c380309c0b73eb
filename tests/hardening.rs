//! End-to-end: strict HTTP/1 parsing and request limits (issue #8, hardening). Raw
//! byte sequences go over TCP to the real balancer (in-process, port 0, on 127.0.0.1
//! and [::1]); a raw recording back end on `[::1]` shows what was forwarded.
//!
//! Every rejected case must (1) answer the expected status, locally (`X-Served-By:
//! launchday`), (2) close the connection within [`CLOSE_WITHIN`], and (3) send nothing
//! upstream; smuggling probes carry a second request to `/smuggled` that the back end
//! must never see. The table tests run every case (concurrently, one balancer each)
//! and then fail once, listing every failing case by name with what was observed.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How soon after its answer a rejected connection must be closed.
const CLOSE_WITHIN: Duration = Duration::from_secs(3);

/// What every recording back end answers to each complete request.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";

/// The request smuggling probes try to slip past the balancer.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";

#[derive(Default)]
struct Rec {
    /// Every byte received, all connections in arrival order.
    raw: Vec<u8>,
    /// The head of every complete request (head and whole body) received.
    heads: Vec<String>,
}

/// A back end on `[::1]:0` that records every byte it receives, answers [`OK`] to each
/// complete request (framed by chunked or Content-Length, like a typical server that
/// prefers Transfer-Encoding) and keeps connections alive.
struct Recorder {
    addr: SocketAddr,
    rec: Arc<Mutex<Rec>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("[::1]:0").await.expect("bind back end");
        let addr = listener.local_addr().expect("back end addr");
        let rec: Arc<Mutex<Rec>> = Arc::default();
        let r = Arc::clone(&rec);
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let r = Arc::clone(&r);
                tokio::spawn(tokio::time::timeout(STEP, serve_raw(s, r)));
            }
        });
        Recorder { addr, rec, task }
    }

    fn raw(&self) -> Vec<u8> {
        self.rec.lock().expect("lock").raw.clone()
    }

    fn heads(&self) -> Vec<String> {
        self.rec.lock().expect("lock").heads.clone()
    }

    /// One line about what this back end received.
    fn summary(&self) -> String {
        let raw = self.raw();
        let smuggled = contains(&raw, b"/smuggled");
        format!(
            "back end got {} bytes, {} complete requests{}",
            raw.len(),
            self.heads().len(),
            if smuggled {
                ", INCLUDING /smuggled"
            } else {
                ""
            }
        )
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_raw(mut s: TcpStream, rec: Arc<Mutex<Rec>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        rec.lock().expect("lock").raw.extend_from_slice(&chunk[..n]);
        while let Some((len, head)) = complete_request(&buf) {
            buf.drain(..len);
            rec.lock().expect("lock").heads.push(head);
            if s.write_all(OK).await.is_err() {
                return;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// The length and head of the first complete request in `buf`, if there is one.
fn complete_request(buf: &[u8]) -> Option<(usize, String)> {
    let end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let lower = head.to_ascii_lowercase();
    let chunked = lower
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    if !chunked {
        let len = match lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
        {
            Some(v) => v.trim().parse::<usize>().ok()?,
            None => 0,
        };
        return (buf.len() >= end + len).then_some((end + len, head));
    }
    let mut pos = end;
    loop {
        let eol = pos + find(&buf[pos..], b"\r\n")?;
        let line = String::from_utf8_lossy(&buf[pos..eol]).into_owned();
        let size = u64::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        pos = eol + 2;
        if size == 0 {
            // Trailer fields up to the empty line.
            loop {
                let e = pos + find(&buf[pos..], b"\r\n")?;
                let empty = e == pos;
                pos = e + 2;
                if empty {
                    return Some((pos, head));
                }
            }
        }
        let size = usize::try_from(size).ok()?;
        if buf.len() < pos + size + 2 {
            return None;
        }
        pos += size + 2;
    }
}

/// What the client saw: the bytes, and how the connection ended.
struct Outcome {
    bytes: Vec<u8>,
    /// "EOF", "reset (...)" or "still open".
    end: String,
}

impl Outcome {
    fn closed(&self) -> bool {
        self.end != "still open"
    }

    /// The status code of the first response line.
    fn status(&self) -> Option<u16> {
        let line = self.bytes.split(|&b| b == b'\n').next()?;
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        words.next().filter(|v| v.starts_with("HTTP/1."))?;
        words.next()?.parse().ok()
    }

    /// The `X-Served-By` values of the first response's head.
    fn served_by(&self) -> Vec<String> {
        let end = find(&self.bytes, b"\r\n\r\n").unwrap_or(self.bytes.len());
        String::from_utf8_lossy(&self.bytes[..end])
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.eq_ignore_ascii_case("x-served-by"))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    fn summary(&self) -> String {
        let first = self.bytes.split(|&b| b == b'\r').next().unwrap_or(&[]);
        format!(
            "got {:?} ({} bytes, {} status lines), connection {}",
            String::from_utf8_lossy(first),
            self.bytes.len(),
            status_lines(&self.bytes),
            self.end
        )
    }
}

/// How many lines of `bytes` look like a status line (`HTTP/1.x NNN `).
fn status_lines(bytes: &[u8]) -> usize {
    let text = String::from_utf8_lossy(bytes);
    let is_status = |l: &&str| {
        let mut w = l.split(' ');
        w.next().is_some_and(|v| v.starts_with("HTTP/1."))
            && w.next()
                .is_some_and(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit()))
    };
    text.lines().filter(is_status).count()
}

/// Writes `bytes` on a fresh connection to `addr` and reads until the balancer closes
/// it or [`CLOSE_WITHIN`] passes.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Outcome {
    let mut s = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    // The balancer may close before reading everything; the read shows what it said.
    let _ = tokio::time::timeout(STEP, s.write_all(bytes)).await;
    read_until_closed(&mut s).await
}

async fn read_until_closed(s: &mut TcpStream) -> Outcome {
    let mut bytes = Vec::new();
    let deadline = tokio::time::Instant::now() + CLOSE_WITHIN;
    let mut buf = [0u8; 16 * 1024];
    let end = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) => break "EOF".to_owned(),
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => break format!("reset ({e})"),
            Err(_) => break "still open".to_owned(),
        }
    };
    Outcome { bytes, end }
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// This status, locally, connection closed, not one byte upstream.
    Reject(u16),
    /// This status, locally, connection closed; the upstream request (if started) was
    /// aborted: the back end never got a complete request.
    Abort(u16),
    /// Forwarded: 200 from the back end, which got exactly one request.
    Accept,
}

/// Name (with the limits appended), `[limits]` keys, bytes to send, expectation.
type Case = (String, &'static str, Vec<u8>, Expect);

fn case(name: &str, limits: &'static str, bytes: Vec<u8>, expect: Expect) -> Case {
    let name = match limits {
        "" => format!("{name} [default limits]"),
        l => format!("{name} [{l}]"),
    };
    (name, limits, bytes, expect)
}

/// A request line and header block ending in the empty line, then `body`.
fn req(head: &str, body: &str) -> Vec<u8> {
    format!("{head}\r\n\r\n{body}").into_bytes()
}

/// A chunked POST carrying a last chunk then [`SMUGGLED`], with extra `headers`.
fn chunked_smuggle(version: &str, headers: &str) -> Vec<u8> {
    req(
        &format!("POST / {version}\r\nHost: a\r\n{headers}"),
        &format!("0\r\n\r\n{SMUGGLED}"),
    )
}

/// One pool `web` holding `backend` behind a catch-all route, with `limits`.
fn one_pool(limits: &str, backend: SocketAddr) -> String {
    let table = if limits.is_empty() {
        String::new()
    } else {
        format!("[limits]\n{limits}\n")
    };
    config(
        "",
        &format!(
            "[[routes]]\npool = \"web\"\n\n[pools.web]\n\
             backends = [{{ name = \"web\", address = \"{backend}\" }}]\n\n{table}"
        ),
    )
}

/// Pools `a` and `b` of one back end each, behind the routes `[[routes]]` + `ra` and
/// `[[routes]]` + `rb` (in this order).
fn two_pools(ra: &str, a: SocketAddr, rb: &str, b: SocketAddr) -> String {
    let pool = |n: &str, addr| {
        format!("[pools.{n}]\nbackends = [{{ name = \"{n}\", address = \"{addr}\" }}]\n")
    };
    let tables = format!("[[routes]]\n{ra}pool = \"a\"\n\n[[routes]]\n{rb}pool = \"b\"\n\n");
    config("", &(tables + &pool("a", a) + &pool("b", b)))
}

/// Runs one case; the observations, and the problems found (empty = pass).
async fn run((_, limits, bytes, expect): &Case, v6: bool) -> (String, Vec<String>) {
    let backend = Recorder::start().await;
    let text = one_pool(limits, backend.addr);
    if let Err(e) = launchday::config::load_str(&text, std::path::Path::new("."), None) {
        let e = e.to_string().replace('\n', " / ");
        return (String::new(), vec![format!("config rejected: {e}")]);
    }
    let lb = common::Balancer::start(&text).await;
    let out = exchange(if v6 { lb.v6 } else { lb.v4 }, bytes).await;
    // Anything forwarded was forwarded before the answer; a little slack anyway.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (raw, complete) = (backend.raw(), backend.heads().len());
    let smuggled = contains(&raw, b"/smuggled");
    let (status, served_by) = (out.status(), out.served_by());
    let want = match *expect {
        Expect::Reject(s) | Expect::Abort(s) => s,
        Expect::Accept => 200,
    };
    let (reject, abort) = (
        matches!(expect, Expect::Reject(_)),
        matches!(expect, Expect::Abort(_)),
    );
    let checks = [
        (
            status == Some(want),
            format!("status {status:?}, want {want}"),
        ),
        (out.closed(), format!("not closed within {CLOSE_WITHIN:?}")),
        (
            !smuggled && complete <= 1,
            format!("SMUGGLING: back end saw {complete} requests (/smuggled: {smuggled})"),
        ),
        (
            !(reject || abort) || served_by == ["launchday"],
            format!("X-Served-By {served_by:?}, want launchday"),
        ),
        (
            !reject || raw.is_empty(),
            format!(
                "sent upstream: {} bytes, {complete} complete requests",
                raw.len()
            ),
        ),
        (
            !abort || complete == 0,
            format!("back end got {complete} complete requests, want 0"),
        ),
        (
            reject || abort || complete == 1,
            format!("back end got {complete} complete requests, want 1"),
        ),
    ];
    let problems = checks.into_iter().filter(|c| !c.0).map(|c| c.1).collect();
    (
        format!("{}; {}", out.summary(), backend.summary()),
        problems,
    )
}

/// Runs every case concurrently, prints what each did, and fails naming every case
/// that failed.
async fn run_table(cases: Vec<Case>) {
    let mut set = JoinSet::new();
    for (i, case) in cases.into_iter().enumerate() {
        set.spawn(async move {
            let (seen, problems) = run(&case, i % 2 == 1).await;
            (i, case.0, seen, problems)
        });
    }
    let mut results = Vec::new();
    while let Some(r) = tokio::time::timeout(STEP * 3, set.join_next())
        .await
        .expect("every case finishes in time")
    {
        results.push(r.expect("case task"));
    }
    results.sort_by_key(|r| r.0);
    let mut failed = Vec::new();
    for (_, name, seen, problems) in &results {
        if problems.is_empty() {
            eprintln!("PASS {name}: {seen}");
        } else {
            eprintln!("FAIL {name}: {}; {seen}", problems.join("; "));
            failed.push(format!("{name}: {}", problems.join("; ")));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n  {}",
        failed.len(),
        results.len(),
        failed.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_parsing_rejects_with_400_closes_and_forwards_nothing() {
    let cs = |headers: &str| chunked_smuggle("HTTP/1.1", headers);
    let get = |headers: &str| req(&format!("GET / HTTP/1.1\r\nHost: a\r\n{headers}"), "");
    let post = |cl: &str| req(&format!("POST / HTTP/1.1\r\nHost: a\r\n{cl}"), "hello");
    let line = |l: &str| req(&format!("{l}\r\nHost: a"), "");
    // The first Content-Length claims an empty body, the second the smuggled request.
    let two_lengths = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
        SMUGGLED.len()
    );
    let chunk = |size: &str| {
        req(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked",
            &format!("{size}\r\nhello\r\n0\r\n\r\n{SMUGGLED}"),
        )
    };
    let te = "Transfer-Encoding: chunked";
    #[rustfmt::skip]
    let table: Vec<(&str, Vec<u8>)> = vec![
        // Content-Length and Transfer-Encoding together, either order.
        ("CL 6 then TE chunked, smuggled GET", cs(&format!("Content-Length: 6\r\n{te}"))),
        ("TE chunked then CL 6, smuggled GET", cs(&format!("{te}\r\nContent-Length: 6"))),
        // Transfer-Encoding other than exactly one `chunked`.
        ("TE gzip, chunked", cs("Transfer-Encoding: gzip, chunked")),
        ("TE chunked, chunked", cs("Transfer-Encoding: chunked, chunked")),
        ("TE identity", cs("Transfer-Encoding: identity")),
        ("TE xchunked", cs("Transfer-Encoding: xchunked")),
        ("two TE lines chunked + chunked", cs(&format!("{te}\r\n{te}"))),
        ("two TE lines gzip + chunked", cs(&format!("Transfer-Encoding: gzip\r\n{te}"))),
        ("TE chunked on HTTP/1.0", chunked_smuggle("HTTP/1.0", te)),
        // Malformed Content-Length.
        ("CL +5", post("Content-Length: +5")),
        ("CL -5", post("Content-Length: -5")),
        ("CL ' 5x'", post("Content-Length:  5x")),
        ("CL 0x10", post("Content-Length: 0x10")),
        ("CL empty", post("Content-Length: ")),
        ("CL list 5, 6", post("Content-Length: 5, 6")),
        ("two CL lines 5 and 6", post("Content-Length: 5\r\nContent-Length: 6")),
        ("two CL lines 0 and N, smuggled GET as body", two_lengths.into_bytes()),
        ("CL overflow 99999999999999999999999", post("Content-Length: 99999999999999999999999")),
        // Chunk sizes.
        ("chunk size ffffffffffffffffff", chunk("ffffffffffffffffff")),
        ("chunk size 10000000000000005 (wraps to 5), smuggled GET", chunk("10000000000000005")),
        // Header syntax.
        ("obs-fold with SP", get("X-A: b\r\n c")),
        ("obs-fold with HTAB", get("X-A: b\r\n\tc")),
        ("first header line starts with SP", req("GET / HTTP/1.1\r\n X-A: b\r\nHost: a", "")),
        ("bare CR inside a header value", get("X-A: b\rc")),
        ("bare CR ending a header line", get("X-A: b\rX-B: c")),
        ("NUL in header value", get("X-A: b\0c")),
        ("NUL in header name", get("X-\0A: b")),
        ("0x01 in header value", get("X-A: b\x01c")),
        ("DEL 0x7f in header value", get("X-A: b\x7fc")),
        ("0x0b (VT) in header name", get("X-\x0bA: b")),
        ("SP between field name and colon", get("X-A : b")),
        ("HTAB before colon of TE, with CL 6", cs("Content-Length: 6\r\nTransfer-Encoding\t: chunked")),
        // Host.
        ("HTTP/1.1 without Host", req("GET / HTTP/1.1\r\nX-A: b", "")),
        ("two different Host lines", req("GET / HTTP/1.1\r\nHost: a\r\nHost: b", "")),
        ("two identical Host lines", req("GET / HTTP/1.1\r\nHost: a\r\nHost: a", "")),
        // Versions.
        ("version HTTP/1.2", line("GET / HTTP/1.2")),
        ("version HTTP/2.0", line("GET / HTTP/2.0")),
        ("version HTTP/1.1x", line("GET / HTTP/1.1x")),
        ("version http/1.1 (lowercase)", line("GET / http/1.1")),
    ];
    let cases = table
        .into_iter()
        .map(|(name, bytes)| case(name, "", bytes, Expect::Reject(400)));
    run_table(cases.collect()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_answer_431_414_413_and_close() {
    use Expect::{Abort, Accept, Reject};
    const HEADERS: &str = "max_headers = 10";
    const HEAD_BYTES: &str = "max_header_bytes = 1024";
    const URI: &str = "max_uri_bytes = 300";
    const BODY: &str = "max_body_bytes = 100";
    const BODY_1K: &str = "max_body_bytes = 1000";
    // Accepted cases ask for `Connection: close`, so that they end with EOF too.
    let close = "Connection: close\r\n";
    let head = |line: &str, rest: &str| {
        let text = format!("{line}\r\nHost: a\r\n{rest}");
        req(text.trim_end(), "")
    };
    let fields = |n: usize, extra: &str| {
        let fillers: String = (0..n).map(|i| format!("X-F{i}: v\r\n")).collect();
        head("GET / HTTP/1.1", &format!("{extra}{fillers}"))
    };
    let big =
        |n: usize, extra: &str| head("GET / HTTP/1.1", &format!("{extra}X: {}", "a".repeat(n)));
    let target =
        |n: usize, extra: &str| head(&format!("GET /{} HTTP/1.1", "a".repeat(n - 1)), extra);
    let body = |n: usize, extra: &str| {
        let h = format!("POST / HTTP/1.1\r\nHost: a\r\n{extra}Content-Length: {n}");
        req(&h, &"b".repeat(n))
    };
    let chunked = |sizes: &[usize], extra: &str| {
        let h = format!("POST / HTTP/1.1\r\nHost: a\r\n{extra}Transfer-Encoding: chunked");
        let data: String = sizes
            .iter()
            .map(|&n| format!("{n:x}\r\n{}\r\n", "c".repeat(n)))
            .collect();
        req(&h, &format!("{data}0\r\n\r\n"))
    };
    #[rustfmt::skip]
    let table = vec![
        // Header fields (Host included).
        case("101 header fields", "", fields(100, ""), Reject(431)),
        case("100 header fields", "", fields(98, close), Accept),
        case("11 header fields", HEADERS, fields(10, ""), Reject(431)),
        case("10 header fields", HEADERS, fields(8, close), Accept),
        // Header bytes.
        case("70000-byte head", "", big(70_000, ""), Reject(431)),
        case("2000-byte head", HEAD_BYTES, big(2000, ""), Reject(431)),
        case("~550-byte head", HEAD_BYTES, big(500, close), Accept),
        // Request target.
        case("8193-byte target", "", target(8193, ""), Reject(414)),
        case("8192-byte target", "", target(8192, close), Accept),
        case("301-byte target", URI, target(301, ""), Reject(414)),
        case("300-byte target", URI, target(300, close), Accept),
        // Body.
        case("Content-Length 101", BODY, body(101, ""), Reject(413)),
        case("Content-Length 100", BODY, body(100, close), Accept),
        case("chunked, 2048 bytes", BODY_1K, chunked(&[600, 600, 848], ""), Abort(413)),
        case("chunked, 1000 bytes", BODY_1K, chunked(&[600, 400], close), Accept),
    ];
    run_table(table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_routes_on_its_authority_and_sends_origin_form_with_that_host() {
    let blog = Recorder::start().await;
    let www = Recorder::start().await;
    let text = two_pools("host = \"blog.example\"\n", blog.addr, "", www.addr);
    let lb = common::Balancer::start(&text).await;
    // RFC 9112 §3.2.2: the target's authority replaces whatever Host the client sent.
    #[rustfmt::skip]
    let cases = [
        ("Host = authority", "blog.example", "/x", lb.v4),
        ("Host differs from authority", "www.example", "/x?q=1", lb.v6),
    ];
    for (i, (name, host, path, addr)) in cases.into_iter().enumerate() {
        let bytes = format!(
            "GET http://blog.example{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        let out = exchange(addr, bytes.as_bytes()).await;
        assert_eq!(out.status(), Some(200), "{name}: {}", out.summary());
        assert!(out.closed(), "{name}: {}", out.summary());
        let heads = blog.heads();
        assert_eq!(heads.len(), i + 1, "{name}: blog {}", blog.summary());
        let head = &heads[i];
        assert!(
            head.starts_with(&format!("GET {path} HTTP/1.1\r\n")),
            "{name}: back end head {head:?}"
        );
        let hosts: Vec<&str> = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.trim())
            .collect();
        assert_eq!(hosts, ["blog.example"], "{name}: back end head {head:?}");
        assert!(www.raw().is_empty(), "{name}: www {}", www.summary());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_duplicate_content_length_is_recorded_not_asserted() {
    // Observed (HEAD 819d70a and the issue #8 work in progress alike): two identical
    // lines are accepted (200; the back end gets one request, body "hello"); the
    // list "5, 5" is rejected with 400 and nothing is forwarded
    // (at HEAD that 400 was hyper's own, without X-Served-By).
    let five = "Content-Length: 5";
    let cases = [
        ("two lines", format!("{five}\r\n{five}")),
        ("list", format!("{five}, 5")),
    ];
    for (name, cl) in cases {
        let backend = Recorder::start().await;
        let lb = common::Balancer::start(&one_pool("", backend.addr)).await;
        let bytes = format!("POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{cl}\r\n\r\nhello");
        let out = exchange(lb.v4, bytes.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        eprintln!("{name}: {}; {}", out.summary(), backend.summary());
        assert!(backend.heads().len() <= 1, "{name}: {}", backend.summary());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_answered_without_101_is_not_tunnelled() {
    for (proto, extra) in [
        (
            "websocket",
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        ),
        ("h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
    ] {
        let web = Recorder::start().await;
        let internal = Recorder::start().await;
        let text = two_pools("", web.addr, "path_prefix = \"/internal\"\n", internal.addr);
        let lb = common::Balancer::start(&text).await;
        let mut s = TcpStream::connect(lb.v6).await.expect("connect");
        let upgrade = format!(
            "GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n{extra}\r\n"
        );
        s.write_all(upgrade.as_bytes())
            .await
            .expect("write upgrade");
        common::wait_until("the upgrade request reaches the back end", || {
            web.heads().len() == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The back end said 200, not 101: what follows is a new request, routed anew
        // (or the balancer closed the connection), never raw bytes to the same back end.
        let second = b"GET /internal/secret HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        let _ = s.write_all(second).await;
        let out = read_until_closed(&mut s).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (web_saw, internal_saw) = (web.summary(), internal.summary());
        let seen = format!("{}; web {web_saw}; internal {internal_saw}", out.summary());
        assert!(
            !contains(&web.raw(), b"/internal"),
            "{proto}: tunnelled: {seen}"
        );
        assert_eq!(web.heads().len(), 1, "{proto}: {seen}");
        assert!(internal.heads().len() <= 1, "{proto}: {seen}");
        assert_eq!(out.status(), Some(200), "{proto}: {seen}");
        assert!(out.closed(), "{proto}: {seen}");
    }
}
