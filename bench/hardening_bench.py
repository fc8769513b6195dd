"""Hardening benchmark: control-plane latency under background work, and restore memory.

Not a test: it prints two markdown tables and asserts nothing about time.  Needs root (Mount
bind-mounts under a mount root) and the dev virtualenv (moto).  Run from the repository root::

    python bench/hardening_bench.py              # 30 s windows, a 10 GiB restore
    python bench/hardening_bench.py --quick      # 10 s windows, a 1 GiB restore
    python bench/hardening_bench.py --parts a    # only part A (or: --parts b)

Everything runs against the real server (``python -m plugin.cli serve``, one gunicorn worker,
product settings) on a unix socket, with S3 on a moto server of its own per part.

A. Control plane under load (issue #7, target: p99 < 50 ms under load).  One client on one
   keep-alive connection, as dockerd keeps it, calls Get, then Mount+Unmount pairs (Mount
   bind-mounts), of an otherwise idle volume for ``--window`` seconds each: first on an idle
   plugin, then while on OTHER volumes, for the whole loaded window,
   - snapshots of a volume of 10,000 files (4 KiB random each, 100 directories) run back to
     back (``pyvol/snapshot/create``; before each, every file's mtime is touched so nothing
     is reused; then ``pyvol/snapshot/remove`` of the previous one: the table counts and
     times create + remove as one snapshot operation), and
   - 1 GiB S3 pushes run back to back (``pyvol/sync/push`` on a volume with
     ``s3_sync=manual``; once a push uploads from its snapshot (Status ``syncing``), the
     volume's file is rewritten with fresh random, incompressible bytes for the next push, so
     nothing deduplicates and the next push starts when this one ends; Status is polled on
     ``pyvol/sync/status`` every 0.25 s).  Those 1 GiB writes are part of the load on the
     disk, as a busy container's would be.
   The load is driven by a child process of its own, so its Python work does not stall the
   measuring client.  The table shows p50/p99 idle and loaded, the p99 ratio, and how many
   background operations completed inside the loaded window.

B. Restore memory (issue #7, target: RSS growth < 256 MiB for a 10 GiB file).  A volume holding
   one file of ``--size-gib`` GiB (10; 1 with --quick) is pushed from one server, which is
   then stopped; a second server (another host) creates a volume with the same bucket and
   prefix and ``s3_restore=latest``, which restores at create.  The gunicorn worker's VmRSS is
   sampled every 50 ms and its VmHWM read at the end; growth is peak minus the RSS just before
   Create.  The restored file is compared with the source by SHA-256, and the restore's
   throughput (file bytes / seconds from Create until Status shows it idle) is reported.
   Content: fixed 128-byte log lines (timestamp, level, a block number, a line counter, a
   random 32-bit request id, IP, method, path with a random id, status, duration), made as one
   64 MiB block and written over and over with the block number patched into every line, so
   no chunk repeats.  zstd level 3 packs it about 4.3x (the table shows what S3 stored), so a
   prefetch window counted in stored bytes holds about four times as many plain bytes.
   moto keeps small objects in memory and spools those over about 5 MiB (packs) to temporary
   files; its RSS after the push, and its peak, are shown as well.

Bounds: every wait has a deadline (``--timeout``, default 300 s; 1800 s in full mode); a
restore whose worker grows by more than ``--rss-cap-gib`` (default 6) is stopped and reported
as such, to protect a shared machine.  Servers, moto, mounts and the work directory are
removed at the end whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "functional"))

from functional_support import MIME, PluginProcess, UnixHTTPConnection  # noqa: E402
from s3_fixtures import ACCESS_KEY, SECRET_KEY, MotoServer  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
TARGET_P99_MS = 50.0
TARGET_GROWTH = 256 * MiB
SMALL_FILES = 10_000
PUSH_BYTES = GiB
LINE = 128
BLOCK_LINES = (64 * MiB) // LINE
LOAD_ID = "bench-load"


class PluginError(RuntimeError):
    pass


class Client:
    """One keep-alive connection to the plugin socket, as dockerd's HTTP client keeps one."""

    def __init__(self, sock: Path, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.conn: UnixHTTPConnection | None = None

    def call(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = UnixHTTPConnection(self.sock, self.timeout)
            try:
                self.conn.request("POST", "/" + endpoint, json.dumps(body) + "\n",
                                  {"Accept": MIME})
                answer: dict[str, Any] = json.loads(self.conn.getresponse().read())
            except (http.client.HTTPException, ConnectionError) as exc:
                self.close()  # the server closed an idle keep-alive connection: reconnect
                if attempt or isinstance(exc, TimeoutError):
                    raise
                continue
            except OSError:
                self.close()
                raise
            if answer.get("Err"):
                raise PluginError(f"{endpoint}: {answer['Err']}")
            return answer
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class BenchServer(PluginProcess):
    """``python -m plugin.cli serve`` as deployed, with ``env`` as its plugin settings."""

    def __init__(self, work: Path, name: str, env: dict[str, str],
                 mount_root: Path | None = None) -> None:
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pyvol-", dir="/tmp"))
        super().__init__(self.socket_dir, work / name, work / f"{name}.log")
        self.env = env
        self.mount_root = mount_root

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("S3_", "AWS_", "PYVOL_"))
               and k not in ("LOG_LEVEL", "DEFAULT_BACKEND")}
        env.update(self.env)
        cmd = [sys.executable, "-m", "plugin.cli", "serve", "--socket", str(self.socket),
               "--root", str(self.root)]
        if self.mount_root is not None:
            cmd += ["--mount-root", str(self.mount_root)]
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err)
        deadline = time.monotonic() + 20
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {self.log}")
            time.sleep(0.02)
        Client(self.socket, 20).call("VolumeDriver.Capabilities", {})
        self.workers = self.worker_pids()

    @property
    def worker(self) -> int:
        (pid,) = self.workers
        return pid

    def _kill_workers(self) -> None:
        for pid in self.workers:
            with contextlib.suppress(OSError):  # only while the PID is still this server's
                if str(self.socket).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the worker and the master, by PID."""
        self._kill_workers()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_workers()  # a worker that outlived its master
        if self.mount_root is not None and self.mount_root.is_dir():
            for target in self.mount_root.iterdir():
                subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def s3_settings(url: str) -> dict[str, str]:
    return {"S3_ENDPOINT_URL": url, "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


def proc_kib(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status, in bytes; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * KiB
    except (OSError, ValueError):
        pass
    return 0


def wait_until(check: Callable[[], Any], timeout: float, pause: float = 0.25) -> Any:
    """``check()``'s first truthy result, or None once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(pause)


def human(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


# -- part A: the background load, in a process of its own ------------------------------------


def write_random(path: Path, size: int, stop: threading.Event | None = None) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            if stop is not None and stop.is_set():
                return
            f.write(os.urandom(64 * MiB))


def load_main(sock: str, files_dir: str, push_dir: str, timeout: float) -> None:
    """The load process: snapshot and push loops until killed; one JSON line per event."""
    lock = threading.Lock()

    def say(**event: Any) -> None:
        with lock:
            print(json.dumps({"t": time.monotonic(), **event}), flush=True)

    def snapshots() -> None:
        client = Client(Path(sock), timeout)
        paths = [p for p in Path(files_dir).rglob("*") if p.is_file()]
        previous = None
        while True:
            now = time.time()
            for path in paths:
                os.utime(path, (now, now))
            say(op="snapshot", event="start")
            info = client.call("pyvol/snapshot/create", {"Volume": "files"})["Snapshot"]
            if previous is not None:
                client.call("pyvol/snapshot/remove", {"Volume": "files", "Name": previous})
            say(op="snapshot", event="done")
            previous = info["name"]

    def pushes() -> None:
        client = Client(Path(sock), timeout)

        def s3() -> dict[str, Any]:
            status: dict[str, Any] = client.call("pyvol/sync/status", {"Volume": "push"})["Status"]
            if status["state"] == "error":
                raise PluginError(f"push failed: {status.get('last_error')}")
            return status

        while True:
            before = (s3().get("last_push") or {}).get("at")
            say(op="push", event="start")
            client.call("pyvol/sync/push", {"Volume": "push"})

            def pushed(before: str | None = before) -> dict[str, Any] | None:
                status = s3()
                at = (status.get("last_push") or {}).get("at")
                return status if status["state"] == "idle" and at and at != before else None
            # Once the upload reads its snapshot (state "syncing"), the next push's content is
            # written into the volume, as a container would: the next push starts at once.
            wait_until(lambda: s3()["state"] == "syncing" or pushed(), timeout)
            write_random(Path(push_dir) / "data.bin", PUSH_BYTES)
            if wait_until(pushed, timeout) is None:
                raise PluginError(f"push did not finish in {timeout:.0f} s")
            say(op="push", event="done")

    def guarded(loop: Callable[[], None], op: str) -> None:
        try:
            loop()
        except Exception as exc:
            say(op=op, event="error", message=str(exc)[:300])

    for loop, op in ((snapshots, "snapshot"), (pushes, "push")):
        threading.Thread(target=guarded, args=(loop, op), daemon=True).start()
    sys.stdin.read()  # run until the parent closes our stdin (or kills us)


@dataclass
class Load:
    """The load process, seen from the parent: its events as they arrive."""

    proc: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(cls, sock: Path, files_dir: Path, push_dir: Path, timeout: float) -> Load:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--load", str(sock), str(files_dir), str(push_dir),
             str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        load = cls(proc)
        threading.Thread(target=load._read, daemon=True).start()
        return load

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def started(self, op: str) -> bool:
        return any(e["op"] == op for e in self.events)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def summary(self, op: str, t0: float, t1: float) -> str:
        """Operations of ``op`` completed in [t0, t1], and the share of it one was running."""
        mine = [e for e in self.events if e["op"] == op and e["t"] <= t1]
        durations: list[float] = []
        busy, started = 0.0, None
        for e in mine:
            if e["event"] == "start":
                started = e["t"]
            elif started is not None:
                if e["event"] == "done" and e["t"] >= t0:
                    durations.append(e["t"] - started)
                busy += max(0.0, e["t"] - max(started, t0))
                started = None
        if started is not None:
            busy += t1 - max(started, t0)
        text = f"{len(durations)} completed"
        if durations:
            low, high = min(durations), max(durations)
            text += f" ({low:.1f} s)" if len(durations) == 1 else f" ({low:.1f}-{high:.1f} s)"
        if started is not None:
            text += f", 1 running for {t1 - started:.1f} s at the end"
        text += f"; one was running {100 * busy / (t1 - t0):.0f}% of the window"
        errors = [e["message"] for e in mine if e["event"] == "error"]
        if errors:
            text += f"; FAILED: {errors[0]}"
        return text


def latencies(client: Client, kind: str, seconds: float) -> tuple[list[float], int]:
    """Call for ``seconds``; returns the sorted latencies (ms) and the number of failures."""
    samples: list[float] = []
    failures = 0
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            if kind == "Get":
                client.call("VolumeDriver.Get", {"Name": "lat"})
            else:
                mount_id = f"lat-{n}"
                client.call("VolumeDriver.Mount", {"Name": "lat", "ID": mount_id})
                client.call("VolumeDriver.Unmount", {"Name": "lat", "ID": mount_id})
        except (PluginError, OSError, http.client.HTTPException):
            failures += 1
        samples.append((time.perf_counter() - started) * 1000)
        n += 1
    return sorted(samples), failures


def pct(samples: list[float], q: float) -> float:
    return samples[min(len(samples) - 1, int(len(samples) * q))]


def part_a(work: Path, window: float, timeout: float) -> str:
    moto = MotoServer(work / "moto-a.log")
    server = BenchServer(work, "root-a", s3_settings(moto.url), mount_root=work / "mnt-a")
    load: Load | None = None
    try:
        moto.client().create_bucket(Bucket="hbench-a")  # type: ignore[attr-defined]
        server.start()
        client = Client(server.socket, timeout)
        client.call("VolumeDriver.Create", {"Name": "lat", "Opts": None})
        client.call("VolumeDriver.Create", {"Name": "files", "Opts": None})
        client.call("VolumeDriver.Create", {"Name": "push", "Opts": {
            "s3_bucket": "hbench-a", "s3_sync": "manual", "s3_restore": "never",
            "s3_keep": "1"}})
        files_dir = Path(client.call("VolumeDriver.Mount",
                                     {"Name": "files", "ID": LOAD_ID})["Mountpoint"])
        push_dir = Path(client.call("VolumeDriver.Mount",
                                    {"Name": "push", "ID": LOAD_ID})["Mountpoint"])
        print(f"A: writing {SMALL_FILES} files and {human(PUSH_BYTES)} of random data", flush=True)
        for i in range(SMALL_FILES):
            sub = files_dir / f"d{i % 100:02d}"
            sub.mkdir(exist_ok=True)
            (sub / f"f{i:05d}").write_bytes(os.urandom(4 * KiB))
        write_random(push_dir / "data.bin", PUSH_BYTES)
        os.sync()

        idle = {}
        for kind in ("Get", "Mount+Unmount"):
            idle[kind] = latencies(client, kind, window)
            print(f"A: idle {kind}: n={len(idle[kind][0])}", flush=True)
        load = Load.start(server.socket, files_dir, push_dir, timeout)
        if not wait_until(lambda: load is not None and load.started("snapshot")
                          and load.started("push"), 30, 0.05):
            raise RuntimeError("the background load did not start within 30 s")
        time.sleep(0.5)  # let the push's capture snapshot and the first snapshot get going
        t0 = time.monotonic()
        busy = {}
        for kind in ("Get", "Mount+Unmount"):
            busy[kind] = latencies(client, kind, window)
            print(f"A: under load {kind}: n={len(busy[kind][0])}", flush=True)
        t1 = time.monotonic()
        load.stop()

        lines = ["| call, 1 client | idle p50 / p99 ms | loaded p50 / p99 / max ms "
                 "| p99 loaded/idle | calls idle / loaded | target | result |",
                 "|---|---|---|---|---|---|---|"]
        for kind in idle:
            (i_s, _), (b_s, b_f) = idle[kind], busy[kind]
            met = pct(b_s, 0.99) < TARGET_P99_MS and not b_f
            failed = f" ({b_f} failed)" if b_f else ""
            lines.append(
                f"| {kind} | {pct(i_s, .5):.2f} / {pct(i_s, .99):.2f} "
                f"| {pct(b_s, .5):.2f} / {pct(b_s, .99):.2f} / {b_s[-1]:.0f} "
                f"| {pct(b_s, .99) / pct(i_s, .99):.1f}x | {len(i_s)} / {len(b_s)}{failed} "
                f"| p99 < {TARGET_P99_MS:.0f} ms under load | {'met' if met else 'MISSED'} |")
        lines += ["", f"Background work during the {t1 - t0:.0f} s loaded window: snapshots of "
                  f"{SMALL_FILES:,} files: {load.summary('snapshot', t0, t1)}; "
                  f"{human(PUSH_BYTES)} S3 pushes: {load.summary('push', t0, t1)}."]
        return "\n".join(lines)
    finally:
        if load is not None:
            load.stop()
        server.close()
        moto.stop()


# -- part B: restore memory ------------------------------------------------------------------


def log_block(seed: int) -> tuple[bytearray, int]:
    """64 MiB of 128-byte log lines, and the column of the 6-digit block number in each."""
    rng = random.Random(seed)
    levels = ["INFO "] * 8 + ["WARN ", "ERROR", "DEBUG"]
    methods = ["GET", "GET", "GET", "POST", "PUT", "DELETE"]
    kinds = ["users", "orders", "items", "carts", "search"]
    statuses = [200] * 12 + [201, 204, 301, 304, 400, 404, 500, 503]
    out = []
    for i in range(BLOCK_LINES):
        ms = i * 9 + rng.randrange(9)
        line = (f"2026-12-01T{ms // 3_600_000 % 24:02d}:{ms // 60_000 % 60:02d}:"
                f"{ms // 1000 % 60:02d}.{ms % 1000:03d}Z {rng.choice(levels)} blk=000000 "
                f"seq={i:07d} req={rng.getrandbits(32):08x} ip=10.{rng.randrange(4)}."
                f"{rng.randrange(256)}.{rng.randrange(256)} {rng.choice(methods)} /v1/"
                f"{rng.choice(kinds)}/{rng.randrange(100_000)} status={rng.choice(statuses)} "
                f"dur={rng.randrange(1, 2000)}ms")
        out.append(line.ljust(LINE - 1)[:LINE - 1] + "\n")
    block = bytearray("".join(out).encode())
    column = out[0].index("blk=") + 4
    assert len(block) == BLOCK_LINES * LINE and all(  # fixed-width lines
        line[column - 4:column] == "blk=" for line in out[:1000])
    return block, column


def write_logs(path: Path, size: int) -> str:
    """Write ``size`` bytes of log lines to ``path``; returns their SHA-256."""
    block, column = log_block(7)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        written, number = 0, 0
        while written < size:
            for k, digit in enumerate(f"{number:06d}".encode()):
                block[column + k::LINE] = bytes([digit]) * BLOCK_LINES
            piece = memoryview(block)[:min(len(block), size - written)]
            f.write(piece)
            digest.update(piece)
            written += len(piece)
            number += 1
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


class RssSampler:
    """Samples a process's VmRSS every 50 ms; calls ``on_cap`` once if it exceeds ``cap``."""

    def __init__(self, pid: int, cap: int, on_cap: Callable[[], None]) -> None:
        self.pid, self.cap, self.on_cap = pid, cap, on_cap
        self.peak = 0
        self.capped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rss = proc_kib(self.pid, "VmRSS")
            self.peak = max(self.peak, rss)
            if rss > self.cap and not self.capped:
                self.capped = True
                self.on_cap()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


@contextlib.contextmanager
def closing_all(*stops: Callable[[], None]) -> Iterator[None]:
    """Call every one of ``stops`` at the end, whatever happened (each at most once)."""
    try:
        yield
    finally:
        for stop in stops:
            with contextlib.suppress(Exception):
                stop()


def part_b(work: Path, size: int, timeout: float, rss_cap: int) -> str:
    moto = MotoServer(work / "moto-b.log")
    env = s3_settings(moto.url)
    source = BenchServer(work, "root-b-source", env)
    target = BenchServer(work, "root-b-target", env)
    opts = {"s3_bucket": "hbench-b", "s3_prefix": "logs", "s3_sync": "manual"}
    rows: list[tuple[str, str, str, str]] = []
    with closing_all(source.close, target.close, moto.stop):
        s3: Any = moto.client()
        s3.create_bucket(Bucket="hbench-b")
        source.start()
        client = Client(source.socket, timeout)
        client.call("VolumeDriver.Create", {"Name": "logs",
                                            "Opts": {**opts, "s3_restore": "never"}})
        data = Path(client.call("VolumeDriver.Mount", {"Name": "logs", "ID": "m"})["Mountpoint"])
        print(f"B: writing {human(size)} of log lines", flush=True)
        started = time.monotonic()
        expected = write_logs(data / "app.log", size)
        client.call("VolumeDriver.Unmount", {"Name": "logs", "ID": "m"})
        os.sync()
        print(f"B: written in {time.monotonic() - started:.0f} s; pushing", flush=True)

        started = time.monotonic()
        client.call("pyvol/sync/push", {"Volume": "logs"})

        def pushed() -> dict[str, Any] | None:
            status: dict[str, Any] = client.call("pyvol/sync/status",
                                                 {"Volume": "logs"})["Status"]
            done = status["state"] == "idle" and status.get("last_push")
            return status if done or status["state"] == "error" else None
        status = wait_until(pushed, timeout, 0.5)
        push_s = time.monotonic() - started
        if status is None or status["state"] == "error":
            why = (status or {}).get("last_error") or f"did not finish in {timeout:.0f} s"
            rows.append(("push", f"FAILED: {why}", "", ""))
            return table_b(rows)
        stored = sum(o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket="hbench-b") for o in page.get("Contents", []))
        rows.append(("file (one, log lines)", f"{human(size)}; S3 holds {human(stored)} "
                     f"({size / stored:.1f}x smaller)", "", ""))
        rows.append(("push", f"{push_s:.0f} s, {size / MiB / push_s:.0f} MiB/s", "", ""))
        moto_after_push = proc_kib(moto.proc.pid, "VmRSS")
        source.close()
        shutil.rmtree(source.root, ignore_errors=True)  # the restore's disk space

        print(f"B: pushed in {push_s:.0f} s; restoring on a second server", flush=True)
        target.start()
        pid = target.worker
        client = Client(target.socket, timeout)
        before = proc_kib(pid, "VmRSS")
        sampler = RssSampler(pid, before + rss_cap, target.kill)
        started = time.monotonic()
        client.call("VolumeDriver.Create", {"Name": "logs", "Opts": opts})

        def restored() -> dict[str, Any] | None:
            if sampler.capped:
                return {"state": "capped"}
            s3s: dict[str, Any] = client.call("pyvol/sync/status",
                                              {"Volume": "logs"})["Status"]
            return s3s if s3s["state"] in ("idle", "error") else None
        try:
            status = wait_until(restored, timeout, 0.2)
        except (OSError, http.client.HTTPException, PluginError) as exc:
            status = {"state": "capped"} if sampler.capped else {"state": "error",
                                                                  "last_error": str(exc)}
        restore_s = time.monotonic() - started
        peak = max(sampler.stop(), proc_kib(pid, "VmHWM"))
        growth = peak - before
        rows.append(("worker RSS before restore", human(before), "", ""))
        if status is None:
            outcome = f"did not finish in {timeout:.0f} s"
        elif status["state"] == "capped":
            outcome = f"stopped: worker RSS passed {human(before + rss_cap)} (--rss-cap-gib)"
        elif status["state"] == "error":
            outcome = f"FAILED: {status.get('last_error')}"
        else:
            outcome = f"{restore_s:.0f} s, {size / MiB / restore_s:.0f} MiB/s"
        rows.append(("restore at create (Create until Status idle)", outcome, "", ""))
        rows.append(("worker peak RSS during restore (VmHWM, 50 ms VmRSS samples)",
                     human(peak), "", ""))
        rows.append(("worker RSS growth", human(growth), f"< {human(TARGET_GROWTH)}",
                     "met" if growth < TARGET_GROWTH and status and status["state"] == "idle"
                     else "MISSED"))
        if status is not None and status["state"] == "idle":
            path = Path(client.call("VolumeDriver.Mount",
                                    {"Name": "logs", "ID": "check"})["Mountpoint"])
            same = sha256_of(path / "app.log") == expected
            client.call("VolumeDriver.Unmount", {"Name": "logs", "ID": "check"})
            rows.append(("restored file SHA-256", "identical" if same else "DIFFERENT",
                         "identical", "met" if same else "MISSED"))
        rows.append(("moto RSS after push / its peak", f"{human(moto_after_push)} / "
                     f"{human(proc_kib(moto.proc.pid, 'VmHWM'))}", "", ""))
    return table_b(rows)


def table_b(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| measure | value | target | result |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="10 s windows and a 1 GiB restore, to try the script out")
    parser.add_argument("--parts", default="ab", help="which parts: a, b or ab")
    parser.add_argument("--window", type=float, help="seconds per latency measurement")
    parser.add_argument("--size-gib", type=float, help="restored file size in GiB")
    parser.add_argument("--timeout", type=float, help="bound on each push, restore, call")
    parser.add_argument("--rss-cap-gib", type=float, default=6.0,
                        help="stop a restore whose worker grows by more than this")
    parser.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        sock, files_dir, push_dir, timeout = args.load
        load_main(sock, files_dir, push_dir, float(timeout))
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root: Mount bind-mounts under a mount root")
    window = args.window or (10.0 if args.quick else 30.0)
    size = int((args.size_gib or (1 if args.quick else 10)) * GiB)
    timeout = args.timeout or (300.0 if args.quick else 1800.0)
    work = Path(tempfile.mkdtemp(prefix="pyvol-hbench-", dir="/var/tmp"))
    started = time.monotonic()
    tables = []
    parts: list[tuple[str, Callable[[], str]]] = []
    if "a" in args.parts:
        parts.append(("A. Control plane, idle vs under load",
                      lambda: part_a(work, window, timeout)))
    if "b" in args.parts:
        parts.append((f"B. Restore of one {human(size)} file from S3",
                      lambda: part_b(work, size, timeout, int(args.rss_cap_gib * GiB))))
    try:
        for title, run in parts:
            try:
                tables.append(f"{title}\n\n{run()}")
            except Exception as exc:  # report it, and still run the other part
                traceback.print_exc()
                tables.append(f"{title}\n\nFAILED: {exc}")
    finally:
        for mnt in work.glob("mnt-*/*"):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n\n".join(tables))
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
