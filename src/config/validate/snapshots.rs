//! Checks for `[[snapshots]]`: each entry becomes one [`EdgeSnapshotSpec`] per path.
//!
//! Invariants of the result: every `pool` is an index into the (name-sorted) pools;
//! `(host, path)` pairs are unique across all entries; paths are origin-form
//! targets (`/`, optionally `?query`) that `http` parses as a path-and-query.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::config::fields::{self, Errors, Zero};
use crate::config::model::{PoolConfig, SnapshotConfig};
use crate::config::{ConfigError, EdgeSnapshotSpec, HostMatch};

const REFRESH: Duration = Duration::from_secs(60);
const MAX_STALE: Duration = Duration::from_secs(3600);

pub(super) fn snapshots(
    e: &mut Errors,
    raw: Vec<SnapshotConfig>,
    pools: &BTreeMap<String, PoolConfig>,
) -> Vec<EdgeSnapshotSpec> {
    let mut specs = Vec::new();
    let mut first_at: HashMap<(Option<String>, String), String> = HashMap::new();
    for (i, entry) in raw.into_iter().enumerate() {
        let at = format!("snapshots[{i}]");
        let pool = match entry.pool.as_deref() {
            None | Some("") => {
                e.push(
                    ConfigError::new(format!("{at}.pool"), "missing or empty")
                        .with_hint("name the pool the pages are fetched from"),
                );
                None
            }
            Some(name) => match pools.keys().position(|p| p == name) {
                Some(index) => Some(index),
                None => {
                    e.push(
                        ConfigError::new(format!("{at}.pool"), format!("no pool named {name:?}"))
                            .with_hint("define it under [pools.NAME]"),
                    );
                    None
                }
            },
        };
        let host = match entry.host.as_deref() {
            None => Some(None),
            Some(text) => match fields::route_host(e, &format!("{at}.host"), text) {
                Some(HostMatch::Exact(h)) => Some(Some(h)),
                Some(_) => {
                    e.push(
                        ConfigError::new(format!("{at}.host"), format!("{text:?} is a wildcard"))
                            .with_hint("a snapshot is one page of one site: name the host exactly"),
                    );
                    None
                }
                None => None,
            },
        };
        let refresh = fields::duration(
            e,
            &format!("{at}.refresh"),
            entry.refresh.as_deref(),
            REFRESH,
            Zero::Forbidden,
        );
        let mut max_stale = fields::duration(
            e,
            &format!("{at}.max_stale"),
            entry.max_stale.as_deref(),
            MAX_STALE,
            Zero::Allowed,
        );
        if max_stale < refresh && entry.max_stale.is_some() {
            // max_stale counts from the last good fetch: shorter than refresh, the copy
            // would lapse before the next fetch even with a healthy back end.
            e.push(
                ConfigError::new(
                    format!("{at}.max_stale"),
                    format!("{max_stale:?} is shorter than refresh ({refresh:?})"),
                )
                .with_hint("max_stale counts from the last good fetch; make it at least refresh"),
            );
        }
        if entry.max_stale.is_none() {
            // The default is an hour, or one refresh when that is longer.
            max_stale = max_stale.max(refresh);
        }
        let paths = entry.paths.unwrap_or_default();
        if paths.is_empty() {
            e.push(
                ConfigError::new(format!("{at}.paths"), "no paths")
                    .with_hint("e.g. paths = [\"/\", \"/2026/launch\"]"),
            );
        }
        for (j, path) in paths.into_iter().enumerate() {
            let path_at = format!("{at}.paths[{j}]");
            let valid = path.starts_with('/')
                && !path.contains('#')
                && path.parse::<http::uri::PathAndQuery>().is_ok();
            if !valid {
                e.push(
                    ConfigError::new(&path_at, format!("{path:?} is not a path"))
                        .with_hint("a path starting with /, optionally with ?query, e.g. \"/\""),
                );
                continue;
            }
            let (Some(pool), Some(host)) = (pool, host.clone()) else {
                continue;
            };
            let key = (host.clone(), path.clone());
            if let Some(first) = first_at.get(&key) {
                e.push(
                    ConfigError::new(&path_at, format!("{path:?} is already a snapshot"))
                        .with_hint(format!("first at {first}")),
                );
                continue;
            }
            first_at.insert(key, path_at);
            specs.push(EdgeSnapshotSpec {
                name: format!("{}{path}", host.as_deref().unwrap_or("")),
                pool,
                host,
                path,
                refresh,
                max_stale,
                ignore_cookies: entry.ignore_cookies.unwrap_or(true),
            });
        }
    }
    specs
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::validate::tests::{load, LISTENER, POOL, ROUTE};

    #[test]
    fn entries_expand_to_one_snapshot_per_path_with_defaults() {
        let text = format!(
            "{LISTENER}{ROUTE}{POOL}[[snapshots]]\npool = \"blog\"\npaths = [\"/\", \"/news?page=1\"]\n\
             [[snapshots]]\npool = \"blog\"\nhost = \"Blog.Example.org\"\npaths = [\"/\"]\n\
             refresh = \"5s\"\nmax_stale = \"5s\"\nignore_cookies = false\n"
        );
        let s = load(&text).expect("valid");
        assert_eq!(s.snapshots.len(), 3);
        let first = &s.snapshots[0];
        assert_eq!((first.name.as_str(), first.pool), ("/", 0));
        assert_eq!(first.refresh, Duration::from_secs(60));
        assert_eq!(first.max_stale, Duration::from_secs(3600));
        assert!(first.ignore_cookies && first.host.is_none());
        assert_eq!(s.snapshots[1].path, "/news?page=1");
        let hosted = &s.snapshots[2];
        assert_eq!(hosted.host.as_deref(), Some("blog.example.org"));
        assert_eq!(hosted.name, "blog.example.org/");
        assert_eq!(hosted.refresh, Duration::from_secs(5));
        assert_eq!(hosted.max_stale, Duration::from_secs(5));
        assert!(!hosted.ignore_cookies);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = format!(
            "{LISTENER}{ROUTE}{POOL}[[snapshots]]\npool = \"nope\"\npaths = [\"x\", \"/\"]\n\
             refresh = \"0s\"\n[[snapshots]]\npaths = []\nrefresh = \"2m\"\nmax_stale = \"1m\"\nhost = \"*.example.org\"\n\
             [[snapshots]]\npool = \"blog\"\npaths = [\"/a\", \"/a\"]\n"
        );
        let errors = load(&text).expect_err("invalid").to_string();
        for want in [
            "snapshots[0].pool: no pool named \"nope\"",
            "snapshots[0].paths[0]: \"x\" is not a path",
            "snapshots[0].refresh: must be more than 0",
            "snapshots[1].pool: missing or empty",
            "snapshots[1].host: \"*.example.org\" is a wildcard",
            "snapshots[1].paths: no paths",
            "snapshots[1].max_stale: 60s is shorter than refresh (120s)",
            "snapshots[2].paths[1]: \"/a\" is already a snapshot (first at snapshots[2].paths[0])",
        ] {
            assert!(errors.contains(want), "missing {want:?} in:\n{errors}");
        }
    }
}
