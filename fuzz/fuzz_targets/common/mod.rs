//! Shared by the fuzz targets: a fixture directory that configs resolve their files
//! against, and the rewrite that keeps config validation off the network and out of
//! the rest of the file system.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use launchday::config::model::RootConfig;
use launchday::config::{is_host_name, ConfigError};

/// The directory configs are validated against (`base_dir`), made once per process:
///
/// - `maintenance.html`: a maintenance template;
/// - `token`: an admin token; `empty`: an empty file; `latin1.html`: not UTF-8;
/// - `site.pem`/`site.key`: ECDSA certificate for `blog.example.org` and
///   `*.example.org`; `other.pem`/`other.key`: for `shop.example.net`;
/// - `dir/`: a directory.
///
/// The seeds in `corpus/config` name these files.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        remove_stale_fixtures();
        let dir = std::env::temp_dir().join(format!("launchday-fuzz-{}", std::process::id()));
        let write = |name: &str, bytes: &[u8]| {
            std::fs::write(dir.join(name), bytes)
                .unwrap_or_else(|e| panic!("fixture {}: {e}", dir.join(name).display()))
        };
        std::fs::create_dir_all(dir.join("dir")).expect("fixture dir");
        write(
            "maintenance.html",
            b"<h1>Back soon</h1>{{analytics}}<p>Retry after {{retry_after}}</p>",
        );
        write("token", b"s3cret-token\n");
        write("empty", b"");
        write("latin1.html", b"caf\xe9\n");
        for (stem, names) in [
            ("site", &["blog.example.org", "*.example.org"][..]),
            ("other", &["shop.example.net"][..]),
        ] {
            let key = rcgen::KeyPair::generate().expect("fixture key");
            let params = rcgen::CertificateParams::new(
                names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            )
            .expect("fixture certificate params");
            let cert = params.self_signed(&key).expect("fixture certificate");
            write(&format!("{stem}.pem"), cert.pem().as_bytes());
            write(&format!("{stem}.key"), key.serialize_pem().as_bytes());
        }
        dir
    })
}

/// Removes the fixture directories of processes that have exited (libFuzzer ends a
/// process with `exit`, so nothing is dropped; a merge or `-runs=0` over a corpus
/// starts many processes).
fn remove_stale_fixtures() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("launchday-fuzz-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Makes validating `raw` hermetic, changing only what would leave the process:
///
/// - a back-end address `name:port` that `validate` would resolve with DNS becomes
///   `localhost:port` (answered from /etc/hosts). This mirrors the private
///   `classify` in `src/config/fields.rs`; keep the two in step.
/// - a file path that is absolute or climbs out with `..` (token, certificates,
///   maintenance page, access log) becomes one that does not exist inside
///   [`fixtures`], so that fuzzing never reads `/dev/zero` or a FIFO.
///
/// Everything else, including every error path of the parser, is left alone.
pub fn hermetic(mut raw: RootConfig) -> RootConfig {
    if let Some(file) = raw.admin.as_mut().and_then(|a| a.token_file.as_mut()) {
        inside_string(file);
    }
    for listener in raw.listeners.iter_mut().flatten() {
        let certificates = listener.tls.as_mut().and_then(|t| t.certificates.as_mut());
        for c in certificates.into_iter().flatten() {
            for file in [c.cert.as_mut(), c.key.as_mut()].into_iter().flatten() {
                inside_string(file);
            }
        }
    }
    if let Some(page) = raw.maintenance.as_mut().and_then(|m| m.page.as_mut()) {
        if !stays_inside(page) {
            *page = PathBuf::from(OUTSIDE);
        }
    }
    if let Some(path) = raw.access_log.as_mut().and_then(|a| a.path.as_mut()) {
        inside_string(path);
    }
    for pool in raw.pools.iter_mut().flat_map(|p| p.values_mut()) {
        for backend in pool.backends.iter_mut().flatten() {
            if let Some(address) = backend.address.as_mut() {
                offline_address(address);
            }
        }
    }
    raw
}

const OUTSIDE: &str = "outside-the-fixtures";

fn stays_inside(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn inside_string(path: &mut String) {
    if !stays_inside(Path::new(path.as_str())) {
        *path = OUTSIDE.to_owned();
    }
}

/// `name:port` → `localhost:port` when `validate` would resolve `name`.
fn offline_address(text: &mut String) {
    if text.parse::<SocketAddr>().is_ok() {
        return;
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return;
    };
    if host.starts_with('[') || !is_host_name(host) || host.eq_ignore_ascii_case("localhost") {
        return;
    }
    if let Ok(port) = port.parse::<u16>() {
        *text = format!("localhost:{port}");
    }
}

/// The contract of a reported problem: where, what, and a hint that says something.
pub fn check_error(e: &ConfigError) {
    assert!(!e.path.is_empty(), "error without a key path: {e:?}");
    assert!(!e.problem.is_empty(), "error without a problem: {e:?}");
    if let Some(hint) = &e.hint {
        assert!(!hint.is_empty(), "empty hint: {e:?}");
    }
    let shown = e.to_string();
    assert!(
        shown.starts_with(&e.path),
        "{shown:?} does not start with its path"
    );
}
