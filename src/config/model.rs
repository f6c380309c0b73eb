//! The serde model of the TOML config file: exactly the file's shape, nothing checked.
//!
//! Every struct denies unknown keys, so a typo is an error rather than a silently
//! ignored setting. Values that need parsing (addresses, durations, CIDRs, host
//! names) stay `String`s here and numbers stay `i64` (TOML's integer type), so that
//! [`super::validate`] can check every one of them and report all problems at
//! once instead of stopping at the first. Keys that have a default are `Option`s;
//! the defaults are applied by `validate`, and each field's doc comment states it.
//! Keys that are required are `Option`s too, so that a missing one is reported
//! alongside every other error.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootConfig {
    /// `shutdown_grace`: how long in-flight requests may take to finish on
    /// SIGTERM/SIGINT (humantime). Default `"10s"`.
    pub shutdown_grace: Option<String>,
    /// `threads`: runtime worker threads, at least 1. Default
    /// `std::thread::available_parallelism()`.
    pub threads: Option<i64>,
    /// `scheduling`: `"fair"` or `"throughput"`, how the runtime takes turns between
    /// ready connections (see [`crate::sched`]); read at start only. Default
    /// `"fair"`.
    pub scheduling: Option<String>,
    /// `busy_poll`: how long a worker that ran out of work keeps polling for I/O
    /// before it sleeps (humantime, at most 10ms; see [`crate::sched`]); read at
    /// start only. Default `"0s"` (off).
    pub busy_poll: Option<String>,
    /// `allow_ipv4_backends`: permit back ends with IPv4 addresses. Default `false`.
    pub allow_ipv4_backends: Option<bool>,
    /// `upgrade_socket`: Unix socket path on which a running instance hands its
    /// listening sockets to `launchday run --upgrade`; relative to the config file.
    /// Default `"/run/launchday.sock"`.
    pub upgrade_socket: Option<String>,
    /// `trusted_proxies`: CIDRs (`"2001:db8::/32"`) or bare IPs (a /32 or /128) whose
    /// forwarding headers are kept. Default `[]`.
    pub trusted_proxies: Option<Vec<String>>,
    /// `[admin]`: the admin listener. Default: the defaults of [`AdminConfig`].
    pub admin: Option<AdminConfig>,
    /// `[[listeners]]`: public listeners; at least one is required. No default.
    pub listeners: Option<Vec<ListenerConfig>>,
    /// `[[routes]]`: host/path routes to pools; at least one is required. No default.
    pub routes: Option<Vec<RouteConfig>>,
    /// `[pools.NAME]`: pools keyed by name (sorted, so order is stable). Default: none,
    /// but every route must name one.
    pub pools: Option<BTreeMap<String, PoolConfig>>,
    /// `[maintenance]`: the maintenance page. Default: the defaults of
    /// [`MaintenanceConfig`].
    pub maintenance: Option<MaintenanceConfig>,
    /// `[limits]`: hardening limits. Default: the defaults of [`LimitsConfig`].
    pub limits: Option<LimitsConfig>,
    /// `[access_log]`: one line per request. Default: absent, no access log.
    pub access_log: Option<AccessLogConfig>,
    /// `[[snapshots]]`: hot pages served from memory, refreshed in the background.
    /// Default: none.
    pub snapshots: Option<Vec<SnapshotConfig>>,
}

/// One `[[snapshots]]` entry: pages of one pool kept as edge snapshots.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// `pool`: the pool the pages are fetched from. Required.
    pub pool: Option<String>,
    /// `paths`: exact paths, each optionally with a query string (`"/?page=1"`).
    /// Required, non-empty.
    pub paths: Option<Vec<String>>,
    /// `host`: only requests for this host (exact name, no port). Default: any host.
    pub host: Option<String>,
    /// `refresh`: time between fetches (humantime, more than 0). Default `"60s"`.
    pub refresh: Option<String>,
    /// `max_stale`: how long the last good copy may be served while fetches fail
    /// (humantime). Default `"1h"`.
    pub max_stale: Option<String>,
    /// `ignore_cookies`: serve the same copy to requests with cookies; when `false`,
    /// requests with a `Cookie` bypass the snapshot. Default `true`.
    pub ignore_cookies: Option<bool>,
}

/// `[access_log]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// `path`: a file (appended to; relative to the config file) or `"-"` for stderr.
    /// Default `"-"`.
    pub path: Option<String>,
    /// `format`: `"combined"` (Apache/nginx combined plus launchday fields) or
    /// `"json"` (one object a line). Default `"combined"`.
    pub format: Option<String>,
}

/// `[admin]`: metrics, status page and API.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `listen`: socket addresses (IP literal and port). Default `["127.0.0.1:9090"]`;
    /// `[]` disables the admin listener.
    pub listen: Option<Vec<String>>,
    /// `allow_remote`: permit non-loopback `listen` addresses (then `token_file` is
    /// required). Default `false`.
    pub allow_remote: Option<bool>,
    /// `token_file`: file holding a bearer token every admin request must present
    /// (`Authorization: Bearer TOKEN`); relative to the config file. Default: none.
    pub token_file: Option<String>,
}

/// One `[[listeners]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `name`: unique among listeners. Required; no default.
    pub name: Option<String>,
    /// `bind`: socket addresses (IP literal and port), each its own socket, unique
    /// across all listeners and the admin listener. Required and non-empty; no default.
    pub bind: Option<Vec<String>>,
    /// `redirect_https`: answer every request with `308` to `https://`. Default `false`.
    pub redirect_https: Option<bool>,
    /// `[listeners.tls]`: present = this listener speaks TLS. Default: plain HTTP.
    pub tls: Option<TlsConfig>,
    /// `proxy_protocol`: every connection starts with a PROXY protocol v1 or v2 header
    /// whose source address is the client's. Default `false`.
    pub proxy_protocol: Option<bool>,
}

/// `[listeners.tls]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// `certificates = [{ cert, key }]`: PEM files relative to the config file. Required,
    /// non-empty; no default.
    pub certificates: Option<Vec<CertificateConfig>>,
    /// `default_certificate`: a name one of the certificates covers; its certificate
    /// goes to clients without SNI or with an unknown name. Default: the first.
    pub default_certificate: Option<String>,
    /// `hsts`: `Strict-Transport-Security` value, e.g. `"max-age=31536000"`. Default: none.
    pub hsts: Option<String>,
}

/// One `{ cert, key }` entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// `cert`: PEM certificate chain, end-entity first. Required.
    pub cert: Option<String>,
    /// `key`: PEM private key (PKCS#8, SEC1 or PKCS#1). Required.
    pub key: Option<String>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `host`: a host name without port (`"blog.example.org"`) or a wildcard for the
    /// whole first label (`"*.example.org"`); matched case-insensitively. Default:
    /// absent, matching every host.
    pub host: Option<String>,
    /// `path_prefix`: starts with `/`; the longest matching prefix wins. Default `"/"`.
    pub path_prefix: Option<String>,
    /// `pool`: the name of a pool in `[pools]`. Required; no default.
    pub pool: Option<String>,
    /// `class`: `"read"` or `"write"`; `"write"` treats every request on this route as
    /// a write. Default: absent, classifying by method.
    pub class: Option<String>,
}

/// One `[pools.NAME]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// `queue_depth`: maximum waiting requests; `0` never queues. Default `1024`.
    pub queue_depth: Option<i64>,
    /// `queue_timeout`: longest wait in the queue (humantime). Default `"1s"`.
    pub queue_timeout: Option<String>,
    /// `maintenance`: shed every request to the maintenance page. Default `false`.
    pub maintenance: Option<bool>,
    /// `backends`: the pool's back ends; may be empty only with `maintenance = true`.
    /// Default `[]`.
    pub backends: Option<Vec<BackendConfig>>,
    /// `[pools.NAME.health_check]`: active health checks. Default: absent (back ends
    /// are up unless passive checks say otherwise).
    pub health_check: Option<HealthCheckConfig>,
    /// `retries`: how many times a failed request may be tried on another back end
    /// (only when that is safe: see README). Default `1`.
    pub retries: Option<i64>,
    /// `passive_failures`: consecutive connect failures or 5xx answers that take a
    /// back end out for `passive_cooldown`. Default `0` (off).
    pub passive_failures: Option<i64>,
    /// `passive_cooldown`: how long a back end taken out by passive checks stays out
    /// before it is tried again (humantime). Default `"10s"`.
    pub passive_cooldown: Option<String>,
    /// `slow_start`: a back end that comes up ramps from weight ~0 to its full weight
    /// over this long (humantime). Default `"0s"` (off).
    pub slow_start: Option<String>,
}

/// One entry of a pool's `backends`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `name`: non-empty, unique within the pool. Required; no default.
    pub name: Option<String>,
    /// `address`: `"[2001:db8::10]:80"`, or `"host:port"` resolved to IPv6 (AAAA) only
    /// unless `allow_ipv4_backends`. Required; no default.
    pub address: Option<String>,
    /// `weight`: 0 (drained) to 1_000_000. Default `1`.
    pub weight: Option<i64>,
    /// `max_connections`: concurrent requests in flight (open upgrade tunnels
    /// included), at least 1. Default: absent, unlimited.
    pub max_connections: Option<i64>,
    /// `served_by`: `X-Served-By` value added when the back end sends none. Default:
    /// absent, no header added.
    pub served_by: Option<String>,
    /// `backup`: used only while no primary back end is up. Default `false`.
    pub backup: Option<bool>,
}

/// `[pools.NAME.health_check]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// `path`: the request path, starting with `/`. Required; no default.
    pub path: Option<String>,
    /// `interval`: time between checks (humantime, more than 0). Default `"2s"`.
    pub interval: Option<String>,
    /// `timeout`: per-check deadline (humantime, more than 0, at most `interval`).
    /// Default `"1s"`, or `interval` when that is shorter.
    pub timeout: Option<String>,
    /// `rise`: consecutive successes that mark a back end up, at least 1. Default `2`.
    pub rise: Option<i64>,
    /// `fall`: consecutive failures that mark a back end down, at least 1. Default `3`.
    pub fall: Option<i64>,
    /// `expect_status`: status codes that count as healthy. Default: any 2xx or 3xx.
    pub expect_status: Option<Vec<i64>>,
    /// `host`: `Host` header of the check. Default: the back end's address.
    pub host: Option<String>,
}

/// `[maintenance]`: the page shed requests get.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// `page`: template file, relative to the config file's directory (or absolute);
    /// must exist and be readable UTF-8. Default: absent, the built-in page.
    pub page: Option<PathBuf>,
    /// `retry_after`: the `Retry-After` the page carries (humantime). Default `"30s"`.
    pub retry_after: Option<String>,
    /// `analytics`: HTML inserted where the template says `{{analytics}}`. Default `""`.
    pub analytics: Option<String>,
}

/// `[limits]`: hardening limits.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// `header_timeout`: deadline for the whole request head (humantime, more than 0).
    /// Default `"10s"`.
    pub header_timeout: Option<String>,
    /// `idle_timeout`: keep-alive idle timeout, and the longest silence of an upgrade
    /// tunnel (humantime, more than 0). Default `"60s"`.
    pub idle_timeout: Option<String>,
    /// `body_timeout`: longest pause between two reads of a request body (humantime,
    /// more than 0). Default `"60s"`.
    pub body_timeout: Option<String>,
    /// `max_headers`: header fields per request, 1 to 10000. Default `100`.
    pub max_headers: Option<i64>,
    /// `max_header_bytes`: request line and header fields, 1024 to 16 MiB. Default `65536`.
    pub max_header_bytes: Option<i64>,
    /// `max_uri_bytes`: request target length, 16 to 65534. Default `8192`.
    pub max_uri_bytes: Option<i64>,
    /// `max_body_bytes`: request body size; `0` = unlimited. Default `0`.
    pub max_body_bytes: Option<i64>,
    /// `max_connections`: open client connections per listener (tunnels included), at
    /// least 1. Default `10000`.
    pub max_connections: Option<i64>,
    /// `upstream_connect_timeout`: connecting to a back end (humantime, more than 0).
    /// Default `"5s"`.
    pub upstream_connect_timeout: Option<String>,
    /// `upstream_read_timeout`: waiting for a back end's response head, and longest
    /// pause in its body (humantime, more than 0). Default `"60s"`.
    pub upstream_read_timeout: Option<String>,
    /// `upstream_write_timeout`: longest pause while sending a request to a back end
    /// (humantime, more than 0). Default `"60s"`.
    pub upstream_write_timeout: Option<String>,
}
