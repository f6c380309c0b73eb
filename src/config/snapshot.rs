//! The validated, immutable configuration: typed values only.
//!
//! A [`Snapshot`] is produced by [`super::validate`] from the serde model and is
//! never mutated afterwards. Every value in it has already been checked: addresses
//! are `SocketAddr`s (back ends resolved to IPv6 unless `allow_ipv4_backends`),
//! durations are `Duration`s, route targets are indices into `pools`, names are
//! unique, files exist. Code that holds a `Snapshot` never re-validates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderValue;
use ipnet::IpNet;

pub use crate::tls::certs::LoadedCert;

/// One whole, valid configuration.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The file this snapshot was read from (`None` for built-in configs such as the demo).
    pub source: Option<PathBuf>,
    /// How long in-flight requests may take to finish on SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Worker threads of the runtime (`threads`, default `available_parallelism()`).
    pub threads: usize,
    /// The runtime's scheduling policy (`scheduling`, default fair); only the
    /// value at start counts.
    pub scheduling: crate::sched::Scheduling,
    /// How long a worker out of work keeps polling for I/O before it sleeps
    /// (`busy_poll`, zero: off); only the value at start counts.
    pub busy_poll: Duration,
    /// Whether back ends may have IPv4 addresses.
    pub allow_ipv4_backends: bool,
    /// Unix socket for zero-downtime binary upgrades.
    pub upgrade_socket: PathBuf,
    /// Peers whose `X-Forwarded-For`/`X-Real-IP`/`Forwarded` are kept (appended to).
    pub trusted_proxies: Vec<IpNet>,
    pub admin: AdminSpec,
    /// Public listeners, in config order; names are unique, bind addresses unique across all.
    pub listeners: Vec<ListenerSpec>,
    /// Routes in config order; each `pool` is an index into `pools`.
    pub routes: Vec<RouteSpec>,
    /// Pools sorted by name; names are unique.
    pub pools: Vec<PoolSpec>,
    pub maintenance: MaintenanceSpec,
    pub limits: LimitsSpec,
    /// `None` = no access log.
    pub access_log: Option<AccessLogSpec>,
    /// Edge snapshots, one per (host, path); `(host, path)` pairs are unique.
    pub snapshots: Vec<EdgeSnapshotSpec>,
}

/// One page kept as an edge snapshot (a `[[snapshots]]` entry has one per path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSnapshotSpec {
    /// The metric label: `host` + `path`, or `path` alone.
    pub name: String,
    /// Index into `pools`.
    pub pool: usize,
    /// Lowercase host name without port; `None` = any host.
    pub host: Option<String>,
    /// Path with optional `?query`, matched exactly against the request target.
    pub path: String,
    /// Time between fetches (default 60s).
    pub refresh: Duration,
    /// How long the last good copy may be served after it was fetched, while fetches
    /// fail (default 1h).
    pub max_stale: Duration,
    /// Requests with cookies get the snapshot too (default `true`).
    pub ignore_cookies: bool,
}

/// Where and how the access log is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogSpec {
    /// `None` = stderr.
    pub path: Option<PathBuf>,
    pub format: AccessLogFormat,
}

/// An access-log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Combined,
    Json,
}

impl Snapshot {
    /// The index of the pool called `name`.
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct AdminSpec {
    /// Admin listener addresses (metrics, status, API). Default `["127.0.0.1:9090"]`;
    /// loopback only unless `allow_remote`.
    pub listen: Vec<SocketAddr>,
    /// Bearer token every admin request must carry (from `token_file`), if set.
    pub token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub name: String,
    /// Each address gets its own socket; IPv6 ones are `IPV6_V6ONLY`.
    pub bind: Vec<SocketAddr>,
    /// Plain listener answering `308` to `https://`.
    pub redirect_https: bool,
    /// TLS settings; `None` = plain HTTP.
    pub tls: Option<TlsSpec>,
    /// Connections start with a PROXY protocol header naming the client.
    pub proxy_protocol: bool,
}

/// `[listeners.tls]`: certificates (loaded and checked), default, HSTS.
#[derive(Debug, Clone)]
pub struct TlsSpec {
    /// In config order; never empty.
    pub certificates: Vec<LoadedCert>,
    /// Index of the certificate for clients without SNI or with an unknown name.
    pub default: usize,
    /// `Strict-Transport-Security` value added to every answer.
    pub hsts: Option<HeaderValue>,
}

/// How a route's host is matched (case-insensitively, port stripped).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    /// No `host` key: matches every host.
    Any,
    /// `host = "blog.example.org"`, stored lower-case.
    Exact(String),
    /// `host = "*.example.org"`: stored as the lower-case suffix `.example.org`;
    /// matches `a.example.org` and `a.b.example.org`, not `example.org`.
    Wildcard(String),
}

/// Request class for admission priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Read,
    Write,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub host: HostMatch,
    /// Always starts with `/`; default `/`.
    pub path_prefix: String,
    /// Index into `Snapshot::pools`.
    pub pool: usize,
    /// `Some(Class::Write)` when the route says `class = "write"`; `None` = by method.
    pub class: Option<Class>,
}

#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub name: String,
    /// Maximum waiting requests (default 1024).
    pub queue_depth: usize,
    /// Longest wait in the queue (default 1s).
    pub queue_timeout: Duration,
    /// Manual maintenance: shed everything.
    pub maintenance: bool,
    /// In config order; names unique within the pool. May be empty only if `maintenance`.
    pub backends: Vec<BackendSpec>,
    pub health_check: Option<HealthCheckSpec>,
    /// Tries on another back end after a safe-to-retry failure (default 1).
    pub retries: u32,
    /// Consecutive connect failures / 5xx that take a back end out; 0 = off (default).
    pub passive_failures: u32,
    /// How long passive checks keep a back end out (default 10s).
    pub passive_cooldown: Duration,
    /// Ramp from ~0 to full weight after coming up; zero = off (default).
    pub slow_start: Duration,
}

#[derive(Debug, Clone)]
pub struct BackendSpec {
    pub name: String,
    /// The address as written in the config (for status pages and logs).
    pub address_text: String,
    /// Resolved address: IPv6 unless `allow_ipv4_backends`.
    pub address: SocketAddr,
    /// 0 = drained (no new requests). Default 1.
    pub weight: u32,
    /// Concurrent requests in flight to this back end, open upgrade tunnels included;
    /// `None` = unlimited (default).
    pub max_connections: Option<u32>,
    /// Value for `X-Served-By` when the back end sends none.
    pub served_by: Option<HeaderValue>,
    /// Only used while no primary back end is up.
    pub backup: bool,
}

#[derive(Debug, Clone)]
pub struct HealthCheckSpec {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Healthy status codes; empty = any 2xx or 3xx (default).
    pub expect_status: Vec<u16>,
    /// `Host` of the check request; `None` = the back end's address.
    pub host: Option<String>,
}

#[derive(Debug, Clone)]
pub struct MaintenanceSpec {
    /// Template file (resolved against the config file's directory); `None` = built-in page.
    pub page: Option<PathBuf>,
    /// The template's text, read once at validation (`None` = built-in page).
    pub template: Option<String>,
    /// `Retry-After` (default 30s).
    pub retry_after: Duration,
    /// HTML inserted at `{{analytics}}` (default empty).
    pub analytics: String,
}

#[derive(Debug, Clone)]
pub struct LimitsSpec {
    /// Deadline for the whole request head (default 10s).
    pub header_timeout: Duration,
    /// Keep-alive idle timeout, and the longest silence of an upgrade tunnel
    /// (default 60s).
    pub idle_timeout: Duration,
    /// Longest pause between two reads of a request body (default 60s).
    pub body_timeout: Duration,
    /// Header fields per request (default 100).
    pub max_headers: usize,
    /// Request line plus header fields, bytes (default 64 KiB).
    pub max_header_bytes: usize,
    /// Request target length, bytes (default 8 KiB).
    pub max_uri_bytes: usize,
    /// Request body size; `None` = unlimited (default).
    pub max_body_bytes: Option<u64>,
    /// Open client connections per listener, upgrade tunnels included (default 10000).
    pub max_connections: usize,
    /// Connecting to a back end (default 5s).
    pub upstream_connect_timeout: Duration,
    /// Waiting for a response head, and longest pause in its body (default 60s).
    pub upstream_read_timeout: Duration,
    /// Longest pause while sending a request to a back end (default 60s).
    pub upstream_write_timeout: Duration,
}

impl Default for LimitsSpec {
    /// The documented defaults.
    fn default() -> Self {
        LimitsSpec {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: None,
            max_connections: 10_000,
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_read_timeout: Duration::from_secs(60),
            upstream_write_timeout: Duration::from_secs(60),
        }
    }
}
