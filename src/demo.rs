//! `launchday demo`: the launch-day setup in one process.
//!
//! Two demo back ends (hyper servers on `[::1]`, port 0): a fast "blog VM" (weight 11)
//! and a slow "Raspberry Pi 3" (weight 1, 0.7 s per page like the real one, tagging
//! its answers `X-Served-By: Raspberry Pi 3`), and the balancer in front of them.
//! The same back-end server is used by the integration tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How a demo back end behaves.
#[derive(Debug, Clone)]
pub struct DemoBackend {
    /// Shown in the page.
    pub name: String,
    /// Sent as `X-Served-By` when set.
    pub served_by: Option<String>,
    /// Time taken per page (an uncached CMS render).
    pub delay: Duration,
}

/// A running demo back end.
#[derive(Debug, Clone)]
pub struct Running {
    pub addr: SocketAddr,
    /// Requests answered so far.
    pub hits: Arc<AtomicU64>,
}

/// Starts a demo back end on `addr` (use port 0 for any free port).
pub async fn spawn_backend(addr: SocketAddr, b: DemoBackend) -> std::io::Result<Running> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let hits = Arc::new(AtomicU64::new(0));
    let b = Arc::new(b);
    let counter = Arc::clone(&hits);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let b = Arc::clone(&b);
            let counter = Arc::clone(&counter);
            let svc = service_fn(move |req: Request<Incoming>| {
                let b = Arc::clone(&b);
                let counter = Arc::clone(&counter);
                async move {
                    if !b.delay.is_zero() {
                        tokio::time::sleep(b.delay).await;
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, Infallible>(page(&b, &req))
                }
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(Running { addr, hits })
}

fn page(b: &DemoBackend, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let body = format!(
        "<!DOCTYPE html><html><head><meta charset=utf-8><title>Launch day</title></head>\
         <body><h1>Our new computer is out!</h1><p>Path {} served by {}.</p></body></html>\n",
        html_escape(req.uri().path()),
        html_escape(&b.name),
    );
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Some(v) = b
        .served_by
        .as_deref()
        .and_then(|s| HeaderValue::from_str(s).ok())
    {
        resp.headers_mut().insert("x-served-by", v);
    }
    resp
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The demo's back ends: the blog VM, the Raspberry Pi and the (slow) forums VM.
pub fn backends() -> [DemoBackend; 3] {
    [
        DemoBackend {
            name: "blog VM".into(),
            served_by: None,
            delay: Duration::ZERO,
        },
        DemoBackend {
            name: "Raspberry Pi 3".into(),
            served_by: Some("Raspberry Pi 3".into()),
            delay: Duration::from_millis(700),
        },
        DemoBackend {
            name: "forums VM".into(),
            served_by: None,
            delay: Duration::from_millis(500),
        },
    ]
}

/// The demo's config (TOML), given the back ends' and the balancer's addresses.
pub fn config([vm, pi, forums]: [SocketAddr; 3], port: u16, admin_port: u16) -> String {
    format!(
        r#"# launchday demo (built in)
shutdown_grace = "2s"

[admin]
listen = ["127.0.0.1:{admin_port}"]

[[listeners]]
name = "public"
bind = ["127.0.0.1:{port}", "[::1]:{port}"]

[[routes]]
path_prefix = "/"
pool = "blog"

[[routes]]
path_prefix = "/forums/"
pool = "forums"

# The blog: a big VM and a Raspberry Pi, 11:1.
[pools.blog]
queue_depth = 64
queue_timeout = "2s"
backends = [
  {{ name = "blog-vm-1", address = "{vm}", weight = 11, max_connections = 64, served_by = "blog-vm-1" }},
  {{ name = "raspberry-pi-3", address = "{pi}", weight = 1, max_connections = 4 }},
]

# The forums: slow pages (0.5 s), 2 at a time, a short queue. Isolated from the blog.
[pools.forums]
queue_depth = 8
queue_timeout = "2s"
backends = [
  {{ name = "forums-vm-1", address = "{forums}", weight = 1, max_connections = 2, served_by = "forums-vm-1" }},
]

[maintenance]
retry_after = "30s"
analytics = "<!-- your analytics snippet here -->"
"#
    )
}

/// What the demo prints once it runs.
pub fn banner(port: u16, admin_port: u16) -> String {
    let lines = [
        "launchday demo is running.".to_owned(),
        String::new(),
        "Try:".to_owned(),
        format!("  curl -si http://[::1]:{port}/ | grep -i served-by"),
        format!(
            "  for i in $(seq 12); do curl -s -D - -o /dev/null http://127.0.0.1:{port}/ | grep -i served-by; done   # 11 x blog-vm-1, 1 x Raspberry Pi 3"
        ),
        format!("  curl -s http://127.0.0.1:{admin_port}/metrics | grep launchday_requests_total"),
        String::new(),
        "Overload the forums (2 slow pages at a time, a queue of 8) and watch them shed to the maintenance page:".to_owned(),
        format!(
            "  seq 60 | xargs -P 30 -I{{}} curl -s -o /dev/null -w '%{{http_code}}\\n' http://127.0.0.1:{port}/forums/ | sort | uniq -c"
        ),
        format!("  curl -s http://127.0.0.1:{admin_port}/metrics | grep -E 'launchday_(shed_total|maintenance)'"),
        format!("  curl -s -d on http://127.0.0.1:{admin_port}/api/pools/forums/maintenance   # manual maintenance; off to undo"),
        String::new(),
        "Ctrl-C stops it.".to_owned(),
    ];
    lines.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid() {
        let text = config(
            [
                "[::1]:1001".parse().expect("a"),
                "[::1]:1002".parse().expect("b"),
                "[::1]:1003".parse().expect("c"),
            ],
            8080,
            9090,
        );
        let snap = crate::config::load_str(&text, std::path::Path::new("."), None)
            .unwrap_or_else(|e| panic!("demo config invalid:\n{e}"));
        assert_eq!(snap.pools.len(), 2);
        assert_eq!(snap.pools[0].name, "blog");
        assert_eq!(snap.pools[0].backends[0].weight, 11);
        assert_eq!(snap.pools[0].backends[1].max_connections, Some(4));
        assert_eq!(snap.pools[1].backends[0].max_connections, Some(2));
    }
}
