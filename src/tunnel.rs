//! HTTP/1.1 protocol upgrades (WebSocket and the like, RFC 9110 §7.8): which requests
//! ask for one, and the byte tunnel between client and back end once the back end
//! agreed with `101 Switching Protocols`.
//!
//! Invariants:
//! - A request is an upgrade request only when it is HTTP/1.1 on an HTTP/1
//!   connection, has one `Upgrade` line and a `Connection` listing the `upgrade`
//!   token (in any case). Only then do `Upgrade` and `Connection: upgrade` reach the
//!   back end; every other request loses them like every hop-by-hop header. HTTP/2
//!   requests never upgrade. `h2c` is never asked for: its tunnel would carry HTTP/2
//!   requests that no route, limit or header rewrite of launchday ever sees.
//! - An upgrade request with a body is refused with `400`: where its body would end
//!   and the new protocol begin is ambiguous once the connection switches.
//! - Only a `101` to an upgrade request opens a tunnel; a `101` to any other request,
//!   or one without `Upgrade`, is a `502`. Any other answer is an ordinary response:
//!   hyper switches neither connection, and the client's stays HTTP.
//! - The back-end connection is the tunnel's alone (never back to the keep-alive
//!   pool; its pause limits stop), and the back end's capacity lease is held until
//!   the tunnel ends, so `max_connections` counts open tunnels. The pool's service
//!   time sees the handshake, not the tunnel's life.
//! - A tunnel ends when both directions have closed, when either side fails, or after
//!   `idle_timeout` with no byte moved either way (the client connection's
//!   [`Track`] in its tunnel phase, which also stops head scanning and the 408). The
//!   client connection counts as open (listener `max_connections`, graceful drain)
//!   until then.
//!
//! Checking a request costs a version test and one header lookup, with no
//! allocation, unless it carries `Upgrade`.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::body::Body;
use crate::conn::{OpenTunnel, Track};
use crate::headers::{self, Forwarded};
use crate::pool::Lease;
use crate::strict::Reject;
use crate::upstream::Checkin;

/// Why a switch of protocols was not made, or a tunnel ended early.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The back end answered `101` to a request that asked for no upgrade.
    #[error("the back end switched protocols unasked")]
    Unasked,
    /// The back end's `101` named no protocol (or hyper kept no upgrade for it).
    #[error("the back end's 101 carries no Upgrade")]
    NoProtocol,
    /// One side's connection never switched (it closed first).
    #[error("the {side} connection did not switch: {source}")]
    Switch {
        side: &'static str,
        source: hyper::Error,
    },
    /// No byte moved either way for `idle_timeout`.
    #[error("idle for the idle timeout")]
    Idle,
    /// Reading or writing either side failed.
    #[error("relaying: {0}")]
    Io(#[from] std::io::Error),
}

impl TunnelError {
    /// The `X-Launchday-Error` value when the switch is refused (`502`).
    pub fn code(&self) -> &'static str {
        match self {
            TunnelError::Unasked => "upstream_unasked_switch",
            _ => "upstream_bad_switch",
        }
    }
}

/// The refusal of an upgrade request with a body.
pub const UPGRADE_WITH_BODY: Reject = Reject {
    status: StatusCode::BAD_REQUEST,
    code: "upgrade_with_body",
    text: "An upgrade request must not have a body.\n",
};

/// An upgrade a client asked for: the protocol and its connection's side of the switch.
#[derive(Debug)]
pub struct Upgrade {
    protocol: HeaderValue,
    client: OnUpgrade,
    track: Arc<Track>,
}

/// The upgrade `req` asks for, taken out of it (see the module's invariants):
/// `Ok(None)` for every request that is not an upgrade request, `Err` for one with a
/// body.
pub fn requested<B: http_body::Body>(
    req: &mut Request<B>,
    fwd: &Forwarded,
) -> Result<Option<Upgrade>, Reject> {
    let Some(track) = &fwd.track else {
        return Ok(None);
    };
    let Some(protocol) = asked(req)? else {
        return Ok(None);
    };
    // hyper keeps a switch for every HTTP/1.1 request with `Upgrade`.
    let Some(client) = req.extensions_mut().remove::<OnUpgrade>() else {
        return Ok(None);
    };
    Ok(Some(Upgrade {
        protocol,
        client,
        track: Arc::clone(track),
    }))
}

/// The protocol an upgrade request asks for, `None` for any other request.
fn asked<B: http_body::Body>(req: &Request<B>) -> Result<Option<HeaderValue>, Reject> {
    if req.version() != Version::HTTP_11 {
        return Ok(None);
    }
    let headers = req.headers();
    let mut lines = headers.get_all(header::UPGRADE).iter();
    let (Some(protocol), None) = (lines.next(), lines.next()) else {
        return Ok(None);
    };
    if !lists_upgrade(headers) || names_h2c(protocol) {
        return Ok(None);
    }
    if !req.body().is_end_stream() {
        return Err(UPGRADE_WITH_BODY);
    }
    Ok(Some(protocol.clone()))
}

/// Whether `Connection` lists the `upgrade` token.
fn lists_upgrade(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    })
}

/// Whether an `Upgrade` value names `h2c` (with or without a version).
fn names_h2c(protocol: &HeaderValue) -> bool {
    protocol.as_bytes().split(|&b| b == b',').any(|p| {
        let name = p.split(|&b| b == b'/').next().unwrap_or(p);
        name.trim_ascii().eq_ignore_ascii_case(b"h2c")
    })
}

impl Upgrade {
    /// The protocol asked for (the client's `Upgrade` value).
    pub fn protocol(&self) -> &HeaderValue {
        &self.protocol
    }

    /// The back end answered `resp` (a `101`) on the connection of `checkin`: starts
    /// the tunnel (a task holding `lease` until it ends) and returns the `101` for
    /// the client, with the back end's `Upgrade` and `Connection: upgrade`.
    pub fn open(
        self,
        resp: Response<Incoming>,
        checkin: Checkin,
        mut lease: Lease,
        served_by: Option<&HeaderValue>,
    ) -> Result<Response<Body>, TunnelError> {
        let (mut parts, _empty) = resp.into_parts();
        let (Some(upstream), Some(protocol)) = (
            parts.extensions.remove::<OnUpgrade>(),
            parts.headers.get(header::UPGRADE).cloned(),
        ) else {
            return Err(TunnelError::NoProtocol);
        };
        headers::rewrite_response(&mut parts.headers, served_by);
        headers::keep_upgrade(&mut parts.headers, protocol);
        parts.extensions.clear();
        checkin.switched();
        lease.into_tunnel();
        // Before the 101 leaves: the client's next bytes are the tunnel's.
        let open = self.track.tunnel();
        tokio::spawn(async move {
            // The lease and the back-end connection's handle live as long as the tunnel.
            let _held = (lease, checkin);
            match relay(self.client, upstream, &open).await {
                Ok((up, down)) => tracing::debug!(up, down, "tunnel closed"),
                Err(e) => tracing::debug!(error = %e, "tunnel ended"),
            }
        });
        Ok(Response::from_parts(parts, Body::Empty))
    }
}

/// Waits for both connections to switch, then copies bytes both ways until both
/// directions closed, or either side failed, or the tunnel was idle too long.
/// Returns the bytes relayed client → back end and back end → client.
async fn relay(
    client: OnUpgrade,
    upstream: OnUpgrade,
    open: &OpenTunnel,
) -> Result<(u64, u64), TunnelError> {
    let track = open.track();
    let copy = async {
        let (client, upstream) = tokio::try_join!(
            async {
                client.await.map_err(|source| TunnelError::Switch {
                    side: "client",
                    source,
                })
            },
            async {
                upstream.await.map_err(|source| TunnelError::Switch {
                    side: "back-end",
                    source,
                })
            },
        )?;
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        Ok::<_, TunnelError>(tokio::io::copy_bidirectional(&mut client, &mut upstream).await?)
    };
    tokio::pin!(copy);
    // Bounded: each turn either ends the tunnel or waits for the expiry, which
    // moves only when bytes moved.
    loop {
        // Always `Some`: `open` switched the connection before starting the relay.
        let Some(expiry) = track.tunnel_expiry() else {
            return Err(TunnelError::Idle);
        };
        tokio::select! {
            r = &mut copy => return r,
            () = tokio::time::sleep_until(expiry) => {
                if track.tunnel_expiry().is_none_or(|at| at <= tokio::time::Instant::now()) {
                    return Err(TunnelError::Idle);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Deadlines;
    use std::time::Duration;

    fn fwd(http1: bool) -> Forwarded {
        Forwarded {
            peer: "2001:db8::7".parse().expect("ip"),
            peer_ip: HeaderValue::from_static("2001:db8::7"),
            trusted: false,
            proto: HeaderValue::from_static("http"),
            listener: "public".into(),
            tls: None,
            track: http1.then(|| {
                Track::new(Deadlines {
                    header_timeout: Duration::from_secs(10),
                    idle_timeout: Duration::from_secs(60),
                    park_after: Duration::from_secs(60),
                })
            }),
        }
    }

    /// A request with `headers` and a body of `body`.
    fn req(version: Version, headers: &[(&str, &str)], body: &'static str) -> Request<Body> {
        let mut r = Request::new(if body.is_empty() {
            Body::Empty
        } else {
            Body::full(body)
        });
        *r.version_mut() = version;
        for (k, v) in headers {
            r.headers_mut().append(
                header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        r
    }

    fn asks(version: Version, headers: &[(&str, &str)]) -> bool {
        asked(&req(version, headers, ""))
            .expect("no body")
            .is_some()
    }

    const WS: &[(&str, &str)] = &[("connection", "Upgrade"), ("upgrade", "websocket")];

    #[test]
    fn an_upgrade_request_needs_http11_upgrade_and_the_connection_token() {
        assert!(asks(Version::HTTP_11, WS));
        assert!(asks(
            Version::HTTP_11,
            &[
                ("connection", "keep-alive, UPGRADE"),
                ("upgrade", "websocket")
            ]
        ));
        assert!(asks(
            Version::HTTP_11,
            &[
                ("connection", "keep-alive"),
                ("connection", " upgrade "),
                ("upgrade", "websocket")
            ]
        ));
        assert!(!asks(Version::HTTP_10, WS));
        assert!(!asks(Version::HTTP_2, WS));
        assert!(!asks(Version::HTTP_11, &[("upgrade", "websocket")]));
        assert!(!asks(Version::HTTP_11, &[("connection", "upgrade")]));
        assert!(!asks(
            Version::HTTP_11,
            &[("connection", "upgraded"), ("upgrade", "websocket")]
        ));
        assert!(!asks(
            Version::HTTP_11,
            &[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("upgrade", "foo")
            ]
        ));
        let protocol = asked(&req(Version::HTTP_11, WS, "")).expect("ok");
        assert_eq!(
            protocol.as_ref().map(HeaderValue::as_bytes),
            Some(&b"websocket"[..])
        );
    }

    #[test]
    fn h2c_is_never_asked_for() {
        for protocol in ["h2c", "H2C", "foo/1, h2c", " h2c/1 "] {
            assert!(
                !asks(
                    Version::HTTP_11,
                    &[("connection", "upgrade"), ("upgrade", protocol)]
                ),
                "{protocol}"
            );
        }
        assert!(asks(
            Version::HTTP_11,
            &[("connection", "upgrade"), ("upgrade", "h2c-not")]
        ));
    }

    #[test]
    fn an_upgrade_request_with_a_body_is_refused_and_others_are_not_touched() {
        let bodied = req(Version::HTTP_11, WS, "hello");
        assert_eq!(asked(&bodied).expect_err("body"), UPGRADE_WITH_BODY);
        // Not an upgrade request: its body is none of this module's business.
        let plain = req(Version::HTTP_11, &[("upgrade", "websocket")], "hello");
        assert_eq!(asked(&plain), Ok(None));
    }

    #[test]
    fn only_http1_connections_upgrade() {
        // No connection state (HTTP/2): not even a body is looked at.
        let mut bodied = req(Version::HTTP_11, WS, "hello");
        assert!(requested(&mut bodied, &fwd(false)).expect("ok").is_none());
        // HTTP/1 without hyper's switch (never happens with hyper): no upgrade either.
        let mut r = req(Version::HTTP_11, WS, "");
        assert!(requested(&mut r, &fwd(true)).expect("ok").is_none());
    }
}
