//! Content codings of a snapshot's body: decoding what the back end sent, and
//! compressing ahead of time what launchday serves.
//!
//! A back end's gzip or brotli body is decoded to identity (so every client gets the
//! coding it accepts); any other `Content-Encoding`, or several stacked, is refused:
//! the fetch should ask for identity. Decoding is bounded by [`MAX_BODY`] (a small
//! compressed body cannot expand into gigabytes). Compression reuses the maintenance
//! page's helpers (gzip best, brotli quality 11); a coding that does not make the body
//! smaller, or a type that is compressed already (images, audio, video, WOFF fonts,
//! archives; SVG is compressed), falls back to identity.
//!
//! Invariant: runs only when a copy is built (off the async threads), never per request.

use std::io::Read;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};

use crate::maintenance::{variants, Variant};

/// Largest body a copy holds, after decoding a back end's gzip or brotli.
pub const MAX_BODY: usize = 64 << 20;

/// Why a back end's body cannot be stored.
#[derive(Debug, thiserror::Error)]
pub enum CodingError {
    #[error("unsupported Content-Encoding {0:?} (the fetch should ask for identity)")]
    Unsupported(String),
    #[error("decoding the back end's {0} body: {1}")]
    Decode(&'static str, std::io::Error),
    #[error("body larger than {MAX_BODY} bytes")]
    TooLarge,
}

/// A body in one coding, with its `Content-Encoding` (`None`: identity).
pub type Coded = (Bytes, Option<HeaderValue>);

/// The body as identity, decoding a back end's gzip or brotli.
pub fn decode(headers: &HeaderMap, body: Bytes) -> Result<Bytes, CodingError> {
    let mut codings = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
    let (name, reader): (&'static str, Box<dyn Read + '_>) = match (codings.next(), codings.next())
    {
        (None, _) if body.len() > MAX_BODY => return Err(CodingError::TooLarge),
        (None, _) => return Ok(body),
        (Some(c), None) if c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip") => (
            "gzip",
            Box::new(flate2::read::MultiGzDecoder::new(&body[..])),
        ),
        (Some(c), None) if c.eq_ignore_ascii_case("br") => {
            ("br", Box::new(brotli::Decompressor::new(&body[..], 4096)))
        }
        (Some(c), _) => return Err(CodingError::Unsupported(c.to_owned())),
    };
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(MAX_BODY));
    reader
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| CodingError::Decode(name, e))?;
    if out.len() > MAX_BODY {
        return Err(CodingError::TooLarge);
    }
    Ok(Bytes::from(out))
}

/// Identity, gzip and brotli bodies in [`crate::maintenance::Encoding`] order; a
/// coding that does not pay falls back to identity.
pub fn encode(identity: Bytes, content_type: Option<&HeaderValue>) -> [Coded; 3] {
    let plain = || (identity.clone(), None);
    if !compressible(content_type) {
        return [plain(), plain(), plain()];
    }
    let [_, gzip, br] = variants(identity.clone());
    let pick = |v: Variant| {
        if v.body.len() < identity.len() {
            (v.body, v.encoding)
        } else {
            plain()
        }
    };
    [plain(), pick(gzip), pick(br)]
}

/// False for types that are compressed already.
pub fn compressible(content_type: Option<&HeaderValue>) -> bool {
    const COMPRESSED: [&[u8]; 8] = [
        b"image/",
        b"audio/",
        b"video/",
        b"font/woff",
        b"application/zip",
        b"application/gzip",
        b"application/x-gzip",
        b"application/zstd",
    ];
    let Some(ct) = content_type.map(HeaderValue::as_bytes) else {
        return true;
    };
    let starts = |p: &[u8]| ct.len() >= p.len() && ct[..p.len()].eq_ignore_ascii_case(p);
    let svg = ct.windows(3).any(|w| w.eq_ignore_ascii_case(b"svg"));
    svg || !COMPRESSED.iter().any(|p| starts(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn headers(encoding: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
        h
    }

    fn html() -> Bytes {
        Bytes::from("<p>launch day</p>".repeat(200))
    }

    #[test]
    fn identity_passes_through_without_a_copy() {
        let body = html();
        let out = decode(&HeaderMap::new(), body.clone()).expect("identity");
        assert_eq!(out.as_ptr(), body.as_ptr());
        assert_eq!(
            decode(&headers("identity"), body.clone()).expect("id"),
            body
        );
    }

    #[test]
    fn gzip_and_brotli_from_the_back_end_are_decoded() {
        let [_, gz, br] = variants(html());
        assert_eq!(decode(&headers("gzip"), gz.body).expect("gzip"), html());
        assert_eq!(decode(&headers("br"), br.body).expect("br"), html());
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"x").expect("write");
        let gz = Bytes::from(enc.finish().expect("gzip"));
        assert_eq!(decode(&headers("X-GZIP"), gz).expect("x-gzip"), "x");
    }

    #[test]
    fn other_or_stacked_or_broken_codings_are_refused() {
        let e = decode(&headers("zstd"), html());
        assert!(matches!(e, Err(CodingError::Unsupported(c)) if c == "zstd"));
        let e = decode(&headers("gzip, br"), html());
        assert!(matches!(e, Err(CodingError::Unsupported(_))));
        let e = decode(&headers("gzip"), Bytes::from_static(b"not gzip at all"));
        assert!(matches!(e, Err(CodingError::Decode("gzip", _))));
    }

    #[test]
    fn encode_falls_back_to_identity_when_it_does_not_pay() {
        let [id, gz, br] = encode(html(), None);
        assert!(id.1.is_none());
        assert_eq!(gz.1.as_ref().map(HeaderValue::as_bytes), Some(&b"gzip"[..]));
        assert_eq!(br.1.as_ref().map(HeaderValue::as_bytes), Some(&b"br"[..]));
        assert!(gz.0.len() < id.0.len() && br.0.len() < id.0.len());
        // Two bytes never compress smaller.
        let [_, gz, br] = encode(Bytes::from_static(b"hi"), None);
        assert!(gz.1.is_none() && br.1.is_none());
        // Already-compressed types are not compressed again.
        let png = HeaderValue::from_static("image/png");
        let [_, gz, br] = encode(html(), Some(&png));
        assert!(gz.1.is_none() && br.1.is_none());
    }

    #[test]
    fn compressible_types() {
        let ok = |s: &'static str| compressible(Some(&HeaderValue::from_static(s)));
        assert!(ok("text/html; charset=utf-8"));
        assert!(ok("application/json"));
        assert!(ok("image/svg+xml"));
        assert!(!ok("IMAGE/PNG"));
        assert!(!ok("font/woff2"));
        assert!(!ok("application/zip"));
        assert!(compressible(None));
    }
}
