//! The berth binary under test, started as `berth serve` on an ephemeral 127.0.0.1 port.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use tempfile::TempDir;

use super::tools::{free_port, ChildGuard};

/// Path of the berth binary cargo built for the integration tests.
pub const BERTH_BIN: &str = env!("CARGO_BIN_EXE_berth");

/// How long `start` waits for `GET /v2/` to answer 200.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `berth serve`. Stopped by PID (SIGTERM, then SIGKILL) when dropped.
pub struct Berth {
    child: ChildGuard,
    port: u16,
    cache_dir: PathBuf,
    args: Vec<String>,
    _tmp: Option<TempDir>,
}

impl Berth {
    /// `berth serve --listen 127.0.0.1:<free> --cache-dir <new temp dir> <args...>`;
    /// the cache dir is deleted when this Berth is dropped.
    pub async fn start(args: &[&str]) -> Berth {
        let tmp = tempfile::Builder::new()
            .prefix("berth-cache-")
            .tempdir()
            .expect("berth cache tempdir");
        let dir = tmp.path().to_path_buf();
        let mut b = Self::start_with_dir(&dir, args).await;
        b._tmp = Some(tmp);
        b
    }

    /// Like [`Berth::start`] with a cache dir owned by the caller (it outlives
    /// the process, for restart tests).
    pub async fn start_with_dir(cache_dir: &Path, args: &[&str]) -> Berth {
        match Self::try_start_with_dir(cache_dir, args).await {
            Ok(b) => b,
            Err(e) => panic!("berth failed to start: {e:#}"),
        }
    }

    /// Like [`Berth::start_with_dir`] but returns the error (with the log) instead of panicking.
    pub async fn try_start_with_dir(cache_dir: &Path, args: &[&str]) -> anyhow::Result<Berth> {
        Self::try_start_with_env(cache_dir, args, &[]).await
    }

    /// Like [`Berth::start`] with extra environment variables for berth
    /// only (tests never call `std::env::set_var`: other threads read the
    /// environment concurrently).
    pub async fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Berth {
        let tmp = tempfile::Builder::new()
            .prefix("berth-cache-")
            .tempdir()
            .expect("berth cache tempdir");
        let dir = tmp.path().to_path_buf();
        let mut b = match Self::try_start_with_env(&dir, args, envs).await {
            Ok(b) => b,
            Err(e) => panic!("berth failed to start: {e:#}"),
        };
        b._tmp = Some(tmp);
        b
    }

    /// The general form: cache dir, arguments, extra environment.
    pub async fn try_start_with_env(
        cache_dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Berth> {
        std::fs::create_dir_all(cache_dir)?;
        let mut last = None;
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = Command::new(BERTH_BIN);
            cmd.arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--cache-dir")
                .arg(cache_dir)
                .args(args)
                .env("RUST_LOG", "berth=debug")
                .env("RUST_BACKTRACE", "1")
                .env_remove("HTTP_PROXY")
                .env_remove("HTTPS_PROXY")
                .env_remove("ALL_PROXY")
                .env_remove("http_proxy")
                .env_remove("https_proxy")
                .env_remove("all_proxy")
                .env("NO_PROXY", "127.0.0.1,localhost,::1")
                .env("no_proxy", "127.0.0.1,localhost,::1");
            // berth reads BERTH_* variables as defaults for its flags.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("BERTH_") {
                    cmd.env_remove(k);
                }
            }
            for (k, v) in envs {
                cmd.env(k, v);
            }
            let mut child = ChildGuard::spawn("berth", cmd)?;
            let url = format!("http://127.0.0.1:{port}/v2/");
            let ready = if args.contains(&"--tls-cert") {
                // TLS listener: plain HTTP cannot probe it; wait for the port instead.
                wait_tcp(&mut child, port).await
            } else {
                // With a client token, 401 to an anonymous ping also means "up".
                let up: &[u16] = if args.contains(&"--client-token-file") {
                    &[200, 401]
                } else {
                    &[200]
                };
                child.wait_http(&url, up, START_TIMEOUT).await.map(|_| ())
            };
            match ready {
                Ok(_) => {
                    return Ok(Berth {
                        child,
                        port,
                        cache_dir: cache_dir.to_path_buf(),
                        args: args.iter().map(|s| s.to_string()).collect(),
                        _tmp: None,
                    })
                }
                Err(e) => {
                    let in_use = child
                        .log()
                        .to_ascii_lowercase()
                        .contains("address already in use")
                        || child.log().contains("AddrInUse");
                    child.kill9();
                    if in_use {
                        last = Some(e);
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("berth: no attempt made")))
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The extra args it was started with (after --listen/--cache-dir).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The value of `--metrics-listen` if it was passed.
    pub fn metrics_addr(&self) -> Option<String> {
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if a == "--metrics-listen" {
                return it.next().cloned();
            }
            if let Some(v) = a.strip_prefix("--metrics-listen=") {
                return Some(v.to_string());
            }
        }
        None
    }

    /// Everything berth wrote to stdout and stderr.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Graceful stop: SIGTERM, wait up to 10 s (then SIGKILL); returns the exit status.
    pub fn stop(mut self) -> Option<ExitStatus> {
        self.child.terminate(Duration::from_secs(10))
    }

    /// SIGKILL now (crash simulation); the cache dir is left as it was.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.child.kill9()
    }
}

/// Wait until something accepts TCP connections on `port` (or the child exits).
async fn wait_tcp(child: &mut ChildGuard, port: u16) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if !child.is_running() {
            anyhow::bail!("berth exited:\n{}", child.log());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("berth did not listen on {port}:\n{}", child.log());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Where berth publishes blob `digest` under the cache directory `cache`.
/// Wait (at most 10 s) until no download is left in `cache/tmp/`; false if
/// one still is. A client gets a blob's last byte as soon as its sha256
/// matched, before berth fsyncs and renames it into the cache (README,
/// "Crash safety"), so a test that looks at the cache right after a pull,
/// or needs the next request to be a hit, waits here first.
pub async fn settled(cache: &Path) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tmp_files(cache).is_empty() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The names in `cache/tmp/` (downloads in progress or left by a crash).
pub fn tmp_files(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache.join("tmp"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub fn blob_path(cache: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// `berth <args>` (a command such as `verify` or `prefetch`), without
/// BERTH_* from the environment, logging at `rust_log`.
pub fn cli_command(args: &[&str], rust_log: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(BERTH_BIN);
    cmd.args(args).env("RUST_LOG", rust_log);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BERTH_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// [`cli_command`] run to completion.
pub async fn run_cli(args: &[&str], rust_log: &str) -> std::process::Output {
    tokio::process::Command::from(cli_command(args, rust_log))
        .output()
        .await
        .expect("run berth")
}

/// A command's status and output, for assertion messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
