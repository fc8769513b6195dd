#!/usr/bin/env python3
"""Core benchmark: pyvol next to Docker's local driver, and pyvol at scale.

Run as root on a machine with the plugin enabled as ``pyvol`` (``make install``) and the
``pyvol-test/busybox`` image (``scripts/provision.sh``):

    python3 bench/core_bench.py [--cycles 20] [--volumes 10000] [--skip-docker]

1. control plane: N x (volume create + docker run --rm -v vol:/d busybox true + volume rm),
   -d pyvol vs -d local;
2. data path inside a container: 1 GiB sequential write (fsync'd) and read, and 20,000
   small-file creates, on a pyvol volume vs a local volume;
3. protocol latency: p50/p99 of Get and of Mount+Unmount pairs with 1 and 32 concurrent
   clients on the socket of a `pyvol serve` started here (same code as the plugin, with a
   mount root so Mount really bind-mounts);
4. scale: Create/Get/List latency with 10 and with 10,000 volumes (same server).

Prints a table of ratios. Targets (issue #2): data path >= 0.97x local; control plane
<= 1.3x local; Get p99 < 5 ms at 32 clients; Get and Create with 10,000 volumes within 1.5x
of 10.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from multiprocessing import Pool
from pathlib import Path

IMAGE = "pyvol-test/busybox"
ACCEPT = {"Accept": "application/vnd.docker.plugins.v1.2+json"}


def sh(*args: str, timeout: float = 600) -> str:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


# -- 1 and 2: through dockerd ------------------------------------------------------------


def cycle(driver: str) -> float:
    name = f"bench-cp-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    sh("docker", "volume", "create", "-d", driver, name)
    sh("docker", "run", "--rm", "-v", f"{name}:/d", IMAGE, "true")
    sh("docker", "volume", "rm", name)
    return time.perf_counter() - started


def control_plane(cycles: int) -> dict[str, float]:
    """Median seconds per cycle; the drivers alternate so load drifts hit both alike."""
    times: dict[str, list[float]] = {"pyvol": [], "local": []}
    for _ in range(cycles):
        for driver in times:
            times[driver].append(cycle(driver))
    return {driver: statistics.median(t) for driver, t in times.items()}


DATA_SCRIPT = {
    "seq write 1 GiB": "dd if=/dev/zero of=/d/big bs=1M count=1024 conv=fsync 2>/dev/null",
    "seq read 1 GiB": "echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; "
                      "dd if=/d/big of=/dev/null bs=1M 2>/dev/null",
    "20k small files": "mkdir /d/s && cd /d/s && i=0; while [ $i -lt 20000 ]; do "
                       "echo x > f$i; i=$((i+1)); done; sync",
}


def data_run(driver: str) -> dict[str, float]:
    name = f"bench-dp-{uuid.uuid4().hex[:8]}"
    sh("docker", "volume", "create", "-d", driver, name)
    results = {}
    try:
        cid = sh("docker", "run", "-d", "-v", f"{name}:/d", IMAGE, "sleep", "3600").strip()
        try:
            for label, script in DATA_SCRIPT.items():
                started = time.perf_counter()
                sh("docker", "exec", cid, "sh", "-c", script)
                results[label] = time.perf_counter() - started
        finally:
            sh("docker", "rm", "-f", cid)
    finally:
        sh("docker", "volume", "rm", name)
    return results


def data_path(rounds: int) -> dict[str, dict[str, float]]:
    """Best of ``rounds`` per measure; the drivers alternate within each round."""
    runs: dict[str, list[dict[str, float]]] = {"local": [], "pyvol": []}
    for index in range(rounds):
        for driver in (("local", "pyvol") if index % 2 == 0 else ("pyvol", "local")):
            runs[driver].append(data_run(driver))
    return {d: {label: min(r[label] for r in rs) for label in DATA_SCRIPT}
            for d, rs in runs.items()}


# -- 3 and 4: on the socket ------------------------------------------------------------------


class Conn:
    """One keep-alive connection, as dockerd's HTTP client keeps."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: http.client.HTTPConnection | None = None

    def call(self, endpoint: str, body: dict[str, object]) -> dict[str, object]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("plugin.moby.localhost", timeout=60)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.path)
                self.conn.sock = sock
            try:
                self.conn.request("POST", "/" + endpoint, json.dumps(body) + "\n", ACCEPT)
                answer = json.loads(self.conn.getresponse().read())
                if answer.get("Err"):
                    raise RuntimeError(f"{endpoint}: {answer['Err']}")
                return answer
            except (http.client.HTTPException, OSError):
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _worker(args: tuple[str, str, int, int, float]) -> list[float]:
    path, kind, clients, worker, seconds = args
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        conn = Conn(path)
        name = f"lat-{index % 10}"
        mine: list[float] = []
        n = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            if kind == "get":
                conn.call("VolumeDriver.Get", {"Name": name})
            else:
                mount_id = f"{worker}-{index}-{n}"
                conn.call("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
                conn.call("VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
            mine.append(time.perf_counter() - started)
            n += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(worker * 1000 + i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def latency(path: str, kind: str, clients: int, seconds: float = 5.0) -> tuple[float, float, int]:
    procs = 1 if clients == 1 else 2
    with Pool(procs) as pool:
        parts = pool.map(_worker, [(path, kind, clients // procs, w, seconds)
                                   for w in range(procs)])
    samples = sorted(x for part in parts for x in part)
    p50 = samples[len(samples) // 2]
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return p50 * 1000, p99 * 1000, len(samples)


def timed(conn: Conn, endpoint: str, bodies: list[dict[str, object]]) -> float:
    """Median latency in ms of one call per body."""
    times = []
    for body in bodies:
        started = time.perf_counter()
        conn.call(endpoint, body)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def scale(path: str, total: int) -> dict[int, dict[str, float]]:
    conn = Conn(path)
    results: dict[int, dict[str, float]] = {}
    have = 10  # lat-0..lat-9 exist
    for target in (10, total):
        while have < target:
            conn.call("VolumeDriver.Create", {"Name": f"fill-{have}", "Opts": None})
            have += 1
        probe = [f"probe-{target}-{i}" for i in range(200)]
        results[target] = {
            "Create": timed(conn, "VolumeDriver.Create",
                            [{"Name": n, "Opts": None} for n in probe]),
            "Get": timed(conn, "VolumeDriver.Get", [{"Name": n} for n in probe * 3]),
            "List": timed(conn, "VolumeDriver.List", [{}] * 5),
        }
        for n in probe:
            conn.call("VolumeDriver.Remove", {"Name": n})
    return results


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    sock = tmp / "pyvol.sock"
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "serve", "--socket", str(sock), "--root",
         str(tmp / "root"), "--mount-root", str(tmp / "mnt")],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"))  # noqa: SIM115
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    conn = Conn(str(sock))
    for i in range(10):
        conn.call("VolumeDriver.Create", {"Name": f"lat-{i}", "Opts": None})
    return proc, str(sock)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--volumes", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3, help="data-path repetitions (best of)")
    ap.add_argument("--skip-docker", action="store_true")
    args = ap.parse_args()
    rows: list[tuple[str, str, str, str, str]] = []

    if not args.skip_docker:
        sh("docker", "plugin", "inspect", "pyvol")
        control_plane(1)  # warm up both paths
        cp = control_plane(args.cycles)
        rows.append(("control plane, s/cycle", f"{cp['pyvol']:.3f}", f"{cp['local']:.3f}",
                     f"{cp['pyvol'] / cp['local']:.2f}x time", "<= 1.3x"))
        dp = data_path(args.rounds)
        for label in DATA_SCRIPT:
            speed = dp["local"][label] / dp["pyvol"][label]
            rows.append((f"data: {label}, s", f"{dp['pyvol'][label]:.2f}",
                         f"{dp['local'][label]:.2f}", f"{speed:.2f}x speed", ">= 0.97x"))

    tmp = Path(tempfile.mkdtemp(prefix="pyvol-bench-"))
    proc, path = start_server(tmp)
    try:
        for kind in ("get", "mount+unmount"):
            for clients in (1, 32):
                p50, p99, n = latency(path, "get" if kind == "get" else "mount", clients)
                rows.append((f"{kind} x{clients} clients p50/p99 ms", f"{p50:.2f}/{p99:.2f}",
                             "", f"n={n}", "p99 < 5 ms" if kind == "get" and clients == 32
                             else ""))
        sc = scale(path, args.volumes)
        for op in ("Create", "Get", "List"):
            small, big = sc[10][op], sc[args.volumes][op]
            rows.append((f"{op} ms at 10 / {args.volumes} vols", f"{small:.2f} / {big:.2f}", "",
                         f"{big / small:.2f}x", "<= 1.5x" if op != "List" else ""))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        for mnt in (tmp / "mnt").glob("*"):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    widths = [max(len(r[i]) for r in [*rows, ("measure", "pyvol", "local", "ratio", "target")])
              for i in range(5)]
    for row in [("measure", "pyvol", "local", "ratio", "target"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
