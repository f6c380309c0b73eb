//! One request's way through the handler, in two stages.
//!
//! [`Proxy::begin`] does everything that needs no waiting: the request checks, the
//! answers given before routing (beacon, redirect to https, `421`), routing, and
//! the pool's admission decision ([`crate::pool::Pool::admit`]). An answer decided
//! there ([`Step::Done`]: a refusal, no route, the maintenance page of a pool that
//! sheds at once) is complete; a caller that writes answers itself
//! ([`crate::h1_server`]) then builds no future for the request at all.
//! Everything else is [`Step::Later`], finished by [`Proxy::later`]: an edge
//! snapshot, the queue, a body read ahead while queued, the back end.
//!
//! Invariants: both stages use the live state `begin` loaded (a [`Later`] holds
//! it), so a reload in between never mixes two configs; every answer leaves through
//! [`finish`] (HSTS, the access-log line) exactly once; a [`Later`] dropped before
//! it is finished (the client left) gives back its lease or its place in the queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};

use super::forward::{acquire_watching_body, forward, Call};
use super::{body_reject, class_of, local, refuse, request_host, Live, Proxy, Wire, LAUNCHDAY};
use crate::accesslog::{Entry, Facts};
use crate::body::{Body, BodyError, ClientBody, ReqBody};
use crate::config::Class;
use crate::conn::Verdict;
use crate::headers::{Forwarded, X_LAUNCHDAY_ERROR, X_SERVED_BY};
use crate::maintenance::BEACON_PATH;
use crate::pool::{Admission, Lease, Queued, Shed};
use crate::recycle;
use crate::route::strip_port;
use crate::strict;
use crate::tls::certs;
use crate::tunnel::{self, Upgrade};
use crate::upstream_io::UpstreamTimeouts;

impl Proxy {
    /// Handles one request from a client. `verdict`: what the raw scan of its head
    /// found (HTTP/1; default for HTTP/2). `wire`: who writes the answer.
    ///
    /// [`Proxy::begin`] then, when the answer must wait, [`Proxy::later`]. Not an
    /// `async fn`: the block uses its arguments where it captured them (an `async fn`
    /// keeps a second copy of them in its future, and every client connection keeps
    /// room for this future).
    // The point of this shape is the future's size; clippy's suggestion would undo it.
    #[allow(clippy::manual_async_fn)]
    pub fn handle<'a>(
        &'a self,
        req: Request<ReqBody>,
        fwd: &'a Forwarded,
        verdict: Verdict,
        wire: Wire,
    ) -> impl std::future::Future<Output = Response<Body>> + Send + 'a {
        async move {
            match self.begin(req, fwd, verdict, wire) {
                Step::Done(resp) => resp,
                Step::Later(later) => self.later(later, fwd, wire).await,
            }
        }
    }

    /// The part of a request decided without waiting: checks, local answers,
    /// routing and admission. Most answers launchday gives itself end here (the
    /// maintenance page of a pool that sheds at once among them), so a caller that
    /// writes the answer itself builds no future for them; the rest is
    /// [`Step::Later`], for [`Proxy::later`].
    pub fn begin(
        &self,
        mut req: Request<ReqBody>,
        fwd: &Forwarded,
        verdict: Verdict,
        wire: Wire,
    ) -> Step {
        let live = self.live.load();
        let listener = live
            .snapshot
            .listeners
            .iter()
            .position(|l| *l.name == *fwd.listener);
        // Only with an access log: what the line needs from the request itself, and
        // the clock (a clock read costs ~25 ns on this kind of VM).
        let log = live
            .access_log
            .as_ref()
            .map(|_| (RequestHead::of(&req), Instant::now()));
        let mut facts = Facts::default();
        let checked = strict::check(&req, verdict, &live.snapshot.limits)
            .and_then(|()| tunnel::requested(&mut req, fwd));
        let stage = match checked {
            Ok(upgrade) => match self.at_once(&live, listener, req, fwd) {
                Ok(resp) => Ok(resp),
                Err(req) if live.snapshots.is_some() => Err(Pending::Edge(req, upgrade)),
                Err(req) => self
                    .route(&live, req, upgrade, fwd, wire, &mut facts)
                    .map_err(Pending::Routed),
            },
            Err(reject) => {
                let resp = refuse(reject);
                self.unrouted.inc(resp.status());
                Ok(resp)
            }
        };
        match stage {
            Ok(resp) => Step::Done(finish(&live, listener, log, facts, fwd, resp)),
            Err(pending) => Step::Later(Later {
                live: arc_swap::Guard::into_inner(live),
                listener,
                log,
                facts,
                pending,
            }),
        }
    }

    /// The rest of a request [`Proxy::begin`] could not answer at once.
    pub async fn later(&self, later: Later, fwd: &Forwarded, wire: Wire) -> Response<Body> {
        let Later {
            live,
            listener,
            log,
            mut facts,
            pending,
        } = later;
        let routed = match pending {
            Pending::Routed(routed) => routed,
            Pending::Edge(req, upgrade) => {
                let req = match self.edge(&live, req).await {
                    Ok(hit) => return finish(&live, listener, log, facts, fwd, hit),
                    Err(req) => req,
                };
                match self.route(&live, req, upgrade, fwd, wire, &mut facts) {
                    Ok(resp) => return finish(&live, listener, log, facts, fwd, resp),
                    Err(routed) => routed,
                }
            }
        };
        let resp = self.admitted(&live, routed, fwd, wire, &mut facts).await;
        finish(&live, listener, log, facts, fwd, resp)
    }

    /// The answers given before routing: the beacon, the redirect to https, and
    /// `421` for a host the connection's certificate does not cover.
    // The request is handed back whole, once; a box would cost an allocation.
    #[allow(clippy::result_large_err)]
    fn at_once(
        &self,
        live: &Live,
        listener: Option<usize>,
        mut req: Request<ReqBody>,
        fwd: &Forwarded,
    ) -> Result<Response<Body>, Request<ReqBody>> {
        if req.uri().path() == BEACON_PATH {
            self.metrics.beacon();
            recycle::give(std::mem::take(req.headers_mut()));
            return Ok(beacon());
        }
        let host = request_host(&req);
        match (&fwd.tls, listener.map(|i| &live.snapshot.listeners[i])) {
            (None, Some(l)) if l.redirect_https => {
                let resp = redirect_https(host, req.uri());
                self.unrouted.inc(resp.status());
                return Ok(resp);
            }
            (Some(info), Some(l)) => {
                if let (Some(tls), Some(h)) = (&l.tls, host) {
                    let h = strip_port(h);
                    let for_host = certs::select(&tls.certificates, Some(h), tls.default);
                    let for_sni =
                        certs::select(&tls.certificates, info.sni.as_deref(), tls.default);
                    if for_host != for_sni {
                        let resp = local(
                            StatusCode::MISDIRECTED_REQUEST,
                            "misdirected_request",
                            "This connection was opened for another site; open a new one for this host.\n",
                        );
                        self.unrouted.inc(resp.status());
                        return Ok(resp);
                    }
                }
            }
            _ => {}
        }
        Err(req)
    }

    /// An edge snapshot's answer to `req`, if one is configured for it; else `req`.
    async fn edge(
        &self,
        live: &Live,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Body>, Request<ReqBody>> {
        let Some(edge) = &live.snapshots else {
            return Err(req);
        };
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let served = edge.serve(req.method(), request_host(&req), target, req.headers());
        let Some(hit) = served.await else {
            return Err(req);
        };
        match live.pools.iter().find(|p| *p.name() == *hit.pool) {
            Some(pool) => pool.metrics.local.inc(hit.response.status()),
            None => self.unrouted.inc(hit.response.status()),
        }
        recycle::give(std::mem::take(req.headers_mut()));
        Ok(hit.response)
    }

    /// Routes `req` and asks its pool for admission: the answer when that decides
    /// it at once (no route, a shed), else what waits.
    // The routed request is handed on whole, once; a box would cost an allocation.
    #[allow(clippy::result_large_err)]
    fn route(
        &self,
        live: &Live,
        req: Request<ReqBody>,
        upgrade: Option<Upgrade>,
        fwd: &Forwarded,
        wire: Wire,
        facts: &mut Facts,
    ) -> Result<Response<Body>, Routed> {
        let Some(matched) = live.router.route(request_host(&req), req.uri().path()) else {
            let resp = local(
                StatusCode::NOT_FOUND,
                "no_route",
                "No route for this host and path.\n",
            );
            self.unrouted.inc(resp.status());
            return Ok(resp);
        };
        let class = matched.class.unwrap_or_else(|| class_of(req.method()));
        let pool = &live.pools[matched.pool];
        if live.access_log.is_some() {
            facts.pool = Some(pool.name_arc());
        }
        let pool = matched.pool;
        let (parts, body) = req.into_parts();
        let wait = match body {
            ReqBody::Hyper(incoming) if !http_body::Body::is_end_stream(&incoming) => {
                Wait::Body(incoming)
            }
            _ => match live.pools[pool].admit(class) {
                Admission::Leased(lease) => Wait::Forward(lease),
                Admission::Queued(place) => Wait::Queue(place),
                Admission::Shed(shed) => {
                    // Decided at once: no time to measure (well under the smallest
                    // duration bucket), so no clock read.
                    if live.access_log.is_some() {
                        facts.queue = Some(Duration::ZERO);
                    }
                    facts.shed = Some(shed.reason());
                    let resp = self.shed(live, pool, class, shed, parts, false, fwd, wire);
                    live.pools[pool].metrics.duration.observe(0.0);
                    return Ok(resp);
                }
            },
        };
        Err(Routed {
            parts,
            upgrade,
            pool,
            class,
            start: Instant::now(),
            wait,
        })
    }

    /// The waiting part of a routed request: admission (reading its body ahead, or
    /// in the queue), then the back end.
    async fn admitted(
        &self,
        live: &Live,
        routed: Routed,
        fwd: &Forwarded,
        wire: Wire,
        facts: &mut Facts,
    ) -> Response<Body> {
        let Routed {
            parts,
            upgrade,
            pool,
            class,
            start,
            wait,
        } = routed;
        let (acquired, body) = match wait {
            Wait::Forward(lease) => (Ok(lease), Body::Empty),
            Wait::Queue(place) => (place.wait().await, Body::Empty),
            Wait::Body(incoming) => {
                let limits = &live.snapshot.limits;
                let incoming =
                    ClientBody::new(incoming, limits.body_timeout, limits.max_body_bytes);
                match acquire_watching_body(&live.pools[pool], class, incoming).await {
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
                        live.pools[pool].metrics.local.inc(resp.status());
                        return resp;
                    }
                }
            }
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
                let ended = http_body::Body::is_end_stream(&body);
                self.shed(live, pool, class, shed, parts, !ended, fwd, wire)
            }
        };
        live.pools[pool]
            .metrics
            .duration
            .observe(start.elapsed().as_secs_f64());
        resp
    }

    /// The answer to a shed request: the maintenance page (counted, and its client
    /// counted as a visitor), or for a browser's favicon fetch an empty `503`. A
    /// request whose body was not read to its end closes the connection.
    // The shed request's context; a struct would only rename it.
    #[allow(clippy::too_many_arguments)]
    fn shed(
        &self,
        live: &Live,
        pool: usize,
        class: Class,
        shed: Shed,
        parts: http::request::Parts,
        unread_body: bool,
        fwd: &Forwarded,
        wire: Wire,
    ) -> Response<Body> {
        let pool = &live.pools[pool];
        pool.metrics.shed(shed, class);
        if parts.uri.path() == "/favicon.ico" {
            // The browser's own favicon fetch is not a page view: answer it
            // without the page, so pages and visitors count people.
            let resp = local(StatusCode::SERVICE_UNAVAILABLE, shed.reason(), "");
            pool.metrics.local.inc(resp.status());
            return resp;
        }
        let mut resp = live.page.response(
            class,
            parts.headers.get(header::ACCEPT_ENCODING),
            shed.reason(),
            wire,
        );
        recycle::give(parts.headers);
        if unread_body {
            // The unread body must never be parsed as a next request: close.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        pool.metrics.maintenance_pages.inc();
        pool.metrics.local.inc(resp.status());
        self.metrics.visitor(fwd.peer);
        resp
    }
}

/// The last step of every answer: `Strict-Transport-Security` on a TLS listener that
/// sets it, and the access-log line.
fn finish(
    live: &Live,
    listener: Option<usize>,
    log: Option<(RequestHead, Instant)>,
    facts: Facts,
    fwd: &Forwarded,
    mut resp: Response<Body>,
) -> Response<Body> {
    if fwd.tls.is_some() {
        let spec = listener.map(|i| &live.snapshot.listeners[i]);
        if let Some(hsts) = spec
            .and_then(|l| l.tls.as_ref())
            .and_then(|t| t.hsts.as_ref())
        {
            resp.headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
    }
    if let (Some(access), Some((head, started))) = (&live.access_log, log) {
        access.log(head.entry(&resp, fwd, facts, started.elapsed()));
    }
    resp
}

/// What [`Proxy::begin`] decided.
// Moved once per request; boxing `Later` would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// The answer, decided at once.
    Done(Response<Body>),
    /// The answer waits (an edge snapshot, admission, a back end): [`Proxy::later`].
    Later(Later),
}

/// A request on its way, between [`Proxy::begin`] and [`Proxy::later`]: it holds the
/// live state it began with, so both stages use the same config.
pub struct Later {
    live: Arc<Live>,
    listener: Option<usize>,
    log: Option<(RequestHead, Instant)>,
    facts: Facts,
    pending: Pending,
}

/// A request that waits, and for what.
enum Pending {
    /// An edge snapshot may answer it; else it is routed.
    Edge(Request<ReqBody>, Option<Upgrade>),
    /// Routed to a pool.
    Routed(Routed),
}

/// A request routed to a pool (`pool` indexes [`Live::pools`]). `start`: when it
/// asked for admission (the duration metric and the access log's queue time).
struct Routed {
    parts: http::request::Parts,
    upgrade: Option<Upgrade>,
    pool: usize,
    class: Class,
    start: Instant,
    wait: Wait,
}

/// What a routed request waits for.
enum Wait {
    /// Admission, reading its body ahead meanwhile.
    Body(hyper::body::Incoming),
    /// Its place in the pool's queue.
    Queue(Queued),
    /// Admitted: its back end's answer.
    Forward(Lease),
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

/// The beacon's answer: `204`, not stored.
fn beacon() -> Response<Body> {
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_SERVED_BY.clone(), LAUNCHDAY.clone());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    const CONFIG: &str = r#"
[[listeners]]
name = "public"
bind = ["127.0.0.1:0"]

[[routes]]
path_prefix = "/shop"
pool = "shop"

[[routes]]
path_prefix = "/"
pool = "blog"

[pools.blog]
maintenance = true
backends = []

[pools.shop]
queue_depth = 1
queue_timeout = "10s"
backends = [{ name = "vm", address = "[::1]:9", max_connections = 1 }]
"#;

    fn proxy() -> Arc<Proxy> {
        let snapshot =
            crate::config::load_str(CONFIG, std::path::Path::new("/"), None).expect("config");
        let metrics = Metrics::new(prometheus::Registry::new()).expect("metrics");
        Proxy::new(Arc::new(snapshot), metrics)
    }

    fn fwd() -> Forwarded {
        Forwarded {
            peer: "2001:db8::7".parse().expect("ip"),
            peer_ip: HeaderValue::from_static("2001:db8::7"),
            trusted: false,
            proto: HeaderValue::from_static("http"),
            listener: "public".into(),
            tls: None,
            track: None,
        }
    }

    fn get(path: &str) -> Request<ReqBody> {
        let mut req = Request::new(ReqBody::Empty);
        *req.uri_mut() = path.parse().expect("path");
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("example.org"));
        req
    }

    /// `begin` for hyper's wire, which carries every header in the answer's map.
    fn begin(p: &Proxy, path: &str) -> Step {
        p.begin(get(path), &fwd(), Verdict::default(), Wire::Hyper)
    }

    fn shop(p: &Proxy) -> Arc<crate::pool::Pool> {
        let live = p.live();
        let pool = live.pools.iter().find(|p| p.name() == "shop");
        Arc::clone(pool.expect("shop"))
    }

    #[test]
    fn answers_decided_at_once_need_no_later_stage() {
        let p = proxy();
        let Step::Done(page) = begin(&p, "/post/1") else {
            panic!("a pool in maintenance sheds at once");
        };
        assert_eq!(page.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(page.headers()[X_LAUNCHDAY_ERROR.clone()], "manual");
        assert_eq!(
            page.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(http_body::Body::size_hint(page.body()).exact() > Some(0));
        let Step::Done(beacon) = begin(&p, BEACON_PATH) else {
            panic!("the beacon is answered at once");
        };
        assert_eq!(beacon.status(), StatusCode::NO_CONTENT);
        let text = String::from_utf8(p.metrics().render()).expect("utf-8");
        assert!(
            text.contains("launchday_shed_total{class=\"read\",pool=\"blog\",reason=\"manual\"} 1")
        );
        assert!(text.contains("launchday_maintenance_pages_total{pool=\"blog\"} 1"));
        assert!(text.contains("launchday_request_duration_seconds_count{pool=\"blog\"} 1"));
    }

    #[test]
    fn a_request_that_waits_holds_its_lease_or_its_place_until_dropped() {
        let p = proxy();
        let shop = shop(&p);
        // Admitted at once: the lease is taken in `begin` and held by `Later`.
        let Step::Later(first) = begin(&p, "/shop/cart") else {
            panic!("an admitted request waits for its back end");
        };
        // The back end's one slot is taken: the next request queues...
        let Step::Later(second) = begin(&p, "/shop/item") else {
            panic!("a request that finds the back end full waits in the queue");
        };
        assert_eq!(shop.queue_depth(), 1);
        // ...and with the queue full, the third is shed at once.
        let Step::Done(shed) = begin(&p, "/shop/other") else {
            panic!("an arrival at a full queue is shed at once");
        };
        assert_eq!(shed.headers()[X_LAUNCHDAY_ERROR.clone()], "queue_full");
        // A client gone while queued leaves the queue.
        drop(second);
        assert_eq!(shop.queue_depth(), 0);
        // A client gone before its request was sent gives its slot back.
        drop(first);
        let Step::Later(again) = begin(&p, "/shop/cart") else {
            panic!("the freed slot admits the next request");
        };
        let Step::Later(queued) = begin(&p, "/shop/item") else {
            panic!("the slot is taken again");
        };
        assert_eq!(shop.queue_depth(), 1);
        drop((again, queued));
    }
}
