//! Wiring: binds every listener of a snapshot, runs the accept loops and the admin
//! listener, applies new snapshots, and shuts down gracefully.
//!
//! Invariants: every socket is bound before anything is served, so a bind failure
//! (port in use, permission) fails `start` as a whole and nothing half-starts.
//! Shutdown stops accepting first, then lets in-flight requests finish within the
//! grace period (idle keep-alive connections are closed at once by hyper's graceful
//! shutdown), then returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use prometheus::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::config::Snapshot;
use crate::listener::{self, ServeOptions};
use crate::metrics::{Metrics, MetricsError};
use crate::proxy::Proxy;
use crate::tls;
use tokio_rustls::TlsAcceptor;

/// Errors of starting the server.
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

/// A bound public socket.
#[derive(Debug, Clone)]
pub struct Bound {
    /// The listener's name.
    pub listener: String,
    /// The actual address (port 0 resolved).
    pub addr: SocketAddr,
}

/// A running balancer.
pub struct Server {
    proxy: Arc<Proxy>,
    bound: Vec<Bound>,
    admin_addrs: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    accept_tasks: Vec<JoinHandle<()>>,
    graceful: Arc<GracefulShutdown>,
}

impl Server {
    /// Binds everything in `snapshot` and starts serving on the current runtime.
    pub async fn start(snapshot: Snapshot, registry: Registry) -> Result<Server, ServerError> {
        let metrics = Metrics::new(registry)?;
        let snapshot = Arc::new(snapshot);

        let mut public = Vec::new();
        for l in &snapshot.listeners {
            for (i, addr) in l.bind.iter().enumerate() {
                let sock = listener::bind(*addr).map_err(|source| ServerError::Bind {
                    key: format!("listeners.{}.bind[{i}]", l.name),
                    source,
                })?;
                public.push((l.name.clone(), *addr, sock));
            }
        }
        let mut admin_socks = Vec::new();
        for (i, addr) in snapshot.admin.listen.iter().enumerate() {
            let sock = listener::bind(*addr).map_err(|source| ServerError::Bind {
                key: format!("admin.listen[{i}]"),
                source,
            })?;
            admin_socks.push(sock);
        }

        let proxy = Proxy::new(Arc::clone(&snapshot), metrics);
        let (stop, stop_rx) = watch::channel(false);
        let graceful = Arc::new(GracefulShutdown::new());
        let mut options = std::collections::HashMap::new();
        for l in &snapshot.listeners {
            let tls = match &l.tls {
                Some(_) => {
                    let resolver = tls::SniResolver::new(Arc::clone(&proxy), &l.name);
                    Some(TlsAcceptor::from(tls::server_config(resolver)?))
                }
                None => None,
            };
            let opts = ServeOptions {
                listener: l.name.as_str().into(),
                header_timeout: snapshot.limits.header_timeout,
                trusted_proxies: snapshot.trusted_proxies.clone(),
                tls,
            };
            options.insert(l.name.clone(), opts);
        }
        let mut bound = Vec::new();
        let mut accept_tasks = Vec::new();
        for (name, configured, sock) in public {
            let Some(opts) = options.get(&name) else {
                continue;
            };
            let addr = sock.local_addr().unwrap_or(configured);
            tracing::info!(listener = %name, %addr, "listening");
            bound.push(Bound {
                listener: name,
                addr,
            });
            accept_tasks.push(tokio::spawn(listener::serve(
                sock,
                Arc::clone(&proxy),
                opts.clone(),
                Arc::clone(&graceful),
                stop_rx.clone(),
            )));
        }
        let mut admin_addrs = Vec::new();
        for sock in admin_socks {
            if let Ok(addr) = sock.local_addr() {
                tracing::info!(%addr, "admin listening");
                admin_addrs.push(addr);
            }
            tokio::spawn(admin::serve(sock, Arc::clone(&proxy), stop_rx.clone()));
        }
        Ok(Server {
            proxy,
            bound,
            admin_addrs,
            stop,
            accept_tasks,
            graceful,
        })
    }

    /// The public sockets, in config order.
    pub fn bound(&self) -> &[Bound] {
        &self.bound
    }

    /// The admin sockets' addresses.
    pub fn admin_addrs(&self) -> &[SocketAddr] {
        &self.admin_addrs
    }

    /// The request handler.
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Applies a new snapshot's routes, pools and weights; the next request uses it.
    /// Listener and admin addresses are not rebound (they need a restart for now);
    /// a change to them is logged.
    pub fn apply(&self, snapshot: Snapshot) {
        let live = self.proxy.live();
        let old = &live.snapshot;
        let binds = |s: &Snapshot| -> Vec<SocketAddr> {
            s.listeners.iter().flat_map(|l| l.bind.clone()).collect()
        };
        if binds(old) != binds(&snapshot) || old.admin.listen != snapshot.admin.listen {
            tracing::warn!("listener or admin address changes take effect after a restart");
        }
        self.proxy.apply(Arc::new(snapshot));
    }

    /// Stops accepting, then waits up to `grace` for open connections to finish their
    /// requests. Returns whether everything finished in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        let _ = self.stop.send(true);
        for t in self.accept_tasks {
            let _ = t.await;
        }
        let Ok(graceful) = Arc::try_unwrap(self.graceful) else {
            // Only the accept loops held clones, and they have all returned.
            return false;
        };
        tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_ok()
    }
}
