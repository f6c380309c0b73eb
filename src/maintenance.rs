//! The maintenance page: rendered and compressed once per snapshot, served from memory.
//!
//! The template (the `maintenance.page` file, or a built-in page) has its placeholders
//! filled once: `{{analytics}}` with the configured snippet, `{{message}}` with the
//! text for the request's class, `{{retry_after}}` with the seconds. A first-party
//! beacon (`<img src="/.well-known/launchday/beacon">`) is put before `</body>` so
//! every page view that a browser renders is counted, whatever analytics vendor is
//! configured. Two variants are rendered — for reads, and for writes (saying plainly
//! that the submission was NOT saved; a template without `{{message}}` gets that notice
//! right after `<body>`) — each stored as identity, gzip and brotli `Bytes`.
//!
//! Invariant: serving a page clones `Bytes` (a reference count) and static header
//! values; it renders, compresses and reads nothing.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::body::Body;
use crate::config::{Class, MaintenanceSpec};
use crate::headers::{X_LAUNCHDAY_ERROR, X_SERVED_BY};
use crate::proxy::Wire;

/// Path of the first-party beacon, answered by every public listener.
pub const BEACON_PATH: &str = "/.well-known/launchday/beacon";

const BUILT_IN: &str = include_str!("maintenance.html");

const READ_MESSAGE: &str = "So many people came at once that we can't show this page right now. \
     It will be back in a moment: this page reloads by itself.";
const WRITE_MESSAGE: &str =
    "<strong>Your submission was NOT saved.</strong> So many people came at once \
     that we could not accept it. Copy your text somewhere safe and send it again in a minute.";

/// A content coding of the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity = 0,
    Gzip = 1,
    Brotli = 2,
}

/// One content coding of a page (also used by [`crate::edge`] snapshots).
#[derive(Debug, Clone)]
pub(crate) struct Variant {
    pub(crate) body: Bytes,
    pub(crate) encoding: Option<HeaderValue>,
    pub(crate) length: HeaderValue,
}

/// The rendered page, all variants.
#[derive(Debug, Clone)]
pub struct MaintenancePage {
    /// `[class][encoding]`: class 0 = read, 1 = write.
    variants: [[Variant; 3]; 2],
    retry_after: HeaderValue,
    /// `[class][encoding]`: the answer's headers for each shed reason, built once, so
    /// that an answer costs one header-map clone rather than eight inserts; and the
    /// same headers encoded for launchday's own HTTP/1.1 writer (no map at all).
    headers: [[Vec<Prebuilt>; 3]; 2],
}

/// One shed reason's answer headers: as a map, and as encoded lines.
type Prebuilt = (&'static str, HeaderMap, Bytes);

/// Every shed reason (`pool::Shed::reason`), for the prebuilt headers.
const REASONS: [&str; 5] = [
    "queue_full",
    "queue_timeout",
    "predicted_wait",
    "no_backend",
    "manual",
];

/// `headers` as HTTP/1.1 header lines (lower-case names, each ending in CRLF),
/// without `content-length`: [`crate::h1_server`] writes that from the body.
fn encoded_lines(headers: &HeaderMap) -> Bytes {
    let mut out = Vec::with_capacity(256);
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    Bytes::from(out)
}

/// The headers of one variant's answer for `reason`.
fn answer_headers(v: &Variant, retry_after: &HeaderValue, reason: &'static str) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(8);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, v.length.clone());
    h.insert(header::RETRY_AFTER, retry_after.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if let Some(e) = &v.encoding {
        h.insert(header::CONTENT_ENCODING, e.clone());
    }
    h.insert(X_SERVED_BY.clone(), HeaderValue::from_static("launchday"));
    h.insert(X_LAUNCHDAY_ERROR.clone(), HeaderValue::from_static(reason));
    h
}

impl MaintenancePage {
    /// Renders and compresses the page of a snapshot.
    pub fn new(spec: &MaintenanceSpec) -> Self {
        let template = spec.template.as_deref().unwrap_or(BUILT_IN);
        Self::render(template, &spec.analytics, spec.retry_after)
    }

    /// Renders `template` (see the module docs for the placeholders).
    pub fn render(template: &str, analytics: &str, retry_after: Duration) -> Self {
        let secs = retry_after.as_secs().max(1);
        let make = |message: &str, write: bool| {
            let mut html = template
                .replace("{{analytics}}", analytics)
                .replace("{{retry_after}}", &secs.to_string());
            if html.contains("{{message}}") {
                html = html.replace("{{message}}", message);
            } else if write {
                let notice = format!("<p role=\"alert\">{message}</p>");
                html = insert_after_body_tag(&html, &notice);
            }
            let beacon = format!(
                "<img src=\"{BEACON_PATH}\" alt=\"\" width=\"1\" height=\"1\" style=\"position:absolute;left:-9999px\">"
            );
            html = match html.rfind("</body>") {
                Some(i) => format!("{}{beacon}{}", &html[..i], &html[i..]),
                None => format!("{html}{beacon}"),
            };
            variants(Bytes::from(html))
        };
        let variants = [make(READ_MESSAGE, false), make(WRITE_MESSAGE, true)];
        let retry_after = HeaderValue::from(secs);
        let headers = variants.each_ref().map(|class| {
            class.each_ref().map(|v| {
                REASONS
                    .iter()
                    .map(|r| {
                        let h = answer_headers(v, &retry_after, r);
                        let lines = encoded_lines(&h);
                        (*r, h, lines)
                    })
                    .collect()
            })
        });
        MaintenancePage {
            variants,
            retry_after,
            headers,
        }
    }

    /// The uncompressed page for `class` (for tests and the status page).
    pub fn html(&self, class: Class) -> &Bytes {
        &self.variants[class_index(class)][Encoding::Identity as usize].body
    }

    /// The `503` answer for a shed request of `class`, in the best encoding the client
    /// accepts. `reason` goes into `X-Launchday-Error`.
    pub fn response(
        &self,
        class: Class,
        accept_encoding: Option<&HeaderValue>,
        reason: &'static str,
        wire: Wire,
    ) -> Response<Body> {
        let encoding = negotiate(accept_encoding);
        let v = &self.variants[class_index(class)][encoding as usize];
        let prebuilt = &self.headers[class_index(class)][encoding as usize];
        let found = prebuilt.iter().find(|(r, ..)| *r == reason);
        let mut resp = match (wire, found) {
            (Wire::Own, Some((_, _, lines))) => Response::new(Body::Page {
                head: lines.clone(),
                body: Some(v.body.clone()),
            }),
            (_, found) => {
                let mut resp = Response::new(Body::Full(Some(v.body.clone())));
                *resp.headers_mut() = match found {
                    Some((_, h, _)) => h.clone(),
                    None => answer_headers(v, &self.retry_after, reason),
                };
                resp
            }
        };
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        resp
    }
}

fn class_index(class: Class) -> usize {
    match class {
        Class::Read => 0,
        Class::Write => 1,
    }
}

fn insert_after_body_tag(html: &str, notice: &str) -> String {
    let lower = html.to_ascii_lowercase();
    match lower
        .find("<body")
        .and_then(|i| lower[i..].find('>').map(|j| i + j + 1))
    {
        Some(at) => format!("{}{notice}{}", &html[..at], &html[at..]),
        None => format!("{notice}{html}"),
    }
}

/// The identity, gzip and brotli variants of `identity`, in [`Encoding`] order.
pub(crate) fn variants(identity: Bytes) -> [Variant; 3] {
    let gzip = {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        // Writing into a Vec cannot fail.
        let _ = enc.write_all(&identity);
        enc.finish().unwrap_or_default()
    };
    let brotli = {
        let mut out = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut out, 4096, 11, 22);
            let _ = w.write_all(&identity);
        }
        out
    };
    let v = |body: Vec<u8>, enc: Option<&'static str>| Variant {
        length: HeaderValue::from(body.len()),
        body: Bytes::from(body),
        encoding: enc.map(HeaderValue::from_static),
    };
    [
        v(identity.to_vec(), None),
        v(gzip, Some("gzip")),
        v(brotli, Some("br")),
    ]
}

/// Picks the encoding: brotli, then gzip, then identity, among those the client
/// accepts with q > 0 (`*` counts for both).
pub fn negotiate(accept: Option<&HeaderValue>) -> Encoding {
    let Some(text) = accept.and_then(|v| v.to_str().ok()) else {
        return Encoding::Identity;
    };
    let (mut br, mut gzip, mut star) = (None, None, None);
    for item in text.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .filter_map(|q| q.trim().parse::<f32>().ok())
            .next()
            .unwrap_or(1.0);
        if coding.eq_ignore_ascii_case("br") {
            br = Some(q);
        } else if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(q);
        } else if coding == "*" {
            star = Some(q);
        }
    }
    let ok = |q: Option<f32>| q.or(star).is_some_and(|q| q > 0.0);
    if ok(br) {
        Encoding::Brotli
    } else if ok(gzip) {
        Encoding::Gzip
    } else {
        Encoding::Identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn page() -> MaintenancePage {
        MaintenancePage::render(
            "<html><body><h1>Busy</h1><p>{{message}}</p>{{analytics}}</body></html>",
            "<script>track()</script>",
            Duration::from_secs(30),
        )
    }

    fn hv(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    #[test]
    fn negotiation_prefers_br_then_gzip_and_honours_q0() {
        assert_eq!(negotiate(None), Encoding::Identity);
        assert_eq!(negotiate(Some(&hv("gzip, deflate, br"))), Encoding::Brotli);
        assert_eq!(negotiate(Some(&hv("gzip"))), Encoding::Gzip);
        assert_eq!(negotiate(Some(&hv("br;q=0, gzip;q=0.5"))), Encoding::Gzip);
        assert_eq!(negotiate(Some(&hv("*"))), Encoding::Brotli);
        assert_eq!(negotiate(Some(&hv("*;q=0, identity"))), Encoding::Identity);
        assert_eq!(negotiate(Some(&hv("deflate"))), Encoding::Identity);
    }

    #[test]
    fn placeholders_beacon_and_write_notice() {
        let p = page();
        let read = std::str::from_utf8(p.html(Class::Read)).expect("utf8");
        assert!(read.contains("<script>track()</script>"));
        assert!(read.contains(BEACON_PATH));
        assert!(read.find(BEACON_PATH) < read.find("</body>"));
        assert!(!read.contains("NOT saved"));
        let write = std::str::from_utf8(p.html(Class::Write)).expect("utf8");
        assert!(write.contains("Your submission was NOT saved."));
        // Without {{message}}, the write notice goes right after <body>.
        let bare =
            MaintenancePage::render("<HTML><BODY class=x>hi</BODY></HTML>", "", Duration::ZERO);
        let w = std::str::from_utf8(bare.html(Class::Write)).expect("utf8");
        assert!(
            w.starts_with("<HTML><BODY class=x><p role=\"alert\"><strong>Your submission"),
            "{w}"
        );
    }

    #[test]
    fn compressed_variants_decode_to_the_page() {
        let p = page();
        let resp = p.response(Class::Read, Some(&hv("gzip")), "queue_full", Wire::Hyper);
        assert_eq!(resp.headers()["content-encoding"], "gzip");
        let Body::Full(Some(gz)) = resp.into_body() else {
            panic!("full body")
        };
        let mut out = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut out)
            .expect("gunzip");
        assert_eq!(out.as_bytes(), &p.html(Class::Read)[..]);
        let resp = p.response(Class::Write, Some(&hv("br")), "queue_full", Wire::Hyper);
        let Body::Full(Some(br)) = resp.into_body() else {
            panic!("full body")
        };
        let mut out = Vec::new();
        brotli::Decompressor::new(&br[..], 4096)
            .read_to_end(&mut out)
            .expect("unbrotli");
        assert_eq!(&out[..], &p.html(Class::Write)[..]);
    }

    #[test]
    fn response_headers() {
        let resp = page().response(Class::Read, None, "manual", Wire::Hyper);
        assert_eq!(resp.status(), 503);
        let h = resp.headers();
        assert_eq!(h["retry-after"], "30");
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(h["content-type"], "text/html; charset=utf-8");
        assert_eq!(h["vary"], "Accept-Encoding");
        assert_eq!(h["x-served-by"], "launchday");
        assert_eq!(h["x-launchday-error"], "manual");
        assert!(h.get("content-encoding").is_none());
    }

    #[test]
    fn the_own_writer_gets_the_same_headers_encoded_and_the_same_body() {
        let p = page();
        for (class, enc) in [(Class::Read, None), (Class::Write, Some(hv("gzip")))] {
            for reason in REASONS {
                let map = p.response(class, enc.as_ref(), reason, Wire::Hyper);
                let own = p.response(class, enc.as_ref(), reason, Wire::Own);
                assert_eq!(own.status(), 503);
                assert!(own.headers().is_empty(), "no map for the own writer");
                let (map_parts, Body::Full(Some(map_body))) = map.into_parts() else {
                    panic!("full body")
                };
                let Body::Page {
                    head,
                    body: Some(body),
                } = own.into_body()
                else {
                    panic!("page body")
                };
                assert_eq!(body, map_body);
                let mut want = String::new();
                for (n, v) in &map_parts.headers {
                    if n != header::CONTENT_LENGTH {
                        want.push_str(&format!("{n}: {}\r\n", v.to_str().expect("ascii")));
                    }
                }
                assert_eq!(String::from_utf8_lossy(&head), want);
                assert!(want.contains(&format!("x-launchday-error: {reason}\r\n")));
            }
        }
    }

    #[test]
    fn built_in_page_has_every_placeholder() {
        assert!(BUILT_IN.contains("{{message}}"));
        assert!(BUILT_IN.contains("{{analytics}}"));
        assert!(BUILT_IN.contains("</body>"));
    }
}
