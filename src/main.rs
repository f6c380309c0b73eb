//! The `launchday` command line: parse arguments, build the runtime, wire signals.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use launchday::config::{self, Snapshot};
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
        Command::Run { config } => run(&config),
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

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    if std::env::var_os("LAUNCHDAY_EXPERIMENT_CURRENT_THREAD").is_some() {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("starting the runtime")
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

fn run(path: &Path) -> anyhow::Result<()> {
    let snapshot = load(path)?;
    runtime(snapshot.threads)?.block_on(serve(snapshot, Some(path.to_path_buf())))
}

fn demo(port: u16, admin_port: u16) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    runtime(threads)?.block_on(async move {
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
        serve_with(snapshot, None, move || print!("{banner}")).await
    })
}

async fn serve(snapshot: Snapshot, source: Option<PathBuf>) -> anyhow::Result<()> {
    serve_with(snapshot, source, || {}).await
}

async fn serve_with(
    snapshot: Snapshot,
    source: Option<PathBuf>,
    on_ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let grace = snapshot.shutdown_grace;
    let server = Server::start(snapshot, prometheus::Registry::new()).await?;
    on_ready();
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
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
