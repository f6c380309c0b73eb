//! End-to-end: HTTP/2 abuse on a TLS listener (issue #8). The real balancer, started
//! in-process on port 0 with a TLS listener (ALPN h2) in front of one recording back
//! end, is attacked by hand-written HTTP/2 clients: raw frames encoded here, over
//! tokio-rustls, with HPACK blocks made only of static-table indices and literal
//! fields without indexing (so no HPACK library and no dynamic table). The attacks:
//!
//! - rapid reset (CVE-2023-44487): thousands of streams opened and at once cancelled,
//!   in batches (HEADERS and RST_STREAM in the same TLS record), and paced (each
//!   RST_STREAM about a millisecond after its HEADERS, so the server has already
//!   accepted the stream: h2's `max_pending_accept_reset_streams` counts only streams
//!   reset before they were accepted);
//! - CONTINUATION flood: a header block that never ends, well above 64 KiB;
//! - an oversized header list (above `max_header_list_size`, 64 KiB) in one request.
//!
//! Each must end in GOAWAY / RST_STREAM / 431 / a closed connection, long before the
//! attacker is done, with nothing (or, for rapid reset, almost nothing) reaching the
//! back end, while a normal HTTP/2 client (hyper) on its own connection keeps getting
//! `200` from the back end before, during and after the attack. The balancer runs in
//! this process, so the process's RSS (`/proc/self/status`) bounds its memory.
//!
//! Every loop is bounded in count and time; every read has a timeout.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Backend, Balancer, SlowBackend, STEP};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use launchday::listener::h2_limits;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The name in the certificate, the SNI and the `:authority` of every request.
const HOST: &str = "localhost";

/// Longest any one attack may keep sending.
const ATTACK_TIME: Duration = Duration::from_secs(10);

/// The generous bound on the process's RSS growth across the attacks.
const RSS_BOUND_KIB: u64 = 64 * 1024;

/// Streams the rapid-reset attacker opens (and cancels) at most.
const RAPID_STREAMS: usize = 5000;
/// HEADERS + RST_STREAM pairs per write (one TLS record, processed in one go).
const RAPID_BATCH: usize = 50;
/// "Well before all are sent": GOAWAY must be seen before this many streams.
const RAPID_GOAWAY_BEFORE: usize = 1000;

/// Header-block bytes the CONTINUATION flood sends at most.
const FLOOD_BYTES: usize = 2 * 1024 * 1024;

/// The server's `max_header_list_size`.
const MAX_HEADER_LIST: usize = h2_limits::MAX_HEADER_LIST_SIZE as usize;

/// The server's `max_concurrent_streams`.
const MAX_STREAMS: usize = h2_limits::MAX_CONCURRENT_STREAMS as usize;

/// The largest frame payload the server accepts (SETTINGS_MAX_FRAME_SIZE default).
const MAX_FRAME: usize = 16 * 1024;

// ---------------------------------------------------------------------------------
// HTTP/2 frames and HPACK, by hand (RFC 9113, RFC 7541)
// ---------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const NO_ERROR: u32 = 0x0;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The name of an HTTP/2 error code.
fn reason(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "unknown",
    }
}

/// Appends one frame: 24-bit length, type, flags, 31-bit stream id, payload.
fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("frame length");
    assert!(len < 1 << 24, "frame payload too long");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK integer with an N-bit prefix; `flags` are the bits above the prefix.
fn hpack_int(out: &mut Vec<u8>, prefix_bits: u32, flags: u8, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// An HPACK string literal, not Huffman-coded.
fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 7, 0x00, s.len());
    out.extend_from_slice(s);
}

/// Literal header field without indexing, its name from static-table entry `index`.
fn literal_indexed_name(out: &mut Vec<u8>, index: usize, value: &[u8]) {
    hpack_int(out, 4, 0x00, index);
    hpack_string(out, value);
}

/// Literal header field without indexing, with a literal name.
fn literal_new_name(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_string(out, name);
    hpack_string(out, value);
}

/// `GET https://HOST{path}`: `:method GET` (static 2), `:scheme https` (static 7),
/// `:path` (name static 4) and `:authority` (name static 1) as literals.
fn request_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x87];
    literal_indexed_name(&mut b, 4, path.as_bytes());
    literal_indexed_name(&mut b, 1, HOST.as_bytes());
    b
}

/// Appends `block` as HEADERS (with `END_STREAM`) and as many CONTINUATION frames as
/// needed, each payload at most `frame_len`; the last one has `END_HEADERS`.
fn header_frames(out: &mut Vec<u8>, stream: u32, block: &[u8], frame_len: usize) {
    let chunks: Vec<&[u8]> = block.chunks(frame_len).collect();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.iter().enumerate() {
        let end = if i == last { END_HEADERS } else { 0 };
        if i == 0 {
            frame(out, HEADERS, END_STREAM | end, stream, chunk);
        } else {
            frame(out, CONTINUATION, end, stream, chunk);
        }
    }
}

/// Decodes an HPACK integer with an N-bit prefix: (value, bytes used).
fn decode_int(b: &[u8], prefix_bits: u32) -> Option<(usize, usize)> {
    let max = (1usize << prefix_bits) - 1;
    let mut value = usize::from(*b.first()?) & max;
    if value < max {
        return Some((value, 1));
    }
    let mut shift = 0;
    for (i, byte) in b.iter().enumerate().skip(1).take(5) {
        value += usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
        shift += 7;
    }
    None
}

/// Decodes a Huffman-coded string of digits (RFC 7541 appendix B: `0`-`2` have the
/// 5-bit codes 0-2, `3`-`9` the 6-bit codes 0x19-0x1f); `None` for anything else.
fn huffman_digits(s: &[u8]) -> Option<String> {
    let mut out = String::new();
    let (mut acc, mut n) = (0u32, 0u32);
    for byte in s {
        for bit in (0..8).rev() {
            acc = (acc << 1) | u32::from((byte >> bit) & 1);
            n += 1;
            if n == 5 && acc <= 2 {
                out.push(char::from(b'0' + acc as u8));
            } else if n == 6 && (0x19..=0x1f).contains(&acc) {
                out.push(char::from(b'3' + (acc - 0x19) as u8));
            } else if acc == (1 << n) - 1 && n < 8 {
                // All ones so far: the end-of-string padding, or a longer code.
                continue;
            } else if n >= 6 {
                return None;
            } else {
                continue;
            }
            (acc, n) = (0, 0);
        }
    }
    (n == 0 || acc == (1 << n) - 1).then_some(out)
}

/// The `:status` of a response header block, when it is its first field and coded
/// with the static table (indexed, or a literal with a static `:status` name).
fn response_status(block: &[u8]) -> Option<u16> {
    let mut i = 0;
    // Dynamic table size updates (001xxxxx) may come first.
    while block.get(i)? & 0xe0 == 0x20 {
        i += decode_int(&block[i..], 5)?.1;
    }
    let first = block[i];
    if first & 0x80 != 0 {
        let (index, _) = decode_int(&block[i..], 7)?;
        return match index {
            8 => Some(200),
            9 => Some(204),
            10 => Some(206),
            11 => Some(304),
            12 => Some(400),
            13 => Some(404),
            14 => Some(500),
            _ => None,
        };
    }
    let prefix = if first & 0x40 != 0 { 6 } else { 4 };
    let (index, used) = decode_int(&block[i..], prefix)?;
    if !(8..=14).contains(&index) {
        return None;
    }
    i += used;
    let huffman = block.get(i)? & 0x80 != 0;
    let (len, used) = decode_int(&block[i..], 7)?;
    i += used;
    let raw = block.get(i..i + len)?;
    let text = if huffman {
        huffman_digits(raw)?
    } else {
        String::from_utf8(raw.to_vec()).ok()?
    };
    text.parse().ok()
}

#[test]
fn the_hand_written_hpack_helpers_agree_with_rfc_7541() {
    // C.6.1 / C.6.2: ":status 302" and "307", literal with indexing, Huffman.
    assert_eq!(huffman_digits(&[0x64, 0x02]).as_deref(), Some("302"));
    assert_eq!(huffman_digits(&[0x64, 0x0e, 0xff]).as_deref(), Some("307"));
    assert_eq!(response_status(&[0x48, 0x82, 0x64, 0x02]), Some(302));
    assert_eq!(response_status(&[0x88]), Some(200));
    assert_eq!(response_status(&[0x3f, 0xe1, 0x1f, 0x8d]), Some(404));
    // "431" raw and Huffman-coded (011010 011001 00001, then padding).
    assert_eq!(response_status(&[0x08, 0x03, b'4', b'3', b'1']), Some(431));
    assert_eq!(response_status(&[0x48, 0x83, 0x69, 0x90, 0xff]), Some(431));
    // C.1: integers.
    let mut out = Vec::new();
    hpack_int(&mut out, 5, 0, 1337);
    assert_eq!(out, [0x1f, 0x9a, 0x0a]);
    assert_eq!(decode_int(&out, 5), Some((1337, 3)));
    let mut out = Vec::new();
    hpack_int(&mut out, 5, 0, 10);
    assert_eq!(out, [0x0a]);
    // A frame header.
    let mut out = Vec::new();
    frame(&mut out, RST_STREAM, 0, 3, &CANCEL.to_be_bytes());
    assert_eq!(out, [0, 0, 4, 3, 0, 0, 0, 0, 3, 0, 0, 0, 8]);
}

// ---------------------------------------------------------------------------------
// The balancer with TLS, its back end, TLS clients
// ---------------------------------------------------------------------------------

/// The paths of the requests a recording back end received, in order.
type Paths = Box<dyn Fn() -> Vec<String> + Send + Sync>;

/// The balancer with a TLS listener `public` (127.0.0.1 and [::1]) whose every
/// request goes to the back end `web`, and a client config that trusts its
/// self-signed certificate and offers only h2.
struct Site {
    _dir: tempfile::TempDir,
    lb: Balancer,
    paths: Paths,
    tls: Arc<ClientConfig>,
}

impl Site {
    /// In front of a [`Backend`] named `web`.
    async fn start() -> Site {
        let backend = Backend::start("web").await;
        let addr = backend.addr;
        let paths = move || paths_of(backend.requests());
        Self::new(addr, Box::new(paths)).await
    }

    /// In front of a [`SlowBackend`] named `web` that takes `delay` per request.
    async fn slow(delay: Duration) -> (Site, SlowBackend) {
        let backend = SlowBackend::start("web", delay).await;
        let (addr, b) = (backend.addr, backend.clone());
        let site = Self::new(addr, Box::new(move || paths_of(b.requests()))).await;
        (site, backend)
    }

    async fn new(backend: SocketAddr, paths: Paths) -> Site {
        let key = rcgen::KeyPair::generate().expect("generate key");
        let cert = rcgen::CertificateParams::new(vec![HOST.to_owned()])
            .expect("certificate params")
            .self_signed(&key)
            .expect("self-sign");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("site.pem"), cert.pem()).expect("write cert");
        std::fs::write(dir.path().join("site.key"), key.serialize_pem()).expect("write key");
        let toml = format!(
            r#"shutdown_grace = "1s"

[admin]
listen = ["127.0.0.1:0"]

[[listeners]]
name = "public"
bind = ["127.0.0.1:0", "[::1]:0"]

[listeners.tls]
certificates = [{{ cert = "site.pem", key = "site.key" }}]

[[routes]]
pool = "web"

[pools.web]
backends = [{{ name = "web", address = "{backend}" }}]
"#
        );
        let lb = Balancer::start_in(&toml, dir.path()).await;

        let der = CertificateDer::from_pem_slice(cert.pem().as_bytes()).expect("PEM certificate");
        let mut roots = RootCertStore::empty();
        roots.add(der).expect("trust the site's certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Site {
            _dir: dir,
            lb,
            paths,
            tls: Arc::new(cfg),
        }
    }

    /// Where clients connect (the TLS listener on 127.0.0.1).
    fn addr(&self) -> SocketAddr {
        self.lb.v4
    }

    /// Requests the back end received whose path starts with `prefix`.
    fn backend_count(&self, prefix: &str) -> usize {
        (self.paths)()
            .iter()
            .filter(|p| p.starts_with(prefix))
            .count()
    }

    /// A TLS connection that negotiated h2.
    async fn connect(&self) -> TlsStream<TcpStream> {
        let addr = self.addr();
        let handshake = async {
            let tcp = TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(HOST).expect("server name");
            TlsConnector::from(Arc::clone(&self.tls))
                .connect(name, tcp)
                .await
                .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"))
        };
        let tls = tokio::time::timeout(STEP, handshake)
            .await
            .expect("TLS handshake in time");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "ALPN must pick h2"
        );
        tls
    }
}

fn paths_of(seen: Vec<common::Seen>) -> Vec<String> {
    seen.iter().map(|s| s.uri.path().to_owned()).collect()
}

/// Resident memory of this process, and its peak (`VmRSS`, `VmHWM`), in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ---------------------------------------------------------------------------------
// The normal client
// ---------------------------------------------------------------------------------

/// A well-behaved HTTP/2 client (hyper) on its own connection that sends
/// `GET /normal/N` one after another until stopped, expecting `200` from `web`.
struct NormalClient {
    ok: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<String>>,
}

/// Requests the normal client sends at most.
const NORMAL_MAX: usize = 5000;

impl NormalClient {
    /// Connects, and returns once its first request has succeeded.
    async fn start(site: &Site) -> NormalClient {
        let tls = site.connect().await;
        let (sender, conn) = tokio::time::timeout(
            STEP,
            http2::handshake(TokioExecutor::new(), TokioIo::new(tls)),
        )
        .await
        .expect("h2 handshake in time")
        .expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let ok = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(normal_loop(sender, Arc::clone(&ok), Arc::clone(&stop)));
        let client = NormalClient { ok, stop, task };
        common::wait_until("the normal client's first 200", || client.ok() >= 1).await;
        client
    }

    /// Requests answered 200 by the back end so far.
    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Lets at least `more` further requests succeed, stops, and returns how many
    /// succeeded and what went wrong (nothing, when it was unaffected).
    async fn finish(self, more: usize) -> (usize, Vec<String>) {
        let target = self.ok() + more;
        let start = Instant::now();
        while self.ok() < target && start.elapsed() < STEP && !self.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.stop.store(true, Ordering::SeqCst);
        let failures = tokio::time::timeout(STEP + STEP, self.task)
            .await
            .expect("the normal client stops in time")
            .expect("the normal client's task");
        let ok = self.ok.load(Ordering::SeqCst);
        let mut problems: Vec<String> = failures
            .into_iter()
            .map(|f| format!("normal h2 client: {f}"))
            .collect();
        if ok < target {
            problems.push(format!(
                "normal h2 client: only {ok} requests succeeded, wanted {target}"
            ));
        }
        (ok, problems)
    }
}

async fn normal_loop(
    mut sender: http2::SendRequest<Full<Bytes>>,
    ok: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let mut failures = Vec::new();
    for i in 0..NORMAL_MAX {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let req = Request::get(format!("https://{HOST}/normal/{i}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let exchange = async {
            sender
                .ready()
                .await
                .map_err(|e| format!("not ready: {e}"))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok::<_, String>((parts.status, parts.headers.get("x-backend").cloned(), body))
        };
        match tokio::time::timeout(STEP, exchange).await {
            Ok(Ok((StatusCode::OK, Some(by), body)))
                if by == "web" && body == "served by web\n" =>
            {
                ok.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Ok((status, by, body))) => {
                failures.push(format!("/normal/{i}: {status}, x-backend {by:?}, {body:?}"))
            }
            Ok(Err(e)) => failures.push(format!("/normal/{i}: {e}")),
            Err(_) => failures.push(format!("/normal/{i}: no answer within {STEP:?}")),
        }
        if failures.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    failures
}

// ---------------------------------------------------------------------------------
// The attacker: raw frames out, a reader task noting what the server sent
// ---------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct GoAway {
    last_stream: u32,
    code: u32,
    debug: String,
}

impl std::fmt::Display for GoAway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GOAWAY {} (0x{:x}), last stream {}, debug {:?}",
            reason(self.code),
            self.code,
            self.last_stream,
            self.debug
        )
    }
}

/// What the server sent the attacker.
#[derive(Clone, Debug, Default)]
struct Observed {
    /// The server's own SETTINGS (not an ack) arrived.
    server_settings: bool,
    goaway: Option<GoAway>,
    /// RST_STREAM frames: (stream, error code).
    resets: Vec<(u32, u32)>,
    /// Response HEADERS: (stream, `:status` when decodable).
    responses: Vec<(u32, Option<u16>)>,
    frames: usize,
    /// Why the reader stopped: EOF or a read error.
    closed: Option<String>,
}

impl Observed {
    /// The server ended the exchange: GOAWAY, or the connection is gone.
    fn ended(&self) -> bool {
        self.goaway.is_some() || self.closed.is_some()
    }

    fn reset_of(&self, stream: u32) -> Option<u32> {
        self.resets
            .iter()
            .find(|(s, _)| *s == stream)
            .map(|(_, c)| *c)
    }

    fn response_of(&self, stream: u32) -> Option<Option<u16>> {
        self.responses
            .iter()
            .find(|(s, _)| *s == stream)
            .map(|(_, st)| *st)
    }

    /// One line for the report.
    fn summary(&self) -> String {
        let goaway = self
            .goaway
            .as_ref()
            .map_or("no GOAWAY".to_owned(), |g| g.to_string());
        let mut codes: Vec<&str> = self.resets.iter().map(|(_, c)| reason(*c)).collect();
        codes.dedup();
        format!(
            "{goaway}; {} RST_STREAM {codes:?}; responses {:?}; {} frames; connection {}",
            self.resets.len(),
            self.responses.iter().take(5).collect::<Vec<_>>(),
            self.frames,
            self.closed.as_deref().unwrap_or("open"),
        )
    }
}

/// A hand-written HTTP/2 client connection.
struct Attacker {
    wr: WriteHalf<TlsStream<TcpStream>>,
    seen: Arc<Mutex<Observed>>,
    reader: JoinHandle<()>,
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Attacker {
    /// Connects, sends the preface and an empty SETTINGS, waits for the server's
    /// SETTINGS and acknowledges them.
    async fn connect(site: &Site) -> Attacker {
        let (rd, wr) = tokio::io::split(site.connect().await);
        let seen = Arc::new(Mutex::new(Observed::default()));
        let reader = tokio::spawn(read_frames(rd, Arc::clone(&seen)));
        let mut a = Attacker { wr, seen, reader };
        let mut hello = PREFACE.to_vec();
        frame(&mut hello, SETTINGS, 0, 0, &[]);
        a.send(&hello).await.expect("send the preface");
        let o = a.wait(|o| o.server_settings).await;
        assert!(o.server_settings, "the server sent no SETTINGS: {o:?}");
        let mut ack = Vec::new();
        frame(&mut ack, SETTINGS, ACK, 0, &[]);
        a.send(&ack)
            .await
            .expect("acknowledge the server's SETTINGS");
        a
    }

    /// Writes `bytes` (bounded by [`STEP`]).
    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let write = async {
            self.wr.write_all(bytes).await?;
            self.wr.flush().await
        };
        match tokio::time::timeout(STEP, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write failed: {e}")),
            Err(_) => Err(format!("write blocked for {STEP:?}")),
        }
    }

    fn observed(&self) -> Observed {
        self.seen.lock().expect("lock").clone()
    }

    fn ended(&self) -> bool {
        self.seen.lock().expect("lock").ended()
    }

    /// Waits (at most [`STEP`]) until `cond` holds or the connection is closed.
    async fn wait(&self, cond: impl Fn(&Observed) -> bool) -> Observed {
        self.wait_at_most(STEP, cond).await
    }

    /// Waits (at most `limit`) until `cond` holds or the connection is closed.
    async fn wait_at_most(&self, limit: Duration, cond: impl Fn(&Observed) -> bool) -> Observed {
        let start = Instant::now();
        loop {
            let o = self.observed();
            if cond(&o) || o.closed.is_some() || start.elapsed() > limit {
                return o;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Reads frames until the connection ends (or for at most a minute), noting them.
async fn read_frames(mut rd: ReadHalf<TlsStream<TcpStream>>, seen: Arc<Mutex<Observed>>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let start = Instant::now();
    for _ in 0..1_000_000 {
        if start.elapsed() > Duration::from_secs(60) {
            break;
        }
        let n = match tokio::time::timeout(Duration::from_secs(1), rd.read(&mut chunk)).await {
            Err(_) => continue,
            Ok(Ok(0)) => {
                seen.lock().expect("lock").closed = Some("EOF".to_owned());
                return;
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                seen.lock().expect("lock").closed = Some(format!("read error: {e}"));
                return;
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while buf.len() - at >= 9 {
            let head = &buf[at..at + 9];
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            if len > MAX_FRAME {
                seen.lock().expect("lock").closed = Some(format!("server sent a {len}-byte frame"));
                return;
            }
            if buf.len() - at < 9 + len {
                break;
            }
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let payload = &buf[at + 9..at + 9 + len];
            let word = |i: usize| {
                payload
                    .get(i..i + 4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            };
            let mut o = seen.lock().expect("lock");
            o.frames += 1;
            match kind {
                SETTINGS if flags & ACK == 0 => o.server_settings = true,
                GOAWAY => {
                    o.goaway = Some(GoAway {
                        last_stream: word(0).unwrap_or(0) & 0x7fff_ffff,
                        code: word(4).unwrap_or(u32::MAX),
                        debug: String::from_utf8_lossy(payload.get(8..).unwrap_or(&[]))
                            .into_owned(),
                    })
                }
                RST_STREAM => o.resets.push((stream, word(0).unwrap_or(u32::MAX))),
                HEADERS => {
                    // Skip the pad length and priority fields when flagged.
                    let mut block = payload;
                    let mut pad = 0;
                    if flags & 0x8 != 0 {
                        pad = usize::from(*block.first().unwrap_or(&0));
                        block = block.get(1..).unwrap_or(&[]);
                    }
                    if flags & 0x20 != 0 {
                        block = block.get(5..).unwrap_or(&[]);
                    }
                    let block = block.get(..block.len().saturating_sub(pad)).unwrap_or(&[]);
                    o.responses.push((stream, response_status(block)));
                }
                DATA => {}
                _ => {}
            }
            drop(o);
            at += 9 + len;
        }
        buf.drain(..at);
    }
    seen.lock().expect("lock").closed = Some("reader gave up after a minute".to_owned());
}

// ---------------------------------------------------------------------------------
// The attacks (each returns what it saw and what was wrong; the tests assert)
// ---------------------------------------------------------------------------------

/// What one attack saw (a line for the report) and the defences that failed.
struct Outcome {
    line: String,
    problems: Vec<String>,
}

impl Outcome {
    fn new(line: String, problems: Vec<String>) -> Outcome {
        eprintln!("h2abuse: {line}");
        Outcome { line, problems }
    }
}

/// Fails the test with every problem of every outcome (and `more`), if any.
#[track_caller]
fn assert_defended(outcomes: &[Outcome], more: &[String]) {
    let mut report = String::new();
    for o in outcomes.iter().filter(|o| !o.problems.is_empty()) {
        report += &format!("\n  {}\n    - {}", o.line, o.problems.join("\n    - "));
    }
    if !more.is_empty() {
        report += &format!("\n  besides:\n    - {}", more.join("\n    - "));
    }
    assert!(report.is_empty(), "HTTP/2 abuse not defended:{report}");
}

/// Opens up to [`RAPID_STREAMS`] streams, each HEADERS (a complete GET) at once
/// followed by RST_STREAM(CANCEL), [`RAPID_BATCH`] pairs per write, until the server
/// ends the connection.
async fn rapid_reset(site: &Site, tag: &str) -> Outcome {
    let prefix = format!("/attack/{tag}/");
    let mut a = Attacker::connect(site).await;
    let start = Instant::now();
    let mut sent = 0usize;
    let mut write_error = None;
    while sent < RAPID_STREAMS && start.elapsed() < ATTACK_TIME && !a.ended() {
        let mut batch = Vec::with_capacity(RAPID_BATCH * 64);
        for _ in 0..RAPID_BATCH.min(RAPID_STREAMS - sent) {
            let id = u32::try_from(2 * sent + 1).expect("stream id");
            let block = request_block(&format!("{prefix}{id}"));
            frame(&mut batch, HEADERS, END_STREAM | END_HEADERS, id, &block);
            frame(&mut batch, RST_STREAM, 0, id, &CANCEL.to_be_bytes());
            sent += 1;
        }
        if let Err(e) = a.send(&batch).await {
            write_error = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    let o = a.wait(|o| o.goaway.is_some()).await;
    // Requests the server did hand on are given time to reach the back end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forwarded = site.backend_count(&prefix);
    let calm = match &o.goaway {
        Some(g) if g.code == ENHANCE_YOUR_CALM => " (ENHANCE_YOUR_CALM, as expected)",
        Some(_) => " (not ENHANCE_YOUR_CALM)",
        None => "",
    };
    let line = format!(
        "rapid reset [{tag}]: {sent} streams opened+cancelled in {elapsed:?} (write error: {}); \
         back end got {forwarded}; server: {}{calm}",
        write_error.as_deref().unwrap_or("none"),
        o.summary()
    );
    let mut problems = reset_problems(&o, sent, forwarded);
    if let Some(g) = &o.goaway {
        if g.last_stream as usize >= 2 * RAPID_GOAWAY_BEFORE {
            problems.push(format!(
                "the server processed streams up to {} before GOAWAY",
                g.last_stream
            ));
        }
    }
    Outcome::new(line, problems)
}

/// The bar for both rapid-reset attacks: GOAWAY before
/// [`RAPID_GOAWAY_BEFORE`] streams were sent, and the back end never made to start
/// more cancelled requests than one connection's budget: the cancellations tolerated
/// before GOAWAY plus one full set of concurrent streams.
fn reset_problems(o: &Observed, sent: usize, forwarded: usize) -> Vec<String> {
    let mut problems = Vec::new();
    // Any code: the report notes it (h2's own defence sends ENHANCE_YOUR_CALM; one
    // built on hyper's graceful shutdown would send NO_ERROR).
    if o.goaway.is_none() {
        problems.push("no GOAWAY".to_owned());
    }
    if sent > RAPID_GOAWAY_BEFORE {
        problems.push(format!(
            "the attacker got to open and cancel {sent} streams (GOAWAY must come within \
             {RAPID_GOAWAY_BEFORE})"
        ));
    }
    let budget =
        h2_limits::MAX_CANCELLED_STREAMS as usize + h2_limits::MAX_CONCURRENT_STREAMS as usize;
    if forwarded > budget {
        problems.push(format!(
            "{forwarded} of {sent} cancelled requests reached the back end (at most \
             {budget} may: one connection's cancellation budget plus its concurrent streams)"
        ));
    }
    problems
}

/// Streams the paced rapid-reset attacker opens (and cancels) at most.
const PACED_STREAMS: usize = 3000;

/// Rapid reset paced to slip under the "reset before accepted" count: each stream's
/// HEADERS (a complete GET) in one TLS record, a pause of about a millisecond (a
/// 100 µs tokio sleep, which rounds up to the timer's 1 ms tick), then its
/// RST_STREAM(CANCEL) in another record, so that the server has accepted the stream
/// and handed it to the proxy before the reset arrives. Up to [`PACED_STREAMS`]
/// streams, [`ATTACK_TIME`] at most. `slow` is the back end, which answers slowly:
/// its peak of requests in flight is what one connection made it carry at once.
async fn paced_rapid_reset(site: &Site, slow: &SlowBackend, tag: &str) -> Outcome {
    let prefix = format!("/attack/{tag}/");
    let mut a = Attacker::connect(site).await;
    let start = Instant::now();
    let mut sent = 0usize;
    let mut write_error = None;
    while sent < PACED_STREAMS && start.elapsed() < ATTACK_TIME && !a.ended() {
        let id = u32::try_from(2 * sent + 1).expect("stream id");
        let mut headers = Vec::new();
        let block = request_block(&format!("{prefix}{id}"));
        frame(&mut headers, HEADERS, END_STREAM | END_HEADERS, id, &block);
        if let Err(e) = a.send(&headers).await {
            write_error = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
        let mut reset = Vec::new();
        frame(&mut reset, RST_STREAM, 0, id, &CANCEL.to_be_bytes());
        if let Err(e) = a.send(&reset).await {
            write_error = Some(e);
            break;
        }
        sent += 1;
    }
    let elapsed = start.elapsed();
    // A server that defends has long sent GOAWAY by now; a second is plenty.
    let o = a
        .wait_at_most(Duration::from_secs(1), |o| o.goaway.is_some())
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forwarded = site.backend_count(&prefix);
    let peak = slow.max_in_flight();
    let line = format!(
        "paced rapid reset [{tag}]: {sent} streams opened+cancelled in {elapsed:?} (write \
         error: {}); back end got {forwarded}, at most {peak} at once (the normal client's \
         included; the connection's stream limit is {MAX_STREAMS}); server: {}",
        write_error.as_deref().unwrap_or("none"),
        o.summary()
    );
    let mut problems = reset_problems(&o, sent, forwarded);
    // One more for the normal client's request.
    if peak > MAX_STREAMS + 1 {
        problems.push(format!(
            "one connection had {peak} requests in flight at the back end at once, above \
             its {MAX_STREAMS}-stream limit"
        ));
    }
    Outcome::new(line, problems)
}

/// HEADERS without END_HEADERS, then CONTINUATION frames of `frame_len` bytes that
/// never end the block, up to [`FLOOD_BYTES`] of header block in all: header fields
/// `x-flood-N: <200 x a>` one after another, cut at frame boundaries.
async fn continuation_flood(site: &Site, tag: &str, frame_len: usize) -> Outcome {
    let prefix = format!("/attack/{tag}/");
    let mut block = request_block(&format!("{prefix}1"));
    let value = [b'a'; 200];
    for i in 0..FLOOD_BYTES {
        if block.len() >= FLOOD_BYTES {
            break;
        }
        literal_new_name(&mut block, format!("x-flood-{i}").as_bytes(), &value);
    }
    block.truncate(FLOOD_BYTES);

    let mut a = Attacker::connect(site).await;
    let start = Instant::now();
    let (mut frames, mut bytes) = (0usize, 0usize);
    let mut write_error = None;
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let chunks: Vec<&[u8]> = block.chunks(frame_len).collect();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.iter().enumerate() {
        if i == 0 {
            frame(&mut batch, HEADERS, END_STREAM, 1, chunk);
        } else {
            frame(&mut batch, CONTINUATION, 0, 1, chunk);
        }
        batch_bytes += chunk.len();
        if batch.len() < 16 * 1024 && i != last {
            continue;
        }
        if a.ended() || start.elapsed() > ATTACK_TIME {
            break;
        }
        if let Err(e) = a.send(&batch).await {
            write_error = Some(e);
            break;
        }
        frames = i + 1;
        bytes += batch_bytes;
        batch.clear();
        batch_bytes = 0;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    let o = a
        .wait(|o| o.goaway.is_some() || o.reset_of(1).is_some())
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let forwarded = site.backend_count(&prefix);
    let line = format!(
        "CONTINUATION flood [{tag}], {frame_len}-byte frames: sent {frames} frames, \
         {bytes} of {} header-block bytes in {elapsed:?} (write error: {}); back end got \
         {forwarded}; server: {}",
        block.len(),
        write_error.as_deref().unwrap_or("none"),
        o.summary()
    );
    let mut problems = Vec::new();
    if o.goaway.is_none() && o.reset_of(1).is_none() && o.closed.is_none() {
        problems.push("no GOAWAY, RST_STREAM or close".to_owned());
    }
    if bytes >= block.len() {
        problems.push(format!(
            "the server took the whole {}-byte flood before stopping it",
            block.len()
        ));
    }
    if forwarded != 0 {
        problems.push(format!(
            "{forwarded} requests of the flood reached the back end"
        ));
    }
    Outcome::new(line, problems)
}

/// How the oversized header list is made.
#[derive(Clone, Copy, Debug)]
enum Oversized {
    /// One `x-big` header with a 70,000-byte value.
    OneValue,
    /// 1,000 headers `x-f-NNNN` with 60-byte values (about 100 KB decoded).
    ManyFields,
}

/// One GET whose decoded header list is above 64 KiB, in HEADERS + CONTINUATION
/// frames of at most 16 KiB; then (informational) a small GET on the same connection.
async fn oversized_headers(site: &Site, tag: &str, how: Oversized) -> Outcome {
    let prefix = format!("/attack/{tag}/");
    let mut block = request_block(&format!("{prefix}1"));
    match how {
        Oversized::OneValue => literal_new_name(&mut block, b"x-big", &[b'a'; 70_000]),
        Oversized::ManyFields => {
            for i in 0..1000 {
                literal_new_name(&mut block, format!("x-f-{i:04}").as_bytes(), &[b'b'; 60]);
            }
        }
    }
    let mut a = Attacker::connect(site).await;
    let mut bytes = Vec::new();
    header_frames(&mut bytes, 1, &block, MAX_FRAME);
    let write_error = a.send(&bytes).await.err();
    a.wait(|o| o.goaway.is_some() || o.reset_of(1).is_some() || o.response_of(1).is_some())
        .await;
    // Give the server a moment to follow a 431 with RST_STREAM / GOAWAY.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let o_after = a.observed();

    // Informational: does the same connection still serve a normal request?
    let mut after = "not tried (connection ended)".to_owned();
    if !o_after.ended() {
        let mut small = Vec::new();
        let block = request_block(&format!("/after-oversized/{tag}"));
        frame(&mut small, HEADERS, END_STREAM | END_HEADERS, 3, &block);
        after = match a.send(&small).await {
            Err(e) => e,
            Ok(()) => {
                let o = a
                    .wait(|o| o.response_of(3).is_some() || o.reset_of(3).is_some())
                    .await;
                match (o.response_of(3), o.reset_of(3)) {
                    (Some(status), _) => format!("answered {status:?}"),
                    (None, Some(code)) => format!("RST_STREAM {}", reason(code)),
                    (None, None) => format!("no answer ({})", o.summary()),
                }
            }
        };
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let forwarded = site.backend_count(&prefix);
    let line = format!(
        "oversized header list [{tag}] {how:?} ({} encoded bytes, {} frames; write error: \
         {}): back end got {forwarded}; server: {}; a small request after it on the same \
         connection: {after}",
        block.len(),
        block.len().div_ceil(MAX_FRAME),
        write_error.as_deref().unwrap_or("none"),
        o_after.summary()
    );
    let status = o_after.response_of(1).flatten();
    let refused = matches!(status, Some(s) if s >= 400)
        || o_after.reset_of(1).is_some()
        || o_after.goaway.as_ref().is_some_and(|g| g.code != NO_ERROR)
        || o_after.closed.is_some();
    let mut problems = Vec::new();
    if !refused {
        problems.push(format!(
            "a header list above {MAX_HEADER_LIST} bytes was not refused (431, RST_STREAM, \
             GOAWAY or close)"
        ));
    }
    if matches!(status, Some(s) if s < 400) {
        problems.push(format!("the oversized request was answered {status:?}"));
    }
    if forwarded != 0 {
        problems.push(format!(
            "the oversized request reached the back end {forwarded} times"
        ));
    }
    Outcome::new(line, problems)
}

/// Runs `attack` with a normal client going before, during and after it; then
/// asserts that every attack was defended, that the normal client got 200 from the
/// back end every time, and that the process's RSS grew by less than
/// [`RSS_BOUND_KIB`].
async fn with_normal_client<F>(site: &Site, what: &str, attack: F)
where
    F: std::future::Future<Output = Vec<Outcome>>,
{
    let (rss_before, _) = rss_kib();
    let normal = NormalClient::start(site).await;
    let ok_before = normal.ok();
    let outcomes = attack.await;
    let ok_during = normal.ok() - ok_before;
    let (ok, mut problems) = normal.finish(5).await;
    let (rss_after, hwm) = rss_kib();
    let normal_seen = site.backend_count("/normal/");
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!(
        "h2abuse: {what}: normal client {ok} x 200 ({ok_during} completed while the attack \
         ran, counting the checks after it), back end saw {normal_seen} of them; RSS \
         {rss_before} -> {rss_after} KiB (+{growth} KiB), peak {hwm} KiB"
    );
    if normal_seen != ok {
        problems.push(format!(
            "the back end saw {normal_seen} normal requests, the client got {ok} answers"
        ));
    }
    if growth >= RSS_BOUND_KIB {
        problems.push(format!(
            "RSS grew from {rss_before} to {rss_after} KiB during {what}"
        ));
    }
    assert_defended(&outcomes, &problems);
}

// ---------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_ends_in_goaway_and_a_normal_client_is_unaffected() {
    let site = Site::start().await;
    with_normal_client(&site, "rapid reset", async {
        vec![rapid_reset(&site, "rapid").await]
    })
    .await;
}

/// Rapid reset paced at about one stream per millisecond (see [`paced_rapid_reset`]):
/// the same bar as above. Against a back end that takes a second per request this
/// shows whether resets let one connection exceed its concurrent-stream limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_rapid_reset_ends_in_goaway_and_a_normal_client_is_unaffected() {
    let (site, slow) = Site::slow(Duration::from_secs(1)).await;
    with_normal_client(&site, "paced rapid reset", async {
        vec![paced_rapid_reset(&site, &slow, "paced").await]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_ends_in_goaway_and_a_normal_client_is_unaffected() {
    let site = Site::start().await;
    with_normal_client(&site, "CONTINUATION flood", async {
        vec![
            // Many small frames: caught by the count of CONTINUATION frames.
            continuation_flood(&site, "cont-small", 256).await,
            // Full-size frames: the header list passes 64 KiB within a few frames.
            continuation_flood(&site, "cont-large", MAX_FRAME).await,
        ]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_list_is_refused_and_a_normal_client_is_unaffected() {
    let site = Site::start().await;
    with_normal_client(&site, "oversized header list", async {
        vec![
            oversized_headers(&site, "big-value", Oversized::OneValue).await,
            oversized_headers(&site, "many-fields", Oversized::ManyFields).await,
        ]
    })
    .await;
}

/// Six rounds of all the attacks at once (rapid reset, both CONTINUATION floods, both
/// oversized header lists, each on its own connection) while a normal client runs:
/// RSS and its peak stay within [`RSS_BOUND_KIB`] of where they started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_through_repeated_concurrent_floods() {
    const ROUNDS: usize = 6;
    let site = Site::start().await;
    let normal = NormalClient::start(&site).await;
    let (base, _) = rss_kib();
    let mut first = 0;
    let mut outcomes = Vec::new();
    for round in 0..ROUNDS {
        let tags = [
            "rapid",
            "cont-small",
            "cont-large",
            "big-value",
            "many-fields",
        ]
        .map(|what| format!("r{round}-{what}"));
        let (a, b, c, d, e) = tokio::join!(
            rapid_reset(&site, &tags[0]),
            continuation_flood(&site, &tags[1], 256),
            continuation_flood(&site, &tags[2], MAX_FRAME),
            oversized_headers(&site, &tags[3], Oversized::OneValue),
            oversized_headers(&site, &tags[4], Oversized::ManyFields),
        );
        outcomes.extend([a, b, c, d, e]);
        let (rss, hwm) = rss_kib();
        eprintln!("h2abuse: memory: after round {round}: RSS {rss} KiB, peak {hwm} KiB");
        if round == 0 {
            // The first round also pays for one-off allocations (connection pools,
            // TLS session state, task slabs).
            first = rss;
        }
    }
    let (ok, mut problems) = normal.finish(5).await;
    let (rss, hwm) = rss_kib();
    eprintln!(
        "h2abuse: memory: {ROUNDS} rounds of 5 concurrent attacks: RSS {base} -> {rss} KiB \
         (+{} KiB; +{} KiB after the first round), peak {hwm} KiB (+{} KiB over the \
         start); normal client {ok} x 200",
        rss.saturating_sub(base),
        rss.saturating_sub(first),
        hwm.saturating_sub(base)
    );
    if rss.saturating_sub(base) >= RSS_BOUND_KIB {
        problems.push(format!("RSS grew from {base} to {rss} KiB"));
    }
    if hwm.saturating_sub(base) >= RSS_BOUND_KIB {
        problems.push(format!(
            "peak RSS {hwm} KiB is {RSS_BOUND_KIB} KiB or more above the start ({base} KiB)"
        ));
    }
    let normal_seen = site.backend_count("/normal/");
    if normal_seen != ok {
        problems.push(format!(
            "the back end saw {normal_seen} normal requests, the client got {ok} answers"
        ));
    }
    assert_defended(&outcomes, &problems);
}
