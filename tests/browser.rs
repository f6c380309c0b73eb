//! The admin status page and the maintenance page in a real browser: Debian's Chromium,
//! headless (`/usr/bin/chromium`; `.ci/run` installs it).
//!
//! How errors are seen. Started with `--enable-logging=stderr --v=0`, Chromium 156
//! writes each message of the page's console to stderr as
//! `[…:INFO:CONSOLE:1] "MESSAGE", source: URL (1)`: always at INFO, whatever the level
//! (`console.log` and `console.error` look alike), so every `CONSOLE` line counts, and
//! an uncaught exception reads `"Uncaught ReferenceError: …"`. A sub-resource answered
//! 404 prints nothing at all there (no "Failed to load resource" line: that message only
//! exists when DevTools is attached), so each run also writes Chromium's NetLog
//! (`--log-net-log`) and every request to the page's own server is checked for a 4xx or
//! 5xx answer or a network error. [`status_page_renders_in_chromium_without_console_errors`]
//! first shows, on a page that is broken on purpose, that both detectors fire.
//!
//! Chromium asks for `/favicon.ico` by itself in some runs and not in others (a race
//! with `--dump-dom` exiting); that request is not the page's and is left out.
//!
//! Screenshots are written to the test's temporary directory, whose path is printed;
//! set `LAUNCHDAY_KEEP_SCREENSHOTS=1` to keep it after the test.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{config, fill, metric, Backend, Balancer, Client, STEP};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Flags for every run: headless as root, and no connections of Chromium's own (this
/// machine's network is closed; without them Chromium retries Google's hosts).
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

const BEACONS: &str = "launchday_maintenance_beacons_total";
const FORUMS_PAGES: &str = r#"launchday_maintenance_pages_total{pool="forums"}"#;

/// Fails (never skips) when the browser is not installed.
fn require_chromium() {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: install Debian's chromium; .ci/run does \
         (apt-get install --no-install-recommends chromium)"
    );
}

/// The test's temporary directory (kept with `LAUNCHDAY_KEEP_SCREENSHOTS=1`).
struct Work {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Work {
    fn new(test: &str) -> Work {
        let dir = tempfile::Builder::new()
            .prefix(&format!("launchday-browser-{test}-"))
            .tempdir()
            .expect("temp dir");
        let path = dir.path().to_path_buf();
        eprintln!("{test}: browser files in {}", path.display());
        Work {
            dir: Some(dir),
            path,
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if std::env::var_os("LAUNCHDAY_KEEP_SCREENSHOTS").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("kept {}", dir.keep().display());
            }
        }
    }
}

/// One request Chromium made, from its NetLog.
#[derive(Debug, Clone)]
struct NetRequest {
    url: String,
    /// The answer's status, when headers were read.
    status: Option<u16>,
    /// Chromium's net error (e.g. -102 connection refused), when the request failed.
    net_error: Option<i64>,
}

impl NetRequest {
    fn failed(&self) -> bool {
        self.net_error.is_some_and(|e| e != 0) || self.status.is_none_or(|s| s >= 400)
    }
}

/// What one Chromium run left behind.
struct Run {
    url: String,
    /// `--dump-dom` output (empty for a screenshot).
    dom: String,
    stderr: String,
    /// Every request Chromium made, its own (to Google, refused here) included.
    requests: Vec<NetRequest>,
}

impl Run {
    /// Every line of the page's console that Chromium logged.
    fn console_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.contains(":CONSOLE") || l.contains("CONSOLE("))
            .collect()
    }

    /// The requests to `origin` (`http://127.0.0.1:PORT`), but `/favicon.ico`.
    fn requests_to(&self, origin: &str) -> Vec<&NetRequest> {
        self.requests
            .iter()
            .filter(|r| {
                r.url
                    .strip_prefix(origin)
                    .is_some_and(|p| p.starts_with('/') && p != "/favicon.ico")
            })
            .collect()
    }

    /// Whether Chromium asked `origin` for `/favicon.ico` in this run.
    fn asked_for_favicon(&self, origin: &str) -> bool {
        let favicon = format!("{origin}/favicon.ico");
        self.requests.iter().any(|r| r.url == favicon)
    }

    /// Everything that says the page did not load cleanly: each console line, and each
    /// request to `origin` (favicon aside) answered 4xx/5xx or failed.
    fn problems(&self, origin: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .console_lines()
            .into_iter()
            .map(|l| format!("console: {l}"))
            .collect();
        out.extend(
            self.requests_to(origin)
                .into_iter()
                .filter(|r| r.failed())
                .map(|r| {
                    format!(
                        "request: {} answered {:?}, net error {:?}",
                        r.url, r.status, r.net_error
                    )
                }),
        );
        out
    }

    /// The end of stderr, without the D-Bus noise of a machine without a session bus.
    fn stderr_tail(&self) -> String {
        tail(&self.stderr)
    }
}

fn tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("dbus")).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// How Chromium is to show the page.
enum Mode<'a> {
    /// `--dump-dom`: print the DOM once the load event fired.
    DumpDom,
    /// `--screenshot=PATH --window-size=1200,900`.
    Screenshot(&'a Path),
}

/// Runs Chromium (under `timeout 60`, with a fresh profile) on `url`; fails the test
/// when it does not exit cleanly.
async fn chromium(work: &Path, tag: &str, url: &str, mode: Mode<'_>) -> Run {
    require_chromium();
    let profile = work.join(format!("profile-{tag}"));
    let netlog = work.join(format!("netlog-{tag}.json"));
    let mut args: Vec<String> = vec!["--kill-after=5".into(), "60".into(), CHROMIUM.into()];
    args.extend(FLAGS.iter().map(|f| f.to_string()));
    args.push(format!("--user-data-dir={}", profile.display()));
    args.push("--enable-logging=stderr".into());
    args.push("--v=0".into());
    args.push(format!("--log-net-log={}", netlog.display()));
    match mode {
        Mode::DumpDom => args.push("--dump-dom".into()),
        Mode::Screenshot(png) => {
            args.push(format!("--screenshot={}", png.display()));
            args.push("--window-size=1200,900".into());
        }
    }
    args.push(url.to_owned());
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(&args)
            .stdin(Stdio::null())
            .output()
    })
    .await
    .expect("chromium thread")
    .expect("run `timeout 60 /usr/bin/chromium`");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "chromium on {url} failed after {:?} ({}; 124 = stopped by `timeout 60`):\n{}",
        started.elapsed(),
        out.status,
        tail(&stderr)
    );
    let requests = read_netlog(&netlog);
    Run {
        url: url.to_owned(),
        dom: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
        requests,
    }
}

/// The requests in a NetLog file: URL (`REQUEST_ALIVE`), status (the first line of
/// `HTTP_TRANSACTION_READ_RESPONSE_HEADERS`), net error (any event's `net_error`).
fn read_netlog(path: &Path) -> Vec<NetRequest> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("chromium wrote no NetLog at {}: {e}", path.display()));
    let log: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("NetLog {} is not JSON: {e}", path.display()));
    let types = log["constants"]["logEventTypes"]
        .as_object()
        .expect("NetLog constants.logEventTypes");
    let type_id = |name: &str| {
        types
            .get(name)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_else(|| panic!("NetLog has no event type {name}"))
    };
    let (alive, headers) = (
        type_id("REQUEST_ALIVE"),
        type_id("HTTP_TRANSACTION_READ_RESPONSE_HEADERS"),
    );
    let mut by_source: BTreeMap<u64, NetRequest> = BTreeMap::new();
    for e in log["events"].as_array().expect("NetLog events") {
        let (Some(source), Some(kind)) = (e["source"]["id"].as_u64(), e["type"].as_u64()) else {
            continue;
        };
        let params = &e["params"];
        if kind == alive {
            if let Some(url) = params["url"].as_str() {
                by_source.insert(
                    source,
                    NetRequest {
                        url: url.to_owned(),
                        status: None,
                        net_error: None,
                    },
                );
            }
        }
        let Some(r) = by_source.get_mut(&source) else {
            continue;
        };
        if kind == headers {
            r.status = params["headers"][0]
                .as_str()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok());
        }
        if let Some(err) = params["net_error"].as_i64() {
            r.net_error = Some(err);
        }
    }
    by_source.into_values().collect()
}

/// Asserts that `png` is a PNG of `width` x `height`, larger than 1 KB.
fn assert_png(png: &Path, width: u32, height: u32) {
    let bytes =
        std::fs::read(png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(
        bytes.len() > 1024,
        "{}: only {} bytes",
        png.display(),
        bytes.len()
    );
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR",
        "{} is not a PNG",
        png.display()
    );
    let be =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    assert_eq!(
        (be(16), be(20)),
        (width, height),
        "{}: size of the screenshot",
        png.display()
    );
}

/// A page broken on purpose, for the detectors.
const BROKEN_PAGE: &str = concat!(
    "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>broken</title></head>",
    "<body><h1>broken on purpose</h1><img src=\"/missing.png\" alt=\"missing\">",
    "<script>console.error(\"console.error from the test page\"); notDefinedAnywhere();</script>",
    "</body></html>\n"
);

/// A tiny hyper server on `127.0.0.1:0`: `/broken.html` is [`BROKEN_PAGE`], everything
/// else 404. Returns its address and the paths it was asked for.
async fn broken_page_server() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let paths: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = Arc::clone(&paths);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            };
            let seen = Arc::clone(&seen);
            let svc = service_fn(move |req: Request<Incoming>| {
                let path = req.uri().path().to_owned();
                seen.lock().expect("lock").push(path.clone());
                let mut resp = if path == "/broken.html" {
                    let mut r =
                        Response::new(Full::new(Bytes::from_static(BROKEN_PAGE.as_bytes())));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/html; charset=utf-8"),
                    );
                    r
                } else {
                    let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
                    *r.status_mut() = StatusCode::NOT_FOUND;
                    r
                };
                resp.headers_mut()
                    .insert("cache-control", HeaderValue::from_static("no-store"));
                async move { Ok::<_, Infallible>(resp) }
            });
            tokio::spawn(async move {
                let _ = server_http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, paths)
}

/// Polls `/api/status` until every back end of the first pool has a traffic share
/// (the history is sampled once a second), so that the page shows the traffic.
async fn wait_for_traffic_shares(lb: &Balancer) {
    let start = Instant::now();
    loop {
        let r = common::get(lb.admin, "/api/status").await;
        let json: serde_json::Value = serde_json::from_slice(&r.body).expect("status json");
        let shares: Vec<f64> = json["pools"][0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| b["traffic_share"].as_f64().unwrap_or(0.0))
            .collect();
        if !shares.is_empty() && shares.iter().all(|s| *s > 0.0) {
            return;
        }
        assert!(
            start.elapsed() < STEP,
            "no traffic share on the status API after {STEP:?}: {shares:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_chromium_without_console_errors() {
    require_chromium();
    let work = Work::new("status");

    // The detectors, first: they must fire on a page broken on purpose.
    let (broken, asked) = broken_page_server().await;
    let origin = format!("http://{broken}");
    let run = chromium(
        &work.path,
        "broken",
        &format!("{origin}/broken.html"),
        Mode::DumpDom,
    )
    .await;
    assert!(
        run.dom.contains("broken on purpose"),
        "the broken page did not load:\n{}",
        run.dom
    );
    assert!(
        asked
            .lock()
            .expect("lock")
            .iter()
            .any(|p| p == "/missing.png"),
        "chromium never asked for the broken image"
    );
    let problems = run.problems(&origin);
    eprintln!(
        "what chromium shows of a page with a 404 image, console.error and an uncaught \
         exception:\n  {}",
        problems.join("\n  ")
    );
    for expected in [
        "/missing.png answered Some(404)",
        "console.error from the test page",
        "Uncaught ReferenceError: notDefinedAnywhere is not defined",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "the detector missed {expected:?}; it found {problems:#?}\nstderr:\n{}",
            run.stderr_tail()
        );
    }

    // The balancer: a proxied pool (11:1) and a pool in maintenance, with traffic.
    let vm = Backend::start("vm").await;
    let pi = Backend::start("pi").await;
    let text = fill(
        &config(
            "",
            r#"
[[routes]]
pool = "blog"

[[routes]]
path_prefix = "/forums"
pool = "forums"

[pools.blog]
backends = [
  { name = "blog-vm-1", address = "{{vm}}", weight = 11 },
  { name = "raspberry-pi-3", address = "{{pi}}", weight = 1 },
]

[pools.forums]
maintenance = true
backends = []
"#,
        ),
        &[&vm, &pi],
    );
    let lb = Balancer::start(&text).await;
    let mut client = Client::connect(lb.v4).await;
    for i in 0..120 {
        let r = client.get(&format!("/post/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {r:?}");
    }
    for _ in 0..3 {
        let r = client.get("/forums/").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(vm.count() + pi.count(), 120);
    assert!(
        vm.count() > pi.count() && pi.count() > 0,
        "vm {} pi {}",
        vm.count(),
        pi.count()
    );
    wait_for_traffic_shares(&lb).await;

    let admin = format!("http://{}", lb.admin);
    let url = format!("{admin}/status");

    // A screenshot.
    let png = work.path.join("status.png");
    let shot = chromium(&work.path, "status-shot", &url, Mode::Screenshot(&png)).await;
    assert_png(&png, 1200, 900);
    eprintln!("status page screenshot: {}", png.display());
    assert_eq!(
        shot.problems(&admin),
        Vec::<String>::new(),
        "errors while rendering {url} for the screenshot\nstderr:\n{}",
        shot.stderr_tail()
    );

    // The DOM, and nothing on the console.
    let run = chromium(&work.path, "status-dom", &url, Mode::DumpDom).await;
    let dom = &run.dom;
    for expected in [
        "<title>launchday status</title>",
        "<h2>blog</h2>",
        "forums — in maintenance",
        "blog-vm-1",
        "raspberry-pi-3",
        "91.7% configured",
        "8.3% configured",
        "3 maintenance pages",
    ] {
        assert!(
            dom.contains(expected),
            "the DOM of {url} lacks {expected:?}:\n{dom}"
        );
    }
    assert_eq!(
        run.problems(&admin),
        Vec::<String>::new(),
        "errors while loading {url}\nstderr:\n{}",
        run.stderr_tail()
    );
    // The page is one document: nothing else was fetched from the admin listener.
    let fetched: Vec<&str> = run
        .requests_to(&admin)
        .iter()
        .map(|r| r.url.as_str())
        .collect();
    assert_eq!(fetched, [url.as_str()], "requests of the status page");
    for r in [&shot, &run] {
        eprintln!(
            "{}: asked for /favicon.ico: {}",
            r.url,
            r.asked_for_favicon(&admin)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_page_beacon_fires_in_a_real_browser() {
    require_chromium();
    let work = Work::new("maintenance");

    // Every path goes to the pool in maintenance, but the favicon: Chromium asks for it
    // in some runs and not in others, and on the pool it would be one more maintenance
    // page (a real browser's favicon request is counted as a page, not as a beacon).
    let assets = Backend::start("assets").await;
    let text = fill(
        &config(
            "",
            r#"
[[routes]]
pool = "forums"

[[routes]]
path_prefix = "/favicon.ico"
pool = "assets"

[pools.forums]
maintenance = true
backends = []

[pools.assets]
backends = [{ name = "assets-1", address = "{{assets}}" }]
"#,
        ),
        &[&assets],
    );
    let lb = Balancer::start(&text).await;
    let before = lb.metrics().await;
    let beacons0 = metric(&before, BEACONS).unwrap_or(0.0);
    let pages0 = metric(&before, FORUMS_PAGES).unwrap_or(0.0);

    let origin = format!("http://{}", lb.v4);
    let url = format!("{origin}/");
    let beacon = format!("{origin}{}", launchday::maintenance::BEACON_PATH);
    let check_view = |run: &Run| {
        assert!(
            run.console_lines().is_empty(),
            "console output on the maintenance page: {:#?}",
            run.console_lines()
        );
        let seen: Vec<(&str, Option<u16>, Option<i64>)> = run
            .requests_to(&origin)
            .iter()
            .map(|r| (r.url.as_str(), r.status, r.net_error))
            .collect();
        // The page itself is a 503 by design; the beacon is a 204.
        assert_eq!(
            seen,
            [
                (url.as_str(), Some(503), None),
                (beacon.as_str(), Some(204), None)
            ],
            "requests of one view of the maintenance page"
        );
    };

    for view in 1..=2 {
        let run = chromium(
            &work.path,
            &format!("maintenance-dom-{view}"),
            &url,
            Mode::DumpDom,
        )
        .await;
        assert!(
            run.dom.contains("We are a little busy"),
            "view {view}: not the maintenance page:\n{}",
            run.dom
        );
        assert!(
            run.dom
                .contains(&format!("src=\"{}\"", launchday::maintenance::BEACON_PATH)),
            "view {view}: no beacon in the DOM:\n{}",
            run.dom
        );
        check_view(&run);
        eprintln!(
            "view {view}: asked for /favicon.ico: {}",
            run.asked_for_favicon(&origin)
        );
        // The beacon is answered before Chromium's load event, so it is counted by now.
        let m = lb.metrics().await;
        assert_eq!(
            metric(&m, BEACONS),
            Some(beacons0 + f64::from(view)),
            "beacons after {view} page view(s)"
        );
        assert_eq!(
            metric(&m, FORUMS_PAGES),
            Some(pages0 + f64::from(view)),
            "maintenance pages after {view} page view(s)"
        );
    }

    // A screenshot: a third view.
    let png = work.path.join("maintenance.png");
    let shot = chromium(&work.path, "maintenance-shot", &url, Mode::Screenshot(&png)).await;
    assert_png(&png, 1200, 900);
    eprintln!("maintenance page screenshot: {}", png.display());
    check_view(&shot);
    let m = lb.metrics().await;
    assert_eq!(metric(&m, BEACONS), Some(beacons0 + 3.0));
    assert_eq!(metric(&m, FORUMS_PAGES), Some(pages0 + 3.0));
}
