//! Parsers for single config values (durations, addresses, hosts, numbers, files),
//! used by `validate`. Each takes the key path and pushes a [`ConfigError`] on
//! failure instead of returning it, so callers carry on and report everything.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use super::{ConfigError, HostMatch};

pub(super) type Errors = Vec<ConfigError>;

/// A key as it appears in a key path: bare if TOML allows it bare, else quoted.
pub(super) fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// Whether zero is an acceptable duration for a key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Zero {
    Allowed,
    Forbidden,
}

/// A humantime duration, or `default` when the key is absent (or invalid, after
/// reporting it).
pub(super) fn duration(
    errors: &mut Errors,
    path: &str,
    text: Option<&str>,
    default: Duration,
    zero: Zero,
) -> Duration {
    let Some(text) = text else { return default };
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() && zero == Zero::Forbidden => {
            errors.push(ConfigError::new(path, "must be more than 0").with_hint("e.g. \"1s\""));
            default
        }
        Ok(d) => d,
        Err(_) => {
            errors.push(
                ConfigError::new(path, format!("{text:?} is not a duration"))
                    .with_hint("use e.g. \"2s\", \"500ms\""),
            );
            default
        }
    }
}

/// An integer in `min..=max` converted to `T`, or `None` after reporting it.
pub(super) fn int_in<T: TryFrom<i64>>(
    errors: &mut Errors,
    path: &str,
    value: i64,
    min: i64,
    max: i64,
    hint: Option<&str>,
) -> Option<T> {
    let problem = if value < min {
        format!("{value} is less than {min}")
    } else if value > max {
        format!("{value} is more than {max}")
    } else if let Ok(v) = T::try_from(value) {
        return Some(v);
    } else {
        format!("{value} is too large for this machine")
    };
    let mut error = ConfigError::new(path, problem);
    if let Some(hint) = hint {
        error = error.with_hint(hint);
    }
    errors.push(error);
    None
}

/// How an address string reads, before any name resolution.
enum AddrText<'a> {
    Socket(SocketAddr),
    NoPort,
    HostPort(&'a str, u16),
    Invalid(String),
}

fn classify(text: &str) -> AddrText<'_> {
    if let Ok(addr) = SocketAddr::from_str(text) {
        return AddrText::Socket(addr);
    }
    let unbracketed = text.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
    if IpAddr::from_str(text).is_ok() || unbracketed.is_some_and(|t| Ipv6Addr::from_str(t).is_ok())
    {
        return AddrText::NoPort;
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return if is_host_name(text) {
            AddrText::NoPort
        } else {
            AddrText::Invalid(format!("{text:?} is not an address"))
        };
    };
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if let Some(inner) = literal {
        if Ipv6Addr::from_str(inner).is_err() {
            return AddrText::Invalid(format!("{text:?} has an invalid IPv6 address"));
        }
    } else if !is_host_name(host) {
        return AddrText::Invalid(format!("{text:?} is not an address"));
    }
    match port.parse::<u16>() {
        Ok(port) if literal.is_none() => AddrText::HostPort(host, port),
        Ok(_) => AddrText::Invalid(format!("{text:?} is not an address")),
        Err(_) => AddrText::Invalid(format!("{text:?} has an invalid port {port:?}")),
    }
}

/// A DNS-style host name: dot-separated non-empty labels of letters, digits, `-`, `_`.
pub fn is_host_name(text: &str) -> bool {
    !text.is_empty()
        && text.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// A listening address: an IP literal with a port (port 0 = any free port).
pub(super) fn listen_addr(errors: &mut Errors, path: &str, text: &str) -> Option<SocketAddr> {
    let error = match classify(text) {
        AddrText::Socket(addr) => return Some(addr),
        AddrText::NoPort => ConfigError::new(path, format!("{text:?} has no port")),
        AddrText::HostPort(..) => ConfigError::new(path, format!("{text:?} is not an IP address")),
        AddrText::Invalid(problem) => ConfigError::new(path, problem),
    };
    errors.push(
        error.with_hint("use an IP literal and port, e.g. \"[::]:8080\" or \"0.0.0.0:8080\""),
    );
    None
}

/// A back-end address: an IP literal with port, or `host:port` resolved to IPv6
/// (to either family, IPv6 preferred, when `allow_ipv4`). IPv4-mapped IPv6
/// addresses count as IPv4 and come back as plain IPv4.
pub(super) fn backend_addr(
    errors: &mut Errors,
    path: &str,
    text: &str,
    allow_ipv4: bool,
) -> Option<SocketAddr> {
    let addr = match classify(text) {
        AddrText::Socket(addr) => {
            let addr = unmap(addr);
            if addr.is_ipv4() && !allow_ipv4 {
                errors.push(
                    ConfigError::new(path, format!("{text} is IPv4; back ends are IPv6-only"))
                        .with_hint("set allow_ipv4_backends = true"),
                );
                return None;
            }
            addr
        }
        AddrText::HostPort(host, port) => resolve(errors, path, host, port, allow_ipv4)?,
        AddrText::NoPort => {
            errors.push(
                ConfigError::new(path, format!("{text:?} has no port"))
                    .with_hint("e.g. \"[2001:db8::10]:80\" or \"backend.example.org:80\""),
            );
            return None;
        }
        AddrText::Invalid(problem) => {
            errors.push(
                ConfigError::new(path, problem)
                    .with_hint("e.g. \"[2001:db8::10]:80\" or \"backend.example.org:80\""),
            );
            return None;
        }
    };
    Some(addr)
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn resolve(
    errors: &mut Errors,
    path: &str,
    host: &str,
    port: u16,
    allow_ipv4: bool,
) -> Option<SocketAddr> {
    let found: Vec<SocketAddr> = match (host, port).to_socket_addrs() {
        Ok(addrs) => addrs.map(unmap).collect(),
        Err(e) => {
            errors.push(ConfigError::new(
                path,
                format!("cannot resolve {host:?}: {e}"),
            ));
            return None;
        }
    };
    let v6 = found.iter().find(|a| a.is_ipv6()).copied();
    let v4 = found.iter().find(|a| a.is_ipv4()).copied();
    match (v6, v4) {
        (Some(addr), _) => Some(addr),
        (None, Some(addr)) if allow_ipv4 => Some(addr),
        (None, Some(addr)) => {
            errors.push(
                ConfigError::new(path, format!("{host:?} has no IPv6 (AAAA) address")).with_hint(
                    format!(
                        "it resolves to {} only; set allow_ipv4_backends = true to permit IPv4",
                        addr.ip()
                    ),
                ),
            );
            None
        }
        (None, None) => {
            errors.push(ConfigError::new(
                path,
                format!("{host:?} has no IPv6 (AAAA) address"),
            ));
            None
        }
    }
}

/// A trusted proxy: a CIDR (host bits are cleared) or a bare IP (a /32 or /128).
pub(super) fn ip_net(errors: &mut Errors, path: &str, text: &str) -> Option<IpNet> {
    if let Ok(net) = IpNet::from_str(text) {
        return Some(net.trunc());
    }
    if let Ok(ip) = IpAddr::from_str(text) {
        return Some(IpNet::from(ip));
    }
    errors.push(
        ConfigError::new(path, format!("{text:?} is not an IP network"))
            .with_hint("use a CIDR such as \"2001:db8::/32\" or a bare IP such as \"10.0.0.1\""),
    );
    None
}

/// A route's host: a lower-cased name (or IP literal) without port, or
/// `*.suffix` for any name below `suffix`; `None` after reporting a bad one.
pub(super) fn route_host(errors: &mut Errors, path: &str, text: &str) -> Option<HostMatch> {
    let host = text.to_ascii_lowercase();
    let (problem, hint) = if host.is_empty() {
        ("is empty", "omit host to match every host")
    } else if host.chars().any(char::is_whitespace) {
        ("contains spaces", "a host name has no spaces")
    } else if !host.is_ascii() {
        (
            "is not ASCII",
            "write international names in their xn-- form",
        )
    } else if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        if Ipv6Addr::from_str(inner).is_ok() {
            return Some(HostMatch::Exact(host));
        }
        ("is not a valid IPv6 literal", "e.g. \"[2001:db8::1]\"")
    } else if host.contains(':') {
        ("includes a port", "routes match the host without its port")
    } else if let Some(suffix) = host.strip_prefix("*.") {
        if is_host_name(suffix) {
            return Some(HostMatch::Wildcard(format!(".{suffix}")));
        }
        ("is not a valid wildcard", "e.g. \"*.example.org\"")
    } else if host.contains('*') {
        (
            "has a wildcard that is not the whole first label",
            "e.g. \"*.example.org\"",
        )
    } else if is_host_name(&host) {
        return Some(HostMatch::Exact(host));
    } else {
        ("is not a valid host name", "e.g. \"blog.example.org\"")
    };
    errors.push(ConfigError::new(path, format!("{text:?} {problem}")).with_hint(hint));
    None
}

/// A file path relative to `base_dir` (or absolute) that exists and is readable
/// UTF-8 text; returns the resolved path.
pub(super) fn text_file(
    errors: &mut Errors,
    path: &str,
    file: &Path,
    base_dir: &Path,
) -> Option<(PathBuf, String)> {
    let full = base_dir.join(file);
    let problem = match std::fs::read_to_string(&full) {
        Ok(text) => return Some((full, text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist".to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => "is not UTF-8 text".to_owned(),
        Err(_) if full.is_dir() => "is a directory".to_owned(),
        Err(e) => format!("cannot be read: {e}"),
    };
    errors.push(ConfigError::new(
        path,
        format!("{} {problem}", full.display()),
    ));
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_error<T>(f: impl FnOnce(&mut Errors) -> T) -> ConfigError {
        let mut errors = Errors::new();
        f(&mut errors);
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors.remove(0)
    }

    #[test]
    fn key_segments_are_quoted_only_when_needed() {
        assert_eq!(key_segment("blog-1_a"), "blog-1_a");
        assert_eq!(key_segment("a.b"), "\"a.b\"");
        assert_eq!(key_segment(""), "\"\"");
    }

    #[test]
    fn durations() {
        let mut errors = Errors::new();
        let d = duration(
            &mut errors,
            "x",
            Some("500ms"),
            Duration::ZERO,
            Zero::Forbidden,
        );
        assert_eq!(d, Duration::from_millis(500));
        let d = duration(
            &mut errors,
            "x",
            None,
            Duration::from_secs(3),
            Zero::Forbidden,
        );
        assert_eq!(d, Duration::from_secs(3));
        assert!(errors.is_empty());
        let e = one_error(|e| duration(e, "x", Some("0s"), Duration::ZERO, Zero::Forbidden));
        assert_eq!(e.to_string(), "x: must be more than 0 (e.g. \"1s\")");
    }

    #[test]
    fn listen_addrs() {
        let mut errors = Errors::new();
        assert!(listen_addr(&mut errors, "b", "[::]:0").is_some());
        assert!(listen_addr(&mut errors, "b", "127.0.0.1:8080").is_some());
        assert!(errors.is_empty());
        for bad in [
            "[::]",
            "127.0.0.1",
            "localhost:80",
            "nonsense!",
            "[::1]:99999",
        ] {
            let e = one_error(|e| listen_addr(e, "b", bad));
            assert_eq!(e.path, "b");
        }
    }

    #[test]
    fn backend_addrs() {
        let mut errors = Errors::new();
        let a = backend_addr(&mut errors, "a", "[2001:db8::10]:80", false);
        assert_eq!(a, Some("[2001:db8::10]:80".parse().expect("addr")));
        let a = backend_addr(&mut errors, "a", "[::ffff:10.0.0.7]:80", true);
        assert_eq!(a, Some("10.0.0.7:80".parse().expect("addr")));
        assert!(errors.is_empty());
        let e = one_error(|e| backend_addr(e, "a", "[::ffff:10.0.0.7]:80", false));
        assert!(e.problem.contains("is IPv4"), "{e}");
        for bad in [
            "2001:db8::10",
            "[2001:db8::10]",
            "backend",
            "[2001:db8::zz]:80",
            "a b:80",
        ] {
            one_error(|e| backend_addr(e, "a", bad, false));
        }
    }

    #[test]
    fn localhost_resolves_to_ipv6_or_reports_no_aaaa() {
        let mut errors = Errors::new();
        match backend_addr(&mut errors, "a", "localhost:80", false) {
            Some(addr) => assert!(addr.is_ipv6()),
            None => assert!(
                errors[0].problem.contains("no IPv6 (AAAA) address"),
                "{errors:?}"
            ),
        }
        let mut errors = Errors::new();
        assert!(backend_addr(&mut errors, "a", "localhost:80", true).is_some());
    }

    #[test]
    fn ip_nets() {
        let mut errors = Errors::new();
        assert_eq!(
            ip_net(&mut errors, "t", "10.1.2.3/8"),
            Some("10.0.0.0/8".parse().expect("net"))
        );
        assert_eq!(
            ip_net(&mut errors, "t", "2001:db8::1"),
            Some("2001:db8::1/128".parse().expect("net"))
        );
        assert!(errors.is_empty());
        one_error(|e| ip_net(e, "t", "10.0.0.0/33"));
    }

    #[test]
    fn route_hosts() {
        let mut errors = Errors::new();
        assert_eq!(
            route_host(&mut errors, "h", "Blog.Example.ORG").expect("valid"),
            HostMatch::Exact("blog.example.org".into())
        );
        assert_eq!(
            route_host(&mut errors, "h", "*.example.org").expect("valid"),
            HostMatch::Wildcard(".example.org".into())
        );
        assert_eq!(
            route_host(&mut errors, "h", "[2001:db8::1]").expect("valid"),
            HostMatch::Exact("[2001:db8::1]".into())
        );
        assert!(errors.is_empty());
        for bad in [
            "",
            "a b",
            "blog.example.org:8080",
            "a.*.org",
            "*",
            "*.",
            "blog..org",
            "bläh.org",
        ] {
            one_error(|e| route_host(e, "h", bad));
        }
    }

    #[test]
    fn text_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("p.html"), "hi").expect("write");
        let mut errors = Errors::new();
        assert_eq!(
            text_file(&mut errors, "p", Path::new("p.html"), dir.path()),
            Some((dir.path().join("p.html"), "hi".to_owned()))
        );
        assert!(errors.is_empty());
        let e = one_error(|e| text_file(e, "p", Path::new("nope.html"), dir.path()));
        assert!(e.problem.ends_with("nope.html does not exist"), "{e}");
        let e = one_error(|e| text_file(e, "p", Path::new("."), dir.path()));
        assert!(e.problem.ends_with("is a directory"), "{e}");
    }
}
