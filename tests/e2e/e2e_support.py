"""Helpers of the end-to-end tier: the docker and pyvol CLIs, the local registry, the engine.

Everything here drives Docker the way a user does, through the ``docker`` CLI, and returns
what the user would see (exit code, stdout, stderr).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from tests.support.commands import describe
from tests.support.processes import alive
from tests.support.tiers import cannot_run as tier_cannot_run
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
POLL = 0.2
"""How often a test asks Docker again while it waits (``wait_for(..., pause=POLL)``)."""
REGISTRY = "127.0.0.1:5000"
REF = f"{REGISTRY}/pyvol:e2e"
REF2 = f"{REGISTRY}/pyvol:e2e2"
ALIAS = "pyvol"
DRIVER = "pyvol:latest"
"""The driver name dockerd records for every volume of the plugin installed as ``pyvol``."""
BUSYBOX = "pyvol-test/busybox:latest"
PYTHON_IMAGE = "pyvol-test/python:bookworm"
LABEL = "pyvol-e2e"
"""Label on every container the tests start; its value is the session token."""
TMP_PREFIX = "pyvol-e2e-"
DEFAULT_DOCKERD_LOG = Path("/var/log/pyvol-dockerd.log")  # scripts/provision.sh step_engine

Result = subprocess.CompletedProcess[str]


def run(args: Sequence[str], timeout: float = 60, **kwargs: Any) -> Result:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL, **kwargs)


def docker(*args: str, timeout: float = 60) -> Result:
    return run(["docker", *args], timeout=timeout)


def ok(result: Result) -> str:
    """Assert the command succeeded; return its stdout."""
    assert result.returncode == 0, describe(result)
    return result.stdout


def fails(result: Result) -> str:
    """Assert the command failed; return its stderr."""
    assert result.returncode != 0, describe(result)
    return result.stderr


def inspect_volume(name: str) -> dict[str, Any]:
    data = json.loads(ok(docker("volume", "inspect", name)))
    assert isinstance(data, list) and len(data) == 1, data
    volume: dict[str, Any] = data[0]
    return volume


def volume_rows() -> list[str]:
    """``docker volume ls`` as "DRIVER NAME" rows."""
    return ok(docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}")).splitlines()


def plugin_field(template: str, name: str = ALIAS) -> str:
    return ok(docker("plugin", "inspect", "--format", template, name)).strip()


def pyvol_command() -> list[str]:
    """The host's ``pyvol`` CLI (pip -e install): next to this Python, on PATH, or as a module."""
    beside = Path(sys.executable).parent / "pyvol"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("pyvol")
    return [found] if found else [sys.executable, "-m", "plugin.cli"]


def pyvol(*args: str, timeout: float = 60) -> Result:
    return run([*pyvol_command(), *args], timeout=timeout)


# The local registry (scripts/provision.sh step_registry). No proxy: 127.0.0.1 only.

_REGISTRY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def _registry(path: str, method: str = "GET", body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[bytes, str]:
    request = urllib.request.Request(f"http://{REGISTRY}{path}", data=body, method=method,
                                     headers=headers or {})
    with _REGISTRY_OPENER.open(request, timeout=10) as response:
        return response.read(), response.headers.get("Content-Type", "")


def registry_problem() -> str | None:
    try:
        _registry("/v2/")
    except (OSError, urllib.error.URLError) as exc:
        return f"no registry answers on http://{REGISTRY}/v2/ ({exc})"
    return None


def registry_has(ref: str) -> bool:
    repo, tag = ref.removeprefix(f"{REGISTRY}/").rsplit(":", 1)
    try:
        _registry(f"/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_V2})
    except (OSError, urllib.error.URLError):
        return False
    return True


def registry_retag(src: str, dst: str) -> None:
    """Push the manifest of ``src`` again under the tag of ``dst`` (same build, second tag).

    ``docker plugin create`` of an identical rootfs under a second name fails on dockerd 20.10
    ("content sha256:...: already exists"), so the second tag is made in the registry.
    """
    repo, src_tag = src.removeprefix(f"{REGISTRY}/").rsplit(":", 1)
    dst_repo, dst_tag = dst.removeprefix(f"{REGISTRY}/").rsplit(":", 1)
    assert repo == dst_repo, (src, dst)
    body, media_type = _registry(f"/v2/{repo}/manifests/{src_tag}",
                                 headers={"Accept": MANIFEST_V2})
    _registry(f"/v2/{repo}/manifests/{dst_tag}", method="PUT", body=body,
              headers={"Content-Type": media_type or MANIFEST_V2})


def cannot_run(problem: str) -> NoReturn:
    """Skip, saying why; with PYVOL_E2E=required (CI) fail instead: there they must run."""
    tier_cannot_run("end-to-end", problem)


# The engine

def engine_problem() -> str | None:
    """Why the end-to-end tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "they must run as root (they read the plugin's data directory and restart dockerd)"
    if shutil.which("docker") is None:
        return "there is no docker CLI on PATH (Debian package docker.io; `make provision`)"
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0 or not info.stdout.strip():
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers `docker info` ({last}); start one with `make provision`"
    for image in (BUSYBOX, PYTHON_IMAGE):
        if docker("image", "inspect", image).returncode != 0:
            return f"the test image {image} is missing; build it with `scripts/provision.sh images`"
    return registry_problem()


def foreign_running_containers() -> list[str]:
    """Names of running containers these tests did not start (a restart would stop them)."""
    rows = ok(docker("ps", "--format", f'{{{{.Names}}}} {{{{.Label "{LABEL}"}}}}')).splitlines()
    return [row.split()[0] for row in rows if len(row.split()) == 1]


def dockerd_pid() -> int:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "dockerd":
                    pids.append(int(entry.name))
    with contextlib.suppress(OSError, ValueError):
        recorded = int(Path("/var/run/docker.pid").read_text().strip())
        if recorded in pids:
            return recorded
    assert len(pids) == 1, f"expected one dockerd process, found {pids}"
    return pids[0]


def wait_engine(timeout: float = 90) -> None:
    wait_for(lambda: docker("info", "--format", "{{.ServerVersion}}",
                            timeout=10).returncode == 0, timeout, "`docker info` to answer",
             pause=0.5)


def restart_dockerd() -> None:
    """Stop dockerd gracefully (SIGTERM) and start it again exactly as it was started.

    Under systemd, ``systemctl restart docker``.  Otherwise (started by hand or by
    scripts/provision.sh) the same command line, environment, working directory and log file
    are reused, in a new session, as ``nohup setsid dockerd >>LOG`` does.
    """
    pid = dockerd_pid()
    proc = Path(f"/proc/{pid}")
    if "docker.service" in (proc / "cgroup").read_text() and shutil.which("systemctl"):
        ok(run(["systemctl", "restart", "docker"], timeout=180))
        wait_engine()
        return
    argv = [os.fsdecode(a) for a in (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")]
    env = dict(
        os.fsdecode(item).split("=", 1)
        for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item
    )
    env.setdefault("PATH", os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    cwd = os.readlink(proc / "cwd")
    if not os.path.isdir(cwd):  # removed since (the kernel shows "... (deleted)")
        cwd = "/"
    log = os.readlink(proc / "fd" / "1")
    log_path = Path(log) if log.startswith("/") and not log.startswith("/dev/") \
        and Path(log).is_file() else DEFAULT_DOCKERD_LOG
    os.kill(pid, signal.SIGTERM)
    # A zombie (exited, not yet reaped by its parent) counts as gone (see alive).
    wait_for(lambda: not alive(pid), 90, f"dockerd (pid {pid}) to exit", pause=POLL)
    with contextlib.suppress(OSError, ValueError):
        pidfile = Path("/var/run/docker.pid")
        if int(pidfile.read_text().strip()) == pid:
            pidfile.unlink()
    with log_path.open("ab") as out:
        # setsid --fork returns at once; dockerd is re-parented, never a child of pytest.
        subprocess.run(["setsid", "--fork", *argv], stdin=subprocess.DEVNULL, stdout=out,
                       stderr=subprocess.STDOUT, env=env, cwd=cwd, check=True, timeout=30)
    try:
        wait_engine()
    except AssertionError as exc:
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        raise AssertionError(f"{exc}; dockerd started as {shlex.join(argv)}, the end of "
                             f"{log_path}:\n" + "\n".join(tail)) from None


# The plugin under test

@dataclass
class Installed:
    """The plugin as the session fixture installed it."""

    token: str
    tmp: Path
    data: Path
    """The host directory given as ``data.source``."""
    containers_label: str = field(init=False)

    def __post_init__(self) -> None:
        self.containers_label = f"{LABEL}={self.token}"

    def volume_dir(self, name: str) -> Path:
        return self.data / "volumes" / name

    def install(self, ref: str = REF) -> None:
        ok(docker("plugin", "install", ref, "--alias", ALIAS, "--grant-all-permissions",
                  f"data.source={self.data}", timeout=300))

    def ensure_enabled(self) -> None:
        """Put the plugin back in service after a test that disabled or replaced it."""
        if docker("plugin", "inspect", ALIAS).returncode != 0:
            self.install()
            return
        if plugin_field("{{.Enabled}}") == "true":
            return
        mounts = json.loads(plugin_field("{{json .Config.Mounts}}"))
        if any(m["Name"] == "data" and m["Source"] != str(self.data) for m in mounts):
            ok(docker("plugin", "set", ALIAS, f"data.source={self.data}"))
        ok(docker("plugin", "enable", ALIAS, timeout=120))


@dataclass
class Scenario:
    """One test's names and containers, all removed when the test ends."""

    plugin: Installed
    tag: str
    volumes: list[str] = field(default_factory=list)
    _count: int = 0

    def name(self, hint: str) -> str:
        """A volume name no other test uses; it is removed at the end of the test."""
        self._count += 1
        name = f"e2e-{self.tag}-{self._count}-{hint}"
        self.volumes.append(name)
        return name

    def create(self, hint: str, *args: str) -> str:
        """``docker volume create -d pyvol ARGS NAME``; returns the name."""
        name = self.name(hint)
        assert ok(docker("volume", "create", "-d", ALIAS, *args, name)).strip() == name
        return name

    def _labels(self) -> list[str]:
        return ["--label", self.plugin.containers_label, "--label", f"{LABEL}-test={self.tag}"]

    def run(self, *args: str, timeout: float = 90) -> Result:
        """``docker run --rm`` (no network) with ARGS: options, image, command."""
        return docker("run", "--rm", "--network", "none", *self._labels(), *args,
                      timeout=timeout)

    def start(self, *args: str) -> str:
        """A busybox container running ``sleep`` with ARGS (e.g. ``-v vol:/data``); its ID."""
        result = docker("run", "-d", "--init", "--network", "none", *self._labels(), *args,
                        BUSYBOX, "sleep", "600")
        return ok(result).strip()

    def sh(self, container: str, script: str) -> Result:
        return docker("exec", container, "sh", "-c", script)

    def cleanup(self) -> None:
        self.plugin.ensure_enabled()
        ids = docker("ps", "-aq", "--filter", f"label={LABEL}-test={self.tag}").stdout.split()
        if ids:
            docker("rm", "-f", *ids, timeout=120)
        for name in self.volumes:
            docker("volume", "rm", "-f", name)
