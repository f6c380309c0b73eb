//! launchday's own HTTP/1.1 server loop for simple requests; hyper serves the rest.
//!
//! Nearly every request on launch day is a `GET` without a body on a keep-alive
//! connection, and most of them are answered from memory (the maintenance page, a
//! snapshot, a redirect) or by the upstream fast path. For those, hyper's general
//! machinery (its connection state, dispatcher and header encoder) cost more than
//! the rest of the request path together (callgrind: ~8,500 of 13,800 instructions
//! per maintenance page). This loop reads a head, parses it with httparse, calls the
//! same service ([`Proxy::handle`]) and writes the answer itself.
//!
//! Invariants:
//! - **Only simple requests.** HTTP/1.1, origin-form target, no `CONNECT`, at most
//!   `max_headers` (and [`MAX_FIELDS`]) header fields within `max_header_bytes`, and none of
//!   `Content-Length`, `Transfer-Encoding`, `Upgrade`, `Expect`, `TE`, or a
//!   `Connection` other than `keep-alive`. Anything else (a body, an upgrade, HTTP/1.0,
//!   a malformed or oversized head) is handed to hyper untouched: the bytes read go
//!   back to the stream (`ClientIo::give_back`) and hyper parses, rejects (`400`,
//!   `431`) or serves them exactly as it did before this path existed. A request is
//!   never half-served by both.
//! - **Same answers as hyper.** Status line, lower-case header names, `date`,
//!   `content-length` from the body's exact size (or `transfer-encoding: chunked`),
//!   no body for `HEAD`, `204` and `304`, `connection: close` when the connection will
//!   close. A body that ends early or fails closes the connection (the client sees
//!   a short answer, never a wrong next one).
//! - **Same connection rules.** Every byte goes through [`ClientIo`], and the same
//!   header and idle deadlines and `408` apply (`Track::read_deadline`), kept by
//!   this loop with its one timer per connection, which also parks: the stream's
//!   own deadline timer is off while this loop reads (one timer touched per request
//!   instead of two). The raw head scan is off
//!   while this loop parses the heads itself (httparse finds their end); a head it
//!   hands to hyper is scanned whole first, so hyper's path sees the same verdict.
//!   A request is in flight (for parking and shutdown) from its head until its
//!   answer is written. Bytes of a next request that arrived meanwhile start the
//!   next head afterwards (`Track::rescan`). A client that closes while its request waits (say in a
//!   pool's queue) cancels the request, which leaves the queue. On shutdown an idle
//!   connection closes and a busy one closes after its answer (`connection: close`);
//!   a connection is not told to stop before its first request (the head deadline
//!   bounds it). An idle plain connection parks after [`crate::park::PARK_AFTER`].
//! - **No read buffer while idle.** Between requests the connection's empty read
//!   buffer goes back to its worker, and the next bytes are read into the worker's
//!   warm one ([`read_warm`], [`crate::recycle::take_in`]): in steady state all of a
//!   worker's connections read into the same memory.
//! - **Nothing is allocated per request by this loop** in steady state. The
//!   request's header map comes from this worker's reused maps ([`crate::recycle`])
//!   and the answer's goes back to them once encoded; the read buffer is reclaimed
//!   once the request's head is dropped, the write buffer is reused, and a
//!   maintenance page's header lines come encoded ([`Body::Page`]).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::SystemTime;

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body::{Body, ReqBody};
use crate::config::LimitsSpec;
use crate::conn::{ClientIo, InFlight, Track, Verdict};
use crate::headers::Forwarded;
use crate::listener::Counted;
use crate::park::{Parkable, Wake};
use crate::proxy::{Proxy, Wire};
use crate::upstream_h1::{has_token, parse_length};

/// Heads with more header fields than this go to hyper (which applies
/// `max_headers`). Browsers send 10 to 20.
pub const MAX_FIELDS: usize = 64;
/// Read buffer growth step.
const READ_CHUNK: usize = 4096;
/// A streamed answer is written whenever this much is buffered.
const FLUSH_AT: usize = 64 * 1024;

/// Why [`serve`] returned.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// The connection is over (closed by either side, timed out, or shut down).
    Closed,
    /// A request this loop does not serve: its bytes were given back to the stream,
    /// for hyper.
    Handoff,
}

/// Serves simple requests on `io` until the connection ends or a request needs
/// hyper. `served`: a request was already answered on this connection (then a
/// shutdown closes it while idle).
pub(crate) async fn serve<I>(
    io: &mut ClientIo<I>,
    proxy: &Proxy,
    fwd: &Forwarded,
    limits: &LimitsSpec,
    stop: &mut watch::Receiver<bool>,
    parked: &prometheus::IntGauge,
    mut served: bool,
) -> io::Result<Exit>
where
    I: AsyncRead + AsyncWrite + Parkable + Unpin,
{
    let track = Arc::clone(io.track());
    // This loop parses every head itself; one it hands to hyper is scanned then.
    track.set_scanning(false);
    let max_head = limits.max_header_bytes;
    // More fields than either limit: hyper's (it answers 431 above `max_headers`).
    let max_fields = limits.max_headers.min(MAX_FIELDS);
    let mut buf = BytesMut::new();
    // One timer and one shutdown watch for the connection's life, re-armed rather
    // than registered anew for every request. The timer serves both parking and the
    // connection's deadlines (head and idle): the stream's own timer stays unused
    // while this loop reads ([`ClientIo::set_caller_deadlines`]).
    io.set_caller_deadlines(true);
    let look = tokio::time::sleep_until(Instant::now() + track.park_after());
    tokio::pin!(look);
    // Whether `look` went off since it was last set (kept here, so that the timer's
    // own state is not read for every request).
    let mut look_fired = false;
    let mut watch = stop.clone();
    let stopped = async move { watch.wait_for(|stopped| *stopped).await.is_ok() };
    tokio::pin!(stopped);
    // The listener's stop, read per answer.
    let mut stopping = Stopping::new(stop.clone());
    // Whether this connection's last answer waited (a back end's answer, a queue):
    // its next request skips the maintenance shortcut ([`begin`]).
    let mut waited = false;
    // A request for the handler, or an answer that is not a prebuilt page: kept
    // apart from `Ready` so that a page's way never moves them ([`begin`]).
    let mut held = Held::default();
    loop {
        // What the next request asks for, decided without awaiting, so that a
        // request answered at once lives and dies on the stack (warm) instead of in
        // this loop's future (cold by the connection's next turn when many
        // connections take turns): only the small `Ready` is kept across awaits,
        // and the request goes to `held` (written only when the handler needs it).
        let (ready, in_flight) = loop {
            if !buf.is_empty() {
                // No await in this match: the parsed request is not kept in the future.
                match parse(&mut buf, max_head, max_fields) {
                    Parsed::Simple(req) => {
                        break begin(req, &track, proxy, fwd, waited, &mut stopping, &mut held);
                    }
                    Parsed::Other => {
                        track.set_scanning(true);
                        track.scan_head(&buf);
                        io.give_back(buf.freeze());
                        io.set_caller_deadlines(false);
                        return Ok(Exit::Handoff);
                    }
                    Parsed::Partial => {}
                }
                // The rest of the head, within the head's deadline.
                buf.reserve(READ_CHUNK);
                let n = loop {
                    let Some((deadline, answer)) = track.read_deadline() else {
                        break io.read_buf(&mut buf).await?;
                    };
                    if look.deadline() != deadline {
                        look.as_mut().reset(deadline);
                        look_fired = false;
                    }
                    tokio::select! {
                        biased;
                        n = io.read_buf(&mut buf) => break n?,
                        () = &mut look => {
                            look_fired = true;
                            if deadline <= Instant::now() {
                                if answer {
                                    io.request_timeout().await;
                                }
                                return Ok(Exit::Closed);
                            }
                        }
                    }
                };
                if n == 0 {
                    return Ok(Exit::Closed);
                }
                continue;
            }
            // Idle between requests: once nothing is there to read, the empty buffer
            // goes back to the worker, and the next bytes go to the worker's warm one
            // ([`read_warm`]).
            let park = loop {
                // The earlier of parking and the idle deadline (`header_timeout` on a
                // fresh connection, `idle_timeout` after an answer).
                let (park_at, expire) = track.idle_times();
                let park_at = park_at.filter(|_| I::PARKS);
                let at = match (park_at, expire) {
                    (Some(p), Some(e)) => p.min(e),
                    // Busy: look again later.
                    (p, e) => p
                        .or(e)
                        .unwrap_or_else(|| Instant::now() + track.park_after()),
                };
                // Between requests these only move later, so the timer is moved only
                // once it has gone off (early, then), not once per request; or when it
                // is set later than now needed (after a head's deadline).
                if (look_fired && look.deadline() != at) || look.deadline() > at {
                    look.as_mut().reset(at);
                    look_fired = false;
                }
                tokio::select! {
                    biased;
                    n = read_warm(io, &mut buf) => {
                        if n? == 0 {
                            return Ok(Exit::Closed);
                        }
                        break false;
                    }
                    _ = &mut stopped, if served => return Ok(Exit::Closed),
                    () = &mut look => {
                        look_fired = true;
                        let now = Instant::now();
                        let (park_at, expire) = track.idle_times();
                        if expire.is_some_and(|at| at <= now) {
                            return Ok(Exit::Closed);
                        }
                        if I::PARKS && park_at.is_some_and(|at| at <= now) {
                            break true;
                        }
                    }
                }
            };
            if park {
                // Idle long enough: wait in the kernel (the read buffer is the
                // worker's already).
                let _parked = Counted::new(parked);
                match crate::park::wait(io, stop).await {
                    Wake::Readable => {}
                    Wake::Expired | Wake::Stopped => return Ok(Exit::Closed),
                }
            }
        };
        served = true;
        let keep = match ready {
            Ready::Page { whole, close } => {
                io.write_all(&whole).await?;
                io.flush().await?;
                !close
            }
            Ready::Now => {
                let Some((resp, head)) = held.now.take() else {
                    return Err(unheld());
                };
                write(io, resp, head, stopping.keep).await?
            }
            Ready::Handle => {
                let Some((req, verdict, head)) = held.request.take() else {
                    return Err(unheld());
                };
                let answer = proxy.handle(req, fwd, verdict, Wire::Own);
                tokio::pin!(answer);
                let mut polls = 0u32;
                let resp = loop {
                    if buf.capacity() == buf.len() && buf.len() < max_head {
                        buf.reserve(READ_CHUNK);
                    }
                    tokio::select! {
                        biased;
                        resp = poll_fn(|cx| {
                            polls += 1;
                            answer.as_mut().poll(cx)
                        }) => break resp,
                        // Watch for the client leaving while its request waits (pipelined
                        // bytes are kept for later, up to one head's worth).
                        n = io.read_buf(&mut buf), if buf.len() < max_head => {
                            if n? == 0 {
                                return Ok(Exit::Closed);
                            }
                        }
                    }
                };
                waited = polls > 1;
                write(io, resp, head, stopping.keep_alive()).await?
            }
        };
        drop(in_flight);
        if !keep {
            let _ = io.shutdown().await;
            return Ok(Exit::Closed);
        }
        if !buf.is_empty() {
            track.rescan(&buf);
        }
    }
}

/// A parsed request's next step ([`begin`]). Small on purpose: it is kept in the
/// connection's future across the answer's write, and moving a value as large as
/// a request there for every page would write lines that are cold by the
/// connection's next turn when many connections take turns.
enum Ready {
    /// The whole answer's bytes, and whether the connection closes after them.
    Page { whole: bytes::Bytes, close: bool },
    /// An answer decided at once that is not a whole prebuilt page (`HEAD`, the
    /// favicon's): in [`Held::now`].
    Now,
    /// For the handler ([`Proxy::handle`]): in [`Held::request`].
    Handle,
}

/// What [`begin`] leaves for the connection's loop besides a whole page, each in a
/// slot of its own that the loop empties in a statement of its own: the value then
/// moves through the stack into the future that uses it. (Matched out of an enum,
/// it would keep the enum in the connection's future while that future waits.)
#[derive(Default)]
struct Held {
    /// An answer and whether the request was `HEAD`.
    now: Option<(Response<Body>, bool)>,
    /// A request, its verdict and whether it is `HEAD`.
    request: Option<(Request<ReqBody>, Verdict, bool)>,
}

/// The error for a `Ready` whose [`Held`] slot is empty, which [`begin`] never
/// returns (it fills the slot it names).
fn unheld() -> io::Error {
    io::Error::other("no request held for its answer")
}

/// Begins a parsed request (`Track::begin`: it is in flight until the returned
/// guard drops) and answers it at once where [`Proxy::maintenance_now`] can,
/// encoded into this worker's prebuilt page when it is one; anything else goes to
/// `held`. A connection whose last answer `waited` (proxied traffic) skips the
/// shortcut: it would only look the route up twice.
fn begin(
    mut req: Request<ReqBody>,
    track: &Arc<Track>,
    proxy: &Proxy,
    fwd: &Forwarded,
    waited: bool,
    stopping: &mut Stopping,
    held: &mut Held,
) -> (Ready, InFlight) {
    let head = req.method() == Method::HEAD;
    let verdict = track.begin();
    let in_flight = InFlight(Arc::clone(track));
    let now = if waited {
        None
    } else {
        proxy.maintenance_now(&mut req, fwd, verdict)
    };
    let Some(resp) = now else {
        held.request = Some((req, verdict, head));
        return (Ready::Handle, in_flight);
    };
    drop(req);
    let keep_alive = stopping.keep_alive();
    if let (
        false,
        true,
        Body::Page {
            head: lines,
            body: Some(page),
        },
    ) = (head, resp.headers().is_empty(), resp.body())
    {
        let mut out = crate::recycle::take_out();
        let cached = cached_page(resp.status(), lines, page, keep_alive, &mut out);
        crate::recycle::give_out(out);
        if let Some((whole, close)) = cached {
            crate::recycle::give(resp.into_parts().0.headers);
            return (Ready::Page { whole, close }, in_flight);
        }
    }
    held.now = Some((resp, head));
    (Ready::Now, in_flight)
}

/// The listener's stop, read per answer: a check of the channel's version (one
/// line shared by every connection) on a receiver of the loop's own, rather than
/// a read lock through the caller's receiver (cold by the connection's next turn
/// when many connections take turns).
struct Stopping {
    flag: watch::Receiver<bool>,
    /// The answer last checked may keep the connection open.
    keep: bool,
}

impl Stopping {
    fn new(mut flag: watch::Receiver<bool>) -> Self {
        let keep = !*flag.borrow_and_update();
        Stopping { flag, keep }
    }

    /// Whether the connection may stay open after this answer: not once the
    /// listener is stopping.
    fn keep_alive(&mut self) -> bool {
        if self.keep && self.flag.has_changed().unwrap_or(true) {
            self.keep = !*self.flag.borrow_and_update();
        }
        self.keep
    }
}

/// `io.read_buf(buf)`, except that an idle connection holds no read buffer: when
/// `buf` has none, this worker's warm one is taken for the read
/// ([`crate::recycle::take_in`]), and given back while nothing has arrived. A
/// buffer of the connection's own would be cold by its next request once the
/// connections outnumber the cache.
fn read_warm<'a, I>(
    io: &'a mut ClientIo<I>,
    buf: &'a mut BytesMut,
) -> impl Future<Output = io::Result<usize>> + 'a
where
    I: AsyncRead + AsyncWrite + Parkable + Unpin,
{
    poll_fn(move |cx| {
        if buf.capacity() == 0 {
            *buf = crate::recycle::take_in();
        }
        // `read_buf`'s future keeps no state between polls: a fresh one per poll
        // reads as the same one would.
        let read = std::pin::pin!(io.read_buf(&mut *buf)).poll(cx);
        if read.is_pending() && buf.is_empty() {
            crate::recycle::give_in(std::mem::take(buf));
        }
        read
    })
}

// Returned once per request and moved straight into the service: boxing the big
// variant would be an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// More bytes are needed.
    Partial,
    /// Not a simple request (or not a valid one): hyper's.
    Other,
    Simple(Request<ReqBody>),
}

/// Header names that make a request hyper's.
fn not_simple(name: &str, value: &[u8]) -> bool {
    match name.len() {
        2 => name.eq_ignore_ascii_case("te"),
        6 => name.eq_ignore_ascii_case("expect"),
        7 => name.eq_ignore_ascii_case("upgrade"),
        10 => name.eq_ignore_ascii_case("connection") && !value.eq_ignore_ascii_case(b"keep-alive"),
        14 => name.eq_ignore_ascii_case("content-length"),
        17 => name.eq_ignore_ascii_case("transfer-encoding"),
        _ => false,
    }
}

/// Parses the head at the start of `buf`; on success the head's bytes are taken
/// out of `buf` (the request's header values share them).
fn parse(buf: &mut BytesMut, max_head: usize, max_fields: usize) -> Parsed {
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
    // Start and end of each field's name and value, and of the target.
    let mut at = [[0u32; 4]; MAX_FIELDS];
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let (len, method, target, n) = match req
        .parse_with_uninit_headers(&buf[..], &mut fields[..max_fields])
    {
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Parsed::Partial,
        Ok(httparse::Status::Complete(len)) if len <= max_head => {
            let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
                return Parsed::Other;
            };
            if method == "CONNECT" || !path.starts_with('/') {
                return Parsed::Other;
            }
            for (i, h) in req.headers.iter().enumerate() {
                if not_simple(h.name, h.value) {
                    return Parsed::Other;
                }
                let name = offset(h.name.as_bytes());
                let value = offset(h.value);
                at[i] = [
                    name,
                    name + h.name.len() as u32,
                    value,
                    value + h.value.len() as u32,
                ];
            }
            let target = offset(path.as_bytes());
            let target = (target, target + path.len() as u32);
            let Ok(method) = Method::from_bytes(method.as_bytes()) else {
                return Parsed::Other;
            };
            (len, method, target, req.headers.len())
        }
        _ => return Parsed::Other,
    };
    let head = buf.split_to(len).freeze();
    let mut headers = crate::recycle::take(n);
    let whole = crate::recycle::with_names(|names| {
        for &[n0, n1, v0, v1] in &at[..n] {
            let (Ok(name), Ok(value)) = (
                names.name(&head[n0 as usize..n1 as usize]),
                HeaderValue::from_maybe_shared(head.slice(v0 as usize..v1 as usize)),
            ) else {
                return false;
            };
            headers.append(name, value);
        }
        true
    });
    if !whole {
        return give_up(buf, &head);
    }
    let Ok(uri) = Uri::from_maybe_shared(head.slice(target.0 as usize..target.1 as usize)) else {
        return give_up(buf, &head);
    };
    let mut req = Request::new(ReqBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Parsed::Simple(req)
}

/// A head found unusable after it left `buf`: puts it back in front of the rest.
fn give_up(buf: &mut BytesMut, head: &[u8]) -> Parsed {
    let mut all = BytesMut::with_capacity(head.len() + buf.len());
    all.put_slice(head);
    all.put_slice(buf);
    *buf = all;
    Parsed::Other
}

/// How the answer's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Exactly this many bytes (0: no body is sent at all).
    Length(u64),
    Chunked,
}

/// Writes `resp`; returns whether the connection may carry another request. The
/// answer is encoded into the worker's output buffer (taken for the answer's time,
/// given back once it is written: [`crate::recycle::take_out`]).
async fn write<I>(
    io: &mut ClientIo<I>,
    resp: Response<Body>,
    head: bool,
    keep_alive: bool,
) -> io::Result<bool>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = crate::recycle::take_out();
    let keep = write_with(io, resp, head, keep_alive, &mut out).await?;
    crate::recycle::give_out(out);
    Ok(keep)
}

/// [`write`] with the buffer given.
async fn write_with<I>(
    io: &mut ClientIo<I>,
    resp: Response<Body>,
    head: bool,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> io::Result<bool>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    if let Body::Page {
        head: lines,
        body: Some(page),
    } = &body
    {
        // A whole page, nothing added to its head: one write of this worker's
        // prebuilt answer for the second ([`crate::page_cache`]).
        if !head && parts.headers.is_empty() {
            if let Some((whole, close)) = cached_page(parts.status, lines, page, keep_alive, out) {
                crate::recycle::give(parts.headers);
                io.write_all(&whole).await?;
                io.flush().await?;
                return Ok(!close);
            }
        }
    }
    let lines = match &mut body {
        Body::Page { head, .. } => std::mem::take(head),
        _ => bytes::Bytes::new(),
    };
    let len = if body.is_end_stream() {
        None
    } else {
        Some(body.size_hint().exact())
    };
    out.clear();
    let (framing, close) = encode_head(
        parts.status,
        &parts.headers,
        &lines,
        len,
        head,
        keep_alive,
        out,
    );
    crate::recycle::give(parts.headers);
    let mut left = match framing {
        Framing::Length(0) => {
            flush(io, out).await?;
            return Ok(!close);
        }
        Framing::Length(n) => n,
        Framing::Chunked => u64::MAX,
    };
    let mut whole = true;
    loop {
        // Whatever is ready now goes out in one write with the head.
        let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        let frame = match polled {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                flush(io, out).await?;
                poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "answer body failed; closing the connection");
                whole = false;
                break;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                // Trailers are not sent (as hyper does unless the client asked).
                _ => continue,
            },
        };
        if framing == Framing::Chunked {
            write_hex(out, data.len());
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
        } else {
            let n = (data.len() as u64).min(left) as usize;
            out.extend_from_slice(&data[..n]);
            left -= n as u64;
            if n < data.len() {
                // Longer than announced: the rest is never sent.
                whole = false;
                break;
            }
        }
        if out.len() >= FLUSH_AT {
            flush(io, out).await?;
        }
    }
    match framing {
        Framing::Chunked if whole => out.extend_from_slice(b"0\r\n\r\n"),
        Framing::Length(_) if left != 0 => whole = false,
        _ => {}
    }
    flush(io, out).await?;
    Ok(whole && !close)
}

/// The whole answer for a page from [`crate::page_cache`], its head encoded by
/// [`encode_head`] as on the ordinary path (`out` is the scratch buffer).
fn cached_page(
    status: StatusCode,
    lines: &bytes::Bytes,
    page: &bytes::Bytes,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> Option<(bytes::Bytes, bool)> {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let none = HeaderMap::new();
    let encode = |status, lines: &[u8], len: usize, keep_alive, out: &mut Vec<u8>| {
        out.clear();
        let (_, close) = encode_head(
            status,
            &none,
            lines,
            Some(Some(len as u64)),
            false,
            keep_alive,
            out,
        );
        close
    };
    crate::page_cache::whole(secs, status, keep_alive, lines, page, out, &encode)
}

async fn flush<I>(io: &mut ClientIo<I>, out: &mut Vec<u8>) -> io::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    io.flush().await
}

fn write_hex(out: &mut Vec<u8>, n: usize) {
    let _ = std::io::Write::write_fmt(out, format_args!("{n:x}\r\n"));
}

/// Encodes the status line and headers as hyper's server does (RFC 9112 §6), then
/// `lines` (header lines encoded in advance, [`Body::Page`]): returns the body's
/// framing and whether the connection closes after it.
fn encode_head(
    status: StatusCode,
    headers: &HeaderMap,
    lines: &[u8],
    len: Option<Option<u64>>,
    head: bool,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> (Framing, bool) {
    if status.is_informational() {
        // Never made for a request without `Upgrade`; hyper answers 500 and closes.
        out.extend_from_slice(
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n",
        );
        date(out);
        out.extend_from_slice(b"\r\n");
        return (Framing::Length(0), true);
    }
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    let can_body = !head && !bodiless;
    let mut framing = None;
    let mut close = !keep_alive;
    let mut said_close = false;
    let mut dated = false;
    for (name, value) in headers {
        match *name {
            header::CONTENT_LENGTH => {
                if framing.is_some() {
                    continue;
                }
                match len {
                    Some(Some(n)) => framing = Some(Framing::Length(n)),
                    Some(None) => match parse_length(value.as_bytes()) {
                        Some(n) => framing = Some(Framing::Length(n)),
                        None => continue,
                    },
                    // No body: only a HEAD answer keeps its length.
                    None if head => framing = Some(Framing::Length(0)),
                    None => continue,
                }
            }
            header::TRANSFER_ENCODING => {
                if !can_body || framing.is_some() {
                    continue;
                }
                framing = Some(Framing::Chunked);
                out.extend_from_slice(b"transfer-encoding: ");
                out.extend_from_slice(value.as_bytes());
                if !value.as_bytes().ends_with(b"chunked") {
                    out.extend_from_slice(b", chunked");
                }
                out.extend_from_slice(b"\r\n");
                continue;
            }
            header::CONNECTION if has_token(value, b"close") => {
                close = true;
                said_close = true;
            }
            header::DATE => dated = true,
            header::TRAILER if !can_body => continue,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(lines);
    let framing = match framing {
        Some(f) => f,
        None => match len {
            Some(None) if can_body => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
            Some(None) => Framing::Length(0),
            Some(Some(n)) if n != 0 || !head => {
                if !bodiless {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                Framing::Length(n)
            }
            _ => {
                if !bodiless && !head {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Framing::Length(0)
            }
        },
    };
    if close && !said_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !dated {
        date(out);
    }
    out.extend_from_slice(b"\r\n");
    let framing = if can_body {
        framing
    } else {
        Framing::Length(0)
    };
    (framing, close)
}

thread_local! {
    /// The `date` header line of the current second (formatting it costs more than
    /// the rest of the head).
    static DATE: std::cell::RefCell<(u64, Vec<u8>)> = const { std::cell::RefCell::new((0, Vec::new())) };
}

fn date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, line)| {
        if *at != secs || line.is_empty() {
            *at = secs;
            line.clear();
            line.extend_from_slice(b"date: ");
            line.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
            line.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(line);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let p = parse(&mut buf, 8192, 16);
        (p, buf)
    }

    fn simple(bytes: &[u8]) -> (Request<ReqBody>, BytesMut) {
        match parsed(bytes) {
            (Parsed::Simple(req), rest) => (req, rest),
            (Parsed::Partial, _) => panic!("partial: {:?}", String::from_utf8_lossy(bytes)),
            (Parsed::Other, _) => panic!("other: {:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn is_other(bytes: &[u8]) -> bool {
        matches!(parsed(bytes).0, Parsed::Other)
    }

    #[test]
    fn a_simple_head_becomes_a_request_and_leaves_the_rest() {
        let (req, rest) = simple(
            b"GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\nAccept-Encoding: gzip, br\r\nX-Custom: v\r\n\r\nGET /next",
        );
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/a/b");
        assert_eq!(req.uri().query(), Some("c=d"));
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "example.com");
        assert_eq!(req.headers()["accept-encoding"], "gzip, br");
        assert_eq!(req.headers()["x-custom"], "v");
        assert_eq!(req.headers().len(), 3);
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn repeated_fields_stay_in_order_and_keep_alive_is_simple() {
        let (req, _) = simple(
            b"HEAD / HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: b=2\r\nConnection: Keep-Alive\r\n\r\n",
        );
        assert_eq!(req.method(), Method::HEAD);
        let cookies: Vec<_> = req.headers().get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
    }

    #[test]
    fn an_incomplete_head_asks_for_more_until_the_limit() {
        assert!(matches!(
            parsed(b"GET / HTTP/1.1\r\nHost: h\r\n").0,
            Parsed::Partial
        ));
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(8192, b'a');
        assert!(
            is_other(&long),
            "a head that fills max_header_bytes is hyper's (431)"
        );
    }

    #[test]
    fn requests_that_are_not_simple_are_left_to_hyper() {
        for head in [
            &b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"[..],
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nconnection: close\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nTE: trailers\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: h\r\n\r\n",
            b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
            b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
        ] {
            assert!(is_other(head), "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn more_fields_than_max_headers_is_hyper_s() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..17 {
            head.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        assert!(is_other(&head));
    }

    #[test]
    fn a_head_refused_after_httparse_leaves_the_buffer_as_it_was() {
        // httparse takes this target; `http::Uri` refuses it (longer than 65,534
        // bytes), after the head was split off the buffer: it is put back whole, for
        // hyper, with the next head after it.
        let mut bytes = b"GET /".to_vec();
        bytes.resize(70_000, b'a');
        bytes.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        let mut fields = [httparse::EMPTY_HEADER; 4];
        let status = httparse::Request::new(&mut fields).parse(&bytes);
        assert!(matches!(status, Ok(httparse::Status::Complete(_))));
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(
            parse(&mut buf, 128 * 1024, MAX_FIELDS),
            Parsed::Other
        ));
        assert_eq!(&buf[..], &bytes[..]);
    }

    fn encoded(
        status: u16,
        headers: &[(&str, &str)],
        len: Option<Option<u64>>,
        head: bool,
        keep_alive: bool,
    ) -> (String, Framing, bool) {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                http::header::HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let mut out = Vec::new();
        let status = StatusCode::from_u16(status).expect("status");
        let (framing, close) = encode_head(status, &map, b"", len, head, keep_alive, &mut out);
        (String::from_utf8(out).expect("ascii"), framing, close)
    }

    #[test]
    fn a_known_length_is_announced_and_a_date_added() {
        let (text, framing, close) =
            encoded(503, &[("retry-after", "30")], Some(Some(4105)), false, true);
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\nretry-after: 30\r\ncontent-length: 4105\r\ndate: "), "{text}");
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
        assert_eq!((framing, close), (Framing::Length(4105), false));
        let (text, ..) = encoded(200, &[], Some(Some(1)), false, true);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    }

    #[test]
    fn an_unknown_length_is_chunked_and_a_given_length_is_kept() {
        let (text, framing, _) = encoded(200, &[], Some(None), false, true);
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert_eq!(framing, Framing::Chunked);
        let (text, framing, _) = encoded(200, &[("content-length", "7")], Some(None), false, true);
        assert_eq!(text.matches("content-length").count(), 1, "{text}");
        assert_eq!(framing, Framing::Length(7));
        let (text, framing, _) = encoded(
            200,
            &[("transfer-encoding", "gzip")],
            Some(None),
            false,
            true,
        );
        assert!(
            text.contains("transfer-encoding: gzip, chunked\r\n"),
            "{text}"
        );
        assert_eq!(framing, Framing::Chunked);
    }

    #[test]
    fn no_body_goes_out_for_head_204_and_304() {
        let (text, framing, _) = encoded(503, &[], Some(Some(4105)), true, true);
        assert!(
            text.contains("content-length: 4105\r\n"),
            "HEAD keeps the length: {text}"
        );
        assert_eq!(framing, Framing::Length(0));
        for status in [204, 304] {
            let (text, framing, _) = encoded(status, &[], Some(Some(5)), false, true);
            assert!(!text.contains("content-length"), "{text}");
            assert_eq!(framing, Framing::Length(0));
        }
        let (text, framing, _) = encoded(204, &[], None, false, true);
        assert!(!text.contains("content-length"), "{text}");
        assert_eq!(framing, Framing::Length(0));
        let (text, _, _) = encoded(404, &[], None, false, true);
        assert!(text.contains("content-length: 0\r\n"), "{text}");
    }

    #[test]
    fn closing_is_said_once() {
        let (text, _, close) = encoded(200, &[], Some(Some(1)), false, false);
        assert!(close);
        assert!(text.contains("connection: close\r\n"), "{text}");
        let (text, _, close) = encoded(200, &[("connection", "close")], Some(Some(1)), false, true);
        assert!(close);
        assert_eq!(text.matches("connection").count(), 1, "{text}");
        let (_, _, close) = encoded(
            200,
            &[("connection", "keep-alive")],
            Some(Some(1)),
            false,
            true,
        );
        assert!(!close);
    }

    #[test]
    fn an_informational_answer_becomes_a_500_that_closes() {
        let (text, framing, close) = encoded(101, &[("upgrade", "x")], None, false, true);
        assert!(text.starts_with("HTTP/1.1 500 "), "{text}");
        assert_eq!((framing, close), (Framing::Length(0), true));
    }

    fn outcome(p: &Parsed) -> String {
        match p {
            Parsed::Partial => "partial".into(),
            Parsed::Other => "other".into(),
            Parsed::Simple(r) => format!("{} {} {:?}", r.method(), r.uri(), r.headers()),
        }
    }

    proptest::proptest! {
        // Arbitrary bytes never panic, and a head is either hyper's, incomplete, or a
        // request whose every field came from the bytes.
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let (p, rest) = parsed(&bytes);
            if let Parsed::Simple(req) = &p {
                proptest::prop_assert!(rest.len() < bytes.len());
                for (name, value) in req.headers() {
                    proptest::prop_assert!(!not_simple(name.as_str(), value.as_bytes()));
                }
            } else {
                proptest::prop_assert_eq!(&rest[..], &bytes[..]);
            }
        }

        // A head arriving in two pieces parses as it does whole.
        #[test]
        fn a_head_in_two_pieces_parses_as_whole(
            path in "/[a-z0-9/?=&.%-]{0,40}",
            fields in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,12}", "[ -~]{0,30}"), 0..12),
            cut in 0usize..400,
        ) {
            let mut head = format!("GET {path} HTTP/1.1\r\nHost: h\r\n");
            for (n, v) in &fields {
                head.push_str(&format!("{n}: {}\r\n", v.trim()));
            }
            head.push_str("\r\n");
            let whole = outcome(&parsed(head.as_bytes()).0);
            let cut = cut.min(head.len());
            let mut buf = BytesMut::from(&head.as_bytes()[..cut]);
            let first = parse(&mut buf, 8192, 16);
            let got = if matches!(first, Parsed::Partial) {
                buf.extend_from_slice(&head.as_bytes()[cut..]);
                outcome(&parse(&mut buf, 8192, 16))
            } else {
                outcome(&first)
            };
            proptest::prop_assert_eq!(got, whole);
        }
    }
}
