//! A private containerd 1.6 daemon (no CRI) and a `ctr` wrapper that pulls
//! through a `hosts.toml` directory, so tests can watch what a real
//! containerd asks a mirror for.
//!
//! Facts about the Debian containerd 1.6.20 found while writing this:
//! - `ctr images pull` resolves and fetches in the **ctr process**, not in the
//!   daemon: `--hosts-dir` is read by ctr and the proxy environment must be on
//!   the ctr command (it is, see [`Ctr`]).
//! - `ctr --debug` logs every registry request as a `"do request"` line with
//!   `request.method=` and `url=`; [`CtrOutput::requests`] parses them.
//!   `--http-trace` only adds connection-level lines, `--http-dump` the headers.
//! - An `http://` host in hosts.toml is enough; `--plain-http` is not needed.
//! - The default overlayfs snapshotter unpacks fine here (as root), so
//!   `ctr images pull` works without `--snapshotter`. ctr 1.6 has no
//!   `--skip-unpack`; use [`Ctr::content_fetch`] for artifacts that cannot
//!   be unpacked (Helm charts).
//! - The daemon runs with `content_sharing_policy = "isolated"`, so every
//!   namespace fetches its own blobs: pulling the same image into a fresh
//!   namespace hits the mirror again instead of reusing another namespace's
//!   content.

use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::tools::{self, ChildGuard};

/// Default limit for one `ctr` invocation; a hung pull fails the test instead
/// of hanging it.
const CTR_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the daemon gets to answer `ctr version` after start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A containerd daemon with its root, state and sockets in a temporary
/// directory. Stopped by PID (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Containerd {
    child: ChildGuard,
    ctr: Ctr,
    // Dropped after the child: holds root, state and the sockets.
    dir: TempDir,
}

impl Containerd {
    /// True if `containerd` and `ctr` are installed; otherwise prints `SKIP`
    /// (or panics on CI, see [`tools::require`]) and the test should return.
    pub fn available() -> bool {
        tools::require("containerd") && tools::require("ctr")
    }

    /// Starts the daemon and waits until `ctr version` answers. Panics if
    /// containerd is missing; check [`Containerd::available`] first.
    pub fn start() -> Containerd {
        assert!(Containerd::available(), "containerd/ctr not installed");
        let dir = tempfile::Builder::new()
            .prefix("berth-ctd-")
            .tempdir()
            .expect("create containerd tempdir");
        let base = dir.path();
        let socket = base.join("grpc.sock");
        assert!(
            socket.as_os_str().len() < 100,
            "socket path too long for a unix socket: {}",
            socket.display()
        );
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{grpc}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  address = "{debug}"
  level = "info"

[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = base.join("root").display(),
            state = base.join("state").display(),
            grpc = socket.display(),
            ttrpc = base.join("ttrpc.sock").display(),
            debug = base.join("debug.sock").display(),
            opt = base.join("opt").display(),
        );
        let config_path = base.join("config.toml");
        fs::write(&config_path, config).expect("write containerd config");
        let proxy = format!("http://127.0.0.1:{}", tools::dead_port());
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config_path);
        isolate_env(&mut cmd, &proxy);
        let child = ChildGuard::spawn("containerd", cmd).expect("spawn containerd");
        let ctr = Ctr {
            socket,
            proxy,
            timeout: CTR_TIMEOUT,
        };
        let mut daemon = Containerd { child, ctr, dir };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait() {
                panic!("containerd exited early ({status}); log:\n{}", self.log());
            }
            if self.ctr.socket.exists() {
                let out = self.ctr.run_global(&["version"], Duration::from_secs(5));
                if out.success {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("containerd did not become ready; log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A cloneable `ctr` handle for this daemon (usable from
    /// `tokio::task::spawn_blocking`).
    pub fn ctr(&self) -> Ctr {
        self.ctr.clone()
    }

    /// The daemon's grpc socket.
    pub fn socket(&self) -> &Path {
        &self.ctr.socket
    }

    /// The temporary directory holding root, state, sockets and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The daemon's combined stdout/stderr so far.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Sets the limit for each later `ctr` invocation through this handle.
    pub fn set_ctr_timeout(&mut self, timeout: Duration) {
        self.ctr.timeout = timeout;
    }

    /// See [`Ctr::pull`].
    pub fn pull(
        &self,
        namespace: &str,
        reference: &str,
        hosts_dir: &Path,
        extra_args: &[&str],
    ) -> CtrOutput {
        self.ctr.pull(namespace, reference, hosts_dir, extra_args)
    }

    /// See [`Ctr::content_fetch`].
    pub fn content_fetch(
        &self,
        namespace: &str,
        reference: &str,
        hosts_dir: &Path,
        extra_args: &[&str],
    ) -> CtrOutput {
        self.ctr
            .content_fetch(namespace, reference, hosts_dir, extra_args)
    }

    /// [`Containerd::pull`] on the blocking pool. Use this from async tests
    /// when something the pull depends on (e.g. `proxy::CountingProxy`)
    /// runs on the test's own runtime; a sync pull would block it.
    pub async fn pull_async(
        &self,
        namespace: &str,
        reference: &str,
        hosts_dir: &Path,
        extra_args: &[&str],
    ) -> CtrOutput {
        self.ctr
            .blocking(
                &["images", "pull"],
                namespace,
                reference,
                hosts_dir,
                extra_args,
            )
            .await
    }

    /// [`Containerd::content_fetch`] on the blocking pool (see
    /// [`Containerd::pull_async`]).
    pub async fn content_fetch_async(
        &self,
        namespace: &str,
        reference: &str,
        hosts_dir: &Path,
        extra_args: &[&str],
    ) -> CtrOutput {
        self.ctr
            .blocking(
                &["content", "fetch"],
                namespace,
                reference,
                hosts_dir,
                extra_args,
            )
            .await
    }

    /// See [`Ctr::image_digest`].
    pub fn image_digest(&self, namespace: &str, reference: &str) -> Option<String> {
        self.ctr.image_digest(namespace, reference)
    }

    /// See [`Ctr::list_content`].
    pub fn list_content(&self, namespace: &str) -> Vec<String> {
        self.ctr.list_content(namespace)
    }

    /// See [`Ctr::list_images`].
    pub fn list_images(&self, namespace: &str) -> Vec<String> {
        self.ctr.list_images(namespace)
    }

    /// See [`Ctr::run`].
    pub fn run(&self, namespace: &str, args: &[&str]) -> CtrOutput {
        self.ctr.run(namespace, args)
    }
}

/// Runs `ctr` against one daemon with the dead-proxy environment.
#[derive(Clone, Debug)]
pub struct Ctr {
    socket: PathBuf,
    proxy: String,
    timeout: Duration,
}

impl Ctr {
    /// `ctr --debug -a SOCK -n NS images pull --hosts-dir DIR [extra] REF`.
    ///
    /// `extra_args` go before the reference: `--platform linux/arm64`,
    /// `--all-platforms`, `--http-trace`, `--http-dump`, `--snapshotter native`,
    /// `--user u:p`, `--max-concurrent-downloads N`.
    pub fn pull(
        &self,
        namespace: &str,
        reference: &str,
        hosts_dir: &Path,
        extra_args: &[&str],
    ) -> CtrOutput {
        self.remote_command(
            &["images", "pull"],
            namespace,
            reference,
            hosts_dir,
            extra_args,
        )
    }

    /// `ctr --debug -a SOCK -n NS content fetch --hosts-dir DIR [extra] REF`:
    /// fetches the manifest tree without unpacking (for artifacts such as
    /// Helm charts). `--all-platforms`, `--platform`, `--metadata-only` pass
    /// through `extra_args`.
    pub fn content_fetch(
        &self,
        namespace: &str,
        reference: &str,
        hosts_dir: &Path,
        extra_args: &[&str],
    ) -> CtrOutput {
        self.remote_command(
            &["content", "fetch"],
            namespace,
            reference,
            hosts_dir,
            extra_args,
        )
    }

    async fn blocking(
        &self,
        command: &[&str],
        namespace: &str,
        reference: &str,
        hosts_dir: &Path,
        extra_args: &[&str],
    ) -> CtrOutput {
        let ctr = self.clone();
        let command: Vec<String> = command.iter().map(|s| (*s).to_owned()).collect();
        let extra: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let (namespace, reference) = (namespace.to_owned(), reference.to_owned());
        let hosts_dir = hosts_dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let command: Vec<&str> = command.iter().map(String::as_str).collect();
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            ctr.remote_command(&command, &namespace, &reference, &hosts_dir, &extra)
        })
        .await
        .expect("ctr task")
    }

    fn remote_command(
        &self,
        command: &[&str],
        namespace: &str,
        reference: &str,
        hosts_dir: &Path,
        extra_args: &[&str],
    ) -> CtrOutput {
        let hosts = hosts_dir.to_str().expect("utf-8 hosts dir");
        let mut args: Vec<&str> = command.to_vec();
        args.extend(["--hosts-dir", hosts]);
        args.extend_from_slice(extra_args);
        args.push(reference);
        self.run(namespace, &args)
    }

    /// Target digest of an image known in `namespace`, from `ctr images ls`.
    pub fn image_digest(&self, namespace: &str, reference: &str) -> Option<String> {
        let out = self.run(namespace, &["images", "ls"]);
        out.assert_success();
        // REF TYPE DIGEST SIZE PLATFORMS LABELS
        out.stdout.lines().skip(1).find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.first() == Some(&reference))
                .then(|| cols.get(2).map(|d| (*d).to_owned()))
                .flatten()
        })
    }

    /// Image references known in `namespace` (`ctr images ls -q`).
    pub fn list_images(&self, namespace: &str) -> Vec<String> {
        let out = self.run(namespace, &["images", "ls", "-q"]);
        out.assert_success();
        out.stdout.lines().map(str::to_owned).collect()
    }

    /// Digests in `namespace`'s content store (`ctr content ls -q`).
    pub fn list_content(&self, namespace: &str) -> Vec<String> {
        let out = self.run(namespace, &["content", "ls", "-q"]);
        out.assert_success();
        out.stdout.lines().map(str::to_owned).collect()
    }

    /// Runs `ctr --debug -a SOCK -n NAMESPACE ARGS...`.
    pub fn run(&self, namespace: &str, args: &[&str]) -> CtrOutput {
        let mut full = vec!["-n", namespace];
        full.extend_from_slice(args);
        self.run_global(&full, self.timeout)
    }

    fn run_global(&self, args: &[&str], timeout: Duration) -> CtrOutput {
        let mut cmd = Command::new("ctr");
        cmd.arg("--debug")
            .arg("-a")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        isolate_env(&mut cmd, &self.proxy);
        let command = format!("ctr {}", args.join(" "));
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn ctr");
        let stdout = drain(child.stdout.take().expect("ctr stdout"));
        let stderr = drain(child.stderr.take().expect("ctr stderr"));
        let deadline = started + timeout;
        let (status, timed_out) = loop {
            if let Some(status) = child.try_wait().expect("poll ctr") {
                break (status, false);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break (child.wait().expect("reap ctr"), true);
            }
            thread::sleep(Duration::from_millis(10));
        };
        let elapsed = started.elapsed();
        CtrOutput {
            command,
            success: status.success() && !timed_out,
            status,
            timed_out,
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
            elapsed,
        }
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Result of one `ctr` invocation.
pub struct CtrOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exited 0 within the timeout.
    pub success: bool,
    pub status: ExitStatus,
    /// Killed after the timeout.
    pub timed_out: bool,
    pub stdout: String,
    /// ctr's `--debug` log, including one `"do request"` line per request.
    pub stderr: String,
    pub elapsed: Duration,
}

/// One registry request ctr logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtrRequest {
    pub method: String,
    pub url: String,
}

impl CtrOutput {
    /// Panics with the full output unless the command succeeded.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success, "{self}");
        self
    }

    /// Panics with the full output if the command succeeded.
    pub fn assert_failure(&self) -> &Self {
        assert!(!self.success, "expected failure: {self}");
        self
    }

    /// The registry requests ctr made, in order (from `--debug` output).
    pub fn requests(&self) -> Vec<CtrRequest> {
        self.stderr
            .lines()
            .filter(|line| line.contains("msg=\"do request\""))
            .filter_map(|line| {
                Some(CtrRequest {
                    method: logfmt_value(line, "request.method")?,
                    url: logfmt_value(line, "url")?,
                })
            })
            .collect()
    }

    /// The URLs of [`Self::requests`].
    pub fn requested_urls(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.url).collect()
    }

    /// `(status, url)` of every response ctr logged as received
    /// (`"fetch response received"`), e.g. `("200 OK", url)`.
    pub fn responses(&self) -> Vec<(String, String)> {
        self.stderr
            .lines()
            .filter(|line| line.contains("msg=\"fetch response received\""))
            .filter_map(|line| {
                Some((
                    logfmt_value(line, "response.status")?,
                    logfmt_value(line, "url")?,
                ))
            })
            .collect()
    }
}

impl fmt::Display for CtrOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` -> {}{} in {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.status,
            if self.timed_out { " (timed out)" } else { "" },
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

impl fmt::Debug for CtrOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Value of `key=` in one logrus text line; handles `key="quoted \" value"`.
fn logfmt_value(line: &str, key: &str) -> Option<String> {
    let needle = format!(" {key}=");
    let start = line.find(&needle)? + needle.len();
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(chars.next()?),
                '"' => return Some(out),
                c => out.push(c),
            }
        }
        None
    } else {
        Some(rest.split_whitespace().next().unwrap_or("").to_owned())
    }
}

/// The decoded `ns` query parameter of a URL. containerd percent-encodes
/// it, so `myregistry.io:5000` arrives as `?ns=myregistry.io%3A5000`.
pub fn ns_param(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned())
}

/// Writes `<dir>/<registry_host>/hosts.toml` with `server = server_url` and
/// one mirror `[host."<mirror_url>"]` with `pull` and `resolve`. Returns the
/// file's path. `registry_host` is the reference's host as containerd sees it
/// (`docker.io`, `registry.k8s.io`, `myregistry.io:5000`).
pub fn write_hosts_toml(
    dir: &Path,
    registry_host: &str,
    mirror_url: &str,
    server_url: &str,
) -> PathBuf {
    write_hosts_toml_raw(
        dir,
        registry_host,
        &format!(
            "server = \"{server_url}\"\n\n[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
}

/// Writes `<dir>/<registry_host>/hosts.toml` with arbitrary contents.
pub fn write_hosts_toml_raw(dir: &Path, registry_host: &str, contents: &str) -> PathBuf {
    let host_dir = dir.join(registry_host);
    fs::create_dir_all(&host_dir).expect("create hosts.toml dir");
    let path = host_dir.join("hosts.toml");
    fs::write(&path, contents).expect("write hosts.toml");
    path
}

/// Proxy settings that send anything not on loopback to a closed port.
fn isolate_env(cmd: &mut Command, proxy: &str) {
    for var in [
        "CONTAINERD_ADDRESS",
        "CONTAINERD_NAMESPACE",
        "CONTAINERD_SNAPSHOTTER",
        "ALL_PROXY",
        "all_proxy",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HTTP_PROXY", proxy)
        .env("HTTPS_PROXY", proxy)
        .env("NO_PROXY", "127.0.0.1,localhost");
}
