//! End-to-end: hot reload. The real binary (`launchday run -c FILE`) reloads when its
//! config file is rewritten (in place, or written aside and renamed over it, as
//! editors save), on `SIGHUP` and on `POST /api/reload`; a bad config is rejected by
//! all three and the running one keeps serving; `SIGTERM` drains an in-flight request
//! and exits 0; reloads under load fail no request. In-process (`Server::apply`,
//! `Server::reload_file`): in-flight accounting and queued requests survive a reload,
//! and listener changes are applied all or nothing.
//!
//! Real-binary tests give every instance its own temporary config directory with
//! `upgrade_socket = "up.sock"` in it, keep the log in another directory (the file
//! watcher sees the config directory), and pick free ports by binding port 0.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    config, free_addr, metric, metrics_at, Attempt, Backend, Balancer, Client, Process, Reply,
    SlowBackend, TryClient, STEP,
};
use http::StatusCode;
use launchday::server::{ReloadError, ServerError};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const SUCCESS: &str = r#"launchday_config_reloads_total{result="success"}"#;
const FAILURE: &str = r#"launchday_config_reloads_total{result="failure"}"#;

fn weight(pool: &str, backend: &str) -> String {
    format!(r#"launchday_backend_weight{{backend="{backend}",pool="{pool}"}}"#)
}

// ---------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------

/// Fixed (free) addresses for one instance's config file.
struct Fronts {
    v4: SocketAddr,
    v6: SocketAddr,
    admin: SocketAddr,
}

impl Fronts {
    fn new() -> Fronts {
        Fronts {
            v4: free_addr("127.0.0.1"),
            v6: free_addr("[::1]"),
            admin: free_addr("127.0.0.1"),
        }
    }

    /// A whole config file: these addresses, `grace`, then `tables`.
    fn config(&self, grace: &str, tables: &str) -> String {
        format!(
            r#"shutdown_grace = "{grace}"
threads = 2
upgrade_socket = "up.sock"

[admin]
listen = ["{admin}"]

[[listeners]]
name = "public"
bind = ["{v4}", "{v6}"]

{tables}
"#,
            admin = self.admin,
            v4 = self.v4,
            v6 = self.v6,
        )
    }
}

/// Pool `web` (catch-all route) with back ends `big` and `small` at these weights;
/// each answer carries `X-Served-By: big` or `small`.
fn web(big: &Backend, wb: u32, small: &Backend, ws: u32) -> String {
    format!(
        r#"[[routes]]
pool = "web"

[pools.web]
backends = [
  {{ name = "big", address = "{b}", weight = {wb}, served_by = "big" }},
  {{ name = "small", address = "{s}", weight = {ws}, served_by = "small" }},
]
"#,
        b = big.addr,
        s = small.addr,
    )
}

/// A running `launchday run -c FILE` with its config directory.
struct Instance {
    /// The config directory (also holds `up.sock`).
    dir: tempfile::TempDir,
    /// Holds the log, away from the watched directory.
    _logs: tempfile::TempDir,
    path: PathBuf,
    proc: Process,
    admin: SocketAddr,
}

impl Instance {
    /// Writes `text` as `launchday.toml` in a fresh directory and runs it; returns
    /// once it is ready (see [`Instance::wait_ready`]).
    async fn start(text: &str, admin: SocketAddr) -> Instance {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("launchday.toml");
        std::fs::write(&path, text).expect("write config");
        let proc = Process::run(&path, &logs.path().join("launchday.log"));
        let mut inst = Instance {
            dir,
            _logs: logs,
            path,
            proc,
            admin,
        };
        inst.wait_ready().await;
        inst
    }

    /// Waits until the admin listener answers and the upgrade socket exists. The
    /// binary sets up its signal handlers and the file watcher right after binding the
    /// upgrade socket, in the same task without yielding, but there is nothing to
    /// observe that says they are in place: give them a moment more.
    async fn wait_ready(&mut self) {
        self.proc.wait_ready(self.admin).await;
        let sock = self.dir.path().join("up.sock");
        common::wait_until("the upgrade socket exists", || sock.exists()).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    /// Rewrites the config file in place (truncate and write).
    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).expect("rewrite config");
    }

    /// Writes `text` to a temporary file beside the config and renames it over the
    /// config (how editors and config-management tools save).
    fn rename_over(&self, text: &str) {
        let tmp = self.dir.path().join(".launchday.toml.tmp");
        std::fs::write(&tmp, text).expect("write temp config");
        std::fs::rename(&tmp, &self.path).expect("rename over config");
    }

    async fn metrics(&self) -> String {
        metrics_at(self.admin).await
    }

    async fn metric(&self, series: &str) -> Option<f64> {
        metric(&self.metrics().await, series)
    }

    async fn wait_metric(&mut self, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
        self.proc.wait_metric(self.admin, series, ok).await
    }
}

/// `n` sequential `GET`s on `c`; the `X-Served-By` of each (all must be 200).
async fn labels(c: &mut Client, n: usize, tag: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = c.get(&format!("/{tag}/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{tag} request {i}: {}", r.text());
        out.push(r.header("x-served-by").unwrap_or_default());
    }
    out
}

fn positions(labels: &[String], which: &str) -> Vec<usize> {
    labels
        .iter()
        .enumerate()
        .filter(|(_, l)| *l == which)
        .map(|(i, _)| i)
        .collect()
}

// ---------------------------------------------------------------------------------
// 1. Weights changed by rewriting the file (the watcher; no signal)
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_the_file_from_1_1_to_9_1_sends_exactly_10_of_the_next_100_to_small() {
    let big = Backend::start("big").await;
    let small = Backend::start("small").await;
    let f = Fronts::new();
    let mut lb = Instance::start(&f.config("2s", &web(&big, 1, &small, 1)), f.admin).await;
    assert_eq!(lb.metric(SUCCESS).await, Some(0.0));
    assert_eq!(lb.metric(&weight("web", "big")).await, Some(1.0));

    let mut c = Client::connect(f.v4).await;
    let before = labels(&mut c, 10, "before").await;
    assert_eq!(positions(&before, "small").len(), 5, "1:1 {before:?}");

    // In place: truncate and write. Only the file watcher can notice.
    lb.write(&f.config("2s", &web(&big, 9, &small, 1)));
    lb.wait_metric(SUCCESS, |v| v >= 1.0).await;
    lb.wait_metric(&weight("web", "big"), |v| v == 9.0).await;
    assert_eq!(lb.metric(&weight("web", "small")).await, Some(1.0));
    assert_eq!(lb.metric(FAILURE).await, Some(0.0));

    let small_before = small.count();
    let after = labels(&mut c, 100, "after").await;
    let at = positions(&after, "small");
    assert_eq!(at.len(), 10, "9:1: small at {at:?}");
    assert_eq!(small.count() - small_before, 10, "the back end's own count");
    let gaps: Vec<usize> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|&g| g == 10), "9:1 without bursts: {at:?}");

    // Saved the way editors do: a temporary file renamed over the config.
    let reloads = lb.metric(SUCCESS).await.expect("success counter");
    lb.rename_over(&f.config("2s", &web(&big, 1, &small, 3)));
    lb.wait_metric(SUCCESS, |v| v > reloads).await;
    lb.wait_metric(&weight("web", "small"), |v| v == 3.0).await;
    assert_eq!(lb.metric(&weight("web", "big")).await, Some(1.0));
    let renamed = labels(&mut c, 40, "renamed").await;
    // The selector's position carries over, so the first picks may still lean; after
    // that every window of 4 is 3 small : 1 big.
    let last = &renamed[20..];
    assert_eq!(positions(last, "small").len(), 15, "1:3 {renamed:?}");
    assert_eq!(lb.metric(FAILURE).await, Some(0.0));
    assert!(lb.proc.exited().is_none(), "{}", lb.proc.log());
}

// ---------------------------------------------------------------------------------
// 2. A bad config is rejected by every trigger; the old one keeps serving
// ---------------------------------------------------------------------------------

/// `web` 3:1 behind `/`, and pool `api` (back end `api`) behind `/api/`.
fn web_and_api(big: &Backend, small_addr: &str, api: &Backend) -> String {
    format!(
        r#"[[routes]]
path_prefix = "/api/"
pool = "api"

[[routes]]
pool = "web"

[pools.api]
backends = [{{ name = "api", address = "{api}", served_by = "api" }}]

[pools.web]
backends = [
  {{ name = "big", address = "{big}", weight = 3, served_by = "big" }},
  {{ name = "small", address = "{small_addr}", weight = 1, served_by = "small" }},
]
"#,
        api = api.addr,
        big = big.addr,
    )
}

/// The same config with two errors: an IPv4 back end and a route naming a missing
/// pool.
fn broken(f: &Fronts, big: &Backend, api: &Backend) -> String {
    f.config("2s", &web_and_api(big, "10.0.0.7:80", api))
        .replacen(
            "[[routes]]\npool = \"web\"",
            "[[routes]]\npool = \"nope\"",
            1,
        )
}

/// 40 requests to `/` (ten rounds of 3:1) and 4 to `/api/`.
async fn traffic(c: &mut Client, tag: &str) -> Vec<String> {
    let web = labels(c, 40, tag).await;
    for i in 0..4 {
        let r = c.get(&format!("/api/{tag}/{i}")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-served-by").as_deref(), Some("api"), "{tag}");
    }
    web
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_rejected_by_the_watcher_sighup_and_the_api_and_the_old_one_serves() {
    let big = Backend::start("big").await;
    let small = Backend::start("small").await;
    let api = Backend::start("api").await;
    let f = Fronts::new();
    let good = f.config("2s", &web_and_api(&big, &small.addr.to_string(), &api));
    let mut lb = Instance::start(&good, f.admin).await;

    let mut c = Client::connect(f.v6).await;
    let pattern = traffic(&mut c, "before").await;
    assert_eq!(positions(&pattern, "small").len(), 10, "3:1 {pattern:?}");

    // The file watcher.
    lb.write(&broken(&f, &big, &api));
    lb.wait_metric(FAILURE, |v| v >= 1.0).await;
    assert_eq!(traffic(&mut c, "watcher").await, pattern);

    // SIGHUP.
    lb.proc.signal("HUP");
    lb.wait_metric(FAILURE, |v| v >= 2.0).await;
    assert_eq!(traffic(&mut c, "sighup").await, pattern);

    // The admin API: 422 with every error, one a line, each with its key path.
    let r = lb_admin_post(f.admin, "/api/reload").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text());
    let body = r.text();
    let lines: Vec<&str> = body.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "one line per error:\n{body}");
    for l in &lines {
        let (path, problem) = l
            .split_once(": ")
            .unwrap_or_else(|| panic!("no `KEY.PATH: problem` in {l:?}"));
        assert!(
            !path.is_empty() && !path.contains(char::is_whitespace) && !problem.is_empty(),
            "not `KEY.PATH: problem`: {l:?}"
        );
    }
    let paths: Vec<&str> = lines.iter().filter_map(|l| l.split(": ").next()).collect();
    assert!(paths.contains(&"routes[1].pool"), "{body}");
    assert!(paths.contains(&"pools.web.backends[1].address"), "{body}");
    assert!(body.contains("10.0.0.7:80"), "{body}");
    assert_eq!(
        lb.metric(FAILURE).await,
        Some(3.0),
        "one failure per attempt"
    );
    assert_eq!(lb.metric(SUCCESS).await, Some(0.0));

    // Same weights (the very same 3:1 pattern), same routes, same gauges.
    assert_eq!(traffic(&mut c, "after-api").await, pattern);
    assert_eq!(lb.metric(&weight("web", "big")).await, Some(3.0));
    assert_eq!(lb.metric(&weight("web", "small")).await, Some(1.0));
    assert_eq!(lb.metric(&weight("api", "api")).await, Some(1.0));

    // Fixed: the watcher still works and takes it.
    lb.write(&good.replace("weight = 3", "weight = 5"));
    lb.wait_metric(SUCCESS, |v| v >= 1.0).await;
    lb.wait_metric(&weight("web", "big"), |v| v == 5.0).await;
    assert_eq!(lb.metric(FAILURE).await, Some(3.0));
    assert!(lb.proc.exited().is_none(), "{}", lb.proc.log());
}

/// `POST path` with an empty body on the admin listener at `admin`.
async fn lb_admin_post(admin: SocketAddr, path: &str) -> Reply {
    Client::connect(admin)
        .await
        .send(common::request(
            http::Method::POST,
            path,
            &[],
            bytes::Bytes::new(),
        ))
        .await
}

// ---------------------------------------------------------------------------------
// 3. State survives a reload (in-process)
// ---------------------------------------------------------------------------------

fn snapshot(text: &str) -> launchday::config::Snapshot {
    launchday::config::load_str(text, Path::new("."), None)
        .unwrap_or_else(|e| panic!("config rejected:\n{e}\n--- config ---\n{text}"))
}

/// Pool `p` (catch-all route) with `backends`, a deep queue and a long timeout.
fn pool_p(backends: &str) -> String {
    config(
        "",
        &format!(
            r#"
[[routes]]
pool = "p"

[pools.p]
queue_depth = 16
queue_timeout = "15s"
backends = [
{backends}
]
"#
        ),
    )
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

fn shed_total(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("launchday_shed_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

const DEPTH: &str = r#"launchday_queue_depth{pool="p"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raising_max_connections_from_2_to_3_lets_exactly_one_more_request_through() {
    let slow = SlowBackend::held("b", Duration::ZERO).await;
    let text = |max: u32| {
        pool_p(&format!(
            r#"  {{ name = "b", address = "{}", max_connections = {max} }},"#,
            slow.addr
        ))
    };
    let lb = Balancer::start(&text(2)).await;
    let mut pending = Vec::new();
    for i in 0..5 {
        pending.push(spawn_get(lb.v4, &format!("/r/{i}")).await);
    }
    slow.wait_count(2).await;
    lb.wait_metric(DEPTH, 3.0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(slow.count(), 2, "max_connections = 2");

    lb.server.apply(snapshot(&text(3))).await.expect("reload");
    slow.wait_count(3).await;
    lb.wait_metric(DEPTH, 2.0).await;
    // Exactly one: the two held requests still count against the new limit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(slow.count(), 3);
    assert_eq!(slow.in_flight(), 3);
    assert_eq!(slow.max_in_flight(), 3);
    assert_eq!(
        lb.metric(r#"launchday_backend_in_flight{backend="b",pool="p"}"#)
            .await,
        Some(3.0)
    );
    assert!(pending.iter().all(|h| !h.is_finished()));

    slow.release();
    for h in pending {
        let r = join(h).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.text(), "served by b\n");
    }
    assert_eq!(slow.count(), 5);
    assert_eq!(slow.max_in_flight(), 3, "never more than 3 in flight");
    lb.wait_metric(r#"launchday_backend_in_flight{backend="b",pool="p"}"#, 0.0)
        .await;
    assert_eq!(shed_total(&lb.metrics().await), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_request_survives_a_reload_of_the_file_and_is_served() {
    let slow = SlowBackend::held("b", Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("launchday.toml");
    let text = |timeout: &str| {
        pool_p(&format!(
            r#"  {{ name = "b", address = "{}", max_connections = 1 }},"#,
            slow.addr
        ))
        .replace(
            "queue_timeout = \"15s\"",
            &format!("queue_timeout = \"{timeout}\""),
        )
    };
    let lb = Balancer::start_in(&text("15s"), dir.path()).await;
    let first = spawn_get(lb.v4, "/first").await;
    slow.wait_count(1).await;
    let queued = spawn_get(lb.v6, "/queued").await;
    lb.wait_metric(DEPTH, 1.0).await;

    std::fs::write(&path, text("14s")).expect("write config");
    lb.server.reload_file(&path).await.expect("reload");
    assert_eq!(lb.metric(SUCCESS).await, Some(1.0));
    // Still waiting in the same queue: not shed, not answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(lb.metric(DEPTH).await, Some(1.0));
    assert!(!queued.is_finished(), "answered while its back end is full");
    assert_eq!(slow.count(), 1);

    slow.release();
    let (a, b) = (join(first).await, join(queued).await);
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(b.status, StatusCode::OK, "{}", b.text());
    assert_eq!(b.text(), "served by b\n");
    assert_eq!(slow.count(), 2);
    assert_eq!(slow.requests()[1].uri.path(), "/queued");
    let m = lb.metrics().await;
    assert_eq!(shed_total(&m), 0.0, "{m}");
    assert_eq!(metric(&m, DEPTH), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_adding_a_back_end_serves_the_queued_request_at_once() {
    let slow = SlowBackend::held("b", Duration::ZERO).await;
    let fresh = Backend::start("fresh").await;
    let one = format!(
        r#"  {{ name = "b", address = "{}", max_connections = 1 }},"#,
        slow.addr
    );
    let two = format!(
        "{one}\n  {{ name = \"fresh\", address = \"{}\", max_connections = 1 }},",
        fresh.addr
    );
    let lb = Balancer::start(&pool_p(&one)).await;
    let first = spawn_get(lb.v4, "/first").await;
    slow.wait_count(1).await;
    let queued = spawn_get(lb.v4, "/queued").await;
    lb.wait_metric(DEPTH, 1.0).await;

    lb.server
        .apply(snapshot(&pool_p(&two)))
        .await
        .expect("reload");
    let r = join(queued).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "served by fresh\n");
    assert_eq!(fresh.count(), 1);
    assert!(!first.is_finished(), "the held request is still held");
    assert_eq!(slow.in_flight(), 1);

    slow.release();
    assert_eq!(join(first).await.status, StatusCode::OK);
    assert_eq!(shed_total(&lb.metrics().await), 0.0);
}

// ---------------------------------------------------------------------------------
// 4. Listener changes (in-process)
// ---------------------------------------------------------------------------------

/// A config with the admin listener on `admin_listen` and the public listener on
/// `binds`; `/slow/` goes to pool `slow`, everything else to `web` (whose answers
/// say `X-Served-By: label`).
fn listeners(
    admin_listen: &[String],
    binds: &[String],
    web: &Backend,
    slow: &SlowBackend,
    label: &str,
) -> String {
    let quote = |v: &[String]| {
        v.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"shutdown_grace = "1s"

[admin]
listen = [{admin}]

[[listeners]]
name = "public"
bind = [{binds}]

[[routes]]
path_prefix = "/slow/"
pool = "slow"

[[routes]]
pool = "web"

[pools.slow]
backends = [{{ name = "slow", address = "{slow}" }}]

[pools.web]
backends = [{{ name = "web", address = "{web}", served_by = "{label}" }}]
"#,
        admin = quote(admin_listen),
        binds = quote(binds),
        slow = slow.addr,
        web = web.addr,
    )
}

/// `GET /` on a fresh connection: 200 from `web` with `X-Served-By: label`.
async fn assert_serves(addr: SocketAddr, label: &str) {
    let r = common::get(addr, "/").await;
    assert_eq!(r.status, StatusCode::OK, "via {addr}: {}", r.text());
    assert_eq!(
        r.header("x-served-by").as_deref(),
        Some(label),
        "via {addr}"
    );
}

/// A connection attempt to `addr` is refused.
async fn assert_refused(addr: SocketAddr) {
    match tokio::time::timeout(STEP, TcpStream::connect(addr)).await {
        Ok(Err(e)) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{addr}: {e}"
        ),
        Ok(Ok(_)) => panic!("{addr} still accepts connections"),
        Err(_) => panic!("connecting to {addr} timed out"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_add_and_remove_bind_addresses_and_a_failed_bind_rejects_the_whole_reload() {
    let web = Backend::start("web").await;
    let slow = SlowBackend::held("slow", Duration::ZERO).await;
    let admin = vec!["127.0.0.1:0".to_owned()];
    let v4 = "127.0.0.1:0".to_owned();
    let v6 = "[::1]:0".to_owned();
    let lb = Balancer::start(&listeners(
        &admin,
        &[v4.clone(), v6.clone()],
        &web,
        &slow,
        "one",
    ))
    .await;
    assert_serves(lb.v4, "one").await;
    assert_serves(lb.v6, "one").await;

    // Add an address: it accepts; the others keep their sockets.
    let added = free_addr("127.0.0.1");
    let three = [v4.clone(), v6.clone(), added.to_string()];
    lb.server
        .apply(snapshot(&listeners(&admin, &three, &web, &slow, "one")))
        .await
        .expect("reload adding an address");
    let bound: Vec<SocketAddr> = lb.server.bound().iter().map(|b| b.addr).collect();
    assert_eq!(bound, [lb.v4, lb.v6, added]);
    assert_serves(added, "one").await;
    assert_serves(lb.v4, "one").await;
    assert_serves(lb.v6, "one").await;

    // Remove [::1]: it refuses new connections; a request in flight on it finishes;
    // the others keep serving.
    let mut on_v6 = Client::connect(lb.v6).await;
    let in_flight = tokio::spawn(async move { on_v6.get("/slow/in-flight").await });
    slow.wait_count(1).await;
    let two = [v4.clone(), added.to_string()];
    lb.server
        .apply(snapshot(&listeners(&admin, &two, &web, &slow, "one")))
        .await
        .expect("reload removing an address");
    assert_refused(lb.v6).await;
    assert_serves(lb.v4, "one").await;
    assert_serves(added, "one").await;
    slow.release();
    let r = join(in_flight).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "served by slow\n");

    // A reload that would also drop `added`, relabel `web` and bind an address in
    // use: rejected as a whole, and counted as a failed reload.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let busy = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("launchday.toml");
    let wanted = [v4.clone(), busy.to_string()];
    std::fs::write(&path, listeners(&admin, &wanted, &web, &slow, "two")).expect("write");
    let err = lb
        .server
        .reload_file(&path)
        .await
        .expect_err("a bind in use must reject the reload");
    match &err {
        ReloadError::Apply(ServerError::Bind { key, .. }) => {
            assert_eq!(key, "listeners.public.bind[1]", "{err}")
        }
        other => panic!("expected a bind error, got {other:?}"),
    }
    assert!(err.to_string().contains(&busy.to_string()), "{err}");
    assert_eq!(lb.metric(FAILURE).await, Some(1.0));
    assert_eq!(lb.metric(SUCCESS).await, Some(0.0));
    assert_serves(added, "one").await;
    assert_serves(lb.v4, "one").await;
    let bound: Vec<SocketAddr> = lb.server.bound().iter().map(|b| b.addr).collect();
    assert_eq!(bound, [lb.v4, added]);

    // The same for a new admin address in use.
    let admin_busy = vec![admin[0].clone(), busy.to_string()];
    std::fs::write(&path, listeners(&admin_busy, &two, &web, &slow, "two")).expect("write");
    let err = lb
        .server
        .reload_file(&path)
        .await
        .expect_err("an admin bind in use must reject the reload");
    assert!(err.to_string().contains("admin.listen[1]"), "{err}");
    assert_eq!(lb.metric(FAILURE).await, Some(2.0));
    assert_serves(added, "one").await;
    assert_eq!(lb.server.admin_addrs(), [lb.admin]);
    drop(taken);
}

// ---------------------------------------------------------------------------------
// 5. SIGTERM with a slow request in flight
// ---------------------------------------------------------------------------------

/// Waits until connecting to `addr` is refused, at most until `since + within`.
async fn wait_refused(addr: SocketAddr, since: Instant, within: Duration, proc: &Process) {
    let mut last = String::new();
    for _ in 0..1000 {
        match tokio::time::timeout(STEP, TcpStream::connect(addr)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            Ok(Err(e)) => last = e.to_string(),
            Ok(Ok(_)) => last = "accepted".into(),
            Err(_) => last = "timed out".into(),
        }
        assert!(
            since.elapsed() < within,
            "{addr} not refusing {within:?} after the signal (last: {last}):\n{}",
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("gave up waiting for {addr} to refuse (last: {last})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_slow_request_refuses_new_connections_and_exits_0() {
    let slow = SlowBackend::start("slow", Duration::from_millis(1500)).await;
    let f = Fronts::new();
    let tables = format!(
        r#"[[routes]]
pool = "web"

[pools.web]
backends = [{{ name = "slow", address = "{}" }}]
"#,
        slow.addr
    );
    let mut lb = Instance::start(&f.config("5s", &tables), f.admin).await;
    let mut idle = Client::connect(f.v6).await;
    assert_eq!(idle.get("/warm-up").await.status, StatusCode::OK);

    let before = slow.count();
    let mut c = Client::connect(f.v4).await;
    let in_flight = tokio::spawn(async move { c.get("/slow").await });
    slow.wait_count(before + 1).await;
    let signalled = Instant::now();
    lb.proc.signal("TERM");

    // New connections are refused shortly after the signal, while the request is
    // still in flight. (An attempt racing with the close of a listening socket may
    // be reset instead: it was queued on the socket as it closed.)
    for addr in [f.v4, f.v6, f.admin] {
        wait_refused(addr, signalled, Duration::from_secs(1), &lb.proc).await;
    }
    // The idle keep-alive connection is closed at once, not kept to the end.
    common::wait_until("the idle keep-alive connection is closed", || {
        !idle.is_open()
    })
    .await;
    assert_eq!(
        slow.answered(),
        before,
        "all that while the request is in flight"
    );

    let r = join(in_flight).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "served by slow\n");
    let status = lb
        .proc
        .wait_exit(Duration::from_secs(5).saturating_sub(signalled.elapsed()))
        .await
        .unwrap_or_else(|| panic!("no exit within the 5 s grace:\n{}", lb.proc.log()));
    assert_eq!(status.code(), Some(0), "{status}:\n{}", lb.proc.log());
}

// ---------------------------------------------------------------------------------
// 6. Reload under load
// ---------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut e = self.errors.lock().expect("lock");
        if e.len() < 20 {
            e.push(what);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rewriting_weights_every_200ms_under_load_fails_no_request() {
    let big = Backend::start("big").await;
    let small = Backend::start("small").await;
    let f = Fronts::new();
    let mut lb = Instance::start(&f.config("2s", &web(&big, 1, &small, 1)), f.admin).await;
    let lb_dir = lb.dir.path().to_owned();
    let path = lb.path.clone();

    let tally = Arc::new(Tally::default());
    let run_for = Duration::from_secs(5);
    let start = Instant::now();
    let mut clients = Vec::new();
    for n in 0..20 {
        let addr = if n % 2 == 0 { f.v4 } else { f.v6 };
        let tally = Arc::clone(&tally);
        clients.push(tokio::spawn(async move {
            let mut c = match TryClient::connect(addr).await {
                Ok(c) => c,
                Err(e) => return tally.fail(format!("client {n}: {e}")),
            };
            for i in 0..1_000_000u64 {
                if start.elapsed() >= run_for {
                    break;
                }
                match c.get(&format!("/c{n}/{i}")).await {
                    Attempt::Answered(r) if r.status == StatusCode::OK => {
                        tally.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Attempt::Answered(r) => {
                        tally.fail(format!("client {n} request {i}: {} {}", r.status, r.text()))
                    }
                    Attempt::NotSent(e) | Attempt::Failed(e) => {
                        // A keep-alive connection the balancer has no reason to close.
                        return tally.fail(format!("client {n} request {i}: {e}"));
                    }
                }
            }
        }));
    }

    let weights = [
        f.config("2s", &web(&big, 1, &small, 1)),
        f.config("2s", &web(&big, 3, &small, 1)),
    ];
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.tick().await;
    let mut writes = 0;
    for i in 1..100usize {
        tick.tick().await;
        if start.elapsed() >= run_for {
            break;
        }
        let tmp = lb_dir.join(".launchday.toml.tmp");
        std::fs::write(&tmp, &weights[i % 2]).expect("write temp config");
        std::fs::rename(&tmp, &path).expect("rename over config");
        writes += 1;
    }
    for c in clients {
        tokio::time::timeout(STEP, c)
            .await
            .expect("client done in time")
            .expect("client task");
    }
    let reloads = lb.wait_metric(SUCCESS, |v| v >= 3.0).await;

    let errors = tally.errors.lock().expect("lock").clone();
    assert_eq!(
        tally.failed.load(Ordering::SeqCst),
        0,
        "failed requests: {errors:#?}"
    );
    let ok = tally.ok.load(Ordering::SeqCst);
    assert!(ok >= 200, "only {ok} requests in {run_for:?}");
    assert_eq!(big.count() + small.count(), ok);
    assert!(writes >= 20, "only {writes} rewrites");
    assert_eq!(lb.metric(FAILURE).await, Some(0.0));
    eprintln!("{ok} requests, {writes} rewrites, {reloads} reloads");
    assert!(lb.proc.exited().is_none(), "{}", lb.proc.log());
}
