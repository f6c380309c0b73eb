//! Parking idle keep-alive connections: an HTTP/1 connection on a plain listener
//! that has been idle for [`PARK_AFTER`] gives back everything hyper holds for it
//! (its 8 KiB read buffer, its write buffer, the room it keeps for the request
//! future, the connection state: ~15 KiB) and waits in the kernel with only its
//! socket, its `Track` and a timer. When the client sends its next request, a new
//! hyper connection is built around the same stream. nginx does the same for its
//! keep-alive connections (it frees their buffers between requests).
//!
//! Invariants:
//! - A connection is parked only at an idle point
//!   (`Track::park_at` in [`crate::conn`]): no request in the service and every response
//!   body finished by hyper (an [`Answer`] keeps its request in flight until then),
//!   no byte of a next request read, no tunnel. hyper then closes the connection at
//!   once (`graceful_shutdown` on an idle connection), and its shutdown of the stream
//!   is swallowed (the `parking` flag of `Track`).
//! - Nothing read is lost: bytes hyper read but did not use come back with the parts
//!   and are replayed to the next hyper connection before the socket (they are
//!   scanned then, and start the head deadline).
//! - The deadlines go on: a parked connection is closed at `idle_timeout` after its
//!   last response (`header_timeout` if it never had a request), as an unparked one
//!   would be, and at once on shutdown unless a request is already waiting in the
//!   socket (which is then served, like a fresh connection's first request).
//! - TLS connections are not parked: rustls may hold decrypted bytes that the socket's
//!   readiness would not show.
//!
//! The memory goes back to the allocator, which reuses it for the connections that
//! become active next; glibc does not hand it back to the kernel, so RSS follows the
//! peak of connections active at once rather than of connections open (measured in
//! BENCHMARKS.md).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::net::TcpStream;

use crate::conn::{ClientIo, InFlight};

/// How long a keep-alive connection is idle before it is parked. Long enough that a
/// client's next request on a busy connection (a page's assets, a keep-alive load
/// test) finds hyper still there; short enough that idle connections cost little.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// A stream whose connection can be parked.
pub trait Parkable {
    /// Whether [`Parkable::poll_readable`] tells when the next request arrives.
    const PARKS: bool;
    /// Ready when the stream has bytes (or end of stream) to read.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

impl Parkable for TcpStream {
    const PARKS: bool = true;
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl Parkable for tokio_rustls::server::TlsStream<TcpStream> {
    const PARKS: bool = false;
    fn poll_readable(&self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

/// How a parked connection's wait ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// The client sent something (or closed): serve the stream again.
    Readable,
    /// `idle_timeout` (or `header_timeout`) passed: close silently.
    Expired,
    /// The listener stops and no request was waiting: close.
    Stopped,
}

/// Waits, holding nothing but the stream, until the client sends its next request,
/// the connection's waiting deadline passes, or `stop` says the listener stops.
pub async fn wait<I: Parkable>(
    io: &ClientIo<I>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Wake {
    let track = io.track();
    let Some(deadline) = track.waiting_deadline() else {
        return Wake::Readable;
    };
    let readable = std::future::poll_fn(|cx| io.get_ref().poll_readable(cx));
    tokio::select! {
        // A request already in the socket is served even when the listener stops.
        biased;
        _ = readable => Wake::Readable,
        _ = tokio::time::sleep_until(deadline) => Wake::Expired,
        // A closed channel means the server is gone: stop too.
        _ = async { stop.wait_for(|stopped| *stopped).await.is_ok() } => Wake::Stopped,
    }
}

/// A response body that keeps its request in flight ([`InFlight`]) until hyper drops
/// it (after writing it to its end, or when the connection fails), so that a
/// connection is never parked in the middle of a response.
pub struct Answer<B> {
    body: B,
    _request: InFlight,
}

impl<B> Answer<B> {
    pub fn new(body: B, request: InFlight) -> Self {
        Answer {
            body,
            _request: request,
        }
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Answer<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
