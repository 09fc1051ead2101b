#!/usr/bin/env python3
"""berth comparison benchmark: one command, loopback only, python3 stdlib only.

    python3 benches/compare.py [--size-mib 1024] [--runs 3] [--quick]

Starts, on 127.0.0.1 ephemeral ports and inside one temporary directory:

* a distribution registry (``docker-registry``, filesystem storage): the
  **origin**, also measured directly;
* **berth** (release build; ``cargo build --release`` is run first and is a
  no-op when up to date; CARGO_TARGET_DIR is honoured);
* distribution in **proxy mode** (``proxy: remoteurl:``) against the same origin;
* **nginx** (sendfile on) serving the same blob file and a 530-byte file
  (the manifest's bytes);
* two small counting TCP proxies (splice(2), so they add little CPU) between
  the origin and the warm berth / distribution-proxy (and the mirrors of the
  manifest-latency scenario), which count the bytes the origin served and the
  HTTP requests it received. Cold runs have no such hop: their mirrors talk
  to the origin directly and are counted from the origin's access log.

It pushes a random blob (streamed, monolithic upload), a config blob and a
small OCI manifest (tag ``latest``) to the origin, then measures:

1. warm blob, 1 and 8 concurrent clients: throughput, server CPU-seconds per
   GiB served (utime+stime deltas from /proc/PID/stat, nginx master+workers),
   peak RSS split into RssAnon/RssFile (sampled every 50 ms);
2. cold blob, 1, 8 and 32 simultaneous clients, berth and distribution-proxy
   each restarted on an empty cache for every run, talking to the origin
   directly: wall time, time to first body byte of every client, bytes and
   requests the origin served (from the origin's access log); then a real
   containerd's cold pull (``ctr images pull`` through a hosts.toml mirror,
   fresh containerd, namespace and empty mirror each run; all of its state
   deleted after) of an image with one ``--ctr-mib`` MiB gzip layer, berth
   vs distribution-proxy: wall, mirror CPU, origin bytes;
3. cached manifest by tag and by digest with wrk (-t2 -c64 --latency) against
   nginx's 530-byte file, berth, the origin and distribution-proxy, counting
   origin requests during each run; then the latency of a light, steady stream
   of cached-manifest requests (benches/latency_probe.py) alone and while 8
   cold pulls of distinct blobs download, hash, write and fsync into the same
   mirror (berth and distribution-proxy, fresh cache each run);
4. berth RSS idle and while serving;
5. berth start-up time with 100,000 cached blobs (spawn -> ``GET /v2/`` 200).

Clients are python threads on raw sockets (HTTP/1.1, ``Connection: close``),
connected before a barrier, reading into one reused 1 MiB buffer per client.
Content is verified (sha256) in separate, untimed fetches.

Every scenario is repeated ``--runs`` times, servers interleaved within each
run; the report shows medians with [min-max]. The Markdown report is printed
and written to ``benches/results/latest.md`` (raw numbers in ``latest.json``).
All benchmark data (the temporary directory, caches) is deleted at the end,
also on error or Ctrl-C. Processes are stopped by PID.
"""

import argparse
import datetime
import fcntl
import gzip
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import resource
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.parse
from pathlib import Path

from benchlib import (REPO_ROOT, Containerd, Proc, build_berth, free_port, log, mirror_hosts,
                      start_with_port, strip_ansi)

RESULTS_DIR = REPO_ROOT / "benches" / "results"
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
REGISTRY_BIN = "docker-registry"
REPO = "library/bench"
TAG = "latest"
NS = "docker.io"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.oci.image.index.v1+json"
)
SMALL_FILE_SIZE = 530
CTR_REPO = "library/ctrbench"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
RSS_INTERVAL = 0.05
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# ---------------------------------------------------------------------------
# logging and small helpers


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_num(x, digits=0):
    if x is None:
        return "n/a"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def fmt_runs(xs, digits=0, unit=""):
    """median [min-max] of a list of per-run values."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    m = fmt_num(statistics.median(xs), digits) + unit
    if len(xs) == 1:
        return m
    return f"{m} [{fmt_num(min(xs), digits)}–{fmt_num(max(xs), digits)}]"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}x"


def verdict(ok):
    if ok is None:
        return "n/a"
    return "PASS" if ok else "**FAIL**"


# ---------------------------------------------------------------------------
# /proc: CPU and memory of server processes


def cpu_ns_by_task(pids):
    """{(pid, tid): nanoseconds on CPU} from /proc/PID/task/TID/schedstat.
    utime+stime come in 10 ms ticks, too coarse for a run of a few tenths of
    a second; a thread that exits inside the window loses its share."""
    out = {}
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/schedstat") as f:
                    out[(p, t)] = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return out


def cpu_seconds_between(before, after):
    return sum(v - before.get(k, 0) for k, v in after.items()) / 1e9


def mem_status(pid):
    """VmRSS, RssAnon, RssFile, RssShmem in bytes."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[k] = int(v.split()[0]) * KiB
    except OSError:
        return None
    return out


class Meter:
    """CPU-seconds (utime+stime delta) and peak memory of a group of processes
    over a `with` block; memory sampled every RSS_INTERVAL in a thread."""

    KEYS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, pids):
        self.pids = list(pids)
        self.peak = {k: 0 for k in self.KEYS}
        self._stop = threading.Event()

    def _sample(self):
        tot = {k: 0 for k in self.KEYS}
        for p in self.pids:
            m = mem_status(p)
            if m:
                for k in self.KEYS:
                    tot[k] += m.get(k, 0)
        for k in self.KEYS:
            self.peak[k] = max(self.peak[k], tot[k])

    def _run(self):
        while not self._stop.wait(RSS_INTERVAL):
            self._sample()

    def __enter__(self):
        self._sample()
        self.cpu0 = cpu_ns_by_task(self.pids)
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu = cpu_seconds_between(self.cpu0, cpu_ns_by_task(self.pids))
        self.elapsed = time.perf_counter() - self.t0
        return False


# ---------------------------------------------------------------------------
# processes


# ---------------------------------------------------------------------------
# servers


def registry_config(storage, port, proxy_url=None):
    proxy = f"proxy:\n  remoteurl: {proxy_url}\n" if proxy_url else ""
    return f"""version: 0.1
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
  secret: berth-bench-secret
health:
  storagedriver:
    enabled: false
{proxy}"""


def start_registry(name, base, proxy_url=None):
    base.mkdir(parents=True, exist_ok=True)
    storage = base / "storage"
    storage.mkdir(exist_ok=True)
    cfg = base / "config.yml"

    def argv(port):
        cfg.write_text(registry_config(storage, port, proxy_url))
        return [REGISTRY_BIN, "serve", cfg]

    return start_with_port(name, argv, base / "registry.log", cwd=base)


def start_berth(berth_bin, cache_dir, log_path, upstream_port, tag_ttl):
    cache_dir.mkdir(parents=True, exist_ok=True)

    def argv(port):
        return [
            berth_bin, "serve",
            "--listen", f"127.0.0.1:{port}",
            "--cache-dir", cache_dir,
            "--upstream", f"{NS}=http://127.0.0.1:{upstream_port}",
            "--tag-ttl", tag_ttl,
            "--cache-capacity", "20GiB",
        ]

    return start_with_port("berth", argv, log_path)


def start_nginx(base, www):
    base.mkdir(parents=True, exist_ok=True)
    conf = base / "nginx.conf"

    def argv(port):
        conf.write_text(f"""daemon off;
master_process on;
worker_processes auto;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log {base}/access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {base}/body;
    proxy_temp_path {base}/proxy;
    fastcgi_temp_path {base}/fastcgi;
    uwsgi_temp_path {base}/uwsgi;
    scgi_temp_path {base}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {www};
        location / {{ }}
    }}
}}
""")
        return ["nginx", "-c", conf, "-p", base]

    return start_with_port("nginx", argv, base / "stdout.log", path="/manifest")


# ---------------------------------------------------------------------------
# counting proxy between the origin and a mirror


class CountingProxy:
    """TCP relay in front of the origin. Origin->client bytes move with
    splice(2) through a pipe (no copy into python) and are counted; the
    client->origin direction is read in python to log each request line
    (mirrors only send bodiless GET/HEAD, so a request ends at CRLFCRLF)."""

    def __init__(self, name, target_port):
        self.name = name
        self.target = target_port
        self.lock = threading.Lock()
        self.bytes_down = 0
        self.requests = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def wait_quiet(self, quiet=0.5, timeout=120.0):
        """Wait until no byte has moved for `quiet` seconds (a mirror may
        still be downloading after its clients are done)."""
        deadline = time.monotonic() + timeout
        last, since = self.snapshot()[0], time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.snapshot()[0]
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return True
        return False

    def snapshot(self):
        with self.lock:
            return self.bytes_down, len(self.requests)

    def since(self, snap):
        with self.lock:
            return self.bytes_down - snap[0], list(self.requests[snap[1] :])

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            u = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            c.close()
            return
        for s in (c, u):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        down = threading.Thread(target=self._down, args=(u, c), daemon=True)
        down.start()
        self._up(c, u)
        down.join()
        for s in (c, u):
            try:
                s.close()
            except OSError:
                pass

    def _up(self, src, dst):
        pending = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                pending += data
                while b"\r\n\r\n" in pending:
                    head, pending = pending.split(b"\r\n\r\n", 1)
                    line = head.split(b"\r\n", 1)[0].decode("latin-1")
                    with self.lock:
                        self.requests.append(line)
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _down(self, src, dst):
        r, w = os.pipe()
        try:
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, MiB)
            except OSError:
                pass
            while True:
                n = os.splice(src.fileno(), w, MiB, flags=os.SPLICE_F_MOVE)
                if n == 0:
                    break
                left = n
                while left:
                    left -= os.splice(r, dst.fileno(), left, flags=os.SPLICE_F_MOVE)
                with self.lock:
                    self.bytes_down += n
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RDWR)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass


# ---------------------------------------------------------------------------
# the origin's own access log (cold runs: the mirror talks to the origin directly)

ACCESS_LINE = re.compile(rb'^\S+ - \S+ \[[^\]]*\] "(\S+) (\S+) ([^"]*)" (\d{3}) (\d+|-)')


def proc_io(pid):
    """rchar + wchar of a process from /proc/PID/io: moves while the origin
    reads a blob file or writes to a socket (also with sendfile)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            vals = dict(line.split(":", 1) for line in f if ":" in line)
        return int(vals["rchar"]) + int(vals["wchar"])
    except (OSError, KeyError, ValueError):
        return None


class OriginLog:
    """Origin bytes and requests counted from distribution's access log (one
    combined-log-format line per completed request: request line, status,
    body bytes written), with no relay between mirror and origin. A line is
    written only when its response is complete, so `wait_quiet` also watches
    the origin's read/write byte counters: a blob still being sent (e.g.
    distribution-proxy's second, background fetch) keeps them moving."""

    def __init__(self, proc, path):
        self.proc = proc
        self.path = Path(path)

    def offset(self):
        """Snapshot before a run: lines before it (setup, pushes, earlier
        runs) are not counted."""
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def wait_quiet(self, offset, quiet=0.5, timeout=120.0, min_lines=1):
        """Wait until at least `min_lines` requests were logged since `offset`
        and neither the log nor the origin's I/O counters moved for `quiet`
        seconds. False on timeout."""
        deadline = time.monotonic() + timeout

        def state():
            return self.offset(), proc_io(self.proc.pid)

        last, since = state(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = state()
            if now != last:
                last, since = now, time.monotonic()
            elif (time.monotonic() - since >= quiet
                  and len(self.since(offset)[1]) >= min_lines):
                return True
        return False

    def lines(self, offset):
        """[(method, uri, proto, status, body bytes)] of the complete access
        lines logged after `offset`."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return []
        out = []
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            m = ACCESS_LINE.match(line)
            if m:
                method, uri, proto, status, written = (g.decode("latin-1") for g in m.groups())
                out.append((method, uri, proto, int(status), int(written) if written != "-" else 0))
        return out

    def since(self, offset):
        """(body bytes served, ["METHOD URI PROTO STATUS", ...]) of the
        complete lines logged after `offset`."""
        lines = self.lines(offset)
        return (sum(x[4] for x in lines),
                [f"{method} {uri} {proto} {status}" for method, uri, proto, status, _ in lines])


# ---------------------------------------------------------------------------
# clients


def blob_path(digest, ns=False):
    p = f"/v2/{REPO}/blobs/{digest}"
    return p + f"?ns={NS}" if ns else p


def manifest_path(ref, ns=False):
    p = f"/v2/{REPO}/manifests/{ref}"
    return p + f"?ns={NS}" if ns else p


def run_clients(port, path, n, hash_bodies=False, timeout=1800):
    """n simultaneous GETs of `path`. Connections are opened first; a barrier
    releases all requests at once (t0). Per client: status, body bytes, time
    to headers and to the first body byte (from t0), end time, sha256 if
    asked, error."""
    req = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"User-Agent: berth-bench\r\nAccept: {ACCEPT}\r\nConnection: close\r\n\r\n"
    ).encode()
    t0 = []
    barrier = threading.Barrier(n + 1, action=lambda: t0.append(time.perf_counter()))
    results = [dict(status=None, bytes=0, length=None, headers_s=None, ttfb_s=None,
                    end_s=None, sha256=None, error=None) for _ in range(n)]

    def worker(i):
        res = results[i]
        s = None
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            res["error"] = f"connect: {e}"
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            res["error"] = res["error"] or "barrier broken"
        if res["error"]:
            if s:
                s.close()
            return
        start = t0[0]
        buf = bytearray(MiB)
        mv = memoryview(buf)
        h = hashlib.sha256() if hash_bodies else None
        try:
            s.sendall(req)
            head = bytearray()
            while True:
                k = s.recv_into(mv)
                if k == 0:
                    raise RuntimeError(f"connection closed before headers ({bytes(head[:200])!r})")
                head += mv[:k]
                idx = head.find(b"\r\n\r\n")
                if idx >= 0:
                    break
            now = time.perf_counter()
            res["headers_s"] = now - start
            lines = bytes(head[:idx]).decode("latin-1").split("\r\n")
            res["status"] = int(lines[0].split()[1])
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    res["length"] = int(v.strip())
            got = len(head) - idx - 4
            if got:
                res["ttfb_s"] = now - start
                if h:
                    h.update(head[idx + 4 :])
            length = res["length"]
            while length is None or got < length:
                k = s.recv_into(mv)
                if k == 0:
                    break
                if res["ttfb_s"] is None:
                    res["ttfb_s"] = time.perf_counter() - start
                got += k
                if h:
                    h.update(mv[:k])
            res["end_s"] = time.perf_counter() - start
            res["bytes"] = got
            if h:
                res["sha256"] = "sha256:" + h.hexdigest()
            if length is not None and got != length:
                res["error"] = f"short body: {got} of {length} bytes"
        except Exception as e:  # noqa: BLE001 - recorded in the report
            res["error"] = f"{type(e).__name__}: {e}"
            res["end_s"] = time.perf_counter() - start
        finally:
            s.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    ends = [r["end_s"] for r in results if r["end_s"] is not None]
    return dict(clients=results, wall_s=max(ends) if ends else None)


def check_clients(run, size, digest=None, what=""):
    """Problems with a run's clients (status, bytes, digest)."""
    problems = []
    for i, r in enumerate(run["clients"]):
        if r["error"]:
            problems.append(f"{what} client {i}: {r['error']} (status {r['status']}, {r['bytes']} bytes)")
        elif r["status"] != 200:
            problems.append(f"{what} client {i}: HTTP {r['status']}")
        elif r["bytes"] != size:
            problems.append(f"{what} client {i}: {r['bytes']} bytes, expected {size}")
        elif digest and r["sha256"] and r["sha256"] != digest:
            problems.append(f"{what} client {i}: WRONG CONTENT {r['sha256']} != {digest}")
    return problems


def get_small(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Accept": ACCEPT})
        r = conn.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# origin content


def make_blob(path, size):
    """Random bytes, written in 1 MiB chunks; returns the sha256 digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(MiB, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest()


def push_blob(port, repo, digest, size, path=None, data=None):
    """Monolithic upload: POST /blobs/uploads/, then PUT <Location>&digest= with
    the whole body (streamed from `path` in 1 MiB chunks)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", f"/v2/{repo}/blobs/uploads/", body=b"",
                     headers={"Content-Length": "0"})
        r = conn.getresponse()
        r.read()
        if r.status != 202:
            raise RuntimeError(f"upload start: HTTP {r.status}")
        loc = urllib.parse.urlsplit(r.getheader("Location"))
        q = loc.query + ("&" if loc.query else "") + urllib.parse.urlencode({"digest": digest})
        conn.putrequest("PUT", f"{loc.path}?{q}")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        if data is not None:
            conn.send(data)
        else:
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(MiB)
                    if not chunk:
                        break
                    conn.send(chunk)
        r = conn.getresponse()
        body = r.read()
        if r.status != 201:
            raise RuntimeError(f"upload of {digest}: HTTP {r.status}: {body[:300]!r}")
    finally:
        conn.close()


def make_manifest(config_digest, config_size, layer_digest, layer_size):
    """An OCI image manifest padded (annotation) to SMALL_FILE_SIZE bytes."""

    def render(pad):
        m = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer_size}],
            "annotations": {"org.opencontainers.image.description": "x" * pad},
        }
        return json.dumps(m, separators=(",", ":")).encode()

    base = len(render(0))
    return render(max(0, SMALL_FILE_SIZE - base))


def push_manifest(port, repo, tag, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("PUT", f"/v2/{repo}/manifests/{tag}", body=body,
                     headers={"Content-Type": OCI_MANIFEST})
        r = conn.getresponse()
        text = r.read()
        if r.status != 201:
            raise RuntimeError(f"manifest push: HTTP {r.status}: {text[:300]!r}")
    finally:
        conn.close()


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through
    to `inner` (None: hash only)."""

    def __init__(self, inner=None):
        self.inner = inner
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, b):
        self.h.update(b)
        self.size += len(b)
        if self.inner is not None:
            self.inner.write(b)
        return len(b)

    def flush(self):
        if self.inner is not None:
            self.inner.flush()


class _RandomReader:
    def read(self, n=-1):
        return os.urandom(min(n, MiB) if n and n > 0 else MiB)


def make_layer(path, size):
    """A real image layer: a gzip (level 1) tar holding one file of `size`
    random bytes (so it does not compress). Returns (digest, compressed size,
    diff_id = sha256 of the uncompressed tar)."""
    with open(path, "wb") as f:
        outer = _HashingWriter(f)
        with gzip.GzipFile(fileobj=outer, mode="wb", compresslevel=1, mtime=0) as gz:
            inner = _HashingWriter(gz)
            with tarfile.open(fileobj=inner, mode="w|", format=tarfile.PAX_FORMAT,
                              copybufsize=MiB) as tar:
                ti = tarfile.TarInfo("bench/data.bin")
                ti.size, ti.mode, ti.mtime = size, 0o644, 0
                tar.addfile(ti, _RandomReader())
    return "sha256:" + outer.h.hexdigest(), outer.size, "sha256:" + inner.h.hexdigest()


def go_arch():
    m = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)


def make_image(layer_digest, layer_size, diff_id):
    """(config bytes, manifest bytes): an OCI image config whose rootfs
    diff_ids match the layer's uncompressed tar (containerd checks that when
    it unpacks) for this host's platform, and an OCI manifest for it."""
    config = json.dumps({
        "architecture": go_arch(), "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "berth benches/compare.py"}],
    }, separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                   "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": layer_size}],
    }, separators=(",", ":")).encode()
    return config, manifest


# ---------------------------------------------------------------------------
# latency probe (benches/latency_probe.py, in its own process)


class Probe:
    """A steady stream of small GETs on kept-alive connections (one per
    path) until stopped; `.result` holds every latency in ms."""

    def __init__(self, port, paths, interval_ms=2.0):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("latency_probe.py")), str(port), *paths,
             "--interval-ms", str(interval_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("latency probe did not start")
        self.result = None

    def stop(self):
        out, _ = self.proc.communicate(input="", timeout=60)
        self.result = json.loads(out)
        return self.result


def pct(xs, q):
    """The q-th percentile (nearest rank) of xs."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]


def latency_summary(res):
    ms = res["ms"]
    return dict(requests=len(ms), p50_ms=pct(ms, 50), p99_ms=pct(ms, 99), p999_ms=pct(ms, 99.9),
                max_ms=max(ms) if ms else None, status=res["status"], errors=res["errors"],
                seconds=res["seconds"])


# ---------------------------------------------------------------------------
# wrk


def parse_wrk_latency(v, unit):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[unit]


def run_wrk(port, path, duration, pids):
    url = f"http://127.0.0.1:{port}{path}"
    argv = ["wrk", "-t2", "-c64", f"-d{duration}s", "--latency", "-H", f"Accept: {ACCEPT}", url]
    with Meter(pids) as m:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    text = out.stdout + out.stderr
    res = dict(rps=None, p99_ms=None, p50_ms=None, requests=None, non2xx=0, socket_errors=None,
               cpu_s=m.cpu, peak_rss=m.peak, raw=text)
    if g := re.search(r"Requests/sec:\s+([\d.]+)", text):
        res["rps"] = float(g.group(1))
    if g := re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        res["p99_ms"] = parse_wrk_latency(*g.groups())
    if g := re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        res["p50_ms"] = parse_wrk_latency(*g.groups())
    if g := re.search(r"(\d+) requests in", text):
        res["requests"] = int(g.group(1))
    if g := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        res["non2xx"] = int(g.group(1))
    if g := re.search(r"Socket errors: (.*)", text):
        res["socket_errors"] = g.group(1).strip()
    if out.returncode != 0:
        res["error"] = f"wrk exited {out.returncode}: {text[-500:]}"
    return res


# ---------------------------------------------------------------------------
# the suite


class Suite:
    def __init__(self, args, berth_bin, tmp):
        self.args = args
        self.berth_bin = berth_bin
        self.tmp = tmp
        self.size = args.size_mib * MiB
        self.runs = args.runs
        self.problems = []  # misbehaviour, reported
        self.notes = []
        self.data = dict(warm={}, cold={}, ctr={}, manifest={}, manifest_load={}, memory={},
                         startup={})
        self.servers = {}  # name -> (Proc, port, ns?)

    # -- setup ---------------------------------------------------------------
    def setup(self):
        t = self.tmp
        www = t / "www"
        www.mkdir()
        log(f"generating a {self.args.size_mib} MiB random blob")
        blob = www / "blob"
        self.digest = make_blob(blob, self.size)
        os.chmod(blob, 0o644)

        log("starting the origin (docker-registry)")
        self.origin, self.origin_port = start_registry("origin", t / "origin")
        self.origin_log = OriginLog(self.origin, t / "origin" / "registry.log")
        log(f"pushing blob {self.digest[:19]}... to the origin")
        tp = time.perf_counter()
        push_blob(self.origin_port, REPO, self.digest, self.size, path=blob)
        log(f"  pushed in {time.perf_counter() - tp:.1f}s")
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [self.digest]}}).encode()
        self.config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        push_blob(self.origin_port, REPO, self.config_digest, len(config), data=config)
        self.manifest = make_manifest(self.config_digest, len(config), self.digest, self.size)
        self.manifest_digest = "sha256:" + hashlib.sha256(self.manifest).hexdigest()
        push_manifest(self.origin_port, REPO, TAG, self.manifest)
        (www / "manifest").write_bytes(self.manifest)
        os.chmod(www / "manifest", 0o644)
        log(f"  manifest {self.manifest_digest[:19]}... ({len(self.manifest)} bytes) tagged {TAG}")

        # Counting proxies: one for berth, one for distribution's proxy mode.
        self.px_berth = CountingProxy("berth", self.origin_port)
        self.px_dist = CountingProxy("dist-proxy", self.origin_port)

        log("starting nginx")
        self.nginx, self.nginx_port = start_nginx(t / "nginx", www)
        log("starting berth (warm instance)")
        self.berth, self.berth_port = start_berth(
            self.berth_bin, t / "berth-warm" / "cache", t / "berth-warm.log",
            self.px_berth.port, self.args.tag_ttl)
        log("starting distribution in proxy mode (warm instance)")
        self.dist, self.dist_port = start_registry(
            "dist-proxy", t / "dist-warm", f"http://127.0.0.1:{self.px_dist.port}")

        # Idle memory of berth: nothing requested yet.
        time.sleep(1.0)
        samples = []
        for _ in range(10):
            samples.append(mem_status(self.berth.pid))
            time.sleep(0.05)
        self.data["memory"]["idle_start"] = {
            k: max(s[k] for s in samples) for k in ("VmRSS", "RssAnon", "RssFile")}
        for name, proc in (("nginx", self.nginx), ("origin", self.origin), ("dist-proxy", self.dist)):
            mm = [mem_status(p) or {} for p in proc.pids()]
            self.data["memory"].setdefault("idle_others", {})[name] = {
                k: sum(m.get(k, 0) for m in mm) for k in ("VmRSS", "RssAnon", "RssFile")}

        # Blob targets: (proc, port, path). Verify content once, untimed.
        self.blob_targets = {
            "nginx": (self.nginx, self.nginx_port, "/blob"),
            "distribution": (self.origin, self.origin_port, blob_path(self.digest)),
            "berth": (self.berth, self.berth_port, blob_path(self.digest, ns=True)),
            "dist-proxy": (self.dist, self.dist_port, blob_path(self.digest)),
        }
        for name, (proc, port, path) in self.blob_targets.items():
            px = {"berth": self.px_berth, "dist-proxy": self.px_dist}.get(name)
            snap = px.snapshot() if px else None
            log(f"fetching the blob once from {name} (sha256 checked; fills the mirror caches)")
            run = run_clients(port, path, 1, hash_bodies=True)
            self.problems += check_clients(run, self.size, self.digest, f"first fetch via {name}:")
            if px:
                px.wait_quiet()
                b, reqs = px.since(snap)
                self.data.setdefault("first_fetch", {})[name] = dict(
                    origin_bytes=b, origin_requests=reqs, wall_s=run["wall_s"])
        # distribution-proxy commits its copy after the response: wait until a
        # second fetch is served locally.
        self._wait_dist_local(self.dist_port, self.px_dist)

    def _wait_dist_local(self, port, px, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = px.snapshot()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("HEAD", blob_path(self.digest))
                r = conn.getresponse()
                r.read()
            finally:
                conn.close()
            time.sleep(0.2)
            _, reqs = px.since(snap)
            if r.status == 200 and not reqs:
                return
            time.sleep(0.5)
        self.notes.append("distribution-proxy still asked the origin on HEAD after the first fetch")

    # -- warm ----------------------------------------------------------------
    def warm(self):
        for run_i in range(self.runs):
            for n in (1, 8):
                for name, (proc, port, path) in self.blob_targets.items():
                    log(f"warm run {run_i + 1}/{self.runs}: {name}, {n} client(s)")
                    pids = proc.pids()
                    with Meter(pids) as m:
                        run = run_clients(port, path, n)
                    self.problems += check_clients(run, self.size, what=f"warm {name} x{n}:")
                    served = sum(c["bytes"] for c in run["clients"])
                    rec = dict(
                        wall_s=run["wall_s"],
                        mib_s=served / MiB / run["wall_s"] if run["wall_s"] else None,
                        cpu_s=m.cpu,
                        cpu_per_gib=m.cpu / (served / GiB) if served else None,
                        peak=m.peak,
                        ttfb_ms=[c["ttfb_s"] * 1e3 for c in run["clients"] if c["ttfb_s"] is not None],
                    )
                    self.data["warm"].setdefault(f"{name}/{n}", []).append(rec)

    # -- cold ----------------------------------------------------------------
    def _fresh_mirror(self, kind, idx, direct=False):
        """A mirror on an empty cache. Its origin link goes through the
        counting proxy (returned as px), or with `direct` straight to the
        origin (px is None: count with self.origin_log)."""
        base = self.tmp / f"cold-{kind}-{idx}"
        if kind == "berth":
            px = None if direct else self.px_berth
            proc, port = start_berth(self.berth_bin, base / "cache", base / "berth.log",
                                     px.port if px else self.origin_port, self.args.tag_ttl)
            return proc, port, blob_path(self.digest, ns=True), px, base
        px = None if direct else self.px_dist
        proc, port = start_registry("dist-proxy", base,
                                    f"http://127.0.0.1:{px.port if px else self.origin_port}")
        return proc, port, blob_path(self.digest), px, base

    def _cold_once(self, kind, n, idx, hash_bodies=False):
        """One cold run, the mirror talking to the origin directly (no hop);
        origin bytes and requests come from the origin's access log, read
        once the origin has been quiet (the mirror's background downloads
        are done)."""
        proc, port, path, _, base = self._fresh_mirror(kind, idx, direct=True)
        try:
            off = self.origin_log.offset()
            with Meter(proc.pids()) as m:
                run = run_clients(port, path, n, hash_bodies=hash_bodies)
            if not self.origin_log.wait_quiet(off):
                self.problems.append(f"cold {kind} x{n}: the origin was not quiet within 120 s "
                                     "after the clients finished (origin counts may be short)")
            origin_bytes, reqs = self.origin_log.since(off)
            problems = check_clients(run, self.size, self.digest if hash_bodies else None,
                                     f"cold {kind} x{n}:")
            if kind == "berth":
                problems += scan_berth_log(base / "berth.log", f"cold {kind} x{n}")
            ttfb = [c["ttfb_s"] * 1e3 for c in run["clients"] if c["ttfb_s"] is not None]
            return dict(
                wall_s=run["wall_s"],
                ttfb_ms=ttfb,
                leader_ms=min(ttfb) if ttfb else None,
                spread_ms=(max(ttfb) - min(ttfb)) if ttfb else None,
                origin_bytes=origin_bytes,
                origin_ratio=origin_bytes / self.size,
                origin_blob_gets=sum(1 for r in reqs if r.startswith("GET ") and "/blobs/" in r),
                origin_requests=reqs,
                cpu_s=m.cpu,
                peak=m.peak,
                verified=sum(1 for c in run["clients"] if c["sha256"] == self.digest) if hash_bodies else None,
            ), problems
        finally:
            proc.stop()
            shutil.rmtree(base, ignore_errors=True)

    def cold(self):
        self.notes.append("cold runs are direct (no hop between mirror and origin); origin bytes "
                          "and requests are counted from the origin's own access log")
        idx = 0
        for run_i in range(self.runs):
            for n in (1, 8, 32):
                for kind in ("berth", "dist-proxy"):
                    idx += 1
                    log(f"cold run {run_i + 1}/{self.runs}: {kind}, {n} client(s), empty cache")
                    rec, problems = self._cold_once(kind, n, idx)
                    self.problems += problems
                    self.data["cold"].setdefault(f"{kind}/{n}", []).append(rec)
        # Untimed content check: 8 simultaneous cold clients, every body hashed.
        for kind in ("berth", "dist-proxy"):
            idx += 1
            log(f"cold content check: {kind}, 8 clients, sha256 of every body")
            rec, problems = self._cold_once(kind, 8, idx, hash_bodies=True)
            self.problems += problems
            self.data["cold_verify"] = self.data.get("cold_verify", {})
            self.data["cold_verify"][kind] = dict(verified=rec["verified"], clients=8,
                                                  origin_ratio=rec["origin_ratio"],
                                                  origin_blob_gets=rec["origin_blob_gets"])

    # -- containerd cold pull ------------------------------------------------
    def _push_ctr_image(self):
        mib_ = self.args.ctr_mib
        path = self.tmp / "ctr-layer.tar.gz"
        log(f"generating a {mib_} MiB single-layer image (random file in a gzip -1 tar)")
        t = time.perf_counter()
        layer, layer_size, diff_id = make_layer(path, mib_ * MiB)
        log(f"  layer {layer[:19]}... ({layer_size / MiB:.1f} MiB) in {time.perf_counter() - t:.1f}s; "
            f"pushing {CTR_REPO}:{TAG} to the origin")
        push_blob(self.origin_port, CTR_REPO, layer, layer_size, path=path)
        path.unlink()
        config, manifest = make_image(layer, layer_size, diff_id)
        push_blob(self.origin_port, CTR_REPO, "sha256:" + hashlib.sha256(config).hexdigest(),
                  len(config), data=config)
        push_manifest(self.origin_port, CTR_REPO, TAG, manifest)
        self.ctr_image = dict(layer=layer, layer_size=layer_size, diff_id=diff_id,
                              manifest_digest="sha256:" + hashlib.sha256(manifest).hexdigest())

    def _ctr_mirror_served(self, kind, base):
        """(status, bytes) of the mirror's own log line for the layer GET,
        or None if the mirror logged no such request."""
        layer = self.ctr_image["layer"]
        if kind == "berth":
            text = strip_ansi((base / "berth.log").read_text(errors="replace"))
            for line in text.splitlines():
                # berth::access: request method=GET path="/v2/..." status=200 ... result="miss" bytes="N"
                if (re.search(rf'path="?/v2/{CTR_REPO}/blobs/{layer}"?(\s|$)', line)
                        and re.search(r"\bmethod=\"?GET\b", line)):
                    st = re.search(r'\bstatus="?(\d+)', line)
                    b = re.search(r'\bbytes="?(\d+)', line)
                    res = re.search(r'\bresult="?([^"\s]+)', line)
                    return (int(st.group(1)) if st else None, int(b.group(1)) if b else None,
                            res.group(1) if res else None)
            return None
        for method, uri, _, status, written in OriginLog(None, base / "registry.log").lines(0):
            if method == "GET" and uri.split("?")[0] == f"/v2/{CTR_REPO}/blobs/{layer}":
                return status, written, None
        return None

    def _ctr_once(self, kind, idx):
        base = self.tmp / f"ctr-{kind}-{idx}"
        base.mkdir(parents=True)
        if kind == "berth":
            proc, port = start_berth(self.berth_bin, base / "cache", base / "berth.log",
                                     self.origin_port, self.args.tag_ttl)
        else:
            proc, port = start_registry("dist-proxy", base, f"http://127.0.0.1:{self.origin_port}")
        ctd = None
        try:
            ctd = Containerd(base / "ctd")
            hosts = mirror_hosts(base / "hosts", NS, port)
            ns = f"bench-{idx}"
            ref = f"{NS}/{CTR_REPO}:{TAG}"
            argv = ctd.argv(["images", "pull", "--plain-http", "--hosts-dir", str(hosts), ref], ns)
            off = self.origin_log.offset()
            ctd_cpu0 = cpu_ns_by_task(ctd.proc.pids())
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            with Meter(proc.pids()) as m:
                t = time.perf_counter()
                try:
                    r = subprocess.run(argv, capture_output=True, text=True, timeout=900,
                                       env=ctd.env(), stdin=subprocess.DEVNULL)
                    rc, out = r.returncode, (r.stdout + r.stderr)
                except subprocess.TimeoutExpired:
                    rc, out = 124, "timed out after 900 s"
                wall = time.perf_counter() - t
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            ctd_cpu = cpu_seconds_between(ctd_cpu0, cpu_ns_by_task(ctd.proc.pids()))
            ctr_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
            problems = []
            if rc != 0:
                problems.append(f"ctr pull via {kind}: exit {rc}: {out[-600:]}")
            # distribution-proxy keeps fetching the layer for its store after
            # the pull: wait for the origin to go quiet before the next run.
            if not self.origin_log.wait_quiet(off):
                problems.append(f"ctr pull via {kind}: the origin was not quiet within 120 s")
            origin_bytes, reqs = self.origin_log.since(off)
            served = self._ctr_mirror_served(kind, base)
            if served is None or served[0] != 200:
                problems.append(f"ctr pull via {kind}: the mirror's log shows no 200 for the layer "
                                f"GET ({served}): was it fetched elsewhere?")
            elif served[1] not in (None, self.ctr_image["layer_size"]):
                problems.append(f"ctr pull via {kind}: the mirror served {served[1]} bytes of the "
                                f"layer, expected {self.ctr_image['layer_size']}")
            if rc == 0:
                listed = ctd.ctr(["images", "ls", "-q"], ns, timeout=30).stdout.split()
                if ref not in listed:
                    problems.append(f"ctr pull via {kind}: {ref} not listed after the pull ({listed})")
            if kind == "berth":
                problems += scan_berth_log(base / "berth.log", f"ctr pull via {kind}")
            layer = self.ctr_image["layer"]
            return dict(
                wall_s=wall if rc == 0 else None, rc=rc, cpu_s=m.cpu, peak=m.peak,
                containerd_cpu_s=ctd_cpu, ctr_cpu_s=ctr_cpu,
                origin_bytes=origin_bytes, origin_ratio=origin_bytes / self.ctr_image["layer_size"],
                origin_layer_gets=sum(1 for q in reqs if q.startswith("GET ") and layer in q),
                origin_requests=reqs, mirror_layer=served,
            ), problems
        finally:
            if ctd is not None:
                ctd.remove()
            proc.stop()
            shutil.rmtree(base, ignore_errors=True)

    def ctr(self):
        """A real containerd's cold pull of a large single-layer image through
        a fresh, empty mirror (talking to the origin directly), berth and
        distribution-proxy in the same run; a fresh containerd and namespace
        each pull, all of its state deleted afterwards."""
        if os.geteuid() != 0 or not (shutil.which("ctr") and os.path.exists("/usr/bin/containerd")):
            self.notes.append("containerd scenario skipped: needs root, /usr/bin/containerd and ctr")
            return
        self._push_ctr_image()
        idx = 0
        for run_i in range(self.runs):
            kinds = ("berth", "dist-proxy") if run_i % 2 == 0 else ("dist-proxy", "berth")
            for kind in kinds:
                idx += 1
                log(f"containerd cold pull run {run_i + 1}/{self.runs}: {kind}, empty mirror, "
                    f"fresh containerd (namespace bench-{idx})")
                rec, problems = self._ctr_once(kind, idx)
                self.problems += problems
                log(f"  {kind}: {fmt_num(rec['wall_s'], 2)} s, mirror CPU {rec['cpu_s']:.2f} s, "
                    f"origin {rec['origin_ratio']:.3f}x")
                self.data["ctr"].setdefault(kind, []).append(rec)

    # -- manifests -----------------------------------------------------------
    def manifests(self):
        targets = [
            ("nginx", "530-byte file", self.nginx, self.nginx_port, "/manifest", None),
            ("berth", "tag", self.berth, self.berth_port, manifest_path(TAG, ns=True), self.px_berth),
            ("berth", "digest", self.berth, self.berth_port,
             manifest_path(self.manifest_digest, ns=True), self.px_berth),
            ("distribution", "tag", self.origin, self.origin_port, manifest_path(TAG), None),
            ("distribution", "digest", self.origin, self.origin_port,
             manifest_path(self.manifest_digest), None),
            ("dist-proxy", "tag", self.dist, self.dist_port, manifest_path(TAG), self.px_dist),
            ("dist-proxy", "digest", self.dist, self.dist_port,
             manifest_path(self.manifest_digest), self.px_dist),
        ]
        # Prime and check every target (by tag first: that stores the tag record).
        for name, by, proc, port, path, px in targets:
            st, hd, body = get_small(port, path)
            if st != 200 or body != self.manifest:
                self.problems.append(f"manifest {name} by {by}: HTTP {st}, {len(body)} bytes, "
                                     f"content {'ok' if body == self.manifest else 'WRONG'}")
            elif name != "nginx" and hd.get("docker-content-digest") != self.manifest_digest:
                self.problems.append(f"manifest {name} by {by}: Docker-Content-Digest "
                                     f"{hd.get('docker-content-digest')}")
        primed = time.monotonic()
        ttl = parse_duration(self.args.tag_ttl)
        for run_i in range(self.runs):
            for name, by, proc, port, path, px in targets:
                log(f"wrk run {run_i + 1}/{self.runs}: {name} by {by} ({self.args.wrk_seconds}s)")
                snap = px.snapshot() if px else None
                res = run_wrk(port, path, self.args.wrk_seconds, proc.pids())
                if px:
                    time.sleep(0.2)
                    res["origin_requests"] = len(px.since(snap)[1])
                res["since_prime_s"] = time.monotonic() - primed
                if res.get("error") or res["rps"] is None:
                    self.problems.append(f"wrk {name} by {by}: {res.get('error') or 'no result'}")
                if res["non2xx"]:
                    self.problems.append(f"wrk {name} by {by}: {res['non2xx']} non-2xx responses")
                raw = res.pop("raw")
                if res["rps"] is None:
                    self.notes.append(f"wrk output ({name} by {by}):\n{raw}")
                self.data["manifest"].setdefault(f"{name}/{by}", []).append(res)
        if time.monotonic() - primed > ttl:
            self.notes.append("the manifest runs outlasted the tag TTL: berth revalidated the "
                              "tag with the origin during them (expected)")

    # -- cached manifest latency while cold pulls write -----------------------
    def manifest_under_load(self):
        """p50/p99 of a steady stream of cached-manifest GETs (by tag and by
        digest), first alone, then while 8 cold pulls of distinct large blobs
        download, write and fsync into the same mirror (fresh, empty cache
        each run). Blocking file I/O on the async workers shows up here as
        latency spikes of the cached answers."""
        n, size = 8, self.args.load_mib * MiB
        if not hasattr(self, "load_digests"):
            log(f"pushing {n} distinct {self.args.load_mib} MiB blobs for the load scenario")
            self.load_digests = []
            path = self.tmp / "load-blob"
            for _ in range(n):
                d = make_blob(path, size)
                push_blob(self.origin_port, REPO, d, size, path=path)
                self.load_digests.append(d)
            path.unlink()
        idx = 1000
        for run_i in range(self.runs):
            for kind in ("berth", "dist-proxy"):
                idx += 1
                log(f"manifest latency run {run_i + 1}/{self.runs}: {kind}, alone then under "
                    f"{n} cold pulls")
                proc, port, _, px, base = self._fresh_mirror(kind, idx)
                ns = kind == "berth"
                paths = [manifest_path(TAG, ns=ns), manifest_path(self.manifest_digest, ns=ns)]
                try:
                    for p in paths:
                        st, _, body = get_small(port, p)
                        if st != 200 or body != self.manifest:
                            self.problems.append(f"manifest latency {kind}: priming {p}: HTTP {st}")
                    rec = {}
                    probe = Probe(port, paths)
                    time.sleep(self.args.probe_seconds)
                    rec["alone"] = latency_summary(probe.stop())
                    probe = Probe(port, paths)
                    time.sleep(0.2)
                    runs = [None] * n

                    def pull(i):
                        runs[i] = run_clients(port, blob_path(self.load_digests[i], ns=ns), 1)

                    threads = [threading.Thread(target=pull, args=(i,)) for i in range(n)]
                    t = time.perf_counter()
                    for th in threads:
                        th.start()
                    for th in threads:
                        th.join()
                    wall = time.perf_counter() - t
                    rec["loaded"] = latency_summary(probe.stop())
                    rec["loaded"]["pull_wall_s"] = wall
                    for i, r in enumerate(runs):
                        self.problems += check_clients(r, size, what=f"manifest latency {kind} pull {i}:")
                    for phase in ("alone", "loaded"):
                        v = rec[phase]
                        if v["errors"] or set(v["status"]) - {"200"}:
                            self.problems.append(f"manifest latency {kind} {phase}: statuses "
                                                 f"{v['status']}, errors {v['errors'][:3]}")
                    if kind == "berth":
                        self.problems += scan_berth_log(base / "berth.log", "manifest latency berth")
                    self.data["manifest_load"].setdefault(kind, []).append(rec)
                finally:
                    proc.stop()
                    shutil.rmtree(base, ignore_errors=True)

    # -- memory after load ------------------------------------------------------
    def memory_after(self):
        time.sleep(1.0)
        self.data["memory"]["idle_after"] = mem_status(self.berth.pid)
        self.problems += scan_berth_log(self.tmp / "berth-warm.log", "warm berth")

    # -- startup -------------------------------------------------------------
    def startup(self):
        n = self.args.startup_blobs
        cache = self.tmp / "startup-cache"
        log(f"creating {n:,} cached blobs for the start-up test")
        t = time.perf_counter()
        blobs = cache / "blobs" / "sha256"
        for sub in ("tmp", "manifests/sha256", "tags", "blobs/sha256"):
            (cache / sub).mkdir(parents=True, exist_ok=True)
        root = str(blobs)
        for i in range(256):
            os.mkdir(f"{root}/{i:02x}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for i in range(n):
            content = b"berth bench cached blob %d\n" % i
            hx = hashlib.sha256(content).hexdigest()
            fd = os.open(f"{root}/{hx[:2]}/{hx}", flags, 0o644)
            os.write(fd, content)
            os.close(fd)
        log(f"  created in {time.perf_counter() - t:.1f}s")
        empty = self.tmp / "startup-empty"
        runs = max(3, self.runs)
        for label, cdir in (("empty", empty), (f"{n}", cache)):
            for i in range(runs):
                cdir.mkdir(exist_ok=True)
                port = free_port()
                argv = [self.berth_bin, "serve", "--listen", f"127.0.0.1:{port}",
                        "--cache-dir", cdir, "--upstream", f"{NS}=http://127.0.0.1:{self.px_berth.port}",
                        "--cache-capacity", "20GiB"]
                t0 = time.perf_counter()
                proc = Proc("berth-startup", argv, self.tmp / f"startup-{label}-{i}.log")
                ready = None
                try:
                    deadline = t0 + 120
                    while time.perf_counter() < deadline:
                        if not proc.alive():
                            raise RuntimeError(f"berth exited during start-up:\n{proc.log_text()}")
                        try:
                            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                                s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                                resp = s.recv(64)
                            if resp.startswith(b"HTTP/1.1 200"):
                                ready = time.perf_counter() - t0
                                break
                        except OSError:
                            pass
                        time.sleep(0.002)
                    if ready is None:
                        self.problems.append(f"start-up with {label} blobs: no 200 on /v2/ in 120 s")
                    time.sleep(0.3)
                    mem = mem_status(proc.pid)
                    loaded = None
                    m = re.search(r"cache index loaded\s+blobs=(\d+)", proc.log_text(20000))
                    if m:
                        loaded = int(m.group(1))
                finally:
                    proc.stop()
                self.data["startup"].setdefault(label, []).append(
                    dict(ready_ms=ready * 1e3 if ready else None, mem=mem, indexed=loaded))
                log(f"  start-up ({label} blobs) run {i + 1}: "
                    f"{ready * 1e3 if ready else float('nan'):.0f} ms, indexed={loaded}")
        shutil.rmtree(cache, ignore_errors=True)

    def stop_all(self):
        for p in list(Proc.ALL)[::-1]:
            p.stop()
        for px in (getattr(self, "px_berth", None), getattr(self, "px_dist", None)):
            if px:
                px.close()


def parse_duration(s):
    m = re.fullmatch(r"(\d+)\s*(ms|s|m|h)?", s.strip())
    if not m:
        return 300.0
    return int(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def scan_berth_log(path, what):
    """WARN/ERROR lines berth logged (misbehaviour worth reporting)."""
    out = []
    level = re.compile(r"^\S+\s+(ERROR|WARN)\b|panicked")
    try:
        with open(path, "rb") as f:
            for raw in f:
                if b"ERROR" not in raw and b"WARN" not in raw and b"panicked" not in raw:
                    continue
                line = strip_ansi(raw.decode("utf-8", "replace")).strip()
                if level.search(line):
                    out.append(f"{what}: berth log: {line[:400]}")
                    if len(out) >= 5:
                        out.append(f"{what}: (more lines omitted)")
                        break
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------------
# report


def mib(b):
    return None if b is None else b / MiB


def render(suite, meta):
    d = suite.data
    size_label = f"{suite.args.size_mib} MiB" if suite.args.size_mib < 1024 else \
        f"{suite.args.size_mib / 1024:g} GiB"
    L = []
    w = L.append
    w("# berth benchmark: berth vs nginx vs distribution")
    w("")
    w(f"- command: `{meta['command']}`")
    w(f"- date: {meta['date']}; host: {meta['host']}")
    w(f"- versions: {meta['versions']}")
    w(f"- blob: {size_label} of random bytes ({suite.digest}); manifest: "
      f"{len(suite.manifest)} bytes; runs per scenario: {suite.runs}; wrk: "
      f"`-t2 -c64 -d{suite.args.wrk_seconds}s --latency`")
    w(f"- load average at start: {meta['loadavg_start']}; at end: {meta['loadavg_end']} "
      "(other work on the machine makes the numbers noisy)")
    w("- values are **median [min–max]** over runs; clients are python threads on raw sockets, "
      "on the same machine as the servers; CPU is the server's time on CPU summed over its "
      "threads from /proc/PID/task/TID/schedstat (nanoseconds; nginx: master + workers), memory "
      "is the peak of 50 ms samples of /proc/PID/status.")
    w("")
    targets = []

    # warm
    w(f"## Warm blob ({size_label}, cached / on local disk, page cache warm)")
    w("")
    w("| server | clients | throughput MiB/s | vs nginx | vs distribution | CPU s per GiB | "
      "CPU vs nginx | peak RSS MiB | peak RssAnon MiB | peak RssFile MiB | TTFB ms (median client) |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    warm_med = {}
    for n in (1, 8):
        for name in ("nginx", "distribution", "berth", "dist-proxy"):
            recs = d["warm"].get(f"{name}/{n}", [])
            warm_med[(name, n)] = dict(
                mib_s=med([r["mib_s"] for r in recs]),
                cpu=med([r["cpu_per_gib"] for r in recs]))
        for name in ("nginx", "distribution", "berth", "dist-proxy"):
            recs = d["warm"].get(f"{name}/{n}", [])
            wm = warm_med[(name, n)]
            w(f"| {name} | {n} | {fmt_runs([r['mib_s'] for r in recs])} | "
              f"{fmt_ratio(ratio(wm['mib_s'], warm_med[('nginx', n)]['mib_s']))} | "
              f"{fmt_ratio(ratio(wm['mib_s'], warm_med[('distribution', n)]['mib_s']))} | "
              f"{fmt_runs([r['cpu_per_gib'] for r in recs], 3)} | "
              f"{fmt_ratio(ratio(wm['cpu'], warm_med[('nginx', n)]['cpu']))} | "
              f"{fmt_runs([mib(r['peak']['VmRSS']) for r in recs], 1)} | "
              f"{fmt_runs([mib(r['peak']['RssAnon']) for r in recs], 1)} | "
              f"{fmt_runs([mib(r['peak']['RssFile']) for r in recs], 1)} | "
              f"{fmt_runs([med(r['ttfb_ms']) for r in recs], 1)} |")
        b = warm_med[("berth", n)]
        best = max(filter(None, [warm_med[("nginx", n)]["mib_s"], warm_med[("distribution", n)]["mib_s"]]),
                   default=None)
        r = ratio(b["mib_s"], best)
        targets.append((f"warm x{n}: berth throughput >= 0.9x the faster of nginx and distribution",
                        f"{fmt_ratio(r)} ({fmt_num(b['mib_s'])} vs {fmt_num(best)} MiB/s)",
                        None if r is None else r >= 0.9))
        r = ratio(b["cpu"], warm_med[("nginx", n)]["cpu"])
        targets.append((f"warm x{n}: berth CPU per GiB <= 1.2x nginx",
                        f"{fmt_ratio(r)} ({fmt_num(b['cpu'], 3)} vs "
                        f"{fmt_num(warm_med[('nginx', n)]['cpu'], 3)} s/GiB)",
                        None if r is None else r <= 1.2))
    w("")
    w("`dist-proxy` = distribution in proxy mode serving its cached copy. RssFile of berth is the "
      "mapped cache file (page cache pages it touched), not private memory.")
    w("")

    # cold
    w(f"## Cold blob ({size_label}, empty mirror cache each run; mirror -> origin direct, "
      "origin counted from its access log)")
    w("")
    w("| mirror | clients | wall s | delivered MiB/s | leader TTFB ms | follower TTFB spread ms "
      "(max−leader) | origin bytes / blob | origin blob GETs | server CPU s | peak RssAnon MiB | "
      "peak RssFile MiB |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cold_med = {}
    for n in (1, 8, 32):
        for kind in ("berth", "dist-proxy"):
            recs = d["cold"].get(f"{kind}/{n}", [])
            cold_med[(kind, n)] = dict(
                wall=med([r["wall_s"] for r in recs]),
                spread=med([r["spread_ms"] for r in recs]),
                spread_max=max([r["spread_ms"] for r in recs if r["spread_ms"] is not None], default=None),
                ratio=med([r["origin_ratio"] for r in recs]),
                ratio_max=max([r["origin_ratio"] for r in recs], default=None),
                gets_max=max([r["origin_blob_gets"] for r in recs], default=None),
                anon=med([mib(r["peak"]["RssAnon"]) for r in recs]))
            w(f"| {kind} | {n} | {fmt_runs([r['wall_s'] for r in recs], 2)} | "
              f"{fmt_runs([n * suite.size / MiB / r['wall_s'] if r['wall_s'] else None for r in recs])} | "
              f"{fmt_runs([r['leader_ms'] for r in recs], 1)} | "
              f"{fmt_runs([r['spread_ms'] for r in recs], 1) if n > 1 else '–'} | "
              f"{fmt_runs([r['origin_ratio'] for r in recs], 3)} | "
              f"{fmt_runs([r['origin_blob_gets'] for r in recs])} | "
              f"{fmt_runs([r['cpu_s'] for r in recs], 2)} | "
              f"{fmt_runs([mib(r['peak']['RssAnon']) for r in recs], 1)} | "
              f"{fmt_runs([mib(r['peak']['RssFile']) for r in recs], 1)} |")
    cv = d.get("cold_verify", {})
    if cv:
        w("")
        w("Content check (untimed, 8 simultaneous cold clients, every body hashed): " + "; ".join(
            f"{k}: {v['verified']}/{v['clients']} bodies with the right sha256, origin bytes "
            f"{v['origin_ratio']:.3f}x, {v['origin_blob_gets']} origin blob GET(s)" for k, v in cv.items()))
    w("")
    w("Cold runs have no hop between mirror and origin: each fresh mirror talks to the origin "
      "directly, and origin bytes (response bodies) and requests are read from the origin's own "
      "access log (lines logged before the run are skipped), once the log and the origin's I/O "
      "counters have been still for 0.5 s after the clients finished. distribution 2.8 in proxy mode sends every concurrent "
      "miss to the origin separately, and for the first one it fetches the blob a second time "
      "to store it (hence 2 GETs for 1 client); server CPU covers the clients' requests only.")
    w("")
    for n in (1, 8, 32):
        c = cold_med[("berth", n)]
        targets.append((f"cold x{n}: origin bytes = 1.0x the blob (berth)",
                        f"median {fmt_num(c['ratio'], 4)}x, worst run {fmt_num(c['ratio_max'], 4)}x, "
                        f"max {c['gets_max']} blob GET(s) per run",
                        None if c["ratio_max"] is None else (c["ratio_max"] < 1.001 and c["gets_max"] == 1)))
    c1, c8 = cold_med[("berth", 1)], cold_med[("berth", 8)]
    b1 = d["cold"].get("berth/1", [])
    walls1 = [x["wall_s"] for x in b1 if x["wall_s"] is not None]
    r = ratio(c1["wall"], cold_med[("dist-proxy", 1)]["wall"])
    targets.append(("cold x1: berth median wall <= 1.0x distribution proxy's (aim 0.8x)",
                    f"{fmt_ratio(r)} ({fmt_num(c1['wall'], 2)} s vs "
                    f"{fmt_num(cold_med[('dist-proxy', 1)]['wall'], 2)} s)",
                    None if r is None else r <= 1.0))
    r = ratio(max(walls1, default=None), c1["wall"])
    targets.append((f"cold x1: berth's slowest of {len(walls1)} runs <= 1.5x its median",
                    f"{fmt_ratio(r)} ({fmt_num(max(walls1, default=None), 2)} s)",
                    None if r is None else r <= 1.5))
    cpu_gib = med([x["cpu_s"] * GiB / suite.size for x in b1 if x["cpu_s"] is not None])
    targets.append(("cold x1: berth CPU per cold GiB <= 2.5 cpu-s", f"{fmt_num(cpu_gib, 2)} cpu-s",
                    None if cpu_gib is None else cpu_gib <= 2.5))
    r = ratio(c8["wall"], c1["wall"])
    targets.append(("cold: berth wall x8 <= 1.5x wall x1",
                    f"{fmt_ratio(r)} ({fmt_num(c8['wall'], 2)} s vs {fmt_num(c1['wall'], 2)} s; "
                    f"dist-proxy: {fmt_ratio(ratio(cold_med[('dist-proxy', 8)]['wall'], cold_med[('dist-proxy', 1)]['wall']))})",
                    None if r is None else r <= 1.5))
    for n in (8, 32):
        c = cold_med[("berth", n)]
        targets.append((f"cold x{n}: every follower's first byte within 50 ms of the leader's (berth)",
                        f"median spread {fmt_num(c['spread'], 1)} ms, worst run {fmt_num(c['spread_max'], 1)} ms",
                        None if c["spread_max"] is None else c["spread_max"] <= 50))

    # containerd
    cd = d.get("ctr") or {}
    if cd:
        ci = getattr(suite, "ctr_image", {})
        w(f"## containerd cold pull (image with one {suite.args.ctr_mib} MiB gzip layer; empty mirror, "
          "fresh containerd and namespace each run; mirror -> origin direct)")
        w("")
        w("| mirror | runs | pull wall s per run | wall s median [min–max] | mirror CPU s | "
          "containerd + ctr CPU s | origin bytes / layer |")
        w("|---|---:|---|---:|---:|---:|---:|")
        ctr_med = {}
        for kind in ("berth", "dist-proxy"):
            recs = cd.get(kind, [])
            walls = [r["wall_s"] for r in recs]
            ctr_med[kind] = med(walls)
            w(f"| {kind} | {len(recs)} | "
              f"{', '.join(fmt_num(x, 2) for x in walls)} | {fmt_runs(walls, 2)} | "
              f"{fmt_runs([r['cpu_s'] for r in recs], 2)} | "
              f"{fmt_runs([r['containerd_cpu_s'] + r['ctr_cpu_s'] for r in recs], 2)} | "
              f"{fmt_runs([r['origin_ratio'] for r in recs], 3)} |")
        r = ratio(ctr_med.get("berth"), ctr_med.get("dist-proxy"))
        w("")
        w(f"berth / distribution proxy, medians: **{fmt_ratio(r)}**.")
        w("")
        w(f"`ctr -n bench-N images pull --plain-http --hosts-dir DIR docker.io/{CTR_REPO}:{TAG}` "
          "against a private containerd (/usr/bin/containerd, no CRI, isolated content store, "
          "overlayfs snapshotter); `DIR/docker.io/hosts.toml` names a dead loopback port as "
          "`server` and the mirror as the only `[host]` (pull, resolve). Wall = the ctr process "
          "from spawn to exit (resolve, fetch, unpack). The layer is a tar of one random file, "
          f"gzip -1 ({fmt_num(ci.get('layer_size', 0) / MiB, 1)} MiB compressed). Each mirror logged "
          "its own 200 for the layer GET (checked). Order alternates between runs. Origin bytes "
          "come from the origin's access log; mirror CPU covers the pull only, not "
          "distribution-proxy's background copy after it.")
        w("")
        targets.append(("containerd cold pull median <= 1.0x distribution proxy",
                        f"{fmt_ratio(r)} ({fmt_num(ctr_med.get('berth'), 2)} s vs "
                        f"{fmt_num(ctr_med.get('dist-proxy'), 2)} s)",
                        None if r is None else r <= 1.0))

    # manifests
    w(f"## Cached manifest ({len(suite.manifest)} bytes), wrk -t2 -c64 -d{suite.args.wrk_seconds}s")
    w("")
    w("| server | by | req/s | vs nginx | p50 ms | p99 ms | server CPU µs/req | origin requests during run |")
    w("|---|---|---:|---:|---:|---:|---:|---:|")
    nginx_rps = med([r["rps"] for r in d["manifest"].get("nginx/530-byte file", [])])
    for key, recs in d["manifest"].items():
        name, by = key.split("/", 1)
        rps = med([r["rps"] for r in recs])
        origin = [r.get("origin_requests") for r in recs]
        w(f"| {name} | {by} | {fmt_runs([r['rps'] for r in recs])} | {fmt_ratio(ratio(rps, nginx_rps))} | "
          f"{fmt_runs([r['p50_ms'] for r in recs], 2)} | {fmt_runs([r['p99_ms'] for r in recs], 2)} | "
          f"{fmt_runs([r['cpu_s'] * 1e6 / r['requests'] if r['requests'] else None for r in recs], 1)} | "
          f"{fmt_runs(origin) if any(o is not None for o in origin) else '– (is the origin)'} |")
        if name == "berth":
            r = ratio(rps, nginx_rps)
            targets.append((f"manifest by {by}: berth req/s >= 0.6x nginx small file",
                            f"{fmt_ratio(r)} ({fmt_num(rps)} vs {fmt_num(nginx_rps)} req/s)",
                            None if r is None else r >= 0.6))
            total = sum(o or 0 for o in origin)
            targets.append((f"manifest by {by}: zero origin requests inside the tag TTL (berth)",
                            f"{total} origin request(s) over {len(recs)} run(s)", total == 0))
    w("")
    w("The tag TTL of berth is " + suite.args.tag_ttl + "; distribution in proxy mode asks the "
      "origin about a tag on every request.")
    w("")

    # manifest latency under cold load
    ml = d.get("manifest_load") or {}
    if ml:
        w(f"## Cached manifest latency while 8 cold pulls write and fsync")
        w("")
        w(f"A steady stream of cached-manifest GETs (one kept-alive connection by tag, one by digest, "
          f"a request every 2 ms each, from a separate process) against a fresh mirror: "
          f"{suite.args.probe_seconds:g} s alone, then while 8 clients pull 8 distinct "
          f"{suite.args.load_mib} MiB blobs cold through the same mirror (each downloaded, hashed, "
          f"written and fsynced).")
        w("")
        w("| mirror | phase | requests | p50 ms | p99 ms | p99.9 ms | max ms | pulls' wall s |")
        w("|---|---|---:|---:|---:|---:|---:|---:|")
        for kind, recs in ml.items():
            for phase in ("alone", "loaded"):
                rs = [r[phase] for r in recs]
                w(f"| {kind} | {'alone' if phase == 'alone' else 'during 8 cold pulls'} | "
                  f"{fmt_runs([r['requests'] for r in rs])} | {fmt_runs([r['p50_ms'] for r in rs], 2)} | "
                  f"{fmt_runs([r['p99_ms'] for r in rs], 2)} | {fmt_runs([r['p999_ms'] for r in rs], 2)} | "
                  f"{fmt_runs([r['max_ms'] for r in rs], 1)} | "
                  f"{fmt_runs([r.get('pull_wall_s') for r in rs], 2) if phase == 'loaded' else '–'} |")
        w("")
        recs = ml.get("berth", [])
        if recs:
            alone = med([r["alone"]["p99_ms"] for r in recs])
            loaded = med([r["loaded"]["p99_ms"] for r in recs])
            worst = max((r["loaded"]["p99_ms"] for r in recs if r["loaded"]["p99_ms"] is not None),
                        default=None)
            p50 = med([r["loaded"]["p50_ms"] for r in recs])
            targets.append(("cached manifest p50 while 8 cold pulls write and fsync (berth) <= 1 ms",
                            f"median {fmt_num(p50, 2)} ms (alone: "
                            f"{fmt_num(med([r['alone']['p50_ms'] for r in recs]), 2)} ms)",
                            None if p50 is None else p50 <= 1))
            targets.append(("cached manifest p99 while 8 cold pulls write and fsync (berth) <= 10 ms",
                            f"median {fmt_num(loaded, 2)} ms, worst run {fmt_num(worst, 2)} ms "
                            f"(alone: {fmt_num(alone, 2)} ms)",
                            None if worst is None else worst <= 10))

    # memory
    mem = d["memory"]
    w("## berth memory")
    w("")
    w("| when | VmRSS MiB | RssAnon MiB | RssFile MiB |")
    w("|---|---:|---:|---:|")
    idle = mem.get("idle_start")
    if idle:
        w(f"| idle after start (no request yet) | {mib(idle['VmRSS']):.1f} | {mib(idle['RssAnon']):.1f} | "
          f"{mib(idle['RssFile']):.1f} |")
    for label, key in (("warm, 8 clients (peak)", ("warm", "berth/8")),
                       ("cold, 8 clients (peak)", ("cold", "berth/8")),
                       ("cold, 32 clients (peak)", ("cold", "berth/32"))):
        recs = d[key[0]].get(key[1], [])
        if recs:
            w(f"| {label} | {fmt_runs([mib(r['peak']['VmRSS']) for r in recs], 1)} | "
              f"{fmt_runs([mib(r['peak']['RssAnon']) for r in recs], 1)} | "
              f"{fmt_runs([mib(r['peak']['RssFile']) for r in recs], 1)} |")
    after = mem.get("idle_after")
    if after:
        w(f"| idle after all warm and manifest runs | {mib(after['VmRSS']):.1f} | "
          f"{mib(after['RssAnon']):.1f} | {mib(after['RssFile']):.1f} |")
    others = mem.get("idle_others", {})
    if others:
        w("")
        w("Idle VmRSS of the others at the same moment: " + ", ".join(
            f"{k} {mib(v['VmRSS']):.1f} MiB (anon {mib(v['RssAnon']):.1f})" for k, v in others.items())
            + " (nginx: master + workers summed).")
    w("")
    if idle:
        targets.append(("idle: berth RSS <= 15 MiB", f"{mib(idle['VmRSS']):.1f} MiB VmRSS "
                        f"({mib(idle['RssAnon']):.1f} anon)", idle["VmRSS"] <= 15 * MiB))
    for label, key in (("warm", "berth/8"), ("cold", "berth/8")):
        recs = d["warm" if label == "warm" else "cold"].get(key, [])
        if recs:
            worst = max(r["peak"]["RssAnon"] for r in recs)
            targets.append((f"serving 8 x {size_label} ({label}): berth RssAnon <= 48 MiB",
                            f"worst run {mib(worst):.1f} MiB", worst <= 48 * MiB))

    # startup
    st = d["startup"]
    if st:
        w("## berth start-up (spawn → `GET /v2/` answers 200)")
        w("")
        w("| cached blobs | runs | time to 200 ms | indexed | VmRSS after start MiB | RssAnon MiB |")
        w("|---|---:|---:|---:|---:|---:|")
        for label, recs in st.items():
            w(f"| {label} | {len(recs)} | {fmt_runs([r['ready_ms'] for r in recs])} | "
              f"{recs[-1]['indexed'] if recs[-1]['indexed'] is not None else 'n/a'} | "
              f"{fmt_runs([mib(r['mem']['VmRSS']) if r['mem'] else None for r in recs], 1)} | "
              f"{fmt_runs([mib(r['mem']['RssAnon']) if r['mem'] else None for r in recs], 1)} |")
        w("")
        w("berth scans the cache and loads the whole index (`Cache::open` in `build_state`) "
          "**before** it binds the listener, so the time to the first 200 includes the full scan "
          "of `blobs/sha256/*/*`; until then connections are refused. Files are tiny and the "
          "dentry/inode caches are warm after they were just created (and after the first run).")
        w("")

    # targets
    w("## Targets")
    w("")
    w("| target | measured | result |")
    w("|---|---|---|")
    for t, v, ok in targets:
        w(f"| {t} | {v} | {verdict(ok)} |")
    w("")
    w("## Problems observed")
    w("")
    if suite.problems:
        for p in suite.problems:
            w(f"- {p}")
    else:
        w("- none: every response was 200 with the full length, hashed bodies matched, berth logged no WARN/ERROR.")
    for n in suite.notes:
        w(f"- note: {n}")
    ff = d.get("first_fetch")
    if ff:
        w("")
        w("First (cold, single) fetch that filled the warm mirrors: " + "; ".join(
            f"{k}: {v['wall_s']:.2f} s, origin {v['origin_bytes'] / suite.size:.3f}x, requests "
            f"{', '.join(v['origin_requests']) or 'none'}" for k, v in ff.items()))
    w("")
    return "\n".join(L), targets


# ---------------------------------------------------------------------------
# main


def versions(berth_bin, given):
    def out(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return "?"

    rev = out(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    wrk = " ".join(out(["wrk", "--version"]).split()[:2])
    origin = (f"binary given with --berth-bin: {berth_bin}" if given else
              f"release build of git {rev}{' + uncommitted changes' if dirty else ''}")
    return (f"{out([str(berth_bin), '--version'])} ({origin}), "
            f"{out(['nginx', '-v']).replace('nginx version: ', '')}, "
            f"{out([REGISTRY_BIN, '--version'])}, {wrk}, python {platform.python_version()}")


def host_info():
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / (1 << 20):.0f} GiB RAM"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {mem}, Linux {platform.release()}"


def loadavg():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=None, help="blob size in MiB (default 1024)")
    ap.add_argument("--runs", type=int, default=None, help="runs per scenario (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="validation run: 64 MiB blob, 1 run, 3 s wrk (about a minute)")
    ap.add_argument("--wrk-seconds", type=int, default=None, help="wrk duration (default 10, quick 3)")
    ap.add_argument("--tag-ttl", default="5m", help="berth --tag-ttl (default 5m)")
    ap.add_argument("--load-mib", type=int, default=None,
                    help="size of each of the 8 blobs pulled cold in the manifest-latency "
                         "scenario (default 256, quick 32)")
    ap.add_argument("--probe-seconds", type=float, default=None,
                    help="manifest latency measured alone for this long (default 10, quick 3)")
    ap.add_argument("--only", default=None,
                    help="comma-separated subset of: warm,manifests,load,cold,ctr,startup")
    ap.add_argument("--ctr-mib", type=int, default=None,
                    help="size of the single layer of the image containerd pulls cold in the "
                         "ctr scenario (default 512, quick 64)")
    ap.add_argument("--startup-blobs", type=int, default=100_000,
                    help="cached blobs for the start-up test (default 100000)")
    ap.add_argument("--berth-bin", help="use this berth binary instead of building one")
    ap.add_argument("--tmpdir", help="parent of the temporary directory (default: $TMPDIR or /tmp)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "latest.md"), help="report path")
    args = ap.parse_args()
    args.size_mib = args.size_mib or (64 if args.quick else 1024)
    args.runs = args.runs or (1 if args.quick else 3)
    args.wrk_seconds = args.wrk_seconds or (3 if args.quick else 10)
    args.load_mib = args.load_mib or (32 if args.quick else 256)
    args.probe_seconds = args.probe_seconds or (3 if args.quick else 10)
    args.ctr_mib = args.ctr_mib or (64 if args.quick else 512)
    everything = ["warm", "manifests", "load", "cold", "ctr", "startup"]
    args.only = args.only.split(",") if args.only else everything
    if set(args.only) - set(everything):
        raise SystemExit(f"--only: unknown scenario(s) {set(args.only) - set(everything)}")

    for tool in ("nginx", REGISTRY_BIN, "wrk"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    if not hasattr(os, "splice"):
        raise SystemExit("python >= 3.10 on Linux is required (os.splice)")

    berth_bin = build_berth(args)
    tmp = Path(tempfile.mkdtemp(prefix="berth-bench-", dir=args.tmpdir))
    os.chmod(tmp, 0o755)  # nginx workers may run as another user
    log(f"working in {tmp}")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    meta = dict(command="python3 benches/compare.py " + " ".join(sys.argv[1:]),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                host=host_info(), versions=versions(berth_bin, bool(args.berth_bin)), loadavg_start=loadavg())
    suite = Suite(args, berth_bin, tmp)
    status = 0
    try:
        suite.setup()
        if "warm" in args.only:
            suite.warm()
        if "manifests" in args.only:
            suite.manifests()
        suite.memory_after()
        if "load" in args.only:
            suite.manifest_under_load()
        if "cold" in args.only:
            suite.cold()
        if "ctr" in args.only:
            suite.ctr()
        if "startup" in args.only:
            suite.startup()
        meta["loadavg_end"] = loadavg()
        report, targets = render(suite, meta)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        out.with_suffix(".json").write_text(json.dumps(
            dict(meta=meta, args=vars(args), digest=suite.digest, data=suite.data,
                 problems=suite.problems, notes=suite.notes,
                 targets=[dict(target=t, measured=v, ok=ok) for t, v, ok in targets]),
            indent=1, default=str))
        print(report)
        log(f"report written to {out}")
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        status = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("stopping servers and deleting benchmark data")
        suite.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp.exists():
            log(f"WARNING: could not delete {tmp}")
    return status


if __name__ == "__main__":
    sys.exit(main())
