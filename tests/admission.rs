//! End-to-end: admission. The real balancer, started in-process on port 0, in front of
//! slow (or held) back ends on `[::1]`: per-back-end `max_connections`, the per-pool
//! queue and its shedding rules (`queue_full`, `queue_timeout`, `predicted_wait`,
//! `manual`, `no_backend`), writes before reads, the maintenance page (headers,
//! encodings, analytics, beacon, write variant, custom template), its metrics, and
//! the admin maintenance switch.
//!
//! Back ends that must stay busy are *held* (they answer nothing until released), so
//! that the state of a queue is known exactly when a test looks at it; the tests wait
//! for gauges and counts instead of sleeping.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{config, metric, request, Backend, Balancer, Client, Reply, SlowBackend, STEP};
use http::{Method, StatusCode};
use tokio::task::JoinHandle;

/// The analytics snippet every config here uses.
const ANALYTICS: &str =
    r#"<script defer src="https://stats.example.net/t.js" data-site="launch-42"></script>"#;
const BEACON: &str = "/.well-known/launchday/beacon";

/// `[maintenance]` with `Retry-After: 7` and [`ANALYTICS`].
fn maintenance_table() -> String {
    format!("[maintenance]\nretry_after = \"7s\"\nanalytics = '{ANALYTICS}'\n")
}

/// A config with one pool `name` (catch-all route) in front of `backend`.
fn one_pool(name: &str, backend: SocketAddr, max: u32, depth: usize, timeout: &str) -> String {
    config(
        "",
        &format!(
            r#"
[[routes]]
pool = "{name}"

[pools.{name}]
queue_depth = {depth}
queue_timeout = "{timeout}"
backends = [{{ name = "b", address = "{backend}", max_connections = {max} }}]

{maint}"#,
            maint = maintenance_table()
        ),
    )
}

/// A config with one pool `closed` in manual maintenance (no back ends) behind a
/// catch-all route; `/submit/` is a `class = "write"` route to it.
fn closed_pool() -> String {
    config(
        "",
        &format!(
            r#"
[[routes]]
pool = "closed"

[[routes]]
path_prefix = "/submit/"
pool = "closed"
class = "write"

[pools.closed]
maintenance = true
backends = []

{maint}"#,
            maint = maintenance_table()
        ),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enc {
    Identity,
    Gzip,
    Brotli,
}

impl Enc {
    /// The `Accept-Encoding` that selects it (`None`: send no header).
    fn accept(self) -> Option<&'static str> {
        match self {
            Enc::Identity => None,
            Enc::Gzip => Some("gzip"),
            Enc::Brotli => Some("gzip, deflate, br"),
        }
    }

    fn headers(self) -> Vec<(&'static str, &'static str)> {
        self.accept()
            .map(|a| vec![("accept-encoding", a)])
            .unwrap_or_default()
    }
}

/// Checks that `r` is the maintenance page with `X-Launchday-Error: reason`, every
/// header of the contract, and body encoding `enc`; returns the decoded HTML.
fn page(r: &Reply, reason: &str, enc: Enc) -> String {
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert_eq!(r.header("x-launchday-error").as_deref(), Some(reason));
    assert_eq!(r.header("retry-after").as_deref(), Some("7"));
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(r.header("vary").as_deref(), Some("Accept-Encoding"));
    assert_eq!(r.header("x-served-by").as_deref(), Some("launchday"));
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string()),
        "content-length of the bytes sent"
    );
    let html = match enc {
        Enc::Identity => {
            assert_eq!(r.header("content-encoding"), None);
            r.body.to_vec()
        }
        Enc::Gzip => {
            assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&r.body[..])
                .read_to_end(&mut out)
                .expect("the gzip body decompresses");
            out
        }
        Enc::Brotli => {
            assert_eq!(r.header("content-encoding").as_deref(), Some("br"));
            let mut out = Vec::new();
            brotli::Decompressor::new(&r.body[..], 4096)
                .read_to_end(&mut out)
                .expect("the brotli body decompresses");
            out
        }
    };
    let html = String::from_utf8(html).expect("the page is UTF-8");
    assert!(
        html.contains(ANALYTICS),
        "analytics snippet missing:\n{html}"
    );
    assert!(
        html.contains(&format!("<img src=\"{BEACON}\"")),
        "beacon missing:\n{html}"
    );
    assert!(!html.contains("{{"), "unfilled placeholder:\n{html}");
    html
}

/// A read's page: [`page`], without the write notice, connection kept alive.
fn read_page(r: &Reply, reason: &str, enc: Enc) -> String {
    let html = page(r, reason, enc);
    assert!(!html.contains("NOT saved"), "read page says NOT saved");
    assert_eq!(r.header("connection"), None, "bodiless request: keep-alive");
    html
}

/// `launchday_shed_total` of one (pool, reason, class).
fn shed(pool: &str, reason: &str, class: &str) -> String {
    format!(r#"launchday_shed_total{{class="{class}",pool="{pool}",reason="{reason}"}}"#)
}

fn depth(pool: &str) -> String {
    format!(r#"launchday_queue_depth{{pool="{pool}"}}"#)
}

fn pages(pool: &str) -> String {
    format!(r#"launchday_maintenance_pages_total{{pool="{pool}"}}"#)
}

/// Every `launchday_shed_total` series of `pool` with a non-zero value.
fn nonzero_sheds(metrics: &str, pool: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for reason in [
        "queue_full",
        "queue_timeout",
        "predicted_wait",
        "no_backend",
        "manual",
    ] {
        for class in ["read", "write"] {
            let series = shed(pool, reason, class);
            let v = metric(metrics, &series).unwrap_or(0.0);
            if v != 0.0 {
                out.push((format!("{reason}/{class}"), v));
            }
        }
    }
    out
}

/// Sends `GET path` on a fresh connection to `addr` in a task.
async fn spawn_get(addr: SocketAddr, path: &str) -> JoinHandle<Reply> {
    let mut c = Client::connect(addr).await;
    let path = path.to_owned();
    tokio::spawn(async move { c.get(&path).await })
}

/// Awaits a spawned request (bounded).
async fn join(h: JoinHandle<Reply>) -> Reply {
    tokio::time::timeout(STEP, h)
        .await
        .expect("answer in time")
        .expect("request task")
}

fn pool_service_time(lb: &Balancer, pool: &str) -> Option<Duration> {
    let live = lb.server.proxy().live();
    live.pools
        .iter()
        .find(|p| p.name() == pool)
        .expect("pool")
        .service_time()
}

// ---------------------------------------------------------------------------------
// 1. Queue full
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_20_gets_serves_2_plus_4_queued_and_sheds_14_to_the_page() {
    let slow = SlowBackend::held("b", Duration::from_secs(1)).await;
    let lb = Balancer::start(&one_pool("shop", slow.addr, 2, 4, "5s")).await;
    // A fresh pool has no service-time estimate: no predicted-wait shedding.
    assert_eq!(pool_service_time(&lb, "shop"), None);

    // 20 connections, then 20 requests at once.
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(Client::connect(if i % 2 == 0 { lb.v4 } else { lb.v6 }).await);
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(21));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, mut c) in clients.into_iter().enumerate() {
        let enc = [Enc::Identity, Enc::Gzip, Enc::Brotli][i % 3];
        let start = std::sync::Arc::clone(&start);
        let tx = tx.clone();
        tokio::spawn(async move {
            start.wait().await;
            let r = c.get_with(&format!("/item/{i}"), &enc.headers()).await;
            let _ = tx.send((i, enc, r));
        });
    }
    drop(tx);
    start.wait().await;

    // While the back end holds its two requests: 14 pages, 4 waiting, nothing served.
    let mut shed_ids = Vec::new();
    while shed_ids.len() < 14 {
        let (i, enc, r) = tokio::time::timeout(STEP, rx.recv())
            .await
            .expect("14 pages in time")
            .expect("a reply");
        assert_ne!(r.status, StatusCode::OK, "request {i} served while held");
        read_page(&r, "queue_full", enc);
        shed_ids.push(i);
    }
    lb.wait_metric(&depth("shop"), 4.0).await;
    slow.wait_count(2).await;
    assert_eq!(slow.count(), 2);
    assert_eq!(slow.in_flight(), 2);
    assert!(rx.try_recv().is_err(), "only 14 answers before release");

    slow.release();
    let mut served = Vec::new();
    while let Some((i, _, r)) = tokio::time::timeout(STEP, rx.recv())
        .await
        .expect("all answers in time")
    {
        assert_eq!(r.status, StatusCode::OK, "request {i}: {r:?}");
        assert_eq!(r.text(), "served by b\n");
        served.push(i);
    }
    assert_eq!(served.len(), 6, "served {served:?}, shed {shed_ids:?}");
    assert_eq!(slow.count(), 6);
    assert_eq!(slow.max_in_flight(), 2, "max_connections = 2");
    let mut seen: Vec<String> = slow
        .requests()
        .iter()
        .map(|s| s.uri.path().to_owned())
        .collect();
    let mut expected: Vec<String> = served.iter().map(|i| format!("/item/{i}")).collect();
    seen.sort();
    expected.sort();
    assert_eq!(
        seen, expected,
        "the back end saw exactly the served requests"
    );

    let m = lb.metrics().await;
    assert_eq!(
        metric(&m, &shed("shop", "queue_full", "read")),
        Some(14.0),
        "{m}"
    );
    assert_eq!(
        nonzero_sheds(&m, "shop"),
        [("queue_full/read".to_owned(), 14.0)]
    );
    assert_eq!(metric(&m, &pages("shop")), Some(14.0));
    assert_eq!(metric(&m, &depth("shop")), Some(0.0));
    assert_eq!(
        metric(&m, r#"launchday_queue_wait_seconds_count{pool="shop"}"#),
        Some(4.0),
        "the 4 queued requests"
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="-",code="5xx",pool="shop"}"#
        ),
        Some(14.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"launchday_requests_total{backend="b",code="2xx",pool="shop"}"#
        ),
        Some(6.0)
    );
}

// ---------------------------------------------------------------------------------
// 2. A write displaces the newest waiting read and is served first
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_post_at_a_full_queue_displaces_the_newest_get_and_is_served_first() {
    let slow = SlowBackend::held("b", Duration::ZERO).await;
    let lb = Balancer::start(&one_pool("forum", slow.addr, 1, 3, "5s")).await;

    let a = spawn_get(lb.v6, "/a").await;
    slow.wait_count(1).await;
    let mut queued = Vec::new();
    for (n, path) in ["/q1", "/q2", "/q3"].into_iter().enumerate() {
        queued.push(spawn_get(lb.v4, path).await);
        lb.wait_metric(&depth("forum"), (n + 1) as f64).await;
    }

    let form = Bytes::from_static(b"title=launch&body=it%20works");
    let mut poster = Client::connect(lb.v6).await;
    let post = tokio::spawn({
        let form = form.clone();
        async move {
            poster
                .send(request(
                    Method::POST,
                    "/submit",
                    &[("content-type", "application/x-www-form-urlencoded")],
                    form,
                ))
                .await
        }
    });
    // The newest read (/q3) is shed at once, while the back end still holds /a.
    let q3 = join(queued.pop().expect("q3")).await;
    read_page(&q3, "queue_full", Enc::Identity);
    assert_eq!(slow.count(), 1);
    lb.wait_metric(&depth("forum"), 3.0).await;

    slow.release();
    let a = join(a).await;
    assert_eq!(a.status, StatusCode::OK);
    let post = tokio::time::timeout(STEP, post)
        .await
        .expect("post in time")
        .expect("post task");
    assert_eq!(post.status, StatusCode::OK, "{post:?}");
    assert_eq!(post.text(), "served by b\n");
    for (q, path) in queued.into_iter().zip(["/q1", "/q2"]) {
        let r = join(q).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {r:?}");
    }

    // Order at the back end: the one in flight, then the write, then the reads FIFO.
    let seen = slow.requests();
    let order: Vec<String> = seen
        .iter()
        .map(|s| format!("{} {}", s.method, s.uri.path()))
        .collect();
    assert_eq!(order, ["GET /a", "POST /submit", "GET /q1", "GET /q2"]);
    let posts: Vec<_> = seen.iter().filter(|s| s.method == Method::POST).collect();
    assert_eq!(posts.len(), 1, "the POST reached the back end exactly once");
    assert_eq!(posts[0].body, form, "body intact");
    assert_eq!(posts[0].one("content-length"), Some(form.len().to_string()));

    let m = lb.metrics().await;
    assert_eq!(
        nonzero_sheds(&m, "forum"),
        [("queue_full/read".to_owned(), 1.0)]
    );
    assert_eq!(metric(&m, &pages("forum")), Some(1.0));
    assert_eq!(metric(&m, &depth("forum")), Some(0.0));
}

// ---------------------------------------------------------------------------------
// 3. Pools are isolated
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saturated_slow_pool_does_not_slow_down_a_fast_pool() {
    let slow = SlowBackend::held("slow", Duration::from_secs(1)).await;
    let fast = Backend::start("fast").await;
    let text = config(
        "",
        &format!(
            r#"
[[routes]]
path_prefix = "/forums/"
pool = "forums"

[[routes]]
pool = "blog"

[pools.forums]
queue_depth = 10
queue_timeout = "30s"
backends = [{{ name = "slow", address = "{slow}", max_connections = 1 }}]

[pools.blog]
backends = [{{ name = "fast", address = "{fast}", max_connections = 1 }}]

{maint}"#,
            slow = slow.addr,
            fast = fast.addr,
            maint = maintenance_table()
        ),
    );
    let lb = Balancer::start(&text).await;

    let mut waiting = Vec::new();
    for i in 0..11 {
        waiting.push(spawn_get(lb.v6, &format!("/forums/t/{i}")).await);
    }
    slow.wait_count(1).await;
    lb.wait_metric(&depth("forums"), 10.0).await;
    // Saturated: the next one is shed.
    let r = Client::connect(lb.v4).await.get("/forums/t/11").await;
    read_page(&r, "queue_full", Enc::Identity);

    let mut c = Client::connect(lb.v4).await;
    for i in 0..20 {
        let t = Instant::now();
        let r = c.get(&format!("/post/{i}")).await;
        let took = t.elapsed();
        assert_eq!(r.status, StatusCode::OK, "request {i}: {r:?}");
        assert_eq!(r.text(), "served by fast\n");
        assert!(
            took < Duration::from_millis(50),
            "fast request {i} took {took:?}"
        );
    }
    assert_eq!(fast.count(), 20);

    // The slow pool stayed saturated the whole time.
    let m = lb.metrics().await;
    assert_eq!(metric(&m, &depth("forums")), Some(10.0));
    assert_eq!(metric(&m, &depth("blog")), Some(0.0));
    assert_eq!(slow.count(), 1);
    assert_eq!(nonzero_sheds(&m, "blog"), []);
    assert_eq!(
        nonzero_sheds(&m, "forums"),
        [("queue_full/read".to_owned(), 1.0)]
    );
    for h in waiting {
        assert!(!h.is_finished(), "a queued request was answered");
        h.abort();
    }
}

// ---------------------------------------------------------------------------------
// 4. The beacon
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_beacon_answers_204_on_both_front_ends_and_counts_each_hit() {
    // The only route is for another host: the beacon is answered before routing.
    let text = config(
        "",
        &format!(
            r#"
[[routes]]
host = "shop.example"
pool = "closed"

[pools.closed]
maintenance = true
backends = []

{maint}"#,
            maint = maintenance_table()
        ),
    );
    let lb = Balancer::start(&text).await;
    let beacons = "launchday_maintenance_beacons_total";
    assert_eq!(lb.metric(beacons).await, Some(0.0));

    let unrouted = Client::connect(lb.v4).await.get("/").await;
    assert_eq!(unrouted.status, StatusCode::NOT_FOUND);

    let mut hits = 0.0;
    for addr in [lb.v4, lb.v6, lb.v4, lb.v6] {
        let mut c = Client::connect(addr).await;
        let r = c.get(BEACON).await;
        hits += 1.0;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{addr}: {r:?}");
        assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
        assert!(r.body.is_empty());
        assert_eq!(
            lb.metric(beacons).await,
            Some(hits),
            "after a hit on {addr}"
        );
        // Same connection, again: kept alive, counted again.
        let r = c.get(BEACON).await;
        hits += 1.0;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        assert_eq!(lb.metric(beacons).await, Some(hits));
    }

    // The page references exactly that path, once, as an image.
    let r = Client::connect(lb.v6)
        .await
        .get_with("/", &[("host", "shop.example")])
        .await;
    let html = read_page(&r, "manual", Enc::Identity);
    let imgs: Vec<&str> = html
        .match_indices("<img")
        .map(|(i, _)| &html[i..])
        .collect();
    assert_eq!(imgs.len(), 1, "{html}");
    let src = imgs[0]
        .split("src=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("img src");
    assert_eq!(src, BEACON);
    assert_eq!(html.matches(BEACON).count(), 1, "{html}");

    // Beacons are not pages and not visitors.
    let m = lb.metrics().await;
    assert_eq!(metric(&m, beacons), Some(hits));
    assert_eq!(metric(&m, &pages("closed")), Some(1.0));
    assert_eq!(
        metric(&m, "launchday_maintenance_unique_visitors"),
        Some(1.0)
    );
}

// ---------------------------------------------------------------------------------
// 5. queue_timeout
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_shed_after_queue_timeout() {
    let slow = SlowBackend::start("b", Duration::from_secs(2)).await;
    let lb = Balancer::start(&one_pool("shop", slow.addr, 1, 10, "300ms")).await;

    let a = spawn_get(lb.v6, "/a").await;
    slow.wait_count(1).await;
    let mut c = Client::connect(lb.v4).await;
    let t = Instant::now();
    let r = c.get("/b").await;
    let waited = t.elapsed();
    read_page(&r, "queue_timeout", Enc::Identity);
    assert!(
        waited >= Duration::from_millis(250) && waited <= Duration::from_millis(1500),
        "shed after {waited:?}, expected about 300 ms"
    );
    assert_eq!(
        slow.count(),
        1,
        "the timed-out request never reached the back end"
    );
    // The connection stays usable.
    assert!(c.is_open());

    let m = lb.metrics().await;
    assert_eq!(
        nonzero_sheds(&m, "shop"),
        [("queue_timeout/read".to_owned(), 1.0)]
    );
    assert_eq!(metric(&m, &depth("shop")), Some(0.0));
    assert_eq!(
        metric(&m, r#"launchday_queue_wait_seconds_count{pool="shop"}"#),
        Some(1.0)
    );
    let a = join(a).await;
    assert_eq!(a.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------
// 6. predicted_wait
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_arrival_predicted_to_wait_too_long_is_shed_at_once() {
    let timeout = Duration::from_secs(1);
    let slow = SlowBackend::start("b", Duration::from_millis(400)).await;
    let lb = Balancer::start(&one_pool("shop", slow.addr, 1, 10, "1s")).await;

    // Teach the pool its service time: about 400 ms.
    let mut c = Client::connect(lb.v6).await;
    for i in 0..3 {
        let r = c.get(&format!("/learn/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "learning request {i}");
    }
    let estimate = pool_service_time(&lb, "shop").expect("an estimate after 3 requests");
    assert!(
        estimate >= Duration::from_millis(390) && estimate < timeout,
        "estimate {estimate:?}"
    );
    // Position p (capacity 1) is predicted to wait p × estimate: the first position
    // over the timeout is shed on arrival; the ones before it queue.
    let shed_at = (1..=10u32)
        .find(|&p| estimate * p > timeout)
        .expect("some position is over the timeout");
    assert!(shed_at >= 2, "estimate {estimate:?}");

    slow.hold();
    let a = spawn_get(lb.v6, "/a").await;
    slow.wait_count(4).await;
    let mut queued = Vec::new();
    for p in 1..shed_at {
        queued.push(spawn_get(lb.v4, &format!("/q{p}")).await);
        lb.wait_metric(&depth("shop"), f64::from(p)).await;
    }
    let mut c = Client::connect(lb.v4).await;
    let t = Instant::now();
    let r = c.get("/late").await;
    let took = t.elapsed();
    read_page(&r, "predicted_wait", Enc::Identity);
    assert!(
        took < Duration::from_millis(100),
        "predicted-wait shed took {took:?}"
    );
    assert_eq!(
        slow.count(),
        4,
        "the shed request never reached the back end"
    );
    assert_eq!(
        lb.metric(&depth("shop")).await,
        Some(f64::from(shed_at - 1)),
        "the shed request never queued"
    );

    // The ones that did queue wait their timeout (the back end is held).
    for q in queued {
        read_page(&join(q).await, "queue_timeout", Enc::Identity);
    }
    slow.release();
    assert_eq!(join(a).await.status, StatusCode::OK);
    let m = lb.metrics().await;
    let mut expected = vec![("queue_timeout/read".to_owned(), f64::from(shed_at - 1))];
    expected.push(("predicted_wait/read".to_owned(), 1.0));
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let mut got = nonzero_sheds(&m, "shop");
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, expected);
}

// ---------------------------------------------------------------------------------
// 7. Manual maintenance and no_backend
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_maintenance_by_admin_api_and_by_config() {
    let web = Backend::start("web").await;
    let drained = Backend::start("drained").await;
    let text = config(
        "",
        &format!(
            r#"
[[routes]]
path_prefix = "/closed/"
pool = "closed"

[[routes]]
path_prefix = "/drained/"
pool = "drained"

[[routes]]
pool = "web"

[pools.web]
backends = [{{ name = "web", address = "{web}" }}]

[pools.closed]
maintenance = true
backends = []

[pools.drained]
backends = [{{ name = "drained", address = "{drained}", weight = 0 }}]

{maint}"#,
            web = web.addr,
            drained = drained.addr,
            maint = maintenance_table()
        ),
    );
    let lb = Balancer::start(&text).await;
    let mut c = Client::connect(lb.v6).await;
    assert_eq!(c.get("/").await.status, StatusCode::OK);

    let on = lb.admin_post("/api/pools/web/maintenance", "on").await;
    assert_eq!(on.status, StatusCode::OK, "{}", on.text());
    for i in 0..5 {
        read_page(&c.get(&format!("/p/{i}")).await, "manual", Enc::Identity);
    }
    let post = c
        .send(request(
            Method::POST,
            "/comment",
            &[],
            Bytes::from_static(b"x=1"),
        ))
        .await;
    assert!(page(&post, "manual", Enc::Identity).contains("NOT saved"));
    assert_eq!(web.count(), 1, "nothing proxied while in maintenance");

    let off = lb.admin_post("/api/pools/web/maintenance", "off").await;
    assert_eq!(off.status, StatusCode::OK, "{}", off.text());
    let mut c = Client::connect(lb.v4).await;
    let r = c.get("/back").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.text(), "served by web\n");
    assert_eq!(web.count(), 2);

    let bad = lb.admin_post("/api/pools/web/maintenance", "maybe").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text());
    assert_eq!(
        c.get("/still").await.status,
        StatusCode::OK,
        "bad body changes nothing"
    );
    let unknown = lb.admin_post("/api/pools/nope/maintenance", "on").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.text());
    // Not on the public listener.
    let public = Client::connect(lb.v4)
        .await
        .send(request(
            Method::POST,
            "/api/pools/web/maintenance",
            &[],
            Bytes::from_static(b"on"),
        ))
        .await;
    assert_eq!(public.status, StatusCode::OK, "proxied to the back end");
    assert_eq!(c.get("/still").await.status, StatusCode::OK);

    // Config: maintenance = true with no back ends; all weights 0: no_backend.
    read_page(&c.get("/closed/x").await, "manual", Enc::Identity);
    read_page(&c.get("/drained/x").await, "no_backend", Enc::Identity);
    assert_eq!(drained.count(), 0);

    let m = lb.metrics().await;
    assert_eq!(
        nonzero_sheds(&m, "web"),
        [
            ("manual/read".to_owned(), 5.0),
            ("manual/write".to_owned(), 1.0)
        ]
    );
    assert_eq!(
        nonzero_sheds(&m, "closed"),
        [("manual/read".to_owned(), 1.0)]
    );
    assert_eq!(
        nonzero_sheds(&m, "drained"),
        [("no_backend/read".to_owned(), 1.0)]
    );
    assert_eq!(metric(&m, &pages("web")), Some(6.0));
    assert_eq!(metric(&m, &pages("closed")), Some(1.0));
    assert_eq!(metric(&m, &pages("drained")), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_maintenance_on_sheds_the_waiters() {
    let slow = SlowBackend::held("b", Duration::ZERO).await;
    let lb = Balancer::start(&one_pool("shop", slow.addr, 1, 10, "5s")).await;
    let a = spawn_get(lb.v6, "/a").await;
    slow.wait_count(1).await;
    let mut queued = Vec::new();
    for i in 1..=3 {
        queued.push(spawn_get(lb.v4, &format!("/q{i}")).await);
        lb.wait_metric(&depth("shop"), f64::from(i)).await;
    }
    let on = lb.admin_post("/api/pools/shop/maintenance", "on").await;
    assert_eq!(on.status, StatusCode::OK);
    for q in queued {
        read_page(&join(q).await, "manual", Enc::Identity);
    }
    assert_eq!(lb.metric(&depth("shop")).await, Some(0.0));
    slow.release();
    assert_eq!(join(a).await.status, StatusCode::OK, "in flight: finished");
    assert_eq!(slow.count(), 1);
    let m = lb.metrics().await;
    assert_eq!(nonzero_sheds(&m, "shop"), [("manual/read".to_owned(), 3.0)]);
}

// ---------------------------------------------------------------------------------
// 8. The write variant and connection handling
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_write_says_not_saved_and_closes_a_shed_read_keeps_alive() {
    let lb = Balancer::start(&closed_pool()).await;

    // A POST with a body: the write page, and the connection is closed.
    let mut c = Client::connect(lb.v4).await;
    let r = c
        .send(request(
            Method::POST,
            "/comments",
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from_static(b"comment=first%21"),
        ))
        .await;
    let html = page(&r, "manual", Enc::Identity);
    assert!(html.contains("Your submission was NOT saved"), "{html}");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    common::wait_until("the client sees the connection closed", || !c.is_open()).await;

    // The unread body is never parsed as a request: one answer, then the close.
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let raw = common::raw(
        lb.v6,
        format!(
            "POST /comments HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(raw.matches("HTTP/1.1 ").count(), 1, "{raw}");
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    assert!(raw.contains("NOT saved"), "{raw}");

    // GETs: the read page, and the same connection serves the next request.
    let mut c = Client::connect(lb.v6).await;
    for _ in 0..2 {
        read_page(&c.get("/thread/1").await, "manual", Enc::Identity);
        assert!(c.is_open());
    }
    // A GET on a `class = "write"` route gets the write page, and keeps alive.
    let r = c.get("/submit/form").await;
    assert!(page(&r, "manual", Enc::Identity).contains("NOT saved"));
    assert_eq!(r.header("connection"), None);
    read_page(&c.get("/thread/2").await, "manual", Enc::Identity);

    let m = lb.metrics().await;
    assert_eq!(
        nonzero_sheds(&m, "closed"),
        [
            ("manual/read".to_owned(), 3.0),
            ("manual/write".to_owned(), 3.0)
        ]
    );
    assert_eq!(metric(&m, &pages("closed")), Some(6.0));
}

// ---------------------------------------------------------------------------------
// 9. Content-Encoding
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_sent_br_gzip_or_identity_as_the_client_accepts() {
    let lb = Balancer::start(&closed_pool()).await;
    let mut c = Client::connect(lb.v4).await;
    let identity = read_page(&c.get("/").await, "manual", Enc::Identity);
    assert!(identity.starts_with("<!DOCTYPE html>"), "{identity}");

    for (accept, enc) in [
        ("gzip", Enc::Gzip),
        ("br", Enc::Brotli),
        ("gzip, deflate, br", Enc::Brotli),
        ("br;q=0, gzip;q=0.5", Enc::Gzip),
        ("deflate", Enc::Identity),
        ("identity", Enc::Identity),
    ] {
        let r = c.get_with("/", &[("accept-encoding", accept)]).await;
        let html = read_page(&r, "manual", enc);
        assert_eq!(html, identity, "Accept-Encoding: {accept}");
        if enc != Enc::Identity {
            assert!(r.body.len() < identity.len(), "{accept}: compressed");
        }
    }

    // The write variant, compressed.
    let write = |accept: Option<&'static str>| {
        let headers: Vec<(&str, &str)> = accept
            .map(|a| vec![("accept-encoding", a)])
            .unwrap_or_default();
        request(Method::DELETE, "/post/7", &headers, Bytes::new())
    };
    let plain = page(&c.send(write(None)).await, "manual", Enc::Identity);
    assert!(plain.contains("NOT saved"));
    for (accept, enc) in [("gzip", Enc::Gzip), ("br", Enc::Brotli)] {
        let html = page(&c.send(write(Some(accept))).await, "manual", enc);
        assert_eq!(html, plain, "write page, Accept-Encoding: {accept}");
    }
}

// ---------------------------------------------------------------------------------
// 10. Unique visitors
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_visitors_count_client_addresses_once() {
    let lb = Balancer::start(&closed_pool()).await;
    let visitors = "launchday_maintenance_unique_visitors";
    assert_eq!(lb.metric(visitors).await, Some(0.0));

    for _ in 0..3 {
        let mut c = Client::connect(lb.v4).await;
        read_page(&c.get("/").await, "manual", Enc::Identity);
        read_page(&c.get("/again").await, "manual", Enc::Identity);
    }
    assert_eq!(lb.metric(visitors).await, Some(1.0), "127.0.0.1 only");
    for _ in 0..3 {
        let mut c = Client::connect(lb.v6).await;
        read_page(&c.get("/").await, "manual", Enc::Identity);
        // Beacons are not visitors either way.
        assert_eq!(c.get(BEACON).await.status, StatusCode::NO_CONTENT);
    }
    assert_eq!(lb.metric(visitors).await, Some(2.0), "127.0.0.1 and ::1");
    for addr in [lb.v4, lb.v6, lb.v4] {
        read_page(
            &Client::connect(addr).await.get("/").await,
            "manual",
            Enc::Identity,
        );
    }
    let m = lb.metrics().await;
    assert_eq!(metric(&m, visitors), Some(2.0));
    assert_eq!(metric(&m, &pages("closed")), Some(12.0));
}

// ---------------------------------------------------------------------------------
// 11. A custom template
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_template_file_is_served_with_its_placeholders_filled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let template = "<html><head><meta http-equiv=\"refresh\" content=\"{{retry_after}}\">\
                    {{analytics}}</head><body><h1>Launch day!</h1><div id=\"m\">{{message}}</div>\
                    <footer>ACME</footer></body></html>";
    std::fs::write(dir.path().join("maint.html"), template).expect("write template");
    let text = closed_pool().replace("[maintenance]\n", "[maintenance]\npage = \"maint.html\"\n");
    assert!(text.contains("page = \"maint.html\""));
    let lb = Balancer::start_in(&text, dir.path()).await;
    let mut c = Client::connect(lb.v4).await;

    let check = |html: &str| -> String {
        let prefix = format!(
            "<html><head><meta http-equiv=\"refresh\" content=\"7\">{ANALYTICS}</head>\
             <body><h1>Launch day!</h1><div id=\"m\">"
        );
        assert!(html.starts_with(&prefix), "{html}");
        let rest = &html[prefix.len()..];
        let (message, rest) = rest.split_once("</div>").expect("the message div");
        assert!(
            !message.trim().is_empty() && !message.contains('{'),
            "{html}"
        );
        let tail = rest
            .strip_prefix("<footer>ACME</footer>")
            .expect("the footer follows the message");
        assert!(
            tail.starts_with(&format!("<img src=\"{BEACON}\"")),
            "beacon right before </body>: {html}"
        );
        assert!(tail.ends_with("></body></html>"), "{html}");
        assert_eq!(
            tail.matches('<').count(),
            3,
            "only the beacon added: {html}"
        );
        message.to_owned()
    };
    let for_read = check(&read_page(&c.get("/").await, "manual", Enc::Identity));
    assert!(!for_read.contains("NOT saved"), "{for_read}");
    let for_write = check(&page(
        &c.send(request(Method::PUT, "/doc", &[], Bytes::new()))
            .await,
        "manual",
        Enc::Identity,
    ));
    assert!(
        for_write.contains("Your submission was NOT saved"),
        "{for_write}"
    );
    // The compressed variants are of the same page.
    let gz = read_page(
        &c.get_with("/", &[("accept-encoding", "gzip")]).await,
        "manual",
        Enc::Gzip,
    );
    assert_eq!(check(&gz), for_read);
}

// ---------------------------------------------------------------------------------
// 12. A client that goes away while queued
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_client_that_disconnects_frees_its_place() {
    use tokio::io::AsyncWriteExt;
    let slow = SlowBackend::held("b", Duration::ZERO).await;
    // A queue of one: the next request only queues if the place was really freed.
    let lb = Balancer::start(&one_pool("shop", slow.addr, 1, 1, "10s")).await;

    let a = spawn_get(lb.v6, "/a").await;
    slow.wait_count(1).await;

    for round in 0..3 {
        let mut s = tokio::net::TcpStream::connect(lb.v4)
            .await
            .expect("connect");
        s.write_all(format!("GET /gone/{round} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        lb.wait_metric(&depth("shop"), 1.0).await;
        drop(s);
        lb.wait_metric(&depth("shop"), 0.0).await;
    }

    let c = spawn_get(lb.v4, "/c").await;
    lb.wait_metric(&depth("shop"), 1.0).await;
    slow.release();
    assert_eq!(join(a).await.status, StatusCode::OK);
    let c = join(c).await;
    assert_eq!(c.status, StatusCode::OK, "{c:?}");
    let paths: Vec<String> = slow
        .requests()
        .iter()
        .map(|s| s.uri.path().to_owned())
        .collect();
    assert_eq!(
        paths,
        ["/a", "/c"],
        "the clients that left were never proxied"
    );

    let m = lb.metrics().await;
    assert_eq!(nonzero_sheds(&m, "shop"), []);
    assert_eq!(metric(&m, &pages("shop")), Some(0.0));
    assert_eq!(metric(&m, &depth("shop")), Some(0.0));
    assert_eq!(
        metric(
            &m,
            r#"launchday_backend_in_flight{backend="b",pool="shop"}"#
        ),
        Some(0.0)
    );
}

/// Like the GET case above, for writes whose body hyper has not read to its end while
/// they wait (a body larger than one read, or chunked): the client's going away must
/// free the place as well, not hold it until `queue_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_post_with_a_body_whose_client_disconnects_frees_its_place() {
    use tokio::io::AsyncWriteExt;
    let slow = SlowBackend::held("b", Duration::ZERO).await;
    let lb = Balancer::start(&one_pool("shop", slow.addr, 1, 1, "30s")).await;
    let a = spawn_get(lb.v6, "/a").await;
    slow.wait_count(1).await;

    let form = "x".repeat(64 * 1024);
    let cases = [
        (
            "Content-Length 64 KiB",
            format!(
                "POST /gone/big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{form}",
                form.len()
            ),
        ),
        (
            "chunked",
            "POST /gone/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             3\r\nx=1\r\n0\r\n\r\n"
                .to_owned(),
        ),
    ];
    let mut not_freed = Vec::new();
    for (what, bytes) in cases {
        let mut s = tokio::net::TcpStream::connect(lb.v4)
            .await
            .expect("connect");
        s.write_all(bytes.as_bytes()).await.expect("write");
        lb.wait_metric(&depth("shop"), 1.0).await;
        drop(s);
        // Far less than queue_timeout (30 s): the GET case takes about a millisecond.
        let t = Instant::now();
        let mut freed = false;
        for _ in 0..1000 {
            if lb.metric(&depth("shop")).await == Some(0.0) {
                freed = true;
                break;
            }
            if t.elapsed() > Duration::from_secs(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !freed {
            not_freed.push(what);
            // Empty the queue to go on with the next case.
            let on = lb.admin_post("/api/pools/shop/maintenance", "on").await;
            assert_eq!(on.status, StatusCode::OK);
            let off = lb.admin_post("/api/pools/shop/maintenance", "off").await;
            assert_eq!(off.status, StatusCode::OK);
            lb.wait_metric(&depth("shop"), 0.0).await;
        }
    }
    slow.release();
    assert_eq!(join(a).await.status, StatusCode::OK);
    assert_eq!(
        not_freed,
        Vec::<&str>::new(),
        "queued POSTs whose client closed the connection stayed in the queue"
    );
    assert_eq!(
        slow.count(),
        1,
        "the writes of clients that left were proxied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_left_keeps_its_slot_until_the_back_end_is_done() {
    // One slot; the back end takes 1.5 s per request.
    let slow = SlowBackend::start("slow", Duration::from_millis(1500)).await;
    let lb = Balancer::start(&one_pool("site", slow.addr, 1, 8, "5s")).await;

    // A client asks, and leaves as soon as the back end has the request.
    let mut gone = tokio::net::TcpStream::connect(lb.v6)
        .await
        .expect("connect");
    use tokio::io::AsyncWriteExt;
    gone.write_all(b"GET /left HTTP/1.1\r\nHost: site\r\n\r\n")
        .await
        .expect("write");
    slow.wait_count(1).await;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The back end is still working on it, so the next request waits for the slot
    // instead of making the back end carry two at once.
    let started = Instant::now();
    let r = join(spawn_get(lb.v6, "/next").await).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        slow.max_in_flight(),
        1,
        "a cancelled request freed its slot early"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(2000),
        "the second request waited for the first to finish ({:?})",
        started.elapsed()
    );
    // And the connection the abandoned answer came back on was kept.
    assert_eq!(slow.count(), 2);
}
