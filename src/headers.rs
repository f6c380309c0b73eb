//! Header rewriting between client and back end.
//!
//! Requests: hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and every header it
//! names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`,
//! `Upgrade`) are removed. `X-Forwarded-For`, `X-Real-IP` and `Forwarded` sent by the
//! client are removed and replaced with the peer address, unless the peer is a trusted
//! proxy, in which case its `X-Forwarded-For` is kept and the peer appended (and its
//! `X-Real-IP`/`Forwarded` are kept). `X-Forwarded-Proto` is always set by us.
//! `Host` is preserved (set to the back end's address only when the client sent none).
//! An upgrade request ([`crate::tunnel`]) is the one exception: its `Upgrade` is put
//! back and `Connection: upgrade` sent ([`keep_upgrade`]), and so for the `101` answer.
//!
//! Responses: hop-by-hop headers are removed; `X-Served-By` from the back end passes
//! through, and the back end's `served_by` label is added when it sent none.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Real-IP`.
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `X-Served-By`.
pub static X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");
/// `X-Launchday-Error`: why launchday answered itself.
pub static X_LAUNCHDAY_ERROR: HeaderName = HeaderName::from_static("x-launchday-error");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Per-connection facts the rewrite needs, computed once at accept.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The peer's IP (IPv4-mapped addresses as IPv4).
    pub peer: std::net::IpAddr,
    /// The peer's IP as a header value (no port).
    pub peer_ip: HeaderValue,
    /// Whether the peer is in `trusted_proxies`.
    pub trusted: bool,
    /// `http` or `https`.
    pub proto: HeaderValue,
    /// The listener the connection came in on.
    pub listener: std::sync::Arc<str>,
    /// Present on TLS connections.
    pub tls: Option<TlsInfo>,
    /// The connection's deadline state: present on HTTP/1 connections, the only ones
    /// a request can upgrade (switch to a tunnel) on.
    pub track: Option<std::sync::Arc<crate::conn::Track>>,
}

/// What the TLS handshake told us about a connection.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// The server name the client asked for (SNI), if any.
    pub sni: Option<Box<str>>,
}

/// The hop-by-hop headers that are always removed, after `Connection` (bit 0).
fn hop_bit(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        1
    } else if name == header::TE {
        1 << 1
    } else if name == header::TRAILER {
        1 << 2
    } else if name == header::TRANSFER_ENCODING {
        1 << 3
    } else if name == header::UPGRADE {
        1 << 4
    } else if name == KEEP_ALIVE {
        1 << 5
    } else if name == PROXY_CONNECTION {
        1 << 6
    } else {
        0
    }
}

/// Removes hop-by-hop headers, including those named by `Connection`.
///
/// One pass over the names finds which are present, so that a message without any
/// (most responses) costs no hashing at all, and only present ones are removed.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let present = headers.keys().fold(0u8, |bits, name| bits | hop_bit(name));
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The usual tokens are removed anyway (or name no header): skip them
            // without building a header name, which would allocate. `host` too: a
            // client must not strip the Host it was routed by (found by fuzzing).
            .filter(|t| {
                ![
                    "host",
                    "keep-alive",
                    "close",
                    "upgrade",
                    "te",
                    "trailer",
                    "transfer-encoding",
                ]
                .iter()
                .any(|known| t.eq_ignore_ascii_case(known))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| hop_bit(n) == 0)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (bit, name) in [
        (0, &header::CONNECTION),
        (1, &header::TE),
        (2, &header::TRAILER),
        (3, &header::TRANSFER_ENCODING),
        (4, &header::UPGRADE),
        (5, &KEEP_ALIVE),
        (6, &PROXY_CONNECTION),
    ] {
        if present & (1 << bit) != 0 {
            headers.remove(name);
        }
    }
}

/// Rewrites a client request's headers for the back end.
pub fn rewrite_request(headers: &mut HeaderMap, fwd: &Forwarded, default_host: &str) {
    strip_hop_by_hop(headers);
    if fwd.trusted {
        let appended = match headers.get(&X_FORWARDED_FOR) {
            Some(prev) => {
                let mut v = Vec::with_capacity(prev.len() + 2 + fwd.peer_ip.len());
                // Several X-Forwarded-For lines are one comma-separated list.
                let all: Vec<&[u8]> = headers
                    .get_all(&X_FORWARDED_FOR)
                    .iter()
                    .map(|h| h.as_bytes())
                    .collect();
                v.extend_from_slice(&all.join(&b", "[..]));
                v.extend_from_slice(b", ");
                v.extend_from_slice(fwd.peer_ip.as_bytes());
                HeaderValue::from_bytes(&v).unwrap_or_else(|_| fwd.peer_ip.clone())
            }
            None => fwd.peer_ip.clone(),
        };
        headers.insert(X_FORWARDED_FOR.clone(), appended);
        if !headers.contains_key(&X_REAL_IP) {
            headers.insert(X_REAL_IP.clone(), fwd.peer_ip.clone());
        }
    } else {
        headers.remove(header::FORWARDED);
        headers.insert(X_FORWARDED_FOR.clone(), fwd.peer_ip.clone());
        headers.insert(X_REAL_IP.clone(), fwd.peer_ip.clone());
    }
    headers.insert(X_FORWARDED_PROTO.clone(), fwd.proto.clone());
    if !headers.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(default_host) {
            headers.insert(header::HOST, v);
        }
    }
}

static UPGRADE_TOKEN: HeaderValue = HeaderValue::from_static("upgrade");

/// Puts an upgrade back after the hop-by-hop headers were stripped: `Upgrade:
/// protocol` and `Connection: upgrade` (nothing else the client's `Connection` named).
pub fn keep_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, UPGRADE_TOKEN.clone());
}

/// Rewrites a back end's response headers for the client.
pub fn rewrite_response(headers: &mut HeaderMap, served_by: Option<&HeaderValue>) {
    strip_hop_by_hop(headers);
    if let Some(label) = served_by {
        if !headers.contains_key(&X_SERVED_BY) {
            headers.insert(X_SERVED_BY.clone(), label.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(trusted: bool) -> Forwarded {
        Forwarded {
            peer: "2001:db8::7".parse().expect("ip"),
            peer_ip: HeaderValue::from_static("2001:db8::7"),
            trusted,
            proto: HeaderValue::from_static("http"),
            listener: "public".into(),
            tls: None,
            track: None,
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn spoofed_forwarding_headers_are_replaced() {
        let mut h = map(&[
            ("host", "blog.example.org"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-real-ip", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        rewrite_request(&mut h, &fwd(false), "[::1]:80");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "2001:db8::7");
        assert_eq!(h["x-real-ip"], "2001:db8::7");
        assert!(h.get("forwarded").is_none());
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["host"], "blog.example.org");
    }

    #[test]
    fn trusted_proxy_chain_is_appended() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-real-ip", "1.2.3.4"),
        ]);
        rewrite_request(&mut h, &fwd(true), "[::1]:80");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 2001:db8::7");
        assert_eq!(h["x-real-ip"], "1.2.3.4");
        assert_eq!(h["host"], "[::1]:80");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn connection_cannot_name_host_away() {
        let mut h = map(&[("host", "blog.example"), ("connection", "Host, close")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h["host"], "blog.example");
        assert!(!h.contains_key("connection"));
    }

    #[test]
    fn an_upgrade_keeps_only_upgrade_and_connection_upgrade() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "Upgrade, keep-alive, x-secret"),
            ("x-secret", "1"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let protocol = h["upgrade"].clone();
        rewrite_request(&mut h, &fwd(false), "[::1]:80");
        keep_upgrade(&mut h, protocol);
        assert_eq!(h.get_all("connection").iter().count(), 1);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
    }

    #[test]
    fn served_by_added_only_when_absent() {
        let label = HeaderValue::from_static("Raspberry Pi 3");
        let mut h = map(&[]);
        rewrite_response(&mut h, Some(&label));
        assert_eq!(h["x-served-by"], "Raspberry Pi 3");
        let mut own = map(&[("x-served-by", "vm-7")]);
        rewrite_response(&mut own, Some(&label));
        assert_eq!(own["x-served-by"], "vm-7");
        let mut none = map(&[]);
        rewrite_response(&mut none, None);
        assert!(none.get("x-served-by").is_none());
    }
}
