//! Certificates: loading PEM files into rustls keys, their names, and choosing one by
//! server name.
//!
//! A certificate is loaded once per snapshot: the chain (end-entity first) and the
//! private key (PKCS#8, SEC1 or PKCS#1; RSA, ECDSA or Ed25519) become one
//! `rustls::sign::CertifiedKey`, after checking that the key belongs to the
//! certificate. Its names are the end-entity certificate's DNS and IP subject
//! alternative names, lower-cased (the subject CN only when there is no SAN).
//!
//! Selection ([`select`]): an exact name, then a wildcard `*.suffix` covering exactly
//! one label (RFC 6125), then the default certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Why a certificate or key could not be used; the config error names the key path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error("{0} cannot be read: {1}")]
    Unreadable(PathBuf, String),
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{0} holds no PEM private key")]
    NoKey(PathBuf),
    #[error("{0}: unsupported private key: {1}")]
    UnsupportedKey(PathBuf, String),
    #[error("does not match the certificate")]
    Mismatch,
    #[error("{0}: the certificate cannot be parsed: {1}")]
    BadCertificate(PathBuf, String),
}

/// Which file a [`CertError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Cert,
    Key,
}

/// One loaded certificate.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// Lower-case DNS names (`*.example.org` for wildcards) and IP addresses.
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CertError::Missing(path.to_owned()),
        _ => CertError::Unreadable(path.to_owned(), e.to_string()),
    })
}

/// Loads a certificate chain and its key. Errors say which of the two files is wrong.
pub fn load(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, (Part, CertError)> {
    let cert_pem = read(cert_path).map_err(|e| (Part::Cert, e))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    let Some(leaf) = chain.first() else {
        return Err((Part::Cert, CertError::NoCertificate(cert_path.to_owned())));
    };
    let names = names(leaf).map_err(|e| {
        (
            Part::Cert,
            CertError::BadCertificate(cert_path.to_owned(), e),
        )
    })?;
    let key_pem = read(key_path).map_err(|e| (Part::Key, e))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| (Part::Key, CertError::NoKey(key_path.to_owned())))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider.key_provider.load_private_key(key).map_err(|e| {
        (
            Part::Key,
            CertError::UnsupportedKey(key_path.to_owned(), e.to_string()),
        )
    })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        // Keys whose public half cannot be derived cannot be checked; accept them.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => return Err((Part::Key, CertError::Mismatch)),
    }
    Ok(LoadedCert {
        cert_path: cert_path.to_owned(),
        key_path: key_path.to_owned(),
        names,
        key: Arc::new(certified),
    })
}

/// The names a certificate is valid for.
fn names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.trim_end_matches('.').to_ascii_lowercase()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

/// Whether certificate name `pattern` covers `host` (lower-case, no port).
pub fn covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The index of the certificate for `name`: exact match first, then wildcard, else
/// `default`.
pub fn select(certs: &[LoadedCert], name: Option<&str>, default: usize) -> usize {
    let Some(name) = name else { return default };
    let name = name.trim_end_matches('.');
    if let Some(i) = certs.iter().position(|c| {
        c.names
            .iter()
            .any(|n| !n.starts_with("*.") && n.eq_ignore_ascii_case(name))
    }) {
        return i;
    }
    certs
        .iter()
        .position(|c| {
            c.names
                .iter()
                .any(|n| n.starts_with("*.") && covers(n, name))
        })
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let c = dir.join(format!("{stem}.pem"));
        let k = dir.join(format!("{stem}.key"));
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        (c, k)
    }

    #[test]
    fn loads_names_and_rejects_a_mismatched_key() {
        let d = tempfile::tempdir().expect("dir");
        let (c1, k1) = write_cert(d.path(), "a", &["Blog.Example.org", "*.example.org"]);
        let (_, k2) = write_cert(d.path(), "b", &["other.org"]);
        let a = load(&c1, &k1).expect("load");
        assert_eq!(a.names, ["blog.example.org", "*.example.org"]);
        assert_eq!(load(&c1, &k2).err(), Some((Part::Key, CertError::Mismatch)));
        let missing = d.path().join("nope.pem");
        assert_eq!(
            load(&missing, &k1).err(),
            Some((Part::Cert, CertError::Missing(missing.clone())))
        );
        assert!(matches!(
            load(&k1, &k1),
            Err((Part::Cert, CertError::NoCertificate(_)))
        ));
        assert!(matches!(
            load(&c1, &c1),
            Err((Part::Key, CertError::NoKey(_)))
        ));
    }

    #[test]
    fn selection_exact_then_wildcard_then_default() {
        let d = tempfile::tempdir().expect("dir");
        let (c1, k1) = write_cert(d.path(), "a", &["*.example.org"]);
        let (c2, k2) = write_cert(d.path(), "b", &["blog.example.org"]);
        let certs = [load(&c1, &k1).expect("a"), load(&c2, &k2).expect("b")];
        assert_eq!(select(&certs, Some("blog.example.org"), 0), 1);
        assert_eq!(select(&certs, Some("BLOG.example.org."), 0), 1);
        assert_eq!(select(&certs, Some("forums.example.org"), 1), 0);
        assert_eq!(
            select(&certs, Some("a.b.example.org"), 1),
            1,
            "one label only"
        );
        assert_eq!(select(&certs, Some("example.org"), 1), 1);
        assert_eq!(select(&certs, None, 1), 1);
    }
}
