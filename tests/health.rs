//! End-to-end: health of back ends — active checks (fall, rise, `expect_status`,
//! `host`), passive checks with cooldown and half-open, slow start, backups — and
//! retries that are safe: a connect failure goes to another back end, a GET that lost
//! its connection before any answer byte is sent again, a POST that reached a back
//! end never is; an answer cut short never looks complete to the client.
//!
//! The real balancer runs in-process on port 0, the back ends on `[::1]:0`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    config, get, metric, request, Attempt, Backend, Balancer, Client, ControlledBackend,
    ScriptedBackend, TryClient, STEP,
};
use http::{Method, StatusCode};

/// Fast active checks: every 100 ms, 50 ms to answer, `rise` 2, `fall` 2.
const CHECKS: &str = r#"
[pools.web.health_check]
path = "/health"
interval = "100ms"
timeout = "50ms"
rise = 2
fall = 2
"#;

/// One pool `web` behind a catch-all route: `settings` (lines of `[pools.web]`), the
/// `backends` entries, then `extra` tables (e.g. [`CHECKS`]).
fn web(settings: &str, backends: &[String], extra: &str) -> String {
    config(
        "",
        &format!(
            "[[routes]]\npool = \"web\"\n\n[pools.web]\n{settings}\nbackends = [\n{}\n]\n{extra}",
            backends.join(",\n")
        ),
    )
}

/// One `backends` entry: `name` at `addr` with more `keys` (e.g. `weight = 2`).
fn entry(name: &str, addr: std::net::SocketAddr, keys: &str) -> String {
    let keys = if keys.is_empty() {
        String::new()
    } else {
        format!(", {keys}")
    };
    format!("  {{ name = \"{name}\", address = \"{addr}\"{keys} }}")
}

fn up(backend: &str) -> String {
    format!("launchday_backend_up{{backend=\"{backend}\",pool=\"web\"}}")
}

fn checks(backend: &str, result: &str) -> String {
    format!(
        "launchday_health_checks_total{{backend=\"{backend}\",pool=\"web\",result=\"{result}\"}}"
    )
}

fn retries(reason: &str) -> String {
    format!("launchday_retries_total{{pool=\"web\",reason=\"{reason}\"}}")
}

/// A counter's value now (absent = 0).
async fn counter(lb: &Balancer, series: &str) -> f64 {
    lb.metric(series).await.unwrap_or(0.0)
}

/// Polls the metrics until `series` satisfies `ok` (bounded by [`STEP`]); returns it.
async fn wait_metric_until(lb: &Balancer, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let start = Instant::now();
    let mut last = None;
    for _ in 0..10_000 {
        last = lb.metric(series).await;
        if let Some(v) = last.filter(|v| ok(*v)) {
            return v;
        }
        assert!(
            start.elapsed() < STEP,
            "timed out waiting on {series}; last {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("gave up waiting on {series}; last {last:?}");
}

/// The `/api/status` entry of back end `backend` of pool `pool`.
async fn status_of(lb: &Balancer, pool: &str, backend: &str) -> serde_json::Value {
    let r = get(lb.admin, "/api/status").await;
    assert_eq!(r.status, StatusCode::OK, "/api/status: {}", r.text());
    let all: serde_json::Value = serde_json::from_slice(&r.body).expect("status JSON");
    all["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .find(|p| p["name"] == pool)
        .unwrap_or_else(|| panic!("no pool {pool} in {all}"))["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["name"] == backend)
        .unwrap_or_else(|| panic!("no back end {backend} in {all}"))
        .clone()
}

/// The `"state"` of a back end in `/api/status`.
async fn state_of(lb: &Balancer, pool: &str, backend: &str) -> String {
    status_of(lb, pool, backend).await["state"]
        .as_str()
        .expect("state")
        .to_owned()
}

/// Sends `n` GETs one after another; each must be answered 200; returns which back end
/// (`X-Backend`) answered each.
async fn gets(client: &mut Client, n: usize, tag: &str) -> Vec<String> {
    let mut by = Vec::with_capacity(n);
    for i in 0..n {
        let r = client.get(&format!("/{tag}/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{tag} {i}: {}", r.text());
        by.push(r.header("x-backend").expect("X-Backend"));
    }
    by
}

/// One GET of the load loop.
#[derive(Debug)]
struct Sample {
    /// When the answer (or failure) came.
    at: Instant,
    /// The back end that answered 200, or what went wrong.
    outcome: Result<String, String>,
}

/// Sequential GETs on one keep-alive connection until `stop` (at most `limit`).
async fn load(addr: std::net::SocketAddr, stop: Arc<AtomicBool>, limit: Duration) -> Vec<Sample> {
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut client = TryClient::connect(addr).await.expect("connect");
    for i in 0..1_000_000usize {
        if stop.load(Ordering::SeqCst) || start.elapsed() >= limit {
            break;
        }
        let outcome = match client.get(&format!("/load/{i}")).await {
            Attempt::Answered(r) if r.status == StatusCode::OK => r
                .header("x-backend")
                .ok_or_else(|| format!("200 without X-Backend: {}", r.text())),
            Attempt::Answered(r) => Err(format!(
                "{} ({:?}): {}",
                r.status,
                r.header("x-launchday-error"),
                r.text().chars().take(80).collect::<String>()
            )),
            Attempt::NotSent(e) | Attempt::Failed(e) => Err(e),
        };
        let failed = outcome.is_err();
        samples.push(Sample {
            at: Instant::now(),
            outcome,
        });
        if failed && !client.is_open() {
            client = TryClient::connect(addr).await.expect("reconnect");
        }
    }
    samples
}

/// Waits (bounded) until back end `b` is up again after [`ControlledBackend::restart`],
/// checking on every scrape that it is not up before `rise` successful checks since
/// `successes_before` (the success count read while it was still stopped). A scrape
/// does not read its families at one instant (the registry gathers collectors in
/// hash order), so once `up` is seen the successes are read from the next scrape:
/// the counter only grows, and it is incremented before the state changes, while
/// checks are far apart compared with a scrape.
async fn wait_up_after_rise(lb: &Balancer, b: &str, successes_before: f64, rise: f64) {
    let start = Instant::now();
    for _ in 0..10_000 {
        let text = lb.metrics().await;
        let is_up = metric(&text, &up(b)) == Some(1.0);
        let since = metric(&text, &checks(b, "success")).unwrap_or(0.0) - successes_before;
        if is_up {
            let again = lb.metrics().await;
            let since = metric(&again, &checks(b, "success")).unwrap_or(0.0) - successes_before;
            assert!(
                since >= rise,
                "{b} came up after {since} successful checks; rise is {rise}"
            );
            return;
        }
        assert!(
            start.elapsed() < STEP,
            "{b} not up again; {since} successful checks since the restart"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("gave up waiting for {b} to come up");
}

// ---------------------------------------------------------------------------------
// 1. A back end dies under load and comes back.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_back_end_killed_under_load_costs_no_request_and_comes_back_after_rise() {
    let a = ControlledBackend::start("a").await;
    let b = ControlledBackend::start("b").await;
    let text = web(
        "",
        &[entry("a", a.addr, ""), entry("b", b.addr, "")],
        CHECKS,
    );
    let lb = Balancer::start(&text).await;
    lb.wait_metric(&up("a"), 1.0).await;
    lb.wait_metric(&up("b"), 1.0).await;

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load(lb.v6, Arc::clone(&stop), Duration::from_secs(8)));

    // Both serve; then b dies: its listener closes and its connections drop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        a.traffic() > 10 && b.traffic() > 10,
        "both serve first: a {} b {}",
        a.traffic(),
        b.traffic()
    );
    let b_successes_before = counter(&lb, &checks("b", "success")).await;
    let stopped = Instant::now();
    b.stop().await;
    assert!(
        tokio::net::TcpStream::connect(b.addr).await.is_err(),
        "a stopped back end refuses connections"
    );

    // Taken down after `fall` (2) failed checks at 100 ms (± 10% jitter).
    lb.wait_metric(&up("b"), 0.0).await;
    let down = Instant::now();
    let took = down - stopped;
    assert!(
        took < Duration::from_millis(2 * 100 + 500),
        "b taken down {took:?} after it died (fall 2 × interval 100 ms)"
    );
    assert_eq!(state_of(&lb, "web", "b").await, "down");
    let failures = counter(&lb, &checks("b", "failure")).await;
    assert!(failures >= 2.0, "{failures} failed checks");

    // From then on nothing is sent to b: no more retries away from it, every answer a's.
    let connect_retries = counter(&lb, &retries("connect_failed")).await;
    let other_retries = counter(&lb, &retries("failed_before_response")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        counter(&lb, &retries("connect_failed")).await,
        connect_retries,
        "requests still tried on the dead back end"
    );
    assert_eq!(
        counter(&lb, &retries("failed_before_response")).await,
        other_retries
    );
    assert!(
        connect_retries >= 1.0,
        "the requests that met the dead back end before it was taken down were retried"
    );

    // b comes back on the same address: up after `rise` (2) successes, traffic again.
    let b_traffic_before = b.traffic();
    let restarted = Instant::now();
    b.restart().await;
    wait_up_after_rise(&lb, "b", b_successes_before, 2.0).await;
    let back_up = Instant::now();
    common::wait_until("b gets traffic again", || {
        b.traffic() > b_traffic_before + 10
    })
    .await;

    // Keep the load going for ~3 s in all.
    if let Some(rest) = Duration::from_secs(3).checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    stop.store(true, Ordering::SeqCst);
    let samples = tokio::time::timeout(STEP, load)
        .await
        .expect("load ends")
        .expect("load task");

    let failed: Vec<&Sample> = samples.iter().filter(|s| s.outcome.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} GETs failed, e.g. {:?} (b stopped at +{:?})",
        failed.len(),
        samples.len(),
        failed.iter().take(5).collect::<Vec<_>>(),
        stopped - started
    );
    // Answered while b was taken down and stopped: only a.
    let margin = Duration::from_millis(20);
    let while_down: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > down + margin && s.at < restarted)
        .collect();
    assert!(
        while_down.len() > 10,
        "{} GETs while down",
        while_down.len()
    );
    assert!(while_down.iter().all(|s| s.outcome.as_deref() == Ok("a")));
    // After it came back, b answered again.
    let b_again = samples
        .iter()
        .filter(|s| s.at > back_up && s.outcome.as_deref() == Ok("b"))
        .count();
    assert!(b_again > 0, "b answered no GET after coming back");
    assert!(samples.len() > 100, "only {} GETs in ~3 s", samples.len());
}

// ---------------------------------------------------------------------------------
// 2. Slow start.
// ---------------------------------------------------------------------------------

/// Two back ends of weight `weight` with `slow_start = "2s"`: b dies, comes back, and
/// its share of the requests is measured in four consecutive 500 ms windows.
async fn slow_start_ramp(weight: u32) {
    let a = ControlledBackend::start("a").await;
    let b = ControlledBackend::start("b").await;
    let w = format!("weight = {weight}");
    let text = web(
        "slow_start = \"2s\"",
        &[entry("a", a.addr, &w), entry("b", b.addr, &w)],
        CHECKS,
    );
    let lb = Balancer::start(&text).await;
    lb.wait_metric(&up("a"), 1.0).await;
    lb.wait_metric(&up("b"), 1.0).await;
    let mut client = Client::connect(lb.v4).await;
    // The first coming up is not ramped (nothing to protect at start).
    let first = gets(&mut client, 40, "first").await;
    let b_first = first.iter().filter(|x| *x == "b").count();
    assert_eq!(b_first, 20, "equal weights split evenly at start");

    b.stop().await;
    lb.wait_metric(&up("b"), 0.0).await;
    let successes = counter(&lb, &checks("b", "success")).await;
    b.restart().await;
    wait_up_after_rise(&lb, "b", successes, 2.0).await;
    let back_up = Instant::now();

    let mut problems = Vec::new();
    let early = status_of(&lb, "web", "b").await;
    if early["state"] != "slow_start" {
        problems.push(format!("/api/status right after coming back: {early}"));
    }
    if early["effective_weight"].as_f64() >= Some(f64::from(weight)) {
        problems.push(format!(
            "effective_weight {} not below weight {weight} right after coming back",
            early["effective_weight"]
        ));
    }

    // Shares in consecutive 500 ms windows.
    const WINDOWS: usize = 4;
    let window = Duration::from_millis(500);
    let mut total = [0usize; WINDOWS];
    let mut to_b = [0usize; WINDOWS];
    let mut mid_ramp = None;
    for i in 0..200_000usize {
        let r = client.get(&format!("/ramp/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "ramp {i}: {}", r.text());
        let slot = (back_up.elapsed().as_nanos() / window.as_nanos()) as usize;
        if slot >= WINDOWS {
            break;
        }
        total[slot] += 1;
        if r.header("x-backend").as_deref() == Some("b") {
            to_b[slot] += 1;
        }
        if slot == 2 && mid_ramp.is_none() {
            mid_ramp = Some(status_of(&lb, "web", "b").await);
        }
    }
    let share: Vec<f64> = (0..WINDOWS)
        .map(|i| to_b[i] as f64 / total[i].max(1) as f64)
        .collect();
    assert!(
        total.iter().all(|&n| n >= 20),
        "too few requests per window to measure: {total:?}"
    );
    if share[0] >= 0.35 {
        problems.push(format!(
            "first window share {:.2} not below 0.35 (shares {share:.2?}, requests {total:?})",
            share[0]
        ));
    }
    if share[WINDOWS - 1] <= 0.40 {
        problems.push(format!(
            "last window share {:.2} not above 0.40 (shares {share:.2?})",
            share[WINDOWS - 1]
        ));
    }
    if share[0] >= share[WINDOWS - 1] {
        problems.push(format!("share does not rise: {share:.2?}"));
    }
    if let Some(mid) = mid_ramp {
        let ok = mid["state"] == "slow_start"
            && mid["effective_weight"]
                .as_f64()
                .is_some_and(|e| e < f64::from(weight));
        if !ok {
            problems.push(format!("/api/status 1 s into the 2 s ramp: {mid}"));
        }
    }
    // After the ramp: the full weight, plain "up".
    let after = status_of(&lb, "web", "b").await;
    if after["state"] != "up" || after["effective_weight"].as_f64() != Some(f64::from(weight)) {
        problems.push(format!("/api/status after the ramp: {after}"));
    }
    assert!(
        problems.is_empty(),
        "slow start with weights {weight}:{weight}:\n{}",
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_returning_back_end_with_weights_one_to_one() {
    slow_start_ramp(1).await;
}

/// The same ramp with larger integer weights (isolates the weight-1 case above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_returning_back_end_with_weights_ten_to_ten() {
    slow_start_ramp(10).await;
}

// ---------------------------------------------------------------------------------
// 3. Backups.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_serves_only_while_no_primary_is_up() {
    let primary = ControlledBackend::start("primary").await;
    let backup = ControlledBackend::start("backup").await;
    let text = web(
        "",
        &[
            entry("primary", primary.addr, "weight = 1"),
            entry("backup", backup.addr, "weight = 1, backup = true"),
        ],
        CHECKS,
    );
    let lb = Balancer::start(&text).await;
    lb.wait_metric(&up("primary"), 1.0).await;
    lb.wait_metric(&up("backup"), 1.0).await;
    let mut client = Client::connect(lb.v6).await;

    let by = gets(&mut client, 30, "primary-up").await;
    assert!(by.iter().all(|x| x == "primary"), "{by:?}");
    assert_eq!(backup.traffic(), 0);
    assert_eq!(state_of(&lb, "web", "primary").await, "up");
    assert_eq!(state_of(&lb, "web", "backup").await, "backup_idle");

    // The primary fails its checks: everything goes to the backup.
    let successes = counter(&lb, &checks("primary", "success")).await;
    primary.stop().await;
    lb.wait_metric(&up("primary"), 0.0).await;
    let primary_traffic = primary.traffic();
    let by = gets(&mut client, 30, "primary-down").await;
    assert!(by.iter().all(|x| x == "backup"), "{by:?}");
    assert_eq!(backup.traffic(), 30);
    assert_eq!(primary.traffic(), primary_traffic);
    assert_eq!(state_of(&lb, "web", "primary").await, "down");
    assert_eq!(state_of(&lb, "web", "backup").await, "backup_active");

    // The primary is back: the backup is idle again.
    primary.restart().await;
    wait_up_after_rise(&lb, "primary", successes, 2.0).await;
    let by = gets(&mut client, 30, "primary-back").await;
    assert!(by.iter().all(|x| x == "primary"), "{by:?}");
    assert_eq!(backup.traffic(), 30, "backup idle again");
    assert_eq!(state_of(&lb, "web", "backup").await, "backup_idle");
    assert_eq!(state_of(&lb, "web", "primary").await, "up");
}

// ---------------------------------------------------------------------------------
// 4. Retries only when safe.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_is_retried_after_a_lost_connection_but_a_post_is_never_sent_twice() {
    let mute = ScriptedBackend::mute().await;
    let good = Backend::start("good").await;
    let text = web(
        "retries = 1",
        &[entry("mute", mute.addr, ""), entry("good", good.addr, "")],
        "",
    );
    let lb = Balancer::start(&text).await;
    let mut client = Client::connect(lb.v4).await;

    // GETs until one met the mute back end: it is sent again to the good one.
    let before = counter(&lb, &retries("failed_before_response")).await;
    let mut met = None;
    for i in 0..10usize {
        let path = format!("/get/{i}");
        let r = client.get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "GET {i}: {}", r.text());
        assert_eq!(r.text(), "served by good\n");
        if mute.requests().iter().any(|s| s.target == path) {
            met = Some(path);
            break;
        }
    }
    let path = met.expect("some GET was sent to the mute back end");
    assert_eq!(
        counter(&lb, &retries("failed_before_response")).await,
        before + 1.0
    );
    let at_mute = mute.requests().iter().filter(|s| s.target == path).count();
    let at_good = good
        .requests()
        .iter()
        .filter(|s| s.uri.path() == path)
        .count();
    assert_eq!((at_mute, at_good), (1, 1), "{path}: once to each back end");

    // POSTs until one met the mute back end: 502, and it was not sent anywhere else.
    let retries_before_posts = counter(&lb, &retries("failed_before_response")).await
        + counter(&lb, &retries("connect_failed")).await;
    let mut answered = Vec::new();
    let mut failed = Vec::new();
    for i in 0..10usize {
        let id = format!("submission-{i}");
        let r = client
            .send(request(
                Method::POST,
                "/submit",
                &[("content-type", "text/plain")],
                Bytes::from(id.clone()),
            ))
            .await;
        match r.status {
            StatusCode::OK => {
                assert_eq!(r.text(), "served by good\n");
                answered.push(id);
            }
            StatusCode::BAD_GATEWAY => {
                assert_eq!(
                    r.header("x-launchday-error").as_deref(),
                    Some("upstream_failed_after_send"),
                    "POST {i}"
                );
                assert_eq!(r.header("x-served-by").as_deref(), Some("launchday"));
                failed.push(id);
                break;
            }
            other => panic!("POST {i}: {other} {}", r.text()),
        }
    }
    assert_eq!(failed.len(), 1, "some POST was sent to the mute back end");
    let posts_at = |seen: Vec<String>, id: &str| seen.iter().filter(|b| *b == id).count();
    let mute_bodies: Vec<String> = mute
        .requests()
        .iter()
        .filter(|s| s.method == "POST")
        .map(|s| String::from_utf8_lossy(&s.body).into_owned())
        .collect();
    let good_bodies: Vec<String> = good
        .requests()
        .iter()
        .filter(|s| s.method == Method::POST)
        .map(|s| String::from_utf8_lossy(&s.body).into_owned())
        .collect();
    for id in &failed {
        assert_eq!(
            (
                posts_at(mute_bodies.clone(), id),
                posts_at(good_bodies.clone(), id)
            ),
            (1, 0),
            "{id}: seen exactly once, by the back end that dropped it"
        );
    }
    for id in &answered {
        assert_eq!(
            (
                posts_at(mute_bodies.clone(), id),
                posts_at(good_bodies.clone(), id)
            ),
            (0, 1),
            "{id}: seen exactly once"
        );
    }
    assert_eq!(
        counter(&lb, &retries("failed_before_response")).await
            + counter(&lb, &retries("connect_failed")).await,
        retries_before_posts,
        "no POST was retried"
    );
}

// ---------------------------------------------------------------------------------
// 5. An answer cut short.
// ---------------------------------------------------------------------------------

/// Sends `GET /cut` with `Connection: close` and reads whatever comes until the
/// connection ends (closed or reset), bounded by [`STEP`].
async fn raw_exchange(addr: std::net::SocketAddr) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /cut HTTP/1.1\r\nHost: example.org\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let start = Instant::now();
    while start.elapsed() < STEP {
        match tokio::time::timeout(STEP, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

fn split_head(raw: &[u8]) -> (String, &[u8]) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    (
        String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase(),
        &raw[end + 4..],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_back_end_dying_mid_body_never_yields_a_complete_looking_answer() {
    let mut cut =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100000\r\n\r\n".to_vec();
    cut.extend(std::iter::repeat_n(b'x', 30_000));
    let sized = ScriptedBackend::start(cut, Duration::from_millis(50)).await;
    let mut cut =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..3 {
        cut.extend_from_slice(b"1000\r\n");
        cut.extend(std::iter::repeat_n(b'y', 0x1000));
        cut.extend_from_slice(b"\r\n");
    }
    let chunked = ScriptedBackend::start(cut, Duration::from_millis(50)).await;

    for (name, backend) in [("content-length", &sized), ("chunked", &chunked)] {
        let text = web("", &[entry("cut", backend.addr, "")], "");
        let lb = Balancer::start(&text).await;

        // A hyper client: reading the body fails.
        let mut client = TryClient::connect(lb.v4).await.expect("connect");
        match client.get("/cut").await {
            Attempt::Failed(e) => {
                assert!(e.contains("body"), "{name}: failed, but how? {e}");
            }
            Attempt::Answered(r) => panic!(
                "{name}: a cut answer looked complete: {} with {} body bytes",
                r.status,
                r.body.len()
            ),
            Attempt::NotSent(e) => panic!("{name}: not sent: {e}"),
        }

        // On the wire: the connection ends before the declared length / last chunk.
        let raw = raw_exchange(lb.v6).await;
        let (head, body) = split_head(&raw);
        assert!(head.starts_with("http/1.1 200"), "{name}: {head}");
        if name == "content-length" {
            assert!(head.contains("content-length: 100000"), "{head}");
            assert!(
                body.len() < 100_000,
                "{name}: {} body bytes arrived of the 30000 sent",
                body.len()
            );
        } else {
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            assert!(
                !body.ends_with(b"0\r\n\r\n"),
                "{name}: the cut chunked body was terminated as if complete"
            );
        }
        assert_eq!(backend.count(), 2, "{name}: one request each");
    }
}

// ---------------------------------------------------------------------------------
// 6. Passive checks.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_checks_bench_a_failing_back_end_for_the_cooldown_then_try_it_once() {
    let bad = ControlledBackend::start("bad").await;
    bad.set_status(500);
    let good = Backend::start("good").await;
    let text = web(
        "passive_failures = 2\npassive_cooldown = \"500ms\"",
        &[entry("bad", bad.addr, ""), entry("good", good.addr, "")],
        "",
    );
    let lb = Balancer::start(&text).await;
    let mut client = Client::connect(lb.v4).await;

    /// Sends one GET; returns (status, back end).
    async fn one(client: &mut Client, i: usize) -> (StatusCode, String) {
        let r = client.get(&format!("/p/{i}")).await;
        (r.status, r.header("x-backend").expect("X-Backend"))
    }

    // Two 500s take it out.
    let mut i = 0;
    while bad.traffic() < 2 {
        assert!(i < 10, "bad got {} requests out of {i}", bad.traffic());
        let (status, by) = one(&mut client, i).await;
        let want = if by == "bad" { 500 } else { 200 };
        assert_eq!(status.as_u16(), want, "from {by}");
        i += 1;
    }
    let benched = Instant::now();
    assert_eq!(state_of(&lb, "web", "bad").await, "benched");

    // During the cooldown everything goes to the good back end.
    let mut during = 0;
    while benched.elapsed() < Duration::from_millis(350) {
        let (status, by) = one(&mut client, i).await;
        assert_eq!(
            (status, by.as_str()),
            (StatusCode::OK, "good"),
            "request {i}"
        );
        i += 1;
        during += 1;
    }
    assert!(during > 10, "only {during} requests during the cooldown");
    assert_eq!(bad.traffic(), 2);

    // After the cooldown: tried again (half-open); one more 500 takes it out again.
    tokio::time::sleep(Duration::from_millis(600).saturating_sub(benched.elapsed())).await;
    let mut tries = 0;
    while bad.traffic() < 3 {
        assert!(tries < 10, "bad not tried again after the cooldown");
        let (status, by) = one(&mut client, i).await;
        if by == "bad" {
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        }
        i += 1;
        tries += 1;
    }
    let benched_again = Instant::now();
    assert_eq!(state_of(&lb, "web", "bad").await, "benched");
    while benched_again.elapsed() < Duration::from_millis(350) {
        let (status, by) = one(&mut client, i).await;
        assert_eq!(
            (status, by.as_str()),
            (StatusCode::OK, "good"),
            "request {i}: one failure in half-open takes it out again"
        );
        i += 1;
    }
    assert_eq!(bad.traffic(), 3);
}

// ---------------------------------------------------------------------------------
// 7. expect_status and host.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_expect_the_configured_status_and_send_the_configured_host() {
    let ok200 = ControlledBackend::start("ok200").await;
    let ok204 = ControlledBackend::start("ok204").await;
    ok204.set_health_status(204);
    let plain = ControlledBackend::start("plain").await;
    let text = config(
        "",
        &format!(
            r#"
[[routes]]
pool = "web"

[[routes]]
path_prefix = "/plain"
pool = "plain"

[pools.web]
backends = [
{},
{},
]
[pools.web.health_check]
path = "/health"
interval = "100ms"
timeout = "50ms"
rise = 2
fall = 2
expect_status = [204]
host = "health.example.org"

[pools.plain]
backends = [
{},
]
[pools.plain.health_check]
path = "/health"
interval = "100ms"
timeout = "50ms"
"#,
            entry("ok200", ok200.addr, ""),
            entry("ok204", ok204.addr, ""),
            entry("plain", plain.addr, ""),
        ),
    );
    let lb = Balancer::start(&text).await;
    lb.wait_metric(&up("ok204"), 1.0).await;
    lb.wait_metric(
        "launchday_backend_up{backend=\"plain\",pool=\"plain\"}",
        1.0,
    )
    .await;

    // 200 is not the expected 204: ok200 stays down while its failures rise.
    let f1 = wait_metric_until(&lb, &checks("ok200", "failure"), |v| v >= 3.0).await;
    wait_metric_until(&lb, &checks("ok200", "failure"), |v| v >= f1 + 2.0).await;
    assert_eq!(lb.metric(&up("ok200")).await, Some(0.0));
    assert_eq!(counter(&lb, &checks("ok200", "success")).await, 0.0);
    assert_eq!(state_of(&lb, "web", "ok200").await, "down");
    assert!(counter(&lb, &checks("ok204", "success")).await >= 1.0);
    let mut client = Client::connect(lb.v4).await;
    let by = gets(&mut client, 10, "web").await;
    assert!(by.iter().all(|x| x == "ok204"), "{by:?}");
    assert_eq!(ok200.traffic(), 0);

    // The checks' Host is the configured one; without `host`, the back end's address.
    for b in [&ok200, &ok204] {
        let probes = b.health_requests();
        assert!(probes.len() >= 2, "{}: {} probes", b.name(), probes.len());
        for p in &probes {
            assert_eq!(p.method, Method::GET);
            assert_eq!(
                p.one("host").as_deref(),
                Some("health.example.org"),
                "{}",
                b.name()
            );
        }
    }
    let probes = plain.health_requests();
    assert!(!probes.is_empty());
    for p in &probes {
        assert_eq!(p.one("host"), Some(plain.addr.to_string()));
    }
}

// ---------------------------------------------------------------------------------
// 8. Every back end down.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_back_end_down_requests_get_the_maintenance_page_at_once() {
    let a = ControlledBackend::start("a").await;
    let b = ControlledBackend::start("b").await;
    let text = web(
        "queue_timeout = \"2s\"",
        &[entry("a", a.addr, ""), entry("b", b.addr, "")],
        CHECKS,
    );
    let lb = Balancer::start(&text).await;
    lb.wait_metric(&up("a"), 1.0).await;
    lb.wait_metric(&up("b"), 1.0).await;
    let mut client = Client::connect(lb.v4).await;
    gets(&mut client, 4, "before").await;

    a.set_health_status(500);
    b.set_health_status(503);
    lb.wait_metric(&up("a"), 0.0).await;
    lb.wait_metric(&up("b"), 0.0).await;
    let traffic = (a.traffic(), b.traffic());
    let shed = "launchday_shed_total{class=\"read\",pool=\"web\",reason=\"no_backend\"}";
    let shed_before = counter(&lb, shed).await;

    for i in 0..5 {
        let sent = Instant::now();
        let r = client.get(&format!("/down/{i}")).await;
        let took = sent.elapsed();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert_eq!(r.header("x-launchday-error").as_deref(), Some("no_backend"));
        assert_eq!(r.header("x-served-by").as_deref(), Some("launchday"));
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("text/html; charset=utf-8")
        );
        assert!(
            took < Duration::from_millis(300),
            "the page took {took:?} (queue_timeout is 2 s: it must not wait)"
        );
    }
    let r = client
        .send(request(Method::POST, "/down/post", &[], Bytes::from("x")))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("x-launchday-error").as_deref(), Some("no_backend"));
    assert_eq!(counter(&lb, shed).await, shed_before + 5.0);
    assert_eq!(
        (a.traffic(), b.traffic()),
        traffic,
        "no traffic to down back ends"
    );
}
