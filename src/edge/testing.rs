//! Test helpers: a fake [`Fetch`] that counts calls and concurrent calls, per path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use parking_lot::Mutex;
use prometheus::Registry;

use super::{
    Fetch, FetchError, FetchFuture, FetchedPage, SnapshotMetrics, SnapshotSpec, Snapshots,
};
use crate::body::Body;

/// What the fake back end answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// `200` with this HTML.
    Page(&'static str),
    /// This status, a short body.
    Status(u16),
    /// No answer at all.
    Fail,
}

/// A fake back end for snapshot fetches.
#[derive(Debug)]
pub struct FakeFetch {
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    per_path: Mutex<HashMap<String, usize>>,
    delay: Mutex<Duration>,
    answer: Mutex<Answer>,
}

impl FakeFetch {
    pub fn new(answer: Answer) -> Arc<Self> {
        Arc::new(FakeFetch {
            calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            per_path: Mutex::default(),
            delay: Mutex::new(Duration::ZERO),
            answer: Mutex::new(answer),
        })
    }

    pub fn set(&self, answer: Answer) {
        *self.answer.lock() = answer;
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock() = delay;
    }

    /// Fetches started so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Fetches started so far for `path`.
    pub fn calls_for(&self, path: &str) -> usize {
        self.per_path.lock().get(path).copied().unwrap_or(0)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The most fetches ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Fetch for FakeFetch {
    fn fetch<'a>(&'a self, spec: &'a SnapshotSpec) -> FetchFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            *self.per_path.lock().entry(spec.path.clone()).or_default() += 1;
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let _in_flight = InFlight(&self.in_flight);
            let delay = *self.delay.lock();
            tokio::time::sleep(delay).await;
            let answer = self.answer.lock().clone();
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            match answer {
                Answer::Page(html) => Ok(FetchedPage {
                    status: StatusCode::OK,
                    headers,
                    body: Bytes::from_static(html.as_bytes()),
                }),
                Answer::Status(code) => Ok(FetchedPage {
                    status: StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                    headers,
                    body: Bytes::from_static(b"oops"),
                }),
                Answer::Fail => Err(FetchError::Shed("queue_full")),
            }
        })
    }
}

/// A spec with the defaults but `refresh` and `max_stale`.
pub fn spec(name: &str, path: &str, refresh: u64, max_stale: u64) -> SnapshotSpec {
    SnapshotSpec {
        refresh: Duration::from_secs(refresh),
        max_stale: Duration::from_secs(max_stale),
        ..SnapshotSpec::new(name, "blog", path)
    }
}

/// Snapshots over `fake`, with their own registry.
pub fn snapshots(specs: Vec<SnapshotSpec>, fake: &Arc<FakeFetch>) -> (Arc<Snapshots>, Registry) {
    let registry = Registry::new();
    let metrics = SnapshotMetrics::register(&registry).expect("metrics");
    let fetcher: Arc<dyn Fetch> = fake.clone();
    let s = Snapshots::new(specs, fetcher, metrics).expect("snapshots");
    (Arc::new(s), registry)
}

/// `GET path` with `headers` (any host).
pub async fn get(s: &Snapshots, path: &str, headers: &HeaderMap) -> Option<Response<Body>> {
    s.serve(&Method::GET, None, path, headers)
        .await
        .map(|hit| hit.response)
}

/// Request headers from `(name, value)` pairs.
pub fn req(pairs: &[(header::HeaderName, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(k.clone(), HeaderValue::from_static(v));
    }
    h
}

/// The body of a response answered from a copy.
pub fn body(resp: Response<Body>) -> Bytes {
    match resp.into_body() {
        Body::Full(Some(b)) => b,
        _ => Bytes::new(),
    }
}

/// The text format of `registry`.
pub fn metrics_text(registry: &Registry) -> String {
    let mut out = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &registry.gather(),
        &mut out,
    )
    .expect("encode");
    String::from_utf8(out).expect("utf8")
}
