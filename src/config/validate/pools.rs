//! Checks for `[pools.NAME]`: queue settings, back ends and health checks.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use http::HeaderValue;

use crate::config::fields::{self, key_segment, Errors, Zero};
use crate::config::model::{BackendConfig, HealthCheckConfig, PoolConfig};
use crate::config::{BackendSpec, ConfigError, HealthCheckSpec, PoolSpec};

const QUEUE_DEPTH: usize = 1024;
const QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
const WEIGHT: u32 = 1;
const MAX_WEIGHT: i64 = 1_000_000;
const CHECK_INTERVAL: Duration = Duration::from_secs(2);
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
const RISE: u32 = 2;
const RETRIES: u32 = 1;
const PASSIVE_COOLDOWN: Duration = Duration::from_secs(10);
const FALL: u32 = 3;
/// Stands in for an invalid back-end address while checking goes on.
const NO_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);

pub(super) fn pool_spec(
    e: &mut Errors,
    name: String,
    raw: PoolConfig,
    allow_ipv4: bool,
) -> PoolSpec {
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
    let retries = match raw.retries {
        Some(n) => fields::int_in(e, &format!("{at}.retries"), n, 0, 10, None).unwrap_or(RETRIES),
        None => RETRIES,
    };
    let passive_failures = match raw.passive_failures {
        Some(n) => fields::int_in(
            e,
            &format!("{at}.passive_failures"),
            n,
            0,
            1000,
            Some("0 turns passive checks off"),
        )
        .unwrap_or(0),
        None => 0,
    };
    let passive_cooldown = fields::duration(
        e,
        &format!("{at}.passive_cooldown"),
        raw.passive_cooldown.as_deref(),
        PASSIVE_COOLDOWN,
        Zero::Forbidden,
    );
    let slow_start = fields::duration(
        e,
        &format!("{at}.slow_start"),
        raw.slow_start.as_deref(),
        Duration::ZERO,
        Zero::Allowed,
    );
    PoolSpec {
        name,
        queue_depth: queue_depth.unwrap_or(QUEUE_DEPTH),
        queue_timeout,
        maintenance,
        backends,
        health_check,
        retries,
        passive_failures,
        passive_cooldown,
        slow_start,
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
    // Default: 1 s, but never longer than the interval.
    let timeout = fields::duration(
        e,
        &format!("{at}.timeout"),
        raw.timeout.as_deref(),
        CHECK_TIMEOUT.min(interval),
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
    let expect_status = raw
        .expect_status
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, code)| {
            fields::int_in(e, &format!("{at}.expect_status[{i}]"), code, 100, 599, None)
        })
        .collect();
    let host = raw.host.filter(|h| {
        let ok = !h.is_empty() && http::HeaderValue::from_str(h).is_ok();
        if !ok {
            e.push(
                ConfigError::new(format!("{at}.host"), format!("{h:?} is not a valid Host"))
                    .with_hint("e.g. host = \"blog.example.org\""),
            );
        }
        ok
    });
    HealthCheckSpec {
        path,
        interval,
        timeout,
        rise,
        fall,
        expect_status,
        host,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{error, errors, load, valid, LISTENER, ROUTE};
    use super::*;

    /// A config whose only pool, "blog", has these `[pools.blog]` lines.
    fn blog(lines: &str) -> String {
        format!("{LISTENER}{ROUTE}[pools.blog]\n{lines}\n")
    }

    fn backends(list: &str) -> String {
        blog(&format!("backends = [{list}]"))
    }

    #[test]
    fn pools_and_back_ends_get_their_defaults() {
        let s = valid(&blog(
            "backends = [{ name = \"vm-1\", address = \"[2001:db8::10]:80\" }]\n\
             [pools.blog.health_check]\npath = \"/health\"",
        ));
        let pool = &s.pools[0];
        assert_eq!(pool.name, "blog");
        assert_eq!(pool.queue_depth, 1024);
        assert_eq!(pool.queue_timeout, Duration::from_secs(1));
        assert!(!pool.maintenance);
        let b = &pool.backends[0];
        assert_eq!(b.name, "vm-1");
        assert_eq!(b.address_text, "[2001:db8::10]:80");
        assert_eq!(
            b.address,
            "[2001:db8::10]:80".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(b.weight, 1);
        assert_eq!(b.max_connections, None);
        assert_eq!(b.served_by, None);
        assert!(!b.backup);
        let hc = pool.health_check.as_ref().expect("health check");
        assert_eq!(hc.path, "/health");
        assert_eq!(hc.interval, Duration::from_secs(2));
        assert_eq!(hc.timeout, Duration::from_secs(1));
        assert_eq!((hc.rise, hc.fall), (2, 3));
    }

    #[test]
    fn pool_and_back_end_values_are_parsed() {
        let s = valid(&blog(
            "queue_depth = 0\nqueue_timeout = \"250ms\"\nbackends = [\
             { name = \"Raspberry Pi 3\", address = \"[2001:db8::3]:8080\", weight = 0, \
               max_connections = 4, served_by = \"Raspberry Pi 3\", backup = true }]",
        ));
        let pool = &s.pools[0];
        assert_eq!(pool.queue_depth, 0, "0 = never queue");
        assert_eq!(pool.queue_timeout, Duration::from_millis(250));
        let b = &pool.backends[0];
        assert_eq!(b.weight, 0, "0 = drained");
        assert_eq!(b.max_connections, Some(4));
        assert_eq!(
            b.served_by,
            Some(HeaderValue::from_static("Raspberry Pi 3"))
        );
        assert!(b.backup);
    }

    #[test]
    fn pools_are_sorted_by_name() {
        let text = format!(
            "{LISTENER}{ROUTE}[pools.zeta]\nmaintenance = true\n[pools.blog]\nmaintenance = true\n"
        );
        let s = valid(&text);
        let names: Vec<&str> = s.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["blog", "zeta"]);
        assert_eq!(s.routes[0].pool, 0);
    }

    #[test]
    fn a_bad_queue_timeout_names_the_pool() {
        assert_eq!(
            error(&blog("queue_timeout = \"2 parsecs\"\nmaintenance = true")),
            "pools.blog.queue_timeout: \"2 parsecs\" is not a duration (use e.g. \"2s\", \"500ms\")"
        );
        let e = error(&blog("queue_depth = -1\nmaintenance = true"));
        assert_eq!(e, "pools.blog.queue_depth: -1 is less than 0");
    }

    #[test]
    fn ipv4_back_ends_are_errors_unless_allowed() {
        let list = "{ name = \"a\", address = \"[2001:db8::1]:80\" }, { name = \"b\", address = \"10.0.0.7:80\" }, \
                    { name = \"c\", address = \"[::ffff:10.0.0.8]:80\" }";
        let all = errors(&backends(list));
        assert_eq!(
            all[0],
            "pools.blog.backends[1].address: 10.0.0.7:80 is IPv4; back ends are IPv6-only \
             (set allow_ipv4_backends = true)"
        );
        assert!(all[1].starts_with("pools.blog.backends[2].address: [::ffff:10.0.0.8]:80 is IPv4"));
        assert_eq!(all.len(), 2);
        let s = valid(&format!("allow_ipv4_backends = true\n{}", backends(list)));
        let addrs: Vec<String> = s.pools[0]
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        assert_eq!(addrs, ["[2001:db8::1]:80", "10.0.0.7:80", "10.0.0.8:80"]);
    }

    #[test]
    fn back_end_addresses_need_a_port() {
        let list = "{ name = \"a\", address = \"2001:db8::1\" }, { name = \"b\", address = \"[2001:db8::1]\" }, \
                    { name = \"c\", address = \"backend.invalid\" }, { name = \"d\", address = \"[2001:db8::1]:http\" }";
        let all = errors(&backends(list));
        assert_eq!(all.len(), 4, "{all:#?}");
        for (i, e) in all.iter().enumerate() {
            assert!(
                e.starts_with(&format!("pools.blog.backends[{i}].address: ")),
                "{e}"
            );
        }
        assert!(all[0].contains("has no port"), "{}", all[0]);
    }

    #[test]
    fn host_names_resolve_to_ipv6_unless_ipv4_is_allowed() {
        let list = "{ name = \"a\", address = \"localhost:80\" }";
        match load(&backends(list)) {
            Ok(s) => assert!(s.pools[0].backends[0].address.is_ipv6()),
            Err(e) => assert!(e.to_string().contains("has no IPv6 (AAAA) address"), "{e}"),
        }
        let s = valid(&format!("allow_ipv4_backends = true\n{}", backends(list)));
        assert_eq!(s.pools[0].backends[0].address_text, "localhost:80");
        assert!(s.pools[0].backends[0].address.ip().is_loopback());
    }

    #[test]
    fn back_end_names_are_required_and_unique_within_a_pool() {
        let list = "{ name = \"vm-1\", address = \"[2001:db8::1]:80\" }, { name = \"\", address = \"[2001:db8::2]:80\" }, \
                    { name = \"vm-1\", address = \"[2001:db8::3]:80\" }, { address = \"[2001:db8::4]:80\" }, { name = \"x\" }";
        let all = errors(&backends(list));
        assert_eq!(all.len(), 4, "{all:#?}");
        assert!(all[0].starts_with("pools.blog.backends[1].name: missing or empty"));
        assert_eq!(
            all[1],
            "pools.blog.backends[2].name: duplicate back-end name \"vm-1\" (first at backends[0])"
        );
        assert!(all[2].starts_with("pools.blog.backends[3].name: missing or empty"));
        assert!(all[3].starts_with("pools.blog.backends[4].address: missing or empty"));
        // The same name in another pool is fine.
        let text = format!(
            "{}[pools.other]\nbackends = [{{ name = \"vm-1\", address = \"[2001:db8::1]:80\" }}]\n",
            backends("{ name = \"vm-1\", address = \"[2001:db8::1]:80\" }")
        );
        valid(&text);
    }

    #[test]
    fn weights_connections_and_served_by_are_checked() {
        let list = "{ name = \"a\", address = \"[2001:db8::1]:80\", weight = 1000001 }, \
                    { name = \"b\", address = \"[2001:db8::2]:80\", max_connections = 0 }, \
                    { name = \"c\", address = \"[2001:db8::3]:80\", served_by = \"a\\nb\" }, \
                    { name = \"d\", address = \"[2001:db8::4]:80\", weight = 1000000 }";
        assert_eq!(
            errors(&backends(list)),
            [
                "pools.blog.backends[0].weight: 1000001 is more than 1000000 \
                 (weights are relative; 0 drains the back end)",
                "pools.blog.backends[1].max_connections: 0 is less than 1 \
                 (omit it for unlimited, or set weight = 0 to drain)",
                "pools.blog.backends[2].served_by: \"a\\nb\" is not a valid HTTP header value \
                 (no control characters or line breaks)",
            ]
        );
    }

    #[test]
    fn a_pool_needs_back_ends_unless_in_maintenance() {
        let text = format!(
            "{LISTENER}{ROUTE}[pools.blog]\nmaintenance = true\n[pools.forums]\nbackends = []\n"
        );
        assert_eq!(
            error(&text),
            "pools.forums.backends: no back ends (add one, or set maintenance = true)"
        );
        let s = valid(&blog("maintenance = true"));
        assert!(s.pools[0].maintenance);
        assert!(s.pools[0].backends.is_empty());
    }

    #[test]
    fn pool_names_are_metric_label_safe() {
        let text = format!(
            "{LISTENER}{ROUTE}[pools.blog]\nmaintenance = true\n[pools.\"a b\"]\nmaintenance = true\n\
             [pools.\"v1.2_x-y\"]\nmaintenance = true\n"
        );
        let e = error(&text);
        assert!(
            e.starts_with("pools.\"a b\": invalid pool name \"a b\""),
            "{e}"
        );
    }

    #[test]
    fn health_checks_are_checked() {
        let hc = |lines: &str| {
            blog(&format!(
                "maintenance = true\n[pools.blog.health_check]\n{lines}"
            ))
        };
        assert_eq!(
            errors(&hc("path = \"health\"\ninterval = \"1s\"\ntimeout = \"2s\"\nrise = 0\nfall = 0")),
            [
                "pools.blog.health_check.path: \"health\" is not a path starting with '/' (e.g. path = \"/health\")",
                "pools.blog.health_check.timeout: 2s is longer than interval 1s \
                 (a check must finish before the next one starts)",
                "pools.blog.health_check.rise: 0 is less than 1",
                "pools.blog.health_check.fall: 0 is less than 1",
            ]
        );
        assert_eq!(
            errors(&hc("interval = \"0s\"")),
            [
                "pools.blog.health_check.path: missing (e.g. path = \"/health\")",
                "pools.blog.health_check.interval: must be more than 0 (e.g. \"1s\")",
            ]
        );
        let s = valid(&hc(
            "path = \"/up\"\ninterval = \"5s\"\ntimeout = \"5s\"\nrise = 1\nfall = 10",
        ));
        let hc = s.pools[0].health_check.as_ref().expect("health check");
        assert_eq!(
            (hc.path.as_str(), hc.interval, hc.timeout, hc.rise, hc.fall),
            ("/up", Duration::from_secs(5), Duration::from_secs(5), 1, 10)
        );
    }
}
