//! One client connection's deadlines and raw request-head checks.
//!
//! [`ClientIo`] wraps the client's stream (TCP, or TLS over TCP) and shares a
//! [`Track`] with the connection's service. Together they give each HTTP/1 request
//! three phases, and a deadline for each that hyper alone cannot express:
//!
//! - **waiting** for the first byte of a request: `header_timeout` on a fresh
//!   connection (a client that connects and says nothing is not kept), `idle_timeout`
//!   after a response (keep-alive). Expiry closes the connection silently.
//! - **head**: from the first byte of a request head to its empty line, at most
//!   `header_timeout` in all, however the bytes trickle in (not per read). Expiry
//!   answers `408 Request Timeout` and closes.
//! - **request**: the service has the request; no deadline here (the body has its own
//!   pause limit, the back end its own timeouts). Writes to the client count as
//!   activity, so a long download is not mistaken for an idle connection.
//!
//! A connection whose request was answered `101` becomes a **tunnel** for good
//! ([`Track::tunnel`], called by the service before it returns the `101`; see
//! [`crate::tunnel`]): its bytes are another protocol, so nothing is scanned as a
//! head, no 408 is ever written, and the one deadline is `idle_timeout` after the
//! last byte read or written.
//!
//! While a head streams in, the bytes are scanned line by line (a `memchr` per line,
//! nothing copied) for header names hyper does not reveal to the service: hyper
//! silently drops `Content-Length` when `Transfer-Encoding` is present, and RFC 9112
//! §6.3 lets a server refuse that combination, which we do (it is the classic request
//! smuggling shape). The result of the scan ([`Verdict`]) is taken by the service
//! when hyper hands it the request.
//!
//! The same [`Track`] says when a plain connection may be parked between requests
//! (`Track::park_at`, see [`crate::park`]); on HTTP/1 a request stays in flight
//! until hyper has finished its answer's body.
//!
//! Invariants: deadlines are enforced only when a read that would block is polled
//! (by hyper, or by the tunnel after an upgrade), and only with no request in flight
//! (the service's [`Track::begin`]/[`Track::end`] bracket each one), so a response
//! is never cut by an idle or head deadline. The 408 is written only when nothing
//! else was written since the head began (a pipelined response still streaming is
//! never interleaved with it). Heads that
//! arrive pipelined in one read with the previous request are parsed by hyper
//! without passing through the scan; hyper still drops their `Content-Length` in
//! favour of the chunked framing it forwards, so the back end cannot disagree with
//! us about where such a request ends.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;

use crate::metrics::CodeCounters;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What the raw scan of one request head found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    /// A `Content-Length` line.
    pub content_length: bool,
    /// A `Transfer-Encoding` line.
    pub transfer_encoding: bool,
}

impl Verdict {
    /// Both framing headers at once: refused (RFC 9112 §6.3).
    pub fn ambiguous_framing(self) -> bool {
        self.content_length && self.transfer_encoding
    }
}

/// The 408 answer, written straight to the stream.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\
Content-Length: 0\r\nX-Served-By: launchday\r\nX-Launchday-Error: header_timeout\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No byte of the next request yet. `fresh`: no request on this connection yet.
    Waiting { fresh: bool },
    /// Part of a head arrived.
    Head,
    /// hyper has (or is about to get) the whole head.
    Request,
    /// Switched protocols (after a `101`): a byte tunnel, never HTTP again.
    Tunnel,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    in_flight: u32,
    /// Start of the current phase (`Waiting`: last activity; `Head`: first byte).
    since: Instant,
    /// Something was written since the head began.
    wrote_in_head: bool,
    scan: Scanner,
    /// The verdict of the last complete head, for the service.
    verdict: Verdict,
    /// A read that blocked while a request was in flight: woken when it ends, so its
    /// deadline starts counting.
    reader: Option<std::task::Waker>,
    /// A tunnel is open on this connection ([`OpenTunnel`] alive).
    tunnel_open: bool,
    /// The connection is being parked: hyper was told to stop at an idle point, and
    /// its shutdown of the stream must not reach the socket ([`crate::park`]).
    parking: bool,
    /// Heads are scanned as they are read. Off while launchday's own HTTP/1.1 loop
    /// serves the connection: it parses every head itself (and scans one it hands
    /// to hyper first, [`Track::scan_head`]).
    scanning: bool,
}

/// The limits a connection enforces (from the snapshot it was accepted under).
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Idle time after which a plain connection is parked ([`crate::park`]).
    pub park_after: Duration,
}

impl Deadlines {
    /// The `[limits]` deadlines of a config.
    pub fn from_limits(l: &crate::config::LimitsSpec) -> Self {
        Deadlines {
            header_timeout: l.header_timeout,
            idle_timeout: l.idle_timeout,
            park_after: crate::park::PARK_AFTER,
        }
    }
}

/// Shared by a connection's [`ClientIo`] and its service.
pub struct Track {
    state: Mutex<State>,
    deadlines: Deadlines,
    /// Where hyper's own answers to unparsable requests are counted.
    errors: Option<Arc<CodeCounters>>,
    /// Notified when the tunnel closes.
    tunnel_closed: tokio::sync::Notify,
}

impl std::fmt::Debug for Track {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Track")
            .field("state", &self.state)
            .field("deadlines", &self.deadlines)
            .finish_non_exhaustive()
    }
}

impl Track {
    /// The state of a connection accepted now.
    pub fn new(deadlines: Deadlines) -> Arc<Self> {
        Self::counting(deadlines, None)
    }

    /// As [`Track::new`], counting hyper's answers to unparsable requests in `errors`.
    pub fn counting(deadlines: Deadlines, errors: Option<Arc<CodeCounters>>) -> Arc<Self> {
        Arc::new(Track {
            errors,
            state: Mutex::new(State {
                phase: Phase::Waiting { fresh: true },
                in_flight: 0,
                since: Instant::now(),
                wrote_in_head: false,
                scan: Scanner::default(),
                verdict: Verdict::default(),
                reader: None,
                tunnel_open: false,
                parking: false,
                scanning: true,
            }),
            deadlines,
            tunnel_closed: tokio::sync::Notify::new(),
        })
    }

    /// A request reached the service: returns its head's verdict.
    pub fn begin(&self) -> Verdict {
        let mut s = self.state.lock();
        s.in_flight += 1;
        s.phase = Phase::Request;
        std::mem::take(&mut s.verdict)
    }

    /// The request is over: on HTTP/1 hyper finished (or dropped) its response body,
    /// or the service was dropped before answering; on HTTP/2 the service produced
    /// its answer.
    pub fn end(&self) {
        let mut s = self.state.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            if s.phase != Phase::Tunnel {
                s.phase = Phase::Waiting { fresh: false };
                s.scan = Scanner::default();
            }
            s.since = Instant::now();
            if let Some(w) = s.reader.take() {
                w.wake();
            }
        }
    }

    /// The request in flight was answered `101`: from now on the connection is a
    /// tunnel (no head scanning, no 408, `idle_timeout` after the last byte read or
    /// written). The connection counts as open until the returned value is dropped
    /// (see [`Track::tunnel_closed`]).
    pub fn tunnel(self: &Arc<Self>) -> OpenTunnel {
        let mut s = self.state.lock();
        s.phase = Phase::Tunnel;
        s.tunnel_open = true;
        s.since = Instant::now();
        s.scan = Scanner::default();
        s.verdict = Verdict::default();
        OpenTunnel(Arc::clone(self))
    }

    /// When the tunnel on this connection has been quiet for too long: `idle_timeout`
    /// after the last byte read or written (or after the `101` was answered). `None`
    /// when the connection is no tunnel.
    pub fn tunnel_expiry(&self) -> Option<Instant> {
        let s = self.state.lock();
        (s.phase == Phase::Tunnel).then(|| s.since + self.deadlines.idle_timeout)
    }

    /// Resolves once no tunnel is open on this connection (at once if none ever was).
    pub async fn tunnel_closed(&self) {
        loop {
            if !self.state.lock().tunnel_open {
                return;
            }
            // `notify_one` keeps a permit if nobody waits yet: a close between the
            // check and the wait is not lost.
            self.tunnel_closed.notified().await;
        }
    }

    /// Idle time after which the connection is parked.
    pub(crate) fn park_after(&self) -> Duration {
        self.deadlines.park_after
    }

    /// Requests in the service right now.
    pub fn in_flight(&self) -> u32 {
        self.state.lock().in_flight
    }

    /// When the connection became idle (nothing in flight), if it is.
    pub fn idle_since(&self) -> Option<Instant> {
        let s = self.state.lock();
        (s.in_flight == 0).then_some(s.since)
    }

    /// When the connection may be parked, if it is idle now: nothing in flight (on
    /// HTTP/1 a request stays in flight until hyper has finished its response body,
    /// see [`crate::park::Answer`]), no byte of a next request read, no tunnel.
    pub(crate) fn park_at(&self) -> Option<Instant> {
        self.park_at_of(&self.state.lock())
    }

    fn park_at_of(&self, s: &State) -> Option<Instant> {
        let idle = s.in_flight == 0 && !s.tunnel_open;
        (idle && matches!(s.phase, Phase::Waiting { .. }))
            .then(|| s.since + self.deadlines.park_after)
    }

    /// While waiting for a request: when the connection is closed for silence
    /// (`header_timeout` on a fresh connection, `idle_timeout` after a response).
    pub(crate) fn waiting_deadline(&self) -> Option<Instant> {
        let s = self.state.lock();
        match s.phase {
            Phase::Waiting { fresh: true } => Some(s.since + self.deadlines.header_timeout),
            Phase::Waiting { fresh: false } => Some(s.since + self.deadlines.idle_timeout),
            _ => None,
        }
    }

    /// Marks the connection as being parked (or no longer).
    pub(crate) fn set_parking(&self, parking: bool) {
        self.state.lock().parking = parking;
    }

    /// Bytes of a next request that arrived while the last one was in flight (they
    /// were not scanned then): takes them now as if they had just been read, which
    /// starts the head phase and its deadline (and scans them, when scanning is on).
    pub(crate) fn rescan(&self, data: &[u8]) {
        self.on_read(data);
    }

    /// Whether heads are scanned as they are read (see `State::scanning`). Reads
    /// still start the head phase and its deadline either way.
    pub(crate) fn set_scanning(&self, on: bool) {
        self.state.lock().scanning = on;
    }

    /// Scans `head`, the bytes of the current head read so far (read while
    /// scanning was off), from its start: the verdict and phase are then what
    /// scanning them as they were read would have given.
    pub(crate) fn scan_head(&self, head: &[u8]) {
        let mut s = self.state.lock();
        if s.phase != Phase::Head {
            return;
        }
        s.scan = Scanner::default();
        if let Some(verdict) = s.scan.feed(head) {
            s.verdict = verdict;
            s.phase = Phase::Request;
        }
    }

    fn on_read(&self, data: &[u8]) {
        let mut s = self.state.lock();
        if s.phase == Phase::Tunnel {
            s.since = Instant::now();
            return;
        }
        if s.phase == Phase::Request || s.in_flight > 0 {
            return;
        }
        if let Phase::Waiting { .. } = s.phase {
            s.phase = Phase::Head;
            s.since = Instant::now();
            s.wrote_in_head = false;
            s.scan = Scanner::default();
        }
        if !s.scanning {
            return;
        }
        if let Some(verdict) = s.scan.feed(data) {
            s.verdict = verdict;
            s.phase = Phase::Request;
        }
    }

    /// Whether a write now is hyper answering a request it could not parse (400,
    /// 431, 414): no request is in the service, and bytes of a head were read.
    fn parse_error_answer(&self, buf: &[u8]) -> bool {
        let s = self.state.lock();
        s.in_flight == 0
            && matches!(s.phase, Phase::Head | Phase::Request)
            && buf.starts_with(b"HTTP/1.1 4")
    }

    fn on_write(&self) {
        let mut s = self.state.lock();
        match s.phase {
            Phase::Waiting { .. } if s.in_flight == 0 => s.since = Instant::now(),
            Phase::Tunnel => s.since = Instant::now(),
            Phase::Head => s.wrote_in_head = true,
            _ => {}
        }
    }

    /// The deadline in force now, and whether its expiry answers 408. Without one,
    /// `cx`'s waker is kept to be woken when the request in flight ends.
    fn deadline(&self, cx: &Context<'_>) -> Option<(Instant, bool)> {
        let mut s = self.state.lock();
        if s.in_flight > 0 || s.phase == Phase::Request {
            if !s.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                s.reader = Some(cx.waker().clone());
            }
            return None;
        }
        self.deadline_of(&s)
    }

    /// For a reader that enforces the deadlines itself
    /// ([`ClientIo::set_caller_deadlines`]): when the connection must end for
    /// silence, and whether with a 408 (a head had begun and nothing was written
    /// since). `None` while a request is in flight.
    pub(crate) fn read_deadline(&self) -> Option<(Instant, bool)> {
        self.read_deadline_of(&self.state.lock())
    }

    fn read_deadline_of(&self, s: &State) -> Option<(Instant, bool)> {
        if s.in_flight > 0 || s.phase == Phase::Request {
            return None;
        }
        self.deadline_of(s)
    }

    /// For the own loop waiting between requests, under one lock: when the
    /// connection may be parked ([`Track::park_at`]) and when it must end for
    /// silence ([`Track::read_deadline`]).
    pub(crate) fn idle_times(&self) -> (Option<Instant>, Option<Instant>) {
        let s = self.state.lock();
        let expire = self.read_deadline_of(&s).map(|(at, _)| at);
        (self.park_at_of(&s), expire)
    }

    fn deadline_of(&self, s: &State) -> Option<(Instant, bool)> {
        let d = &self.deadlines;
        match s.phase {
            Phase::Waiting { fresh: true } => Some((s.since + d.header_timeout, false)),
            Phase::Waiting { fresh: false } => Some((s.since + d.idle_timeout, false)),
            Phase::Head => Some((s.since + d.header_timeout, !s.wrote_in_head)),
            Phase::Tunnel => Some((s.since + d.idle_timeout, false)),
            Phase::Request => None,
        }
    }
}

/// A tunnel open on a connection ([`Track::tunnel`]); dropped when the tunnel ends.
pub struct OpenTunnel(Arc<Track>);

impl OpenTunnel {
    /// The connection's state.
    pub fn track(&self) -> &Arc<Track> {
        &self.0
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.state.lock().tunnel_open = false;
        self.0.tunnel_closed.notify_one();
    }
}

/// Ends the request it was made for when dropped (every exit path of the service).
pub struct InFlight(pub Arc<Track>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Finds the end of a request head in the bytes as they arrive, noting the header
/// names we care about. Lines may end in CRLF or a bare LF (as httparse accepts).
#[derive(Debug, Default)]
struct Scanner {
    /// The first bytes of the current line, lowercased.
    prefix: [u8; 18],
    /// Length of the current line so far (all of it, not only the prefix).
    len: usize,
    /// The current line's last byte was CR.
    cr: bool,
    /// Lines seen in this head (the request line is the first).
    lines: usize,
    found: Verdict,
}

impl Scanner {
    /// Feeds bytes; returns the verdict when the head's empty line was reached.
    fn feed(&mut self, mut data: &[u8]) -> Option<Verdict> {
        loop {
            let Some(i) = memchr::memchr(b'\n', data) else {
                self.take(data);
                return None;
            };
            self.take(&data[..i]);
            let content = self.len - usize::from(self.cr);
            if content == 0 && self.lines > 0 {
                return Some(self.found);
            }
            if content == 0 {
                // Empty lines before the request line are ignored (RFC 9112 §2.2).
                *self = Scanner::default();
            } else {
                self.classify();
                self.lines += 1;
                self.len = 0;
                self.cr = false;
            }
            data = &data[i + 1..];
        }
    }

    fn take(&mut self, part: &[u8]) {
        if part.is_empty() {
            return;
        }
        if self.len < self.prefix.len() {
            let n = part.len().min(self.prefix.len() - self.len);
            for (dst, src) in self.prefix[self.len..self.len + n].iter_mut().zip(part) {
                *dst = src.to_ascii_lowercase();
            }
        }
        self.len += part.len();
        self.cr = part.last() == Some(&b'\r');
    }

    fn classify(&mut self) {
        if self.lines == 0 {
            return;
        }
        let n = self.len.min(self.prefix.len());
        let line = &self.prefix[..n];
        if line.starts_with(b"content-length:") {
            self.found.content_length = true;
        } else if line.starts_with(b"transfer-encoding:") {
            self.found.transfer_encoding = true;
        }
    }
}

/// A client stream with the deadlines of [`Track`].
pub struct ClientIo<I> {
    io: I,
    track: Arc<Track>,
    /// Never later than the deadline in force (see `poll_deadline`).
    sleep: Option<Pin<Box<Sleep>>>,
    /// hyper's answer to an unparsable request, with `X-Served-By` added, and how
    /// much of it was written.
    rewritten: Option<(Vec<u8>, usize)>,
    /// Bytes read earlier and handed back by a parked hyper connection, read again
    /// before the stream (scanned once, by [`ClientIo::replay`]).
    replay: bytes::Bytes,
    /// The reader enforces the deadlines itself ([`ClientIo::set_caller_deadlines`]):
    /// a read that would block just waits.
    caller_deadlines: bool,
}

/// Inserted after the status line of hyper's own error answers, which, like every
/// answer launchday makes itself, say so.
const LOCAL_HEADERS: &[u8] = b"X-Served-By: launchday\r\nX-Launchday-Error: bad_request\r\n";

impl<I> ClientIo<I> {
    pub fn new(io: I, track: Arc<Track>) -> Self {
        ClientIo {
            io,
            track,
            sleep: None,
            rewritten: None,
            replay: bytes::Bytes::new(),
            caller_deadlines: false,
        }
    }

    /// Whether the code reading this stream enforces the connection's deadlines
    /// itself (launchday's own HTTP/1.1 loop, with its one timer per connection,
    /// [`Track::read_deadline`]) instead of this stream's timer. Off for hyper, which
    /// cannot. While on, a read that would block only waits; the reader must also
    /// answer 408 itself ([`ClientIo::request_timeout`]).
    pub(crate) fn set_caller_deadlines(&mut self, on: bool) {
        self.caller_deadlines = on;
    }

    /// Gives back bytes hyper had read but not used (see `replay`): the start of a
    /// next request that came in the same read as the last one's end. A connection is
    /// parked only while waiting for a request, so these bytes were never scanned:
    /// they are now, and start the head phase (and its deadline).
    pub(crate) fn replay(&mut self, bytes: bytes::Bytes) {
        debug_assert!(self.replay.is_empty());
        self.track.on_read(&bytes);
        self.replay = bytes;
    }

    /// Gives back bytes read through this stream and already scanned (a head the
    /// HTTP/1.1 fast path hands to hyper, [`crate::h1_server`]): read again before
    /// the stream, not scanned twice.
    pub(crate) fn give_back(&mut self, bytes: bytes::Bytes) {
        debug_assert!(self.replay.is_empty());
        self.replay = bytes;
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The state shared with the connection's service.
    pub fn track(&self) -> &Arc<Track> {
        &self.track
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> ClientIo<I> {
    /// Sends `408 Request Timeout`, best effort (what the socket takes at once: the
    /// client is about to be cut off either way).
    pub(crate) async fn request_timeout(&mut self) {
        std::future::poll_fn(|cx| {
            self.send_408(cx);
            Poll::Ready(())
        })
        .await;
    }

    /// Writes `408 Request Timeout` as far as the socket takes it at once (best
    /// effort: the client is about to be cut off either way).
    fn send_408(&mut self, cx: &mut Context<'_>) {
        let _ = Pin::new(&mut self.io).poll_write(cx, REQUEST_TIMEOUT);
        let _ = Pin::new(&mut self.io).poll_flush(cx);
    }

    /// Called when a read would block. `Ready(true)`: the deadline passed, end the
    /// connection (after a 408 if the head had begun). The timer is armed at most
    /// `header_timeout` ahead, so it never fires after the deadline even when the
    /// phase changes to one with a shorter limit; firing early just re-arms it.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        for _ in 0..2 {
            let Some((deadline, answer)) = self.track.deadline(cx) else {
                return Poll::Pending;
            };
            if let Some(sleep) = &mut self.sleep {
                if sleep.deadline() <= deadline && sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                if answer {
                    self.send_408(cx);
                }
                return Poll::Ready(true);
            }
            let at = deadline.min(now + self.track.deadlines.header_timeout);
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(at),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        Poll::Pending
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if !new.is_empty() {
                    this.track.on_read(new);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.caller_deadlines => Poll::Pending,
            Poll::Pending => {
                // Expired: end of stream, which hyper takes as the client leaving.
                ready!(this.poll_deadline(cx));
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.rewritten.is_none() && this.track.parse_error_answer(buf) {
            if let Some(end) = memchr::memmem::find(buf, b"\r\n") {
                let mut out = Vec::with_capacity(buf.len() + LOCAL_HEADERS.len());
                out.extend_from_slice(&buf[..end + 2]);
                out.extend_from_slice(LOCAL_HEADERS);
                out.extend_from_slice(&buf[end + 2..]);
                this.rewritten = Some((out, 0));
                if let (Some(errors), Some(status)) = (&this.track.errors, status_of(buf)) {
                    errors.inc(status);
                }
            }
        }
        if let Some((out, done)) = &mut this.rewritten {
            // hyper's whole answer is in `buf` (it is one small head); report it
            // written only once our longer copy is.
            while *done < out.len() {
                match Pin::new(&mut this.io).poll_write(cx, &out[*done..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                    Poll::Ready(Ok(n)) => *done += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            this.rewritten = Some((Vec::new(), 0));
            return Poll::Ready(Ok(buf.len()));
        }
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.track.on_write();
            }
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.track.on_write();
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.track.state.lock().parking {
            // hyper stopped at an idle point because we asked it to: the stream
            // stays open, to be served again when the next request comes.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// The status code of a response head's status line.
fn status_of(head: &[u8]) -> Option<http::StatusCode> {
    head.get(9..12)
        .and_then(|code| http::StatusCode::from_bytes(code).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn scan(parts: &[&[u8]]) -> Option<Verdict> {
        let mut s = Scanner::default();
        let mut out = None;
        for p in parts {
            out = out.or(s.feed(p));
        }
        out
    }

    #[test]
    fn finds_the_end_of_a_head_however_it_is_split() {
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        for cut in 0..head.len() {
            let v = scan(&[&head[..cut], &head[cut..]]).expect("head end");
            assert!(v.content_length && !v.transfer_encoding, "cut at {cut}");
        }
        assert_eq!(scan(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), None);
    }

    #[test]
    fn sees_both_framing_headers_in_any_case_and_order() {
        let v = scan(&[b"POST / HTTP/1.1\r\nTRANSFER-encoding: chunked\r\nHost: a\r\ncontent-LENGTH: 3\r\n\r\n"])
            .expect("end");
        assert!(v.ambiguous_framing());
        let v = scan(&[b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n"]).expect("end");
        assert!(v.transfer_encoding && !v.content_length);
        // A header whose name only starts like one of them is not it.
        let v = scan(&[b"GET / HTTP/1.1\r\nContent-Lengthy: 3\r\nX: content-length: 1\r\n\r\n"])
            .expect("end");
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn leading_empty_lines_do_not_end_a_head() {
        let v = scan(&[b"\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"]).expect("end");
        assert!(v.content_length);
    }

    fn deadlines(header: u64, idle: u64) -> Deadlines {
        Deadlines {
            header_timeout: Duration::from_secs(header),
            idle_timeout: Duration::from_secs(idle),
            park_after: Duration::from_secs(3600),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_head_gets_408_at_the_head_deadline_not_per_read() {
        let (client, server) = tokio::io::duplex(1024);
        let track = Track::new(deadlines(10, 60));
        let mut io = ClientIo::new(server, Arc::clone(&track));
        let (mut rd, mut wr) = tokio::io::split(client);
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nHost: x" {
                wr.write_all(&[*b]).await.expect("write");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            wr
        });
        let mut buf = [0u8; 64];
        loop {
            let n = io.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
        }
        // The first byte came at once, so the deadline is 10 s after it.
        assert_eq!(started.elapsed().as_secs(), 10);
        let mut answer = vec![0u8; 200];
        let n = rd.read(&mut answer).await.expect("read answer");
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 408 "),
            "{:?}",
            &answer[..n]
        );
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_without_an_answer() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut io = ClientIo::new(server, Track::new(deadlines(10, 60)));
        let started = Instant::now();
        let mut buf = [0u8; 16];
        assert_eq!(io.read(&mut buf).await.expect("read"), 0);
        assert_eq!(started.elapsed().as_secs(), 10);
        drop(io);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("read");
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keep_alive_uses_idle_timeout_and_requests_in_flight_have_none() {
        let (mut client, server) = tokio::io::duplex(1024);
        let track = Track::new(deadlines(1, 5));
        let mut io = ClientIo::new(server, Arc::clone(&track));
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.expect("read") > 0);
        let verdict = track.begin();
        assert_eq!(verdict, Verdict::default());
        // A slow answer: no deadline while the request is in flight.
        let reading = tokio::spawn(async move {
            let started = Instant::now();
            let n = io.read(&mut buf).await.expect("read");
            (n, started.elapsed())
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!reading.is_finished());
        track.end();
        let (n, took) = reading.await.expect("join");
        assert_eq!(n, 0);
        // 30 s in flight, then the 5 s idle timeout (not the 1 s head one).
        assert_eq!(took.as_secs(), 35);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_has_no_head_deadline_only_the_idle_timeout_after_its_last_byte() {
        let (client, server) = tokio::io::duplex(1024);
        let (mut rd, mut wr) = tokio::io::split(client);
        let track = Track::new(deadlines(1, 5));
        let mut io = ClientIo::new(server, Arc::clone(&track));
        wr.write_all(b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        assert!(io.read(&mut buf).await.expect("read") > 0);
        track.begin();
        let open = track.tunnel();
        track.end();
        io.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .await
            .expect("write 101");
        assert!(track.idle_since().is_some());

        // Half of what looks like a head, then 4 s of silence: no 408 at 1 s.
        wr.write_all(b"GET /x HTTP/1.1\r\n").await.expect("write");
        let n = io.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"GET /x HTTP/1.1\r\n");
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = io.read(&mut buf).await.expect("read");
            (io, buf[..n].to_vec())
        });
        tokio::time::sleep(Duration::from_secs(4)).await;
        wr.write_all(b"more").await.expect("write");
        let (mut io, got) = reading.await.expect("join");
        assert_eq!(got, b"more");
        // Bytes written to the client are activity too.
        tokio::time::sleep(Duration::from_secs(4)).await;
        io.write_all(b"down").await.expect("write");

        // Then silence: the end of the stream, 5 s after the last byte.
        let quiet = Instant::now();
        assert_eq!(io.read(&mut buf).await.expect("read"), 0);
        assert_eq!(quiet.elapsed().as_secs(), 5);
        assert_eq!(track.tunnel_expiry(), Some(quiet + Duration::from_secs(5)));
        drop(io);
        let mut out = Vec::new();
        rd.read_to_end(&mut out).await.expect("read");
        assert_eq!(out, b"HTTP/1.1 101 Switching Protocols\r\n\r\ndown");

        // The connection counts as open until the tunnel is gone.
        let waiting = Arc::clone(&track);
        let closed = tokio::spawn(async move { waiting.tunnel_closed().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!closed.is_finished());
        drop(open);
        closed.await.expect("join");
        track.tunnel_closed().await;
        Track::new(deadlines(1, 5)).tunnel_closed().await;
    }

    #[tokio::test(start_paused = true)]
    async fn with_scanning_off_reads_start_the_head_and_a_handed_over_head_is_scanned_whole() {
        let (mut client, server) = tokio::io::duplex(1024);
        let track = Track::new(deadlines(10, 60));
        let mut io = ClientIo::new(server, Arc::clone(&track));
        track.set_scanning(false);
        let mut buf = [0u8; 128];
        // The first bytes start the head phase (and its deadline) as before.
        client
            .write_all(b"POST / HTTP/1.1\r\n")
            .await
            .expect("write");
        let a = io.read(&mut buf).await.expect("read");
        assert_eq!(track.waiting_deadline(), None);
        assert_eq!(track.park_at(), None);
        // The head's end is not looked for while the own loop parses heads.
        client
            .write_all(b"Content-Length: 3\r\n\r\n")
            .await
            .expect("write");
        let b = io.read(&mut buf[a..]).await.expect("read");
        // Handed to hyper: the bytes read so far are scanned from their start, once.
        track.set_scanning(true);
        track.scan_head(&buf[..a + b]);
        track.scan_head(&buf[..a + b]);
        let verdict = track.begin();
        assert!(verdict.content_length);
        assert!(!verdict.transfer_encoding);
        // A head that reached the service is not scanned again.
        track.end();
        track.scan_head(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(track.begin(), Verdict::default());
        track.end();
        // Without the handover, a whole head read with scanning off is not scanned.
        track.set_scanning(false);
        client
            .write_all(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .await
            .expect("write");
        assert!(io.read(&mut buf).await.expect("read") > 0);
        assert_eq!(track.begin(), Verdict::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_may_be_parked_only_when_idle_and_a_replay_starts_a_head() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut d = deadlines(10, 60);
        d.park_after = Duration::from_secs(1);
        let track = Track::new(d);
        let mut io = ClientIo::new(server, Arc::clone(&track));
        // A fresh connection waiting for its first byte may be parked.
        let t0 = Instant::now();
        assert_eq!(track.park_at(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(track.waiting_deadline(), Some(t0 + Duration::from_secs(10)));
        // Part of a head: not parked (hyper holds the bytes).
        client.write_all(b"GET / HT").await.expect("write");
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.expect("read") > 0);
        assert_eq!(track.park_at(), None);
        assert_eq!(track.waiting_deadline(), None);
        client.write_all(b"TP/1.1\r\n\r\n").await.expect("write");
        assert!(io.read(&mut buf).await.expect("read") > 0);
        // In flight (on HTTP/1 until the answer's body is done): not parked.
        track.begin();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(track.park_at(), None);
        track.end();
        // Idle after an answer: parked a second later; closed at idle_timeout.
        let idle = Instant::now();
        assert_eq!(track.park_at(), Some(idle + Duration::from_secs(1)));
        assert_eq!(
            track.waiting_deadline(),
            Some(idle + Duration::from_secs(60))
        );
        // Bytes handed back by a parked hyper connection are the start of a head: they
        // are scanned, start the head deadline, and forbid parking until it is whole.
        tokio::time::sleep(Duration::from_secs(3)).await;
        io.replay(bytes::Bytes::from_static(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\n",
        ));
        assert_eq!(track.park_at(), None);
        let n = io.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"POST / HTTP/1.1\r\nContent-Length: 3\r\n");
        client
            .write_all(b"Transfer-Encoding: chunked\r\n\r\n")
            .await
            .expect("write");
        assert!(io.read(&mut buf).await.expect("read") > 0);
        let verdict = track.begin();
        assert!(
            verdict.ambiguous_framing(),
            "both framing headers seen: {verdict:?}"
        );
        track.end();
        // A tunnel is never parked.
        let _tunnel = track.tunnel();
        assert_eq!(track.park_at(), None);
    }
}
