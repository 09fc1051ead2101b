//! Serving TLS with rustls: certificate and key from PEM files, picked up
//! again when the files change (checked at most every few seconds, on a
//! blocking thread, never on the handshake path), and optional client
//! certificate verification against a CA bundle (mTLS).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// TLS settings for the registry listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
}

/// A TLS setup problem, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TlsError {
    path: String,
    reason: String,
}

fn tls_err(path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn load_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(cert, e))?;
    if certs.is_empty() {
        return Err(tls_err(cert, "no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| tls_err(key, e))?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

/// Modification times of the certificate and key files.
type Stamps = (Option<SystemTime>, Option<SystemTime>);

fn mtimes(files: &TlsFiles) -> Stamps {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(&files.cert), m(&files.key))
}

/// Resolves the certificate, reloading it when the files change. The
/// handshake path only loads the key in service; looking at the files
/// (stat, and reading and parsing them when changed) runs on a blocking
/// thread, so a slow disk never stalls the async workers, and the new
/// certificate serves from the next handshake on.
struct Reloading(Arc<Shared>);

/// What the resolver and its background checks share.
struct Shared {
    files: TlsFiles,
    /// The key in service and the files' stamps it came from.
    current: ArcSwap<(Arc<CertifiedKey>, Stamps)>,
    /// When the files were last looked at (ms since `epoch`).
    checked_ms: AtomicU64,
    epoch: Instant,
}

impl fmt::Debug for Reloading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading")
            .field("cert", &self.0.files.cert)
            .finish()
    }
}

/// How often the files' modification times are looked at.
const RECHECK: Duration = Duration::from_secs(2);

impl Shared {
    /// Blocking: reload the pair if the files changed.
    fn check(&self) {
        let now = mtimes(&self.files);
        if now == self.current.load().1 {
            return;
        }
        match load_key(&self.files.cert, &self.files.key) {
            Ok(k) => {
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                self.current.store(Arc::new((k, now)));
            }
            // A half-written pair during rotation: keep serving the old one.
            Err(error) => {
                tracing::warn!(%error, "TLS certificate changed but cannot be loaded; keeping the previous one")
            }
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let shared = &self.0;
        let now = shared.epoch.elapsed().as_millis() as u64;
        let last = shared.checked_ms.load(Ordering::Relaxed);
        if now >= last + RECHECK.as_millis() as u64
            && shared
                .checked_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let shared = shared.clone();
            // Off the handshake path (inline when there is no runtime).
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || shared.check())),
                Err(_) => shared.check(),
            }
        }
        Some(shared.current.load().0.clone())
    }
}

/// Build the server config (fails closed: a bad file is an error at start).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let key = load_key(&files.cert, &files.key)?;
    let resolver = Arc::new(Reloading(Arc::new(Shared {
        current: ArcSwap::from_pointee((key, mtimes(files))),
        checked_ms: AtomicU64::new(0),
        epoch: Instant::now(),
        files: files.clone(),
    })));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&files.cert, e))?;
    let mut cfg = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| tls_err(ca, e))? {
                roots
                    .add(c.map_err(|e| tls_err(ca, e))?)
                    .map_err(|e| tls_err(ca, e))?;
            }
            if roots.is_empty() {
                return Err(tls_err(ca, "no CA certificate in the file"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_err(ca, e))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(resolver)
        }
        None => builder.with_no_client_auth().with_cert_resolver(resolver),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
