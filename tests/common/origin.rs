//! A real upstream registry: `/usr/bin/docker-registry` (distribution 2.8) on an ephemeral 127.0.0.1 port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::tools::{free_port, ChildGuard};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running docker-registry with filesystem storage in its own temp dir.
/// Stopped by PID (SIGTERM, then SIGKILL) when dropped.
pub struct Origin {
    child: ChildGuard,
    port: u16,
    dir: TempDir,
}

impl Origin {
    /// Starts an open (no auth) registry and waits until `GET /v2/` is 200.
    pub async fn start() -> Origin {
        Self::start_with_config("").await
    }

    /// Starts a registry whose config.yml gets `extra_yaml` appended as
    /// top-level keys, e.g. an `auth:` section:
    ///
    /// ```yaml
    /// auth:
    ///   token:
    ///     realm: http://127.0.0.1:1234/token
    ///     service: origin
    ///     issuer: test-issuer
    ///     rootcertbundle: /tmp/x/root.pem
    /// ```
    ///
    /// `extra_yaml` must not repeat the base keys (version, log, storage,
    /// http, health). Readiness accepts 200 or 401 on `GET /v2/`.
    pub async fn start_with_config(extra_yaml: &str) -> Origin {
        let dir = tempfile::Builder::new()
            .prefix("berth-origin-")
            .tempdir()
            .expect("origin tempdir");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("origin storage dir");
        let mut last_err = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let config = render_config(&storage, port, extra_yaml);
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).expect("write origin config");
            let mut cmd = Command::new(REGISTRY_BIN);
            cmd.arg("serve")
                .arg(&config_path)
                .current_dir(dir.path())
                .env_remove("HTTP_PROXY")
                .env_remove("HTTPS_PROXY")
                .env_remove("http_proxy")
                .env_remove("https_proxy")
                .env("NO_PROXY", "127.0.0.1,localhost")
                .env("OTEL_SDK_DISABLED", "true");
            // The registry reads REGISTRY_* variables as config overrides.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("REGISTRY_") {
                    cmd.env_remove(k);
                }
            }
            let mut child =
                ChildGuard::spawn("docker-registry", cmd).expect("spawn docker-registry");
            let url = format!("http://127.0.0.1:{port}/v2/");
            match child
                .wait_http(&url, &[200, 401], Duration::from_secs(20))
                .await
            {
                Ok(_) => return Origin { child, port, dir },
                Err(e) => {
                    let log = child.log();
                    last_err = format!("attempt {attempt}: {e:#}");
                    if log.contains("address already in use") {
                        continue;
                    }
                    panic!("docker-registry failed to start: {last_err}");
                }
            }
        }
        panic!("docker-registry failed to start after retries: {last_err}");
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The temp dir holding config.yml and the storage root.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Root directory of the filesystem storage driver.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The registry's combined stdout/stderr (includes the access log).
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Stops the registry now (the storage stays until the Origin is dropped).
    pub fn stop(&mut self) {
        self.child.terminate(Duration::from_secs(5));
    }
}

fn render_config(storage: &Path, port: u16, extra_yaml: &str) -> String {
    format!(
        r#"version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: berth-integration-test-secret
health:
  storagedriver:
    enabled: false
{extra_yaml}
"#,
        storage = storage.display(),
    )
}
