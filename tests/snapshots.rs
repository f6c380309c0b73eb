//! End-to-end: edge snapshots. The real balancer in-process on port 0 in front of
//! back ends on `[::1]`: a burst on a snapshotted page reaches the back end at most
//! once per refresh, hits stay fast while the back end is slow, a failing back end's
//! old copy is served until `max_stale`, conditional requests get 304, cookies
//! bypass when they count, a reload keeps copies, and the admin refresh.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{config, Balancer, Client, ControlledBackend, SlowBackend};
use http::StatusCode;

/// One pool `site` (catch-all route) on `backend`, with `snapshots` appended.
fn site(backend: SocketAddr, snapshots: &str) -> String {
    config(
        "",
        &format!(
            "[[routes]]\npool = \"site\"\n\n[pools.site]\nqueue_timeout = \"5s\"\n\
             backends = [{{ name = \"b\", address = \"{backend}\" }}]\n\n{snapshots}"
        ),
    )
}

fn from_snapshot(r: &common::Reply) -> bool {
    r.header("x-served-by").as_deref() == Some("launchday snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_a_slow_back_end_once_per_refresh_and_hits_stay_fast() {
    // The back end takes 2 s per page.
    let slow = SlowBackend::start("slow", Duration::from_secs(2)).await;
    let t0 = Instant::now();
    let lb = Balancer::start(&site(
        slow.addr,
        "[[snapshots]]\npool = \"site\"\npaths = [\"/\"]\nrefresh = \"1s\"\n",
    ))
    .await;
    // The first request waits for the first fetch (single-flight), then every
    // request is a hit.
    let first = Client::connect(lb.v6).await.get("/").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert!(from_snapshot(&first));
    // The first fetch, and perhaps the next refresh already (refresh counts from the
    // start of a fetch, and this one took 2 s).
    assert!(
        slow.count() <= 2,
        "{} fetches for the first fill",
        slow.count()
    );

    // 10,000 requests over at most 5 s from 10 keep-alive clients.
    let started = Instant::now();
    let clients: Vec<_> = (0..10)
        .map(|i| {
            let addr = if i % 2 == 0 { lb.v4 } else { lb.v6 };
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                let mut took = Vec::with_capacity(1000);
                while took.len() < 1000 && started.elapsed() < Duration::from_secs(5) {
                    let t = Instant::now();
                    let r = c.get("/").await;
                    took.push(t.elapsed());
                    assert_eq!(r.status, StatusCode::OK);
                    assert!(from_snapshot(&r), "every request is a hit");
                }
                took
            })
        })
        .collect();
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.expect("client"));
    }
    // Let the burst's full 5 s pass so refreshes are counted over the whole window.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(started.elapsed())).await;
    // Every fetch since the balancer started: at most one per refresh interval.
    let window = t0.elapsed().as_secs_f64().ceil();
    all.sort();
    let p99 = all[all.len() * 99 / 100];
    let fetches = slow.count();
    eprintln!(
        "snapshots: {} requests in {:?}, p99 {p99:?}, {fetches} back-end fetches",
        all.len(),
        started.elapsed()
    );
    assert!(all.len() >= 2000, "only {} requests", all.len());
    assert!(
        fetches as f64 <= 1.0 + window,
        "{fetches} fetches in {window} s with refresh 1 s"
    );
    assert!(p99 < Duration::from_millis(10), "p99 {p99:?}");
    assert_eq!(slow.max_in_flight(), 1, "never two fetches at once");
    let hits = lb
        .metric("launchday_snapshot_hits_total{snapshot=\"/\"}")
        .await
        .expect("hits metric");
    assert!(hits >= all.len() as f64, "hits {hits}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_back_end_gets_the_old_copy_served_until_max_stale() {
    let b = ControlledBackend::start("b").await;
    let lb = Balancer::start(&site(
        b.addr,
        "[[snapshots]]\npool = \"site\"\npaths = [\"/news\"]\nrefresh = \"200ms\"\nmax_stale = \"1500ms\"\n",
    ))
    .await;
    let mut c = Client::connect(lb.v4).await;
    let good = c.get("/news").await;
    assert_eq!(good.status, StatusCode::OK);
    assert!(from_snapshot(&good));
    let filled = Instant::now();
    b.set_status(500);
    // While the copy is younger than max_stale, it is served.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stale = c.get("/news").await;
    assert_eq!(stale.status, StatusCode::OK);
    assert!(from_snapshot(&stale));
    assert_eq!(stale.body, good.body, "the last good copy");
    // Then the page falls through to the back end (and its 500).
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(filled.elapsed())).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let through = c.get("/news").await;
    assert_eq!(through.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!from_snapshot(&through));
    let errors = lb
        .metric("launchday_snapshot_refreshes_total{result=\"not_200\",snapshot=\"/news\"}")
        .await
        .unwrap_or(0.0);
    assert!(errors >= 2.0, "non-200 refreshes counted: {errors}");
    // The back end recovers: the next refresh fills the copy again.
    b.set_status(200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(from_snapshot(&c.get("/news").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_get_304_and_cookies_bypass_only_when_they_count() {
    let b = ControlledBackend::start("b").await;
    let lb = Balancer::start(&site(
        b.addr,
        "[[snapshots]]\npool = \"site\"\npaths = [\"/\"]\n\n\
         [[snapshots]]\npool = \"site\"\npaths = [\"/me\"]\nignore_cookies = false\n",
    ))
    .await;
    let mut c = Client::connect(lb.v6).await;
    let r = c.get("/").await;
    assert!(from_snapshot(&r));
    let etag = r.header("etag").expect("an ETag");
    assert!(r.header("age").is_some(), "Age is set");
    let not_modified = c.get_with("/", &[("if-none-match", &etag)]).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(not_modified.body.is_empty());
    let other = c
        .get_with("/", &[("if-none-match", "\"something-else\"")])
        .await;
    assert_eq!(other.status, StatusCode::OK);

    // Cookies are ignored on "/" (the same copy for everyone)...
    let before = b.traffic();
    assert!(from_snapshot(
        &c.get_with("/", &[("cookie", "session=1")]).await
    ));
    // ...but bypass the snapshot of "/me".
    assert!(from_snapshot(&c.get("/me").await));
    let with_cookie = c.get_with("/me", &[("cookie", "session=1")]).await;
    assert_eq!(with_cookie.status, StatusCode::OK);
    assert!(!from_snapshot(&with_cookie));
    assert_eq!(with_cookie.header("x-backend").as_deref(), Some("b"));
    assert!(b.traffic() > before);
    // Other methods always proxy.
    let post = c
        .send(common::request(
            http::Method::POST,
            "/",
            &[],
            bytes::Bytes::from_static(b"x"),
        ))
        .await;
    assert!(!from_snapshot(&post));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_copy_and_the_admin_api_refreshes_now() {
    let b = ControlledBackend::start("b").await;
    let entry = |refresh: &str| {
        format!("[[snapshots]]\npool = \"site\"\npaths = [\"/\"]\nrefresh = \"{refresh}\"\n")
    };
    let lb = Balancer::start(&site(b.addr, &entry("1h"))).await;
    let mut c = Client::connect(lb.v4).await;
    assert!(from_snapshot(&c.get("/").await));
    let fetched = b.traffic();

    // A reload with another refresh: the copy stays, no new fetch.
    let text = site(b.addr, &entry("30m"));
    let snapshot =
        launchday::config::load_str(&text, std::path::Path::new("."), None).expect("valid config");
    lb.server.apply(snapshot).await.expect("reload");
    let r = c.get("/").await;
    assert!(from_snapshot(&r));
    assert_eq!(b.traffic(), fetched, "the reload kept the copy");

    // The admin API fetches now and says how it went.
    let refreshed = lb.admin_post("/api/snapshots/refresh", "").await;
    assert_eq!(refreshed.status, StatusCode::OK, "{}", refreshed.text());
    assert_eq!(refreshed.text(), "/: ok\n");
    assert_eq!(b.traffic(), fetched + 1);
    let unknown = lb.admin_post("/api/snapshots/refresh?name=/nope", "").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}
