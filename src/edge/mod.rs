//! Edge snapshots ("staticify"): hot pages served from memory, refreshed in the
//! background, never a thundering herd.
//!
//! A [`SnapshotSpec`] names one page (exact path, optional query, optional host) of a
//! pool. [`Snapshots`] keeps, per spec, one copy of that page and one background task
//! that fetches it through a [`Fetch`] (the pool's normal admission and upstream)
//! right away and then every `refresh`. Requests for the page are answered from the
//! copy ([`Snapshots::serve`]), so the back ends see at most one request per page per
//! interval however many people arrive.
//!
//! Invariants:
//! - At most one fetch per snapshot is in flight, ever: only its task fetches, one
//!   fetch at a time. [`Snapshots::refresh_now`] asks that task for a fetch; asked
//!   while one runs, it gets exactly one more right after (one that starts after the
//!   request, so a page changed just before is seen), however often it was asked.
//! - Before the first fetch of a snapshot has finished, a request waits for that
//!   fetch (single-flight) rather than starting its own; if it fails, the waiters fall
//!   through to normal proxying. The wait is bounded by the fetch ([`FETCH_TIMEOUT`]).
//! - Only a `200` replaces the copy. After a failed or non-`200` refresh the last good
//!   copy is served until `max_stale` after it was fetched; then the page falls
//!   through (and so to admission and the maintenance page). While there is no copy to
//!   serve, failed fetches are retried every second (if `refresh` is longer), as
//!   every request reaches the back end meanwhile anyway.
//! - Only `GET` and `HEAD` are served; with `ignore_cookies = false` a request that
//!   carries `Cookie` falls through. `Cache-Control: no-cache` from a client does not
//!   bypass the copy (a shift-reload storm must not reach the back end).
//! - A reload ([`Snapshots::reconfigure`]) keeps the copy and the task of every entry
//!   whose pool, host, path and `ignore_cookies` are unchanged (its `refresh` and
//!   `max_stale` change in place); removed entries' tasks stop.
//!
//! Submodules: `registry` (the table, lookups, reloads), `refresher` (one snapshot's
//! state and task), `page` (a stored copy and its prebuilt answers), `coding`
//! (decoding and precompression), `validators` and `httpdate` (`ETag`,
//! `If-None-Match`, `If-Modified-Since`), `metrics`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};

use crate::body::Body;

mod coding;
mod httpdate;
mod metrics;
mod page;
mod refresher;
mod registry;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod validators;

pub use coding::MAX_BODY;
pub use metrics::SnapshotMetrics;
pub use registry::Snapshots;

/// Default `refresh`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);
/// Default `max_stale`.
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(3600);
/// Shortest interval between two fetches of one snapshot (a smaller `refresh` is
/// raised to it).
pub const MIN_REFRESH: Duration = Duration::from_millis(100);
/// Longest a fetch may take; a fetch still running then is dropped (its lease
/// released) and counts as an `error`.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// The header the fetcher should add so the back end knows who asks.
pub static X_LAUNCHDAY_SNAPSHOT: http::HeaderName =
    http::HeaderName::from_static("x-launchday-snapshot");

/// One snapshotted page, as the config says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSpec {
    /// Label in metrics and the admin API, e.g. `blog:/`; unique.
    pub name: String,
    /// The pool the page is fetched from.
    pub pool: String,
    /// The request host it is served for (lowercase, no port); `None`: any host.
    pub host: Option<String>,
    /// Path with optional `?query`, matched exactly against a request's path and
    /// query.
    pub path: String,
    /// Interval between fetches. Default [`DEFAULT_REFRESH`].
    pub refresh: Duration,
    /// How long after it was fetched a copy may be served. Default
    /// [`DEFAULT_MAX_STALE`]. Should be at least `refresh`.
    pub max_stale: Duration,
    /// `true`: the same copy for everyone; `false`: requests carrying `Cookie` fall
    /// through. Default `true`.
    pub ignore_cookies: bool,
}

impl SnapshotSpec {
    /// A spec with the defaults: any host, `refresh` 60 s, `max_stale` 1 h, cookies
    /// ignored.
    pub fn new(name: impl Into<String>, pool: impl Into<String>, path: impl Into<String>) -> Self {
        SnapshotSpec {
            name: name.into(),
            pool: pool.into(),
            host: None,
            path: path.into(),
            refresh: DEFAULT_REFRESH,
            max_stale: DEFAULT_MAX_STALE,
            ignore_cookies: true,
        }
    }

    /// Whether `other` is the same page served to the same requests (a reload keeps
    /// the copy then).
    pub fn same_page(&self, other: &SnapshotSpec) -> bool {
        self.pool == other.pool
            && self.host == other.host
            && self.path == other.path
            && self.ignore_cookies == other.ignore_cookies
    }
}

/// A back end's answer to a snapshot fetch, read in full.
#[derive(Debug, Clone)]
pub struct FetchedPage {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why a fetch produced no answer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The pool did not admit the fetch (queue full, no healthy back end, manual
    /// maintenance...); the reason as in `launchday_shed_total`.
    #[error("not admitted by the pool: {0}")]
    Shed(&'static str),
    /// The back end could not be reached, or failed before the body was complete.
    #[error("fetching from the back end: {0}")]
    Upstream(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The body was larger than the fetcher's limit.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// The fetch took longer than [`FETCH_TIMEOUT`] (or the fetcher's own limit).
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
}

/// The future a [`Fetch`] returns.
pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<FetchedPage, FetchError>> + Send + 'a>>;

/// How a snapshot's page is fetched.
///
/// The implementation should send `GET spec.path` (with `Host: spec.host` when set)
/// through the pool's admission and selection, add `X-Launchday-Snapshot: 1`
/// ([`X_LAUNCHDAY_SNAPSHOT`]), ask for identity (`Accept-Encoding: identity`; gzip
/// and brotli answers are decoded, other codings refused) and read the body in full,
/// bounded by a size limit (at most [`MAX_BODY`]). It is only ever called by
/// the snapshot's own task, one call at a time per snapshot; dropping the future
/// (timeout, reload) must release whatever it holds.
pub trait Fetch: Send + Sync + 'static {
    fn fetch<'a>(&'a self, spec: &'a SnapshotSpec) -> FetchFuture<'a>;
}

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("snapshots must be created inside a Tokio runtime")]
    NoRuntime,
    #[error("two snapshots for host {host:?} and path {path:?}")]
    Duplicate { host: Option<String>, path: String },
    #[error("two snapshots named {0:?}")]
    DuplicateName(String),
    #[error("snapshot {name:?}: path {path:?} does not start with /")]
    Path { name: String, path: String },
    #[error("no snapshot named {0:?}")]
    Unknown(String),
}

/// How a refresh ended (the `result` label of `launchday_snapshot_refreshes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RefreshResult {
    /// A `200`: the copy was replaced.
    #[serde(rename = "ok")]
    Ok = 0,
    /// No answer, or one that could not be stored.
    #[serde(rename = "error")]
    Error = 1,
    /// An answer other than `200`: the copy was kept.
    #[serde(rename = "not_200")]
    Not200 = 2,
}

impl RefreshResult {
    pub const ALL: [RefreshResult; 3] = [
        RefreshResult::Ok,
        RefreshResult::Error,
        RefreshResult::Not200,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshResult::Ok => "ok",
            RefreshResult::Error => "error",
            RefreshResult::Not200 => "not_200",
        }
    }
}

/// A request answered from a snapshot.
#[derive(Debug)]
pub struct Hit {
    /// `200` (body empty for `HEAD`) or `304`.
    pub response: Response<Body>,
    /// The snapshot's pool, for per-pool request metrics.
    pub pool: Arc<str>,
}

/// One snapshot's state, for the status page and `/api/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotStatus {
    pub name: String,
    pub pool: String,
    pub host: Option<String>,
    pub path: String,
    pub refresh_seconds: f64,
    pub max_stale_seconds: f64,
    /// Seconds since the last good copy was fetched; `None` before the first.
    pub age_seconds: Option<f64>,
    /// Whether requests are answered from the copy now.
    pub serving: bool,
    /// Uncompressed size of the copy.
    pub bytes: Option<usize>,
    /// Fetches finished so far (by this entry: a reload that keeps it keeps counting).
    pub fetches: u64,
    pub last_result: Option<RefreshResult>,
}
