//! Behaviour of [`Snapshots`] through its public API, with a fake back end and paused
//! time: single-flight, cadence, stale copies, bypasses, reloads, forced refreshes.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::Method;
use tokio::time::{sleep, sleep_until, Instant};

use super::testing::{body, get, metrics_text, snapshots, spec, Answer, FakeFetch};
use super::{EdgeError, RefreshResult, SnapshotSpec};
use crate::body::Body;

fn none() -> HeaderMap {
    HeaderMap::new()
}

fn with(name: header::HeaderName, value: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(name, HeaderValue::from_static(value));
    h
}

#[tokio::test(start_paused = true)]
async fn first_requests_wait_for_one_fetch() {
    let fake = FakeFetch::new(Answer::Page("v1"));
    fake.set_delay(Duration::from_secs(2));
    let (s, _r) = snapshots(vec![spec("blog:/", "/", 60, 3600)], &fake);
    let t0 = Instant::now();
    let waiters: Vec<_> = (0..100)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move { get(&s, "/", &none()).await.map(body) })
        })
        .collect();
    for w in waiters {
        assert_eq!(w.await.expect("join").as_deref(), Some(&b"v1"[..]));
    }
    assert_eq!(fake.calls(), 1);
    assert!(t0.elapsed() >= Duration::from_secs(2));
    // After the fill, answers are immediate, also while a slow refresh runs.
    sleep_until(t0 + Duration::from_secs(61)).await;
    assert_eq!(fake.in_flight(), 1);
    let at = Instant::now();
    for _ in 0..1000 {
        assert!(get(&s, "/", &none()).await.is_some());
    }
    assert_eq!(at.elapsed(), Duration::ZERO);
    assert_eq!(fake.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_first_fetch_lets_the_waiters_through() {
    let fake = FakeFetch::new(Answer::Fail);
    fake.set_delay(Duration::from_millis(500));
    let (s, _r) = snapshots(vec![spec("blog:/", "/", 60, 3600)], &fake);
    let t0 = Instant::now();
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move { get(&s, "/", &none()).await.is_some() })
        })
        .collect();
    for w in waiters {
        assert!(!w.await.expect("join"));
    }
    assert_eq!(t0.elapsed(), Duration::from_millis(500));
    assert_eq!(fake.calls(), 1, "the waiters started no fetch of their own");
    // No more waiting: later requests fall through at once.
    let at = Instant::now();
    assert!(get(&s, "/", &none()).await.is_none());
    assert_eq!(at.elapsed(), Duration::ZERO);
    // Without a copy, retries come every second rather than every `refresh`.
    // Fetches start at 0, 1, 2 and 3 s; the one at 3 s (answering at 3.5 s) succeeds.
    sleep_until(t0 + Duration::from_millis(3200)).await;
    assert_eq!(fake.calls(), 4);
    fake.set(Answer::Page("v1"));
    sleep_until(t0 + Duration::from_millis(3600)).await;
    assert_eq!(
        get(&s, "/", &none()).await.map(body).as_deref(),
        Some(&b"v1"[..])
    );
    assert_eq!(fake.calls(), 4);
    assert_eq!(fake.max_in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn one_fetch_per_refresh_interval() {
    let fake = FakeFetch::new(Answer::Page("v1"));
    let (s, _r) = snapshots(vec![spec("blog:/", "/", 1, 3600)], &fake);
    for _ in 0..50 {
        for _ in 0..200 {
            assert!(get(&s, "/", &none()).await.is_some());
        }
        sleep(Duration::from_millis(100)).await;
    }
    let n = fake.calls();
    assert!((5..=6).contains(&n), "{n} fetches in 5 s at refresh = 1 s");
    assert_eq!(fake.max_in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn errors_keep_the_copy_until_max_stale() {
    let fake = FakeFetch::new(Answer::Page("v1"));
    let (s, registry) = snapshots(vec![spec("blog:/", "/", 1, 10)], &fake);
    let t0 = Instant::now();
    assert!(get(&s, "/", &none()).await.is_some());
    fake.set(Answer::Status(500));
    sleep_until(t0 + Duration::from_millis(5500)).await;
    let resp = get(&s, "/", &none()).await.expect("stale copy");
    assert_eq!(resp.headers()["age"], "5");
    assert_eq!(body(resp), "v1");
    fake.set(Answer::Fail);
    sleep_until(t0 + Duration::from_millis(9900)).await;
    assert_eq!(
        get(&s, "/", &none()).await.map(body).as_deref(),
        Some(&b"v1"[..])
    );
    sleep_until(t0 + Duration::from_millis(10_100)).await;
    assert!(get(&s, "/", &none()).await.is_none(), "past max_stale");
    let text = metrics_text(&registry);
    assert!(text.contains(r#"launchday_snapshot_refreshes_total{result="ok",snapshot="blog:/"} 1"#));
    assert!(
        text.contains(
            r#"launchday_snapshot_refreshes_total{result="not_200",snapshot="blog:/"} 5"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"launchday_snapshot_refreshes_total{result="error",snapshot="blog:/"} 5"#),
        "{text}"
    );
    // The back end recovers: a new copy within a refresh interval.
    fake.set(Answer::Page("v2"));
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        get(&s, "/", &none()).await.map(body).as_deref(),
        Some(&b"v2"[..])
    );
}

#[tokio::test(start_paused = true)]
async fn conditional_requests_and_head() {
    let fake = FakeFetch::new(Answer::Page("<h1>hello</h1>"));
    let (s, _r) = snapshots(vec![spec("blog:/", "/", 60, 3600)], &fake);
    let first = get(&s, "/", &none()).await.expect("hit");
    let etag = first.headers()["etag"].clone();
    let etag: &'static str = Box::leak(etag.to_str().expect("ascii").to_owned().into_boxed_str());
    let resp = get(&s, "/", &with(header::IF_NONE_MATCH, etag))
        .await
        .expect("hit");
    assert_eq!(resp.status(), 304);
    assert!(matches!(resp.into_body(), Body::Empty));
    let resp = get(&s, "/", &with(header::IF_NONE_MATCH, "\"other\""))
        .await
        .expect("hit");
    assert_eq!(resp.status(), 200);
    let hit = s
        .serve(&Method::HEAD, None, "/", &none())
        .await
        .expect("hit");
    assert_eq!(hit.response.headers()["content-length"], "14");
    assert!(matches!(hit.response.into_body(), Body::Empty));
}

#[tokio::test(start_paused = true)]
async fn cookies_bypass_only_where_they_count() {
    let fake = FakeFetch::new(Answer::Page("v1"));
    let personal = SnapshotSpec {
        ignore_cookies: false,
        ..spec("blog:/a", "/a", 60, 3600)
    };
    let (s, _r) = snapshots(vec![personal, spec("blog:/b", "/b", 60, 3600)], &fake);
    let cookie = with(header::COOKIE, "session=1");
    assert!(get(&s, "/a", &cookie).await.is_none());
    assert!(get(&s, "/a", &none()).await.is_some());
    assert!(get(&s, "/a", &cookie).await.is_none());
    assert!(get(&s, "/b", &cookie).await.is_some());
}

#[tokio::test(start_paused = true)]
async fn methods_hosts_and_paths() {
    let fake = FakeFetch::new(Answer::Page("v1"));
    let forums = SnapshotSpec {
        pool: "forums".into(),
        host: Some("forums.example".into()),
        ..spec("forums:/", "/", 60, 3600)
    };
    let news = spec("blog:/news?page=2", "/news?page=2", 60, 3600);
    let (s, _r) = snapshots(vec![spec("blog:/", "/", 60, 3600), forums, news], &fake);
    let pool = |host: Option<&'static str>, path: &'static str, method: Method| {
        let s = Arc::clone(&s);
        async move {
            let hit = s.serve(&method, host, path, &none()).await;
            hit.map(|h| h.pool.to_string())
        }
    };
    assert_eq!(pool(None, "/", Method::GET).await.as_deref(), Some("blog"));
    assert_eq!(
        pool(Some("Forums.Example:8443"), "/", Method::GET)
            .await
            .as_deref(),
        Some("forums")
    );
    assert_eq!(
        pool(Some("other.example"), "/", Method::GET)
            .await
            .as_deref(),
        Some("blog")
    );
    assert_eq!(pool(None, "/", Method::HEAD).await.as_deref(), Some("blog"));
    assert_eq!(pool(None, "/", Method::POST).await, None);
    assert_eq!(
        pool(None, "/news?page=2", Method::GET).await.as_deref(),
        Some("blog")
    );
    assert_eq!(pool(None, "/news", Method::GET).await, None);
    assert_eq!(pool(None, "/?utm=x", Method::GET).await, None);
    assert_eq!(fake.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn reconfigure_keeps_the_copies_of_unchanged_pages() {
    let fake = FakeFetch::new(Answer::Page("v1"));
    let specs = vec![
        spec("a", "/", 60, 3600),
        spec("b", "/b", 60, 3600),
        spec("c", "/c", 60, 3600),
    ];
    let (s, _r) = snapshots(specs, &fake);
    for path in ["/", "/b", "/c"] {
        assert!(get(&s, path, &none()).await.is_some());
    }
    let t0 = Instant::now();
    fake.set(Answer::Page("v2"));
    s.reconfigure(vec![
        spec("a", "/", 30, 7200),   // same page, new timing: kept
        spec("b2", "/b", 60, 3600), // renamed: new entry, seeded with the copy
        spec("c", "/c2", 60, 3600), // other page: new
        spec("d", "/d", 60, 3600),  // new
    ])
    .expect("reconfigure");
    assert!(matches!(
        s.reconfigure(vec![spec("x", "/", 1, 1), spec("x", "/y", 1, 1)]),
        Err(EdgeError::DuplicateName(_))
    ));
    // Kept and seeded copies answer at once, before any fetch.
    assert_eq!(
        get(&s, "/", &none()).await.map(body).as_deref(),
        Some(&b"v1"[..])
    );
    assert_eq!(
        get(&s, "/b", &none()).await.map(body).as_deref(),
        Some(&b"v1"[..])
    );
    assert!(get(&s, "/c", &none()).await.is_none());
    assert_eq!(
        get(&s, "/c2", &none()).await.map(body).as_deref(),
        Some(&b"v2"[..])
    );
    sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.calls_for("/"), 1);
    assert_eq!(fake.calls_for("/b"), 2);
    assert_eq!(fake.calls_for("/d"), 1);
    let status = s.status();
    let names: Vec<_> = status.iter().map(|st| st.name.as_str()).collect();
    assert_eq!(names, ["a", "b2", "c", "d"]);
    assert_eq!(status[0].refresh_seconds, 30.0);
    assert!(status[0].serving);
    // The kept entry runs on its new refresh (30 s after its last fetch).
    sleep_until(t0 + Duration::from_secs(31)).await;
    assert_eq!(fake.calls_for("/"), 2);
    assert_eq!(fake.calls_for("/c"), 1, "the removed entry stopped");
}

#[tokio::test(start_paused = true)]
async fn refresh_now_never_overlaps_a_slow_fetch() {
    let fake = FakeFetch::new(Answer::Page("v1"));
    fake.set_delay(Duration::from_secs(5));
    let (s, _r) = snapshots(vec![spec("blog:/", "/", 60, 3600)], &fake);
    sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.in_flight(), 1);
    for i in 0..100 {
        assert_eq!(s.refresh_now(None).expect("all"), 1);
        assert_eq!(s.refresh_now(Some("blog:/")).expect("one"), 1);
        if i % 10 == 0 {
            sleep(Duration::from_millis(300)).await;
        }
    }
    sleep(Duration::from_secs(20)).await;
    // The one running, then exactly one more that started after the requests.
    assert_eq!(fake.calls(), 2);
    assert_eq!(fake.max_in_flight(), 1);
    let done = s.refresh_and_wait(Some("blog:/")).await.expect("refresh");
    assert_eq!(done, [("blog:/".to_owned(), Some(RefreshResult::Ok))]);
    assert_eq!(fake.calls(), 3);
    assert_eq!(fake.max_in_flight(), 1);
    assert!(matches!(
        s.refresh_now(Some("nope")),
        Err(EdgeError::Unknown(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_registry_stops_its_tasks() {
    let fake = FakeFetch::new(Answer::Page("v1"));
    let (s, _r) = snapshots(vec![spec("blog:/", "/", 1, 3600)], &fake);
    assert!(get(&s, "/", &none()).await.is_some());
    drop(s);
    let n = fake.calls();
    sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.calls(), n);
}
