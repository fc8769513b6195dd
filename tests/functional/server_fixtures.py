"""Server fixtures shared by the functional and hostile tiers (real server, real socket)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from functional_support import Plugin, PluginProcess, StartServer
from sync_support import BACKEND_SETTINGS, StartSync, sync_servers


@contextlib.contextmanager
def servers(base: Path) -> Iterator[StartServer]:
    """Start servers (several may share a root, one after another); stop them at the end.

    Each server must answer on its socket within 2 s, exit within 10 s of SIGTERM, and keep
    its one worker for its whole life: a crashed worker would have been replaced.
    """
    socket_dir = Path(tempfile.mkdtemp(prefix="pyvol-", dir="/tmp"))
    running: list[PluginProcess] = []

    def start(root: Path) -> PluginProcess:
        server = PluginProcess(socket_dir, root, base / f"server-{len(running)}.log")
        running.append(server)
        server.start()
        return server

    try:
        yield start
        for server in running:
            if server.proc is not None and server.proc.poll() is None:
                assert server.worker_pids() == server.workers, "the worker was replaced"
                server.stop()
    finally:
        for server in running:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    with servers(tmp_path) as start:
        yield start


@pytest.fixture
def server(start_server: StartServer, tmp_path: Path) -> PluginProcess:
    """A server of this test's own, on a fresh root."""
    return start_server(tmp_path / "root")


@pytest.fixture
def plugin(server: PluginProcess) -> Plugin:
    return server.client


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginProcess]:
    """One server for a whole module; its tests keep apart by using distinct volume names."""
    base = tmp_path_factory.mktemp("shared")
    with servers(base) as start:
        yield start(base / "root")


@pytest.fixture
def shared(shared_server: PluginProcess) -> Plugin:
    return shared_server.client


@pytest.fixture
def start(tmp_path: Path) -> Iterator[StartSync]:
    """``start(root, settings)``: S3-syncing servers of this test's own, killed at its end."""
    with sync_servers(tmp_path) as start:
        yield start


@pytest.fixture(params=sorted(BACKEND_SETTINGS))
def start_each_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StartSync]:
    """``start`` once per backend: every volume the servers create uses it by default."""
    with sync_servers(tmp_path, backend=str(request.param)) as start:
        yield start
