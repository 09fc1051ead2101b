//! Runs skopeo (isolated from the host's config and the internet) against local registries, and verifies OCI layouts.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use super::content::sha256_hex;
use super::tools::dead_port;

/// Upper bound for one skopeo invocation.
pub const SKOPEO_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `skopeo <args>` with an isolated environment: an empty auth file, an
/// empty registries.conf and registries.d, no signature policy, and HTTP(S)
/// proxies pointing at a dead local port so nothing can leave the machine.
/// Returns stdout; fails with stderr on a non-zero exit.
pub async fn run_skopeo(args: &[&str]) -> Result<String> {
    let tmp = tempfile::Builder::new().prefix("berth-skopeo-").tempdir()?;
    let out = skopeo_command(&tmp, args)?.output();
    let out = tokio::time::timeout(SKOPEO_TIMEOUT, out)
        .await
        .with_context(|| format!("skopeo {args:?} timed out after {SKOPEO_TIMEOUT:?}"))??;
    if !out.status.success() {
        bail!(
            "skopeo {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn skopeo_command(tmp: &TempDir, args: &[&str]) -> Result<tokio::process::Command> {
    let dir = tmp.path();
    let auth = dir.join("auth.json");
    std::fs::write(&auth, "{}")?;
    let registries_conf = dir.join("registries.conf");
    std::fs::write(&registries_conf, "")?;
    let registries_d = dir.join("registries.d");
    std::fs::create_dir_all(&registries_d)?;
    let tmpdir = dir.join("tmp");
    std::fs::create_dir_all(&tmpdir)?;
    let home = dir.join("home");
    std::fs::create_dir_all(&home)?;
    let dead = format!("http://127.0.0.1:{}", dead_port());

    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.arg("--insecure-policy")
        .arg("--registries.d")
        .arg(&registries_d)
        .arg("--tmpdir")
        .arg(&tmpdir)
        .args(args)
        .env("REGISTRY_AUTH_FILE", &auth)
        .env("CONTAINERS_REGISTRIES_CONF", &registries_conf)
        .env("HOME", &home)
        .env("XDG_RUNTIME_DIR", &home)
        .env("HTTP_PROXY", &dead)
        .env("HTTPS_PROXY", &dead)
        .env("http_proxy", &dead)
        .env("https_proxy", &dead)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

fn docker_ref(reference: &str) -> String {
    if reference.starts_with("docker://") {
        reference.to_string()
    } else {
        format!("docker://{reference}")
    }
}

/// `skopeo inspect [--raw] --tls-verify=false docker://<addr>/<reference>`;
/// with berth, `reference` is path-style, e.g. `docker.io/library/foo:tag`;
/// directly against a registry it is just `repo:tag`.
pub async fn skopeo_inspect(addr: &str, reference: &str, raw: bool) -> Result<String> {
    let target = format!("docker://{addr}/{reference}");
    let mut args = vec!["inspect", "--tls-verify=false"];
    if raw {
        args.push("--raw");
    }
    args.push(&target);
    run_skopeo(&args).await
}

/// `skopeo copy --all --src-tls-verify=false docker://<src_ref> oci:<dir>:test`
/// (`src_ref` may include the `docker://` prefix).
pub async fn skopeo_copy_all(src_ref: &str, oci_layout_dir: &Path) -> Result<String> {
    let src = docker_ref(src_ref);
    let dst = format!("oci:{}:test", oci_layout_dir.display());
    run_skopeo(&["copy", "--all", "--src-tls-verify=false", &src, &dst]).await
}

/// Checks an OCI layout: `oci-layout` and `index.json` exist and every file
/// under `blobs/sha256/` hashes to its own name. Returns the number of blobs.
pub fn verify_oci_layout(dir: &Path) -> Result<usize> {
    if !dir.join("oci-layout").is_file() {
        bail!("{}: no oci-layout file", dir.display());
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).context("read index.json")?)
            .context("parse index.json")?;
    if index["manifests"].as_array().is_none_or(|m| m.is_empty()) {
        bail!("{}: index.json lists no manifests", dir.display());
    }
    let blobs = dir.join("blobs").join("sha256");
    let mut n = 0;
    for entry in std::fs::read_dir(&blobs).with_context(|| format!("read {}", blobs.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(entry.path())?;
        let actual = sha256_hex(&bytes);
        if actual != name {
            bail!("blob {name} hashes to {actual}");
        }
        n += 1;
    }
    if n == 0 {
        bail!("{}: no blobs", blobs.display());
    }
    Ok(n)
}
