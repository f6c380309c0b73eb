//! Wiring: binds every listener of a snapshot, runs the accept loops and the admin
//! listener, applies new snapshots (listeners included), and shuts down gracefully.
//!
//! Invariants:
//! - Every socket a snapshot needs is bound before anything changes, so a bind
//!   failure (port in use, permission) fails `start` or `apply` as a whole: nothing
//!   half-starts and a failed reload leaves the running config and sockets as they were.
//! - Sockets are keyed by their configured address ([`BindKey`]: admin or public,
//!   address, and which occurrence of that address it is, so several `:0` binds stay
//!   distinct): an address kept by a reload keeps
//!   its socket (no connection is refused during the reload); its accept loop is only
//!   restarted when the listener's name or TLS-ness changes. A removed address stops
//!   accepting and its open connections finish their requests.
//! - Shutdown stops accepting first, then lets in-flight requests finish within the
//!   grace period (idle keep-alive connections are closed at once, HTTP/2 gets GOAWAY).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::server::graceful::GracefulShutdown;
use parking_lot::Mutex;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::admin;
use crate::config::{ConfigErrors, Snapshot};
use crate::listener::{self, ServeOptions};
use crate::metrics::{Metrics, MetricsError};
use crate::proxy::Proxy;
use crate::tls;

/// Errors of starting the server or applying a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{key}: {source}")]
    Bind {
        key: String,
        source: listener::ListenerError,
    },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Why a reload did not take effect (the running config stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(ConfigErrors),
    #[error(transparent)]
    Apply(#[from] ServerError),
    #[error("reload task failed: {0}")]
    Task(String),
}

/// A bound public socket.
#[derive(Debug, Clone)]
pub struct Bound {
    /// The listener's name.
    pub listener: String,
    /// The actual address (port 0 resolved).
    pub addr: SocketAddr,
}

/// The identity of a configured socket across reloads and upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BindKey {
    pub admin: bool,
    /// As configured (port 0 stays 0).
    pub addr: SocketAddr,
    /// 0 for the first bind of this address (of its kind) in config order, 1 for the
    /// next... Only port-0 addresses can repeat.
    pub nth: usize,
}

impl std::fmt::Display for BindKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.admin { "admin" } else { "public" };
        write!(f, "{kind} {} {}", self.addr, self.nth)
    }
}

impl std::str::FromStr for BindKey {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut it = s.split(' ');
        let admin = match it.next() {
            Some("admin") => true,
            Some("public") => false,
            _ => return Err(()),
        };
        let addr = it.next().ok_or(())?.parse().map_err(|_| ())?;
        let nth = it.next().ok_or(())?.parse().map_err(|_| ())?;
        match it.next() {
            None => Ok(BindKey { admin, addr, nth }),
            Some(_) => Err(()),
        }
    }
}

/// One socket and the loop accepting on it.
struct Acceptor {
    configured: BindKey,
    /// Listener name; empty for the admin listener.
    listener: String,
    tls: bool,
    socket: Arc<TcpListener>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Acceptor {
    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap_or(self.configured.addr)
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A running balancer.
pub struct Server {
    proxy: Arc<Proxy>,
    public: Mutex<Vec<Acceptor>>,
    admin: Mutex<Vec<Acceptor>>,
    /// Taken at shutdown; accept loops hold clones while they run.
    graceful: Mutex<Option<Arc<GracefulShutdown>>>,
    reloads: prometheus::IntCounterVec,
    last_success: prometheus::Gauge,
    /// Serialises reloads.
    reloading: tokio::sync::Mutex<()>,
    history: Arc<crate::history::History>,
}

/// Sockets handed over by a running instance (binary upgrade), by configured address.
pub type Inherited = HashMap<BindKey, std::net::TcpListener>;

fn bind_all(
    want: &[(BindKey, String)],
    have: &[Acceptor],
    inherited: &mut Inherited,
) -> Result<HashMap<BindKey, Arc<TcpListener>>, ServerError> {
    let mut fresh = HashMap::new();
    for (bind, key) in want {
        if have.iter().any(|a| a.configured == *bind) || fresh.contains_key(bind) {
            continue;
        }
        let addr = &bind.addr;
        let err = |source| ServerError::Bind {
            key: key.clone(),
            source,
        };
        let sock = match inherited.remove(bind) {
            Some(std_sock) => std_sock
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(std_sock))
                .map_err(|source| {
                    err(listener::ListenerError::Bind {
                        addr: *addr,
                        source,
                    })
                })?,
            None => listener::bind(*addr).map_err(err)?,
        };
        fresh.insert(*bind, Arc::new(sock));
    }
    Ok(fresh)
}

/// Keys in config order for a list of addresses.
fn keys(admin: bool, addrs: impl Iterator<Item = SocketAddr>) -> Vec<BindKey> {
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    addrs
        .map(|addr| {
            let n = seen.entry(addr).or_insert(0);
            let key = BindKey {
                admin,
                addr,
                nth: *n,
            };
            *n += 1;
            key
        })
        .collect()
}

/// (key, config path, listener index) of every public bind, in config order.
fn public_binds(s: &Snapshot) -> Vec<(BindKey, String, usize)> {
    let paths = s.listeners.iter().enumerate().flat_map(|(li, l)| {
        l.bind
            .iter()
            .enumerate()
            .map(move |(i, a)| (*a, format!("listeners.{}.bind[{i}]", l.name), li))
    });
    let paths: Vec<_> = paths.collect();
    keys(false, paths.iter().map(|p| p.0))
        .into_iter()
        .zip(paths)
        .map(|(k, (_, path, li))| (k, path, li))
        .collect()
}

fn admin_binds(s: &Snapshot) -> Vec<(BindKey, String)> {
    keys(true, s.admin.listen.iter().copied())
        .into_iter()
        .enumerate()
        .map(|(i, k)| (k, format!("admin.listen[{i}]")))
        .collect()
}

fn without_index(binds: Vec<(BindKey, String, usize)>) -> Vec<(BindKey, String)> {
    binds.into_iter().map(|(k, p, _)| (k, p)).collect()
}

impl Server {
    /// Binds everything in `snapshot` and starts serving on the current runtime.
    pub async fn start(snapshot: Snapshot, registry: Registry) -> Result<Arc<Server>, ServerError> {
        Self::start_with(snapshot, registry, Inherited::new()).await
    }

    /// Like [`Server::start`], using `inherited` sockets where their configured address
    /// matches (the rest are bound; inherited sockets no longer configured are closed).
    pub async fn start_with(
        snapshot: Snapshot,
        registry: Registry,
        mut inherited: Inherited,
    ) -> Result<Arc<Server>, ServerError> {
        let public = bind_all(&without_index(public_binds(&snapshot)), &[], &mut inherited)?;
        let admin = bind_all(&admin_binds(&snapshot), &[], &mut inherited)?;
        for key in inherited.keys() {
            tracing::info!(socket = %key, "inherited socket no longer configured; closing it");
        }
        let reloads = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "launchday_config_reloads_total",
                "Config reloads, by result (success, failure).",
            ),
            &["result"],
        )
        .map_err(MetricsError::from)?;
        let last_success = prometheus::Gauge::new(
            "launchday_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load (start or reload).",
        )
        .map_err(MetricsError::from)?;
        registry
            .register(Box::new(reloads.clone()))
            .map_err(MetricsError::from)?;
        registry
            .register(Box::new(last_success.clone()))
            .map_err(MetricsError::from)?;
        for r in ["success", "failure"] {
            reloads.with_label_values(&[r]);
        }
        let metrics = Metrics::new(registry)?;
        let snapshot = Arc::new(snapshot);
        let proxy = Proxy::new(Arc::clone(&snapshot), metrics);
        let history = crate::history::History::spawn(&proxy);
        let server = Arc::new(Server {
            proxy,
            public: Mutex::new(Vec::new()),
            admin: Mutex::new(Vec::new()),
            graceful: Mutex::new(Some(Arc::new(GracefulShutdown::new()))),
            reloads,
            last_success,
            reloading: tokio::sync::Mutex::new(()),
            history,
        });
        server.switch_listeners(&snapshot, public, admin).await?;
        server.last_success.set(unix_now());
        Ok(server)
    }

    /// The public sockets, in config order.
    pub fn bound(&self) -> Vec<Bound> {
        self.public
            .lock()
            .iter()
            .map(|a| Bound {
                listener: a.listener.clone(),
                addr: a.addr(),
            })
            .collect()
    }

    /// The admin sockets' addresses.
    pub fn admin_addrs(&self) -> Vec<SocketAddr> {
        self.admin.lock().iter().map(Acceptor::addr).collect()
    }

    /// Duplicates of every listening socket (public and admin) with its configured
    /// address, to hand over to a new instance.
    pub fn sockets(&self) -> std::io::Result<Vec<(BindKey, std::os::fd::OwnedFd)>> {
        use std::os::fd::AsFd;
        let public = self.public.lock();
        let admin = self.admin.lock();
        public
            .iter()
            .chain(admin.iter())
            .map(|a| Ok((a.configured, a.socket.as_fd().try_clone_to_owned()?)))
            .collect()
    }

    /// Recent rates (sampled once a second) for the status page and API.
    pub fn history(&self) -> &crate::history::History {
        &self.history
    }

    /// The request handler.
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Reads, validates and applies the config file `path`, counting the result in
    /// `launchday_config_reloads_total`. On any error the running config stays.
    pub async fn reload_file(self: &Arc<Self>, path: &std::path::Path) -> Result<(), ReloadError> {
        let path = path.to_owned();
        // Validation reads files and may resolve back-end names: off the runtime.
        let loaded = tokio::task::spawn_blocking(move || crate::config::load_file(&path))
            .await
            .map_err(|e| ReloadError::Task(e.to_string()));
        let result = match loaded {
            Ok(Ok(snapshot)) => self.apply(snapshot).await.map_err(ReloadError::from),
            Ok(Err(errors)) => Err(ReloadError::Invalid(errors)),
            Err(e) => Err(e),
        };
        match &result {
            Ok(()) => {
                self.reloads.with_label_values(&["success"]).inc();
                self.last_success.set(unix_now());
            }
            Err(_) => self.reloads.with_label_values(&["failure"]).inc(),
        }
        result
    }

    /// Applies a new snapshot: binds new addresses (all or nothing), swaps the config
    /// in (the very next request uses it), then retires removed addresses.
    pub async fn apply(self: &Arc<Self>, snapshot: Snapshot) -> Result<(), ServerError> {
        let _one_at_a_time = self.reloading.lock().await;
        let public = bind_all(
            &without_index(public_binds(&snapshot)),
            &self.public.lock(),
            &mut Inherited::new(),
        )?;
        let admin = bind_all(
            &admin_binds(&snapshot),
            &self.admin.lock(),
            &mut Inherited::new(),
        )?;
        let running = &self.proxy.live().snapshot;
        if running.threads != snapshot.threads
            || running.scheduling != snapshot.scheduling
            || running.busy_poll != snapshot.busy_poll
        {
            // The runtime is built once (crate::sched): these wait for a restart or
            // `run --upgrade`; everything else in the snapshot applies now.
            tracing::warn!(
                threads = snapshot.threads,
                scheduling = ?snapshot.scheduling,
                busy_poll = ?snapshot.busy_poll,
                "threads, scheduling and busy_poll apply at the next start (or `run --upgrade`), \
                 not on reload"
            );
        }
        let snapshot = Arc::new(snapshot);
        self.proxy.apply(Arc::clone(&snapshot));
        self.switch_listeners(&snapshot, public, admin).await
    }

    /// Makes the running accept loops match `snapshot`, using `fresh` sockets for new
    /// addresses.
    async fn switch_listeners(
        self: &Arc<Self>,
        snapshot: &Snapshot,
        mut fresh_public: HashMap<BindKey, Arc<TcpListener>>,
        mut fresh_admin: HashMap<BindKey, Arc<TcpListener>>,
    ) -> Result<(), ServerError> {
        // TLS acceptors first: the only step here that can fail.
        let mut acceptors: HashMap<&str, Option<TlsAcceptor>> = HashMap::new();
        for l in &snapshot.listeners {
            let tls = match &l.tls {
                Some(_) => {
                    let resolver = tls::SniResolver::new(Arc::clone(&self.proxy), &l.name);
                    Some(TlsAcceptor::from(tls::server_config(resolver)?))
                }
                None => None,
            };
            acceptors.insert(&l.name, tls);
        }
        let old_public = std::mem::take(&mut *self.public.lock());
        let mut keep: HashMap<BindKey, Acceptor> =
            old_public.into_iter().map(|a| (a.configured, a)).collect();
        let mut running = Vec::new();
        let mut retired = Vec::new();
        for (key, _, li) in public_binds(snapshot) {
            let l = &snapshot.listeners[li];
            let tls = acceptors.get(l.name.as_str()).cloned().flatten();
            let socket = match keep.remove(&key) {
                Some(a) if a.listener == l.name && a.tls == tls.is_some() => {
                    running.push(a);
                    continue;
                }
                Some(a) => {
                    // Same socket, new settings: restart its loop.
                    let socket = Arc::clone(&a.socket);
                    retired.push(a);
                    socket
                }
                None => match fresh_public.remove(&key) {
                    Some(s) => s,
                    None => continue,
                },
            };
            running.push(self.spawn_public(key, &l.name, socket, tls));
        }
        retired.extend(keep.into_values());
        *self.public.lock() = running;

        let old_admin = std::mem::take(&mut *self.admin.lock());
        let mut keep: HashMap<BindKey, Acceptor> =
            old_admin.into_iter().map(|a| (a.configured, a)).collect();
        let mut admin = Vec::new();
        for (key, _) in admin_binds(snapshot) {
            match keep.remove(&key) {
                Some(a) => admin.push(a),
                None => {
                    if let Some(socket) = fresh_admin.remove(&key) {
                        admin.push(self.spawn_admin(key, socket));
                    }
                }
            }
        }
        retired.extend(keep.into_values());
        *self.admin.lock() = admin;

        for a in retired {
            tracing::info!(addr = %a.addr(), listener = %a.listener, "no longer accepting");
            a.stop().await;
        }
        Ok(())
    }

    fn spawn_public(
        &self,
        configured: BindKey,
        name: &str,
        socket: Arc<TcpListener>,
        tls: Option<TlsAcceptor>,
    ) -> Acceptor {
        let (stop, stop_rx) = watch::channel(false);
        let is_tls = tls.is_some();
        let opts = ServeOptions {
            listener: name.into(),
            tls,
        };
        let graceful = self.graceful.lock().clone();
        let task = match graceful {
            Some(graceful) => tokio::spawn(listener::serve(
                Arc::clone(&socket),
                Arc::clone(&self.proxy),
                opts,
                graceful,
                stop_rx,
            )),
            // Shutting down: accept nothing.
            None => tokio::spawn(async {}),
        };
        let a = Acceptor {
            configured,
            listener: name.to_owned(),
            tls: is_tls,
            socket,
            stop,
            task,
        };
        tracing::info!(listener = %name, addr = %a.addr(), tls = is_tls, "listening");
        a
    }

    fn spawn_admin(self: &Arc<Self>, configured: BindKey, socket: Arc<TcpListener>) -> Acceptor {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(admin::serve(Arc::clone(&socket), Arc::clone(self), stop_rx));
        let a = Acceptor {
            configured,
            listener: String::new(),
            tls: false,
            socket,
            stop,
            task,
        };
        tracing::info!(addr = %a.addr(), "admin listening");
        a
    }

    /// Stops accepting, then waits up to `grace` for open connections to finish their
    /// requests. Returns whether everything finished in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        let public = std::mem::take(&mut *self.public.lock());
        let admin = std::mem::take(&mut *self.admin.lock());
        for a in public.into_iter().chain(admin) {
            a.stop().await;
        }
        // Only the accept loops held clones of the graceful handle, and they have
        // all returned; connections hold watchers, not the handle.
        let Some(graceful) = self.graceful.lock().take() else {
            return false;
        };
        let Ok(graceful) = Arc::try_unwrap(graceful) else {
            return false;
        };
        tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_ok()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
