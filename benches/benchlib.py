"""Shared by benches/compare.py and benches/soak.py (python3 stdlib only):
logging, ports, child processes started in their own session and stopped by
PID, HTTP readiness checks, building the berth binary, and a private
containerd with a hosts.toml pointing at a mirror."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
T_START = time.monotonic()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log(msg):
    print(f"[{time.monotonic() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def strip_ansi(s):
    return ANSI.sub("", s)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_port():
    for _ in range(20):
        p = free_port()
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", p)) != 0:
                return p
    raise RuntimeError("no dead port on 127.0.0.1")


def child_env(extra=None):
    """The environment for servers: no proxies, no BERTH_/REGISTRY_/
    CONTAINERD_ overrides."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BERTH_", "REGISTRY_", "CONTAINERD_"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "rust_log")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["OTEL_SDK_DISABLED"] = "true"
    env.update(extra or {})
    return env


def parent_of(pid):
    """The parent PID from /proc/PID/stat, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    return int(s[s.rfind(")") + 2 :].split()[1])


def children_of(pid):
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and parent_of(int(d)) == pid]


class Proc:
    """A child in its own session (Ctrl-C in the terminal does not reach it);
    stopped by PID: SIGTERM, then SIGKILL."""

    ALL = []

    def __init__(self, name, argv, log_path, cwd=None, env=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.p = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env or child_env(),
            start_new_session=True,
        )
        self.pid = self.p.pid
        Proc.ALL.append(self)

    def alive(self):
        return self.p.poll() is None

    def pids(self):
        """This process and its children (nginx workers)."""
        return [self.pid] + children_of(self.pid)

    def log_text(self, tail=4000):
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return strip_ansi(data[-tail:].decode("utf-8", "replace"))

    def stop(self, grace=10.0):
        if self.p.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        self._log.close()
        if self in Proc.ALL:
            Proc.ALL.remove(self)


def http_status(port, path, timeout=2.0, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def wait_http(proc, port, path="/v2/", ok=(200,), timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log_text()}")
        try:
            if http_status(port, path) in ok:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{proc.name} did not answer {path} in {timeout}s:\n{proc.log_text()}")


def start_with_port(name, make_argv, log_path, path="/v2/", ok=(200,), cwd=None, attempts=4):
    """Start a server on a free port, retrying if the port was taken meanwhile."""
    last = None
    for _ in range(attempts):
        port = free_port()
        proc = Proc(name, make_argv(port), log_path, cwd=cwd)
        try:
            wait_http(proc, port, path, ok)
            return proc, port
        except RuntimeError as e:
            last = e
            proc.stop(2)
            if "address already in use" not in str(e).lower():
                raise
    raise last


def build_berth(args):
    """`--berth-bin`, or a fresh release build."""
    if args.berth_bin:
        return Path(args.berth_bin).resolve()
    log("cargo build --release --bin berth")
    subprocess.run(["cargo", "build", "--release", "--bin", "berth"], cwd=REPO_ROOT, check=True)
    meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                          cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    b = Path(json.loads(meta.stdout)["target_directory"]) / "release" / "berth"
    if not b.is_file():
        raise SystemExit(f"berth binary not found at {b}")
    return b


# ---------------------------------------------------------------------------
# a private containerd (like tests/common/containerd.rs), used by
# compare.py's `ctr` scenario and soak.py's ctr pulls


class Containerd:
    """containerd with its own config, root, state and sockets under `base`:
    no CRI, isolated content per namespace, proxies pointed at a dead port so
    nothing but loopback is reachable. Stopped by PID."""

    def __init__(self, base, level="info"):
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.sock = base / "grpc.sock"
        self.proxy = f"http://127.0.0.1:{dead_port()}"
        cfg = base / "config.toml"
        cfg.write_text(f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{self.sock}"

[ttrpc]
  address = "{base / 'ttrpc.sock'}"

[debug]
  address = "{base / 'debug.sock'}"
  level = "{level}"

[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"

[plugins."io.containerd.internal.v1.opt"]
  path = "{base / 'opt'}"
""")
        self.proc = Proc("containerd", ["/usr/bin/containerd", "--config", cfg],
                         base / "containerd.log", env=self.env())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"containerd exited:\n{self.proc.log_text()}")
            if self.sock.exists() and self.ctr(["version"], timeout=5).returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"containerd did not start:\n{self.proc.log_text()}")

    def env(self):
        return child_env({"HTTP_PROXY": self.proxy, "HTTPS_PROXY": self.proxy})

    def argv(self, args, namespace=None):
        return ["ctr", "-a", str(self.sock)] + (["-n", namespace] if namespace else []) + list(args)

    def ctr(self, args, namespace=None, timeout=120):
        argv = self.argv(args, namespace)
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  env=self.env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(argv, 124, "", f"timed out: {e}")

    def stop(self):
        self.proc.stop()

    def remove(self):
        """Stop the daemon and delete root, state and sockets (unmounting
        anything left mounted under `base` first)."""
        self.stop()
        prefix = str(self.base) + "/"
        try:
            with open("/proc/self/mounts") as f:
                mounts = [line.split()[1] for line in f]
        except OSError:
            mounts = []
        for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def mirror_hosts(hosts_dir, registry, mirror_port):
    """Write `hosts_dir/<registry>/hosts.toml` sending pulls to the mirror on
    `mirror_port`; the registry's own `server` is a dead loopback port, so a
    fallback cannot leave the machine. Returns `hosts_dir` (for `--hosts-dir`)."""
    (hosts_dir / registry).mkdir(parents=True)
    (hosts_dir / registry / "hosts.toml").write_text(
        f'server = "http://127.0.0.1:{dead_port()}"\n\n'
        f'[host."http://127.0.0.1:{mirror_port}"]\n  capabilities = ["pull", "resolve"]\n')
    return hosts_dir
