//! berth serving TLS (rustls) from PEM files that are picked up again when
//! they change, with optional client certificates (mTLS) and a client token.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::berth::Berth;
use common::content::{self, MediaKind};
use common::origin::Origin;
use common::tools;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

/// A leaf for 127.0.0.1 (server) or a client, signed by `ca`: (cert PEM, key PEM).
fn leaf(ca: &Ca, name: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

fn client(ca: &Ca, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert.pem().as_bytes()).unwrap());
    if let Some((c, k)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{c}\n{k}").as_bytes()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test]
async fn tls_with_certificate_reload_client_certs_and_token() {
    if !tools::require("docker-registry") {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let origin = Origin::start().await;
    let img = content::build_image(51, 1, 4096, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/secure", "1", &img)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca("server CA one");
    let client_ca = ca("client CA");
    let (cert, key) = leaf(&server_ca, "berth one");
    let cert_path = write(dir.path(), "tls.crt", &cert);
    let key_path = write(dir.path(), "tls.key", &key);
    let client_ca_path = write(dir.path(), "clients.pem", &client_ca.cert.pem());
    let token = "0123456789abcdef-node-token";
    let token_path = write(dir.path(), "token", token);
    let up = format!("docker.io={}", origin.url());
    // The harness waits for http:// /v2/ to answer; with TLS it never does, so start by hand.
    let b = Berth::try_start_with_dir(
        &dir.path().join("cache"),
        &[
            "--upstream",
            &up,
            "--tls-cert",
            &cert_path,
            "--tls-key",
            &key_path,
            "--tls-client-ca",
            &client_ca_path,
            "--client-token-file",
            &token_path,
        ],
    )
    .await;
    let berth = match b {
        Ok(b) => b,
        Err(e) => {
            panic!("harness could not see berth come up over plain HTTP (expected with TLS): {e:#}")
        }
    };
    let url = format!("https://127.0.0.1:{}", berth.port());
    let (ccert, ckey) = leaf(&client_ca, "node client");
    let good = client(&server_ca, Some((&ccert, &ckey)));

    // Valid client certificate + token: served.
    let r = good
        .get(format!("{url}/v2/library/secure/manifests/1?ns=docker.io"))
        .bearer_auth(token)
        .header("Accept", content::ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest_bytes);
    // The token as a Basic password works too (skopeo --creds any:TOKEN).
    let r = good
        .get(format!("{url}/v2/"))
        .basic_auth("any", Some(token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Wrong or missing token: 401 in the envelope.
    let r = good
        .get(format!("{url}/v2/"))
        .bearer_auth("0123456789abcdef-wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    assert_eq!(
        good.get(format!("{url}/v2/"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // Probes need no token.
    assert_eq!(
        good.get(format!("{url}/livez"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // No client certificate: the handshake is refused.
    assert!(client(&server_ca, None)
        .get(format!("{url}/v2/"))
        .bearer_auth(token)
        .send()
        .await
        .is_err());
    // A client that does not trust the server's CA refuses berth (fails closed).
    let other = ca("someone else");
    assert!(client(&other, Some((&ccert, &ckey)))
        .get(format!("{url}/v2/"))
        .send()
        .await
        .is_err());

    // Rotate to a certificate from another CA: picked up without a restart.
    let server_ca2 = ca("server CA two");
    let (cert2, key2) = leaf(&server_ca2, "berth two");
    write(dir.path(), "tls.key.new", &key2);
    write(dir.path(), "tls.crt.new", &cert2);
    std::fs::rename(dir.path().join("tls.key.new"), &key_path).unwrap();
    std::fs::rename(dir.path().join("tls.crt.new"), &cert_path).unwrap();
    let new_client = client(&server_ca2, Some((&ccert, &ckey)));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match new_client
            .get(format!("{url}/v2/"))
            .bearer_auth(token)
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(300)).await,
            other => panic!(
                "the new certificate was never served: {other:?}\n{}",
                berth.log()
            ),
        }
    }
    assert!(berth.log().contains("TLS certificate reloaded"));
    assert!(
        !berth.log().contains(token),
        "the client token reached the log"
    );
}
