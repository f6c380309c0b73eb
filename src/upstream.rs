//! Keep-alive HTTP/1.1 connection pools to back ends, and sending a request on one.
//!
//! One [`Upstream`] per back-end address holds a LIFO stack of idle connections
//! (plain streams, [`RawConn`]). A request takes the most recently used idle
//! connection that is still open, or dials a new one, and then goes one of two ways:
//! - **Fast path** ([`crate::upstream_h1`]): a request without a body and without
//!   `Upgrade` (nearly every GET) is written and its answer read by launchday itself,
//!   in the client request's own task. The answer's body returns the connection.
//! - **hyper's client**: a request with a body, or an upgrade request, gets the
//!   connection adopted by a hyper client connection for that one exchange (its
//!   driver runs as a task). When the exchange ended cleanly the driver gives the
//!   stream back (`without_shutdown`), and it is idle again for either path.
//!
//! Invariants:
//! - A connection goes back to the idle stack only after its response body was read
//!   to the end with nothing left over, and only when the answer allowed keep-alive
//!   (no `Connection: close`, HTTP/1.1 or an HTTP/1.0 `keep-alive`). Through hyper:
//!   [`Checkin::reuse`], called by the response body, marks the exchange clean; a
//!   response cut short leaves the connection to be closed.
//! - A connection that carried an upgrade request never goes back: its driver runs
//!   `with_upgrades`, so that a `101` hands the stream to the response's upgrade
//!   ([`Checkin::switched`]). If the back end ignored the `Upgrade` and answered
//!   otherwise, the answer is passed on as HTTP and the connection is closed after
//!   it (upgrade requests are rare; a stream that was ready to switch is not trusted
//!   for reuse).
//! - A request is retried on another connection when it did not leave (hyper hands
//!   it back unsent; the fast path's write failed). When a reused keep-alive
//!   connection dies after the request went out but before any response byte (the
//!   back end's keep-alive timeout raced us), only a GET, HEAD or OPTIONS without a
//!   body is sent again, once, on a fresh connection; any other request fails with
//!   502 and is never sent twice (like nginx's `proxy_next_upstream error` on
//!   idempotent requests).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::TrySendError;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::body::Body;
use crate::upstream_h1::{ExchangeError, RawBody, RawConn};
use crate::upstream_io::{Activity, UpstreamTimeouts};

/// A hyper client connection adopted for one exchange: its request handle, its
/// pause-limit state, and the flag its driver task reads to know whether the stream
/// may go back to the idle stack.
type Conn = (SendRequest<Body>, Arc<Activity>, Arc<AtomicBool>);

/// Idle connections kept per back end; more are closed when they come back.
pub const MAX_IDLE_PER_BACKEND: usize = 4096;

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing was sent: the back end could not be reached.
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    /// The HTTP/1 handshake on a fresh connection failed; nothing was sent.
    #[error("handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// The request was (maybe partly) sent, and no response head came back.
    #[error("request to {addr} failed after sending: {source}")]
    AfterSend {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// The same on the fast path ([`crate::upstream_h1`]).
    #[error("request to {addr} failed: {source}")]
    Exchange {
        addr: SocketAddr,
        source: ExchangeError,
    },
}

impl UpstreamError {
    /// The `X-Launchday-Error` value for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Handshake { .. } => "upstream_connect_failed",
            UpstreamError::Exchange {
                source: ExchangeError::UnaskedSwitch,
                ..
            } => "upstream_unasked_switch",
            UpstreamError::AfterSend { .. } | UpstreamError::Exchange { .. } => {
                "upstream_failed_after_send"
            }
        }
    }
}

/// A copy of `req` if it may be sent twice: GET, HEAD or OPTIONS without a body.
fn replayable(req: &Request<Body>) -> Option<Request<Body>> {
    let safe = matches!(
        *req.method(),
        hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
    );
    if !safe || !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = Request::new(Body::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// A request that could not be forwarded.
#[derive(Debug)]
pub struct Failed {
    pub error: UpstreamError,
    /// The request to try on another back end, when that is safe: it was never sent
    /// (connect failure), or it is idempotent without a body (a copy).
    pub retry: Option<Request<Body>>,
}

/// The connection pool of one back-end address.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    /// Idle kept-alive connections, most recently used last. Both paths take from it;
    /// hyper's client adopts one for a single exchange and gives the stream back.
    raw: Mutex<Vec<RawConn>>,
}

/// What [`Upstream::send`] resolves to: the answer and `hold`, or why not and `hold`.
pub type Sent<H> = Result<(Response<UpBody>, H), (Failed, H)>;

pin_project_lite::pin_project! {
    /// The future of [`Upstream::send`]: the fast path's inline, hyper's client's boxed.
    #[project = SendPathProj]
    enum SendPath<F, G> {
        Raw { #[pin] fut: F },
        Hyper { fut: Pin<Box<G>> },
    }
}

impl<F: Future, G: Future<Output = F::Output>> Future for SendPath<F, G> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        match self.project() {
            SendPathProj::Raw { fut } => fut.poll(cx),
            SendPathProj::Hyper { fut } => fut.as_mut().poll(cx),
        }
    }
}

/// A back end's answer body: from hyper's client, with the connection to check in
/// when it ends, or from the fast path (which checks its connection in itself).
#[derive(Debug)]
pub enum UpBody {
    Hyper(Incoming, Checkin),
    Raw(RawBody),
}

/// A connection lent to one request; see [`Checkin::reuse`].
#[derive(Debug)]
pub struct Checkin {
    /// Always `Some` until taken by `reuse`.
    sender: Option<Conn>,
    /// The answer allows keep-alive (no `Connection: close`, HTTP/1.1).
    keep_alive: bool,
}

impl Checkin {
    /// The connection answered `101` and now carries a tunnel: its pause limits stop
    /// (the tunnel has its own inactivity limit), and it is never reused. Dropping
    /// the `Checkin` afterwards drops only the request handle; the stream lives on in
    /// the response's upgrade.
    pub fn switched(&self) {
        if let Some((_, activity, _)) = &self.sender {
            activity.end();
        }
    }

    /// The response was read to the end: the connection's driver hands the stream
    /// back to the idle stack (when the answer allowed keep-alive) once the request
    /// handle is dropped here.
    pub fn reuse(self) {
        let Some((sender, activity, clean)) = self.sender else {
            return;
        };
        activity.end();
        clean.store(self.keep_alive, Ordering::Release);
        drop(sender);
    }
}

impl Upstream {
    /// An empty pool for `addr`.
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Upstream {
            addr,
            raw: Mutex::new(Vec::new()),
        })
    }

    /// The back end's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Idle connections right now (for tests and the status page).
    pub fn idle_count(&self) -> usize {
        self.raw.lock().len()
    }

    /// Returns a fast-path connection whose answer ended cleanly to the idle stack.
    pub fn put_raw(&self, conn: RawConn) {
        let mut raw = self.raw.lock();
        if raw.len() < MAX_IDLE_PER_BACKEND {
            raw.push(conn);
        }
    }

    /// Sends `req` (origin-form URI, headers already rewritten) under `timeouts` and
    /// returns the response head with the connection to check in when its body is done.
    ///
    /// `hold` (the back end's capacity lease) comes back with the answer or the
    /// failure. If the caller gives up while the request is out (the client reset its
    /// HTTP/2 stream or went away), the back end is still working on it: `hold` is kept
    /// until the connection has finished that exchange (hyper drains the unread
    /// answer, within the pause limits), and the connection then goes back to the pool.
    /// So cancelled requests keep counting against `max_connections` while the back end
    /// works on them, and never make it open more connections than requests it serves.
    ///
    /// A request without a body and without `Upgrade` takes the fast path
    /// ([`crate::upstream_h1`]); others go through hyper's client.
    ///
    /// Not an `async fn`: the returned future is the chosen path's own (an `async fn`
    /// wrapper would hold a second copy of the request in every client connection's
    /// request future).
    pub fn send<H: Send + 'static>(
        self: &Arc<Self>,
        req: Request<Body>,
        timeouts: UpstreamTimeouts,
        hold: H,
    ) -> impl Future<Output = Sent<H>> + Send + '_ {
        let h = req.headers();
        if matches!(req.body(), Body::Empty)
            && !h.contains_key(hyper::header::UPGRADE)
            && !h.contains_key(hyper::header::TRANSFER_ENCODING)
        {
            return SendPath::Raw {
                fut: self.send_raw(req, timeouts, hold),
            };
        }
        // Boxed: hyper's client path is rare (bodies, upgrades), and its future is
        // ~4 KB that would otherwise sit in every connection's request future.
        SendPath::Hyper {
            fut: Box::pin(self.send_through_hyper(req, timeouts, hold)),
        }
    }

    async fn send_through_hyper<H: Send + 'static>(
        self: &Arc<Self>,
        req: Request<Body>,
        timeouts: UpstreamTimeouts,
        hold: H,
    ) -> Sent<H> {
        match self.send_hyper(req, timeouts, hold).await {
            Ok((resp, checkin, hold)) => Ok((resp.map(|b| UpBody::Hyper(b, checkin)), hold)),
            Err(e) => Err(e),
        }
    }

    async fn send_hyper<H: Send + 'static>(
        self: &Arc<Self>,
        req: Request<Body>,
        timeouts: UpstreamTimeouts,
        hold: H,
    ) -> Result<(Response<Incoming>, Checkin, H), (Failed, H)> {
        let mut guard = Exchange {
            conn: None,
            sending: None,
            hold: Some(hold),
        };
        let result = self.send_guarded(req, timeouts, &mut guard).await;
        guard.conn = None;
        // Invariant: `hold` is only taken by `Exchange::drop`, which cannot have run.
        let Some(hold) = guard.hold.take() else {
            unreachable!("the exchange guard is still alive")
        };
        match result {
            Ok((resp, checkin)) => Ok((resp, checkin, hold)),
            Err(failed) => Err((failed, hold)),
        }
    }

    async fn send_guarded<H: Send + 'static>(
        self: &Arc<Self>,
        mut req: Request<Body>,
        timeouts: UpstreamTimeouts,
        guard: &mut Exchange<H>,
    ) -> Result<(Response<Incoming>, Checkin), Failed> {
        // A copy to resend if a connection dies before answering: only for requests
        // that are safe to send twice (idempotent, no body).
        let template = replayable(&req);
        let upgrade = req.headers().contains_key(hyper::header::UPGRADE);
        // Reuse idle connections, most recent first. One the back end closed under us
        // hands the request back unsent, and we go on.
        while let Some(raw) = self.pop_raw() {
            let Ok((mut sender, activity, clean)) = self.adopt(raw, upgrade).await else {
                continue;
            };
            if sender.ready().await.is_err() {
                continue;
            }
            activity.begin(timeouts);
            let sent = guard.send((sender, activity, clean), req).await;
            let Some(conn) = guard.conn.take() else {
                unreachable!("only Exchange::drop takes the connection")
            };
            match sent {
                Ok(resp) => {
                    let checkin = checkin(conn, &resp);
                    return Ok((resp, checkin));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => {
                        let source = e.into_error();
                        // The back end closed a kept-alive connection as we reused it
                        // (its keep-alive timeout): no response byte came back. Safe
                        // requests go once more, on a fresh connection; others fail.
                        match template.as_ref().and_then(replayable) {
                            Some(copy) if source.is_incomplete_message() => {
                                tracing::debug!(addr = %self.addr, "stale keep-alive connection; resending on a fresh one");
                                req = copy;
                                break;
                            }
                            _ => {
                                return Err(Failed {
                                    error: UpstreamError::AfterSend {
                                        addr: self.addr,
                                        source,
                                    },
                                    retry: template,
                                })
                            }
                        }
                    }
                },
            }
        }
        let raw = match self.connect_raw(timeouts.connect).await {
            Ok(raw) => raw,
            // Nothing was sent: the request itself may go elsewhere.
            Err(error) => {
                return Err(Failed {
                    error,
                    retry: Some(req),
                })
            }
        };
        let conn = match self.adopt(raw, upgrade).await {
            Ok(conn) => conn,
            Err(source) => {
                return Err(Failed {
                    error: UpstreamError::Handshake {
                        addr: self.addr,
                        source,
                    },
                    retry: Some(req),
                })
            }
        };
        conn.1.begin(timeouts);
        let sent = guard.send(conn, req).await;
        let Some(conn) = guard.conn.take() else {
            unreachable!("only Exchange::drop takes the connection")
        };
        match sent {
            Ok(resp) => {
                let checkin = checkin(conn, &resp);
                Ok((resp, checkin))
            }
            Err(mut e) => {
                let unsent = e.take_message();
                Err(Failed {
                    error: UpstreamError::AfterSend {
                        addr: self.addr,
                        source: e.into_error(),
                    },
                    retry: unsent.or(template),
                })
            }
        }
    }

    /// Drives an idle connection with hyper's client for one exchange. The driver task
    /// gives the stream back to the idle stack when the exchange ended cleanly (the
    /// `Checkin` was reused) with nothing left unread; after an upgrade request the
    /// stream is never given back (a `101` hands it to the tunnel).
    async fn adopt(self: &Arc<Self>, raw: RawConn, upgrade: bool) -> Result<Conn, hyper::Error> {
        let (io, activity) = raw.into_io();
        let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        let clean = Arc::new(AtomicBool::new(false));
        let addr = self.addr;
        if upgrade {
            tokio::spawn(crate::sched::tracked(async move {
                // With upgrades: after a `101` the stream goes to the response's upgrade.
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%addr, error = %e, "upstream connection ended");
                }
            }));
        } else {
            let home = Arc::clone(self);
            let done = Arc::clone(&clean);
            let act = Arc::clone(&activity);
            tokio::spawn(crate::sched::tracked(async move {
                match conn.without_shutdown().await {
                    Ok(parts) if done.load(Ordering::Acquire) && parts.read_buf.is_empty() => {
                        home.put_raw(RawConn::from_io(parts.io.into_inner(), act));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(%addr, error = %e, "upstream connection ended"),
                }
            }));
        }
        Ok((sender, activity, clean))
    }
}

/// The `Checkin` for `conn` after `resp`'s head: keep-alive unless the back end said
/// `Connection: close` or answered HTTP/1.0.
fn checkin(conn: Conn, resp: &Response<Incoming>) -> Checkin {
    let close = resp
        .headers()
        .get_all(hyper::header::CONNECTION)
        .iter()
        .any(|v| crate::upstream_h1::has_token(v, b"close"));
    Checkin {
        sender: Some(conn),
        keep_alive: !close && resp.version() == hyper::Version::HTTP_11,
    }
}

/// The answer to a request out on a connection, boxed so that it can outlive a caller
/// who gives up (one allocation per request through hyper's client).
type Sending =
    Pin<Box<dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<Body>>>> + Send>>;

/// What a request out on a connection needs until its exchange really ends; see
/// [`Upstream::send`]. Dropped with `conn` set only when the caller gave up mid-send.
struct Exchange<H: Send + 'static> {
    conn: Option<Conn>,
    sending: Option<Sending>,
    hold: Option<H>,
}

impl<H: Send + 'static> Exchange<H> {
    /// Sends `req` on `conn`, keeping the connection and the pending answer here
    /// until the answer's head arrives.
    async fn send(
        &mut self,
        conn: Conn,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Body>>> {
        let (mut sender, activity, clean) = conn;
        self.sending = Some(Box::pin(sender.try_send_request(req)));
        self.conn = Some((sender, activity, clean));
        let sent = std::future::poll_fn(|cx| match &mut self.sending {
            Some(f) => f.as_mut().poll(cx),
            // Invariant: set just above and only taken below or by `drop`.
            None => unreachable!("the pending answer is here until it resolves"),
        })
        .await;
        self.sending = None;
        sent
    }
}

impl<H: Send + 'static> Drop for Exchange<H> {
    fn drop(&mut self) {
        let (Some(conn), Some(sending), Some(hold)) =
            (self.conn.take(), self.sending.take(), self.hold.take())
        else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // The back end is still working: wait for its answer and read it to the
            // end (the pause limits bound both), then free its slot and let the
            // connection go back if it is sound.
            if let Ok(resp) = sending.await {
                use http_body_util::BodyExt;
                // A `101` switched the connection to the dropped upgrade: never reused.
                let switched = resp.status() == hyper::StatusCode::SWITCHING_PROTOCOLS;
                let checkin = checkin(conn, &resp);
                let mut body = resp.into_body();
                let complete = !switched
                    && loop {
                        match body.frame().await {
                            Some(Ok(_)) => {}
                            Some(Err(_)) => break false,
                            None => break true,
                        }
                    };
                if complete {
                    checkin.reuse();
                }
            }
            drop(hold);
        });
    }
}

/// A fast-path exchange in flight; see [`Upstream::send`] for why the answer is
/// awaited even when the caller gives up.
struct RawGuard<'a, H: Send + 'static> {
    upstream: &'a Arc<Upstream>,
    conn: Option<RawConn>,
    hold: Option<H>,
    /// The request head fully left.
    sent: bool,
    head_request: bool,
}

impl<H: Send + 'static> RawGuard<'_, H> {
    fn take_hold(&mut self) -> H {
        // Invariant: `hold` is only taken once, by the one return of `send_raw` or by
        // `drop`, which cannot both run.
        match self.hold.take() {
            Some(h) => h,
            None => unreachable!("the exchange guard still holds the lease"),
        }
    }

    async fn exchange(&mut self) -> Result<crate::upstream_h1::Head, ExchangeError> {
        let RawGuard {
            conn,
            sent,
            head_request,
            ..
        } = self;
        let Some(conn) = conn.as_mut() else {
            unreachable!("the connection is set before each exchange")
        };
        *sent = false;
        conn.write_head().await?;
        *sent = true;
        conn.read_head(*head_request).await
    }
}

impl<H: Send + 'static> Drop for RawGuard<'_, H> {
    fn drop(&mut self) {
        let (Some(mut conn), Some(hold)) = (self.conn.take(), self.hold.take()) else {
            return;
        };
        // The caller gave up with the request out: the back end is working on it.
        // Read its answer to the end (the pause limits bound both), then free the slot.
        if !self.sent {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let home = Arc::clone(self.upstream);
        let head_request = self.head_request;
        runtime.spawn(async move {
            if let Ok(head) = conn.read_head(head_request).await {
                use http_body_util::BodyExt;
                let mut body = head.into_response(conn, home).into_body();
                while let Some(Ok(_)) = body.frame().await {}
            }
            drop(hold);
        });
    }
}

impl Upstream {
    /// The fast path of [`Upstream::send`]: same contract. Not an `async fn`, for
    /// the future's size: the block uses its arguments where it captured them (an
    /// `async fn` keeps a second copy of the request in its future), and this future
    /// is moved whole into the caller's when it is awaited.
    #[allow(clippy::manual_async_fn)]
    fn send_raw<'a, H: Send + 'static>(
        self: &'a Arc<Self>,
        mut req: Request<Body>,
        timeouts: UpstreamTimeouts,
        hold: H,
    ) -> impl Future<Output = Result<(Response<UpBody>, H), (Failed, H)>> + Send + 'a {
        async move {
            let replayable = matches!(
                *req.method(),
                hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
            );
            let mut guard = RawGuard {
                upstream: self,
                conn: None,
                hold: Some(hold),
                sent: false,
                head_request: req.method() == hyper::Method::HEAD,
            };
            let mut fresh_only = false;
            loop {
                let idle = if fresh_only { None } else { self.pop_raw() };
                let reused = idle.is_some();
                let mut conn = match idle {
                    Some(c) => c,
                    // Boxed: dialing is rare next to reuse (see `send`).
                    None => match Box::pin(self.connect_raw(timeouts.connect)).await {
                        Ok(c) => c,
                        // Nothing was sent: the request itself may go elsewhere.
                        Err(error) => {
                            let hold = guard.take_hold();
                            return Err((
                                Failed {
                                    error,
                                    retry: Some(req),
                                },
                                hold,
                            ));
                        }
                    },
                };
                conn.activity().begin(timeouts);
                conn.encode(&req);
                guard.conn = Some(conn);
                let result = guard.exchange().await;
                let conn = guard.conn.take();
                match result {
                    Ok(head) => {
                        let Some(conn) = conn else {
                            unreachable!("only the guard's drop takes the connection")
                        };
                        let resp = head.into_response(conn, Arc::clone(self));
                        let hold = guard.take_hold();
                        // The request left whole: its header map serves a next one.
                        crate::recycle::give(std::mem::take(req.headers_mut()));
                        return Ok((resp.map(UpBody::Raw), hold));
                    }
                    Err(source) => {
                        drop(conn);
                        let unsent = !guard.sent;
                        // A kept-alive connection the back end closed as we reused it (its
                        // keep-alive timeout): once more on a fresh connection, if the
                        // request did not leave or is safe to send twice.
                        let stale = reused
                            && (unsent || matches!(source, ExchangeError::ClosedBeforeAnswer));
                        if stale && (unsent || replayable) && !fresh_only {
                            tracing::debug!(addr = %self.addr, "stale keep-alive connection; resending on a fresh one");
                            fresh_only = true;
                            continue;
                        }
                        let hold = guard.take_hold();
                        // A `101` nobody asked for is the back end's fault, not the
                        // connection's: not sent elsewhere.
                        let switched = matches!(source, ExchangeError::UnaskedSwitch);
                        let retry = ((unsent || replayable) && !switched).then_some(req);
                        return Err((
                            Failed {
                                error: UpstreamError::Exchange {
                                    addr: self.addr,
                                    source,
                                },
                                retry,
                            },
                            hold,
                        ));
                    }
                }
            }
        }
    }

    /// The most recently used idle fast-path connection that is still open.
    fn pop_raw(&self) -> Option<RawConn> {
        let mut raw = self.raw.lock();
        while let Some(conn) = raw.pop() {
            if !conn.is_stale() {
                return Some(conn);
            }
        }
        None
    }

    async fn connect_raw(&self, timeout: Duration) -> Result<RawConn, UpstreamError> {
        let addr = self.addr;
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
            Err(_) => return Err(UpstreamError::ConnectTimeout { addr, timeout }),
        };
        // Requests are small writes that must leave at once.
        let _ = stream.set_nodelay(true);
        Ok(RawConn::new(stream))
    }
}
