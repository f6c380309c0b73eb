//! Entity tags for snapshots: checking a back end's, computing one, and matching
//! `If-None-Match` (RFC 9110 §8.8.3, §13.1.2).
//!
//! `If-None-Match` uses the weak comparison: `W/"a"` matches `"a"`. A list is parsed
//! tag by tag rather than split at commas (a quoted tag may contain one); `*` matches
//! any copy. A malformed list stops matching at the first malformed tag, so it can only
//! cost a `200` where a `304` would do, never a `304` for different content.
//!
//! Invariant: matching allocates nothing; it runs on the request path.

use std::hash::Hasher;

use bytes::Bytes;
use http::header::HeaderValue;

/// Errors of this module: none; malformed validators simply do not match.
#[derive(Debug, thiserror::Error)]
pub enum ValidatorError {
    #[error("not an entity tag")]
    Malformed,
}

/// Whether `list` (one `If-None-Match` value) has `*` or a tag weakly equal to `ours`.
pub fn matches(list: &[u8], ours: &HeaderValue) -> bool {
    let ours = opaque(ours.as_bytes());
    let mut s = list;
    loop {
        while let [b' ' | b'\t' | b',', rest @ ..] = s {
            s = rest;
        }
        match s {
            [] => return false,
            [b'*', ..] => return true,
            _ => {}
        }
        let tag = s.strip_prefix(b"W/").unwrap_or(s);
        let Some(inner) = tag.strip_prefix(b"\"") else {
            return false;
        };
        let Some(end) = inner.iter().position(|&b| b == b'"') else {
            return false;
        };
        if &tag[..end + 2] == ours {
            return true;
        }
        s = &inner[end + 1..];
    }
}

/// The quoted part of an entity tag (what weak comparison compares).
fn opaque(etag: &[u8]) -> &[u8] {
    etag.strip_prefix(b"W/").unwrap_or(etag)
}

/// `etag` if it is a well-formed entity tag (`"…"` or `W/"…"`).
pub fn check(etag: &HeaderValue) -> Result<&HeaderValue, ValidatorError> {
    let q = opaque(etag.as_bytes());
    let ok = q.len() >= 2
        && q[0] == b'"'
        && q[q.len() - 1] == b'"'
        && q[1..q.len() - 1].iter().all(|&b| b == 0x21 || b >= 0x23);
    if ok {
        Ok(etag)
    } else {
        Err(ValidatorError::Malformed)
    }
}

/// The weak form of `etag` (itself if weak already).
pub fn weak(etag: &HeaderValue) -> HeaderValue {
    if etag.as_bytes().starts_with(b"W/") {
        return etag.clone();
    }
    let mut v = Vec::with_capacity(etag.len() + 2);
    v.extend_from_slice(b"W/");
    v.extend_from_slice(etag.as_bytes());
    HeaderValue::from_maybe_shared(Bytes::from(v)).unwrap_or_else(|_| etag.clone())
}

/// A strong ETag from the body's length and 64-bit SipHash. Stable for one build of
/// launchday (std's hasher may change between Rust releases: after such an upgrade,
/// clients revalidate once).
pub fn computed(body: &[u8]) -> HeaderValue {
    let mut h = std::hash::DefaultHasher::new();
    h.write(body);
    let tag = format!("\"{:x}-{:016x}\"", body.len(), h.finish());
    HeaderValue::from_maybe_shared(Bytes::from(tag))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    #[test]
    fn weak_comparison_over_lists() {
        let strong = hv("\"abc\"");
        assert!(matches(b"\"abc\"", &strong));
        assert!(matches(b"W/\"abc\"", &strong));
        assert!(matches(b"\"x\", W/\"abc\"", &strong));
        assert!(matches(b"  ,\"x\" ,\t\"abc\"", &strong));
        assert!(matches(b"\"abc\"", &hv("W/\"abc\"")));
        assert!(matches(b"*", &strong));
        assert!(!matches(b"\"abcd\"", &strong));
        assert!(!matches(b"\"ab\"", &strong));
        assert!(!matches(b"", &strong));
    }

    #[test]
    fn quoted_commas_and_malformed_lists() {
        let comma = hv("\"a,b\"");
        assert!(matches(b"\"x\", \"a,b\"", &comma));
        assert!(!matches(b"\"a\"", &comma));
        // Unquoted or unterminated tags never match.
        assert!(!matches(b"abc", &hv("\"abc\"")));
        assert!(!matches(b"\"abc", &hv("\"abc\"")));
        assert!(!matches(b"bogus, \"abc\"", &hv("\"abc\"")));
    }

    #[test]
    fn check_weak_and_computed() {
        assert!(check(&hv("\"v1\"")).is_ok());
        assert!(check(&hv("W/\"v1\"")).is_ok());
        assert!(check(&hv("\"\"")).is_ok());
        assert!(check(&hv("v1")).is_err());
        assert!(check(&hv("\"a\"b\"")).is_err());
        assert_eq!(weak(&hv("\"v1\"")), "W/\"v1\"");
        assert_eq!(weak(&hv("W/\"v1\"")), "W/\"v1\"");
        let a = computed(b"hello");
        assert_eq!(a, computed(b"hello"));
        assert_ne!(a, computed(b"hellp"));
        assert!(check(&a).is_ok());
        assert!(a.to_str().expect("ascii").starts_with("\"5-"));
    }
}
