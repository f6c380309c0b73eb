//! Keep-alive HTTP/1.1 connection pools to back ends, and sending a request on one.
//!
//! One [`Upstream`] per back-end address holds a LIFO stack of idle connections
//! (hyper client connections whose driver task runs on the runtime). A request takes
//! the most recently used idle connection that is still open, or dials a new one.
//!
//! Invariants:
//! - A connection goes back to the idle stack only after its response body was read
//!   to the end ([`Checkin::reuse`], called by the response body); a response cut
//!   short leaves the connection to be closed by hyper. A connection that answered
//!   `101` belongs to its tunnel ([`Checkin::switched`]) and never goes back: hyper
//!   hands its stream to the response's upgrade (the driver runs `with_upgrades`).
//!   Any other answer to an upgrade request leaves the connection HTTP (the back end
//!   ignored the `Upgrade`), reusable under the rule above.
//! - A request is retried on another connection when hyper hands it back unsent
//!   (`TrySendError::take_message`). When a reused keep-alive connection dies after
//!   the request went out but before any response byte (the back end's keep-alive
//!   timeout raced us), only a GET, HEAD or OPTIONS without a body is sent again,
//!   once, on a fresh connection; any other request fails with 502 and is never sent
//!   twice (like nginx's `proxy_next_upstream error` on idempotent requests).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
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
use crate::upstream_io::{Activity, UpstreamIo, UpstreamTimeouts};

/// A connection's request handle and its pause-limit state.
type Conn = (SendRequest<Body>, Arc<Activity>);

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
}

impl UpstreamError {
    /// The `X-Launchday-Error` value for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Handshake { .. } => "upstream_connect_failed",
            UpstreamError::AfterSend { .. } => "upstream_failed_after_send",
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
    idle: Mutex<Vec<Conn>>,
}

/// A connection lent to one request; see [`Checkin::reuse`].
#[derive(Debug)]
pub struct Checkin {
    upstream: Arc<Upstream>,
    /// Always `Some` until taken by `reuse`.
    sender: Option<Conn>,
}

impl Checkin {
    /// The connection answered `101` and now carries a tunnel: its pause limits stop
    /// (the tunnel has its own inactivity limit), and it is never reused. Dropping
    /// the `Checkin` afterwards drops only the request handle; the stream lives on in
    /// the response's upgrade.
    pub fn switched(&self) {
        if let Some((_, activity)) = &self.sender {
            activity.end();
        }
    }

    /// Returns the connection to the idle stack (its response was read to the end).
    pub fn reuse(self) {
        let Some((sender, activity)) = self.sender else {
            return;
        };
        activity.end();
        if sender.is_closed() {
            return;
        }
        let mut idle = self.upstream.idle.lock();
        if idle.len() < MAX_IDLE_PER_BACKEND {
            idle.push((sender, activity));
        }
    }
}

impl Upstream {
    /// An empty pool for `addr`.
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Upstream {
            addr,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The back end's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Idle connections right now (for tests and the status page).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
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
    pub async fn send<H: Send + 'static>(
        self: &Arc<Self>,
        req: Request<Body>,
        timeouts: UpstreamTimeouts,
        hold: H,
    ) -> Result<(Response<Incoming>, Checkin, H), (Failed, H)> {
        let mut guard = Exchange {
            upstream: self,
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
        guard: &mut Exchange<'_, H>,
    ) -> Result<(Response<Incoming>, Checkin), Failed> {
        // A copy to resend if a connection dies before answering: only for requests
        // that are safe to send twice (idempotent, no body).
        let template = replayable(&req);
        // Reuse idle connections, most recent first. A closed one is dropped; one the
        // back end closed under us hands the request back unsent, and we go on.
        loop {
            let popped = self.idle.lock().pop();
            let Some((mut sender, activity)) = popped else {
                break;
            };
            if sender.is_closed() {
                continue;
            }
            if !sender.is_ready() && sender.ready().await.is_err() {
                continue;
            }
            activity.begin(timeouts);
            let sent = guard.send(sender, activity, req).await;
            let Some((sender, activity)) = guard.conn.take() else {
                unreachable!("only Exchange::drop takes the connection")
            };
            match sent {
                Ok(resp) => return Ok((resp, self.checkin((sender, activity)))),
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
        let (sender, activity) = match self.connect(timeouts.connect).await {
            Ok(s) => s,
            // Nothing was sent: the request itself may go elsewhere.
            Err(error) => {
                return Err(Failed {
                    error,
                    retry: Some(req),
                })
            }
        };
        activity.begin(timeouts);
        let sent = guard.send(sender, activity, req).await;
        let Some((sender, activity)) = guard.conn.take() else {
            unreachable!("only Exchange::drop takes the connection")
        };
        match sent {
            Ok(resp) => Ok((resp, self.checkin((sender, activity)))),
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

    fn checkin(self: &Arc<Self>, sender: Conn) -> Checkin {
        Checkin {
            upstream: Arc::clone(self),
            sender: Some(sender),
        }
    }
}

/// The answer to a request out on a connection, boxed so that it can outlive a caller
/// who gives up (one allocation per proxied request).
type Sending =
    Pin<Box<dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<Body>>>> + Send>>;

/// What a request out on a connection needs until its exchange really ends; see
/// [`Upstream::send`]. Dropped with `conn` set only when the caller gave up mid-send.
struct Exchange<'a, H: Send + 'static> {
    upstream: &'a Arc<Upstream>,
    conn: Option<Conn>,
    sending: Option<Sending>,
    hold: Option<H>,
}

impl<H: Send + 'static> Exchange<'_, H> {
    /// Sends `req` on `sender`, keeping the connection and the pending answer here
    /// until the answer's head arrives.
    async fn send(
        &mut self,
        mut sender: SendRequest<Body>,
        activity: Arc<Activity>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Body>>> {
        self.sending = Some(Box::pin(sender.try_send_request(req)));
        self.conn = Some((sender, activity));
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

impl<H: Send + 'static> Drop for Exchange<'_, H> {
    fn drop(&mut self) {
        let (Some((mut sender, activity)), Some(sending), Some(hold)) =
            (self.conn.take(), self.sending.take(), self.hold.take())
        else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let upstream = Arc::clone(self.upstream);
        runtime.spawn(async move {
            // The back end is still working: wait for its answer and read it to the
            // end (the pause limits bound both), then free its slot and keep the
            // connection if it is sound.
            let mut complete = false;
            if let Ok(resp) = sending.await {
                use http_body_util::BodyExt;
                // A `101` switched the connection to the dropped upgrade: never reused.
                let switched = resp.status() == hyper::StatusCode::SWITCHING_PROTOCOLS;
                let mut body = resp.into_body();
                complete = !switched
                    && loop {
                        match body.frame().await {
                            Some(Ok(_)) => {}
                            Some(Err(_)) => break false,
                            None => break true,
                        }
                    };
            }
            let reusable = complete && sender.ready().await.is_ok();
            drop(hold);
            if reusable {
                upstream.checkin((sender, activity)).reuse();
            }
        });
    }
}

impl Upstream {
    async fn connect(&self, timeout: Duration) -> Result<Conn, UpstreamError> {
        let addr = self.addr;
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
            Err(_) => return Err(UpstreamError::ConnectTimeout { addr, timeout }),
        };
        // Requests are small writes that must leave at once.
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let io = UpstreamIo::new(stream, Arc::clone(&activity));
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            // With upgrades: after a `101` the stream goes to the response's upgrade.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream connection ended");
            }
        });
        Ok((sender, activity))
    }
}
