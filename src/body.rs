//! The one body type of the data plane, for requests sent upstream and responses sent
//! to clients.
//!
//! An enum rather than a boxed trait object so that the request path does not
//! allocate for it. `Streaming` carries what must live exactly as long as the body:
//! the back end's capacity [`Lease`] (released when the body is done or dropped, on
//! every exit path) and the upstream connection, which goes back to the keep-alive
//! pool only when the body was read to its end (a connection whose response was cut
//! short is never reused).
//!
//! Request bodies from clients are [`ClientBody`]: the stream with the body limits of
//! `[limits]` (`body_timeout`, the longest pause between two reads, and
//! `max_body_bytes`). Either one ends the body with a [`BodyError`], which aborts the
//! request to the back end mid-stream (it never sees a complete request) and is
//! answered `408`/`413` when no answer started yet.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::pool::Lease;
use crate::upstream::{Checkin, UpBody};
use crate::upstream_h1::{ExchangeError, RawBody};

/// Why a body stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// A fast-path answer's body broke off (see [`crate::upstream_h1`]).
    #[error(transparent)]
    Upstream(#[from] ExchangeError),
    /// The client's body could not be read (bad chunked framing, connection lost).
    #[error("reading the request body: {0}")]
    Client(hyper::Error),
    /// The client paused longer than `body_timeout`.
    #[error("no request body bytes for {0:?}")]
    Timeout(Duration),
    /// The client sent more than `max_body_bytes`.
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
}

impl BodyError {
    /// The client-body error somewhere in `err`'s chain of sources, if any.
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
        let mut at: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = at {
            if let Some(b) = e.downcast_ref::<BodyError>() {
                if !matches!(b, BodyError::Hyper(_) | BodyError::Upstream(_)) {
                    return Some(b);
                }
            }
            at = e.source();
        }
        None
    }
}

/// A client's request body with the `[limits]` body limits.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    read: u64,
    max: Option<u64>,
    timeout: Duration,
    /// Armed when a read blocks; re-armed only after progress (no clock read per frame).
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    progressed: bool,
}

impl ClientBody {
    pub fn new(inner: Incoming, timeout: Duration, max: Option<u64>) -> Self {
        ClientBody {
            inner,
            read: 0,
            max,
            timeout,
            sleep: None,
            progressed: false,
        }
    }
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if let Some(max) = this.max.filter(|&m| this.read > m) {
                    return Poll::Ready(Some(Err(BodyError::TooLarge(max))));
                }
                this.progressed = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Client(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let at = tokio::time::Instant::now;
                match &mut this.sleep {
                    Some(s) if this.progressed => s.as_mut().reset(at() + this.timeout),
                    Some(_) => {}
                    None => this.sleep = Some(Box::pin(tokio::time::sleep(this.timeout))),
                }
                this.progressed = false;
                match this.sleep.as_mut().map(|s| s.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => {
                        Poll::Ready(Some(Err(BodyError::Timeout(this.timeout))))
                    }
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client request's body as the service gets it: none (launchday's own HTTP/1.1
/// path, [`crate::h1_server`], serves only requests without one) or hyper's stream.
#[derive(Debug)]
pub enum ReqBody {
    /// The request has no body.
    Empty,
    /// The body as hyper reads it (HTTP/1.1 through hyper, HTTP/2).
    Hyper(Incoming),
}

impl http_body::Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Hyper(inner) => Pin::new(inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Hyper(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Hyper(inner) => inner.size_hint(),
        }
    }
}

/// A request or response body.
#[derive(Debug, Default)]
pub enum Body {
    /// No body.
    #[default]
    Empty,
    /// A body known in full (local answers). `None` once sent.
    Full(Option<Bytes>),
    /// A maintenance page for launchday's own HTTP/1.1 writer ([`crate::h1_server`]),
    /// with its header lines already encoded in `head` (no `content-length`, which the
    /// writer adds from the body), so that the answer costs no header map. Only made
    /// when the handler was told the answer goes to that writer ([`crate::proxy::Wire`]).
    Page { head: Bytes, body: Option<Bytes> },
    /// A request body partly read ahead while the request was queued: those frames
    /// first, then the rest of the stream.
    Prefetched {
        frames: std::collections::VecDeque<Frame<Bytes>>,
        inner: ClientBody,
    },
    /// A client's request body, not read ahead.
    Client(ClientBody),
    /// A body streamed from a peer.
    Streaming {
        inner: Incoming,
        /// Returned to the upstream pool on end of stream.
        checkin: Option<Checkin>,
        /// Released when this body is dropped.
        lease: Option<Lease>,
    },
    /// An answer read by the fast path (it returns its connection itself).
    Raw {
        inner: RawBody,
        /// Released when the body ends or is dropped.
        lease: Option<Lease>,
    },
}

impl Body {
    /// A complete body.
    pub fn full(data: impl Into<Bytes>) -> Self {
        Body::Full(Some(data.into()))
    }

    /// A body streamed from a peer, with nothing attached.
    pub fn incoming(inner: Incoming) -> Self {
        Body::Streaming {
            inner,
            checkin: None,
            lease: None,
        }
    }

    /// A request body of which `frames` were already read from `inner`.
    pub fn prefetched(frames: std::collections::VecDeque<Frame<Bytes>>, inner: ClientBody) -> Self {
        if frames.is_empty() {
            Body::Client(inner)
        } else {
            Body::Prefetched { frames, inner }
        }
    }

    /// An upstream response body that holds the back end's lease and returns the
    /// connection to its pool when read to the end.
    pub fn upstream(inner: UpBody, lease: Lease) -> Self {
        match inner {
            UpBody::Hyper(inner, checkin) => {
                let mut body = Body::Streaming {
                    inner,
                    checkin: Some(checkin),
                    lease: Some(lease),
                };
                body.finish_if_ended();
                body
            }
            UpBody::Raw(inner) => {
                // No body at all (204, 304, HEAD): the back end is done already.
                let lease = (!http_body::Body::is_end_stream(&inner)).then_some(lease);
                Body::Raw { inner, lease }
            }
        }
    }

    /// If the stream already ended (no body at all: 204, 304, HEAD), give the
    /// connection back now.
    fn finish_if_ended(&mut self) {
        if let Body::Streaming { inner, checkin, .. } = self {
            if http_body::Body::is_end_stream(inner) {
                if let Some(c) = checkin.take() {
                    c.reuse();
                }
            }
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(data) | Body::Page { body: data, .. } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            Body::Prefetched { frames, inner } => match frames.pop_front() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None => Pin::new(inner).poll_frame(cx),
            },
            Body::Client(inner) => Pin::new(inner).poll_frame(cx),
            Body::Streaming {
                inner,
                checkin,
                lease,
            } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                // hyper stops polling a body whose length is known as soon as it has
                // all of it, so "ended" is also a data frame that leaves nothing.
                let ended = match &polled {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
                    _ => false,
                };
                match &polled {
                    _ if ended => {
                        if let Some(c) = checkin.take() {
                            c.reuse();
                        }
                        // The back end finished its answer: free its slot now rather
                        // than when the client connection gets around to dropping us.
                        lease.take();
                    }
                    Poll::Ready(Some(Err(_))) => {
                        checkin.take();
                        lease.take();
                    }
                    _ => {}
                }
                polled.map_err(BodyError::from)
            }
            Body::Raw { inner, lease } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                if inner.is_end_stream() || matches!(polled, Poll::Ready(None | Some(Err(_)))) {
                    // The back end finished (or failed) its answer: free its slot now.
                    lease.take();
                }
                polled.map_err(BodyError::from)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(data) | Body::Page { body: data, .. } => data.is_none(),
            Body::Prefetched { frames, inner } => frames.is_empty() && inner.is_end_stream(),
            Body::Client(inner) => inner.is_end_stream(),
            Body::Streaming { inner, .. } => inner.is_end_stream(),
            Body::Raw { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(Some(d)) | Body::Page { body: Some(d), .. } => {
                SizeHint::with_exact(d.len() as u64)
            }
            Body::Full(None) | Body::Page { body: None, .. } => SizeHint::with_exact(0),
            Body::Prefetched { frames, inner } => {
                let buffered: u64 = frames
                    .iter()
                    .map(|f| f.data_ref().map_or(0, |d| d.len() as u64))
                    .sum();
                let rest = inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + buffered);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
            Body::Streaming { inner, .. } => inner.size_hint(),
            Body::Raw { inner, .. } => inner.size_hint(),
            Body::Client(inner) => inner.size_hint(),
        }
    }
}
