//! Listening sockets and the accept loops that serve them: HTTP/1.1 on plain
//! listeners; TLS then HTTP/2 or HTTP/1.1 (by ALPN) on TLS listeners.
//!
//! Each bind address gets its own socket, made with socket2 so that we own its
//! options: `SO_REUSEADDR` (restart while old connections sit in TIME_WAIT),
//! `IPV6_V6ONLY` on IPv6 sockets (so `0.0.0.0:P` and `[::]:P` coexist as two
//! sockets), a 4096 backlog, non-blocking. `SO_REUSEPORT` is deliberately *not* set:
//! with it, a second balancer started by mistake on the same port would silently
//! share the traffic instead of failing to start. Accepted connections get
//! `TCP_NODELAY` (responses are written in one go; Nagle would only delay them).
//!
//! Invariant: an accept error (e.g. out of file descriptors) never ends the loop; it
//! is logged and the loop pauses briefly so it cannot spin.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::body::ReqBody;
use crate::coalesce::{Coalesce, InlineFirst, NewTurn, Turn};
use crate::config::LimitsSpec;
use crate::conn::{ClientIo, Deadlines, InFlight, Track, Verdict};
use crate::headers::{Forwarded, TlsInfo};
use crate::park::{Answer, Parkable};
use crate::proxy::{Proxy, Wire};

/// Listen backlog (`net.core.somaxconn` caps it).
pub const BACKLOG: i32 = 4096;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds `addr` with the options above.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ListenerError> {
    let make = || -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        TcpListener::from_std(socket.into())
    };
    make().map_err(|source| ListenerError::Bind { addr, source })
}

/// Settings of one public listener's connections.
/// Limits and trusted proxies are read from the live snapshot for each new
/// connection, so a reload changes them without restarting the loop.
#[derive(Clone)]
pub struct ServeOptions {
    /// The listener's name (to find its settings in the live snapshot).
    pub listener: Arc<str>,
    /// Present on TLS listeners.
    pub tls: Option<TlsAcceptor>,
}

/// HTTP/2 limits, set explicitly rather than left to library defaults.
pub mod h2_limits {
    /// Concurrent streams per connection.
    pub const MAX_CONCURRENT_STREAMS: u32 = 100;
    /// Header list size (uncompressed), bytes. CONTINUATION frames count against it.
    pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
    /// Streams reset by the client before we accepted them (rapid reset,
    /// CVE-2023-44487): more than this and the connection gets GOAWAY.
    pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
    /// Streams we reset because of client errors before GOAWAY.
    pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
    /// Requests a client cancels (RST_STREAM) after we started on them, once they
    /// also outnumber the answered ones: then GOAWAY and close. This is the paced
    /// form of rapid reset, which h2's pending-accept counter cannot see (each reset
    /// arrives after the stream was accepted), and which would otherwise let one
    /// connection keep far more than 100 requests busy on the back ends. Half the
    /// stream limit: the cancelled requests keep their back-end slots until the back
    /// end answers (see `upstream::send`), so together with the streams still open
    /// they stay within one connection's fair share.
    pub const MAX_CANCELLED_STREAMS: u32 = 50;
    /// Flow-control window of each stream (SETTINGS_INITIAL_WINDOW_SIZE): how much of
    /// a request body a client may send ahead of what the back end has taken. A
    /// quarter of the connection's window, so one upload cannot take all of it
    /// (hyper's default is the whole of it, 1 MiB); 256 KiB still uploads at
    /// ~2.5 MB/s per stream over a 100 ms round trip.
    pub const INITIAL_STREAM_WINDOW: u32 = 256 * 1024;
    /// Flow-control window of the connection: the most request body held unread per
    /// connection, whatever its streams (Envoy's edge recommendation, and hyper's
    /// default).
    pub const INITIAL_CONNECTION_WINDOW: u32 = 1024 * 1024;
    /// Answer bytes queued per stream beyond what the client's window lets out
    /// (hyper's default: 400 KiB). As on the HTTP/1.1 path, where 64 KiB of an answer
    /// is buffered before the next write must wait: a client that opens 100 streams
    /// and reads nothing holds at most 6.4 MiB, not 40.
    pub const MAX_SEND_BUF_SIZE: usize = 64 * 1024;
}

/// Cancelled and answered requests of one HTTP/2 connection.
#[derive(Default)]
struct Cancels {
    cancelled: std::sync::atomic::AtomicU32,
    answered: std::sync::atomic::AtomicU32,
    abuse: tokio::sync::Notify,
}

/// One request of an HTTP/2 connection: its end in the connection's [`Track`], and a
/// cancellation (dropped before its answer) counted in [`Cancels`].
struct H2Request {
    track: Arc<Track>,
    cancels: Arc<Cancels>,
    answered: bool,
}

impl Drop for H2Request {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.track.end();
        if self.answered {
            self.cancels.answered.fetch_add(1, Relaxed);
            return;
        }
        let cancelled = self.cancels.cancelled.fetch_add(1, Relaxed) + 1;
        if cancelled >= h2_limits::MAX_CANCELLED_STREAMS
            && cancelled > self.cancels.answered.load(Relaxed)
        {
            self.cancels.abuse.notify_one();
        }
    }
}

/// The answer to a connection beyond `max_connections` on a plain listener: written
/// with one non-blocking write, no parsing, no allocation.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\
Content-Length: 0\r\nRetry-After: 1\r\nX-Served-By: launchday\r\n\
X-Launchday-Error: too_many_connections\r\n\r\n";

/// Accepts connections on `listener` until `stop` resolves, serving each with `proxy`.
/// Connections are registered with `graceful` so that shutdown can drain them; the
/// loop drops its handle on `graceful` when it returns.
///
/// A connection beyond the listener's `max_connections` (counted over all its bind
/// addresses) is refused at once: a plain listener writes a fixed `503` and closes,
/// a TLS listener just closes. Accepting and refusing (rather than leaving it in the
/// backlog) keeps the backlog moving and tells the client; the open connections are
/// not touched.
pub async fn serve(
    listener: Arc<TcpListener>,
    proxy: Arc<Proxy>,
    opts: ServeOptions,
    graceful: Arc<GracefulShutdown>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let opts = Arc::new(opts);
    let counts = proxy.metrics().listener(&opts.listener);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let max = proxy.live().snapshot.limits.max_connections;
        if usize::try_from(counts.open.get()).unwrap_or(0) >= max {
            counts.refused.inc();
            if opts.tls.is_none() {
                let _ = stream.try_write(TOO_MANY_CONNECTIONS);
            }
            continue;
        }
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let proxy = Arc::clone(&proxy);
        let opts = Arc::clone(&opts);
        let open = Counted::new(&counts.open);
        let stop = stop.clone();
        let parked = counts.parked.clone();
        let conn = Conn {
            proxy,
            watcher,
            stop,
            parked,
        };
        // A task per connection, of one of two kinds: a plain connection's task has
        // no room for TLS's larger state (the handshake, rustls's session, HTTP/2),
        // and a TLS connection's none for the plain path's (an idle connection's
        // memory is mostly its task). The connection's future is made inside its
        // task: moved in, it would take its room twice.
        match opts.tls.clone() {
            None => tokio::spawn(crate::sched::tracked(async move {
                let _open = open;
                ended(peer, plain_connection(stream, peer, opts, conn).await);
            })),
            Some(acceptor) => tokio::spawn(crate::sched::tracked(async move {
                let _open = open;
                ended(
                    peer,
                    tls_connection(stream, peer, opts, acceptor, conn).await,
                );
            })),
        };
    }
}

/// How a connection ended, for the debug log.
fn ended(peer: SocketAddr, result: Result<(), ConnError>) {
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended");
    }
}

/// Counts one connection in a listener's gauge (open, parked) while it lives.
pub(crate) struct Counted(prometheus::IntGauge);

impl Counted {
    pub(crate) fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Errors that end one client connection (logged at debug level).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("PROXY protocol header: {0}")]
    ProxyProtocol(#[from] crate::proxy_protocol::ProxyProtocolError),
    #[error("PROXY protocol header timed out")]
    ProxyProtocolTimeout,
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("client connection: {0}")]
    Io(#[from] std::io::Error),
}

/// What serving one connection needs besides its stream.
struct Conn {
    proxy: Arc<Proxy>,
    /// Held while the connection lives: graceful shutdown waits for it.
    watcher: Watcher,
    /// Says when the listener stops.
    stop: tokio::sync::watch::Receiver<bool>,
    /// The listener's gauge of parked connections ([`crate::park`]).
    parked: prometheus::IntGauge,
}

/// A connection's setup, the same on plain and TLS listeners: the PROXY protocol
/// header where the listener expects one, then who the client is. Returns the
/// stream, what to forward about the client, the limits and the deadlines.
async fn setup(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    opts: &ServeOptions,
    conn: &Conn,
) -> Result<(TcpStream, Forwarded, LimitsSpec, Deadlines), ConnError> {
    // One config for the whole setup of the connection.
    let live = conn.proxy.live();
    let limits = live.snapshot.limits.clone();
    let proxy_protocol = live
        .snapshot
        .listeners
        .iter()
        .find(|l| *l.name == *opts.listener)
        .is_some_and(|l| l.proxy_protocol);
    if proxy_protocol {
        // The TCP load balancer in front speaks first; its header names the client.
        // Boxed: only such listeners pay for the reader's room in the connection.
        let read = crate::proxy_protocol::read_header(&mut stream);
        let header = match Box::pin(tokio::time::timeout(limits.header_timeout, read)).await {
            Ok(h) => h?,
            Err(_) => return Err(ConnError::ProxyProtocolTimeout),
        };
        peer = header.client(peer);
    }
    let peer_ip = peer.ip().to_canonical();
    let trusted = live
        .snapshot
        .trusted_proxies
        .iter()
        .any(|n| n.contains(&peer_ip));
    drop(live);
    let fwd = Forwarded {
        peer: peer_ip,
        // An IP address always formats as a valid header value.
        peer_ip: HeaderValue::from_str(&peer_ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        trusted,
        proto: HeaderValue::from_static("http"),
        listener: Arc::clone(&opts.listener),
        tls: None,
        track: None,
    };
    let deadlines = Deadlines::from_limits(&limits);
    Ok((stream, fwd, limits, deadlines))
}

/// A connection on a plain listener: HTTP/1.1.
async fn plain_connection(
    stream: TcpStream,
    peer: SocketAddr,
    opts: Arc<ServeOptions>,
    conn: Conn,
) -> Result<(), ConnError> {
    let (stream, fwd, limits, deadlines) = setup(stream, peer, &opts, &conn).await?;
    drop(opts);
    let errors = Some(Arc::clone(conn.proxy.unrouted()));
    let io = ClientIo::new(stream, Track::counting(deadlines, errors));
    serve_http1(io, fwd, &limits, conn).await
}

/// A connection on a TLS listener: the TLS handshake, then HTTP/2 or HTTP/1.1 by
/// ALPN.
async fn tls_connection(
    stream: TcpStream,
    peer: SocketAddr,
    opts: Arc<ServeOptions>,
    acceptor: TlsAcceptor,
    conn: Conn,
) -> Result<(), ConnError> {
    let (stream, mut fwd, limits, deadlines) = setup(stream, peer, &opts, &conn).await?;
    drop(opts);
    let tls = match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnError::Handshake(e)),
        Err(_) => return Err(ConnError::HandshakeTimeout),
    };
    let (_, session) = tls.get_ref();
    let h2 = session.alpn_protocol() == Some(b"h2");
    fwd.proto = HeaderValue::from_static("https");
    fwd.tls = Some(TlsInfo {
        sni: session.server_name().map(Box::from),
    });
    if !h2 {
        let errors = Some(Arc::clone(conn.proxy.unrouted()));
        let io = ClientIo::new(tls, Track::counting(deadlines, errors));
        return serve_http1(io, fwd, &limits, conn).await;
    }
    serve_h2(tls, conn.proxy, fwd, &limits, conn.watcher, conn.stop).await
}

/// Serves HTTP/2 on a TLS connection. The connection counts in graceful shutdown by
/// holding `watcher`; it gets GOAWAY (finishing the streams it has) when `stop` says
/// the listener stops, or when no stream was open for `idle_timeout`.
async fn serve_h2<I>(
    io: I,
    proxy: Arc<Proxy>,
    fwd: Forwarded,
    limits: &LimitsSpec,
    watcher: Watcher,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _watcher = watcher;
    let fwd_peer = fwd.peer;
    let fwd = Arc::new(fwd);
    let track = Track::new(Deadlines::from_limits(limits));
    let streams = Arc::clone(&track);
    let cancels = Arc::new(Cancels::default());
    let counted = Arc::clone(&cancels);
    let svc = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let fwd = Arc::clone(&fwd);
        streams.begin();
        let request = H2Request {
            track: Arc::clone(&streams),
            cancels: Arc::clone(&counted),
            answered: false,
        };
        async move {
            let mut request = request;
            let resp = proxy
                .handle(
                    req.map(ReqBody::Hyper),
                    &fwd,
                    Verdict::default(),
                    Wire::Hyper,
                )
                .await;
            request.answered = true;
            Ok::<_, Infallible>(resp)
        }
    });
    // Each poll of this task is a turn of the connection: what it answers goes out
    // together at the next one (crate::coalesce).
    let turn = Turn::default();
    let conn = http2::Builder::new(InlineFirst)
        .timer(TokioTimer::new())
        .max_concurrent_streams(h2_limits::MAX_CONCURRENT_STREAMS)
        .max_header_list_size(h2_limits::MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(h2_limits::MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(h2_limits::MAX_LOCAL_ERROR_RESET_STREAMS)
        .initial_stream_window_size(h2_limits::INITIAL_STREAM_WINDOW)
        .initial_connection_window_size(h2_limits::INITIAL_CONNECTION_WINDOW)
        .max_send_buf_size(h2_limits::MAX_SEND_BUF_SIZE)
        .serve_connection(
            TokioIo::new(Coalesce::new(io, turn.clone()).releasing(Arc::clone(&track))),
            svc,
        );
    tokio::pin!(conn);
    let idle = limits.idle_timeout;
    let mut draining = false;
    loop {
        let idle_at = track.idle_since().map(|since| since + idle);
        let wake = idle_at.unwrap_or_else(|| tokio::time::Instant::now() + idle);
        tokio::select! {
            r = NewTurn { fut: conn.as_mut(), turn: &turn } => return Ok(r?),
            _ = async { stop.wait_for(|stopped| *stopped).await.is_ok() }, if !draining => {
                // A closed channel means the server is gone: drain too.
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = cancels.abuse.notified() => {
                tracing::warn!(peer = %fwd_peer, "HTTP/2 client cancels most of its requests; closing");
                conn.as_mut().graceful_shutdown();
                // Streams it still has open get a moment to finish, then the
                // connection is dropped whatever the client does.
                let last = NewTurn { fut: conn.as_mut(), turn: &turn };
                let _ = tokio::time::timeout(Duration::from_secs(1), last).await;
                return Ok(());
            }
            _ = tokio::time::sleep_until(wake), if !draining => {
                let expired = track
                    .idle_since()
                    .is_some_and(|since| since + idle <= tokio::time::Instant::now());
                if expired {
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
        }
    }
}

/// Serves HTTP/1.1 on a connection, and then the tunnel its last request may have
/// switched it to ([`crate::tunnel`]). The connection counts in graceful shutdown by
/// holding `watcher` until both are over; it is told to finish its request in flight
/// and close when `stop` says the listener stops (a tunnel is not interrupted: it
/// lasts until it ends or the process exits). On a plain listener, a connection idle
/// for [`crate::park::PARK_AFTER`] is parked between requests ([`crate::park`]).
///
/// Simple requests are served by [`crate::h1_server`]; from the first request that is
/// not simple, hyper serves the connection until it is idle for `PARK_AFTER`, and then
/// the fast loop takes it back (parking it at once unless a request is already there).
async fn serve_http1<I>(
    mut io: ClientIo<I>,
    mut fwd: Forwarded,
    limits: &LimitsSpec,
    conn: Conn,
) -> Result<(), ConnError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Parkable + Unpin + Send + 'static,
{
    let Conn {
        proxy,
        watcher: _watcher,
        mut stop,
        parked,
    } = conn;
    let track = Arc::clone(io.track());
    fwd.track = Some(Arc::clone(&track));
    let fwd = Arc::new(fwd);
    // Deadlines are [`ClientIo`]'s (hyper's own head timer is off: it cannot tell an
    // idle keep-alive connection from a slow head). Header count and size limits are
    // hyper's, answered 431; the read buffer is no larger than the head limit.
    // writev(false): hyper copies head and body into one buffer and writes it with one
    // `write`, rather than a `writev` of several slices: 13 % more maintenance pages
    // per second on one core (BENCHMARKS.md, "Write strategy").
    // With upgrades: after a `101` hyper hands the stream to the request's upgrade
    // (the tunnel) and the connection future ends.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true)
        .writev(false);
    // launchday's own loop serves simple requests; hyper gets the connection from
    // the first request that is not one until the connection is idle again.
    let mut served = false;
    loop {
        let fast =
            crate::h1_server::serve(&mut io, &proxy, &fwd, limits, &mut stop, &parked, served);
        if fast.await? == crate::h1_server::Exit::Closed {
            return Ok(());
        }
        let first = Arc::new(tokio::sync::Notify::new());
        let svc = {
            let track = Arc::clone(&track);
            let seen = Arc::clone(&first);
            let proxy = Arc::clone(&proxy);
            let fwd = Arc::clone(&fwd);
            service_fn(move |req| {
                let verdict = track.begin();
                let request = InFlight(Arc::clone(&track));
                seen.notify_one();
                let proxy = Arc::clone(&proxy);
                let fwd = Arc::clone(&fwd);
                async move {
                    // In flight until hyper has written the answer's body, or until
                    // this future is dropped unanswered.
                    let request = request;
                    let resp = proxy
                        .handle(req.map(ReqBody::Hyper), &fwd, verdict, Wire::Hyper)
                        .await;
                    Ok::<_, Infallible>(resp.map(|body| Answer::new(body, request)))
                }
            })
        };
        // Boxed: a parked connection gives all of it back.
        let mut http = Box::pin(
            builder
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades(),
        );
        // Until its first request arrives, a connection (fresh or unparked) holds the
        // watcher (so a shutdown waits for it) but is not told to shut down: hyper
        // would close it unread, and the client's request may already be in the
        // socket buffer (a connection accepted just before SIGTERM or an upgrade).
        // Bounded by the head deadline.
        let mut first_seen = false;
        let park = loop {
            let park_at = if I::PARKS { track.park_at() } else { None };
            // Not idle now: look again in a while (one timer per connection and
            // `PARK_AFTER`, only while the connection is busy).
            let look = park_at.unwrap_or_else(|| tokio::time::Instant::now() + track.park_after());
            tokio::select! {
                biased;
                r = http.as_mut() => {
                    r?;
                    break false;
                }
                _ = first.notified(), if !first_seen => first_seen = true,
                // A closed channel means the server is gone: drain too.
                _ = async { stop.wait_for(|stopped| *stopped).await.is_ok() }, if served || first_seen => {
                    http.as_mut().graceful_shutdown();
                    http.as_mut().await?;
                    break false;
                }
                _ = tokio::time::sleep_until(look), if I::PARKS => {
                    if track.park_at().is_some_and(|at| at <= tokio::time::Instant::now()) {
                        break true;
                    }
                }
            }
        };
        if !park {
            break;
        }
        // An idle point: hyper closes at once, and its shutdown of the stream is
        // swallowed.
        track.set_parking(true);
        http.as_mut().graceful_shutdown();
        let closed = http.as_mut().await;
        track.set_parking(false);
        closed?;
        let Some(parts) = Pin::into_inner(http).into_parts() else {
            break;
        };
        io = parts.io.into_inner();
        if !parts.read_buf.is_empty() {
            // Part of a next request had arrived with the last one: serve it now.
            io.replay(parts.read_buf);
        }
        // Back to the fast loop, which parks the connection (it has been idle
        // long enough) unless a request is already there.
        served = true;
    }
    track.tunnel_closed().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v4_and_v6_wildcards_coexist_on_one_port() {
        let v6 = bind("[::]:0".parse().expect("addr")).expect("v6");
        let port = v6.local_addr().expect("addr").port();
        let v4 = bind(SocketAddr::from(([0, 0, 0, 0], port))).expect("v4 beside v6");
        assert_eq!(v4.local_addr().expect("addr").port(), port);
    }

    #[tokio::test]
    async fn a_port_in_use_is_an_error_naming_the_address() {
        let a = bind("127.0.0.1:0".parse().expect("addr")).expect("a");
        let addr = a.local_addr().expect("addr");
        let err = bind(addr).expect_err("second bind must fail");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
