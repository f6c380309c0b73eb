//! The `launchday` command line: parse arguments, build the runtime, wire signals.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use launchday::config::{self, Snapshot};
use launchday::sched::Scheduling;
use launchday::server::Server;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "launchday",
    version,
    about = "An edge HTTP load balancer for launch day"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer (foreground; logs to stderr).
    Run {
        /// The config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Take the listening sockets from the running instance over its upgrade
        /// socket; that instance then drains and exits (zero-downtime upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config: prints `ok`, or every error (one a line) and exits 1.
    Check {
        /// The config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run the built-in demo: two back ends on [::1] and the balancer in front.
    Demo {
        /// Public port (on 127.0.0.1 and [::1]).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Admin port (on 127.0.0.1).
        #[arg(long, default_value_t = 9090)]
        admin_port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match cli.command {
        Command::Check { config } => return check(&config),
        Command::Run { config, upgrade } => run(&config, upgrade),
        Command::Demo { port, admin_port } => demo(port, admin_port),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("launchday: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load_file(path) {
        Ok(_) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// One multi-thread runtime with `threads` workers and the config's scheduling
/// policy (`launchday::sched`: tokio's default, or fair rounds for a bounded tail at
/// many busy connections; BENCHMARKS.md, "Scheduling").
fn runtime(
    threads: usize,
    scheduling: Scheduling,
    busy_poll: Duration,
) -> anyhow::Result<tokio::runtime::Runtime> {
    launchday::sched::runtime(threads, scheduling, busy_poll).context("starting the runtime")
}

fn load(path: &Path) -> anyhow::Result<Snapshot> {
    config::load_file(path).map_err(|errors| {
        for e in &errors.0 {
            tracing::error!("{e}");
        }
        anyhow::anyhow!(
            "{}: invalid config ({} errors)",
            path.display(),
            errors.0.len()
        )
    })
}

fn run(path: &Path, upgrade: bool) -> anyhow::Result<()> {
    let snapshot = load(path)?;
    let handover = if upgrade {
        let from = snapshot.upgrade_socket.clone();
        let (sockets, conn) = launchday::upgrade::take(&from)?;
        tracing::info!(sockets = sockets.len(), from = %from.display(), "took over listening sockets");
        Some((sockets, conn))
    } else {
        None
    };
    tracing::info!(
        threads = snapshot.threads,
        scheduling = ?snapshot.scheduling,
        busy_poll = ?snapshot.busy_poll,
        "starting the runtime"
    );
    runtime(snapshot.threads, snapshot.scheduling, snapshot.busy_poll)?.block_on(serve(
        snapshot,
        Some(path.to_path_buf()),
        handover,
    ))
}

fn demo(port: u16, admin_port: u16) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    runtime(threads, Scheduling::default(), Duration::ZERO)?.block_on(async move {
        let any = "[::1]:0".parse().context("address")?;
        let mut addrs = Vec::new();
        for b in launchday::demo::backends() {
            addrs.push(launchday::demo::spawn_backend(any, b).await?.addr);
        }
        let addrs: [std::net::SocketAddr; 3] = addrs
            .try_into()
            .map_err(|_| anyhow::anyhow!("three demo back ends"))?;
        let text = launchday::demo::config(addrs, port, admin_port);
        let snapshot = config::load_str(&text, Path::new("."), None)
            .map_err(|e| anyhow::anyhow!("demo config invalid:\n{e}"))?;
        let banner = launchday::demo::banner(port, admin_port);
        serve_with(snapshot, None, None, move || print!("{banner}")).await
    })
}

type Handover = (launchday::server::Inherited, std::os::unix::net::UnixStream);

async fn serve(
    snapshot: Snapshot,
    source: Option<PathBuf>,
    handover: Option<Handover>,
) -> anyhow::Result<()> {
    serve_with(snapshot, source, handover, || {}).await
}

async fn serve_with(
    snapshot: Snapshot,
    source: Option<PathBuf>,
    handover: Option<Handover>,
    on_ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let grace = snapshot.shutdown_grace;
    let upgrade_path = snapshot.upgrade_socket.clone();
    let (inherited, conn) = match handover {
        Some((sockets, conn)) => (sockets, Some(conn)),
        None => (Default::default(), None),
    };
    // Signal handlers before the first connection is accepted: a SIGHUP or SIGTERM
    // arriving while starting must not kill the process with the default action.
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let server = Server::start_with(snapshot, prometheus::Registry::new(), inherited).await?;
    on_ready();
    // The upgrade socket: taken over from the old instance, or bound afresh. Without
    // it the balancer still runs; only `--upgrade` is unavailable.
    let upgrade_listener = match conn {
        Some(conn) => {
            let path = upgrade_path.clone();
            tokio::task::spawn_blocking(move || launchday::upgrade::confirm(conn, &path))
                .await
                .context("upgrade hand-over")?
                .map(Some)
                .unwrap_or_else(|e| {
                    tracing::warn!("{e}; further binary upgrades unavailable");
                    None
                })
        }
        None if source.is_some() => launchday::upgrade::listen(&upgrade_path)
            .map_err(|e| tracing::warn!("{e}; binary upgrades unavailable"))
            .ok(),
        None => None,
    };
    let upgraded = match upgrade_listener {
        Some(l) => tokio::spawn(launchday::upgrade::serve(
            l,
            Arc::clone(&server),
            upgrade_path.clone(),
        )),
        None => tokio::spawn(std::future::pending()),
    };
    tokio::pin!(upgraded);
    if let Some(path) = &source {
        if let Err(e) = launchday::reload::watch(Arc::clone(&server), path.clone()) {
            tracing::warn!("{e}; reload with SIGHUP or POST /api/reload instead");
        }
    }
    loop {
        tokio::select! {
            _ = hup.recv() => match &source {
                Some(path) => match server.reload_file(path).await {
                    Ok(()) => tracing::info!(config = %path.display(), "reloaded (SIGHUP)"),
                    Err(e) => tracing::error!("reload rejected, the running config stays:\n{e}"),
                },
                None => tracing::warn!("SIGHUP: the built-in config has no file to reload"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = &mut upgraded => {
                tracing::info!("a new instance took over the sockets: draining and exiting");
                break;
            }
        }
    }
    tracing::info!(grace = ?grace, "stopping: no new connections, finishing in-flight requests");
    let drained = tokio::select! {
        d = server.shutdown(grace) => d,
        _ = term.recv() => { tracing::warn!("second signal: exiting now"); false }
        _ = int.recv() => { tracing::warn!("second signal: exiting now"); false }
    };
    if !drained {
        tracing::warn!("some connections were still open at exit");
    }
    // Give the log a moment; connections still open are dropped with the runtime.
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(())
}
