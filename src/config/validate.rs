//! `validate`: the serde model → a [`Snapshot`], checking everything and applying
//! every default. All problems are collected; a `Snapshot` is returned only when
//! there are none. While checking, an invalid value is replaced by a placeholder
//! (its default, or the entry is dropped) so that checking can go on; placeholders
//! never escape because any error means no `Snapshot`.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderValue;

use super::fields::{self, key_segment, Errors, Zero};
use super::model::{
    AdminConfig, BackendConfig, HealthCheckConfig, LimitsConfig, ListenerConfig, MaintenanceConfig,
    PoolConfig, RootConfig, RouteConfig,
};
use super::{
    AdminSpec, BackendSpec, Class, ConfigError, ConfigErrors, HealthCheckSpec, HostMatch,
    LimitsSpec, ListenerSpec, MaintenanceSpec, PoolSpec, RouteSpec, Snapshot,
};

const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const MAX_THREADS: i64 = 4096;
const ADMIN_LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
const QUEUE_DEPTH: usize = 1024;
const QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
const WEIGHT: u32 = 1;
const MAX_WEIGHT: i64 = 1_000_000;
const CHECK_INTERVAL: Duration = Duration::from_secs(2);
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
const RISE: u32 = 2;
const FALL: u32 = 3;
const RETRY_AFTER: Duration = Duration::from_secs(30);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Stands in for an invalid back-end address while checking goes on.
const NO_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);

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
    let allow_ipv4_backends = raw.allow_ipv4_backends.unwrap_or(false);
    let trusted_proxies = (raw.trusted_proxies.unwrap_or_default().iter().enumerate())
        .filter_map(|(i, text)| fields::ip_net(e, &format!("trusted_proxies[{i}]"), text))
        .collect();
    let mut binds = Binds::default();
    let admin = admin(e, raw.admin.unwrap_or_default(), &mut binds);
    let listeners = listeners(e, raw.listeners.unwrap_or_default(), &mut binds);
    let raw_pools = raw.pools.unwrap_or_default();
    let routes = routes(e, raw.routes.unwrap_or_default(), &raw_pools);
    let pools = (raw_pools.into_iter())
        .map(|(name, pool)| pool_spec(e, name, pool, allow_ipv4_backends))
        .collect();
    let maintenance = maintenance(e, raw.maintenance.unwrap_or_default(), base_dir);
    let limits = limits(e, raw.limits.unwrap_or_default());

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Snapshot {
        source,
        shutdown_grace,
        threads,
        allow_ipv4_backends,
        trusted_proxies,
        admin,
        listeners,
        routes,
        pools,
        maintenance,
        limits,
    })
}

/// Every address bound so far, with the key path that bound it.
#[derive(Default)]
struct Binds(Vec<(SocketAddr, String)>);

impl Binds {
    /// Records `addr`, or reports that it is taken: the same address, or the same
    /// port of the same family where either is the wildcard address (Linux refuses
    /// that bind). Port 0 (any free port) never collides.
    fn claim(&mut self, errors: &mut Errors, path: String, addr: SocketAddr) -> bool {
        let clash = self.0.iter().find(|(other, _)| {
            *other == addr
                || (addr.port() != 0
                    && other.port() == addr.port()
                    && other.is_ipv4() == addr.is_ipv4()
                    && (other.ip().is_unspecified() || addr.ip().is_unspecified()))
        });
        match clash {
            Some((other, other_path)) if *other == addr => {
                errors.push(ConfigError::new(
                    path,
                    format!("{addr} is already bound by {other_path}"),
                ));
                false
            }
            Some((other, other_path)) => {
                errors.push(
                    ConfigError::new(
                        path,
                        format!("{addr} overlaps {other} bound by {other_path}"),
                    )
                    .with_hint("a wildcard address takes the port on every address of its family"),
                );
                false
            }
            None => {
                self.0.push((addr, path));
                true
            }
        }
    }
}

fn admin(e: &mut Errors, raw: AdminConfig, binds: &mut Binds) -> AdminSpec {
    let Some(texts) = raw.listen else {
        binds.claim(
            e,
            format!("admin.listen (default {ADMIN_LISTEN})"),
            ADMIN_LISTEN,
        );
        return AdminSpec {
            listen: vec![ADMIN_LISTEN],
        };
    };
    let mut listen = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let path = format!("admin.listen[{i}]");
        if let Some(addr) = fields::listen_addr(e, &path, text) {
            if binds.claim(e, path, addr) {
                listen.push(addr);
            }
        }
    }
    AdminSpec { listen }
}

fn listeners(e: &mut Errors, raw: Vec<ListenerConfig>, binds: &mut Binds) -> Vec<ListenerSpec> {
    if raw.is_empty() {
        e.push(
            ConfigError::new("listeners", "no listeners")
                .with_hint("add a [[listeners]] table with a name and bind addresses"),
        );
    }
    let mut first_at: HashMap<String, usize> = HashMap::new();
    let mut specs = Vec::new();
    for (i, listener) in raw.into_iter().enumerate() {
        // Errors inside a listener are reported under its name once that is known
        // to be unique (`listeners.public.bind[1]`), else under its index.
        let mut label = format!("listeners[{i}]");
        let name = listener.name.unwrap_or_default();
        if name.is_empty() {
            e.push(
                ConfigError::new(format!("{label}.name"), "missing or empty")
                    .with_hint("every listener needs a unique name, e.g. name = \"public\""),
            );
        } else if let Some(first) = first_at.get(&name) {
            e.push(
                ConfigError::new(
                    format!("{label}.name"),
                    format!("duplicate listener name {name:?}"),
                )
                .with_hint(format!("first at listeners[{first}]")),
            );
        } else {
            first_at.insert(name.clone(), i);
            label = format!("listeners.{}", key_segment(&name));
        }
        let texts = listener.bind.unwrap_or_default();
        if texts.is_empty() {
            e.push(
                ConfigError::new(format!("{label}.bind"), "no addresses")
                    .with_hint("e.g. bind = [\"[::]:8080\", \"0.0.0.0:8080\"]"),
            );
        }
        let mut bind = Vec::new();
        for (j, text) in texts.iter().enumerate() {
            let path = format!("{label}.bind[{j}]");
            if let Some(addr) = fields::listen_addr(e, &path, text) {
                if binds.claim(e, path, addr) {
                    bind.push(addr);
                }
            }
        }
        specs.push(ListenerSpec {
            name,
            bind,
            redirect_https: listener.redirect_https.unwrap_or(false),
        });
    }
    specs
}

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
            None => HostMatch::Any,
        };
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
        if let Some((.., first)) = seen
            .iter()
            .find(|(h, p, _)| *h == host && *p == path_prefix)
        {
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
        } else {
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

fn pool_spec(e: &mut Errors, name: String, raw: PoolConfig, allow_ipv4: bool) -> PoolSpec {
    let at = format!("pools.{}", key_segment(&name));
    let label_safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if name.is_empty() || !name.chars().all(label_safe) {
        e.push(
            ConfigError::new(&at, format!("invalid pool name {name:?}")).with_hint(
                "use letters, digits, '_', '.' and '-' only: pool names are metric label values",
            ),
        );
    }
    let queue_depth = match raw.queue_depth {
        Some(n) => fields::int_in(e, &format!("{at}.queue_depth"), n, 0, u32::MAX.into(), None),
        None => Some(QUEUE_DEPTH),
    };
    let queue_timeout = fields::duration(
        e,
        &format!("{at}.queue_timeout"),
        raw.queue_timeout.as_deref(),
        QUEUE_TIMEOUT,
        Zero::Allowed,
    );
    let maintenance = raw.maintenance.unwrap_or(false);
    let raw_backends = raw.backends.unwrap_or_default();
    if raw_backends.is_empty() && !maintenance {
        e.push(
            ConfigError::new(format!("{at}.backends"), "no back ends")
                .with_hint("add one, or set maintenance = true"),
        );
    }
    let mut first_at: HashMap<String, usize> = HashMap::new();
    let mut backends = Vec::new();
    for (i, backend) in raw_backends.into_iter().enumerate() {
        let spec = backend_spec(e, &format!("{at}.backends[{i}]"), backend, allow_ipv4);
        if !spec.name.is_empty() {
            if let Some(first) = first_at.get(&spec.name) {
                e.push(
                    ConfigError::new(
                        format!("{at}.backends[{i}].name"),
                        format!("duplicate back-end name {:?}", spec.name),
                    )
                    .with_hint(format!("first at backends[{first}]")),
                );
            } else {
                first_at.insert(spec.name.clone(), i);
            }
        }
        backends.push(spec);
    }
    let health_check = raw
        .health_check
        .map(|raw| health_check(e, &format!("{at}.health_check"), raw));
    PoolSpec {
        name,
        queue_depth: queue_depth.unwrap_or(QUEUE_DEPTH),
        queue_timeout,
        maintenance,
        backends,
        health_check,
    }
}

fn backend_spec(e: &mut Errors, at: &str, raw: BackendConfig, allow_ipv4: bool) -> BackendSpec {
    let name = raw.name.unwrap_or_default();
    if name.is_empty() {
        e.push(
            ConfigError::new(format!("{at}.name"), "missing or empty")
                .with_hint("every back end needs a name, unique within its pool"),
        );
    }
    let address_text = raw.address.unwrap_or_default();
    let address = if address_text.is_empty() {
        e.push(
            ConfigError::new(format!("{at}.address"), "missing or empty")
                .with_hint("e.g. address = \"[2001:db8::10]:80\""),
        );
        None
    } else {
        fields::backend_addr(e, &format!("{at}.address"), &address_text, allow_ipv4)
    };
    let weight = match raw.weight {
        Some(w) => fields::int_in(
            e,
            &format!("{at}.weight"),
            w,
            0,
            MAX_WEIGHT,
            Some("weights are relative; 0 drains the back end"),
        ),
        None => Some(WEIGHT),
    };
    let max_connections = raw.max_connections.and_then(|n| {
        fields::int_in(
            e,
            &format!("{at}.max_connections"),
            n,
            1,
            u32::MAX.into(),
            Some("omit it for unlimited, or set weight = 0 to drain"),
        )
    });
    let served_by = raw
        .served_by
        .and_then(|text| match HeaderValue::from_str(&text) {
            Ok(value) => Some(value),
            Err(_) => {
                e.push(
                    ConfigError::new(
                        format!("{at}.served_by"),
                        format!("{text:?} is not a valid HTTP header value"),
                    )
                    .with_hint("no control characters or line breaks"),
                );
                None
            }
        });
    BackendSpec {
        name,
        address_text,
        address: address.unwrap_or(NO_ADDR),
        weight: weight.unwrap_or(WEIGHT),
        max_connections,
        served_by,
        backup: raw.backup.unwrap_or(false),
    }
}

fn health_check(e: &mut Errors, at: &str, raw: HealthCheckConfig) -> HealthCheckSpec {
    let path = match raw.path {
        None => {
            e.push(
                ConfigError::new(format!("{at}.path"), "missing")
                    .with_hint("e.g. path = \"/health\""),
            );
            "/".to_owned()
        }
        Some(path) if !path.starts_with('/') || path.contains(char::is_whitespace) => {
            e.push(
                ConfigError::new(
                    format!("{at}.path"),
                    format!("{path:?} is not a path starting with '/'"),
                )
                .with_hint("e.g. path = \"/health\""),
            );
            path
        }
        Some(path) => path,
    };
    let errors_before = e.len();
    let interval = fields::duration(
        e,
        &format!("{at}.interval"),
        raw.interval.as_deref(),
        CHECK_INTERVAL,
        Zero::Forbidden,
    );
    let timeout = fields::duration(
        e,
        &format!("{at}.timeout"),
        raw.timeout.as_deref(),
        CHECK_TIMEOUT,
        Zero::Forbidden,
    );
    if e.len() == errors_before && timeout > interval {
        e.push(
            ConfigError::new(
                format!("{at}.timeout"),
                format!(
                    "{} is longer than interval {}",
                    humantime::format_duration(timeout),
                    humantime::format_duration(interval)
                ),
            )
            .with_hint("a check must finish before the next one starts"),
        );
    }
    let mut count = |key: &str, value: Option<i64>, default: u32| match value {
        Some(n) => fields::int_in(e, &format!("{at}.{key}"), n, 1, u32::MAX.into(), None)
            .unwrap_or(default),
        None => default,
    };
    let rise = count("rise", raw.rise, RISE);
    let fall = count("fall", raw.fall, FALL);
    HealthCheckSpec {
        path,
        interval,
        timeout,
        rise,
        fall,
    }
}

fn maintenance(e: &mut Errors, raw: MaintenanceConfig, base_dir: &Path) -> MaintenanceSpec {
    MaintenanceSpec {
        page: (raw.page).and_then(|file| fields::text_file(e, "maintenance.page", &file, base_dir)),
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

fn limits(e: &mut Errors, raw: LimitsConfig) -> LimitsSpec {
    LimitsSpec {
        header_timeout: fields::duration(
            e,
            "limits.header_timeout",
            raw.header_timeout.as_deref(),
            HEADER_TIMEOUT,
            Zero::Forbidden,
        ),
        idle_timeout: fields::duration(
            e,
            "limits.idle_timeout",
            raw.idle_timeout.as_deref(),
            IDLE_TIMEOUT,
            Zero::Forbidden,
        ),
    }
}
