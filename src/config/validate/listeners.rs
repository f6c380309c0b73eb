//! Checks for `[admin]` and `[[listeners]]`: names, and bind addresses that are
//! unique across all listeners and the admin listener.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use crate::config::fields::{self, key_segment, Errors};
use std::path::Path;

use http::HeaderValue;

use crate::config::model::{AdminConfig, ListenerConfig, TlsConfig};
use crate::config::{AdminSpec, ConfigError, ListenerSpec, TlsSpec};
use crate::tls::certs::{self, Part};

pub(super) const ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);

/// Every address bound so far, with the key path that bound it.
#[derive(Default)]
pub(super) struct Binds(Vec<(SocketAddr, String)>);

impl Binds {
    /// Records `addr`, or reports that it is taken: the same address, or the same
    /// port of the same family where either is the wildcard address (Linux refuses
    /// that bind). Port 0 (any free port) never collides.
    fn claim(&mut self, errors: &mut Errors, path: String, addr: SocketAddr) -> bool {
        let clash = self.0.iter().find(|(other, _)| {
            addr.port() != 0
                && other.port() == addr.port()
                && other.is_ipv4() == addr.is_ipv4()
                && (other.ip() == addr.ip()
                    || other.ip().is_unspecified()
                    || addr.ip().is_unspecified())
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

pub(super) fn admin(
    e: &mut Errors,
    raw: AdminConfig,
    binds: &mut Binds,
    base_dir: &Path,
) -> AdminSpec {
    let allow_remote = raw.allow_remote.unwrap_or(false);
    let token = raw.token_file.and_then(|file| {
        let full = base_dir.join(&file);
        match std::fs::read_to_string(&full) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
            Ok(_) => {
                e.push(ConfigError::new(
                    "admin.token_file",
                    format!("{} is empty", full.display()),
                ));
                None
            }
            Err(err) => {
                e.push(ConfigError::new(
                    "admin.token_file",
                    format!("{} cannot be read: {err}", full.display()),
                ));
                None
            }
        }
    });
    if allow_remote && token.is_none() && !e.iter().any(|x| x.path == "admin.token_file") {
        e.push(
            ConfigError::new("admin.token_file", "required with allow_remote = true")
                .with_hint("a file holding the bearer token admin requests must present"),
        );
    }
    let Some(texts) = raw.listen else {
        binds.claim(
            e,
            format!("admin.listen (default {ADMIN_LISTEN})"),
            ADMIN_LISTEN,
        );
        return AdminSpec {
            listen: vec![ADMIN_LISTEN],
            token,
        };
    };
    let mut listen = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let path = format!("admin.listen[{i}]");
        if let Some(addr) = fields::listen_addr(e, &path, text) {
            if !allow_remote && !addr.ip().is_loopback() {
                e.push(
                    ConfigError::new(&path, format!("{addr} is not a loopback address"))
                        .with_hint("the admin API stays on loopback unless admin.allow_remote = true (with admin.token_file)"),
                );
                continue;
            }
            if binds.claim(e, path, addr) {
                listen.push(addr);
            }
        }
    }
    AdminSpec { listen, token }
}

pub(super) fn listeners(
    e: &mut Errors,
    raw: Vec<ListenerConfig>,
    binds: &mut Binds,
    base_dir: &Path,
) -> Vec<ListenerSpec> {
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
        let redirect_https = listener.redirect_https.unwrap_or(false);
        let tls = listener
            .tls
            .and_then(|t| tls(e, &format!("{label}.tls"), t, base_dir));
        if redirect_https && tls.is_some() {
            e.push(
                ConfigError::new(
                    format!("{label}.redirect_https"),
                    "a TLS listener cannot redirect to https",
                )
                .with_hint("redirect_https is for a plain listener beside the TLS one"),
            );
        }
        specs.push(ListenerSpec {
            name,
            bind,
            redirect_https,
            tls,
            proxy_protocol: listener.proxy_protocol.unwrap_or(false),
        });
    }
    specs
}

fn tls(e: &mut Errors, label: &str, raw: TlsConfig, base_dir: &Path) -> Option<TlsSpec> {
    let entries = raw.certificates.unwrap_or_default();
    if entries.is_empty() {
        e.push(
            ConfigError::new(format!("{label}.certificates"), "no certificates")
                .with_hint("certificates = [{ cert = \"site.pem\", key = \"site.key\" }]"),
        );
    }
    let mut certificates = Vec::new();
    let mut ok = true;
    for (i, c) in entries.into_iter().enumerate() {
        let at = format!("{label}.certificates[{i}]");
        let (Some(cert), Some(key)) = (c.cert, c.key) else {
            e.push(
                ConfigError::new(at, "needs both cert and key")
                    .with_hint("{ cert = \"a.pem\", key = \"a.key\" }"),
            );
            ok = false;
            continue;
        };
        match certs::load(&base_dir.join(&cert), &base_dir.join(&key)) {
            Ok(loaded) => certificates.push(loaded),
            Err((part, err)) => {
                let field = match part {
                    Part::Cert => "cert",
                    Part::Key => "key",
                };
                e.push(ConfigError::new(format!("{at}.{field}"), err.to_string()));
                ok = false;
            }
        }
    }
    let default = match raw.default_certificate {
        None => 0,
        Some(name) => {
            // The same choice SNI would make for this name: exact, then wildcard.
            let lower = name.trim_end_matches('.').to_ascii_lowercase();
            let exact = certificates.iter().position(|c| c.names.contains(&lower));
            match exact.or_else(|| {
                certificates
                    .iter()
                    .position(|c| c.names.iter().any(|n| certs::covers(n, &lower)))
            }) {
                Some(i) => i,
                None => {
                    if ok {
                        let known: Vec<&str> = certificates
                            .iter()
                            .flat_map(|c| c.names.iter().map(String::as_str))
                            .collect();
                        e.push(
                            ConfigError::new(
                                format!("{label}.default_certificate"),
                                format!("no certificate covers {name:?}"),
                            )
                            .with_hint(format!("names: {}", known.join(", "))),
                        );
                    }
                    0
                }
            }
        }
    };
    let hsts = raw.hsts.and_then(|v| {
        let valid = v.trim_start().to_ascii_lowercase().starts_with("max-age=");
        match HeaderValue::from_str(&v) {
            Ok(h) if valid => Some(h),
            _ => {
                e.push(
                    ConfigError::new(
                        format!("{label}.hsts"),
                        format!("{v:?} is not a Strict-Transport-Security value"),
                    )
                    .with_hint("e.g. \"max-age=31536000; includeSubDomains\""),
                );
                None
            }
        }
    });
    (ok && !certificates.is_empty()).then_some(TlsSpec {
        certificates,
        default,
        hsts,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{error, errors, paths, valid, LISTENER, POOL, ROUTE};
    use super::*;

    fn with_listeners(listeners: &str) -> String {
        format!("{listeners}{ROUTE}{POOL}")
    }

    #[test]
    fn admin_listen_is_parsed_and_may_be_empty() {
        let s = valid(&format!(
            "[admin]\nlisten = [\"[::1]:9091\"]\n{LISTENER}{ROUTE}{POOL}"
        ));
        assert_eq!(
            s.admin.listen,
            vec!["[::1]:9091".parse::<SocketAddr>().expect("addr")]
        );
        let s = valid(&format!("[admin]\nlisten = []\n{LISTENER}{ROUTE}{POOL}"));
        assert!(s.admin.listen.is_empty());
        let e = error(&format!(
            "[admin]\nlisten = [\"localhost:9090\"]\n{LISTENER}{ROUTE}{POOL}"
        ));
        assert!(
            e.starts_with("admin.listen[0]: \"localhost:9090\" is not an IP address"),
            "{e}"
        );
    }

    #[test]
    fn listener_bind_errors_name_the_listener_and_index() {
        let l = "[[listeners]]\nname = \"public\"\nbind = [\"[::1]:0\", \"[::1]\", \"1.2.3.4:99999\"]\n";
        assert_eq!(
            paths(&with_listeners(l)),
            ["listeners.public.bind[1]", "listeners.public.bind[2]"]
        );
        let l = "[[listeners]]\nname = \"public\"\nbind = []\n[[listeners]]\nname = \"other\"\n";
        assert_eq!(
            paths(&with_listeners(l)),
            ["listeners.public.bind", "listeners.other.bind"]
        );
        assert_eq!(
            paths(&with_listeners("")),
            ["listeners"],
            "at least one listener is required"
        );
    }

    #[test]
    fn binds_are_unique_across_listeners_and_admin() {
        let l = "[[listeners]]\nname = \"a\"\nbind = [\"[::]:8080\"]\n\
                 [[listeners]]\nname = \"b\"\nbind = [\"[::]:8080\", \"127.0.0.1:9090\"]\n";
        assert_eq!(
            errors(&with_listeners(l)),
            [
                "listeners.b.bind[0]: [::]:8080 is already bound by listeners.a.bind[0]",
                "listeners.b.bind[1]: 127.0.0.1:9090 is already bound by admin.listen (default 127.0.0.1:9090)",
            ]
        );
        // A wildcard takes the port on every address of its family, not the other family.
        let l = "[[listeners]]\nname = \"a\"\nbind = [\"0.0.0.0:8080\", \"[::]:8080\", \"127.0.0.1:8080\"]\n";
        let e = error(&with_listeners(l));
        assert!(e.starts_with("listeners.a.bind[2]: 127.0.0.1:8080 overlaps 0.0.0.0:8080 bound by listeners.a.bind[0]"), "{e}");
        // Port 0 (any free port) never collides.
        let l = "[admin]\nlisten = [\"[::1]:0\"]\n[[listeners]]\nname = \"a\"\nbind = [\"[::1]:0\", \"[::]:0\"]\n";
        valid(&with_listeners(l));
    }

    #[test]
    fn listener_names_are_required_and_unique() {
        let l = "[[listeners]]\nname = \"a\"\nbind = [\"[::1]:1\"]\n[[listeners]]\nname = \"a\"\nbind = [\"[::1]:2\"]\n\
                 [[listeners]]\nbind = [\"[::1]:3\"]\n";
        let all = errors(&with_listeners(l));
        assert_eq!(
            all[0],
            "listeners[1].name: duplicate listener name \"a\" (first at listeners[0])"
        );
        assert!(
            all[1].starts_with("listeners[2].name: missing or empty"),
            "{all:?}"
        );
        assert_eq!(all.len(), 2);
        let s = valid(&with_listeners(
            "[[listeners]]\nname = \"plain\"\nbind = [\"[::1]:80\"]\nredirect_https = true\n",
        ));
        assert!(s.listeners[0].redirect_https);
    }
}
