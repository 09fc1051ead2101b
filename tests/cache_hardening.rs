//! Hardening of the cache against damage behind berth's back: a cached
//! file truncated while its mapping is reused must not kill the daemon
//! (SIGBUS) on any transport; the client's transfer is aborted, the entry
//! is quarantined and the next request refetches it from the origin.
//!
//! origin (docker-registry) <- CountingProxy <- berth <- reqwest clients.

mod common;

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use common::berth::{blob_path, settled, Berth};
use common::content::{self, Blob, RegistryClient};
use common::origin::Origin;
use common::proxy::CountingProxy;
use common::tools;
use rcgen::{CertificateParams, KeyPair};

const MIB: usize = 1 << 20;

/// How the client reaches berth.
#[derive(Debug, Clone, Copy)]
enum Transport {
    /// HTTP/1.1 on plain TCP (hits leave by sendfile).
    Plain,
    /// HTTP/2 without TLS (prior knowledge).
    H2c,
    /// HTTP/1.1 over TLS (encrypted from the mapping in user space).
    Tls,
    /// HTTP/2 over TLS (ALPN).
    TlsH2,
}

/// A self-signed certificate for 127.0.0.1: (cert path, key path, PEM).
fn self_signed(dir: &Path) -> (String, String, String) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    (s(&c), s(&k), cert.pem())
}

/// What a GET of the blob came to: status and the body, or the error that
/// cut it short.
async fn get(http: &reqwest::Client, url: &str) -> Result<(u16, Vec<u8>), String> {
    let resp = http.get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.map_err(|e| format!("{e:?}"))?;
    Ok((status, body.to_vec()))
}

async fn truncated_cache_file_is_survived_and_refetched(transport: Transport) {
    if !tools::require("docker-registry") {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let origin = Origin::start().await;
    let proxy = CountingProxy::start(&origin.url()).await;
    let repo = "library/truncate";
    let blob = Blob::new(
        content::OCI_LAYER_GZIP,
        content::pseudo_random_bytes(77, 8 * MIB),
    );
    RegistryClient::new(&origin.url())
        .push_blob(repo, &blob)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let up = format!("docker.io={}", proxy.url());
    let mut args = vec!["--upstream".to_owned(), up];
    let mut http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30));
    let tls = matches!(transport, Transport::Tls | Transport::TlsH2);
    if tls {
        let (cert, key, pem) = self_signed(dir.path());
        args.extend(["--tls-cert".to_owned(), cert, "--tls-key".to_owned(), key]);
        http = http
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    }
    http = match transport {
        Transport::Plain | Transport::Tls => http.http1_only(),
        Transport::H2c => http.http2_prior_knowledge(),
        Transport::TlsH2 => http,
    };
    let http = http.build().unwrap();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut berth = Berth::try_start_with_dir(&dir.path().join("cache"), &args)
        .await
        .expect("berth starts");
    let scheme = if tls { "https" } else { "http" };
    let base = format!("{scheme}://127.0.0.1:{}", berth.port());
    let url = format!("{base}/v2/{repo}/blobs/{}", blob.digest);

    // A miss (fetched and published), then a hit: its mapping is kept for reuse.
    for _ in 0..2 {
        let (status, body) = get(&http, &url).await.expect("GET");
        assert_eq!(status, 200);
        assert_eq!(content::digest_of(&body), blob.digest);
        assert!(settled(berth.cache_dir()).await);
    }
    let path = blob_path(berth.cache_dir(), &blob.digest);
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(blob.bytes.len() as u64 / 2)
        .unwrap();

    // The reused mapping now covers pages past the end of its file.
    match get(&http, &url).await {
        Ok((200, body)) => panic!(
            "{transport:?}: a complete 200 from a truncated file ({} bytes, {})",
            body.len(),
            if content::digest_of(&body) == blob.digest {
                "right bytes"
            } else {
                "WRONG bytes"
            }
        ),
        Ok((status, _)) => panic!("{transport:?}: unexpected status {status}"),
        Err(e) => eprintln!("{transport:?}: the transfer was aborted as it should: {e}"),
    }
    assert!(
        berth.is_running(),
        "{transport:?}: berth survived\n{}",
        berth.log()
    );
    let (status, _) = get(&http, &format!("{base}/livez")).await.expect("livez");
    assert_eq!(status, 200);

    // Quarantined, so the next request fetches it again from the origin.
    let before = proxy.count("GET", &blob.digest);
    let (status, body) = get(&http, &url).await.expect("GET after truncation");
    assert_eq!(status, 200);
    assert_eq!(
        content::digest_of(&body),
        blob.digest,
        "{transport:?}: exact bytes"
    );
    assert_eq!(
        proxy.count("GET", &blob.digest),
        before + 1,
        "refetched once"
    );
    assert!(
        berth
            .cache_dir()
            .join("quarantine")
            .join(&blob.digest[7..])
            .is_file(),
        "the damaged file was moved aside"
    );
    assert!(berth.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_cache_file_over_plain_http1_aborts_and_is_refetched() {
    truncated_cache_file_is_survived_and_refetched(Transport::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_cache_file_over_h2c_aborts_and_is_refetched() {
    truncated_cache_file_is_survived_and_refetched(Transport::H2c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_cache_file_over_tls_aborts_and_is_refetched() {
    truncated_cache_file_is_survived_and_refetched(Transport::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_cache_file_over_tls_h2_aborts_and_is_refetched() {
    truncated_cache_file_is_survived_and_refetched(Transport::TlsH2).await;
}
