"""The real pyvol server in a subprocess, and a client that talks to it exactly like dockerd."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/hardening_bench.py loads this module by its path alone
    sys.path.insert(0, str(REPO))

from tests.support import processes  # noqa: E402
from tests.support.unix_http import UnixHTTPConnection, listening  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

LISTEN_DEADLINE = 5.0  # dockerd gives up after about 9.5 s; 5 s leaves room for a busy machine
STOP_DEADLINE = 10.0  # dockerd SIGKILLs a plugin 10 s after SIGTERM
MIME = "application/vnd.docker.plugins.v1.2+json"
API_LOG = re.compile(r" pyvol\.api: ")


@dataclass
class Reply:
    status: int
    raw: bytes
    headers: dict[str, str]

    @property
    def body(self) -> dict[str, Any]:
        """The JSON object body; fails the test if the body is anything else."""
        try:
            parsed = json.loads(self.raw)
        except ValueError:
            raise AssertionError(
                f"HTTP {self.status} with a non-JSON body: {self.raw[:200]!r}") from None
        assert isinstance(parsed, dict), f"body is not a JSON object: {self.raw[:200]!r}"
        return parsed

    @property
    def err(self) -> str:
        """The Err text; fails unless the reply is a well-formed plugin error."""
        assert self.status in (200, 500) or 400 <= self.status < 500, self.status
        err = self.body.get("Err")
        assert isinstance(err, str) and err, f"no Err in {self.raw[:200]!r}"
        return err


class Plugin:
    """Client side of the plugin protocol, as dockerd's pkg/plugins client sends it."""

    def __init__(self, sock: Path) -> None:
        self.socket = sock

    def send(self, endpoint: str, payload: object = None, *, raw: bytes | None = None,
             method: str = "POST") -> Reply:
        """POST /endpoint; the body is Go's json.Encoder output (JSON plus newline) or empty."""
        if raw is None:
            raw = b"" if payload is None else (json.dumps(payload) + "\n").encode()
        conn = UnixHTTPConnection(self.socket)
        try:
            conn.putrequest(method, "/" + endpoint.lstrip("/"), skip_host=True,
                            skip_accept_encoding=True)
            conn.putheader("Host", "plugin.moby.localhost")
            conn.putheader("User-Agent", "Go-http-client/1.1")
            conn.putheader("Content-Length", str(len(raw)))
            conn.putheader("Accept", MIME)
            conn.putheader("Accept-Encoding", "gzip")
            conn.endheaders(raw)
            resp = conn.getresponse()
            return Reply(resp.status, resp.read(), dict(resp.getheaders()))
        finally:
            conn.close()

    def ok(self, endpoint: str, payload: object = None) -> dict[str, Any]:
        """Call and require success: 200, a JSON object, no Err."""
        reply = self.send(endpoint, payload)
        body = reply.body
        assert reply.status == 200, f"{endpoint}: HTTP {reply.status} {reply.raw!r}"
        assert not body.get("Err"), f"{endpoint}: {body['Err']}"
        return body

    def fails(self, endpoint: str, payload: object = None) -> str:
        return self.send(endpoint, payload).err

    def volume(self, name: str) -> dict[str, Any]:
        volume = self.ok("VolumeDriver.Get", {"Name": name})["Volume"]
        assert isinstance(volume, dict)
        return volume

    def mounts(self, name: str) -> int:
        count = self.volume(name)["Status"]["mounts"]
        assert isinstance(count, int)
        return count


class PluginProcess:
    """``python -m plugin.cli serve`` on a unix socket, its stderr kept in a file."""

    listen_deadline = LISTEN_DEADLINE

    def __init__(self, socket_dir: Path, root: Path, log: Path) -> None:
        self.socket = socket_dir / "pyvol.sock"  # short: sun_path holds 108 bytes
        self.root = root
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = Plugin(self.socket)
        self.workers: set[int] = set()

    def command(self) -> list[str]:
        """The server's argv, up to ``serve`` (the socket and root options follow)."""
        return [sys.executable, "-m", "plugin.cli", "serve"]

    def environment(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items()
                if k not in ("LOG_LEVEL", "DEFAULT_BACKEND", "S3_BUCKET")}

    def start(self) -> None:
        started = time.monotonic()
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [*self.command(), "--socket", str(self.socket), "--root", str(self.root)],
                cwd=REPO, env=self.environment(), stdin=subprocess.DEVNULL, stdout=err,
                stderr=err,
            )
        while not self._listening():
            assert self.proc.poll() is None, f"server exited early:\n{self.log.read_text()}"
            assert time.monotonic() - started < self.listen_deadline, (
                f"socket not listening within {self.listen_deadline} s:\n"
                f"{self.log.read_text()}")
            time.sleep(0.01)
        self.client.ok("VolumeDriver.Capabilities", {})  # the worker has booted
        self.workers = self.worker_pids()

    def _listening(self) -> bool:
        return listening(self.socket)

    def worker_pids(self) -> set[int]:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return {int(pid) for pid in children.read_text().split()}

    def stop(self) -> float:
        """SIGTERM and wait; returns how long the exit took."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server still running {STOP_DEADLINE} s after SIGTERM") from None
        took = time.monotonic() - started
        assert code == 0, f"server exited with {code}:\n{self.log.read_text()}"
        return took

    def kill9(self) -> None:
        """SIGKILL the master and its worker, as an OOM killer or a power cut would: nothing
        runs its cleanup.  Returns once the worker is gone and nothing answers on the socket
        (the main thread turns zombie while other threads still exit and hold the socket)."""
        assert self.proc is not None
        processes.kill9(self.proc, self.workers | self.worker_pids())
        wait_for(lambda: not self._listening(), 10, "the killed server to release its socket")

    def api_log_lines(self) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if API_LOG.search(line)]


StartServer = Callable[[Path], PluginProcess]
