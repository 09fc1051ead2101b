#!/usr/bin/env python3
"""berth soak test: mixed load for a while, RSS and open fds must stay flat.

    python3 benches/soak.py [--minutes 5] [--interval 5] [--workers 6]
                            [--berth-bin PATH] [--no-ctr] [--keep]

Loopback only, python3 stdlib only. Starts, on 127.0.0.1 ephemeral ports and
inside one temporary directory (deleted at the end, also on error or Ctrl-C):

* a distribution registry (``docker-registry``): the origin;
* **berth** (release build; ``cargo build --release`` is run first and is a
  no-op when up to date; CARGO_TARGET_DIR is honoured; or ``--berth-bin``),
  mirroring ``docker.io`` from the origin with a 128 MiB cache (so the cold
  stream keeps evicting) and a 2 s tag TTL (so tags are revalidated upstream
  all the time);
* if containerd and ctr are installed and this runs as root, a private
  containerd (root, state and sockets in the temporary directory; proxies
  pointed at a dead port, as in tests/common/containerd.rs) whose ``ctr``
  pulls go through berth.

Load, all of it checked (status, and sha256 of every body):

* warm: cached blobs (whole and ``Range``), manifests by tag and by digest
  (GET and HEAD), tag lists, unknown blobs (404 expected);
* cold: a producer pushes a new 0.5-2 MiB blob to the origin every second;
  two clients fetch each one at the same moment (one upstream download
  streamed to both);
* ``ctr content fetch`` of the warm images into fresh namespaces, two at a
  time, every 15 s (when containerd is available).

Every ``--interval`` seconds it samples berth's RssAnon, RssFile, threads
and open file descriptors (``/proc/PID``) and the request and error counts,
and prints a row. At the end it prints the table and a verdict, and exits 1
if any error occurred, berth died, ``berth verify`` found a bad blob, or
RSS (RssAnon) or fds kept growing: the mean of the last third of the
samples (after a warm-up quarter) against the first third, allowing
max(8 MiB, 10 %) for RssAnon and 8 for fds. RssFile (mapped cache pages,
bounded by the cache capacity) is reported, not judged.

Processes are stopped by PID, never by name.
"""

import argparse
import hashlib
import http.client
import json
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from benchlib import (Containerd, Proc, build_berth, child_env, log, mirror_hosts,
                      start_with_port)

REGISTRY_BIN = "/usr/bin/docker-registry"
KiB, MiB = 1024, 1024 * 1024
NS = "docker.io"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = ",".join([
    OCI_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
# ---------------------------------------------------------------------------
# origin content


def push_blob(port, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", f"/v2/{repo}/blobs/uploads/", body=b"", headers={"Content-Length": "0"})
        r = conn.getresponse()
        r.read()
        if r.status != 202:
            raise RuntimeError(f"upload start: HTTP {r.status}")
        loc = urllib.parse.urlsplit(r.getheader("Location"))
        q = loc.query + ("&" if loc.query else "") + urllib.parse.urlencode({"digest": digest})
        conn.request("PUT", f"{loc.path}?{q}", body=data,
                     headers={"Content-Type": "application/octet-stream",
                              "Content-Length": str(len(data))})
        r = conn.getresponse()
        body = r.read()
        if r.status != 201:
            raise RuntimeError(f"upload of {digest}: HTTP {r.status}: {body[:200]!r}")
    finally:
        conn.close()
    return digest


def push_image(port, repo, tag, rng):
    """An OCI image of a config and 3 random layers; returns a description."""
    layers = []
    for _ in range(3):
        data = rng.randbytes(rng.randint(256 * KiB, 1 * MiB))
        layers.append((push_blob(port, repo, data), data))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_digest = push_blob(port, repo, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": len(b)} for d, b in layers],
    }).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("PUT", f"/v2/{repo}/manifests/{tag}", body=manifest,
                     headers={"Content-Type": OCI_MANIFEST})
        r = conn.getresponse()
        text = r.read()
        if r.status != 201:
            raise RuntimeError(f"manifest push: HTTP {r.status}: {text[:200]!r}")
    finally:
        conn.close()
    blobs = {d: b for d, b in layers}
    blobs[config_digest] = config
    return {
        "repo": repo, "tag": tag, "manifest": manifest,
        "manifest_digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
        "blobs": blobs,
    }


# ---------------------------------------------------------------------------
# load


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.cold = 0
        self.ctr_ok = 0
        self.ctr_failed = 0
        self.messages = []

    def ok(self, n=1):
        with self.lock:
            self.requests += n

    def error(self, msg):
        with self.lock:
            self.requests += 1
            self.errors += 1
            if len(self.messages) < 20:
                self.messages.append(msg)
        log(f"ERROR {msg}")


class Client:
    """One keep-alive HTTP/1.1 connection to berth, reopened after errors."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def request(self, method, path, headers=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            self.conn.request(method, path, headers=headers or {})
            r = self.conn.getresponse()
            body = r.read()
            return r.status, r, body
        except Exception:
            self.conn.close()
            self.conn = None
            raise

    def close(self):
        if self.conn is not None:
            self.conn.close()


def check(stats, what, status, body, want_status, want_bytes=None):
    if status != want_status:
        stats.error(f"{what}: HTTP {status} (wanted {want_status}): {body[:160]!r}")
    elif want_bytes is not None and body != want_bytes:
        stats.error(f"{what}: wrong body ({len(body)} bytes, wanted {len(want_bytes)})")
    else:
        stats.ok()


def warm_worker(port, images, stats, stop, seed):
    rng = random.Random(seed)
    c = Client(port)
    try:
        while not stop.is_set():
            img = rng.choice(images)
            repo, q = img["repo"], f"?ns={NS}"
            kind = rng.randrange(8)
            try:
                if kind <= 1:
                    d, data = rng.choice(list(img["blobs"].items()))
                    st, _, body = c.request("GET", f"/v2/{repo}/blobs/{d}{q}")
                    check(stats, f"blob {d[:19]}", st, body, 200, data)
                elif kind == 2:
                    d, data = rng.choice(list(img["blobs"].items()))
                    a = rng.randrange(len(data))
                    st, _, body = c.request("GET", f"/v2/{repo}/blobs/{d}{q}",
                                            {"Range": f"bytes={a}-"})
                    check(stats, f"range {d[:19]} {a}-", st, body, 206, data[a:])
                elif kind == 3:
                    st, _, body = c.request("GET", f"/v2/{repo}/manifests/{img['tag']}{q}",
                                            {"Accept": ACCEPT})
                    check(stats, f"manifest {repo}:{img['tag']}", st, body, 200, img["manifest"])
                elif kind == 4:
                    st, _, body = c.request("GET", f"/v2/{repo}/manifests/{img['manifest_digest']}{q}",
                                            {"Accept": ACCEPT})
                    check(stats, f"manifest {repo}@digest", st, body, 200, img["manifest"])
                elif kind == 5:
                    st, r, body = c.request("HEAD", f"/v2/{repo}/manifests/{img['tag']}{q}",
                                            {"Accept": ACCEPT})
                    if st == 200 and r.getheader("Docker-Content-Digest") != img["manifest_digest"]:
                        stats.error(f"HEAD {repo}:{img['tag']}: digest {r.getheader('Docker-Content-Digest')}")
                    else:
                        check(stats, f"HEAD {repo}:{img['tag']}", st, body, 200)
                elif kind == 6:
                    st, _, body = c.request("GET", f"/v2/{repo}/tags/list{q}")
                    if st == 200 and img["tag"] in json.loads(body or b"{}").get("tags", []):
                        stats.ok()
                    else:
                        stats.error(f"tags {repo}: HTTP {st}: {body[:160]!r}")
                else:
                    d = "sha256:" + hashlib.sha256(rng.randbytes(16)).hexdigest()
                    st, _, body = c.request("GET", f"/v2/{repo}/blobs/{d}{q}")
                    check(stats, "unknown blob", st, body, 404)
            except Exception as e:  # connection reset, timeout, bad JSON
                stats.error(f"warm request: {type(e).__name__}: {e}")
            time.sleep(0.002)
    finally:
        c.close()


def cold_producer(origin_port, fetchers, stats, stop, seed):
    """Push a new blob every second; hand it to every cold fetcher at once."""
    rng = random.Random(seed)
    while not stop.wait(1.0):
        data = rng.randbytes(rng.randint(512 * KiB, 2 * MiB))
        try:
            d = push_blob(origin_port, "library/cold", data)
        except Exception as e:
            log(f"cold producer: {e}")
            continue
        barrier = threading.Barrier(len(fetchers))
        for q in fetchers:
            q.put((d, data, barrier))


def cold_fetcher(port, inbox, stats, stop):
    c = Client(port)
    try:
        while not stop.is_set():
            try:
                d, data, barrier = inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                barrier.wait(10)
            except threading.BrokenBarrierError:
                pass
            try:
                st, _, body = c.request("GET", f"/v2/library/cold/blobs/{d}?ns={NS}")
                check(stats, f"cold blob {d[:19]}", st, body, 200, data)
                with stats.lock:
                    stats.cold += 1
            except Exception as e:
                stats.error(f"cold request: {type(e).__name__}: {e}")
    finally:
        c.close()


def ctr_worker(ctd, hosts_dir, images, stats, stop):
    n = 0
    while not stop.wait(15.0):
        threads, results = [], {}
        for img in random.sample(images, k=min(2, len(images))):
            n += 1
            ns = f"soak{n}"
            ref = f"{NS}/{img['repo']}:{img['tag']}"

            def pull(ns=ns, ref=ref):
                r = ctd.ctr(["content", "fetch", "--hosts-dir", str(hosts_dir), ref], ns)
                results[ns] = r
            threads.append(threading.Thread(target=pull))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for ns, r in results.items():
            with stats.lock:
                if r.returncode == 0:
                    stats.ctr_ok += 1
                else:
                    stats.ctr_failed += 1
            if r.returncode != 0:
                stats.error(f"ctr content fetch in {ns}: {r.returncode}: {r.stderr[-300:]}")
            # Drop what the namespace holds; containerd's GC reclaims it.
            listing = ctd.ctr(["content", "ls", "-q"], ns, timeout=30)
            digests = listing.stdout.split()
            if digests:
                ctd.ctr(["content", "rm"] + digests, ns, timeout=30)


# ---------------------------------------------------------------------------
# sampling and verdict


def proc_sample(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * KiB
            elif k == "Threads":
                out[k] = int(v)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def trend(values):
    """(mean of the first third, mean of the last third) after a warm-up quarter."""
    vals = values[len(values) // 4:]
    if len(vals) < 3:
        return None
    third = max(1, len(vals) // 3)
    return statistics.mean(vals[:third]), statistics.mean(vals[-third:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="how long to run the load (default 5)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    ap.add_argument("--workers", type=int, default=6, help="warm-load client threads (default 6)")
    ap.add_argument("--berth-bin", help="use this berth binary instead of building one")
    ap.add_argument("--no-ctr", action="store_true", help="do not run ctr pulls")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (for debugging)")
    args = ap.parse_args()
    if not Path(REGISTRY_BIN).exists():
        raise SystemExit(f"{REGISTRY_BIN} not found (Debian package docker-registry)")
    berth_bin = build_berth(args)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    base = Path(tempfile.mkdtemp(prefix="berth-soak-"))
    stop = threading.Event()
    threads = []
    ctd = None
    failures = []
    samples = []
    stats = Stats()
    try:
        log(f"working in {base}")
        (base / "origin" / "storage").mkdir(parents=True)

        def origin_argv(port):
            cfg = base / "origin" / "config.yml"
            cfg.write_text(f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {base / 'origin' / 'storage'}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: berth-soak-secret
health:
  storagedriver:
    enabled: false
""")
            return [REGISTRY_BIN, "serve", cfg]
        origin, origin_port = start_with_port("origin", origin_argv, base / "origin.log", cwd=base)
        cache = base / "cache"

        def berth_argv(port):
            return [berth_bin, "serve", "--listen", f"127.0.0.1:{port}", "--cache-dir", cache,
                    "--upstream", f"{NS}=http://127.0.0.1:{origin_port}",
                    "--cache-capacity", "128MiB", "--tag-ttl", "2s"]
        berth, port = start_with_port("berth", berth_argv, base / "berth.log")
        log(f"origin on {origin_port}, berth on {port} (pid {berth.pid}, {berth_bin})")

        rng = random.Random(20261125)
        images = [push_image(origin_port, f"library/soak-{i}", "1", rng) for i in range(4)]
        log(f"pushed {len(images)} images")

        use_ctr = not args.no_ctr and shutil.which("containerd") and shutil.which("ctr") \
            and os.geteuid() == 0
        if use_ctr:
            ctd = Containerd(base / "ctd", level="warn")
            ctd_hosts = mirror_hosts(base / "ctd" / "hosts", NS, port)
            log("private containerd started; ctr pulls every 15 s")
        elif not args.no_ctr:
            log("containerd/ctr not available (or not root): no ctr pulls")

        for i in range(args.workers):
            threads.append(threading.Thread(target=warm_worker,
                                            args=(port, images, stats, stop, i), daemon=True))
        inboxes = [queue.Queue() for _ in range(2)]
        threads.append(threading.Thread(target=cold_producer,
                                        args=(origin_port, inboxes, stats, stop, 7), daemon=True))
        for q in inboxes:
            threads.append(threading.Thread(target=cold_fetcher, args=(port, q, stats, stop),
                                            daemon=True))
        if ctd:
            threads.append(threading.Thread(target=ctr_worker, args=(ctd, ctd_hosts, images, stats, stop),
                                            daemon=True))
        for t in threads:
            t.start()

        header = (f"{'t(s)':>6} {'RssAnon MiB':>11} {'RssFile MiB':>11} {'threads':>7} "
                  f"{'fds':>5} {'requests':>9} {'errors':>6} {'cold':>5} {'ctr ok/fail':>11}")
        log(header)
        end = time.monotonic() + args.minutes * 60
        t0 = time.monotonic()
        while time.monotonic() < end:
            time.sleep(min(args.interval, max(0.0, end - time.monotonic())))
            if not berth.alive():
                failures.append(f"berth exited:\n{berth.log_text()}")
                break
            s = proc_sample(berth.pid)
            with stats.lock:
                s.update(t=time.monotonic() - t0, requests=stats.requests, errors=stats.errors,
                         cold=stats.cold, ctr=f"{stats.ctr_ok}/{stats.ctr_failed}")
            samples.append(s)
            log(f"{s['t']:6.0f} {s['RssAnon'] / MiB:11.1f} {s['RssFile'] / MiB:11.1f} "
                f"{s['Threads']:7d} {s['fds']:5d} {s['requests']:9d} {s['errors']:6d} "
                f"{s['cold']:5d} {s['ctr']:>11}")
        stop.set()
        for t in threads:
            t.join(60)

        # Verdict.
        if stats.errors:
            failures.append(f"{stats.errors} error(s), e.g.: " + "; ".join(stats.messages[:5]))
        anon = trend([s["RssAnon"] for s in samples])
        fds = trend([s["fds"] for s in samples])
        if anon:
            a0, a1 = anon
            if a1 - a0 > max(8 * MiB, 0.10 * a0):
                failures.append(f"RssAnon kept growing: {a0 / MiB:.1f} -> {a1 / MiB:.1f} MiB")
        else:
            failures.append("too few samples for a trend (run longer or sample more often)")
        if fds:
            f0, f1 = fds
            if f1 - f0 > 8:
                failures.append(f"open fds kept growing: {f0:.1f} -> {f1:.1f}")
        if berth.alive():
            berth.stop()
            r = subprocess.run([berth_bin, "verify", "--cache-dir", cache], capture_output=True,
                               text=True, env=child_env({"RUST_LOG": "warn"}), timeout=600)
            summary = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
            log(f"berth verify: {summary}")
            if r.returncode != 0:
                failures.append(f"berth verify failed: {r.stdout[-500:]}{r.stderr[-500:]}")

        # Report.
        print()
        print(f"berth soak: {args.minutes:g} min, {args.workers} warm workers, 2 cold fetchers, "
              f"ctr pulls {'on' if ctd else 'off'}; berth {berth_bin}")
        print()
        print("| t (s) | RssAnon (MiB) | RssFile (MiB) | threads | open fds | requests | errors | cold blobs | ctr ok/failed |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in samples:
            print(f"| {s['t']:.0f} | {s['RssAnon'] / MiB:.1f} | {s['RssFile'] / MiB:.1f} | "
                  f"{s['Threads']} | {s['fds']} | {s['requests']} | {s['errors']} | "
                  f"{s['cold']} | {s['ctr']} |")
        print()
        if anon:
            print(f"RssAnon: first third {anon[0] / MiB:.1f} MiB, last third {anon[1] / MiB:.1f} MiB "
                  f"(after a warm-up quarter)")
        if fds:
            print(f"open fds: first third {fds[0]:.1f}, last third {fds[1]:.1f}")
        if samples:
            dur = samples[-1]["t"]
            print(f"{samples[-1]['requests']} requests in {dur:.0f} s "
                  f"({samples[-1]['requests'] / max(dur, 1):.0f}/s), {stats.cold} cold blob fetches, "
                  f"{stats.ctr_ok} ctr pulls ok, {stats.errors} errors")
        if failures:
            print("\nFAIL:\n- " + "\n- ".join(failures))
            return 1
        print("\nPASS: RSS and open fds flat, no errors")
        return 0
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); cleaning up")
        return 130
    finally:
        stop.set()
        if ctd:
            ctd.stop()
        for p in list(Proc.ALL):
            p.stop(5)
        if args.keep:
            log(f"kept {base}")
        else:
            # containerd may leave read-only or mounted bits; best effort.
            shutil.rmtree(base, ignore_errors=True)
            log(f"removed {base}")


if __name__ == "__main__":
    sys.exit(main())
