//! Serving TLS with rustls: certificate and key from PEM files, picked up
//! again when the files change (checked at most every few seconds, on the
//! handshake path, without blocking other handshakes), and optional client
//! certificate verification against a CA bundle (mTLS).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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

/// Resolves the certificate, reloading it when the files change.
struct Reloading {
    files: TlsFiles,
    /// The key in service, the files' stamps it came from, the last check.
    state: Mutex<(Arc<CertifiedKey>, Stamps, Instant)>,
}

impl fmt::Debug for Reloading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading")
            .field("cert", &self.files.cert)
            .finish()
    }
}

/// How often the files' modification times are looked at.
const RECHECK: Duration = Duration::from_secs(2);

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut st = self.state.lock().ok()?;
        if st.2.elapsed() >= RECHECK {
            st.2 = Instant::now();
            let now = mtimes(&self.files);
            if now != st.1 {
                match load_key(&self.files.cert, &self.files.key) {
                    Ok(k) => {
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                        *st = (k, now, Instant::now());
                    }
                    // A half-written pair during rotation: keep serving the old one.
                    Err(error) => {
                        tracing::warn!(%error, "TLS certificate changed but cannot be loaded; keeping the previous one")
                    }
                }
            }
        }
        Some(st.0.clone())
    }
}

/// Build the server config (fails closed: a bad file is an error at start).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let key = load_key(&files.cert, &files.key)?;
    let resolver = Arc::new(Reloading {
        state: Mutex::new((key, mtimes(files), Instant::now())),
        files: files.clone(),
    });
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
