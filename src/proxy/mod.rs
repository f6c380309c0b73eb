//! The request handler: route → acquire → forward, or answer locally.
//!
//! A request loads the live state ([`Live`]: the snapshot and the objects built from
//! it) once and uses it to the end, so a reload in the middle never mixes two configs.
//! Every answer is counted once in `launchday_requests_total`, with `backend="-"` when
//! launchday answered itself; locally generated answers carry `X-Served-By: launchday`
//! and an `X-Launchday-Error` saying why. An upgrade request whose back end answers
//! `101` becomes a tunnel ([`crate::tunnel`]); its `101` is counted as a `1xx`.
//!
//! [`Proxy::maintenance_now`] is the own HTTP/1.1 loop's synchronous shortcut for a
//! pool in manual maintenance: the same answer, counts and duration as
//! [`Proxy::handle`], without building the handler's future; it declines (and
//! `handle` does everything) whenever `handle` has more to do than that. Forwarding
//! itself lives in `forward.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

mod forward;

pub use forward::PREFETCH_LIMIT;
use forward::{acquire_watching_body, forward, Call};

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use parking_lot::Mutex;

use crate::accesslog::{AccessLog, Entry, Facts};
use crate::body::{Body, BodyError, ClientBody, ReqBody};
use crate::config::{AccessLogSpec, Class, ListenerSpec, Snapshot};
use crate::conn::Verdict;
use crate::edge::{
    FetchError, FetchFuture, FetchedPage, SnapshotSpec, Snapshots, X_LAUNCHDAY_SNAPSHOT,
};
use crate::headers::{Forwarded, X_LAUNCHDAY_ERROR, X_SERVED_BY};
use crate::maintenance::{MaintenancePage, BEACON_PATH};
use crate::metrics::{CodeCounters, Metrics};
use crate::pool::Pool;
use crate::recycle;
use crate::route::{strip_port, Router};
use crate::strict::{self, Reject};
use crate::tls::certs;
use crate::tunnel::{self, Upgrade};
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

    /// Handles one request from a client. `verdict`: what the raw scan of its head
    /// found (HTTP/1; default for HTTP/2). `wire`: who writes the answer.
    ///
    /// Not an `async fn`: the block uses its arguments where it captured them (an
    /// `async fn` keeps a second copy of them in its future, and every client
    /// connection keeps room for this future).
    // The point of this shape is the future's size; clippy's suggestion would undo it.
    #[allow(clippy::manual_async_fn)]
    pub fn handle<'a>(
        &'a self,
        mut req: Request<ReqBody>,
        fwd: &'a Forwarded,
        verdict: Verdict,
        wire: Wire,
    ) -> impl std::future::Future<Output = Response<Body>> + Send + 'a {
        async move {
            let live = self.live.load_full();
            let listener = live
                .snapshot
                .listeners
                .iter()
                .find(|l| *l.name == *fwd.listener);
            // Only with an access log: what the line needs from the request itself, and
            // the clock (a clock read costs ~25 ns on this kind of VM).
            let head = live
                .access_log
                .as_ref()
                .map(|_| (RequestHead::of(&req), Instant::now()));
            let mut facts = Facts::default();
            let checked = strict::check(&req, verdict, &live.snapshot.limits)
                .and_then(|()| tunnel::requested(&mut req, fwd));
            let mut resp = match checked {
                Ok(upgrade) => {
                    self.respond(&live, listener, req, fwd, upgrade, wire, &mut facts)
                        .await
                }
                Err(reject) => self.unrouted_answer(refuse(reject)),
            };
            if fwd.tls.is_some() {
                if let Some(hsts) = listener
                    .and_then(|l| l.tls.as_ref())
                    .and_then(|t| t.hsts.as_ref())
                {
                    resp.headers_mut()
                        .insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
                }
            }
            if let (Some(log), Some((head, started))) = (&live.access_log, head) {
                log.log(head.entry(&resp, fwd, facts, started.elapsed()));
            }
            resp
        }
    }

    // The request's context, all borrowed from `handle`; a struct would only rename it.
    // Not an `async fn`, for the future's size (as `handle`): this future is moved
    // whole into `handle`'s when it is awaited.
    #[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
    fn respond<'a>(
        &'a self,
        live: &'a Live,
        listener: Option<&'a ListenerSpec>,
        mut req: Request<ReqBody>,
        fwd: &'a Forwarded,
        upgrade: Option<Upgrade>,
        wire: Wire,
        facts: &'a mut Facts,
    ) -> impl std::future::Future<Output = Response<Body>> + Send + 'a {
        async move {
            if req.uri().path() == BEACON_PATH {
                self.metrics.beacon();
                recycle::give(std::mem::take(req.headers_mut()));
                return beacon();
            }
            let host = request_host(&req);
            match (&fwd.tls, listener) {
                (None, Some(l)) if l.redirect_https => {
                    return self.unrouted_answer(redirect_https(host, req.uri()));
                }
                (Some(info), Some(l)) => {
                    if let (Some(tls), Some(h)) = (&l.tls, host) {
                        let h = strip_port(h);
                        let for_host = certs::select(&tls.certificates, Some(h), tls.default);
                        let for_sni =
                            certs::select(&tls.certificates, info.sni.as_deref(), tls.default);
                        if for_host != for_sni {
                            return self.unrouted_answer(local(
                                StatusCode::MISDIRECTED_REQUEST,
                                "misdirected_request",
                                "This connection was opened for another site; open a new one for this host.\n",
                            ));
                        }
                    }
                }
                _ => {}
            }
            if let Some(edge) = &live.snapshots {
                let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
                if let Some(hit) = edge.serve(req.method(), host, target, req.headers()).await {
                    match live.pools.iter().find(|p| *p.name() == *hit.pool) {
                        Some(pool) => pool.metrics.local.inc(hit.response.status()),
                        None => self.unrouted.inc(hit.response.status()),
                    }
                    recycle::give(std::mem::take(req.headers_mut()));
                    return hit.response;
                }
            }
            let Some(matched) = live.router.route(host, req.uri().path()) else {
                return self.unrouted_answer(local(
                    StatusCode::NOT_FOUND,
                    "no_route",
                    "No route for this host and path.\n",
                ));
            };
            let class = matched.class.unwrap_or_else(|| class_of(req.method()));
            let pool = &live.pools[matched.pool];
            if live.access_log.is_some() {
                facts.pool = Some(pool.name_arc());
            }
            let start = Instant::now();
            let (parts, incoming) = req.into_parts();
            let incoming = match incoming {
                ReqBody::Hyper(incoming) if !http_body::Body::is_end_stream(&incoming) => {
                    Some(incoming)
                }
                _ => None,
            };
            let (acquired, body) = if let Some(incoming) = incoming {
                let limits = &live.snapshot.limits;
                let incoming =
                    ClientBody::new(incoming, limits.body_timeout, limits.max_body_bytes);
                match acquire_watching_body(pool, class, incoming).await {
                    Ok(done) => done,
                    Err(e) => {
                        let resp = match BodyError::find(&e) {
                            Some(b) => refuse(body_reject(b)),
                            // The client went away while queued: it left the queue;
                            // nobody is there to read an answer.
                            None => {
                                local(StatusCode::BAD_REQUEST, "client_closed", "Client closed.\n")
                            }
                        };
                        pool.metrics.local.inc(resp.status());
                        return resp;
                    }
                }
            } else {
                (pool.acquire(class).await, Body::Empty)
            };
            if live.access_log.is_some() {
                facts.queue = Some(start.elapsed());
            }
            let resp = match acquired {
                Ok(lease) => {
                    let timeouts = UpstreamTimeouts::from_limits(&live.snapshot.limits);
                    let call = Call {
                        fwd,
                        class,
                        timeouts,
                        upgrade,
                    };
                    forward(parts, body, lease, call, facts).await
                }
                Err(shed) => {
                    facts.shed = Some(shed.reason());
                    let unread = !http_body::Body::is_end_stream(&body);
                    let Some(resp) = self.shed_answer(
                        live,
                        pool,
                        class,
                        shed,
                        &parts.uri,
                        parts.headers,
                        unread,
                        wire,
                        fwd,
                    ) else {
                        return favicon(pool, shed);
                    };
                    resp
                }
            };
            pool.metrics.duration.observe(start.elapsed().as_secs_f64());
            resp
        }
    }
}

impl Proxy {
    /// An answer made before any pool was chosen, counted as unrouted by its status.
    fn unrouted_answer(&self, resp: Response<Body>) -> Response<Body> {
        self.unrouted.inc(resp.status());
        resp
    }

    /// The maintenance page of a shed request (counted, its client counted as a
    /// visitor); `None` for a browser's favicon fetch ([`favicon`]). A request whose
    /// body was not read to its end closes the connection.
    // The shed request's context, borrowed from the caller; a struct would only rename it.
    #[allow(clippy::too_many_arguments)]
    fn shed_answer(
        &self,
        live: &Live,
        pool: &Pool,
        class: Class,
        shed: crate::pool::Shed,
        uri: &Uri,
        headers: http::HeaderMap,
        unread_body: bool,
        wire: Wire,
        fwd: &Forwarded,
    ) -> Option<Response<Body>> {
        pool.metrics.shed(shed, class);
        if uri.path() == "/favicon.ico" {
            recycle::give(headers);
            return None;
        }
        let mut resp = live.page.response(
            class,
            headers.get(header::ACCEPT_ENCODING),
            shed.reason(),
            wire,
        );
        recycle::give(headers);
        if unread_body {
            // The unread body must never be parsed as a next request: close.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        pool.metrics.maintenance_pages.inc();
        pool.metrics.local.inc(resp.status());
        self.metrics.visitor(fwd.peer);
        Some(resp)
    }

    /// The own HTTP/1.1 loop's shortcut for launch day's most common answer: when
    /// `req` (a simple request without a body) goes to a pool in manual maintenance,
    /// its maintenance page, given synchronously so that the loop builds no handler
    /// future for it — the same answer, counts and duration as [`Proxy::handle`]
    /// gives. `None` sends the request to [`Proxy::handle`], which does all the
    /// rest: a request the checks refuse, the beacon, a listener that redirects to
    /// https, a config with edge snapshots or an access log (their work is done
    /// there), and every pool not in manual maintenance (other sheds are decided
    /// under the pool's lock, with the queue).
    pub fn maintenance_now(
        &self,
        req: &mut Request<ReqBody>,
        fwd: &Forwarded,
        verdict: Verdict,
    ) -> Option<Response<Body>> {
        let live = self.live.load();
        if live.access_log.is_some()
            || live.snapshots.is_some()
            || fwd.tls.is_some()
            || !matches!(req.body(), ReqBody::Empty)
            || req.uri().path() == BEACON_PATH
            || req.headers().contains_key(header::UPGRADE)
        {
            return None;
        }
        strict::check(req, verdict, &live.snapshot.limits).ok()?;
        let listener = live
            .snapshot
            .listeners
            .iter()
            .find(|l| *l.name == *fwd.listener);
        if listener.is_some_and(|l| l.redirect_https) {
            return None;
        }
        let matched = live.router.route(request_host(req), req.uri().path())?;
        let pool = &live.pools[matched.pool];
        if !pool.in_maintenance() {
            return None;
        }
        let class = matched.class.unwrap_or_else(|| class_of(req.method()));
        let start = Instant::now();
        let headers = std::mem::take(req.headers_mut());
        let shed = crate::pool::Shed::Manual;
        let Some(resp) = self.shed_answer(
            &live,
            pool,
            class,
            shed,
            req.uri(),
            headers,
            false,
            Wire::Own,
            fwd,
        ) else {
            return Some(favicon(pool, shed));
        };
        pool.metrics.duration.observe(start.elapsed().as_secs_f64());
        Some(resp)
    }
}

/// The answer to a browser's favicon fetch from a shed pool: not a page view, so
/// it gets no page and is not counted as one (pages and visitors count people).
fn favicon(pool: &Pool, shed: crate::pool::Shed) -> Response<Body> {
    let resp = local(StatusCode::SERVICE_UNAVAILABLE, shed.reason(), "");
    pool.metrics.local.inc(resp.status());
    resp
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

/// What an access-log line needs from the request, taken before it is consumed
/// (reference-counted clones: nothing is copied or formatted on the request path).
struct RequestHead {
    method: Method,
    target: Uri,
    version: &'static str,
    host: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
}

impl RequestHead {
    fn of<B>(req: &Request<B>) -> Self {
        let h = req.headers();
        RequestHead {
            method: req.method().clone(),
            target: req.uri().clone(),
            version: match req.version() {
                http::Version::HTTP_2 => "HTTP/2.0",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            host: h.get(header::HOST).cloned(),
            referer: h.get(header::REFERER).cloned(),
            user_agent: h.get(header::USER_AGENT).cloned(),
        }
    }

    fn entry(
        self,
        resp: &Response<Body>,
        fwd: &Forwarded,
        facts: Facts,
        took: std::time::Duration,
    ) -> Entry {
        Entry {
            time: crate::accesslog::now(),
            client: fwd.peer,
            method: self.method,
            target: self.target,
            version: self.version,
            host: self.host,
            status: resp.status().as_u16(),
            bytes: http_body::Body::size_hint(resp.body()).exact(),
            referer: self.referer,
            user_agent: self.user_agent,
            listener: Arc::clone(&fwd.listener),
            pool: facts.pool,
            backend: facts.backend,
            upstream_seconds: facts.upstream.map(|d| d.as_secs_f64()),
            queue_seconds: facts.queue.map(|d| d.as_secs_f64()),
            shed: facts.shed,
            duration_seconds: took.as_secs_f64(),
        }
    }
}

/// `308` to the same host, path and query over https (no host: `400`).
fn redirect_https(host: Option<&str>, uri: &Uri) -> Response<Body> {
    let Some(host) = host.map(strip_port).filter(|h| !h.is_empty()) else {
        return local(
            StatusCode::BAD_REQUEST,
            "missing_host",
            "A Host header is needed to redirect to https.\n",
        );
    };
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    match HeaderValue::from_str(&format!("https://{host}{pq}")) {
        Ok(location) => {
            let mut resp = local(
                StatusCode::PERMANENT_REDIRECT,
                "redirect_https",
                "Moved to https.\n",
            );
            resp.headers_mut().remove(X_LAUNCHDAY_ERROR.clone());
            resp.headers_mut().insert(header::LOCATION, location);
            resp
        }
        Err(_) => local(
            StatusCode::BAD_REQUEST,
            "bad_host",
            "Invalid Host header.\n",
        ),
    }
}

/// `write` for methods that carry a user's submission, `read` for the rest.
pub fn class_of(method: &Method) -> Class {
    match *method {
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE => Class::Write,
        _ => Class::Read,
    }
}

fn beacon() -> Response<Body> {
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_SERVED_BY.clone(), LAUNCHDAY.clone());
    resp
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

#[cfg(test)]
mod tests;
