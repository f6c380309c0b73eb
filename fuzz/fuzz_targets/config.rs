//! Config text → parser → validator, as `launchday::config::load_str` does it
//! (`parse`, then `validate`), with the model made hermetic in between (see
//! `common::hermetic`: no DNS, no files outside the fixture directory).
//!
//! Never panics. An error list is never empty and every error has a key path and a
//! problem. A snapshot keeps the promises of `src/config/snapshot.rs`, and routing
//! with it only ever names one of its pools.

#![no_main]

use std::collections::HashSet;

use launchday::config::{self, Snapshot};
use launchday::route::Router;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    // `load_file` refuses a file that is not UTF-8 before parsing; lossy conversion
    // lets every mutation reach the parser anyway.
    let text = String::from_utf8_lossy(data);
    let base_dir = common::fixtures();
    let raw = match config::parse(&text) {
        Ok(raw) => raw,
        Err(e) => {
            common::check_error(&e);
            return;
        }
    };
    match config::validate(common::hermetic(raw), base_dir, None) {
        Ok(snapshot) => check_snapshot(&snapshot),
        Err(errors) => {
            assert!(!errors.is_empty(), "validate failed without an error");
            for e in &errors {
                common::check_error(e);
            }
            let _ = errors.to_string();
        }
    }
});

fn check_snapshot(s: &Snapshot) {
    assert!(!s.listeners.is_empty(), "snapshot without listeners");
    assert!(!s.routes.is_empty(), "snapshot without routes");
    assert!(s.threads >= 1);
    let mut names = HashSet::new();
    for l in &s.listeners {
        assert!(names.insert(l.name.as_str()), "listener {:?} twice", l.name);
        assert!(!l.bind.is_empty(), "listener {:?} binds nothing", l.name);
        if let Some(tls) = &l.tls {
            assert!(!tls.certificates.is_empty(), "TLS without certificates");
            assert!(
                tls.default < tls.certificates.len(),
                "default certificate out of range"
            );
        }
    }
    let mut binds = HashSet::new();
    for addr in s
        .listeners
        .iter()
        .flat_map(|l| &l.bind)
        .chain(&s.admin.listen)
    {
        // Port 0 (any free port) may repeat.
        assert!(
            addr.port() == 0 || binds.insert(*addr),
            "{addr} bound twice"
        );
    }
    let mut pools = HashSet::new();
    for p in &s.pools {
        assert!(pools.insert(p.name.as_str()), "pool {:?} twice", p.name);
        assert!(
            p.maintenance || !p.backends.is_empty(),
            "pool {:?} has no back ends",
            p.name
        );
        let mut backends = HashSet::new();
        for b in &p.backends {
            assert!(
                backends.insert(b.name.as_str()),
                "back end {:?} twice",
                b.name
            );
            assert!(
                s.allow_ipv4_backends || b.address.is_ipv6(),
                "IPv4 back end {} without allow_ipv4_backends",
                b.address
            );
        }
    }
    for r in &s.routes {
        assert!(
            r.pool < s.pools.len(),
            "route to pool {} of {}",
            r.pool,
            s.pools.len()
        );
        assert!(r.path_prefix.starts_with('/'), "prefix {:?}", r.path_prefix);
    }
    let router = Router::new(&s.routes);
    for (host, path) in [
        (None, "/"),
        (Some("blog.example.org"), "/"),
        (Some("A.Example.ORG:8080"), "/forums/x"),
        (Some("[2001:db8::1]:80"), "/api"),
        (Some(""), ""),
    ] {
        if let Some(m) = router.route(host, path) {
            assert!(
                m.pool < s.pools.len(),
                "routed to pool {} of {}",
                m.pool,
                s.pools.len()
            );
        }
    }
    for r in &s.routes {
        // A route always matches its own prefix on some host.
        let host = match &r.host {
            config::HostMatch::Any => None,
            config::HostMatch::Exact(h) => Some(h.clone()),
            config::HostMatch::Wildcard(suffix) => Some(format!("a{suffix}")),
        };
        assert!(
            router.route(host.as_deref(), &r.path_prefix).is_some(),
            "route {r:?} matches nothing"
        );
    }
}
