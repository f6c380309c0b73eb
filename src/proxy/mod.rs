//! The request handler: route → acquire → forward, or answer locally.
//!
//! A request loads the live state ([`Live`]: the snapshot and the objects built from
//! it) once and uses it to the end, so a reload in the middle never mixes two configs.
//! Every answer is counted once in `launchday_requests_total`, with `backend="-"` when
//! launchday answered itself; locally generated answers carry `X-Served-By: launchday`
//! and an `X-Launchday-Error` saying why. An upgrade request whose back end answers
//! `101` becomes a tunnel ([`crate::tunnel`]); its `101` is counted as a `1xx`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

mod forward;
mod request;

pub use forward::PREFETCH_LIMIT;
pub use request::{Later, Step};

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use parking_lot::Mutex;

use crate::accesslog::AccessLog;
use crate::body::{Body, BodyError};
use crate::config::{AccessLogSpec, Class, Snapshot};
use crate::edge::{
    FetchError, FetchFuture, FetchedPage, SnapshotSpec, Snapshots, X_LAUNCHDAY_SNAPSHOT,
};
use crate::headers::{X_LAUNCHDAY_ERROR, X_SERVED_BY};
use crate::maintenance::MaintenancePage;
use crate::metrics::{CodeCounters, Metrics};
use crate::pool::Pool;
use crate::route::Router;
use crate::strict::{self, Reject};
use crate::upstream::Upstream;
use crate::upstream_io::UpstreamTimeouts;

/// What a request needs from the configuration, built once per snapshot.
pub struct Live {
    pub snapshot: Arc<Snapshot>,
    pub router: Router,
    /// Same order as `snapshot.pools`.
    pub pools: Vec<Arc<Pool>>,
    /// The maintenance page of this snapshot, rendered and compressed.
    pub page: MaintenancePage,
    /// The access log, when configured.
    pub access_log: Option<AccessLog>,
    /// Edge snapshots, when any are configured.
    pub snapshots: Option<Arc<Snapshots>>,
}

/// The handler shared by every connection of every listener.
pub struct Proxy {
    live: Arc<ArcSwap<Live>>,
    metrics: Metrics,
    unrouted: Arc<CodeCounters>,
    /// Connection pools by back-end address, shared by pools and kept across reloads.
    upstreams: Mutex<HashMap<SocketAddr, Arc<Upstream>>>,
    /// Pools by name, kept across reloads (queues, estimates, back-end loads).
    pools: Arc<Mutex<HashMap<String, Arc<Pool>>>>,
    /// The running access log and its settings.
    log: Mutex<Option<(AccessLogSpec, AccessLog)>>,
    /// The snapshot registry, kept across reloads once a config had snapshots.
    edge: Mutex<Option<Arc<Snapshots>>>,
}

static LAUNCHDAY: HeaderValue = HeaderValue::from_static("launchday");
static TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

impl Proxy {
    /// A handler serving `snapshot`.
    pub fn new(snapshot: Arc<Snapshot>, metrics: Metrics) -> Arc<Self> {
        let unrouted = Arc::new(metrics.unrouted());
        let proxy = Proxy {
            live: Arc::new(ArcSwap::from_pointee(Live {
                snapshots: None,
                access_log: None,
                page: MaintenancePage::render("", "", std::time::Duration::ZERO),
                snapshot: Arc::clone(&snapshot),
                router: Router::default(),
                pools: Vec::new(),
            })),
            metrics,
            unrouted,
            upstreams: Mutex::new(HashMap::new()),
            pools: Arc::new(Mutex::new(HashMap::new())),
            log: Mutex::new(None),
            edge: Mutex::new(None),
        };
        let live = proxy.build(snapshot);
        proxy.live.store(Arc::new(live));
        Arc::new(proxy)
    }

    /// The metrics this handler counts into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The counters of answers that belong to no pool (`pool="-"`).
    pub fn unrouted(&self) -> &Arc<CodeCounters> {
        &self.unrouted
    }

    /// The live state now.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Builds the live state of `snapshot` and swaps it in: the very next request uses it.
    pub fn apply(&self, snapshot: Arc<Snapshot>) {
        let live = self.build(snapshot);
        self.live.store(Arc::new(live));
    }

    fn build(&self, snapshot: Arc<Snapshot>) -> Live {
        let mut upstreams = self.upstreams.lock();
        let mut registry = self.pools.lock();
        let mut upstream =
            |addr| Arc::clone(upstreams.entry(addr).or_insert_with(|| Upstream::new(addr)));
        let pools: Vec<Arc<Pool>> = snapshot
            .pools
            .iter()
            .map(|spec| match registry.get(&spec.name) {
                Some(pool) => {
                    pool.reconfigure(spec.clone(), &self.metrics, &mut upstream);
                    Arc::clone(pool)
                }
                None => {
                    let pool = Arc::new(Pool::new(spec.clone(), &self.metrics, &mut upstream));
                    pool.start_checks();
                    pool
                }
            })
            .collect();
        // Pools and connection pools no longer configured are dropped from the
        // registries; requests still using them hold their own references.
        *registry = pools
            .iter()
            .map(|p| (p.name().to_owned(), Arc::clone(p)))
            .collect();
        let in_use: std::collections::HashSet<SocketAddr> = snapshot
            .pools
            .iter()
            .flat_map(|p| p.backends.iter().map(|b| b.address))
            .collect();
        upstreams.retain(|addr, _| in_use.contains(addr));
        drop(upstreams);
        drop(registry);
        Live {
            snapshots: self.snapshots(&snapshot),
            access_log: self.access_log(&snapshot),
            router: Router::new(&snapshot.routes),
            page: MaintenancePage::new(&snapshot.maintenance),
            pools,
            snapshot,
        }
    }

    /// The snapshot registry for `snapshot`: the running one reconfigured (copies of
    /// unchanged pages kept), or a new one on the first config with snapshots.
    fn snapshots(&self, snapshot: &Snapshot) -> Option<Arc<Snapshots>> {
        let specs: Vec<SnapshotSpec> = snapshot
            .snapshots
            .iter()
            .map(|s| SnapshotSpec {
                name: s.name.clone(),
                pool: snapshot.pools[s.pool].name.clone(),
                host: s.host.clone(),
                path: s.path.clone(),
                refresh: s.refresh,
                max_stale: s.max_stale,
                ignore_cookies: s.ignore_cookies,
            })
            .collect();
        let mut current = self.edge.lock();
        if let Some(running) = current.as_ref() {
            if let Err(e) = running.reconfigure(specs) {
                tracing::error!(error = %e, "snapshots not reconfigured; the old ones stay");
            }
            return (!running.is_empty()).then(|| Arc::clone(running));
        }
        if specs.is_empty() || tokio::runtime::Handle::try_current().is_err() {
            return None;
        }
        let fetcher = Arc::new(SnapshotFetch {
            live: Arc::clone(&self.live),
            pools: Arc::clone(&self.pools),
        });
        match Snapshots::new(specs, fetcher, self.metrics.snapshots().clone()) {
            Ok(s) => {
                let s = Arc::new(s);
                *current = Some(Arc::clone(&s));
                Some(s)
            }
            Err(e) => {
                tracing::error!(error = %e, "snapshots not started");
                None
            }
        }
    }

    /// The access log for `snapshot`: the running one when its settings did not change.
    fn access_log(&self, snapshot: &Snapshot) -> Option<AccessLog> {
        let mut current = self.log.lock();
        let spec = snapshot.access_log.as_ref()?;
        if let Some((running, log)) = current.as_ref() {
            if running == spec {
                return Some(log.clone());
            }
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return None;
        }
        match AccessLog::start(spec, self.metrics.access_log_dropped()) {
            Ok(log) => {
                *current = Some((spec.clone(), log.clone()));
                Some(log)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot open the access log; requests are not logged");
                None
            }
        }
    }
}

/// Who writes an answer to the client: hyper (HTTP/2, and HTTP/1.1 requests hyper
/// serves), which needs every header in the answer's `HeaderMap`, or launchday's own
/// HTTP/1.1 writer ([`crate::h1_server`]), which also takes header lines encoded in
/// advance ([`Body::Page`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Hyper,
    Own,
}

/// `write` for methods that carry a user's submission, `read` for the rest.
pub fn class_of(method: &Method) -> Class {
    match *method {
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE => Class::Write,
        _ => Class::Read,
    }
}

/// The host a request is for: the URI's authority (HTTP/2, absolute-form) or `Host`.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
}

/// The answer to a refused request; the connection closes after it.
fn refuse(reject: Reject) -> Response<Body> {
    let mut resp = local(reject.status, reject.code, reject.text);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The refusal for a request body cut by a limit.
fn body_reject(e: &BodyError) -> Reject {
    match e {
        BodyError::TooLarge(_) => strict::too_large(),
        BodyError::Client(_) | BodyError::Hyper(_) | BodyError::Upstream(_) => Reject {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request_body",
            text: "The request body could not be read.\n",
        },
        BodyError::Timeout(_) => Reject {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "body_timeout",
            text: "The request body stopped arriving.\n",
        },
    }
}

/// A locally generated answer.
pub fn local(status: StatusCode, error: &'static str, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::full(text));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, TEXT_PLAIN.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_SERVED_BY.clone(), LAUNCHDAY.clone());
    h.insert(X_LAUNCHDAY_ERROR.clone(), HeaderValue::from_static(error));
    resp
}

/// Fetches snapshot pages through the live config's pool: its admission (so a fetch
/// takes a slot of `max_connections` and may be shed), selection and upstream
/// connections, under the `[limits]` upstream timeouts.
struct SnapshotFetch {
    /// For the limits (a fetch may start before its config's live state is stored).
    live: Arc<ArcSwap<Live>>,
    /// The pools by name, updated before any snapshot of a config starts.
    pools: Arc<Mutex<HashMap<String, Arc<Pool>>>>,
}

impl crate::edge::Fetch for SnapshotFetch {
    fn fetch<'a>(&'a self, spec: &'a SnapshotSpec) -> FetchFuture<'a> {
        Box::pin(async move {
            use http_body_util::BodyExt;
            let live = self.live.load_full();
            let pool = self
                .pools
                .lock()
                .get(&spec.pool)
                .cloned()
                .ok_or(FetchError::Shed("no_backend"))?;
            let lease = pool
                .acquire(Class::Read)
                .await
                .map_err(|shed| FetchError::Shed(shed.reason()))?;
            let backend = lease.backend_arc();
            let host = spec.host.as_deref().unwrap_or(&backend.spec.address_text);
            let req = Request::get(spec.path.as_str())
                .header(header::HOST, host)
                .header(X_LAUNCHDAY_SNAPSHOT.clone(), "1")
                .header(header::ACCEPT_ENCODING, "identity")
                .body(Body::Empty)
                .map_err(|e| FetchError::Upstream(Box::new(e)))?;
            let timeouts = UpstreamTimeouts::from_limits(&live.snapshot.limits);
            let (resp, lease) = match backend.upstream.send(req, timeouts, lease).await {
                Ok(ok) => ok,
                Err((failed, _lease)) => {
                    pool.passive_result(&backend, false);
                    return Err(FetchError::Upstream(Box::new(failed.error)));
                }
            };
            let status = resp.status();
            pool.passive_result(&backend, !status.is_server_error());
            backend.metrics.requests.inc(status);
            let (parts, body) = resp.into_parts();
            let body = Body::upstream(body, lease);
            let limit = crate::edge::MAX_BODY;
            let collected = http_body_util::Limited::new(body, limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        FetchError::TooLarge(limit)
                    } else {
                        FetchError::Upstream(e)
                    }
                })?;
            Ok(FetchedPage {
                status,
                headers: parts.headers,
                body: collected.to_bytes(),
            })
        })
    }
}
