//! Routing: which pool serves a request, by host and path prefix.
//!
//! Rules (documented in README): the host is compared case-insensitively with its port
//! stripped. Among routes whose host and path prefix both match, the most specific
//! host wins (exact name, then the longest wildcard suffix, then routes without a
//! host), and then the longest `path_prefix`. A prefix is a plain string prefix, as in
//! nginx `location /x` and HAProxy `path_beg`. No match: the caller answers 404.
//!
//! Invariant: routes are sorted once at compile time, so matching is a first-match
//! scan that allocates nothing.

use crate::config::{Class, HostMatch, RouteSpec};

/// The compiled routing table.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<RouteSpec>,
}

/// The outcome of a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched {
    /// Index into the snapshot's pools.
    pub pool: usize,
    /// Forced class, if the route sets one.
    pub class: Option<Class>,
}

fn host_rank(h: &HostMatch) -> (u8, usize) {
    match h {
        HostMatch::Exact(_) => (2, 0),
        HostMatch::Wildcard(suffix) => (1, suffix.len()),
        HostMatch::Any => (0, 0),
    }
}

impl Router {
    /// Compiles the routes of a snapshot.
    pub fn new(routes: &[RouteSpec]) -> Self {
        let mut routes = routes.to_vec();
        // Stable sort: equal keys keep config order.
        routes.sort_by(|a, b| {
            host_rank(&b.host)
                .cmp(&host_rank(&a.host))
                .then(b.path_prefix.len().cmp(&a.path_prefix.len()))
        });
        Router { routes }
    }

    /// Finds the route for `host` (a Host header or authority, maybe with a port; `None`
    /// when the request has none) and `path`.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<Matched> {
        let host = host.map(strip_port).unwrap_or("");
        self.routes
            .iter()
            .find(|r| host_matches(&r.host, host) && path.starts_with(r.path_prefix.as_str()))
            .map(|r| Matched {
                pool: r.pool,
                class: r.class,
            })
    }
}

/// `example.org:8080` → `example.org`; `[::1]:80` → `[::1]`; a trailing dot is dropped.
pub fn strip_port(host: &str) -> &str {
    let h = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        // A byte scan from the end: the port is a few digits, and `str::rfind`'s
        // searcher costs ~10x more on every request (callgrind).
        match host.bytes().rposition(|b| b == b':') {
            Some(i) => &host[..i],
            None => host,
        }
    };
    h.strip_suffix('.').unwrap_or(h)
}

fn host_matches(m: &HostMatch, host: &str) -> bool {
    match m {
        HostMatch::Any => true,
        HostMatch::Exact(name) => host.eq_ignore_ascii_case(name),
        HostMatch::Wildcard(suffix) => {
            host.len() > suffix.len()
                && host.is_char_boundary(host.len() - suffix.len())
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_port_cases() {
        for (host, want) in [
            ("example.org:8080", "example.org"),
            ("example.org", "example.org"),
            ("example.org.", "example.org"),
            ("example.org.:443", "example.org"),
            ("127.0.0.1:18323", "127.0.0.1"),
            ("[::1]:80", "[::1]"),
            ("[::1]", "[::1]"),
            ("[::1", "[::1"),
            ("a:b:80", "a:b"),
            (":80", ""),
            ("", ""),
            ("bücher.example:80", "bücher.example"),
        ] {
            assert_eq!(strip_port(host), want, "{host:?}");
        }
    }

    fn r(host: HostMatch, prefix: &str, pool: usize) -> RouteSpec {
        RouteSpec {
            host,
            path_prefix: prefix.into(),
            pool,
            class: None,
        }
    }

    fn table() -> Router {
        Router::new(&[
            r(HostMatch::Any, "/", 0),
            r(HostMatch::Any, "/forum", 1),
            r(HostMatch::Exact("blog.example.org".into()), "/", 2),
            r(HostMatch::Exact("blog.example.org".into()), "/wp-admin", 3),
            r(HostMatch::Wildcard(".example.org".into()), "/", 4),
            r(HostMatch::Wildcard(".cdn.example.org".into()), "/", 5),
        ])
    }

    fn pool(rt: &Router, host: Option<&str>, path: &str) -> Option<usize> {
        rt.route(host, path).map(|m| m.pool)
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table();
        assert_eq!(pool(&t, Some("other.org"), "/"), Some(0));
        assert_eq!(pool(&t, Some("other.org"), "/forum/t/1"), Some(1));
        assert_eq!(pool(&t, Some("blog.example.org"), "/wp-admin/x"), Some(3));
        assert_eq!(pool(&t, Some("blog.example.org"), "/2026/launch"), Some(2));
    }

    #[test]
    fn host_is_case_insensitive_without_port_and_dot() {
        let t = table();
        assert_eq!(pool(&t, Some("BLOG.Example.ORG:8080"), "/"), Some(2));
        assert_eq!(pool(&t, Some("blog.example.org."), "/"), Some(2));
        assert_eq!(pool(&t, Some("[::1]:8080"), "/"), Some(0));
        assert_eq!(pool(&t, None, "/"), Some(0));
    }

    #[test]
    fn exact_beats_wildcard_and_longer_wildcard_beats_shorter() {
        let t = table();
        assert_eq!(pool(&t, Some("forums.example.org"), "/"), Some(4));
        assert_eq!(pool(&t, Some("a.cdn.example.org"), "/"), Some(5));
        // The wildcard does not match the bare domain.
        assert_eq!(pool(&t, Some("example.org"), "/"), Some(0));
    }

    #[test]
    fn more_specific_host_without_matching_prefix_falls_back() {
        let t = Router::new(&[
            r(HostMatch::Exact("a.org".into()), "/api", 1),
            r(HostMatch::Any, "/", 0),
        ]);
        assert_eq!(pool(&t, Some("a.org"), "/api/v1"), Some(1));
        assert_eq!(pool(&t, Some("a.org"), "/"), Some(0));
    }

    #[test]
    fn no_match_is_none() {
        let t = Router::new(&[r(HostMatch::Exact("a.org".into()), "/", 0)]);
        assert_eq!(pool(&t, Some("b.org"), "/"), None);
        assert_eq!(pool(&t, None, "/"), None);
        assert_eq!(pool(&t, Some("ä.a.org"), "/"), None);
    }
}
