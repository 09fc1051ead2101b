//! Wrong requests get the right status and OCI error code, never reach an
//! upstream they should not, and touch no file outside the cache directory.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::berth::Berth;
use common::content::{self, MediaKind};
use common::origin::Origin;
use common::proxy::CountingProxy;
use common::tools;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Send a request with an exact, unnormalised request line.
async fn raw(addr: &str, method: &str, target: &str, extra: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req =
        format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_owned(), body.to_owned())
}

fn tree(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.insert(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn bad_requests_get_precise_errors_and_touch_nothing() {
    if !tools::require("docker-registry") {
        return;
    }
    let origin = Origin::start().await;
    let proxy = CountingProxy::start(&origin.url()).await;
    let img = content::build_image(31, 1, 4096, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/ok", "1", &img)
        .await
        .unwrap();

    let parent = tempfile::tempdir().unwrap();
    std::fs::write(parent.path().join("sentinel"), b"x").unwrap();
    let cache = parent.path().join("cache");
    let up = format!("docker.io={}", proxy.url());
    let berth = Berth::start_with_dir(&cache, &["--upstream", &up]).await;
    let a = berth.addr();
    let layer = &img.layers[0].digest;
    // Warm one blob so Range errors can be checked on a cached blob.
    let (st, _, _) = raw(
        &a,
        "GET",
        &format!("/v2/library/ok/blobs/{layer}?ns=docker.io"),
        "",
    )
    .await;
    assert_eq!(st, 200);
    let before = tree(parent.path());
    proxy.reset();

    let zero = "0".repeat(64);
    let cases: Vec<(&str, String, &str, u16, &str)> = vec![
        (
            "GET",
            "/v2/Library/Ok/manifests/1".into(),
            "",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/../../etc/passwd/manifests/1".into(),
            "",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/library/../../../etc/manifests/1".into(),
            "",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/library/%2e%2e/manifests/1".into(),
            "",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/library/ok/manifests/..".into(),
            "",
            400,
            "MANIFEST_INVALID",
        ),
        (
            "GET",
            "/v2/library/ok/manifests/-tag".into(),
            "",
            400,
            "MANIFEST_INVALID",
        ),
        (
            "GET",
            "/v2/library/ok/manifests/sha256:abc".into(),
            "",
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/library/ok/blobs/sha256:../../../../etc/passwd".into(),
            "",
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("/v2/library/ok/blobs/md5:{zero}"),
            "",
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("/v2/library/ok/blobs/sha256:{}", "Z".repeat(64)),
            "",
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/library/ok/manifests/1?ns=evil.example.com".into(),
            "",
            404,
            "NAME_UNKNOWN",
        ),
        (
            "GET",
            "/v2/library/ok/manifests/1?ns=169.254.169.254".into(),
            "",
            404,
            "NAME_UNKNOWN",
        ),
        (
            "GET",
            "/v2/unmirrored.example.org/ok/manifests/1".into(),
            "",
            404,
            "NAME_UNKNOWN",
        ),
        (
            "GET",
            format!("/v2/{}/manifests/1", "a/".repeat(1100)),
            "",
            400,
            "NAME_INVALID",
        ),
        (
            "PUT",
            "/v2/library/ok/manifests/1".into(),
            "Content-Length: 0\r\n",
            405,
            "UNSUPPORTED",
        ),
        (
            "DELETE",
            "/v2/library/ok/manifests/1".into(),
            "",
            405,
            "UNSUPPORTED",
        ),
        (
            "POST",
            "/v2/library/ok/blobs/uploads/".into(),
            "Content-Length: 0\r\n",
            405,
            "UNSUPPORTED",
        ),
        (
            "PATCH",
            "/v2/library/ok/blobs/uploads/x".into(),
            "Content-Length: 0\r\n",
            405,
            "UNSUPPORTED",
        ),
        ("GET", "/v2/_catalog".into(), "", 405, "UNSUPPORTED"),
        (
            "GET",
            "/v2/library/ok/whatever".into(),
            "",
            404,
            "UNSUPPORTED",
        ),
        (
            "GET",
            format!("/v2/library/ok/blobs/{layer}?ns=docker.io"),
            "Range: bytes=999999999-\r\n",
            416,
            "RANGE_INVALID",
        ),
        (
            "GET",
            format!("/v2/library/ok/blobs/{layer}?ns=docker.io"),
            "Range: bytes=9-3\r\n",
            416,
            "RANGE_INVALID",
        ),
    ];
    for (method, target, extra, status, code) in &cases {
        let (st, head, body) = raw(&a, method, target, extra).await;
        assert_eq!(st, *status, "{method} {target}: {head}\n{body}");
        assert_eq!(tools::oci_code(body.as_bytes()), *code, "{method} {target}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{head}"
        );
        if *status == 405 {
            assert!(
                head.to_ascii_lowercase().contains("allow: get, head"),
                "{head}"
            );
        }
        if *status == 416 {
            assert!(
                head.to_ascii_lowercase()
                    .contains("content-range: bytes */"),
                "{head}"
            );
        }
    }
    assert_eq!(
        proxy.requests().len(),
        0,
        "no bad request reached the upstream: {:?}",
        proxy.requests()
    );

    // Oversized request headers are refused by the HTTP layer, not by a panic.
    let (st, _, _) = raw(
        &a,
        "GET",
        "/v2/",
        &format!("X-Big: {}\r\n", "a".repeat(128 * 1024)),
    )
    .await;
    assert!(st == 431 || st == 400 || st == 0, "oversized header: {st}");
    let (st, _, _) = raw(&a, "GET", "/v2/", "").await;
    assert_eq!(st, 200, "still serving");

    // Upstream 404s are the client's answer, in the envelope.
    let (st, _, body) = raw(
        &a,
        "GET",
        "/v2/library/missing/manifests/1?ns=docker.io",
        "",
    )
    .await;
    assert_eq!(
        (st, tools::oci_code(body.as_bytes()).as_str()),
        (404, "MANIFEST_UNKNOWN")
    );
    let (st, _, body) = raw(
        &a,
        "GET",
        &format!("/v2/library/ok/blobs/sha256:{zero}?ns=docker.io"),
        "",
    )
    .await;
    assert_eq!(
        (st, tools::oci_code(body.as_bytes()).as_str()),
        (404, "BLOB_UNKNOWN")
    );
    let (st, head, body) = raw(&a, "GET", "/v2/", "").await;
    assert_eq!((st, body.as_str()), (200, "{}"));
    assert!(
        head.contains("Docker-Distribution-API-Version: registry/2.0")
            || head
                .to_ascii_lowercase()
                .contains("docker-distribution-api-version: registry/2.0")
    );

    let after = tree(parent.path());
    let outside: Vec<_> = after
        .difference(&before)
        .filter(|p| !p.starts_with("cache"))
        .collect();
    assert!(
        outside.is_empty(),
        "files appeared outside the cache dir: {outside:?}"
    );
    assert!(after.contains("sentinel"));
}
