//! End-to-end: PROXY protocol on a listener with `proxy_protocol = true`. The source
//! address of a v1 or v2 header becomes the client address: the back end sees it in
//! `X-Forwarded-For` and `X-Real-IP` (replacing what the client sent) and it decides
//! the `trusted_proxies` check; `UNKNOWN` and `LOCAL` keep the TCP peer. A connection
//! without a valid header, or stalling mid-header past `header_timeout`, is dropped
//! unanswered and nothing reaches a back end. The header may precede a TLS handshake.
//! A listener without the key treats a PROXY line as a bad request.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config_listener, fill, raw_until_closed, Backend, Balancer, Client, STEP};
use http::StatusCode;

/// One pool `web` with the back end `app` behind a catch-all route, then `extra`.
fn tables(extra: &str) -> String {
    format!(
        r#"
[[routes]]
pool = "web"

[pools.web]
backends = [{{ name = "app", address = "{{{{app}}}}" }}]

{extra}
"#
    )
}

/// The balancer with `proxy_protocol` set as given on its public listener.
async fn start(app: &Backend, proxy_protocol: bool, top: &str, extra: &str) -> Balancer {
    let listener = format!("proxy_protocol = {proxy_protocol}");
    let text = config_listener(top, &listener, &tables(extra));
    Balancer::start(&fill(&text, &[app])).await
}

/// A v2 PROXY header (TCP over IPv4 or IPv6) from `src` to `dst`, with `tlvs` after.
fn v2(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let fam = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            body.extend(s.ip().octets());
            body.extend(d.ip().octets());
            0x11
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            body.extend(s.ip().octets());
            body.extend(d.ip().octets());
            0x21
        }
        _ => panic!("one family"),
    };
    body.extend(src.port().to_be_bytes());
    body.extend(dst.port().to_be_bytes());
    body.extend(tlvs);
    v2_raw(0x21, fam, &body)
}

/// A v2 header with the given version/command and family bytes and `body`.
fn v2_raw(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([ver_cmd, fam]);
    h.extend(u16::try_from(body.len()).expect("short").to_be_bytes());
    h.extend(body);
    h
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// Two requests on one connection that starts with `header`, each sending its own
/// `X-Forwarded-For`; asserts the back end saw `client` as the client both times.
async fn assert_client(app: &Backend, to: SocketAddr, header: &[u8], client: &str) {
    let mut c = Client::with_preamble(to, header).await;
    for i in 0..2 {
        let r = c.get_with("/", &[("x-forwarded-for", "6.6.6.6")]).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{client} request {i}: {}",
            r.text()
        );
        let seen = app.last();
        assert_eq!(seen.all("x-forwarded-for"), [client], "request {i}");
        assert_eq!(seen.all("x-real-ip"), [client], "request {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_source_becomes_x_forwarded_for_on_every_request() {
    let app = Backend::start("app").await;
    let lb = start(&app, true, "", "").await;
    let v1 = b"PROXY TCP4 203.0.113.7 192.0.2.80 51000 80\r\n";
    assert_client(&app, lb.v4, v1, "203.0.113.7").await;
    let v1_tcp6 = b"PROXY TCP6 2001:db8::9 2001:db8::1 51000 443\r\n";
    assert_client(&app, lb.v4, v1_tcp6, "2001:db8::9").await;
    let v2_v6 = v2(addr("[2001:db8::42]:40000"), addr("[2001:db8::1]:443"), &[]);
    assert_client(&app, lb.v6, &v2_v6, "2001:db8::42").await;
    // TLVs (ALPN "h2", a NOOP) are skipped.
    let tlvs = [1, 0, 2, b'h', b'2', 4, 0, 1, 0];
    let v2_v4 = v2(addr("198.51.100.23:1234"), addr("192.0.2.80:80"), &tlvs);
    assert_client(&app, lb.v6, &v2_v4, "198.51.100.23").await;
    assert_eq!(app.count(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_local_keep_the_tcp_peer_as_the_client() {
    let app = Backend::start("app").await;
    let lb = start(&app, true, "", "").await;
    assert_client(&app, lb.v4, b"PROXY UNKNOWN\r\n", "127.0.0.1").await;
    assert_client(&app, lb.v6, &v2_raw(0x20, 0x00, &[]), "::1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_are_checked_against_the_header_source() {
    let app = Backend::start("app").await;
    // The TCP peer (loopback) is trusted but the client named by the header is not:
    // the client's own X-Forwarded-For is dropped.
    let lb = start(
        &app,
        true,
        r#"trusted_proxies = ["127.0.0.0/8", "::1/128"]"#,
        "",
    )
    .await;
    let v1 = b"PROXY TCP4 203.0.113.7 192.0.2.80 51000 80\r\n";
    assert_client(&app, lb.v4, v1, "203.0.113.7").await;
    // The header's source is trusted: its X-Forwarded-For is kept and it is appended.
    let lb = start(&app, true, r#"trusted_proxies = ["203.0.113.0/24"]"#, "").await;
    let mut c = Client::with_preamble(lb.v6, v1).await;
    let r = c.get_with("/", &[("x-forwarded-for", "6.6.6.6")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(app.last().all("x-forwarded-for"), ["6.6.6.6, 203.0.113.7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_valid_header_is_dropped_before_any_request() {
    let app = Backend::start("app").await;
    let lb = start(&app, true, "", "").await;
    let get = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let v4 = v2(addr("198.51.100.23:1234"), addr("192.0.2.80:80"), &[]);
    let mut bad_version = v4.clone();
    bad_version[12] = 0x11;
    let cases: [(&str, Vec<u8>); 5] = [
        ("no header", get.to_vec()),
        (
            "port 65536",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 80\r\n".to_vec(),
        ),
        (
            "two spaces",
            b"PROXY TCP4  192.0.2.1 192.0.2.2 1 80\r\n".to_vec(),
        ),
        ("LF only", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 80\n".to_vec()),
        ("v2 version 1", bad_version),
    ];
    for (what, header) in cases {
        for to in [lb.v4, lb.v6] {
            let answer = raw_until_closed(to, &[&header[..], get].concat()).await;
            assert_eq!(answer, "", "{what} on {to}: the balancer answered");
        }
    }
    assert_eq!(app.count(), 0, "a request reached the back end");
    // The listener still serves well-formed connections.
    assert_client(&app, lb.v4, &v4, "198.51.100.23").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_stalling_past_header_timeout_is_dropped() {
    let app = Backend::start("app").await;
    let lb = start(&app, true, "", "[limits]\nheader_timeout = \"1s\"").await;
    let started = Instant::now();
    let answer = raw_until_closed(lb.v4, b"PROXY TCP4 192.0.2.1 ").await;
    let waited = started.elapsed();
    assert_eq!(answer, "");
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    assert!(waited < STEP, "closed after {waited:?}");
    assert_eq!(app.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_without_proxy_protocol_answers_a_proxy_line_400() {
    let app = Backend::start("app").await;
    let lb = start(&app, false, "", "").await;
    let bytes = b"PROXY TCP4 203.0.113.7 192.0.2.80 51000 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n";
    for to in [lb.v4, lb.v6] {
        let answer = raw_until_closed(to, bytes).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{to}: {answer:?}");
    }
    assert_eq!(app.count(), 0, "a request reached the back end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_may_precede_a_tls_handshake() {
    use tokio::io::AsyncWriteExt;
    let app = Backend::start("app").await;
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["blog.example.org".to_owned()]).expect("params");
    let cert = params.self_signed(&key).expect("self-sign");
    let dir = tempfile::tempdir().expect("tempdir");
    let (pem, pkey) = (dir.path().join("c.pem"), dir.path().join("c.key"));
    std::fs::write(&pem, cert.pem()).expect("write cert");
    std::fs::write(&pkey, key.serialize_pem()).expect("write key");
    let tls = format!(
        "[listeners.tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n",
        pem.display().to_string(),
        pkey.display().to_string()
    );
    // `[listeners.tls]` must follow the listener's own keys, before the routes.
    let text = config_listener("", "proxy_protocol = true", &format!("{tls}{}", tables("")));
    let lb = Balancer::start(&fill(&text, &[&app])).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = tokio::net::TcpStream::connect(lb.v4)
        .await
        .expect("connect");
    let header = v2(addr("[2001:db8::77]:5555"), addr("[2001:db8::1]:443"), &[]);
    tcp.write_all(&header).await.expect("write header");
    let name = rustls::pki_types::ServerName::try_from("blog.example.org").expect("name");
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp);
    let mut tls = tokio::time::timeout(STEP, handshake)
        .await
        .expect("handshake in time")
        .expect("TLS handshake after the PROXY header");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: blog.example.org\r\nConnection: close\r\n\r\n")
        .await
        .expect("write request");
    let mut answer = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut answer);
    let _ = tokio::time::timeout(STEP, read)
        .await
        .expect("answer in time");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(app.last().all("x-forwarded-for"), ["2001:db8::77"]);
    assert_eq!(app.last().all("x-forwarded-proto"), ["https"]);
}
