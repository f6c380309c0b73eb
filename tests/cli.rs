//! End-to-end through the real binary: `launchday run -c FILE` proxies, reloads on
//! SIGHUP, and exits 0 on SIGTERM; `--version` prints the version.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Backend, Client};
use http::StatusCode;
use tokio::net::TcpStream;

/// A free port on `ip` (bound, then released; the binary binds it right after).
fn free_addr(ip: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind(format!("{ip}:0")).expect("bind");
    l.local_addr().expect("addr")
}

/// Kills the child if the test ends before it exited.
struct Running {
    child: Child,
    log: std::path::PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then an exit with status 0 within 5 s.
    fn terminate(&mut self) {
        self.signal("TERM");
        let status = self
            .wait_exit(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no exit 5 s after SIGTERM:\n{}", self.log()));
        assert_eq!(status.code(), Some(0), "{status}:\n{}", self.log());
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits up to `limit` for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_run(config: &Path, log: &Path) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_launchday"))
        .args(["run", "-c"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn launchday");
    Running {
        child,
        log: log.to_path_buf(),
    }
}

/// Free addresses for a public listener on IPv4 and IPv6 and for the admin listener.
fn free_fronts() -> (SocketAddr, SocketAddr, SocketAddr) {
    (
        free_addr("127.0.0.1"),
        free_addr("[::1]"),
        free_addr("127.0.0.1"),
    )
}

/// Writes `config` to `path`, runs `launchday run -c path` (its stderr beside the
/// file) and waits until each of `addrs` accepts connections.
async fn start(path: &Path, config: &str, addrs: [SocketAddr; 3]) -> Running {
    std::fs::write(path, config).expect("write config");
    let mut run = spawn_run(path, &path.with_file_name("stderr.log"));
    for addr in addrs {
        wait_listening(&mut run, addr).await;
    }
    run
}

/// Waits (bounded) until `addr` accepts connections.
async fn wait_listening(run: &mut Running, addr: SocketAddr) {
    let start = Instant::now();
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Some(status) = run.child.try_wait().expect("try_wait") {
            panic!("launchday exited early ({status}):\n{}", run.log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{addr} not listening after 10 s:\n{}",
            run.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cli_config(
    v4: SocketAddr,
    v6: SocketAddr,
    admin: SocketAddr,
    web: &Backend,
    label: &str,
) -> String {
    format!(
        r#"shutdown_grace = "2s"
threads = 1

[admin]
listen = ["{admin}"]

[[listeners]]
name = "public"
bind = ["{v4}", "{v6}"]

[[routes]]
pool = "web"

[pools.web]
backends = [{{ name = "web", address = "{addr}", served_by = "{label}" }}]
"#,
        addr = web.addr
    )
}

#[test]
fn version_prints_the_crate_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_launchday"))
        .arg("--version")
        .output()
        .expect("run --version");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("launchday {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_proxies_reloads_on_sighup_and_exits_0_on_sigterm() {
    let web = Backend::start("web").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("launchday.toml");
    let (v4, v6, admin) = free_fronts();
    let mut run = start(
        &path,
        &cli_config(v4, v6, admin, &web, "one"),
        [v4, v6, admin],
    )
    .await;

    for front in [v4, v6] {
        let r = common::get(front, "/hello").await;
        assert_eq!(r.status, StatusCode::OK, "via {front}");
        assert_eq!(r.text(), "served by web\n");
        assert_eq!(r.header("x-served-by").as_deref(), Some("one"));
    }
    assert_eq!(web.count(), 2);
    let m = common::get(admin, "/metrics").await;
    assert_eq!(m.status, StatusCode::OK);
    assert_eq!(
        common::metric(
            &m.text(),
            r#"launchday_requests_total{backend="web",code="2xx",pool="web"}"#
        ),
        Some(2.0)
    );

    // SIGHUP: the new file applies to the next requests (bounded wait for the signal).
    std::fs::write(&path, cli_config(v4, v6, admin, &web, "two")).expect("rewrite config");
    run.signal("HUP");
    let mut c = Client::connect(v4).await;
    let start = Instant::now();
    loop {
        let r = c.get("/after-reload").await;
        assert_eq!(r.status, StatusCode::OK);
        if r.header("x-served-by").as_deref() == Some("two") {
            break;
        }
        assert_eq!(r.header("x-served-by").as_deref(), Some("one"));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "SIGHUP did not reload:\n{}",
            run.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(run.child.try_wait().expect("try_wait").is_none());

    // SIGTERM with an idle keep-alive client connection open: exit 0, promptly.
    run.terminate();
    drop(c);
    // The ports are released.
    assert!(TcpStream::connect(v4).await.is_err());
    assert!(TcpStream::connect(admin).await.is_err());
}

/// `scheduling = "fair"` (the runtime built with fair rounds, each answer's handler
/// future in its own allocation): 40 keep-alive clients at once are all served, on
/// the own HTTP/1.1 loop, and a reload that changes the policy applies the rest of
/// the file while saying that the policy waits for a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_scheduling_serves_concurrent_clients_and_reload_keeps_the_policy() {
    let web = Backend::start("web").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("launchday.toml");
    let (v4, v6, admin) = free_fronts();
    let config = |policy: &str, label: &str| {
        format!(
            "scheduling = \"{policy}\"\n{}",
            cli_config(v4, v6, admin, &web, label)
        )
    };
    let mut run = start(&path, &config("fair", "one"), [v4, v6, admin]).await;

    let mut clients = Vec::new();
    for i in 0..40 {
        let front = if i % 2 == 0 { v4 } else { v6 };
        clients.push(tokio::spawn(async move {
            let mut c = Client::connect(front).await;
            let mut served = 0;
            for n in 0..5 {
                let r = c.get(&format!("/c{i}/r{n}")).await;
                assert_eq!(r.status, StatusCode::OK);
                assert_eq!(r.text(), "served by web\n");
                served += 1;
            }
            served
        }));
    }
    let mut total = 0;
    for c in clients {
        total += tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("clients done within 10 s")
            .expect("client task");
    }
    assert_eq!(total, 200);
    assert_eq!(web.count(), 200);

    // A reload to the default policy: the label (the rest of the file) applies, the
    // policy does not, and the log says so.
    std::fs::write(&path, config("throughput", "two")).expect("rewrite config");
    run.signal("HUP");
    let mut c = Client::connect(v4).await;
    let start = Instant::now();
    while c.get("/after").await.header("x-served-by").as_deref() != Some("two") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "SIGHUP did not reload:\n{}",
            run.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        run.log().contains("apply at the next start"),
        "no warning about the policy:\n{}",
        run.log()
    );

    run.terminate();
}

/// CPU time (user + system) of process `pid` so far, from `/proc`.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let ticks: u64 = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|v| v.parse::<u64>().expect("ticks"))
        .sum();
    // USER_HZ is 100 on Linux with glibc.
    Duration::from_millis(ticks * 10)
}

/// `busy_poll` with two workers: concurrent keep-alive clients are all served, an
/// idle balancer goes back to sleep (its spinners stop after their limit), and
/// SIGTERM still ends it promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_serves_clients_and_sleeps_when_idle() {
    let web = Backend::start("web").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("launchday.toml");
    let (v4, v6, admin) = free_fronts();
    let config = format!(
        "busy_poll = \"200us\"\n{}",
        cli_config(v4, v6, admin, &web, "one").replace("threads = 1", "threads = 2")
    );
    let mut run = start(&path, &config, [v4, v6, admin]).await;

    let mut clients = Vec::new();
    for i in 0..20 {
        let front = if i % 2 == 0 { v4 } else { v6 };
        clients.push(tokio::spawn(async move {
            let mut c = Client::connect(front).await;
            for n in 0..5 {
                let r = c.get(&format!("/c{i}/r{n}")).await;
                assert_eq!(r.status, StatusCode::OK);
                assert_eq!(r.text(), "served by web\n");
            }
        }));
    }
    for c in clients {
        tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("clients done within 10 s")
            .expect("client task");
    }
    assert_eq!(web.count(), 100);
    assert!(
        run.log().contains("starting the runtime") && run.log().contains("200µs"),
        "the start does not log the runtime's settings:\n{}",
        run.log()
    );

    // Idle: two spinners that never stopped would take ~2 s of CPU in this second.
    let pid = run.child.id();
    let before = cpu_of(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_of(pid) - before;
    assert!(
        spent < Duration::from_millis(300),
        "{spent:?} of CPU in an idle second:\n{}",
        run.log()
    );

    run.terminate();
}
