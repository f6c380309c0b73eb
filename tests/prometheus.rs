//! The metrics against the real thing: Debian's `prometheus` server scraping the
//! admin listener and answering the dashboard's queries, `promtool check metrics` on a
//! scrape, and the admin endpoints kept off the public listeners.
//!
//! `/usr/bin/prometheus` and `/usr/bin/promtool` come from Debian's `prometheus`
//! package, which `.ci/run` installs. These tests are never skipped: without the
//! binaries they fail and say so. Each test starts its own Prometheus (never a system
//! service) on a free loopback port with its storage in a temporary directory, and
//! kills it when the test ends.
//!
//! The balancer runs in-process on port 0, the back ends on `[::1]:0`.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{config, fill, free_addr, metric, request, try_get, Backend, Balancer, Client};
use http::{Method, StatusCode};
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";
const BEACON: &str = "/.well-known/launchday/beacon";

/// How long Prometheus may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long the scraped values may take to reach what the client saw.
const SCRAPED_WITHIN: Duration = Duration::from_secs(15);

/// Fails the test, saying what to install, when `binary` is missing.
fn require(binary: &str) {
    assert!(
        Path::new(binary).is_file(),
        "{binary} is missing: install Debian's prometheus package \
         (`apt-get install prometheus`; .ci/run does) — these tests are not skipped without it"
    );
}

/// A Prometheus server of our own, scraping one target every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `/usr/bin/prometheus` scraping `target` (job `launchday`, every 1 s) and
    /// waits until `/-/ready` answers 200. A port lost to a race is retried.
    async fn start(target: SocketAddr) -> Prometheus {
        require(PROMETHEUS);
        let mut dir = tempfile::tempdir().expect("tempdir");
        let yml = dir.path().join("prometheus.yml");
        std::fs::write(
            &yml,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: launchday\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let mut failures = Vec::new();
        for attempt in 0..3 {
            let addr = free_addr("127.0.0.1");
            let log = dir.path().join(format!("prometheus-{attempt}.log"));
            let out = std::fs::File::create(&log).expect("log file");
            let err = out.try_clone().expect("log file");
            let child = Command::new(PROMETHEUS)
                .arg(format!("--config.file={}", yml.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {PROMETHEUS}: {e}"));
            let mut p = Prometheus { child, addr, dir };
            match p.wait_ready(&log).await {
                Ok(()) => return p,
                Err(e) => {
                    failures.push(e);
                    p.stop();
                    dir = p.take_dir();
                }
            }
        }
        panic!("Prometheus did not start:\n{}", failures.join("\n---\n"));
    }

    /// Polls `/-/ready` (bounded by [`READY_WITHIN`]); an error with the log when the
    /// process exits first or never gets ready.
    async fn wait_ready(&mut self, log: &Path) -> Result<(), String> {
        let start = Instant::now();
        let read_log = || std::fs::read_to_string(log).unwrap_or_default();
        for _ in 0..10_000 {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Err(format!("prometheus exited ({status}):\n{}", read_log()));
            }
            if let Ok(r) = try_get(self.addr, "/-/ready").await {
                if r.status == StatusCode::OK {
                    return Ok(());
                }
            }
            if start.elapsed() > READY_WITHIN {
                return Err(format!(
                    "prometheus not ready on {} after {READY_WITHIN:?}:\n{}",
                    self.addr,
                    read_log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("gave up waiting for prometheus:\n{}", read_log()))
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Moves the temporary directory out (for another attempt), leaving an empty one.
    fn take_dir(&mut self) -> tempfile::TempDir {
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }

    /// Everything it logged so far.
    fn log(&self) -> String {
        let mut out = String::new();
        for attempt in 0..3 {
            let path = self.dir.path().join(format!("prometheus-{attempt}.log"));
            if let Ok(text) = std::fs::read_to_string(path) {
                out.push_str(&text);
            }
        }
        out
    }

    /// The instant vector `promql` evaluates to now: each series' labels and value.
    async fn query(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let r = try_get(self.addr, &path)
            .await
            .unwrap_or_else(|e| panic!("query {promql}: {e}\n{}", self.log()));
        assert_eq!(r.status, StatusCode::OK, "query {promql}: {}", r.text());
        let json: Value = serde_json::from_slice(&r.body).expect("query answer is JSON");
        assert_eq!(json["status"], "success", "query {promql}: {json}");
        assert_eq!(
            json["data"]["resultType"], "vector",
            "query {promql}: {json}"
        );
        json["data"]["result"]
            .as_array()
            .expect("result array")
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .expect("metric labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("label value").to_owned()))
                    .collect();
                let value = s["value"][1]
                    .as_str()
                    .expect("sample value")
                    .parse::<f64>()
                    .expect("numeric sample");
                (labels, value)
            })
            .collect()
    }

    /// The values of `promql` keyed by label `label`.
    async fn by(&self, promql: &str, label: &str) -> BTreeMap<String, f64> {
        self.query(promql)
            .await
            .into_iter()
            .map(|(labels, v)| {
                let key = labels
                    .get(label)
                    .unwrap_or_else(|| panic!("{promql}: series without {label}: {labels:?}"))
                    .clone();
                (key, v)
            })
            .collect()
    }

    /// The only value of `promql`, `None` when the vector is empty.
    async fn scalar(&self, promql: &str) -> Option<f64> {
        let v = self.query(promql).await;
        assert!(v.len() <= 1, "{promql}: several series: {v:?}");
        v.first().map(|(_, v)| *v)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_and_the_dashboard_queries_answer() {
    require(PROMETHEUS);
    let big = Backend::start("big").await;
    let small = Backend::start("small").await;
    let tables = r#"
[[routes]]
path_prefix = "/maintenance/"
pool = "forums"

[[routes]]
pool = "blog"

[pools.blog]
backends = [
  { name = "big-vm", address = "{{big}}", weight = 11 },
  { name = "raspberry-pi", address = "{{small}}", weight = 1 },
]

[pools.forums]
maintenance = true
backends = []
"#;
    let lb = Balancer::start(&fill(&config("", tables), &[&big, &small])).await;
    let prom = Prometheus::start(lb.admin).await;

    let mut c = Client::connect(lb.v4).await;
    for i in 0..1200 {
        let r = c.get(&format!("/post/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
    }
    let mut unavailable = 0u32;
    for i in 0..30 {
        let r = c.get(&format!("/maintenance/{i}")).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            unavailable += 1;
        }
    }
    assert_eq!(
        unavailable, 30,
        "a pool in manual maintenance sheds everything"
    );
    assert_eq!(big.count(), 1100);
    assert_eq!(small.count(), 100);

    // Three scrape intervals, then (bounded) until the scraped counters caught up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let per_backend = r#"sum by (backend) (launchday_requests_total{pool="blog",backend!="-"})"#;
    let shed = r#"sum(launchday_shed_total{pool="forums"})"#;
    let start = Instant::now();
    let (served, shed_total) = loop {
        let served = prom.by(per_backend, "backend").await;
        let shed_total = prom.scalar(shed).await;
        if served.values().sum::<f64>() == 1200.0 && shed_total == Some(f64::from(unavailable)) {
            break (served, shed_total);
        }
        assert!(
            start.elapsed() < SCRAPED_WITHIN,
            "Prometheus never saw the traffic: {per_backend} = {served:?}, {shed} = \
             {shed_total:?}\n--- balancer /metrics ---\n{}\n--- prometheus log ---\n{}",
            lb.metrics().await,
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // The weighted split, exactly (counters) and as the dashboard's share panel shows it.
    assert_eq!(served.get("raspberry-pi"), Some(&100.0), "{served:?}");
    assert_eq!(served.get("big-vm"), Some(&1100.0), "{served:?}");
    assert_eq!(served.len(), 2, "{served:?}");
    let share = served["raspberry-pi"] / served.values().sum::<f64>();
    assert!((share - 1.0 / 12.0).abs() <= 0.01, "small share {share}");

    // Every 503 the client saw is a shed request.
    assert_eq!(shed_total, Some(f64::from(unavailable)));
    let reasons = prom
        .by(
            r#"sum by (reason) (launchday_shed_total{pool="forums"})"#,
            "reason",
        )
        .await;
    assert_eq!(
        reasons.get("manual"),
        Some(&f64::from(unavailable)),
        "{reasons:?}"
    );

    // ...and a maintenance page served.
    let pages = prom
        .scalar(r#"sum(launchday_maintenance_pages_total{pool="forums"})"#)
        .await;
    assert_eq!(pages, Some(f64::from(unavailable)));

    let weights = prom
        .by(r#"launchday_backend_weight{pool="blog"}"#, "backend")
        .await;
    assert_eq!(weights.get("big-vm"), Some(&11.0), "{weights:?}");
    assert_eq!(weights.get("raspberry-pi"), Some(&1.0), "{weights:?}");
    assert_eq!(weights.len(), 2, "{weights:?}");

    let build = prom.query("launchday_build_info").await;
    assert_eq!(build.len(), 1, "{build:?}");
    assert_eq!(build[0].1, 1.0);
    assert!(
        build[0].0.get("version").is_some_and(|v| !v.is_empty()),
        "{build:?}"
    );

    let up = prom.query(r#"up{job="launchday"}"#).await;
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0].1, 1.0, "{up:?}\n{}", prom.log());
    assert_eq!(
        up[0].0.get("instance").map(String::as_str),
        Some(lb.admin.to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_check_metrics_passes_on_a_scrape() {
    require(PROMTOOL);
    let only = Backend::start("only").await;
    let tables = r#"
[[routes]]
host = "blog.example.org"
path_prefix = "/maintenance/"
pool = "forums"

[[routes]]
host = "blog.example.org"
pool = "blog"

[pools.blog]
backends = [{ name = "blog-vm-1", address = "{{only}}", weight = 3 }]

[pools.forums]
maintenance = true
backends = []
"#;
    let lb = Balancer::start(&fill(&config("", tables), &[&only])).await;
    // Every kind of answer, so every family has series: proxied, shed, unrouted, beacon.
    let mut c = Client::connect(lb.v4).await;
    let host = [("host", "blog.example.org")];
    for _ in 0..5 {
        assert_eq!(c.get_with("/", &host).await.status, StatusCode::OK);
    }
    assert_eq!(
        c.get_with("/maintenance/", &host).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(c.get("/").await.status, StatusCode::NOT_FOUND);
    let beacon = c.get_with(BEACON, &host).await;
    assert!(beacon.status.is_success(), "beacon: {}", beacon.status);

    let scrape = lb.metrics().await;
    let checked = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(PROMTOOL)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PROMTOOL}: {e}"));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(scrape.as_bytes())
            .expect("write the scrape to promtool");
        (child.wait_with_output().expect("promtool output"), scrape)
    });
    let (out, scrape) = tokio::time::timeout(Duration::from_secs(30), checked)
        .await
        .expect("promtool finishes in time")
        .expect("promtool task");
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- the scrape ---\n{scrape}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_are_not_served_on_public_listeners() {
    let site = Backend::start("site").await;
    let tables = r#"
[[routes]]
host = "example.org"
pool = "site"

[pools.site]
backends = [{ name = "site", address = "{{site}}" }]
"#;
    let lb = Balancer::start(&fill(&config("", tables), &[&site])).await;

    let admin_requests = [
        (Method::GET, "/metrics", ""),
        (Method::GET, "/status", ""),
        (Method::GET, "/api/status", ""),
        (Method::POST, "/api/reload", ""),
        (Method::POST, "/api/pools/site/maintenance", "on"),
    ];
    let mut not_found = 0.0;
    for public in [lb.v4, lb.v6] {
        let mut c = Client::connect(public).await;
        for (method, path, body) in &admin_requests {
            let r = c
                .send(request(
                    method.clone(),
                    path,
                    &[],
                    Bytes::copy_from_slice(body.as_bytes()),
                ))
                .await;
            let what = format!("{method} {path} on public {public}");
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{what}: {}", r.text());
            assert_eq!(
                r.header("x-launchday-error").as_deref(),
                Some("no_route"),
                "{what}"
            );
            assert_eq!(
                r.header("x-served-by").as_deref(),
                Some("launchday"),
                "{what}"
            );
            let text = r.text();
            for admin_content in ["launchday_", "# TYPE", "# HELP", "<html", "\"pools\""] {
                assert!(
                    !text.contains(admin_content),
                    "{what} answered admin content ({admin_content}):\n{text}"
                );
            }
            not_found += 1.0;
        }
        // For the routed host the same paths are the site's own, proxied.
        for (method, path, body) in &admin_requests {
            let r = c
                .send(request(
                    method.clone(),
                    path,
                    &[("host", "example.org")],
                    Bytes::copy_from_slice(body.as_bytes()),
                ))
                .await;
            assert_eq!(r.status, StatusCode::OK, "{method} {path}: {}", r.text());
            assert_eq!(r.text(), "served by site\n", "{method} {path}");
        }
    }
    assert_eq!(site.count(), 2 * admin_requests.len());
    assert!(
        site.requests()
            .iter()
            .all(|s| s.headers.get("host").is_some_and(|h| h == "example.org")),
        "only the routed host reached the back end"
    );

    // Nothing above reached the admin API: the pool is not in maintenance.
    let r = Client::connect(lb.v4)
        .await
        .get_with("/", &[("host", "example.org")])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // The admin listener does serve them, and counted the public 404s as unrouted.
    let m = lb.metrics().await;
    assert!(m.contains("# TYPE launchday_requests_total counter"), "{m}");
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="-",code="4xx",pool="-"}"#
        ),
        Some(not_found),
        "{m}"
    );
    let status = try_get(lb.admin, "/api/status")
        .await
        .expect("admin /api/status");
    assert_eq!(status.status, StatusCode::OK);
    assert!(status.text().contains("\"pools\""), "{}", status.text());
}
