//! Node integration through the real binary: `berth containerd install`
//! writes the hosts.toml a real containerd pulls through (and falls back
//! from when berth is stopped); install over existing files, idempotent
//! re-runs and `uninstall` restoring byte for byte; containerd config.toml
//! checks and exit codes; `berth k3s` printing and merging registries.yaml.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::berth::{Berth, BERTH_BIN};
use common::containerd::Containerd;
use common::content::{self, MediaKind};
use common::origin::Origin;
use common::tools;

/// `berth ARGS...` with no `BERTH_*` variables from the environment.
fn berth(args: &[&str]) -> Output {
    let mut cmd = Command::new(BERTH_BIN);
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BERTH_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run berth")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "berth failed: {:?}\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Every file and directory under `dir` with its bytes and mode.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut m = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = e.metadata().unwrap();
            let mode = meta.permissions().mode();
            if meta.is_dir() {
                m.insert(e.path(), (b"<dir>".to_vec(), mode));
                stack.push(e.path());
            } else {
                m.insert(e.path(), (std::fs::read(e.path()).unwrap(), mode));
            }
        }
    }
    m
}

fn containerd_config(dir: &Path, certs: &Path) -> PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(
        &p,
        format!(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
            certs.display()
        ),
    )
    .unwrap();
    p
}

/// A real containerd pulls through berth using the hosts.toml that
/// `berth containerd install` generated; with berth stopped, the same
/// containerd falls back to `server` (a second origin) quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_generated_hosts_toml_and_falls_back_to_server() {
    if !(Containerd::available() && tools::require("docker-registry")) {
        return;
    }
    let mirrored = Origin::start().await; // berth's upstream
    let fallback = Origin::start().await; // the `server` in hosts.toml
    let image = content::build_image(71, 2, 16 * 1024, MediaKind::Oci, "amd64");
    for o in [&mirrored, &fallback] {
        content::push_image(&o.url(), "library/app", "1.0", &image)
            .await
            .unwrap();
    }
    content::push_image(&mirrored.url(), "team/other", "2", &image)
        .await
        .unwrap();
    let docker = format!("docker.io={}", mirrored.url());
    let quay = format!("quay.io={}", mirrored.url());
    let mut b = Berth::start(&["--upstream", &docker, "--upstream", &quay]).await;

    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs.d");
    let cfg = containerd_config(tmp.path(), &certs);
    let port = b.port().to_string();
    let server = format!("docker.io={}", fallback.url());
    let out = ok(&berth(&[
        "containerd",
        "install",
        "--certs-dir",
        certs.to_str().unwrap(),
        "--containerd-config",
        cfg.to_str().unwrap(),
        "--port",
        &port,
        "--registries",
        "docker.io",
        "--default",
        "--server",
        &server,
        "--dial-timeout",
        "200ms",
    ]));
    assert!(out.contains("created"), "{out}");
    assert!(out.contains("no restart needed"), "{out}");
    let hosts = std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap();
    assert!(
        hosts.contains(&format!("server = \"{}\"", fallback.url())),
        "{hosts}"
    );
    assert!(
        hosts.contains(&format!("[host.\"{}\"]", b.url())),
        "{hosts}"
    );

    let ctd = Containerd::start();
    let pulled = ctd
        .pull_async("via-berth", "docker.io/library/app:1.0", &certs, &[])
        .await;
    pulled.assert_success();
    for r in pulled.requests() {
        assert!(r.url.starts_with(&b.url()), "only berth is asked: {r:?}");
    }
    assert_eq!(
        ctd.image_digest("via-berth", "docker.io/library/app:1.0")
            .as_deref(),
        Some(image.manifest_digest.as_str())
    );
    // `_default` routes a registry without its own directory through berth.
    let other = ctd
        .pull_async("default", "quay.io/team/other:2", &certs, &[])
        .await;
    other.assert_success();
    assert!(
        other.requests().iter().all(|r| r.url.starts_with(&b.url())),
        "{other}"
    );

    // berth stops: the same hosts.toml falls back to `server`.
    assert!(b.is_running());
    b.kill9();
    let fell_back = ctd
        .pull_async("fallback", "docker.io/library/app:1.0", &certs, &[])
        .await;
    fell_back.assert_success();
    assert!(
        fell_back.elapsed < Duration::from_secs(10),
        "fallback took {:?}",
        fell_back.elapsed
    );
    let urls = fell_back.requested_urls();
    assert!(
        urls.iter().any(|u| u.starts_with(&fallback.url())),
        "server was used: {urls:?}"
    );
    assert!(
        fallback.log().contains("/v2/library/app/manifests/1.0"),
        "fallback origin served the manifest"
    );
    assert_eq!(
        ctd.image_digest("fallback", "docker.io/library/app:1.0")
            .as_deref(),
        Some(image.manifest_digest.as_str())
    );
}

/// Install over existing files (kept as backups), re-run without changes,
/// uninstall restores every byte and mode; what containerd's config lacks
/// is printed, and `--strict` turns it into exit status 2.
#[test]
fn install_uninstall_round_trip_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs.d");
    std::fs::create_dir_all(certs.join("docker.io")).unwrap();
    std::fs::create_dir_all(certs.join("ghcr.io")).unwrap();
    std::fs::create_dir_all(certs.join("unrelated.example")).unwrap();
    std::fs::write(
        certs.join("docker.io/hosts.toml"),
        "# the user's own\nserver = \"https://registry-1.docker.io\"\n\n[host.\"https://corp-mirror\"]\n  capabilities = [\"pull\"]\n",
    )
    .unwrap();
    std::fs::write(
        certs.join("ghcr.io/ca.crt"),
        "-----BEGIN CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(
        certs.join("unrelated.example/hosts.toml"),
        "server = \"https://x\"\n",
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let p = certs.join("docker.io/hosts.toml");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let before = snapshot(&certs);
    let missing = tmp.path().join("no-such-config.toml");
    let install = |extra: &[&str]| {
        let mut args = vec![
            "containerd",
            "install",
            "--certs-dir",
            certs.to_str().unwrap(),
            "--containerd-config",
            missing.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        berth(&args)
    };

    let first = install(&[]);
    let out = ok(&first);
    let err = text(&first.stderr);
    assert!(
        out.contains("replaced") && out.contains("docker.io/hosts.toml.berth-backup"),
        "{out}"
    );
    assert!(
        err.contains("config_path = ") && err.contains("restart containerd"),
        "says what to add: {err}"
    );
    let after = snapshot(&certs);
    for reg in ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"] {
        let t = std::fs::read_to_string(certs.join(reg).join("hosts.toml")).unwrap();
        assert!(t.starts_with("# Managed by berth"), "{reg}: {t}");
        let parsed: toml::Table = toml::from_str(&t).unwrap();
        assert!(parsed["host"]["http://127.0.0.1:5050"].is_table(), "{t}");
    }
    let ghcr = std::fs::read_to_string(certs.join("ghcr.io/hosts.toml")).unwrap();
    assert!(
        ghcr.contains("ca = ["),
        "Docker-style CA carried over: {ghcr}"
    );
    assert!(!certs.join("_default").exists(), "_default only on request");

    // Idempotent: same bytes, no new backups.
    let again = ok(&install(&[]));
    assert!(
        !again.contains("created") && !again.contains("replaced"),
        "{again}"
    );
    assert_eq!(snapshot(&certs), after);

    // --strict: the files are written, the status says containerd won't read them.
    assert_eq!(install(&["--strict"]).status.code(), Some(2));

    let un = ok(&berth(&[
        "containerd",
        "uninstall",
        "--certs-dir",
        certs.to_str().unwrap(),
    ]));
    assert!(un.contains("restored") && un.contains("removed"), "{un}");
    assert_eq!(snapshot(&certs), before, "restored byte for byte");

    // Bad input is a usage error (64) that names the flag.
    let bad = install(&["--server", "docker.io"]);
    assert_eq!(bad.status.code(), Some(64));
    assert!(text(&bad.stderr).contains("--server"));
    let k3s = berth(&[
        "containerd",
        "install",
        "--certs-dir",
        "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
    ]);
    assert_eq!(k3s.status.code(), Some(64));
    assert!(text(&k3s.stderr).contains("berth k3s --merge"));
}

/// containerd 2.x syntax with the directory in config_path: no warning;
/// the same directory under another name (an init container's mount) is
/// matched through `--host-certs-dir`; the listen address comes from berth's
/// config file.
#[test]
fn install_checks_containerd_2x_config_and_reads_berths_config() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("mnt-certs");
    let cfg = tmp.path().join("config.toml");
    std::fs::write(
        &cfg,
        "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n",
    )
    .unwrap();
    let berth_cfg = tmp.path().join("berth.toml");
    std::fs::write(
        &berth_cfg,
        "listen = \"0.0.0.0:5999\"\n[registries.\"registry.internal:5000\"]\nurl = \"https://registry.internal:5000\"\n",
    )
    .unwrap();
    let out = berth(&[
        "containerd",
        "install",
        "--config",
        berth_cfg.to_str().unwrap(),
        "--certs-dir",
        certs.to_str().unwrap(),
        "--host-certs-dir",
        "/etc/containerd/certs.d",
        "--containerd-config",
        cfg.to_str().unwrap(),
        "--strict",
    ]);
    let stdout = ok(&out);
    assert!(stdout.contains("no restart needed"), "{stdout}");
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    let t = std::fs::read_to_string(certs.join("registry.internal:5000/hosts.toml")).unwrap();
    assert!(
        t.contains("server = \"https://registry.internal:5000\""),
        "{t}"
    );
    assert!(t.contains("[host.\"http://127.0.0.1:5999\"]"), "{t}");

    // An empty berth config is the embedded defaults (the edge-host README step).
    let empty = tmp.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let out = berth(&["k3s", "--config", empty.to_str().unwrap()]);
    assert!(ok(&out).contains("http://127.0.0.1:5050"));
}

/// `berth k3s` prints a registries.yaml document; `--merge` keeps the
/// user's settings and is idempotent; `--remove` gives the file back byte
/// for byte. The shipped example is exactly what berth merges.
#[test]
fn k3s_print_merge_and_remove() {
    let printed = berth(&["k3s", "--registries", "docker.io,quay.io", "--default"]);
    let yaml = ok(&printed);
    let doc: serde_norway::Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(
        doc["mirrors"]["*"]["endpoint"][0].as_str(),
        Some("http://127.0.0.1:5050")
    );
    assert!(
        text(&printed.stderr).contains("restart"),
        "explains the restart"
    );

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("registries.yaml");
    let original = "# managed by ansible\nmirrors:\n  registry.corp:\n    endpoint:\n      - https://registry.corp\n  docker.io:\n    endpoint: [\"https://corp-mirror\"]\n    rewrite:\n      \"^library/(.*)\": \"hub/$1\"\nconfigs:\n  corp-mirror:\n    auth:\n      username: robot\n      password: s3cret\n";
    std::fs::write(&path, original).unwrap();
    let p = path.to_str().unwrap();
    let merged = ok(&berth(&["k3s", "--merge", p, "--registries", "docker.io"]));
    assert!(merged.contains("merged"), "{merged}");
    let doc: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let before: serde_norway::Value = serde_norway::from_str(original).unwrap();
    assert_eq!(doc["configs"], before["configs"]);
    assert_eq!(
        doc["mirrors"]["registry.corp"],
        before["mirrors"]["registry.corp"]
    );
    assert_eq!(
        doc["mirrors"]["docker.io"]["rewrite"],
        before["mirrors"]["docker.io"]["rewrite"]
    );
    let eps = doc["mirrors"]["docker.io"]["endpoint"]
        .as_sequence()
        .unwrap();
    assert_eq!(eps.len(), 2);
    assert_eq!(eps[0].as_str(), Some("http://127.0.0.1:5050"));
    let again = ok(&berth(&["k3s", "--merge", p, "--registries", "docker.io"]));
    assert!(again.contains("unchanged"), "{again}");
    ok(&berth(&[
        "k3s",
        "--merge",
        p,
        "--registries",
        "docker.io",
        "--remove",
    ]));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), original);

    // The shipped example already holds what berth would merge.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/containerd/k3s/registries.yaml"
    );
    let copy = tmp.path().join("example.yaml");
    std::fs::copy(example, &copy).unwrap();
    let out = ok(&berth(&[
        "k3s",
        "--merge",
        copy.to_str().unwrap(),
        "--default",
    ]));
    assert!(out.contains("unchanged"), "example is up to date: {out}");
}
