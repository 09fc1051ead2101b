//! Small process and network utilities: tool detection, ports, HTTP polling, and a PID-owning child guard.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a child gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// Debian package that ships `bin`, for the message printed when it is missing.
pub fn debian_package(bin: &str) -> &'static str {
    let name = Path::new(bin)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(bin);
    match name {
        "docker-registry" => "docker-registry",
        "skopeo" => "skopeo",
        "containerd" | "ctr" | "containerd-shim-runc-v2" => "containerd",
        "runc" => "runc",
        "nginx" => "nginx",
        "promtool" => "prometheus",
        "openssl" => "openssl",
        "curl" => "curl",
        _ => "(unknown package)",
    }
}

/// Full path of `bin` (absolute path, or searched in `$PATH`), if it exists.
pub fn which(bin: &str) -> Option<PathBuf> {
    if bin.contains('/') {
        let p = PathBuf::from(bin);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

/// True if `bin` is installed. When it is missing: panics if `CI` is set
/// (CI must have every tool), otherwise prints `SKIP: ...` and returns false
/// so the calling test can return early.
pub fn require(bin: &str) -> bool {
    if which(bin).is_some() {
        return true;
    }
    let pkg = debian_package(bin);
    if std::env::var_os("CI").is_some() {
        panic!("required tool `{bin}` is missing on CI: apt-get install {pkg}");
    }
    eprintln!("SKIP: `{bin}` not installed (Debian package `{pkg}`); test skipped");
    false
}

/// A port that was free on 127.0.0.1 a moment ago (bind :0, read, drop).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A port on 127.0.0.1 that nothing listens on (connecting to it is refused).
pub fn dead_port() -> u16 {
    for _ in 0..20 {
        let port = free_port();
        if TcpStream::connect_timeout(
            &format!("127.0.0.1:{port}").parse().expect("addr"),
            Duration::from_millis(200),
        )
        .is_err()
        {
            return port;
        }
    }
    panic!("could not find a dead port on 127.0.0.1");
}

/// A reqwest client for talking to local test servers: never uses an
/// environment proxy, never follows redirects, short connect timeout.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

/// Polls `url` with GET until it answers 200 or `timeout` passes.
pub async fn wait_http_ok(url: &str, timeout: Duration) -> Result<()> {
    wait_http_status(url, &[200], timeout).await.map(|_| ())
}

/// Polls `url` with GET until it answers one of `accept`; returns that status.
pub async fn wait_http_status(url: &str, accept: &[u16], timeout: Duration) -> Result<u16> {
    let client = http_client();
    let deadline = Instant::now() + timeout;
    loop {
        let last = match client.get(url).timeout(Duration::from_secs(2)).send().await {
            Ok(resp) if accept.contains(&resp.status().as_u16()) => {
                return Ok(resp.status().as_u16())
            }
            Ok(resp) => format!("status {}", resp.status()),
            Err(e) => format!("error {e}"),
        };
        if Instant::now() >= deadline {
            bail!("{url} did not answer {accept:?} within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A spawned child process owned by the test: stdout and stderr go to one log
/// file in a temp dir; on drop it is sent SIGTERM, then SIGKILL after a grace
/// period, and reaped. If the thread is panicking, the log tail is printed.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    pid: u32,
    log_path: PathBuf,
    status: Option<ExitStatus>,
    _log_dir: TempDir,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to a log file.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<ChildGuard> {
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("berth-log-{name}-"))
            .tempdir()?;
        let log_path = log_dir.path().join(format!("{name}.log"));
        let out = File::create(&log_path)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        Ok(ChildGuard {
            name: name.to_string(),
            pid: child.id(),
            child: Some(child),
            log_path,
            status: None,
            _log_dir: log_dir,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the child wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `max` bytes of the log (for panic messages).
    pub fn log_tail(&self, max: u64) -> String {
        let Ok(mut f) = File::open(&self.log_path) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(max);
        let _ = f.seek(SeekFrom::Start(start));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        let mut s = String::from_utf8_lossy(&buf).into_owned();
        if start > 0 {
            s.insert_str(0, "...[log truncated]...\n");
        }
        s
    }

    /// The exit status if the child has exited (non-blocking).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    self.status = Some(st);
                }
            }
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Sends `sig` to the child if it is still running.
    pub fn signal(&mut self, sig: Signal) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.pid as i32), sig);
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; reaps the child.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill9()
    }

    /// SIGKILL and reap (no-op when already exited).
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            if let Some(child) = self.child.as_mut() {
                if let Ok(st) = child.wait() {
                    self.status = Some(st);
                }
            }
        }
        self.status
    }

    /// Polls `url` until it answers one of `accept`, failing early (with the
    /// log in the error) if the child exits first.
    pub async fn wait_http(&mut self, url: &str, accept: &[u16], timeout: Duration) -> Result<u16> {
        let client = http_client();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Err(anyhow!(
                    "{} exited ({st}) before {url} answered; log:\n{}",
                    self.name,
                    self.log_tail(16 * 1024)
                ));
            }
            let last = match client.get(url).timeout(Duration::from_secs(2)).send().await {
                Ok(resp) if accept.contains(&resp.status().as_u16()) => {
                    return Ok(resp.status().as_u16())
                }
                Ok(resp) => format!("status {}", resp.status()),
                Err(e) => format!("error {e}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} did not answer {url} with {accept:?} within {timeout:?} (last: {last}); log:\n{}",
                    self.name,
                    self.log_tail(16 * 1024)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.terminate(TERM_GRACE);
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} (pid {}) -----\n{}\n----- end of {} log -----",
                self.name,
                self.pid,
                self.log_tail(16 * 1024),
                self.name
            );
        }
    }
}

/// The Prometheus text berth (or its metrics listener) serves at `base`
/// (`http://host:port`).
pub async fn metrics_text(base: &str) -> String {
    http_client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The first error code of an OCI error envelope ("" when it has none);
/// panics, naming what came instead, when `body` is not JSON.
pub fn oci_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "not an OCI envelope ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Whether every one of `bins` is installed (see [`require`]).
pub fn require_all(bins: &[&str]) -> bool {
    bins.iter().all(|b| require(b))
}
