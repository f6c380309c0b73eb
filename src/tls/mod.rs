//! TLS termination with rustls: the server config of a TLS listener, and certificate
//! selection by SNI that always reads the current snapshot.
//!
//! TLS 1.3 and 1.2 only (rustls implements nothing older), rustls's default cipher
//! suites (ring provider), ALPN `h2` then `http/1.1`, session resumption by both
//! tickets (rotating ticketer) and a stateful cache. The [`SniResolver`] looks the
//! listener up by name in the live snapshot at every handshake, so a reload that
//! replaces certificates takes effect for the next handshake while open connections
//! keep the certificate they negotiated.

pub mod certs;

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::TlsSpec;
use crate::proxy::Proxy;

/// Entries in the stateful session-resumption cache.
pub const SESSION_CACHE: usize = 16 * 1024;

/// Errors of building a TLS server config.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Chooses a listener's certificate from the current snapshot.
pub struct SniResolver {
    proxy: Arc<Proxy>,
    listener: Arc<str>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver")
            .field("listener", &self.listener)
            .finish()
    }
}

impl SniResolver {
    /// A resolver for listener `listener`.
    pub fn new(proxy: Arc<Proxy>, listener: &str) -> Self {
        SniResolver {
            proxy,
            listener: listener.into(),
        }
    }
}

/// The TLS settings of `listener` in a snapshot, if it has any.
pub fn listener_tls<'a>(
    snapshot: &'a crate::config::Snapshot,
    listener: &str,
) -> Option<&'a TlsSpec> {
    snapshot
        .listeners
        .iter()
        .find(|l| l.name == listener)
        .and_then(|l| l.tls.as_ref())
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let live = self.proxy.live();
        let tls = listener_tls(&live.snapshot, &self.listener)?;
        let i = certs::select(&tls.certificates, hello.server_name(), tls.default);
        tls.certificates.get(i).map(|c| Arc::clone(&c.key))
    }
}

/// The rustls server config of a TLS listener.
pub fn server_config(resolver: SniResolver) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    cfg.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    Ok(Arc::new(cfg))
}
