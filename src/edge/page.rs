//! One stored copy of a snapshotted page, and the answers prebuilt from it.
//!
//! A [`Page`] is built once per successful (`200`) fetch, off the async threads
//! (compression is CPU work, see [`super::coding`]). When a refresh brings the same
//! bytes as the copy it replaces, the old compressed variants are reused and nothing
//! is compressed again.
//!
//! Only `Content-Type`, `Cache-Control`, `Last-Modified` and `ETag` are kept from the
//! back end (never `Set-Cookie`: the same copy goes to everyone). Without a valid
//! `ETag`, a strong one is computed from the body. Compressed variants carry the weak
//! form of a strong ETag (`W/"…"`, as nginx does when it compresses): they are other
//! bytes of the same content, and `If-None-Match` compares weakly. Every answer has
//! `Vary: Accept-Encoding`, `X-Served-By: launchday snapshot` and `Age`; a `Range`
//! header is ignored (a full `200` is a valid answer to it).
//!
//! Invariant: answering allocates nothing in launchday's code but the response's own
//! header map (one clone of a prebuilt map); bodies and header values are `Bytes`
//! clones, and `Age` comes from a table of static values.

use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use tokio::time::Instant;

use super::coding::{self, CodingError};
use super::{httpdate, validators, FetchedPage};
use crate::body::Body;
use crate::headers::X_SERVED_BY;
use crate::maintenance::{negotiate, Encoding};
use crate::recycle;

/// `Age` values up to this many seconds come from a static table; older copies
/// (only with a `max_stale` above an hour) format theirs per answer.
const AGE_TABLE_SECS: u64 = 3600;

/// Why a `200` could not become a copy.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error(transparent)]
    Coding(#[from] CodingError),
}

/// The answers of one content coding.
#[derive(Debug)]
struct Variant {
    body: Bytes,
    encoding: Option<HeaderValue>,
    etag: HeaderValue,
    /// `200` headers, with an `Age` placeholder replaced per answer.
    ok: HeaderMap,
    /// `304` headers, likewise.
    not_modified: HeaderMap,
}

/// A stored copy: every answer it can give, prebuilt.
#[derive(Debug)]
pub struct Page {
    fetched_at: Instant,
    /// `Last-Modified` in seconds since the epoch, when the back end sent a valid one.
    last_modified: Option<u64>,
    /// Indexed by [`Encoding`].
    variants: [Variant; 3],
}

impl Page {
    /// Builds the copy of a `200` fetched at `fetched_at`, reusing the compressed
    /// variants of `previous` when the body is the same.
    pub fn build(
        fetched: FetchedPage,
        previous: Option<&Page>,
        fetched_at: Instant,
    ) -> Result<Page, PageError> {
        let h = &fetched.headers;
        let identity = coding::decode(h, fetched.body)?;
        let etag = match h.get(header::ETAG).map(validators::check) {
            Some(Ok(v)) => v.clone(),
            _ => validators::computed(&identity),
        };
        let last_modified = h.get(header::LAST_MODIFIED);
        let bodies: [(Bytes, Option<HeaderValue>); 3] =
            match previous.filter(|p| p.identity() == &identity) {
                Some(p) => p
                    .variants
                    .each_ref()
                    .map(|v| (v.body.clone(), v.encoding.clone())),
                None => coding::encode(identity, h.get(header::CONTENT_TYPE)),
            };
        let variants = bodies.map(|(body, encoding)| {
            let etag = match encoding {
                Some(_) => validators::weak(&etag),
                None => etag.clone(),
            };
            let mut common = HeaderMap::with_capacity(10);
            common.insert(header::ETAG, etag.clone());
            for v in h.get_all(header::CACHE_CONTROL) {
                common.append(header::CACHE_CONTROL, v.clone());
            }
            if let Some(v) = last_modified {
                common.insert(header::LAST_MODIFIED, v.clone());
            }
            common.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
            common.insert(
                X_SERVED_BY.clone(),
                HeaderValue::from_static("launchday snapshot"),
            );
            common.insert(header::AGE, age_value(0));
            let not_modified = common.clone();
            let mut ok = common;
            if let Some(v) = h.get(header::CONTENT_TYPE) {
                ok.insert(header::CONTENT_TYPE, v.clone());
            }
            if let Some(e) = &encoding {
                ok.insert(header::CONTENT_ENCODING, e.clone());
            }
            ok.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            Variant {
                body,
                encoding,
                etag,
                ok,
                not_modified,
            }
        });
        Ok(Page {
            fetched_at,
            last_modified: last_modified.and_then(|v| httpdate::parse(v.as_bytes())),
            variants,
        })
    }

    /// When the page was fetched.
    pub fn fetched_at(&self) -> Instant {
        self.fetched_at
    }

    /// The uncompressed body.
    pub fn identity(&self) -> &Bytes {
        &self.variants[Encoding::Identity as usize].body
    }

    /// The answer to a `GET` or `HEAD` with `headers` at `now`: `304` when the
    /// request's validators match, else `200` in the best coding the client accepts.
    pub fn respond(&self, method: &Method, headers: &HeaderMap, now: Instant) -> Response<Body> {
        let v = &self.variants[negotiate(headers.get(header::ACCEPT_ENCODING)) as usize];
        let age = age_value(now.saturating_duration_since(self.fetched_at).as_secs());
        let (status, prebuilt, body) = if self.not_modified(v, headers) {
            (StatusCode::NOT_MODIFIED, &v.not_modified, Body::Empty)
        } else if method == Method::HEAD {
            (StatusCode::OK, &v.ok, Body::Empty)
        } else {
            (StatusCode::OK, &v.ok, Body::Full(Some(v.body.clone())))
        };
        // Copied into a map this thread reuses (the own writer gives it back), not
        // cloned: a clone is two allocations per hit.
        let mut map = recycle::take(prebuilt.len());
        for (name, value) in prebuilt {
            map.append(name.clone(), value.clone());
        }
        // Replacing a present key's value never grows the map.
        if let Some(slot) = map.get_mut(header::AGE) {
            *slot = age;
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = map;
        resp
    }

    /// RFC 9110 §13.2.2: `If-None-Match` decides when present; else
    /// `If-Modified-Since` against `Last-Modified`.
    fn not_modified(&self, v: &Variant, headers: &HeaderMap) -> bool {
        let mut inm = headers.get_all(header::IF_NONE_MATCH).iter().peekable();
        if inm.peek().is_some() {
            return inm.any(|list| validators::matches(list.as_bytes(), &v.etag));
        }
        match (self.last_modified, headers.get(header::IF_MODIFIED_SINCE)) {
            (Some(lm), Some(ims)) => httpdate::parse(ims.as_bytes()).is_some_and(|t| t >= lm),
            _ => false,
        }
    }
}

/// The `Age` header value for `secs`: a static value (its clone touches no reference
/// count) for the first hour, formatted beyond.
fn age_value(secs: u64) -> HeaderValue {
    static TABLE: OnceLock<Box<[HeaderValue]>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut text = String::new();
        let mut ends = Vec::with_capacity(AGE_TABLE_SECS as usize + 1);
        for n in 0..=AGE_TABLE_SECS {
            text.push_str(&n.to_string());
            ends.push(text.len());
        }
        // Leaked once per process (about 14 KB) so the values are `'static`.
        let text: &'static str = Box::leak(text.into_boxed_str());
        let mut start = 0;
        ends.iter()
            .map(|&end| {
                let v = HeaderValue::from_static(&text[start..end]);
                start = end;
                v
            })
            .collect()
    });
    usize::try_from(secs)
        .ok()
        .and_then(|i| table.get(i))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::testing::{body, req};
    use std::io::Read;
    use std::time::Duration;

    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

    fn fetched(etag: Option<&'static str>) -> FetchedPage {
        let mut headers = HeaderMap::new();
        let mut put = |name, value: &'static str| {
            headers.append(name, HeaderValue::from_static(value));
        };
        put(header::CONTENT_TYPE, "text/html; charset=utf-8");
        put(header::CACHE_CONTROL, "public, max-age=60");
        put(header::LAST_MODIFIED, LM);
        put(header::SET_COOKIE, "session=secret");
        put(header::SERVER, "cms");
        if let Some(e) = etag {
            put(header::ETAG, e);
        }
        FetchedPage {
            status: StatusCode::OK,
            headers,
            body: Bytes::from("<h1>Launch</h1>".repeat(100)),
        }
    }

    fn page(etag: Option<&'static str>) -> (Page, Instant) {
        let t0 = Instant::now();
        (Page::build(fetched(etag), None, t0).expect("page"), t0)
    }

    #[test]
    fn selected_headers_only_and_ours() {
        let (p, t0) = page(Some("\"v1\""));
        let resp = p.respond(&Method::GET, &HeaderMap::new(), t0 + Duration::from_secs(7));
        assert_eq!(resp.status(), 200);
        let h = resp.headers();
        assert_eq!(h["content-type"], "text/html; charset=utf-8");
        assert_eq!(h["cache-control"], "public, max-age=60");
        assert_eq!(h["last-modified"], LM);
        assert_eq!(h["etag"], "\"v1\"");
        assert_eq!(h["vary"], "Accept-Encoding");
        assert_eq!(h["x-served-by"], "launchday snapshot");
        assert_eq!(h["age"], "7");
        assert_eq!(h["content-length"], "1500");
        assert!(h.get("set-cookie").is_none() && h.get("server").is_none());
        assert!(h.get("content-encoding").is_none());
        assert_eq!(body(resp), p.identity());
    }

    #[test]
    fn gzip_and_brotli_negotiation() {
        let (p, t0) = page(Some("\"v1\""));
        let gz = p.respond(&Method::GET, &req(&[(header::ACCEPT_ENCODING, "gzip")]), t0);
        assert_eq!(gz.headers()["content-encoding"], "gzip");
        assert_eq!(gz.headers()["etag"], "W/\"v1\"");
        let len: usize = gz.headers()["content-length"]
            .to_str()
            .expect("len")
            .parse()
            .expect("n");
        let mut out = Vec::new();
        let gz = body(gz);
        assert_eq!(gz.len(), len);
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut out)
            .expect("gunzip");
        assert_eq!(&out[..], &p.identity()[..]);

        let accept = req(&[(header::ACCEPT_ENCODING, "gzip, deflate, br")]);
        let br = p.respond(&Method::GET, &accept, t0);
        assert_eq!(br.headers()["content-encoding"], "br");
        let mut out = Vec::new();
        brotli::Decompressor::new(&body(br)[..], 4096)
            .read_to_end(&mut out)
            .expect("unbrotli");
        assert_eq!(&out[..], &p.identity()[..]);

        let none = req(&[(header::ACCEPT_ENCODING, "br;q=0, gzip;q=0")]);
        let id = p.respond(&Method::GET, &none, t0);
        assert!(id.headers().get("content-encoding").is_none());
        assert_eq!(id.headers()["etag"], "\"v1\"");
    }

    #[test]
    fn head_has_the_headers_and_no_body() {
        let (p, t0) = page(None);
        let resp = p.respond(&Method::HEAD, &req(&[(header::ACCEPT_ENCODING, "br")]), t0);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-encoding"], "br");
        assert_ne!(resp.headers()["content-length"], "0");
        assert!(matches!(resp.into_body(), Body::Empty));
    }

    #[test]
    fn if_none_match_answers_304() {
        let (p, t0) = page(Some("\"v1\""));
        for inm in ["\"v1\"", "W/\"v1\"", "\"x\", \"v1\"", "*"] {
            let resp = p.respond(&Method::GET, &req(&[(header::IF_NONE_MATCH, inm)]), t0);
            assert_eq!(resp.status(), 304, "{inm}");
            let h = resp.headers();
            assert_eq!(h["etag"], "\"v1\"");
            assert_eq!(h["cache-control"], "public, max-age=60");
            assert_eq!(h["last-modified"], LM);
            assert_eq!(h["age"], "0");
            assert!(h.get("content-length").is_none());
            assert!(matches!(resp.into_body(), Body::Empty));
        }
        // The gzip variant's weak tag matches the strong one the client holds.
        let h = req(&[
            (header::IF_NONE_MATCH, "\"v1\""),
            (header::ACCEPT_ENCODING, "gzip"),
        ]);
        let resp = p.respond(&Method::GET, &h, t0);
        assert_eq!(resp.status(), 304);
        assert_eq!(resp.headers()["etag"], "W/\"v1\"");
        // A different tag gets the page, even when If-Modified-Since would match.
        let h = req(&[
            (header::IF_NONE_MATCH, "\"v0\""),
            (header::IF_MODIFIED_SINCE, LM),
        ]);
        assert_eq!(p.respond(&Method::GET, &h, t0).status(), 200);
    }

    #[test]
    fn if_modified_since_answers_304_when_not_older() {
        let (p, t0) = page(None);
        let status = |ims: &'static str| {
            let h = req(&[(header::IF_MODIFIED_SINCE, ims)]);
            p.respond(&Method::GET, &h, t0).status()
        };
        assert_eq!(status(LM), 304);
        assert_eq!(status("Mon, 07 Nov 1994 00:00:00 GMT"), 304);
        assert_eq!(status("Sun, 06 Nov 1994 08:49:36 GMT"), 200);
        assert_eq!(status("not a date"), 200);
        // Without Last-Modified there is nothing to compare.
        let mut f = fetched(None);
        f.headers.remove(header::LAST_MODIFIED);
        let p = Page::build(f, None, t0).expect("page");
        let h = req(&[(header::IF_MODIFIED_SINCE, LM)]);
        assert_eq!(p.respond(&Method::GET, &h, t0).status(), 200);
    }

    #[test]
    fn computed_etag_when_missing_or_malformed() {
        let (a, t0) = page(None);
        let (b, _) = page(Some("no-quotes"));
        let etag =
            |p: &Page| p.respond(&Method::GET, &HeaderMap::new(), t0).headers()["etag"].clone();
        assert_eq!(etag(&a), etag(&b));
        assert!(etag(&a).to_str().expect("ascii").starts_with('"'));
    }

    #[test]
    fn same_body_reuses_the_compressed_variants() {
        let (old, t0) = page(None);
        let later = t0 + Duration::from_secs(60);
        let new = Page::build(fetched(None), Some(&old), later).expect("page");
        for (a, b) in old.variants.iter().zip(&new.variants) {
            assert_eq!(a.body.as_ptr(), b.body.as_ptr());
        }
        assert_eq!(new.fetched_at(), later);
        let mut changed = fetched(None);
        changed.body = Bytes::from("<h1>Changed</h1>".repeat(100));
        let new = Page::build(changed, Some(&old), later).expect("page");
        assert_ne!(old.variants[1].body.as_ptr(), new.variants[1].body.as_ptr());
    }

    #[test]
    fn age_values() {
        assert_eq!(age_value(0), "0");
        assert_eq!(age_value(59), "59");
        assert_eq!(age_value(AGE_TABLE_SECS), "3600");
        assert_eq!(age_value(AGE_TABLE_SECS + 1), "3601");
        assert_eq!(age_value(86_400 * 3), "259200");
    }
}
