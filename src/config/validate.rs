//! `validate`: the serde model → a [`Snapshot`], checking everything and applying
//! every default. All problems are collected; a `Snapshot` is returned only when
//! there are none. While checking, an invalid value is replaced by a placeholder
//! (its default, or the entry is dropped) so that checking can go on; placeholders
//! never escape because any error means no `Snapshot`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sched::Scheduling;

use super::fields::{self, Errors, Zero};
use super::model::{LimitsConfig, MaintenanceConfig, PoolConfig, RootConfig, RouteConfig};
use super::{
    AccessLogFormat, AccessLogSpec, Class, ConfigError, ConfigErrors, HostMatch, LimitsSpec,
    MaintenanceSpec, RouteSpec, Snapshot,
};

mod listeners;
mod pools;
mod snapshots;

const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const MAX_THREADS: i64 = 4096;
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Checks `raw` and turns it into a [`Snapshot`], or reports every problem.
///
/// `base_dir` resolves relative file paths (the config file's directory); `source`
/// is recorded in the snapshot. Back-end host names are resolved here (blocking).
pub fn validate(
    raw: RootConfig,
    base_dir: &Path,
    source: Option<PathBuf>,
) -> Result<Snapshot, ConfigErrors> {
    let mut errors = Errors::new();
    let e = &mut errors;
    let shutdown_grace = fields::duration(
        e,
        "shutdown_grace",
        raw.shutdown_grace.as_deref(),
        SHUTDOWN_GRACE,
        Zero::Allowed,
    );
    let threads = match raw.threads {
        Some(n) => fields::int_in(e, "threads", n, 1, MAX_THREADS, None).unwrap_or(1),
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    let scheduling = match raw.scheduling.as_deref() {
        None => Scheduling::default(),
        Some(text) => Scheduling::parse(text).unwrap_or_else(|| {
            e.push(
                ConfigError::new("scheduling", format!("unknown policy {text:?}"))
                    .with_hint("use \"fair\" (the default) or \"throughput\""),
            );
            Scheduling::default()
        }),
    };
    let busy_poll = fields::duration(
        e,
        "busy_poll",
        raw.busy_poll.as_deref(),
        Duration::ZERO,
        Zero::Allowed,
    );
    let max = crate::sched::MAX_BUSY_POLL;
    let busy_poll = if busy_poll > max {
        e.push(
            ConfigError::new("busy_poll", format!("{busy_poll:?} is more than {max:?}"))
                .with_hint("50us to 200us bridges a busy worker's pauses; \"0s\" turns it off"),
        );
        Duration::ZERO
    } else {
        busy_poll
    };
    let allow_ipv4_backends = raw.allow_ipv4_backends.unwrap_or(false);
    let upgrade_socket = match raw.upgrade_socket.as_deref() {
        None => PathBuf::from(DEFAULT_UPGRADE_SOCKET),
        Some("") => {
            e.push(
                ConfigError::new("upgrade_socket", "empty path")
                    .with_hint(format!("omit it for {DEFAULT_UPGRADE_SOCKET}")),
            );
            PathBuf::new()
        }
        Some(p) => base_dir.join(p),
    };
    let trusted_proxies = raw
        .trusted_proxies
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, text)| fields::ip_net(e, &format!("trusted_proxies[{i}]"), text))
        .collect();
    let mut binds = listeners::Binds::default();
    let admin = listeners::admin(e, raw.admin.unwrap_or_default(), &mut binds, base_dir);
    let listeners =
        listeners::listeners(e, raw.listeners.unwrap_or_default(), &mut binds, base_dir);
    let raw_pools = raw.pools.unwrap_or_default();
    let routes = routes(e, raw.routes.unwrap_or_default(), &raw_pools);
    let snapshots = snapshots::snapshots(e, raw.snapshots.unwrap_or_default(), &raw_pools);
    let pools = raw_pools
        .into_iter()
        .map(|(name, pool)| pools::pool_spec(e, name, pool, allow_ipv4_backends))
        .collect();
    let maintenance = maintenance(e, raw.maintenance.unwrap_or_default(), base_dir);
    let limits = limits(e, raw.limits.unwrap_or_default());
    let access_log = raw.access_log.map(|a| access_log(e, a, base_dir));

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Snapshot {
        source,
        shutdown_grace,
        threads,
        scheduling,
        busy_poll,
        allow_ipv4_backends,
        upgrade_socket,
        trusted_proxies,
        admin,
        listeners,
        routes,
        pools,
        maintenance,
        limits,
        access_log,
        snapshots,
    })
}

/// Where `run --upgrade` finds the running instance unless `upgrade_socket` is set.
pub const DEFAULT_UPGRADE_SOCKET: &str = "/run/launchday.sock";

fn routes(
    e: &mut Errors,
    raw: Vec<RouteConfig>,
    pools: &BTreeMap<String, PoolConfig>,
) -> Vec<RouteSpec> {
    if raw.is_empty() {
        e.push(
            ConfigError::new("routes", "no routes: every request would get 404")
                .with_hint("add a [[routes]] table naming a pool"),
        );
    }
    let pool_list = if pools.is_empty() {
        "no pools are defined; add a [pools.NAME] table".to_owned()
    } else {
        let names: Vec<&str> = pools.keys().map(String::as_str).collect();
        format!("pools: {}", names.join(", "))
    };
    let mut seen: Vec<(HostMatch, String, usize)> = Vec::new();
    let mut specs = Vec::new();
    for (i, route) in raw.into_iter().enumerate() {
        let at = format!("routes[{i}]");
        let host = match &route.host {
            Some(text) => fields::route_host(e, &format!("{at}.host"), text),
            None => Some(HostMatch::Any),
        };
        let host_ok = host.is_some();
        let host = host.unwrap_or(HostMatch::Any);
        let path_prefix = route.path_prefix.unwrap_or_else(|| "/".to_owned());
        if !path_prefix.starts_with('/') {
            e.push(
                ConfigError::new(
                    format!("{at}.path_prefix"),
                    format!("{path_prefix:?} does not start with '/'"),
                )
                .with_hint(format!("e.g. \"/{}\"", path_prefix.trim_start_matches('/'))),
            );
        } else if path_prefix
            .contains(|c: char| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
        {
            e.push(
                ConfigError::new(
                    format!("{at}.path_prefix"),
                    format!("{path_prefix:?} is not a plain path"),
                )
                .with_hint("no spaces, query (?) or fragment (#)"),
            );
        }
        let pool = match route.pool {
            None => {
                e.push(
                    ConfigError::new(format!("{at}.pool"), "missing").with_hint(pool_list.clone()),
                );
                0
            }
            Some(name) => pools.keys().position(|p| *p == name).unwrap_or_else(|| {
                e.push(
                    ConfigError::new(format!("{at}.pool"), format!("no pool named {name:?}"))
                        .with_hint(pool_list.clone()),
                );
                0
            }),
        };
        let class = match route.class.as_deref() {
            None => None,
            Some("read") => Some(Class::Read),
            Some("write") => Some(Class::Write),
            Some(other) => {
                e.push(
                    ConfigError::new(format!("{at}.class"), format!("{other:?} is not a class"))
                        .with_hint("expected \"read\" or \"write\""),
                );
                None
            }
        };
        let duplicate = seen
            .iter()
            .find(|(h, p, _)| host_ok && *h == host && *p == path_prefix);
        if let Some((.., first)) = duplicate {
            let host = match &host {
                HostMatch::Any => "any host".to_owned(),
                HostMatch::Exact(h) => format!("host {h:?}"),
                HostMatch::Wildcard(suffix) => format!("host \"*{suffix}\""),
            };
            e.push(
                ConfigError::new(
                    at,
                    format!("duplicate route for {host} and path_prefix {path_prefix:?}"),
                )
                .with_hint(format!("first at routes[{first}]")),
            );
        } else if host_ok {
            seen.push((host.clone(), path_prefix.clone(), i));
        }
        specs.push(RouteSpec {
            host,
            path_prefix,
            pool,
            class,
        });
    }
    specs
}

fn maintenance(e: &mut Errors, raw: MaintenanceConfig, base_dir: &Path) -> MaintenanceSpec {
    let page = raw
        .page
        .and_then(|file| fields::text_file(e, "maintenance.page", &file, base_dir));
    let (page, template) = page.map_or((None, None), |(p, t)| (Some(p), Some(t)));
    MaintenanceSpec {
        page,
        template,
        retry_after: fields::duration(
            e,
            "maintenance.retry_after",
            raw.retry_after.as_deref(),
            RETRY_AFTER,
            Zero::Allowed,
        ),
        analytics: raw.analytics.unwrap_or_default(),
    }
}

fn access_log(
    e: &mut Errors,
    raw: crate::config::model::AccessLogConfig,
    base_dir: &Path,
) -> AccessLogSpec {
    let format = match raw.format.as_deref() {
        None | Some("combined") => AccessLogFormat::Combined,
        Some("json") => AccessLogFormat::Json,
        Some(other) => {
            e.push(
                ConfigError::new("access_log.format", format!("unknown format {other:?}"))
                    .with_hint("\"combined\" or \"json\""),
            );
            AccessLogFormat::Combined
        }
    };
    let path = match raw.path.as_deref() {
        None | Some("-") => None,
        Some(p) => {
            let full = base_dir.join(p);
            let dir_ok = full
                .parent()
                .is_none_or(|d| d.as_os_str().is_empty() || d.is_dir());
            if !dir_ok || full.is_dir() {
                e.push(
                    ConfigError::new(
                        "access_log.path",
                        format!("{} cannot be a log file", full.display()),
                    )
                    .with_hint("its directory must exist; use \"-\" for stderr"),
                );
            }
            Some(full)
        }
    };
    AccessLogSpec { path, format }
}

fn limits(e: &mut Errors, raw: LimitsConfig) -> LimitsSpec {
    let d = LimitsSpec::default();
    let dur = |e: &mut Errors, key: &str, text: Option<&str>, default| {
        fields::duration(e, &format!("limits.{key}"), text, default, Zero::Forbidden)
    };
    let int = |e: &mut Errors, key: &str, value: Option<i64>, min: i64, max: i64, default| {
        value
            .and_then(|v| fields::int_in(e, &format!("limits.{key}"), v, min, max, None))
            .unwrap_or(default)
    };
    LimitsSpec {
        header_timeout: dur(
            e,
            "header_timeout",
            raw.header_timeout.as_deref(),
            d.header_timeout,
        ),
        idle_timeout: dur(
            e,
            "idle_timeout",
            raw.idle_timeout.as_deref(),
            d.idle_timeout,
        ),
        body_timeout: dur(
            e,
            "body_timeout",
            raw.body_timeout.as_deref(),
            d.body_timeout,
        ),
        max_headers: int(e, "max_headers", raw.max_headers, 1, 10_000, d.max_headers),
        max_header_bytes: int(
            e,
            "max_header_bytes",
            raw.max_header_bytes,
            1024,
            16 << 20,
            d.max_header_bytes,
        ),
        // hyper refuses targets of 65535 bytes and more by itself.
        max_uri_bytes: int(
            e,
            "max_uri_bytes",
            raw.max_uri_bytes,
            256,
            65_534,
            d.max_uri_bytes,
        ),
        max_body_bytes: raw
            .max_body_bytes
            .and_then(|v| fields::int_in::<u64>(e, "limits.max_body_bytes", v, 0, i64::MAX, None))
            .filter(|&v| v > 0),
        max_connections: int(
            e,
            "max_connections",
            raw.max_connections,
            1,
            10_000_000,
            d.max_connections,
        ),
        upstream_connect_timeout: dur(
            e,
            "upstream_connect_timeout",
            raw.upstream_connect_timeout.as_deref(),
            d.upstream_connect_timeout,
        ),
        upstream_read_timeout: dur(
            e,
            "upstream_read_timeout",
            raw.upstream_read_timeout.as_deref(),
            d.upstream_read_timeout,
        ),
        upstream_write_timeout: dur(
            e,
            "upstream_write_timeout",
            raw.upstream_write_timeout.as_deref(),
            d.upstream_write_timeout,
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use super::*;
    use crate::config::load_str;

    /// The parts of a minimal valid config, for tests to combine and replace.
    pub(super) const LISTENER: &str = "[[listeners]]\nname = \"public\"\nbind = [\"[::1]:0\"]\n";
    pub(super) const ROUTE: &str = "[[routes]]\npool = \"blog\"\n";
    pub(super) const POOL: &str =
        "[pools.blog]\nbackends = [{ name = \"vm-1\", address = \"[2001:db8::10]:80\" }]\n";

    pub(super) fn load(text: &str) -> Result<Snapshot, ConfigErrors> {
        load_str(text, Path::new("/nonexistent"), None)
    }

    pub(super) fn valid(text: &str) -> Snapshot {
        load(text).unwrap_or_else(|e| panic!("expected a valid config, got:\n{e}\n---\n{text}"))
    }

    /// Every error, displayed.
    pub(super) fn errors(text: &str) -> Vec<String> {
        match load(text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    /// The only error, displayed.
    pub(super) fn error(text: &str) -> String {
        let all = errors(text);
        assert_eq!(all.len(), 1, "{all:#?}");
        all[0].clone()
    }

    pub(super) fn paths(text: &str) -> Vec<String> {
        load(text)
            .err()
            .map(|e| e.into_iter().map(|e| e.path).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_minimal_config_gets_every_default() {
        let s = valid(&format!("{LISTENER}{ROUTE}{POOL}"));
        assert_eq!(s.source, None);
        assert_eq!(s.shutdown_grace, Duration::from_secs(10));
        assert_eq!(
            s.threads,
            std::thread::available_parallelism().map_or(1, usize::from)
        );
        assert!(s.threads >= 1);
        assert!(!s.allow_ipv4_backends);
        assert!(s.trusted_proxies.is_empty());
        assert_eq!(s.admin.listen, vec![listeners::ADMIN_LISTEN]);
        assert_eq!(s.listeners.len(), 1);
        assert_eq!(s.listeners[0].name, "public");
        assert_eq!(
            s.listeners[0].bind,
            vec!["[::1]:0".parse::<SocketAddr>().expect("addr")]
        );
        assert!(!s.listeners[0].redirect_https);
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.routes[0].host, HostMatch::Any);
        assert_eq!(s.routes[0].path_prefix, "/");
        assert_eq!(s.routes[0].pool, 0);
        assert_eq!(s.routes[0].class, None);
        assert_eq!(s.pool_index("blog"), Some(0));
        assert_eq!(s.maintenance.page, None);
        assert_eq!(s.maintenance.retry_after, Duration::from_secs(30));
        assert_eq!(s.maintenance.analytics, "");
        assert_eq!(s.limits.header_timeout, Duration::from_secs(10));
        assert_eq!(s.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(s.scheduling, Scheduling::Fair);
        assert_eq!(s.busy_poll, Duration::ZERO);
    }

    #[test]
    fn top_level_values_are_parsed() {
        let top = "shutdown_grace = \"1m 30s\"\nthreads = 3\nscheduling = \"fair\"\nbusy_poll = \"150us\"\nallow_ipv4_backends = true\n\
                   trusted_proxies = [\"10.1.2.3/8\", \"2001:db8::1\"]\n";
        let s = valid(&format!("{top}{LISTENER}{ROUTE}{POOL}"));
        assert_eq!(s.shutdown_grace, Duration::from_secs(90));
        assert_eq!(s.threads, 3);
        assert_eq!(s.scheduling, Scheduling::Fair);
        assert_eq!(s.busy_poll, Duration::from_micros(150));
        assert!(s.allow_ipv4_backends);
        let proxies: Vec<String> = s.trusted_proxies.iter().map(ToString::to_string).collect();
        assert_eq!(proxies, ["10.0.0.0/8", "2001:db8::1/128"]);
    }

    #[test]
    fn bad_top_level_values_are_reported_at_their_keys() {
        let top = "shutdown_grace = \"soon\"\nthreads = 0\nscheduling = \"fifo\"\nbusy_poll = \"20ms\"\ntrusted_proxies = [\"::1\", \"10.0.0.0/33\"]\n";
        assert_eq!(
            errors(&format!("{top}{LISTENER}{ROUTE}{POOL}")),
            [
                "shutdown_grace: \"soon\" is not a duration (use e.g. \"2s\", \"500ms\")",
                "threads: 0 is less than 1",
                "scheduling: unknown policy \"fifo\" (use \"fair\" (the default) or \"throughput\")",
                "busy_poll: 20ms is more than 10ms (50us to 200us bridges a busy worker's pauses; \
                 \"0s\" turns it off)",
                "trusted_proxies[1]: \"10.0.0.0/33\" is not an IP network (use a CIDR such as \
                 \"2001:db8::/32\" or a bare IP such as \"10.0.0.1\")",
            ]
        );
    }

    #[test]
    fn routes_are_parsed() {
        let routes = "[[routes]]\nhost = \"Forums.Example.ORG\"\npool = \"forums\"\nclass = \"write\"\n\
                      [[routes]]\nhost = \"*.example.org\"\npath_prefix = \"/blog/\"\npool = \"blog\"\nclass = \"read\"\n";
        let forums = "[pools.forums]\nmaintenance = true\n";
        let s = valid(&format!("{LISTENER}{routes}{POOL}{forums}"));
        assert_eq!(
            s.routes[0].host,
            HostMatch::Exact("forums.example.org".into())
        );
        assert_eq!(s.routes[0].pool, 1);
        assert_eq!(s.routes[0].class, Some(Class::Write));
        assert_eq!(s.routes[1].host, HostMatch::Wildcard(".example.org".into()));
        assert_eq!(s.routes[1].path_prefix, "/blog/");
        assert_eq!(s.routes[1].pool, 0);
        assert_eq!(s.routes[1].class, Some(Class::Read));
    }

    #[test]
    fn a_route_must_name_an_existing_pool() {
        let routes = "[[routes]]\npool = \"blog\"\n[[routes]]\nhost = \"a.example.org\"\npool = \"forums\"\n\
                      [[routes]]\nhost = \"b.example.org\"\npool = \"forum\"\n[[routes]]\nhost = \"c.example.org\"\n";
        let forums = "[pools.forums]\nmaintenance = true\n";
        let all = errors(&format!("{LISTENER}{routes}{POOL}{forums}"));
        assert_eq!(
            all,
            [
                "routes[2].pool: no pool named \"forum\" (pools: blog, forums)",
                "routes[3].pool: missing (pools: blog, forums)",
            ]
        );
        let e = error(&format!("{LISTENER}{ROUTE}"));
        assert_eq!(e, "routes[0].pool: no pool named \"blog\" (no pools are defined; add a [pools.NAME] table)");
    }

    #[test]
    fn bad_routes_are_reported_at_their_keys() {
        let routes = "[[routes]]\nhost = \"blog.example.org:443\"\npool = \"blog\"\n\
                      [[routes]]\nhost = \"a.*.org\"\npool = \"blog\"\n\
                      [[routes]]\npath_prefix = \"blog\"\npool = \"blog\"\n\
                      [[routes]]\npath_prefix = \"/a b\"\npool = \"blog\"\nclass = \"delete\"\n\
                      [[routes]]\nhost = \"x.org\"\npool = \"blog\"\n[[routes]]\nhost = \"X.org\"\npool = \"blog\"\n";
        let all = errors(&format!("{LISTENER}{routes}{POOL}"));
        assert_eq!(all.len(), 6, "{all:#?}");
        assert!(all[0].starts_with("routes[0].host: \"blog.example.org:443\" includes a port"));
        assert!(all[1].starts_with("routes[1].host: \"a.*.org\" has a wildcard"));
        assert_eq!(
            all[2],
            "routes[2].path_prefix: \"blog\" does not start with '/' (e.g. \"/blog\")"
        );
        assert!(all[3].starts_with("routes[3].path_prefix: \"/a b\" is not a plain path"));
        assert_eq!(
            all[4],
            "routes[3].class: \"delete\" is not a class (expected \"read\" or \"write\")"
        );
        assert_eq!(all[5], "routes[5]: duplicate route for host \"x.org\" and path_prefix \"/\" (first at routes[4])");
    }

    #[test]
    fn zero_routes_is_an_error() {
        assert_eq!(
            error(&format!("{LISTENER}{POOL}")),
            "routes: no routes: every request would get 404 (add a [[routes]] table naming a pool)"
        );
    }

    #[test]
    fn the_maintenance_page_is_resolved_against_base_dir_and_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("maint.html"), "<p>{{analytics}}</p>").expect("write");
        let base = format!("{LISTENER}{ROUTE}{POOL}");
        let text = format!("{base}[maintenance]\npage = \"maint.html\"\nretry_after = \"2m\"\nanalytics = \"<i></i>\"\n");
        let s =
            load_str(&text, dir.path(), Some(dir.path().join("launchday.toml"))).expect("valid");
        assert_eq!(s.maintenance.page, Some(dir.path().join("maint.html")));
        assert_eq!(s.maintenance.retry_after, Duration::from_secs(120));
        assert_eq!(s.maintenance.analytics, "<i></i>");
        assert_eq!(s.source, Some(dir.path().join("launchday.toml")));

        let absolute = dir.path().join("maint.html");
        let text = format!(
            "{base}[maintenance]\npage = {:?}\n",
            absolute.display().to_string()
        );
        valid(&text);

        let text = format!("{base}[maintenance]\npage = \"missing.html\"\n");
        let e = load_str(&text, dir.path(), None).expect_err("missing page");
        let missing = dir.path().join("missing.html");
        assert_eq!(
            e.to_string(),
            format!("maintenance.page: {} does not exist", missing.display())
        );
    }

    #[test]
    fn limits_must_be_positive_durations() {
        let text = format!("{LISTENER}{ROUTE}{POOL}[limits]\nheader_timeout = \"0s\"\nidle_timeout = \"5 minutes\"\n");
        assert_eq!(
            error(&text),
            "limits.header_timeout: must be more than 0 (e.g. \"1s\")"
        );
        let text = format!("{LISTENER}{ROUTE}{POOL}[limits]\nheader_timeout = \"5s\"\nidle_timeout = \"5 minutes\"\n");
        let s = valid(&text);
        assert_eq!(s.limits.header_timeout, Duration::from_secs(5));
        assert_eq!(s.limits.idle_timeout, Duration::from_secs(300));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = "threads = -1\n[[listeners]]\nname = \"a\"\nbind = [\"nope\"]\n\
                    [[routes]]\npool = \"missing\"\n\
                    [pools.blog]\nqueue_timeout = \"2 parsecs\"\nbackends = [\
                    { name = \"a\", address = \"10.0.0.7:80\" }, { name = \"a\", address = \"[2001:db8::1]:80\", weight = -3 }]\n\
                    [pools.empty]\n[limits]\nidle_timeout = \"x\"\n";
        assert_eq!(
            paths(text),
            [
                "threads",
                "listeners.a.bind[0]",
                "routes[0].pool",
                "pools.blog.queue_timeout",
                "pools.blog.backends[0].address",
                "pools.blog.backends[1].weight",
                "pools.blog.backends[1].name",
                "pools.empty.backends",
                "limits.idle_timeout",
            ]
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/launchday.toml");
        if let Ok(text) = std::fs::read_to_string(example) {
            let s = load_str(&text, Path::new("."), None).unwrap_or_else(|e| panic!("{e}"));
            assert!(s.listeners[0]
                .bind
                .iter()
                .any(|a| a.ip() == IpAddr::from([0, 0, 0, 0])));
        }
    }
}
