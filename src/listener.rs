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
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::headers::{Forwarded, TlsInfo};
use crate::proxy::Proxy;

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
}

/// Accepts connections on `listener` until `stop` resolves, serving each with `proxy`.
/// Connections are registered with `graceful` so that shutdown can drain them; the
/// loop drops its handle on `graceful` when it returns.
pub async fn serve(
    listener: Arc<TcpListener>,
    proxy: Arc<Proxy>,
    opts: ServeOptions,
    graceful: Arc<GracefulShutdown>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let opts = Arc::new(opts);
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
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let proxy = Arc::clone(&proxy);
        let opts = Arc::clone(&opts);
        tokio::spawn(async move {
            if let Err(e) = connection(stream, peer, proxy, &opts, watcher).await {
                tracing::debug!(%peer, error = %e, "client connection ended");
            }
        });
    }
}

/// Errors that end one client connection (logged at debug level).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    opts: &ServeOptions,
    watcher: Watcher,
) -> Result<(), ConnError> {
    let peer_ip = peer.ip().to_canonical();
    let (header_timeout, trusted) = {
        let live = proxy.live();
        let s = &live.snapshot;
        (
            s.limits.header_timeout,
            s.trusted_proxies.iter().any(|n| n.contains(&peer_ip)),
        )
    };
    let mut fwd = Forwarded {
        peer: peer_ip,
        // An IP address always formats as a valid header value.
        peer_ip: HeaderValue::from_str(&peer_ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        trusted,
        proto: HeaderValue::from_static("http"),
        listener: Arc::clone(&opts.listener),
        tls: None,
    };
    let Some(acceptor) = &opts.tls else {
        return serve_http1(TokioIo::new(stream), proxy, fwd, header_timeout, watcher).await;
    };
    let tls = match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
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
        return serve_http1(TokioIo::new(tls), proxy, fwd, header_timeout, watcher).await;
    }
    let fwd = Arc::new(fwd);
    let svc = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let fwd = Arc::clone(&fwd);
        async move { Ok::<_, Infallible>(proxy.handle(req, &fwd).await) }
    });
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(h2_limits::MAX_CONCURRENT_STREAMS)
        .max_header_list_size(h2_limits::MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(h2_limits::MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(h2_limits::MAX_LOCAL_ERROR_RESET_STREAMS)
        .serve_connection(TokioIo::new(tls), svc);
    Ok(watcher.watch(conn).await?)
}

async fn serve_http1<I>(
    io: TokioIo<I>,
    proxy: Arc<Proxy>,
    fwd: Forwarded,
    header_timeout: Duration,
    watcher: Watcher,
) -> Result<(), ConnError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let fwd = Arc::new(fwd);
    let first = Arc::new(tokio::sync::Notify::new());
    let seen = Arc::clone(&first);
    let svc = service_fn(move |req| {
        seen.notify_one();
        let proxy = Arc::clone(&proxy);
        let fwd = Arc::clone(&fwd);
        async move { Ok::<_, Infallible>(proxy.handle(req, &fwd).await) }
    });
    // writev(false): hyper copies head and body into one buffer and writes it with one
    // `write`, rather than a `writev` of several slices: 13 % more maintenance pages
    // per second on one core (BENCHMARKS.md, "Write strategy").
    let mut conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .writev(false)
        .serve_connection(io, svc);
    // Until its first request arrives, a fresh connection holds the watcher (so a
    // shutdown waits for it) but is not told to shut down: hyper would close it
    // unread, and the client's request may already be in the socket buffer (a
    // connection accepted just before SIGTERM or an upgrade). Bounded by the head
    // deadline.
    tokio::select! {
        r = &mut conn => return Ok(r?),
        _ = first.notified() => {}
    }
    Ok(watcher.watch(conn).await?)
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
