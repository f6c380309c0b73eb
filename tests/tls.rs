//! End-to-end: TLS termination. The real balancer, started in-process on port 0 with a
//! TLS listener `secure` (127.0.0.1 and [::1]; some tests add a plain listener `plain`
//! that redirects to https), presents the certificate the client's SNI names, speaks
//! HTTP/2 or HTTP/1.1 by ALPN, refuses anything older than TLS 1.2, answers 421 when a
//! request's host belongs to another certificate, adds HSTS to TLS answers, resumes
//! sessions, and replaces certificates on reload without touching open connections.
//!
//! Certificates: A is an ECDSA P-256 certificate for `blog.example.org` (rcgen); B is
//! an RSA 2048 certificate for `*.forums.example.org` (the `openssl` command line), so
//! both key types are served side by side. The client accepts any certificate (its
//! handshake signatures are still verified) and the tests compare the certificate the
//! server presented with the expected one, byte for byte.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Backend, Client, Reply, SlowBackend, STEP};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use launchday::server::Server;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, HandshakeKind, ProtocolVersion, RootCertStore,
    SignatureScheme, SupportedProtocolVersion,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const HSTS: &str = "max-age=31536000";
const BLOG: &str = "blog.example.org";
const FORUMS: &str = "*.forums.example.org";

// ---------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------

/// A self-signed certificate and its key, as PEM, and the certificate's DER.
#[derive(Clone)]
struct Cert {
    der: CertificateDer<'static>,
    pem: String,
    key: String,
}

impl Cert {
    /// ECDSA P-256, made by rcgen, valid for `names`.
    fn ecdsa(names: &[&str]) -> Cert {
        let key = rcgen::KeyPair::generate().expect("generate key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("certificate params");
        let cert = params.self_signed(&key).expect("self-sign");
        Cert {
            der: cert.der().clone(),
            pem: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// RSA 2048 (PKCS#8 key), made by `openssl req -x509`, valid for `names`.
    fn rsa(names: &[&str]) -> Cert {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (pem_path, key_path) = (tmp.path().join("c.pem"), tmp.path().join("c.key"));
        let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        let mut cmd = Command::new("openssl");
        cmd.args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=launchday test"])
        .args(["-addext", &format!("subjectAltName={}", san.join(","))])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key_path)
        .arg("-out")
        .arg(&pem_path);
        let (code, output) = run(&mut cmd, STEP);
        assert_eq!(code, Some(0), "openssl req failed:\n{output}");
        let pem = std::fs::read_to_string(&pem_path).expect("read cert");
        let key = std::fs::read_to_string(&key_path).expect("read key");
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate");
        Cert { der, pem, key }
    }

    /// Writes `STEM.pem` and `STEM.key` into `dir`.
    fn write(&self, dir: &Path, stem: &str) {
        std::fs::write(dir.join(format!("{stem}.pem")), &self.pem).expect("write cert");
        std::fs::write(dir.join(format!("{stem}.key")), &self.key).expect("write key");
    }
}

/// Runs `cmd` (stdin closed) for at most `limit`; its exit code and stdout + stderr.
fn run(cmd: &mut Command, limit: Duration) -> (Option<i32>, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn command");
    let start = Instant::now();
    let mut timed_out = true;
    for _ in 0..10_000 {
        if child.try_wait().expect("try_wait").is_some() {
            timed_out = false;
            break;
        }
        if start.elapsed() > limit {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if timed_out {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("collect output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!timed_out, "{cmd:?} took longer than {limit:?}:\n{text}");
    (out.status.code(), text)
}

// ---------------------------------------------------------------------------------
// The balancer with TLS
// ---------------------------------------------------------------------------------

/// Where the two listeners bind (TOML arrays).
#[derive(Clone, Copy)]
struct Layout {
    secure: &'static str,
    /// `None`: no plain listener.
    plain: Option<&'static str>,
}

const BOTH_FAMILIES: &str = r#"["127.0.0.1:0", "[::1]:0"]"#;

/// The TLS listener on both families, no plain listener.
const TLS_ONLY: Layout = Layout {
    secure: BOTH_FAMILIES,
    plain: None,
};

/// The config: TLS listener `secure` (A then B, `tls_extra` added to its
/// `[listeners.tls]`), maybe a plain listener `plain` redirecting to https, routes
/// for both sites to pool `web` with the one back end at `backend`.
fn site_toml(tls_extra: &str, backend: SocketAddr, layout: Layout) -> String {
    let secure = layout.secure;
    let plain = layout.plain.map_or(String::new(), |bind| {
        format!("[[listeners]]\nname = \"plain\"\nbind = {bind}\nredirect_https = true\n")
    });
    format!(
        r#"shutdown_grace = "1s"

[admin]
listen = ["127.0.0.1:0"]

[[listeners]]
name = "secure"
bind = {secure}

[listeners.tls]
certificates = [
  {{ cert = "a.pem", key = "a.key" }},
  {{ cert = "b.pem", key = "b.key" }},
]
hsts = "{HSTS}"
{tls_extra}

{plain}
[[routes]]
host = "{BLOG}"
pool = "web"

[[routes]]
host = "{FORUMS}"
pool = "web"

[pools.web]
backends = [{{ name = "web", address = "{backend}" }}]
"#
    )
}

/// A running balancer with certificates A and B in its own config directory.
struct Site {
    dir: tempfile::TempDir,
    text: String,
    a: Cert,
    b: Cert,
    server: Arc<Server>,
}

impl Site {
    /// A (ECDSA, blog) first and B (RSA, forums wildcard) second; TLS listener only.
    async fn start(tls_extra: &str, backend: SocketAddr) -> Site {
        Self::start_with(
            Cert::ecdsa(&[BLOG]),
            Cert::rsa(&[FORUMS]),
            tls_extra,
            backend,
            TLS_ONLY,
        )
        .await
    }

    /// `a` as the first certificate (`a.pem`), `b` as the second (`b.pem`).
    async fn start_with(
        a: Cert,
        b: Cert,
        tls_extra: &str,
        backend: SocketAddr,
        layout: Layout,
    ) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        a.write(dir.path(), "a");
        b.write(dir.path(), "b");
        let text = site_toml(tls_extra, backend, layout);
        let snapshot = launchday::config::load_str(&text, dir.path(), None)
            .unwrap_or_else(|e| panic!("config rejected:\n{e}\n--- config ---\n{text}"));
        let server = Server::start(snapshot, prometheus::Registry::new())
            .await
            .expect("balancer starts");
        Site {
            dir,
            text,
            a,
            b,
            server,
        }
    }

    /// The address of `listener` of the IPv4 (`v4`) or IPv6 family.
    fn addr(&self, listener: &str, v4: bool) -> SocketAddr {
        let bound = self.server.bound();
        let addr = bound
            .iter()
            .find(|b| b.listener == listener && b.addr.is_ipv4() == v4)
            .map(|b| b.addr)
            .unwrap_or_else(|| {
                panic!("listener {listener} has no address (v4: {v4}); bound: {bound:?}")
            });
        assert_ne!(addr.port(), 0);
        addr
    }

    fn v4(&self) -> SocketAddr {
        self.addr("secure", true)
    }

    fn v6(&self) -> SocketAddr {
        self.addr("secure", false)
    }

    /// Validates the config again from disk and applies it (`Server::apply`).
    async fn reload(&self) -> Result<(), launchday::config::ConfigErrors> {
        let snapshot = launchday::config::load_str(&self.text, self.dir.path(), None)?;
        self.server
            .apply(snapshot)
            .await
            .expect("apply the snapshot");
        Ok(())
    }

    /// `GET /metrics` on the admin listener.
    async fn metrics(&self) -> String {
        let admin = *self.server.admin_addrs().first().expect("admin address");
        let r = common::get(admin, "/metrics").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        r.text()
    }
}

// ---------------------------------------------------------------------------------
// The TLS client
// ---------------------------------------------------------------------------------

/// Accepts whatever certificate the server presents (the tests compare it with the
/// expected one themselves) but verifies the handshake signatures made with its key.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

static BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
static ONLY_12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
static ONLY_13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
const H2_AND_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
const H1: &[&[u8]] = &[b"http/1.1"];

/// How the client decides to trust the server.
enum Trust<'a> {
    /// Any certificate (see [`AcceptAny`]).
    Any,
    /// Real webpki verification against these roots.
    Roots(&'a [&'a Cert]),
}

/// A client config offering `versions` and ALPN `alpn`; `resume` keeps rustls's
/// default in-memory session cache, otherwise every handshake is a full one.
fn client_config(
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
    trust: Trust<'_>,
    resume: bool,
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .expect("protocol versions");
    let mut cfg = match trust {
        Trust::Any => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth(),
        Trust::Roots(certs) => {
            let mut roots = RootCertStore::empty();
            for c in certs {
                roots.add(c.der.clone()).expect("add root");
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    if !resume {
        cfg.resumption = Resumption::disabled();
    }
    Arc::new(cfg)
}

/// TLS 1.2 and 1.3, h2 and http/1.1, any certificate, no resumption.
fn any_client() -> Arc<ClientConfig> {
    client_config(BOTH, H2_AND_H1, Trust::Any, false)
}

fn dns(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_owned()).expect("DNS name")
}

/// A server name that makes rustls send no SNI at all.
fn ip(addr: SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

/// Connects to `addr` and completes the TLS handshake for `name`.
async fn connect(
    cfg: &Arc<ClientConfig>,
    addr: SocketAddr,
    name: ServerName<'static>,
) -> TlsStream<TcpStream> {
    let handshake = async {
        let tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(Arc::clone(cfg))
            .connect(name.clone(), tcp)
            .await
            .unwrap_or_else(|e| panic!("TLS handshake with {addr} for {name:?}: {e}"))
    };
    tokio::time::timeout(STEP, handshake)
        .await
        .expect("TLS handshake in time")
}

/// The end-entity certificate the server presented.
fn presented(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .clone()
        .into_owned()
}

/// Asserts that `tls` was handshaken with `expected` (by DER); `what` names the case.
#[track_caller]
fn assert_presented(tls: &TlsStream<TcpStream>, expected: &Cert, what: &str) {
    assert!(
        presented(tls) == expected.der,
        "{what}: the server presented another certificate"
    );
}

/// An HTTP client connection over TLS, HTTP/2 or HTTP/1.1 as ALPN decided.
enum Http {
    One(http1::SendRequest<Full<Bytes>>),
    Two(http2::SendRequest<Full<Bytes>>),
}

impl Http {
    async fn over(tls: TlsStream<TcpStream>) -> Http {
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        let opened = async {
            if h2 {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Http::Two(sender)
            } else {
                let (sender, conn) = http1::handshake(io).await.expect("http1 handshake");
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Http::One(sender)
            }
        };
        tokio::time::timeout(STEP, opened)
            .await
            .expect("HTTP handshake in time")
    }

    /// `GET path` for `host` (the `Host` header on HTTP/1.1, `:authority` on HTTP/2).
    async fn get(&mut self, host: &str, path: &str) -> Reply {
        let exchange = async {
            let resp = match self {
                Http::One(s) => {
                    let req = Request::get(path)
                        .header(http::header::HOST, host)
                        .body(Full::new(Bytes::new()))
                        .expect("request");
                    s.ready().await.expect("connection ready");
                    s.send_request(req).await.expect("response")
                }
                Http::Two(s) => {
                    let req = Request::get(format!("https://{host}{path}"))
                        .body(Full::new(Bytes::new()))
                        .expect("request");
                    s.ready().await.expect("connection ready");
                    s.send_request(req).await.expect("response")
                }
            };
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.expect("response body").to_bytes();
            Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        };
        tokio::time::timeout(STEP, exchange)
            .await
            .expect("answer in time")
    }
}

/// One `GET path` for `host` on a fresh TLS connection with SNI `sni`.
async fn get_over_tls(addr: SocketAddr, sni: &str, host: &str, path: &str) -> Reply {
    let tls = connect(&any_client(), addr, dns(sni)).await;
    Http::over(tls).await.get(host, path).await
}

// ---------------------------------------------------------------------------------
// 1, 2: certificate selection
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_by_name_on_both_front_ends() {
    let backend = Backend::start("web").await;
    let site = Site::start("", backend.addr).await;
    // Real verification (webpki, trusting A and B) for the names the certificates
    // cover, so the presented chains are valid for those names, not only equal.
    let verifying = client_config(BOTH, H2_AND_H1, Trust::Roots(&[&site.a, &site.b]), false);
    for addr in [site.v4(), site.v6()] {
        let cases = [
            (BLOG, &site.a),
            ("BLOG.Example.org", &site.a),
            ("x.forums.example.org", &site.b),
            ("another.forums.example.org", &site.b),
        ];
        for (name, cert) in cases {
            for cfg in [&any_client(), &verifying] {
                let tls = connect(cfg, addr, dns(name)).await;
                assert_presented(&tls, cert, &format!("SNI {name} on {addr}"));
                let before = backend.count();
                let host = name.to_ascii_lowercase();
                let r = Http::over(tls).await.get(&host, "/page?x=1").await;
                assert_eq!(r.status, StatusCode::OK, "{name} on {addr}: {}", r.text());
                assert_eq!(r.header("x-backend").as_deref(), Some("web"));
                assert_eq!(backend.count(), before + 1);
                let seen = backend.last();
                assert_eq!(seen.uri, "/page?x=1");
                assert_eq!(seen.one("host").as_deref(), Some(host.as_str()));
                assert_eq!(
                    seen.one("x-forwarded-proto").as_deref(),
                    Some("https"),
                    "X-Forwarded-Proto from a TLS listener ({addr})"
                );
            }
        }
        // One label only: `a.b.forums.example.org` is not covered by B, so it gets the
        // default (A); an unknown name gets the default too.
        for name in [
            "a.b.forums.example.org",
            "forums.example.org",
            "unknown.test",
        ] {
            let tls = connect(&any_client(), addr, dns(name)).await;
            assert_presented(&tls, &site.a, &format!("SNI {name} on {addr}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sni_the_default_certificate_is_presented() {
    let backend = Backend::start("web").await;

    let site = Site::start("", backend.addr).await;
    for addr in [site.v4(), site.v6()] {
        let tls = connect(&any_client(), addr, ip(addr)).await;
        assert_presented(&tls, &site.a, &format!("no SNI on {addr}: the first"));
        // A request for the default certificate's site on it is served.
        let r = Http::over(tls).await.get(BLOG, "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }

    let site = Site::start(
        "default_certificate = \"x.forums.example.org\"",
        backend.addr,
    )
    .await;
    for addr in [site.v4(), site.v6()] {
        let tls = connect(&any_client(), addr, ip(addr)).await;
        assert_presented(&tls, &site.b, &format!("no SNI on {addr}: the default"));
        let r = Http::over(tls).await.get("x.forums.example.org", "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        // Unknown names get the configured default too; known ones still their own.
        let tls = connect(&any_client(), addr, dns("unknown.test")).await;
        assert_presented(&tls, &site.b, "unknown SNI: the default");
        let tls = connect(&any_client(), addr, dns(BLOG)).await;
        assert_presented(&tls, &site.a, "SNI blog with another default");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_certificate_is_the_one_sni_would_choose_for_that_name() {
    // A wildcard first, then a certificate for exactly the default name. SNI for
    // blog.example.org picks the exact one (exact before wildcard); so should the
    // default, and a client without SNI asking for blog.example.org must be served,
    // not told 421.
    let backend = Backend::start("web").await;
    let wildcard = Cert::ecdsa(&["*.example.org"]);
    let exact = Cert::ecdsa(&[BLOG]);
    let site = Site::start_with(
        wildcard.clone(),
        exact.clone(),
        &format!("default_certificate = \"{BLOG}\""),
        backend.addr,
        TLS_ONLY,
    )
    .await;
    let addr = site.v4();
    let tls = connect(&any_client(), addr, dns(BLOG)).await;
    assert_presented(&tls, &exact, "SNI blog: exact before wildcard");

    let tls = connect(&any_client(), addr, ip(addr)).await;
    let no_sni = if presented(&tls) == exact.der {
        "exact"
    } else if presented(&tls) == wildcard.der {
        "wildcard"
    } else {
        "other"
    };
    let r = Http::over(tls).await.get(BLOG, "/").await;
    assert_eq!(
        (no_sni, r.status),
        ("exact", StatusCode::OK),
        "no SNI with default_certificate = {BLOG:?}: certificate presented, status of a \
         request for {BLOG} ({})",
        r.text().trim_end()
    );
}

// ---------------------------------------------------------------------------------
// 3: ALPN and HTTP/2 limits
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_chooses_h2_or_http1_and_requests_are_proxied_over_both() {
    let backend = Backend::start("web").await;
    let site = Site::start("", backend.addr).await;

    let tls = connect(&any_client(), site.v4(), dns(BLOG)).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let Http::Two(h2) = Http::over(tls).await else {
        panic!("h2 was negotiated");
    };
    // Several concurrent requests on the one connection.
    let before = backend.count();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let mut c = Http::Two(h2.clone());
            tokio::spawn(async move { c.get(BLOG, &format!("/h2/{i}")).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.expect("request task");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.header("x-backend").as_deref(), Some("web"));
    }
    assert_eq!(backend.count(), before + 20);
    let mut paths: Vec<String> = backend.requests()[before..]
        .iter()
        .map(|s| {
            assert_eq!(s.one("host").as_deref(), Some(BLOG), ":authority as Host");
            assert_eq!(s.one("x-forwarded-proto").as_deref(), Some("https"));
            s.uri.to_string()
        })
        .collect();
    paths.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("/h2/{i}")).collect();
    want.sort();
    assert_eq!(paths, want);

    // A client that offers only http/1.1 gets it.
    let h1_client = client_config(BOTH, H1, Trust::Any, false);
    let tls = connect(&h1_client, site.v6(), dns("a.forums.example.org")).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut c = Http::over(tls).await;
    assert!(matches!(c, Http::One(_)));
    for i in 0..3 {
        let r = c.get("a.forums.example.org", &format!("/h1/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(backend.last().uri, format!("/h1/{i}").as_str());
    }

    // A client that offers no ALPN at all is served HTTP/1.1.
    let no_alpn = client_config(BOTH, &[], Trust::Any, false);
    let tls = connect(&no_alpn, site.v4(), dns(BLOG)).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let r = Http::over(tls).await.get(BLOG, "/no-alpn").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// Answers ready at once (the beacon: answered in the connection's own task) and
/// answers that wait for a back end (in a task of their own), many at a time on one
/// HTTP/2 connection: every one arrives whole, whatever order they finish in (the
/// connection writes its answers together once per turn, `launchday::coalesce`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_answers_made_inline_and_in_tasks_all_arrive_on_one_connection() {
    let backend = Backend::start("web").await;
    let site = Site::start("", backend.addr).await;
    let tls = connect(&any_client(), site.v6(), dns(BLOG)).await;
    let Http::Two(h2) = Http::over(tls).await else {
        panic!("h2 was negotiated");
    };
    let before = backend.count();
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let mut c = Http::Two(h2.clone());
            tokio::spawn(async move {
                let path = if i % 3 == 0 {
                    format!("/proxied/{i}")
                } else {
                    "/.well-known/launchday/beacon".to_string()
                };
                (i, c.get(BLOG, &path).await)
            })
        })
        .collect();
    for t in tasks {
        let (i, r) = t.await.expect("request task");
        if i % 3 == 0 {
            assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
            assert_eq!(r.text(), "served by web\n", "request {i}");
        } else {
            assert_eq!(r.status, StatusCode::NO_CONTENT, "request {i}");
            assert!(r.body.is_empty());
        }
    }
    assert_eq!(backend.count(), before + 100);
}

/// TLS connections are not parked (rustls may hold decrypted bytes that the socket's
/// readiness would not show, `launchday::park`): an idle HTTP/1.1 connection over
/// TLS stays as it is and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tls_connection_is_not_parked_and_keeps_serving() {
    let backend = Backend::start("web").await;
    let site = Site::start("", backend.addr).await;
    let h1 = client_config(BOTH, H1, Trust::Any, false);
    let tls = connect(&h1, site.v4(), dns(BLOG)).await;
    let mut c = Http::over(tls).await;
    assert!(matches!(c, Http::One(_)));
    let r = c.get(BLOG, "/before").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Longer than a plain connection's parking delay (1 s).
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let parked = common::metric(
        &site.metrics().await,
        "launchday_connections_parked{listener=\"secure\"}",
    );
    assert_eq!(parked, Some(0.0));
    let r = c.get(BLOG, "/after").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(backend.last().uri, "/after");
}

/// Reads `tls` until the server closes it or `limit` passes: what came, and when the
/// close came (from `since`).
async fn read_to_close(
    tls: &mut TlsStream<TcpStream>,
    since: Instant,
    limit: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((since + limit).into(), tls.read(&mut buf)).await {
            Err(_) => return (got, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(since.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// HTTP/1.1 over TLS is served by launchday's own loop too, which keeps the
/// connection's deadlines with its one timer: a head that stalls gets its 408 at
/// `header_timeout`, and an idle keep-alive connection is closed silently at
/// `idle_timeout` (TLS connections are never parked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_keeps_the_head_and_idle_deadlines() {
    let backend = Backend::start("web").await;
    let limits = "\n[limits]\nheader_timeout = \"1s\"\nidle_timeout = \"2s\"\n";
    let site = Site::start(limits, backend.addr).await;
    let h1 = client_config(BOTH, H1, Trust::Any, false);

    // A head that never ends.
    let mut tls = connect(&h1, site.v4(), dns(BLOG)).await;
    tls.write_all(b"GET /stall HTTP/1.1\r\nHo")
        .await
        .expect("write");
    tls.flush().await.expect("flush");
    let started = Instant::now();
    let (got, closed) = read_to_close(&mut tls, started, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "stalled head got {text:?}"
    );
    let at = closed.unwrap_or_else(|| panic!("not closed: {text:?}"));
    assert!(
        at >= Duration::from_millis(750) && at <= Duration::from_millis(2500),
        "stalled head closed after {at:?}"
    );

    // A request answered, then silence.
    let mut tls = connect(&h1, site.v6(), dns(BLOG)).await;
    tls.write_all(format!("GET /once HTTP/1.1\r\nHost: {BLOG}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    tls.flush().await.expect("flush");
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(STEP, tls.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(n > 0, "closed before the answer");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(backend.last().uri, "/once");
    let idle = Instant::now();
    // The answer's body may still be arriving; then nothing more until the close.
    let (rest, closed) = read_to_close(&mut tls, idle, Duration::from_secs(6)).await;
    let at = closed.unwrap_or_else(|| panic!("idle connection not closed"));
    assert!(
        !String::from_utf8_lossy(&rest).contains("HTTP/1.1 408"),
        "idle connection got a 408"
    );
    // At idle_timeout (2 s), not at header_timeout (1 s).
    assert!(
        at >= Duration::from_millis(1750) && at <= Duration::from_millis(3500),
        "idle connection closed after {at:?}"
    );
}

/// Sends the HTTP/2 preface and an empty SETTINGS frame, and returns the server's
/// first (non-ACK) SETTINGS frame as `(identifier, value)` pairs.
async fn server_settings(tls: TlsStream<TcpStream>) -> Vec<(u16, u32)> {
    server_windows(tls).await.0
}

/// The server's first frames after the client's preface and empty SETTINGS: its
/// SETTINGS and the window increment it gives the connection (WINDOW_UPDATE on stream
/// 0), read until both came (or 16 frames).
async fn server_windows(mut tls: TlsStream<TcpStream>) -> (Vec<(u16, u32)>, u32) {
    let exchange = async {
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write preface");
        // Length 0, type SETTINGS (4), no flags, stream 0.
        tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .expect("write SETTINGS");
        tls.flush().await.expect("flush");
        let (mut settings, mut increment) = (None, 0u32);
        for _ in 0..16 {
            let mut head = [0u8; 9];
            tls.read_exact(&mut head).await.expect("frame header");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            assert!(len <= 16_384, "frame of {len} bytes");
            let mut payload = vec![0u8; len];
            tls.read_exact(&mut payload).await.expect("frame payload");
            match (head[3], head[4] & 1 == 1) {
                (4, false) => {
                    assert_eq!(len % 6, 0, "SETTINGS payload of {len} bytes");
                    settings = Some(
                        payload
                            .chunks_exact(6)
                            .map(|c| {
                                (
                                    u16::from_be_bytes([c[0], c[1]]),
                                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                                )
                            })
                            .collect::<Vec<_>>(),
                    );
                }
                (8, _) if stream == 0 && len == 4 => {
                    increment +=
                        u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                }
                _ => {}
            }
            if settings.is_some() && increment > 0 {
                break;
            }
        }
        (settings.expect("a SETTINGS frame"), increment)
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .expect("frames in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_flow_control_windows_are_set_not_library_defaults() {
    let backend = Backend::start("web").await;
    let site = Site::start("", backend.addr).await;
    let tls = connect(&any_client(), site.v4(), dns(BLOG)).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (settings, increment) = server_windows(tls).await;
    // SETTINGS_INITIAL_WINDOW_SIZE (0x4): each stream's window, 256 KiB.
    let stream_window: Vec<u32> = settings
        .iter()
        .filter(|(id, _)| *id == 0x4)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(stream_window, [256 * 1024], "in {settings:?}");
    // The connection starts at the protocol's 65,535 and is raised to 1 MiB.
    assert_eq!(65_535 + increment, 1024 * 1024, "connection window");
    // And a request body larger than one stream's window still goes through whole.
    let tls = connect(&any_client(), site.v6(), dns(BLOG)).await;
    let Http::Two(mut h2) = Http::over(tls).await else {
        panic!("h2 was negotiated");
    };
    let body = vec![b'x'; 600 * 1024];
    let req = Request::post(format!("https://{BLOG}/upload"))
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = tokio::time::timeout(STEP, h2.send_request(req))
        .await
        .expect("answer in time")
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(backend.last().body.len(), 600 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_allows_at_most_100_concurrent_streams() {
    // What the server says: SETTINGS_MAX_CONCURRENT_STREAMS (0x3) = 100.
    let slow = SlowBackend::held("slow", Duration::ZERO).await;
    let site = Site::start("", slow.addr).await;
    let tls = connect(&any_client(), site.v4(), dns(BLOG)).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let settings = server_settings(tls).await;
    let streams: Vec<u32> = settings
        .iter()
        .filter(|(id, _)| *id == 0x3)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(
        streams,
        [100],
        "SETTINGS_MAX_CONCURRENT_STREAMS in {settings:?}"
    );

    // What happens: 150 concurrent requests on one connection to a back end that holds
    // every answer; exactly 100 reach it, the rest wait for a stream, and all 150 are
    // answered once it lets go.
    let tls = connect(&any_client(), site.v6(), dns(BLOG)).await;
    let Http::Two(h2) = Http::over(tls).await else {
        panic!("h2 was negotiated");
    };
    let tasks: Vec<_> = (0..150)
        .map(|i| {
            let mut c = Http::Two(h2.clone());
            tokio::spawn(async move { c.get(BLOG, &format!("/slow/{i}")).await })
        })
        .collect();
    slow.wait_count(100).await;
    // Give any stream beyond the limit time to show up at the back end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(slow.count(), 100, "requests at the back end at once");
    assert_eq!(slow.in_flight(), 100);
    slow.release();
    for t in tasks {
        let r = t.await.expect("request task");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(slow.count(), 150);
    assert_eq!(slow.answered(), 150);
    assert!(
        slow.max_in_flight() <= 100,
        "max in flight {}",
        slow.max_in_flight()
    );
}

// ---------------------------------------------------------------------------------
// 4: protocol versions
// ---------------------------------------------------------------------------------

/// `openssl s_client` against `addr` with extra `args`; exit code and output.
fn s_client(addr: SocketAddr, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        BLOG,
    ])
    .args(args);
    run(&mut cmd, STEP)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls_12_and_13_are_accepted() {
    let backend = Backend::start("web").await;
    let site = Site::start("", backend.addr).await;
    let addr = site.v4();

    // Control: the same openssl command line does complete a TLS 1.2 handshake.
    let (code, out) = tokio::task::spawn_blocking(move || s_client(addr, &["-tls1_2"]))
        .await
        .expect("openssl task");
    assert_eq!(code, Some(0), "openssl -tls1_2 failed:\n{out}");
    assert!(out.contains("TLSv1.2"), "{out}");

    // TLS 1.1, with the security level lowered so that OpenSSL 3 really offers it.
    let (code, out) = tokio::task::spawn_blocking(move || {
        s_client(addr, &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
    })
    .await
    .expect("openssl task");
    assert_ne!(code, Some(0), "TLS 1.1 handshake succeeded:\n{out}");
    // rustls answers a TLS 1.1 hello with a fatal alert (handshake_failure: a 1.1
    // hello carries no signature_algorithms, which rustls checks first).
    assert!(
        out.contains("SSL alert number"),
        "expected a fatal alert from the server:\n{out}"
    );
    let negotiated = out
        .lines()
        .find(|l| l.contains("Cipher is"))
        .unwrap_or("Cipher is (NONE)");
    assert!(
        negotiated.contains("(NONE)") || negotiated.contains("0000"),
        "a cipher was negotiated over TLS 1.1: {negotiated}\n{out}"
    );

    // rustls clients restricted to one version each succeed, for both key types.
    for (versions, want) in [
        (ONLY_12, ProtocolVersion::TLSv1_2),
        (ONLY_13, ProtocolVersion::TLSv1_3),
    ] {
        let cfg = client_config(versions, H2_AND_H1, Trust::Any, false);
        for (name, cert) in [(BLOG, &site.a), ("x.forums.example.org", &site.b)] {
            let tls = connect(&cfg, addr, dns(name)).await;
            assert_eq!(tls.get_ref().1.protocol_version(), Some(want));
            assert_presented(&tls, cert, name);
            let r = Http::over(tls).await.get(name, "/").await;
            assert_eq!(r.status, StatusCode::OK, "{want:?} {name}: {}", r.text());
        }
    }
}

// ---------------------------------------------------------------------------------
// 5, 6: 421, redirect, HSTS
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_of_another_certificate_than_the_sni_is_misdirected() {
    let backend = Backend::start("web").await;
    let site = Site::start("", backend.addr).await;
    for addr in [site.v4(), site.v6()] {
        for client in [any_client(), client_config(BOTH, H1, Trust::Any, false)] {
            let tls = connect(&client, addr, dns(BLOG)).await;
            let mut c = Http::over(tls).await;
            let before = backend.count();
            let r = c.get("a.forums.example.org", "/").await;
            assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST, "{}", r.text());
            assert_eq!(
                r.header("x-launchday-error").as_deref(),
                Some("misdirected_request")
            );
            assert_eq!(r.header("x-served-by").as_deref(), Some("launchday"));
            assert_eq!(r.header("strict-transport-security").as_deref(), Some(HSTS));
            assert_eq!(backend.count(), before, "a 421 is never forwarded");
            // The same connection still serves its own site.
            let r = c.get(&format!("{BLOG}:443"), "/").await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            assert_eq!(backend.count(), before + 1);
        }
        // The other way round: a connection for B asked for A's site.
        let r = get_over_tls(addr, "x.forums.example.org", BLOG, "/").await;
        assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST, "{}", r.text());

        // Two names of the same certificate: not misdirected.
        let before = backend.count();
        let r = get_over_tls(addr, "x.forums.example.org", "y.forums.example.org", "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let r = get_over_tls(addr, BLOG, "Blog.Example.ORG", "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(backend.count(), before + 2);
    }
}

/// The TLS listener on [::1], the plain one on 127.0.0.1: no configured address is
/// shared, so this does not depend on how `127.0.0.1:0` twice is handled (see
/// [`a_tls_and_a_plain_listener_both_bind_port_0_on_each_family`]).
const SPLIT: Layout = Layout {
    secure: r#"["[::1]:0"]"#,
    plain: Some(r#"["127.0.0.1:0"]"#),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_listener_redirects_to_https_and_hsts_is_on_tls_answers_only() {
    let backend = Backend::start("web").await;
    let site = Site::start_with(
        Cert::ecdsa(&[BLOG]),
        Cert::rsa(&[FORUMS]),
        "",
        backend.addr,
        SPLIT,
    )
    .await;
    let plain = site.addr("plain", true);

    for (host, location) in [
        (
            "blog.example.org:8080",
            "https://blog.example.org/a/b?x=1&y=two",
        ),
        (
            "x.forums.example.org",
            "https://x.forums.example.org/a/b?x=1&y=two",
        ),
        ("[::1]:8080", "https://[::1]/a/b?x=1&y=two"),
    ] {
        let mut c = Client::connect(plain).await;
        let r = c.get_with("/a/b?x=1&y=two", &[("host", host)]).await;
        assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT, "{}", r.text());
        assert_eq!(r.header("location").as_deref(), Some(location));
        assert_eq!(
            r.header("strict-transport-security"),
            None,
            "HSTS over http"
        );
        assert_eq!(r.header("x-served-by").as_deref(), Some("launchday"));
        // Path only: the query is optional.
        let r = c.get_with("/", &[("host", host)]).await;
        assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
        let root = location
            .split_once("/a/b")
            .map(|(origin, _)| format!("{origin}/"));
        assert_eq!(r.header("location"), root);
    }
    assert_eq!(backend.count(), 0, "redirects are never forwarded");

    let secure = site.v6();
    for client in [any_client(), client_config(BOTH, H1, Trust::Any, false)] {
        let tls = connect(&client, secure, dns(BLOG)).await;
        let mut c = Http::over(tls).await;
        let r = c.get(BLOG, "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.header("strict-transport-security").as_deref(), Some(HSTS));
        // Locally generated: no route for this host.
        let r = c.get("unknown.example.net", "/").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
        assert_eq!(r.header("x-launchday-error").as_deref(), Some("no_route"));
        assert_eq!(r.header("strict-transport-security").as_deref(), Some(HSTS));
        // Answered by the balancer itself: the beacon.
        let r = c.get(BLOG, "/.well-known/launchday/beacon").await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        assert_eq!(r.header("strict-transport-security").as_deref(), Some(HSTS));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_and_a_plain_listener_both_bind_port_0_on_each_family() {
    // The usual pair (TLS listener + plain redirecting one), each on 127.0.0.1:0 and
    // [::1]:0: four sockets, four ports. `launchday check` accepts this (port 0 never
    // collides), so the server must bind all four.
    let backend = Backend::start("web").await;
    let both = Layout {
        secure: BOTH_FAMILIES,
        plain: Some(BOTH_FAMILIES),
    };
    let site = Site::start_with(
        Cert::ecdsa(&[BLOG]),
        Cert::rsa(&[FORUMS]),
        "",
        backend.addr,
        both,
    )
    .await;
    let mut seen: Vec<(String, bool)> = site
        .server
        .bound()
        .iter()
        .map(|b| (b.listener.clone(), b.addr.is_ipv4()))
        .collect();
    seen.sort();
    let want = [
        ("plain", false),
        ("plain", true),
        ("secure", false),
        ("secure", true),
    ]
    .map(|(l, v4)| (l.to_owned(), v4));
    assert_eq!(seen, want, "bound sockets: {:?}", site.server.bound());
    for v4 in [true, false] {
        let tls = connect(&any_client(), site.addr("secure", v4), dns(BLOG)).await;
        assert_presented(&tls, &site.a, "secure listener");
        let r = Client::connect(site.addr("plain", v4))
            .await
            .get_with("/x", &[("host", BLOG)])
            .await;
        assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT, "{}", r.text());
    }
}

// ---------------------------------------------------------------------------------
// 7, 8: reloads
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_replaces_the_certificate_for_new_connections_only() {
    let backend = Backend::start("web").await;
    let site = Site::start("", backend.addr).await;

    // An HTTP/2 connection (and an HTTP/1.1 one) opened before the reload.
    let tls = connect(&any_client(), site.v4(), dns(BLOG)).await;
    assert_presented(&tls, &site.a, "before the reload");
    let mut old_h2 = Http::over(tls).await;
    assert!(matches!(old_h2, Http::Two(_)));
    let tls = connect(
        &client_config(BOTH, H1, Trust::Any, false),
        site.v6(),
        dns(BLOG),
    )
    .await;
    let mut old_h1 = Http::over(tls).await;
    for c in [&mut old_h2, &mut old_h1] {
        let r = c.get(BLOG, "/before").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }

    // A new certificate for the same name, written over the old files.
    let a2 = Cert::ecdsa(&[BLOG]);
    assert!(a2.der != site.a.der);
    a2.write(site.dir.path(), "a");
    site.reload()
        .await
        .expect("reload with a renewed certificate");

    for addr in [site.v4(), site.v6()] {
        let tls = connect(&any_client(), addr, dns(BLOG)).await;
        assert_presented(
            &tls,
            &a2,
            &format!("new connection to {addr} after the reload"),
        );
        let r = Http::over(tls).await.get(BLOG, "/new").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        // Verified for real against the new certificate.
        let verifying = client_config(BOTH, H2_AND_H1, Trust::Roots(&[&a2]), false);
        connect(&verifying, addr, dns(BLOG)).await;
        // B is unchanged.
        let tls = connect(&any_client(), addr, dns("x.forums.example.org")).await;
        assert_presented(&tls, &site.b, "B after the reload");
    }

    // The connections opened before keep working, several new requests each.
    for i in 0..5 {
        for c in [&mut old_h2, &mut old_h1] {
            let r = c.get(BLOG, &format!("/after/{i}")).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            assert_eq!(backend.last().uri, format!("/after/{i}").as_str());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_mismatched_key_is_rejected_and_the_old_certificate_stays() {
    let backend = Backend::start("web").await;
    let site = Site::start("", backend.addr).await;

    // A renewed certificate copied over a.pem, but the key left as it was.
    let a2 = Cert::ecdsa(&[BLOG]);
    std::fs::write(site.dir.path().join("a.pem"), &a2.pem).expect("write cert");
    let errors = site
        .reload()
        .await
        .expect_err("a mismatched key must be rejected");
    let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        lines,
        ["listeners.secure.tls.certificates[0].key: does not match the certificate"]
    );

    // The running server still presents (and serves with) the old certificate.
    for addr in [site.v4(), site.v6()] {
        let tls = connect(&any_client(), addr, dns(BLOG)).await;
        assert_presented(&tls, &site.a, &format!("{addr} after a failed reload"));
        let r = Http::over(tls).await.get(BLOG, "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let tls = connect(&any_client(), addr, dns("x.forums.example.org")).await;
        assert_presented(&tls, &site.b, "B after a failed reload");
    }

    // A key of the wrong type (RSA for the ECDSA certificate) is the same error.
    std::fs::write(site.dir.path().join("a.pem"), &site.a.pem).expect("write cert");
    std::fs::write(site.dir.path().join("a.key"), &site.b.key).expect("write key");
    let errors = site
        .reload()
        .await
        .expect_err("an RSA key for an ECDSA certificate");
    let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        lines,
        ["listeners.secure.tls.certificates[0].key: does not match the certificate"]
    );
    let tls = connect(&any_client(), site.v4(), dns(BLOG)).await;
    assert_presented(&tls, &site.a, "after the second failed reload");

    // The same through the server's own reload path (SIGHUP, file watcher, API): the
    // error names the key, the failure is counted, the old certificate stays.
    let file = site.dir.path().join("launchday.toml");
    std::fs::write(&file, &site.text).expect("write config");
    let err = site
        .server
        .reload_file(&file)
        .await
        .expect_err("a mismatched key must be rejected");
    assert_eq!(
        err.to_string(),
        "listeners.secure.tls.certificates[0].key: does not match the certificate"
    );
    let metrics = site.metrics().await;
    assert_eq!(
        common::metric(
            &metrics,
            r#"launchday_config_reloads_total{result="failure"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        common::metric(
            &metrics,
            r#"launchday_config_reloads_total{result="success"}"#
        ),
        Some(0.0)
    );
    let tls = connect(&any_client(), site.v6(), dns(BLOG)).await;
    assert_presented(&tls, &site.a, "after a failed reload_file");
}

/// `launchday check -c FILE`: exit code and stderr lines.
fn check(file: &Path) -> (Option<i32>, String, Vec<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_launchday"));
    cmd.arg("check").arg("-c").arg(file).env("RUST_LOG", "off");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run launchday check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(str::to_owned)
            .collect(),
    )
}

#[test]
fn check_reports_tls_file_errors_with_their_key_paths() {
    let backend: SocketAddr = "[::1]:9".parse().expect("addr");
    let a = Cert::ecdsa(&[BLOG]);
    let b = Cert::ecdsa(&[FORUMS]);

    // Valid first, so that the errors below are about the files alone.
    let dir = tempfile::tempdir().expect("tempdir");
    a.write(dir.path(), "a");
    b.write(dir.path(), "b");
    let file = dir.path().join("launchday.toml");
    std::fs::write(&file, site_toml("", backend, TLS_ONLY)).expect("write config");
    let (code, stdout, stderr) = check(&file);
    assert_eq!((code, stdout.as_str()), (Some(0), "ok\n"), "{stderr:#?}");

    // A's key replaced by another one.
    std::fs::write(
        dir.path().join("a.key"),
        rcgen::KeyPair::generate().expect("key").serialize_pem(),
    )
    .expect("write key");
    let (code, stdout, stderr) = check(&file);
    assert_eq!(code, Some(1), "stdout: {stdout:?}");
    assert_eq!(
        stderr,
        ["listeners.secure.tls.certificates[0].key: does not match the certificate"]
    );

    // B's certificate file missing.
    let dir = tempfile::tempdir().expect("tempdir");
    a.write(dir.path(), "a");
    std::fs::write(dir.path().join("b.key"), &b.key).expect("write key");
    let file = dir.path().join("launchday.toml");
    std::fs::write(&file, site_toml("", backend, TLS_ONLY)).expect("write config");
    let (code, stdout, stderr) = check(&file);
    assert_eq!(code, Some(1), "stdout: {stdout:?}");
    assert_eq!(stderr.len(), 1, "{stderr:#?}");
    let line = &stderr[0];
    assert!(
        line.starts_with("listeners.secure.tls.certificates[1].cert: ")
            && line.ends_with("b.pem does not exist"),
        "{line}"
    );
}

// ---------------------------------------------------------------------------------
// 9: session resumption
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_resumes_the_session() {
    let backend = Backend::start("web").await;
    let site = Site::start("", backend.addr).await;
    for (versions, label) in [(ONLY_13, "TLS 1.3"), (ONLY_12, "TLS 1.2")] {
        for (addr, name, cert) in [
            (site.v4(), BLOG, &site.a),
            (site.v6(), "x.forums.example.org", &site.b),
        ] {
            let cfg = client_config(versions, H2_AND_H1, Trust::Any, true);
            let tls = connect(&cfg, addr, dns(name)).await;
            assert_eq!(
                tls.get_ref().1.handshake_kind(),
                Some(HandshakeKind::Full),
                "{label} first connection"
            );
            assert_presented(&tls, cert, name);
            // A request and its answer, so that TLS 1.3 session tickets (sent after
            // the handshake) are read.
            let r = Http::over(tls).await.get(name, "/first").await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());

            for i in 0..2 {
                let tls = connect(&cfg, addr, dns(name)).await;
                assert_eq!(
                    tls.get_ref().1.handshake_kind(),
                    Some(HandshakeKind::Resumed),
                    "{label} {name} connection {} from the same client config",
                    i + 2
                );
                assert_presented(&tls, cert, "resumed");
                let r = Http::over(tls).await.get(name, "/again").await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// idle HTTP/2 connections
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_gets_goaway_at_idle_timeout_and_a_busy_one_stays() {
    let backend = Backend::start("web").await;
    let site = Site::start("\n[limits]\nidle_timeout = \"1s\"\n", backend.addr).await;

    /// An h2 connection whose driver reports when the connection ends.
    async fn open(
        addr: SocketAddr,
    ) -> (
        http2::SendRequest<Full<Bytes>>,
        tokio::sync::oneshot::Receiver<Instant>,
    ) {
        let tls = connect(&any_client(), addr, dns(BLOG)).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
        let (done, ended) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = conn.await;
            let _ = done.send(Instant::now());
        });
        (sender, ended)
    }

    let (idle, idle_ended) = open(site.v4()).await;
    let (busy, mut busy_ended) = open(site.v6()).await;
    let mut idle_c = Http::Two(idle);
    let r = idle_c.get(BLOG, "/once").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let quiet_from = Instant::now();

    // The busy connection sends a request every 300 ms for 2.4 s: never idle for 1 s.
    let mut busy_c = Http::Two(busy);
    for i in 0..8 {
        let r = busy_c.get(BLOG, &format!("/busy/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(
            busy_ended.try_recv().is_err(),
            "the busy connection was closed after {i} requests"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(3), idle_ended)
        .await
        .expect("the idle connection ends")
        .expect("driver reported");
    let after = ended.duration_since(quiet_from);
    assert!(
        after >= Duration::from_millis(800) && after <= Duration::from_millis(2500),
        "idle h2 connection ended {after:?} after its last stream"
    );
    // And the busy one, once quiet, goes the same way.
    let ended = tokio::time::timeout(Duration::from_secs(4), busy_ended)
        .await
        .expect("the busy connection ends once idle")
        .expect("driver reported");
    assert!(ended.elapsed() < Duration::from_secs(4));
}
