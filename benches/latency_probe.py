#!/usr/bin/env python3
"""Latency probe (python3 stdlib only), run by benches/compare.py in its own
process so that the benchmark's client threads do not hold its GIL.

    python3 benches/latency_probe.py PORT PATH [PATH ...] [--interval-ms 2]

One thread per PATH sends ``GET PATH`` on a kept-alive HTTP/1.1 connection,
reads the whole response, sleeps ``--interval-ms`` and repeats: a steady,
light request stream such as kubelets and containerd resolving images while
pulls run, not a saturating load (wrk measures throughput). It stops when
its stdin closes (or after ``--seconds``) and prints one JSON object: every
request's latency in milliseconds, the statuses seen and any errors.
"""

import argparse
import json
import socket
import sys
import threading
import time


def read_response(s, buf):
    """Read one HTTP/1.1 response with a Content-Length; returns the status
    and the leftover bytes (none are expected: one request in flight)."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed before headers")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the body")
        rest += chunk
    return status, rest[length:]


def worker(port, path, interval, stop, out):
    req = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: berth-probe\r\n"
           "Accept: application/vnd.oci.image.manifest.v1+json\r\n\r\n").encode()
    s = None
    buf = b""
    while not stop.is_set():
        try:
            if s is None:
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = b""
            t = time.perf_counter()
            s.sendall(req)
            status, buf = read_response(s, buf)
            out["ms"].append((time.perf_counter() - t) * 1e3)
            out["status"][status] = out["status"].get(status, 0) + 1
        except (OSError, ValueError) as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
            if s:
                s.close()
            s = None
        stop.wait(interval)
    if s:
        s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--interval-ms", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=600.0)
    args = ap.parse_args()
    stop = threading.Event()
    outs = [dict(ms=[], status={}, errors=[]) for _ in args.paths]
    threads = [threading.Thread(target=worker, args=(args.port, p, args.interval_ms / 1e3, stop, o),
                                daemon=True) for p, o in zip(args.paths, outs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    print("ready", flush=True)
    # Stop on EOF of stdin, or after --seconds.
    waiter = threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True)
    waiter.start()
    stop.wait(args.seconds)
    stop.set()
    for t in threads:
        t.join(timeout=35)
    status = {}
    for o in outs:
        for k, v in o["status"].items():
            status[str(k)] = status.get(str(k), 0) + v
    json.dump(dict(ms=[x for o in outs for x in o["ms"]], status=status,
                   errors=[e for o in outs for e in o["errors"]][:20],
                   seconds=time.perf_counter() - t0), sys.stdout)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
