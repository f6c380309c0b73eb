//! The request checks of RFC 9112/9110 that hyper leaves to us, made before anything
//! reaches a back end.
//!
//! hyper's parser (httparse) already refuses, with `400` and a closed connection:
//! obs-fold, bare CR, control bytes in names and values, whitespace before the colon,
//! versions other than `HTTP/1.0` and `HTTP/1.1`, malformed or differing
//! `Content-Length`, `Transfer-Encoding` on HTTP/1.0 or not ending in `chunked`, and
//! chunk sizes that overflow; more than `max_headers` fields or `max_header_bytes` of
//! head get `431`. What it accepts and we refuse here:
//!
//! - `Content-Length` together with `Transfer-Encoding` (hyper drops the former
//!   silently; [`crate::conn`] sees it in the raw bytes): `400`.
//! - `Transfer-Encoding` other than exactly one `chunked` (`gzip, chunked` is legal
//!   HTTP but no browser sends it, and every extra coding is a parser difference
//!   waiting to be exploited): `400`.
//! - HTTP/1.1 without exactly one `Host`, any request with two, or a `Host` that is not
//!   a valid authority: `400`.
//! - A target longer than `max_uri_bytes`: `414`.
//! - A declared `Content-Length` above `max_body_bytes`: `413` (a chunked body that
//!   grows beyond it is cut by [`crate::body`]).
//! - `CONNECT`: `405` (launchday is not a forward proxy).
//!
//! Invariant: every refusal closes the connection (the caller adds
//! `Connection: close`), because whatever follows the refused head cannot be framed
//! with confidence.

use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Version};

use crate::config::LimitsSpec;
use crate::conn::Verdict;

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub status: StatusCode,
    /// The `X-Launchday-Error` value.
    pub code: &'static str,
    /// The body of the answer.
    pub text: &'static str,
}

const fn bad(code: &'static str, text: &'static str) -> Reject {
    Reject {
        status: StatusCode::BAD_REQUEST,
        code,
        text,
    }
}

/// Checks `req` (its head only); `verdict` is what the raw scan of the head found.
pub fn check<B>(req: &Request<B>, verdict: Verdict, limits: &LimitsSpec) -> Result<(), Reject> {
    if verdict.ambiguous_framing() {
        return Err(bad(
            "content_length_with_transfer_encoding",
            "Content-Length and Transfer-Encoding must not both be sent.\n",
        ));
    }
    let headers = req.headers();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let mut values = headers.get_all(header::TRANSFER_ENCODING).iter();
        let chunked = values.next().is_some_and(is_chunked) && values.next().is_none();
        if !chunked || req.version() != Version::HTTP_11 {
            return Err(bad(
                "bad_transfer_encoding",
                "Only Transfer-Encoding: chunked is accepted, on HTTP/1.1.\n",
            ));
        }
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(bad("duplicate_host", "More than one Host header.\n")),
        (None, None) if req.version() == Version::HTTP_11 => {
            return Err(bad(
                "missing_host",
                "HTTP/1.1 requests need a Host header.\n",
            ))
        }
        (Some(h), None) if !valid_host(h) => return Err(bad("bad_host", "Invalid Host header.\n")),
        _ => {}
    }
    if target_len(req) > limits.max_uri_bytes {
        return Err(Reject {
            status: StatusCode::URI_TOO_LONG,
            code: "uri_too_long",
            text: "The request target is too long.\n",
        });
    }
    if let Some(max) = limits.max_body_bytes {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(too_large());
        }
    }
    if req.method() == Method::CONNECT {
        return Err(Reject {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "connect_refused",
            text: "CONNECT is not supported.\n",
        });
    }
    Ok(())
}

/// The answer to a body above `max_body_bytes`.
pub const fn too_large() -> Reject {
    Reject {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: "body_too_large",
        text: "The request body is too large.\n",
    }
}

fn is_chunked(v: &HeaderValue) -> bool {
    v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2): reg-name characters, an IP literal in
/// brackets, digits after the colon. No userinfo, path, spaces or backslashes.
fn valid_host(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    if b.is_empty() {
        // RFC 9112 §3.2 allows an empty Host when the target has no authority.
        return true;
    }
    let (host, port) = if b[0] == b'[' {
        let Some(end) = b.iter().position(|&c| c == b']') else {
            return false;
        };
        let literal = &b[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.'))
        {
            return false;
        }
        (&b[..0], &b[end + 1..])
    } else {
        match b.iter().position(|&c| c == b':') {
            Some(i) => (&b[..i], &b[i..]),
            None => (b, &b[..0]),
        }
    };
    let host_ok = host.iter().all(|&c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            )
    });
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    host_ok && port_ok
}

/// The request target's length as the client sent it (near enough: the parts hyper
/// kept).
fn target_len<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let pq = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    let scheme = uri.scheme_str().map_or(0, |s| s.len() + 3);
    pq + authority + scheme
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/x").version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    fn code(r: &Request<()>, verdict: Verdict, limits: &LimitsSpec) -> Option<&'static str> {
        check(r, verdict, limits).err().map(|e| e.code)
    }

    #[test]
    fn a_plain_request_passes() {
        let l = LimitsSpec::default();
        let r = req(Version::HTTP_11, &[("host", "blog.example:8080")]);
        assert_eq!(code(&r, Verdict::default(), &l), None);
        let r = req(Version::HTTP_10, &[]);
        assert_eq!(code(&r, Verdict::default(), &l), None);
        let r = req(Version::HTTP_11, &[("host", "[2001:db8::1]:80")]);
        assert_eq!(code(&r, Verdict::default(), &l), None);
    }

    #[test]
    fn framing_ambiguities_are_refused() {
        let l = LimitsSpec::default();
        let both = Verdict {
            content_length: true,
            transfer_encoding: true,
        };
        let r = req(
            Version::HTTP_11,
            &[("host", "a"), ("transfer-encoding", "chunked")],
        );
        assert_eq!(code(&r, Verdict::default(), &l), None);
        assert_eq!(
            code(&r, both, &l),
            Some("content_length_with_transfer_encoding")
        );
        for te in ["gzip, chunked", "identity", "chunked, chunked", "xchunked"] {
            let r = req(
                Version::HTTP_11,
                &[("host", "a"), ("transfer-encoding", te)],
            );
            assert_eq!(
                code(&r, Verdict::default(), &l),
                Some("bad_transfer_encoding"),
                "{te}"
            );
        }
        let r = req(
            Version::HTTP_11,
            &[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
        );
        assert_eq!(
            code(&r, Verdict::default(), &l),
            Some("bad_transfer_encoding")
        );
    }

    #[test]
    fn host_must_be_single_and_valid() {
        let l = LimitsSpec::default();
        let v = Verdict::default();
        assert_eq!(
            code(&req(Version::HTTP_11, &[]), v, &l),
            Some("missing_host")
        );
        let two = req(Version::HTTP_11, &[("host", "a"), ("host", "b")]);
        assert_eq!(code(&two, v, &l), Some("duplicate_host"));
        for h in ["a b", "a/b", "user@a", "a:80x", "[zz]", "a\\b", "[::1"] {
            let r = req(Version::HTTP_11, &[("host", h)]);
            assert_eq!(code(&r, v, &l), Some("bad_host"), "{h}");
        }
    }

    #[test]
    fn long_targets_big_bodies_and_connect_are_refused() {
        let mut l = LimitsSpec {
            max_uri_bytes: 300,
            ..LimitsSpec::default()
        };
        let long = Request::builder()
            .uri(format!("/{}", "a".repeat(300)))
            .header("host", "a")
            .body(())
            .expect("request");
        assert_eq!(code(&long, Verdict::default(), &l), Some("uri_too_long"));
        l.max_body_bytes = Some(10);
        let big = req(Version::HTTP_11, &[("host", "a"), ("content-length", "11")]);
        assert_eq!(code(&big, Verdict::default(), &l), Some("body_too_large"));
        let fits = req(Version::HTTP_11, &[("host", "a"), ("content-length", "10")]);
        assert_eq!(code(&fits, Verdict::default(), &l), None);
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("a:443")
            .header("host", "a:443")
            .body(())
            .expect("request");
        assert_eq!(
            code(&connect, Verdict::default(), &l),
            Some("connect_refused")
        );
    }
}
