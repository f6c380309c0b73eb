//! Bytes → HTTP/1 request head (httparse, as hyper parses it) → `http::Request<()>` →
//! what the balancer does with a head before it touches a pool: the strict checks
//! (`launchday::strict::check`), then `Proxy::respond`'s steps: the host (URI
//! authority, else `Host`), the TLS misdirected-request check (`certs::select` for
//! the host and for the SNI), routing (`Router::route`), classification
//! (`proxy::class_of`), the header rewrite for the back end
//! (`headers::rewrite_request`) and the maintenance page's encoding
//! (`maintenance::negotiate`).
//!
//! The `Verdict` `strict::check` gets is the real one: the bytes go through
//! `conn::ClientIo` (whole, and split into 1- and 7-byte reads) and `Track::begin`
//! returns what its raw scan found, which must agree with the header names httparse
//! parsed (a head the scan reads differently from hyper is a smuggling hole).
//!
//! Never panics; every refusal can be sent as `X-Launchday-Error`; an accepted head
//! keeps the promises of `src/strict.rs`; routing only names configured pools; the
//! rewrite leaves no hop-by-hop header and the forwarding headers we own.

#![no_main]

use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use launchday::config::{self, Snapshot};
use launchday::conn::{ClientIo, Deadlines, Track, Verdict};
use launchday::headers::{self, Forwarded, TlsInfo};
use launchday::route::{strip_port, Router};
use launchday::tls::certs;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod common;

/// The balancer this target routes with: exact, wildcard and IP-literal hosts, path
/// prefixes, a forced write class, a maintenance pool, no catch-all (so some heads
/// get no route), a TLS listener with two certificates, and small limits.
const CONFIG: &str = r#"
[admin]
listen = []

[[listeners]]
name = "public"
bind = ["[::1]:0"]

[[listeners]]
name = "secure"
bind = ["[::1]:0"]
[listeners.tls]
certificates = [
  { cert = "site.pem", key = "site.key" },
  { cert = "other.pem", key = "other.key" },
]

[[routes]]
host = "blog.example.org"
pool = "blog"

[[routes]]
host = "blog.example.org"
path_prefix = "/wp-admin"
pool = "admin"
class = "write"

[[routes]]
host = "*.example.org"
pool = "blog"

[[routes]]
host = "[2001:db8::1]"
pool = "admin"

[[routes]]
path_prefix = "/forums/"
pool = "forums"

[[routes]]
host = "shop.example.net"
path_prefix = "/api"
pool = "forums"

[pools.blog]
backends = [{ name = "b1", address = "[2001:db8::10]:80" }]

[pools.admin]
backends = [{ name = "a1", address = "[2001:db8::11]:80" }]

[pools.forums]
maintenance = true

[limits]
max_uri_bytes = 1024
max_body_bytes = 1048576
"#;

struct Balancer {
    snapshot: Snapshot,
    router: Router,
    trusted: Forwarded,
    untrusted: Forwarded,
}

fn balancer() -> &'static Balancer {
    static B: OnceLock<Balancer> = OnceLock::new();
    B.get_or_init(|| {
        let snapshot = config::load_str(CONFIG, common::fixtures(), None)
            .unwrap_or_else(|e| panic!("fuzz config: {e}"));
        let router = Router::new(&snapshot.routes);
        let fwd = |trusted: bool| {
            let peer = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99));
            Forwarded {
                peer,
                peer_ip: HeaderValue::from_str(&peer.to_string()).expect("peer ip"),
                trusted,
                proto: HeaderValue::from_static("https"),
                listener: Arc::from("secure"),
                tls: Some(TlsInfo {
                    sni: Some("blog.example.org".into()),
                }),
                track: None,
            }
        };
        Balancer {
            snapshot,
            router,
            trusted: fwd(true),
            untrusted: fwd(false),
        }
    })
}

/// The head as hyper would hand it to the service, or `None` where hyper answers 400
/// (or 431) itself.
fn request(data: &[u8]) -> Option<Request<()>> {
    let mut slots = [httparse::EMPTY_HEADER; 100];
    let mut parsed = httparse::Request::new(&mut slots);
    let httparse::Status::Complete(_) = parsed.parse(data).ok()? else {
        return None;
    };
    let version = match parsed.version? {
        0 => Version::HTTP_10,
        1 => Version::HTTP_11,
        _ => return None,
    };
    let mut req = Request::builder()
        .method(Method::from_bytes(parsed.method?.as_bytes()).ok()?)
        .uri(parsed.path?.parse::<Uri>().ok()?)
        .version(version)
        .body(())
        .ok()?;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        req.headers_mut().append(name, value);
    }
    // hyper drops Content-Length when Transfer-Encoding is there; `conn`'s raw scan
    // is what still sees both.
    if req.headers().contains_key(header::TRANSFER_ENCODING) {
        req.headers_mut().remove(header::CONTENT_LENGTH);
    }
    Some(req)
}

/// What `conn`'s raw scan of the head should report: the header names httparse saw.
fn expected_verdict(data: &[u8]) -> Verdict {
    let mut slots = [httparse::EMPTY_HEADER; 100];
    let mut parsed = httparse::Request::new(&mut slots);
    let _ = parsed.parse(data);
    let has = |name: &str| {
        parsed
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name))
    };
    Verdict {
        content_length: has("content-length"),
        transfer_encoding: has("transfer-encoding"),
    }
}

/// A client that sends `data` in reads of at most `step` bytes, then closes; never
/// pending, so `ClientIo` never arms a timer (no runtime needed).
struct Client<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Client<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The verdict the service gets for a connection that sent `data` in `step`-byte reads.
fn scanned_verdict(data: &[u8], step: usize) -> Verdict {
    let track = Track::new(Deadlines {
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        park_after: Duration::from_secs(60),
    });
    let mut io = ClientIo::new(Client { data, step }, Arc::clone(&track));
    let mut cx = Context::from_waker(Waker::noop());
    let mut buf = [0u8; 4096];
    loop {
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut io).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => break,
            Poll::Ready(Ok(())) => {}
            other => panic!("reading from memory: {other:?}"),
        }
    }
    track.begin()
}

fuzz_target!(|data: &[u8]| {
    let Some(req) = request(data) else { return };
    let b = balancer();
    let s = &b.snapshot;
    let expected = expected_verdict(data);
    let verdict = scanned_verdict(data, data.len().max(1));
    assert_eq!(verdict, expected, "the raw scan disagrees with httparse");
    for step in [1, 7] {
        assert_eq!(
            scanned_verdict(data, step),
            expected,
            "in {step}-byte reads"
        );
    }

    let accepted = match launchday::strict::check(&req, verdict, &s.limits) {
        Ok(()) => true,
        Err(reject) => {
            // `proxy::refuse` sends the code with `HeaderValue::from_static`.
            assert!(
                HeaderValue::from_str(reject.code).is_ok() && !reject.code.is_empty(),
                "{reject:?}"
            );
            assert!(reject.status.is_client_error(), "{reject:?}");
            false
        }
    };
    if accepted {
        let h = req.headers();
        assert!(
            h.get_all(header::HOST).iter().count() <= 1,
            "two Hosts accepted"
        );
        if req.version() == Version::HTTP_11 {
            assert!(
                h.contains_key(header::HOST),
                "HTTP/1.1 without Host accepted"
            );
        }
        assert!(
            !verdict.ambiguous_framing(),
            "Content-Length with Transfer-Encoding accepted"
        );
        assert!(req.method() != Method::CONNECT, "CONNECT accepted");
    }

    // Routing and the TLS check, as `Proxy::respond` does them (done for refused heads
    // too: none of it may panic on any head hyper accepts).
    let host = launchday::proxy::request_host(&req);
    let tls = s.listeners[1].tls.as_ref().expect("TLS listener");
    if let Some(h) = host {
        let for_host = certs::select(&tls.certificates, Some(strip_port(h)), tls.default);
        assert!(for_host < tls.certificates.len());
    }
    for sni in [
        None,
        Some("blog.example.org"),
        Some("shop.example.net"),
        host,
    ] {
        assert!(certs::select(&tls.certificates, sni, tls.default) < tls.certificates.len());
    }
    let class = launchday::proxy::class_of(req.method());
    if let Some(m) = b.router.route(host, req.uri().path()) {
        assert!(
            m.pool < s.pools.len(),
            "routed to pool {} of {}",
            m.pool,
            s.pools.len()
        );
        let _ = m.class.unwrap_or(class);
    }
    let _ = launchday::maintenance::negotiate(req.headers().get(header::ACCEPT_ENCODING));

    // The rewrite for the back end.
    for fwd in [&b.trusted, &b.untrusted] {
        let mut out = req.headers().clone();
        headers::rewrite_request(&mut out, fwd, "[2001:db8::10]:80");
        for hop in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(!out.contains_key(hop), "{hop} forwarded");
        }
        assert_eq!(out.get_all("x-forwarded-proto").iter().count(), 1);
        assert_eq!(out.get("x-forwarded-proto"), Some(&fwd.proto));
        assert!(out.contains_key(header::HOST), "no Host forwarded");
        let xff: Vec<&HeaderValue> = out.get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff.len(), 1, "X-Forwarded-For: {xff:?}");
        if fwd.trusted {
            assert!(
                xff[0].as_bytes().ends_with(fwd.peer_ip.as_bytes()),
                "{xff:?}"
            );
        } else {
            assert_eq!(xff[0], &fwd.peer_ip);
            assert_eq!(out.get_all("x-real-ip").iter().count(), 1);
            assert!(
                !out.contains_key(header::FORWARDED),
                "client's Forwarded kept"
            );
        }
    }
});
