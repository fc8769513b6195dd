"""Helpers of the S3 sync integration tests (shared with tests/hostile): ``pyvol serve`` with
S3 settings, the ``pyvol`` CLI, dockerd's calls, and a tree with every observable property
(content, links, modes, owners, mtimes) set.

The server runs exactly as ``python -m plugin.cli serve`` does, with one test-only change
made in the launcher before the app loads: shorter retry budgets (``FAST_RETRIES``), so a
dead store is reported in seconds rather than the two minutes a real deployment waits.  The
code paths are the product's; only the numbers differ.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from functional_support import LISTEN_DEADLINE, REPO, Plugin, PluginProcess

from tests.support.mounts import release_mounts_under
from tests.support.trees import picture
from tests.support.waiting import wait_for

LAUNCHER = """\
import functools, os, sys
import s3sync.store as store
import plugin.sync.scheduler as scheduler
import plugin.sync.syncer as syncer
from s3sync.config import RetryPolicy
store.RetryPolicy = functools.partial(
    RetryPolicy, attempts=3, base_delay=0.05, max_delay=0.2, deadline=3.0,
    connect_timeout=1.0, read_timeout=20.0, botocore_attempts=1)
scheduler.RETRY_MIN, scheduler.RETRY_MAX = 1.0, 8.0
if os.environ.get("PYVOL_TEST_MOUNT_WAIT"):
    syncer.MOUNT_WAIT = float(os.environ["PYVOL_TEST_MOUNT_WAIT"])
from plugin.cli import main
sys.exit(main())
"""
FAST_RETRIES = "one S3 operation: 3 tries within 3 s; a failed push: retried after 1, 2, 4, 8 s"


class SyncServer(PluginProcess):
    """``pyvol serve`` on its own socket directory, with ``env`` as its plugin settings."""

    listen_deadline = LISTEN_DEADLINE * 3

    def __init__(self, root: Path, log: Path, env: dict[str, str]) -> None:
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pyvol-", dir="/tmp"))
        super().__init__(self.socket_dir, root, log)
        self.env = env

    def command(self) -> list[str]:
        return [sys.executable, "-c", LAUNCHER, "serve"]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("S3_", "AWS_", "PYVOL_")) and k not in (
                   "LOG_LEVEL", "DEFAULT_BACKEND")}
        env.update(self.env)
        return env

    def cli(self, *args: str, timeout: float = 60,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """The ``pyvol`` CLI against this server, as a user runs it (``stdin``: piped in)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_"))}
        env.pop("PYVOL_SOCKET", None)
        return subprocess.run(
            [sys.executable, "-m", "plugin.cli", "--socket", str(self.socket), *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False,
            **({"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


StartSync = Callable[..., SyncServer]


@contextlib.contextmanager
def sync_servers(base: Path, backend: str = "local") -> Iterator[StartSync]:
    """Start servers (each on its own socket) whose volumes default to ``backend``; kill
    what is still running at the end and release what they left mounted."""
    running: list[SyncServer] = []

    def start(root: Path, env: dict[str, str]) -> SyncServer:
        server = SyncServer(root, base / f"server-{len(running)}.log",
                            {**BACKEND_SETTINGS[backend], **env})
        running.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in running:
            if server.proc is not None and server.proc.poll() is None:
                server.kill9()
            shutil.rmtree(server.socket_dir, ignore_errors=True)
        release_mounts_under(base)


@contextlib.contextmanager
def at_rest(server: PluginProcess, name: str) -> Iterator[Path]:
    """The volume's data as it lies on the server's disk, read without a Docker call (a Mount
    counts a use and its Unmount pushes): a plain volume's directory, or a sized volume's
    image mounted read-only for the look (``noload``: its journal is not replayed)."""
    plain = server.root / "volumes" / name
    if plain.is_dir():
        yield plain
        return
    image = server.root / "images" / name
    look = Path(tempfile.mkdtemp(prefix="at-rest-", dir=server.root.parent))
    subprocess.run(["mount", "-o", "ro,loop,noload", str(image), str(look)], check=True,
                   capture_output=True)
    try:
        yield look
    finally:
        subprocess.run(["umount", str(look)], check=True, capture_output=True)
        look.rmdir()


BACKEND_SETTINGS: dict[str, dict[str, str]] = {
    "local": {},
    "image": {"DEFAULT_BACKEND": "image", "DEFAULT_SIZE": "256M"},
}
"""Plugin settings that make every volume a server creates use one backend: the feature
suites run once per backend this way, through the product's own defaults."""


def s3_settings(url: str, **extra: str) -> dict[str, str]:
    """Plugin settings for a server that syncs to the test S3 endpoint ``url``."""
    from s3_fixtures import ACCESS_KEY, SECRET_KEY

    return {"S3_ENDPOINT_URL": url, "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, **extra}


# dockerd's side of a volume's life

def create(server: SyncServer, name: str, **opts: str) -> None:
    server.client.ok("VolumeDriver.Create", {"Name": name, "Opts": opts})


def mount(plugin: Plugin, name: str, mount_id: str) -> Path:
    return Path(plugin.ok("VolumeDriver.Mount", {"Name": name, "ID": mount_id})["Mountpoint"])


def unmount(plugin: Plugin, name: str, mount_id: str) -> float:
    """Unmount; return how long the call took."""
    started = time.monotonic()
    plugin.ok("VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
    return time.monotonic() - started


def s3_status(plugin: Plugin, name: str) -> dict[str, Any]:
    status = plugin.volume(name)["Status"]
    assert "s3" in status, f"volume {name} shows no S3 sync: {status}"
    s3: dict[str, Any] = status["s3"]
    return s3


def wait_pushed(plugin: Plugin, name: str, previous: str | None = None,
                timeout: float = 30) -> dict[str, Any]:
    """Wait until Status shows a push newer than ``previous`` (a last_push time) and idle."""
    def pushed() -> dict[str, Any] | None:
        s3 = s3_status(plugin, name)
        last = s3.get("last_push") or {}
        if s3["state"] == "idle" and last.get("at") and last["at"] != previous:
            return s3
        return None
    result: dict[str, Any] = wait_for(pushed, timeout, f"a push of {name} to complete")
    return result


# trees

def build_tree(root: Path, tag: str, big: int = 0) -> None:
    """Files (one of ``big`` random bytes), a subdirectory, relative and absolute symlinks, a
    hard link, unusual modes and owners, and fixed mtimes, all under the existing ``root``."""
    (root / "docs").mkdir(mode=0o750)
    (root / "docs" / "note.txt").write_text(f"note of {tag}\n" * 100)
    (root / "empty.txt").write_bytes(b"")
    (root / "random.bin").write_bytes(os.urandom(big or 100_000))
    (root / "tag").write_text(tag)
    os.symlink("docs/note.txt", root / "relative-link")
    os.symlink("/etc/passwd", root / "absolute-link")
    os.link(root / "tag", root / "tag-hardlink")
    secret = root / "private.key"
    secret.write_bytes(os.urandom(64))
    os.chmod(secret, 0o400)
    os.chown(secret, 1234, 5678)
    os.chown(root / "docs", 42, 43)
    os.lchown(root / "relative-link", 7, 8)
    os.chmod(root / "docs" / "note.txt", 0o2640)
    for i, path in enumerate(sorted(root.rglob("*"))):
        os.utime(path, ns=(1_600_000_000_000_000_000 + i * 1001,) * 2, follow_symlinks=False)


def write_tree(plugin: Plugin, name: str, mount_id: str, tag: str,
               big: int = 0) -> dict[str, Any]:
    """Mount ``name``, fill it with :func:`build_tree`, unmount it (which queues a push);
    the tree's picture as it was written."""
    data = mount(plugin, name, mount_id)
    build_tree(data, tag, big)
    written = picture(data)
    unmount(plugin, name, mount_id)
    return written
