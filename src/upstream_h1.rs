//! The fast path to a back end: one HTTP/1.1 exchange for a request without a body,
//! written and read by launchday itself on a pooled connection, inside the task of the
//! client's request.
//!
//! Why: hyper's client runs each back-end connection as a task of its own, reached
//! through channels, so a proxied request crossed three tasks and two channels and its
//! answer was parsed into hyper's types on the way; measured with callgrind that was
//! about 15k of the 40k user-space instructions of a proxied GET (`BENCHMARKS.md`).
//! Requests with a body and upgrade requests still go through hyper's client
//! ([`crate::upstream`]): streaming a body up while watching for an early answer, and
//! handing a switched stream to a tunnel, are where hyper's client earns its cost.
//!
//! What is implemented (RFC 9112):
//! - the request head, encoded from the already-rewritten request (nothing added:
//!   `Host` and the forwarding headers were set by the proxy), leaves in one `write`;
//! - the answer's head is parsed by httparse: at most [`MAX_HEADERS`] fields and
//!   [`MAX_HEAD`] bytes, obs-fold refused, interim `1xx` answers skipped, a `101` refused
//!   (no upgrade was asked for);
//! - body framing per §6.3: none for `HEAD`, `204` and `304`; `Transfer-Encoding` whose
//!   last coding is `chunked` → chunked (a `Content-Length` beside it is removed and the
//!   connection is not reused, §6.1); any other transfer coding → until close; one valid
//!   `Content-Length` (repeats must agree, else the answer is refused) → that many bytes;
//!   nothing → until close;
//! - chunked decoding with bounded size lines and a bounded trailer section (trailers are
//!   read and dropped, like nginx does for HTTP/1.1 clients).
//!
//! Invariants:
//! - A connection goes back to the idle stack only from [`RawBody`], at the exact end of
//!   a well-framed answer, with nothing extra buffered, and when the answer allows
//!   keep-alive (no `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`).
//!   An error, a short read, a stray byte or a body dropped midway closes it.
//! - An idle connection is checked before reuse for a close (or unasked bytes) the
//!   reactor saw while it was idle, with no syscall when nothing happened.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::upstream::Upstream;
use crate::upstream_io::{Activity, UpstreamIo};

/// Most header fields accepted in an answer's head (hyper's client default too).
pub const MAX_HEADERS: usize = 100;
/// Largest answer head accepted, in bytes.
pub const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section read (and dropped).
const MAX_TRAILERS: usize = 16 * 1024;
/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;

/// Why an exchange on the fast path failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The connection ended before any byte of an answer.
    #[error("connection closed before any answer byte")]
    ClosedBeforeAnswer,
    #[error("connection closed in the middle of the answer's head")]
    ClosedInHead,
    #[error("answer head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid answer head: {0}")]
    Parse(httparse::Error),
    #[error("invalid answer header field `{0}`")]
    BadHeader(String),
    #[error("`101 Switching Protocols` to a request that asked for no upgrade")]
    UnaskedSwitch,
    #[error("invalid or conflicting Content-Length")]
    BadLength,
    #[error("invalid chunked body: {0}")]
    Chunked(&'static str),
    #[error("connection closed before the answer's body ended")]
    ClosedInBody,
}

/// A kept-alive connection to a back end, driven by the task that uses it. Boxed
/// once per connection, so that the request futures and bodies that carry it stay
/// small (they are kept inside every client connection's task).
pub struct RawConn(Box<ConnState>);

/// What a [`RawConn`] holds (its fields are private to this module).
pub struct ConnState {
    io: UpstreamIo<TcpStream>,
    activity: Arc<Activity>,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// The encoded request head (kept for its capacity).
    wbuf: Vec<u8>,
    /// Where each field of the answer's head is (kept for its capacity: an array on
    /// the stack would be zeroed on every answer, ~3k instructions).
    spans: Vec<Span>,
}

/// Offsets of a field's name and value in an answer's head.
type Span = [usize; 4];

impl std::ops::Deref for RawConn {
    type Target = ConnState;
    fn deref(&self) -> &ConnState {
        &self.0
    }
}

impl std::ops::DerefMut for RawConn {
    fn deref_mut(&mut self) -> &mut ConnState {
        &mut self.0
    }
}

impl std::fmt::Debug for RawConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawConn")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl RawConn {
    pub fn new(stream: TcpStream) -> Self {
        let activity = Arc::new(Activity::default());
        Self::from_io(UpstreamIo::new(stream, Arc::clone(&activity)), activity)
    }

    /// A connection whose stream was lent to hyper's client and came back clean.
    pub fn from_io(io: UpstreamIo<TcpStream>, activity: Arc<Activity>) -> Self {
        RawConn(Box::new(ConnState {
            io,
            activity,
            buf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::with_capacity(1024),
            spans: Vec::new(),
        }))
    }

    /// The stream and its pause-limit state, to lend to hyper's client (an idle
    /// connection has nothing buffered).
    pub fn into_io(self) -> (UpstreamIo<TcpStream>, Arc<Activity>) {
        let state = *self.0;
        (state.io, state.activity)
    }

    /// The pause limits of this connection's stream.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Whether the back end closed this idle connection (or sent bytes nobody asked
    /// for). Costs no syscall unless the reactor saw the socket become readable.
    pub fn is_stale(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let stream = self.io.get_ref();
        match stream.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                !matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Encodes `req`'s head (origin-form target, its headers as they are).
    pub fn encode<B>(&mut self, req: &Request<B>) {
        let out = &mut self.wbuf;
        out.clear();
        out.extend_from_slice(req.method().as_str().as_bytes());
        out.push(b' ');
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        out.extend_from_slice(if target.is_empty() {
            b"/"
        } else {
            target.as_bytes()
        });
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in req.headers() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Writes the encoded head. An error here means the request did not fully leave.
    pub async fn write_head(&mut self) -> io::Result<()> {
        let s = &mut *self.0;
        s.io.write_all(&s.wbuf).await
    }

    /// Reads the answer's head (skipping interim `1xx` answers). `head_request`: the
    /// request was `HEAD`, so the answer has no body whatever its fields say.
    pub async fn read_head(&mut self, head_request: bool) -> Result<Head, ExchangeError> {
        let s = &mut *self.0;
        let mut received = false;
        loop {
            if !s.buf.is_empty() {
                received = true;
                if let Some(head) = parse(&mut s.buf, &mut s.spans, head_request)? {
                    return Ok(head);
                }
                if s.buf.len() >= MAX_HEAD {
                    return Err(ExchangeError::HeadTooLarge);
                }
            }
            s.buf.reserve(READ_CHUNK);
            match s.io.read_buf(&mut s.buf).await {
                Ok(0) if received => return Err(ExchangeError::ClosedInHead),
                Ok(0) => return Err(ExchangeError::ClosedBeforeAnswer),
                Ok(_) => {}
                Err(e) if !received && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ExchangeError::ClosedBeforeAnswer)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// An answer's head and how its body is framed.
#[derive(Debug)]
pub struct Head {
    pub response: Response<()>,
    framing: Framing,
    keep_alive: bool,
}

impl Head {
    /// The answer with its body streamed from `conn`, which goes back to `home`'s idle
    /// stack when the body ends cleanly.
    pub fn into_response(self, conn: RawConn, home: Arc<Upstream>) -> Response<RawBody> {
        let mut body = RawBody {
            conn: Some(conn),
            framing: self.framing,
            keep_alive: self.keep_alive,
            home,
        };
        if body.framing.ended() {
            body.finish();
        }
        self.response.map(|()| body)
    }
}

/// Parses one answer head from the front of `buf`, consuming it: `None` if incomplete;
/// interim `1xx` answers are consumed and skipped.
fn parse(
    buf: &mut BytesMut,
    spans: &mut Vec<Span>,
    head_request: bool,
) -> Result<Option<Head>, ExchangeError> {
    loop {
        // Offsets into `buf` of each field's name and value, taken while parsing.
        spans.clear();
        let (len, code, minor) = {
            let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut []);
            let status = httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
                .map_err(|e| match e {
                    httparse::Error::TooManyHeaders => ExchangeError::HeadTooLarge,
                    e => ExchangeError::Parse(e),
                })?;
            let httparse::Status::Complete(len) = status else {
                return Ok(None);
            };
            let base = buf.as_ptr() as usize;
            spans.extend(resp.headers.iter().map(|h| {
                [
                    h.name.as_ptr() as usize - base,
                    h.name.len(),
                    h.value.as_ptr() as usize - base,
                    h.value.len(),
                ]
            }));
            // Invariant: a complete parse sets the version and the code.
            (len, resp.code.unwrap_or(0), resp.version.unwrap_or(1))
        };
        let head = buf.split_to(len).freeze();
        let status = StatusCode::from_u16(code)
            .map_err(|_| ExchangeError::Parse(httparse::Error::Status))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ExchangeError::UnaskedSwitch);
        }
        if status.is_informational() {
            continue;
        }
        return build(&head, spans, status, minor, head_request).map(Some);
    }
}

/// The answer's head from the parsed spans of `head`.
fn build(
    head: &Bytes,
    spans: &[Span],
    status: StatusCode,
    minor: u8,
    head_request: bool,
) -> Result<Head, ExchangeError> {
    let mut headers = crate::recycle::take(spans.len());
    let mut chunked: Option<bool> = None;
    let mut length: Option<u64> = None;
    let mut close = false;
    let mut keep_alive_token = false;
    // One borrow of the worker's header names for the whole head.
    crate::recycle::with_names(|names| -> Result<(), ExchangeError> {
        for &[ns, nl, vs, vl] in spans {
            let name = names.name(&head[ns..ns + nl]).map_err(|_| {
                ExchangeError::BadHeader(String::from_utf8_lossy(&head[ns..ns + nl]).into_owned())
            })?;
            let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
                .map_err(|_| ExchangeError::BadHeader(name.to_string()))?;
            if name == header::TRANSFER_ENCODING {
                let last = value
                    .as_bytes()
                    .rsplit(|&b| b == b',')
                    .next()
                    .unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name == header::CONTENT_LENGTH {
                for part in value.as_bytes().split(|&b| b == b',') {
                    let n = parse_length(part.trim_ascii()).ok_or(ExchangeError::BadLength)?;
                    if length.is_some_and(|l| l != n) {
                        return Err(ExchangeError::BadLength);
                    }
                    length = Some(n);
                }
            } else if name == header::CONNECTION {
                close |= has_token(&value, b"close");
                keep_alive_token |= has_token(&value, b"keep-alive");
            }
            headers.append(name, value);
        }
        Ok(())
    })?;
    let mut keep_alive = !close && (minor == 1 || keep_alive_token);
    let no_body =
        head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Done
    } else if let Some(chunked) = chunked {
        // §6.1: Transfer-Encoding overrides Content-Length, and the connection closes.
        if headers.remove(header::CONTENT_LENGTH).is_some() {
            keep_alive = false;
        }
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Framing::Eof
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::Eof
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    *response.headers_mut() = headers;
    Ok(Head {
        response,
        framing,
        keep_alive,
    })
}

/// Whether a comma-separated header value (`Connection`) lists `token`.
pub fn has_token(value: &HeaderValue, token: &[u8]) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A Content-Length value: 1 to 19 digits.
pub(crate) fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// How much of the body is left, and how it is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the back end closes (never reused).
    Eof,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer bytes seen so far.
    Trailers(usize),
}

/// One step of decoding.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Data(Bytes),
    NeedMore,
    End,
}

impl Framing {
    fn ended(&self) -> bool {
        matches!(self, Framing::Done | Framing::Length(0))
    }

    /// Decodes what `buf` holds: the next data, or that more bytes are needed, or the end.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ExchangeError> {
        loop {
            match self {
                Framing::Done | Framing::Length(0) => {
                    *self = Framing::Done;
                    return Ok(Decoded::End);
                }
                Framing::Length(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(*n).unwrap_or(usize::MAX).min(buf.len());
                    *n -= take as u64;
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                Framing::Eof => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Framing::Chunked(chunk) => match chunk {
                    Chunk::Size => {
                        let Some(nl) = memchr::memchr(b'\n', buf) else {
                            if buf.len() > MAX_CHUNK_LINE {
                                return Err(ExchangeError::Chunked("chunk-size line too long"));
                            }
                            return Ok(Decoded::NeedMore);
                        };
                        if nl > MAX_CHUNK_LINE {
                            return Err(ExchangeError::Chunked("chunk-size line too long"));
                        }
                        let size = chunk_size(&buf[..nl])?;
                        buf.advance(nl + 1);
                        *chunk = if size == 0 {
                            Chunk::Trailers(0)
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(n) => {
                        if buf.is_empty() {
                            return Ok(Decoded::NeedMore);
                        }
                        let take = usize::try_from(*n).unwrap_or(usize::MAX).min(buf.len());
                        *n -= take as u64;
                        if *n == 0 {
                            *chunk = Chunk::DataEnd;
                        }
                        return Ok(Decoded::Data(buf.split_to(take).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Decoded::NeedMore);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(ExchangeError::Chunked("no CRLF after chunk data"));
                        }
                        buf.advance(2);
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailers(seen) => {
                        let Some(nl) = memchr::memchr(b'\n', buf) else {
                            if *seen + buf.len() > MAX_TRAILERS {
                                return Err(ExchangeError::Chunked("trailer section too large"));
                            }
                            return Ok(Decoded::NeedMore);
                        };
                        if buf[..nl] != *b"\r" && nl != 0 {
                            *seen += nl + 1;
                            if *seen > MAX_TRAILERS {
                                return Err(ExchangeError::Chunked("trailer section too large"));
                            }
                            buf.advance(nl + 1);
                            continue;
                        }
                        if nl == 0 {
                            return Err(ExchangeError::Chunked("bare LF ends the trailer section"));
                        }
                        buf.advance(nl + 1);
                        *self = Framing::Done;
                        return Ok(Decoded::End);
                    }
                },
            }
        }
    }
}

/// The size from a chunk-size line (without its LF): hex digits, then nothing, `;`
/// extensions or whitespace, then the CR.
fn chunk_size(line: &[u8]) -> Result<u64, ExchangeError> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or(ExchangeError::Chunked("chunk-size line not ended by CRLF"))?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ExchangeError::Chunked("no chunk size"));
    }
    if digits > 15 {
        return Err(ExchangeError::Chunked("chunk size too large"));
    }
    // RFC 9112 §7.1.1: optional whitespace, then nothing or `;` extensions.
    let rest = &line[digits..];
    let ext = rest.iter().position(|b| !matches!(b, b' ' | b'\t'));
    if ext.is_some_and(|i| rest[i] != b';') {
        return Err(ExchangeError::Chunked("invalid chunk size"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        (n << 4) | u64::from(v)
    }))
}

/// An answer's body read from its connection; see the module's invariants.
#[derive(Debug)]
pub struct RawBody {
    /// `None` once the body ended or failed.
    conn: Option<RawConn>,
    framing: Framing,
    keep_alive: bool,
    home: Arc<Upstream>,
}

impl RawBody {
    /// The body ended: the connection goes back to the idle stack if it is clean.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take() {
            conn.activity.end();
            if self.keep_alive && conn.buf.is_empty() {
                self.home.put_raw(conn);
            }
        }
    }
}

impl http_body::Body for RawBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framing.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.framing.ended() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let c = &mut *conn.0;
            c.buf.reserve(READ_CHUNK);
            let read = pin!(c.io.read_buf(&mut c.buf)).poll(cx);
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    this.conn = None;
                    if this.framing == Framing::Eof {
                        this.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(ExchangeError::ClosedInBody)));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
