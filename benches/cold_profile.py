"""Profile one cold pull: a distribution origin, a fresh mirror talking to it
directly (no hop), and one client; a fresh 1 GiB blob per run.

  python3 benches/cold_profile.py target/release/berth 3                # curl -o /dev/null: wall, CPU
  python3 benches/cold_profile.py x 3 --dist                            # distribution in proxy mode instead
  python3 benches/cold_profile.py target/release/berth 2 --timeline     # when the client and the
        # download file crossed each 128 MiB (Python recv_into client; file size sampled every 10 ms)
  python3 benches/cold_profile.py target/release/berth 1 --strace       # strace -c -f of the mirror
  python3 benches/cold_profile.py target/release/berth 1 --perf         # perf record -g of the mirror

Output (strace/perf data) stays in /tmp/coldprof until the next run. Used for
the cold-path profile in BENCHMARKS.md; compare.py is the benchmark.
--threads adds CPU per thread name (all tokio threads share one name)."""
import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402 - the benchmark's helpers, beside this file

ap = argparse.ArgumentParser()
ap.add_argument("bin"); ap.add_argument("runs", type=int)
ap.add_argument("--dist", action="store_true"); ap.add_argument("--strace", action="store_true")
ap.add_argument("--perf", action="store_true"); ap.add_argument("--size-mib", type=int, default=1024)
ap.add_argument("--threads", action="store_true")
ap.add_argument("--timeline", action="store_true")
a = ap.parse_args()
tmp = pathlib.Path("/tmp/coldprof"); shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir()
origin, oport = C.start_registry("origin", tmp / "origin")
size = a.size_mib * C.MiB
def cpu(pids):
    t = 0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            t += int(f[11]) + int(f[12])
        except OSError: pass
    return t / os.sysconf("SC_CLK_TCK")
def threads(pid):
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
            out[comm] = out.get(comm, 0) + (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except OSError: pass
    return out
try:
    res = []
    for i in range(a.runs):
        blob = tmp / "blob"
        d = C.make_blob(blob, size); C.push_blob(oport, C.REPO, d, size, path=blob); blob.unlink()
        base = tmp / f"m{i}"
        if a.dist:
            proc, port = C.start_registry("dist-proxy", base, f"http://127.0.0.1:{oport}")
            path = C.blob_path(d)
        else:
            proc, port = C.start_berth(a.bin, base / "cache", base / "berth.log", oport, "5m")
            path = C.blob_path(d, ns=True)
        pid = proc.pids()[0]
        side = None
        if a.strace:
            side = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(tmp / f"strace{i}.txt")])
        if a.perf:
            side = subprocess.Popen(["perf", "record", "-g", "-o", str(tmp / f"perf{i}.data"), "-p", str(pid)], stderr=subprocess.DEVNULL)
        if side: time.sleep(1)
        c0, o0 = cpu(proc.pids()), cpu(origin.pids())
        fmarks = []
        if a.timeline:
            import threading
            stop = []
            def watch():
                nxt = 0
                while not stop:
                    tot = 0
                    for r, ds, fs in os.walk(base / "cache"):
                        for f in fs:
                            try: tot += os.stat(os.path.join(r, f)).st_size
                            except OSError: pass
                    if tot >= nxt:
                        fmarks.append(f"{tot>>20}M@{time.perf_counter()-t0:.2f}"); nxt += 128 << 20
                    time.sleep(0.01)
            wt = threading.Thread(target=watch); wt.start()
        t0 = time.perf_counter()
        if a.timeline:
            import socket
            s = socket.create_connection(("127.0.0.1", port)); s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            buf = bytearray(1 << 20); mv = memoryview(buf); got = 0; marks = []; nxt = 0
            while True:
                k = s.recv_into(mv)
                if k == 0: break
                got += k
                if got >= nxt:
                    marks.append(f"{got>>20}M@{time.perf_counter()-t0:.2f}"); nxt += 128 << 20
            marks.append(f"end {got>>20}M@{time.perf_counter()-t0:.2f}")
            out = " ".join(marks)
        else:
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_starttransfer}",
                              f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True).stdout
        wall = time.perf_counter() - t0
        if a.timeline:
            stop.append(1); wt.join(); out += " | file " + " ".join(fmarks)
        time.sleep(0.3)
        c1, o1 = cpu(proc.pids()), cpu(origin.pids())
        th = threads(pid) if a.threads else {}
        if side:
            side.send_signal(2); side.wait()
        proc.stop()
        print(f"run {i}: wall {wall:.2f}s curl [{out}] mirror cpu {c1-c0:.2f}s origin cpu {o1-o0:.2f}s {th}", flush=True)
        res.append(wall)
        shutil.rmtree(base, ignore_errors=True)
    res.sort(); print("median", res[len(res)//2], "max", res[-1])
finally:
    origin.stop()
