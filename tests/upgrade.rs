//! End-to-end: zero-downtime binary upgrade through the real binary. A running
//! instance hands its listening sockets to `launchday run -c FILE --upgrade` over its
//! `upgrade_socket`, then drains and exits 0; no request is lost meanwhile. Without a
//! running instance `--upgrade` fails at once, naming the socket.
//!
//! Every instance's config puts `upgrade_socket = "up.sock"` in its own temporary
//! directory; logs go to another directory (the file watcher sees the config's).
//! Instances of one test share the directory and so the socket; each has its own
//! config file whose `served_by` label tells which instance answered.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_addr, metric, metrics_at, Attempt, Backend, Process, TryClient, STEP};
use http::StatusCode;
use tokio::net::TcpStream;

/// The grace period every config here gives a draining instance.
const GRACE: Duration = Duration::from_secs(5);

/// Fixed (free) addresses shared by the instances of one test.
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
}

/// One test's directories: configs and `up.sock` in `dir`, logs in `logs`.
struct Site {
    dir: tempfile::TempDir,
    logs: tempfile::TempDir,
    fronts: Fronts,
}

impl Site {
    fn new() -> Site {
        Site {
            dir: tempfile::tempdir().expect("tempdir"),
            logs: tempfile::tempdir().expect("tempdir"),
            fronts: Fronts::new(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("up.sock")
    }

    /// Writes `NAME.toml`: the shared addresses (and `extra_binds`), one pool in front
    /// of `web` whose answers say `X-Served-By: NAME`.
    fn config(&self, name: &str, web: &Backend, extra_binds: &[SocketAddr]) -> PathBuf {
        let f = &self.fronts;
        let mut binds = vec![format!("\"{}\"", f.v4), format!("\"{}\"", f.v6)];
        binds.extend(extra_binds.iter().map(|a| format!("\"{a}\"")));
        let text = format!(
            r#"shutdown_grace = "{grace}s"
threads = 2
upgrade_socket = "up.sock"

[admin]
listen = ["{admin}"]

[[listeners]]
name = "public"
bind = [{binds}]

[[routes]]
pool = "web"

[pools.web]
backends = [{{ name = "web", address = "{web}", served_by = "{name}" }}]
"#,
            grace = GRACE.as_secs(),
            admin = f.admin,
            binds = binds.join(", "),
            web = web.addr,
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.path().join(format!("{name}.log"))
    }

    /// Starts the first instance, `name`, and waits until it is ready.
    async fn run(&self, name: &str, web: &Backend) -> Process {
        let mut p = Process::run(&self.config(name, web, &[]), &self.log(name));
        p.wait_ready(self.fronts.admin).await;
        self.wait_socket(&mut p).await;
        p
    }

    /// Waits until the upgrade socket accepts connections (a bare connect asks for
    /// nothing), and a moment more for the signal handlers installed right after.
    async fn wait_socket(&self, p: &mut Process) {
        let sock = self.socket();
        let start = Instant::now();
        for _ in 0..1000 {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                tokio::time::sleep(Duration::from_millis(150)).await;
                return;
            }
            if let Some(status) = p.exited() {
                panic!("exited ({status}):\n{}", p.log());
            }
            assert!(start.elapsed() < STEP, "no upgrade socket:\n{}", p.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("gave up waiting for the upgrade socket");
    }
}

/// `GET /` on a fresh connection: 200 with `X-Served-By: label`.
async fn served_by(addr: SocketAddr) -> String {
    let r = common::try_get(addr, "/")
        .await
        .unwrap_or_else(|e| panic!("GET {addr}/: {e}"));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.header("x-served-by").unwrap_or_default()
}

/// Waits for `p` to exit within `limit`; asserts exit code 0.
async fn assert_exits_0(p: &mut Process, limit: Duration, what: &str) {
    let status = p
        .wait_exit(limit)
        .await
        .unwrap_or_else(|| panic!("{what}: no exit within {limit:?}:\n{}", p.log()));
    assert_eq!(status.code(), Some(0), "{what}: {status}:\n{}", p.log());
}

// ---------------------------------------------------------------------------------
// Upgrade under load
// ---------------------------------------------------------------------------------

/// What the load clients saw.
#[derive(Default)]
struct Load {
    /// (when the request was started, X-Served-By) of every 200.
    served: Mutex<Vec<(Instant, String)>>,
    /// Fresh connections closed before the request was written (sent again).
    resent: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl Load {
    fn fail(&self, what: String) {
        self.failures.lock().expect("lock").push(what);
    }
}

/// Client `n`: until `stop` (or a bounded number of requests), one `GET` per fresh
/// connection. A connection closed before its request was written is opened again
/// (nothing was sent); anything else that is not a 200 is a failure.
async fn client(n: usize, addr: SocketAddr, load: Arc<Load>, stop: Arc<AtomicBool>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for i in 0..100_000 {
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            return;
        }
        let started = Instant::now();
        let mut c = match TryClient::connect(addr).await {
            Ok(c) => c,
            Err(e) => {
                load.fail(format!("client {n} request {i}: {e}"));
                continue;
            }
        };
        match c.get(&format!("/c{n}/{i}")).await {
            Attempt::Answered(r) if r.status == StatusCode::OK => {
                let label = r.header("x-served-by").unwrap_or_default();
                load.served.lock().expect("lock").push((started, label));
            }
            Attempt::Answered(r) => {
                load.fail(format!("client {n} request {i}: {} {}", r.status, r.text()))
            }
            Attempt::NotSent(_) => {
                load.resent.fetch_add(1, Ordering::SeqCst);
            }
            Attempt::Failed(e) => load.fail(format!("client {n} request {i} via {addr}: {e}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_under_load_loses_no_request_and_the_old_instance_exits_0() {
    let web = Backend::start("web").await;
    let site = Site::new();
    let f = &site.fronts;
    let mut a = site.run("A", &web).await;

    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..10)
        .map(|n| {
            let addr = if n % 2 == 0 { f.v4 } else { f.v6 };
            tokio::spawn(client(n, addr, Arc::clone(&load), Arc::clone(&stop)))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let upgrading = Instant::now();
    let mut b = Process::upgrade(&site.config("B", &web, &[]), &site.log("B"));
    assert_exits_0(&mut a, GRACE, "the old instance").await;
    let a_gone = Instant::now();
    // The new one serves alone for a while.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(STEP, c)
            .await
            .expect("client done in time")
            .expect("client task");
    }
    if let Some(status) = b.exited() {
        panic!("the new instance exited ({status}):\n{}", b.log());
    }

    let failures = load.failures.lock().expect("lock").clone();
    let served = load.served.lock().expect("lock").clone();
    assert!(
        failures.is_empty(),
        "{} failed requests (of {}): {:#?}\n--- A ---\n{}\n--- B ---\n{}",
        failures.len(),
        served.len() + failures.len(),
        &failures[..failures.len().min(20)],
        a.log(),
        b.log()
    );
    let by = |label: &str| served.iter().filter(|(_, l)| l == label).count();
    assert!(by("A") > 0 && by("B") > 0, "A {} B {}", by("A"), by("B"));
    assert_eq!(by("A") + by("B"), served.len(), "unknown labels");
    assert_eq!(
        web.count(),
        served.len(),
        "the back end saw each request once"
    );
    let late: Vec<_> = served
        .iter()
        .filter(|(t, l)| *t > a_gone && l != "B")
        .collect();
    assert!(late.is_empty(), "served by A after it exited: {late:?}");
    assert!(
        served.iter().filter(|(t, _)| *t > a_gone).count() >= 10,
        "B served little on its own"
    );
    eprintln!(
        "{} requests ({} by A, {} by B, {} resent after an unused connection closed); \
         A exited {:?} after the upgrade started",
        served.len(),
        by("A"),
        by("B"),
        load.resent.load(Ordering::SeqCst),
        a_gone - upgrading
    );

    // B has everything: both front ends, the admin listener, the upgrade socket.
    assert_eq!(served_by(f.v4).await, "B");
    assert_eq!(served_by(f.v6).await, "B");
    let m = metrics_at(f.admin).await;
    assert!(
        metric(
            &m,
            r#"launchday_requests_total{backend="web",code="2xx",pool="web"}"#
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
    assert!(std::os::unix::net::UnixStream::connect(site.socket()).is_ok());
    b.signal("TERM");
    assert_exits_0(&mut b, GRACE, "the new instance").await;
}

// ---------------------------------------------------------------------------------
// Upgrades in a row, and an upgrade that fails
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_instance_takes_over_the_upgrade_socket_for_the_next_upgrade() {
    let web = Backend::start("web").await;
    let site = Site::new();
    let f = &site.fronts;
    let mut a = site.run("A", &web).await;
    assert_eq!(served_by(f.v4).await, "A");

    let mut b = Process::upgrade(&site.config("B", &web, &[]), &site.log("B"));
    assert_exits_0(&mut a, GRACE, "A").await;
    site.wait_socket(&mut b).await;
    assert_eq!(served_by(f.v4).await, "B");
    assert_eq!(served_by(f.v6).await, "B");

    let mut c = Process::upgrade(&site.config("C", &web, &[]), &site.log("C"));
    assert_exits_0(&mut b, GRACE, "B").await;
    site.wait_socket(&mut c).await;
    assert_eq!(served_by(f.v4).await, "C");
    assert_eq!(served_by(f.v6).await, "C");
    assert_eq!(
        common::try_get(f.admin, "/metrics").await.map(|r| r.status),
        Ok(StatusCode::OK)
    );
    c.signal("TERM");
    assert_exits_0(&mut c, GRACE, "C").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_that_cannot_start_leaves_the_old_one_serving() {
    let web = Backend::start("web").await;
    let site = Site::new();
    let f = &site.fronts;
    let mut a = site.run("A", &web).await;

    // B also wants an address the test holds: it gets A's sockets, fails to bind the
    // rest, and exits 1; A never hears `ready` and keeps going.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let busy = taken.local_addr().expect("addr");
    let mut b = Process::upgrade(&site.config("B", &web, &[busy]), &site.log("B"));
    let status = b
        .wait_exit(STEP)
        .await
        .unwrap_or_else(|| panic!("B still running:\n{}", b.log()));
    assert_eq!(status.code(), Some(1), "{status}:\n{}", b.log());
    assert!(b.log().contains(&busy.to_string()), "{}", b.log());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.exited().is_none(), "A exited:\n{}", a.log());
    assert_eq!(served_by(f.v4).await, "A");
    assert_eq!(served_by(f.v6).await, "A");

    // A still hands over to a good instance.
    let mut c = Process::upgrade(&site.config("C", &web, &[]), &site.log("C"));
    assert_exits_0(&mut a, GRACE, "A").await;
    site.wait_socket(&mut c).await;
    assert_eq!(served_by(f.v4).await, "C");
    drop(taken);
    c.signal("TERM");
    assert_exits_0(&mut c, GRACE, "C").await;
}

// ---------------------------------------------------------------------------------
// --upgrade with nothing to upgrade
// ---------------------------------------------------------------------------------

/// Runs `--upgrade` with `site`'s config and asserts a prompt exit 1 whose message
/// names the upgrade socket, and that nothing was bound.
async fn assert_upgrade_fails(site: &Site, web: &Backend, why: &str) -> String {
    let mut p = Process::upgrade(&site.config("lone", web, &[]), &site.log("lone"));
    let status = p
        .wait_exit(STEP)
        .await
        .unwrap_or_else(|| panic!("{why}: `--upgrade` still running:\n{}", p.log()));
    let log = p.log();
    assert_eq!(status.code(), Some(1), "{why}: {status}:\n{log}");
    let sock = site.socket().display().to_string();
    assert!(
        log.contains("upgrade socket") && log.contains(&sock),
        "{why}: the error must name the upgrade socket {sock}:\n{log}"
    );
    for addr in [site.fronts.v4, site.fronts.v6, site.fronts.admin] {
        assert!(TcpStream::connect(addr).await.is_err(), "{addr} was bound");
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_without_a_running_instance_fails_naming_the_socket() {
    let web = Backend::start("web").await;
    let site = Site::new();

    // No socket file at all.
    let log = assert_upgrade_fails(&site, &web, "no socket file").await;
    assert!(log.to_lowercase().contains("no such file"), "{log}");

    // A socket file left behind by an instance that is gone.
    let stale = std::os::unix::net::UnixListener::bind(site.socket()).expect("bind");
    drop(stale);
    assert!(Path::new(&site.socket()).exists());
    let log = assert_upgrade_fails(&site, &web, "stale socket file").await;
    assert!(log.to_lowercase().contains("refused"), "{log}");
}
