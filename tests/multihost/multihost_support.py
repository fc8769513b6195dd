"""Several Docker "hosts" on one machine, for tests that move volumes between engines.

Topology of one session (token ``T``, a random /24 ``10.213.K.0/24`` not routed on the machine)::

    netns pyvol-mh-T-br   bridge br0, one port per namespace below (and one for the machine)
    netns pyvol-mh-T-s3   eth0 10.213.K.2   moto (python -m moto.server) on port 9000
    netns pyvol-mh-T-a    eth0 10.213.K.11  dockerd 20.10 + its own containerd, plugin "pyvol"
    netns pyvol-mh-T-b    eth0 10.213.K.12  the same
    root namespace        pmh-T 10.213.K.1  so that the tests (boto3) reach the S3 server

Each engine runs ``nsenter --net=/run/netns/...  dockerd`` with its data root under
``/tmp/pyvol-mh-T/NAME/docker``, its exec root in ``/run/pyvol-mh-T-NAME`` and its API on
``unix:///run/pyvol-mh-T-NAME.sock``; no bridge network and no iptables rules (each engine
starts its own containerd, so the plugin and the containerd shims live in the host's network
namespace).  The plugin is the worktree's ``build/`` (``make plugin``), created in each engine
with ``docker plugin create`` under the alias ``pyvol`` and configured with ``docker plugin
set`` to push to the session's bucket.

Why each engine gets its own copy of config.json: dockerd 20.10 names a plugin by the digest
of its config and keeps every plugin's socket in ``/run/docker/plugins/<id>/``, a path it does
not put under ``--exec-root``.  Two engines running the same build would share that directory
(and the socket in it), so each host's config.json differs in its description.

Everything a session creates is named after its token, which makes :func:`destroy` work from
names alone: it is the teardown and also removes what a killed earlier session left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tests.support.commands import describe
from tests.support.mounts import loops_under, mounts_under
from tests.support.processes import alive
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build"
PREFIX = "pyvol-mh-"
TMP_ROOT = Path("/tmp")
RUN_ROOT = Path("/run")
NETNS_DIR = Path("/run/netns")
ALIAS = "pyvol"
BUSYBOX = "pyvol-test/busybox:latest"
BASE_IMAGE = "pyvol-test/python:bookworm"
"""Base of the plugin's rootfs: the local image scripts/provision.sh makes (as the e2e tier)."""
SOURCE_PACKAGES = ("plugin", "backends", "snapshots", "s3sync")
S3_PORT = 9000
ACCESS_KEY = "AKIAPYVOLMULTIHOST00"
SECRET_KEY = "pyvol-multihost-secret-0123456789abcdef"
REGION = "us-east-1"
SUBNET_BASE = "10.213"
S3_HOST_ID, FIRST_HOST_ID, MACHINE_ID = 2, 11, 1
POLL = 0.2

Result = subprocess.CompletedProcess[str]
CutMode = Literal["reject", "down", "drop"]
REJECT_RULES = (
    ("OUTPUT", "-o", "eth0", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"),
    ("OUTPUT", "-o", "eth0", "-j", "REJECT"),
    ("INPUT", "-i", "eth0", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"),
    ("INPUT", "-i", "eth0", "-j", "REJECT"),
)
"""``cut(how="reject")``: every packet through the host's link is refused, open connections
included (TCP gets a reset, the rest an ICMP error)."""


class SetupError(RuntimeError):
    """Part of the harness could not start; the message says which and why (log tails)."""


class DockerError(RuntimeError):
    """A docker command failed; the message holds the command, its exit code and stderr."""

    def __init__(self, result: Result) -> None:
        super().__init__(describe(result))
        self.result = result


def run(args: Sequence[str], timeout: float = 60, check: bool = True,
        env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """Run a command (argument list, no shell); with ``check``, raise SetupError on failure."""
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                            check=False, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    if check and result.returncode != 0:
        raise SetupError(describe(result))
    return result


MAIN_ENGINE_DOWN = "Cannot connect to the Docker daemon"
MAIN_ENGINE_WAIT = 120.0
"""How long to wait for the main engine when it does not answer: other test sessions on the
machine (tests/e2e) restart it."""


def main_docker(*args: str, timeout: float = 120, check: bool = True) -> Result:
    """``docker ARGS`` against the machine's main engine, waiting (up to MAIN_ENGINE_WAIT s)
    while it does not answer, as during a restart by another session's tests."""
    deadline = time.monotonic() + MAIN_ENGINE_WAIT
    while True:
        result = run(["docker", *args], timeout=timeout, check=False)
        if MAIN_ENGINE_DOWN not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(1)
    if check and result.returncode != 0:
        raise SetupError(describe(result))
    return result


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"({path}: {exc})"
    return f"last lines of {path}:\n" + "\n".join("    " + line for line in text)


class Timings:
    """How long each setup step took, for the summary line of the session."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self.steps.append((what, time.monotonic() - started))

    def __str__(self) -> str:
        return ", ".join(f"{what} {took:.1f} s" for what, took in self.steps)


# Processes and mounts, found by network namespace

def _netns_inode(netns: str) -> int | None:
    try:
        return (NETNS_DIR / netns).stat().st_ino
    except OSError:
        return None


def _process_table() -> tuple[dict[int, int], dict[int, str]]:
    """(pid -> parent pid, pid -> network namespace link) of every process now."""
    parents: dict[int, int] = {}
    nets: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            nets[pid] = os.readlink(entry / "ns" / "net")
    return parents, nets


def processes_of(netns: str) -> list[int]:
    """Every process whose network namespace is ``netns``, and all their descendants (e.g. a
    container with ``--network none`` is a child of a containerd shim of the host)."""
    inode = _netns_inode(netns)
    if inode is None:
        return []
    parents, nets = _process_table()
    found = {pid for pid, link in nets.items() if link == f"net:[{inode}]"}
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return sorted(found)


def kill_all(netns: str, timeout: float = 20) -> list[int]:
    """SIGKILL every process of ``netns`` (see :func:`processes_of`) until none is left."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while pids := [p for p in processes_of(netns) if alive(p)]:
        if time.monotonic() > deadline:
            raise SetupError(f"processes of {netns} still alive after SIGKILL: {pids}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.extend(p for p in pids if p not in killed)
        time.sleep(0.05)
    return killed


def unmount_under(path: Path) -> None:
    """Detach (lazily, deepest first) every mount at or below ``path``."""
    for target in reversed(mounts_under(path)):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


# The plugin build

def _site_packages() -> Path | None:
    found = sorted((BUILD / "rootfs" / "opt" / "pyvol" / "lib").glob("python3*/site-packages"))
    return found[0] if len(found) == 1 else None


def build_mismatch() -> str | None:
    """Why ``build/`` is not the plugin of this worktree's sources, or None if it is.

    It is when build/config.json equals config.json, the Python files installed in the
    rootfs are byte for byte those of plugin/, backends/, snapshots/ and s3sync/, and build/
    is newer than the Dockerfile and pyproject.toml (whose changes the files do not show).
    """
    config = BUILD / "config.json"
    if not config.is_file():
        return "build/config.json is missing"
    if config.read_bytes() != (REPO / "config.json").read_bytes():
        return "build/config.json differs from config.json"
    for name in ("Dockerfile", "pyproject.toml"):
        if (REPO / name).stat().st_mtime > config.stat().st_mtime:
            return f"{name} is newer than build/"
    site = _site_packages()
    if site is None:
        return "build/rootfs has no (single) /opt/pyvol/lib/python3*/site-packages"
    for package in SOURCE_PACKAGES:
        ours = {p.relative_to(REPO) for p in (REPO / package).rglob("*.py")}
        built = {p.relative_to(site) for p in (site / package).rglob("*.py")}
        if ours != built:
            return f"the rootfs's {package}/ has other files ({sorted(map(str, ours ^ built))})"
        for rel in ours:
            if (REPO / rel).read_bytes() != (site / rel).read_bytes():
                return f"the rootfs's {rel} differs from the worktree's"
    return None


def ensure_plugin_build(token: str, log: Path) -> str:
    """Make sure build/ holds this worktree's plugin; return what was done.

    ``make plugin`` builds with the main engine and also creates the plugin there; it is made
    under the name pyvol-mh-build-TOKEN and removed at once.  PYVOL_MH_REBUILD=1 forces it.
    """
    if os.environ.get("PYVOL_MH_REBUILD") != "1" and build_mismatch() is None:
        return "reused build/"
    name = f"{PREFIX}build-{token}:latest"
    base = os.environ.get("PYVOL_E2E_BASE_IMAGE") or BASE_IMAGE
    for attempt in (1, 2):
        start = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            made = subprocess.run(
                ["make", "plugin", f"PLUGIN_NAME={name}", f"BASE_IMAGE={base}"], cwd=REPO,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=900,
                check=False)
        with log.open("rb") as f:
            f.seek(start)
            engine_went_away = MAIN_ENGINE_DOWN.encode() in f.read()
        # Once more if another session restarted the main engine during the build.
        if made.returncode == 0 or attempt == 2 or not engine_went_away:
            break
        main_docker("info", check=False)
    main_docker("plugin", "rm", "-f", name, check=False)
    if made.returncode != 0:
        raise SetupError(f"`make plugin` failed (exit {made.returncode}); {tail(log)}")
    problem = build_mismatch()
    if problem is not None:
        raise SetupError(f"`make plugin` finished but build/ is not this worktree's plugin: "
                         f"{problem} (did another build retag pyvol-plugin-rootfs:latest "
                         f"meanwhile?)")
    return "built build/ with `make plugin`"


# The network

def _taken_subnets() -> set[str]:
    """The 10.213.K prefixes that any route or address of the machine mentions."""
    text = run(["ip", "-4", "route", "show", "table", "all"]).stdout \
        + run(["ip", "-4", "addr"]).stdout
    return {".".join(word.split("/")[0].split(".")[:3]) for word in text.split()
            if word.startswith(f"{SUBNET_BASE}.")}


def _pick_subnet() -> str:
    taken = _taken_subnets()
    for _ in range(100):
        subnet = f"{SUBNET_BASE}.{secrets.randbelow(250) + 1}"
        if subnet not in taken:
            return subnet
    raise SetupError(f"no free /24 in {SUBNET_BASE}.0.0/16")


def _ip(*args: str, netns: str | None = None) -> None:
    run(["ip", *(["-n", netns] if netns else []), *args], timeout=30)


def _iptables(netns: str, *args: str) -> None:
    run(["nsenter", f"--net={NETNS_DIR / netns}", "--", "iptables", "-w", "5", *args],
        timeout=30)


@dataclass
class S3Server:
    """moto in a namespace of its own; reach it at :attr:`url` from anywhere in the session."""

    netns: str
    ip: str
    bucket: str
    log: Path
    port: int = S3_PORT
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net={NETNS_DIR / self.netns}", "--", sys.executable, "-m",
                 "moto.server", "-H", "0.0.0.0", "-p", str(self.port)],  # noqa: S104
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with opener.open(f"{self.url}/moto-api/", timeout=2):
                    break
            except OSError:
                if self.proc is None or self.proc.poll() is not None \
                        or time.monotonic() > deadline:
                    raise SetupError(f"moto did not answer on {self.url}; "
                                     f"{tail(self.log)}") from None
                time.sleep(0.1)
        self.client().create_bucket(Bucket=self.bucket)

    def client(self) -> Any:
        """A boto3 S3 client for the session's server (from the tests' namespace)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=Config(proxies={}, retries={"total_max_attempts": 2}))

    def objects(self, prefix: str = "") -> list[str]:
        """Every key in the session's bucket that starts with ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


# The hosts

@dataclass
class Names:
    """Unique volume names for one test (the same name on every host)."""

    prefix: str
    made: list[str] = field(default_factory=list)

    def volume(self, hint: str) -> str:
        name = f"{self.prefix}-{len(self.made) + 1}-{hint}"
        self.made.append(name)
        return name


@dataclass
class Host:
    """One Docker engine in its own network namespace, with the plugin enabled as ``pyvol``."""

    name: str
    token: str
    ip: str
    tmp: Path
    """``/tmp/pyvol-mh-T/NAME``: data root, plugin data directory, daemon log."""
    netns: str = field(init=False)
    exec_root: Path = field(init=False)
    socket: Path = field(init=False)
    data_root: Path = field(init=False)
    data_dir: Path = field(init=False)
    """The plugin's ``data.source``: volumes are in ``data_dir / "volumes" / NAME``."""
    log: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.netns = f"{PREFIX}{self.token}-{self.name}"
        self.exec_root = RUN_ROOT / self.netns
        self.socket = RUN_ROOT / f"{self.netns}.sock"
        self.data_root = self.tmp / "docker"
        self.data_dir = self.tmp / "data"
        self.log = self.tmp / "dockerd.log"

    # the docker CLI against this engine

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = f"unix://{self.socket}"
        return env

    def try_docker(self, *args: str, timeout: float = 90) -> Result:
        """``docker ARGS`` against this engine, whatever its outcome."""
        return run(["docker", *args], timeout=timeout, check=False, env=self.env)

    def docker(self, *args: str, timeout: float = 90) -> str:
        """``docker ARGS`` against this engine; its stdout, or DockerError with its stderr."""
        result = self.try_docker(*args, timeout=timeout)
        if result.returncode != 0:
            raise DockerError(result)
        return result.stdout

    def volume_dir(self, volume: str) -> Path:
        return self.data_dir / "volumes" / volume

    def inspect_volume(self, volume: str) -> dict[str, Any]:
        found = json.loads(self.docker("volume", "inspect", volume))
        assert isinstance(found, list) and len(found) == 1, found
        data: dict[str, Any] = found[0]
        return data

    def s3_status(self, volume: str) -> dict[str, Any]:
        """``Status.s3`` of ``docker volume inspect VOLUME``."""
        status = self.inspect_volume(volume)["Status"]
        assert "s3" in status, status
        s3: dict[str, Any] = status["s3"]
        return s3

    def wait_s3(self, volume: str, done: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = 60) -> dict[str, Any]:
        """Poll ``Status.s3`` until ``done`` accepts it, and return it; fail after ``timeout``
        seconds, showing the last status seen."""
        deadline = time.monotonic() + timeout
        while True:
            s3 = self.s3_status(volume)
            if done(s3):
                return s3
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} "
                                     f"(volume {volume} on host {self.name}); last Status.s3: "
                                     f"{s3}")
            time.sleep(POLL)

    # the engine's life

    def dockerd_command(self) -> list[str]:
        return [
            "nsenter", f"--net={NETNS_DIR / self.netns}", "--", "dockerd",
            "--config-file", str(self.tmp / "daemon.json"),
            "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
            "--pidfile", str(self.exec_root / "dockerd.pid"), "-H", f"unix://{self.socket}",
            "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
        ]

    def start(self, timeout: float = 60) -> None:
        """Start dockerd (after :meth:`kill9` or :meth:`stop` too) and wait until it answers;
        an enabled plugin comes back on its own (dockerd enables it at start)."""
        if self.running():
            raise SetupError(f"host {self.name}: dockerd (pid {self.pid()}) already runs")
        self.tmp.mkdir(parents=True, exist_ok=True)
        (self.tmp / "daemon.json").write_text("{}\n")
        self.exec_root.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.dockerd_command(), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.try_docker("version", "--format", "{{.Server.Version}}",
                              timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SetupError(f"host {self.name}: dockerd did not answer on {self.socket} "
                                 f"(exit code {self.proc.poll()}); {tail(self.log)}")
            time.sleep(0.1)

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def running(self) -> bool:
        return self.pid() is not None

    def processes(self) -> list[int]:
        """What :meth:`kill9` kills: see :func:`processes_of`."""
        return processes_of(self.netns)

    def kill9(self) -> list[int]:
        """Power cut: SIGKILL every process of this host and return their PIDs.

        That is every process in the host's network namespace (dockerd, its containerd, the
        containerd shims, the plugin's processes, which use the host network) and all their
        descendants (containers, whatever their network).  Nothing else: the namespace, its
        link, the data directories and the mounts stay as they were, as on a machine that lost
        power.  :meth:`start` brings the engine back.
        """
        killed = kill_all(self.netns)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        return killed

    def stop(self, timeout: float = 60) -> None:
        """``systemctl stop docker``: SIGTERM to dockerd, which stops containers and plugins;
        whatever still runs after ``timeout`` seconds is killed as by :meth:`kill9`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill9()

    def restart(self, kill: bool = False) -> None:
        """Stop the engine (gracefully, or with :meth:`kill9`), then :meth:`boot` it."""
        if kill:
            self.kill9()
        else:
            self.stop()
        self.boot()

    def boot(self) -> None:
        """Start a stopped or killed engine as after a reboot: the mounts the old one left are
        detached and its exec root emptied first; returns once the plugin is enabled again
        (dockerd enables at start the plugins that were enabled)."""
        for path in (self.data_root, self.exec_root, self.data_dir):
            unmount_under(path)
        shutil.rmtree(self.exec_root, ignore_errors=True)
        self.start()
        wait_for(self.plugin_enabled, 60, f"the plugin on host {self.name} to be enabled again",
                 pause=POLL)

    def reaches(self, ip: str, port: int, timeout: float = 2) -> bool:
        """Whether a TCP connection from this host's namespace to ``ip:port`` opens (and sees
        no reset) within ``timeout`` seconds."""
        probe = ("import socket, sys\n"
                 "with socket.create_connection((sys.argv[1], int(sys.argv[2])), "
                 "timeout=float(sys.argv[3])) as s:\n"
                 "    s.sendall(b'HEAD / HTTP/1.0\\r\\n\\r\\n'); s.recv(1)\n")
        result = run(["nsenter", f"--net={NETNS_DIR / self.netns}", "--", sys.executable, "-c",
                      probe, ip, str(port), str(timeout)], timeout=timeout + 30, check=False)
        return result.returncode == 0

    def received(self) -> int:
        """Bytes this host has received over its link so far (its eth0's rx counter): what
        its engine and plugin downloaded, from S3 among others."""
        result = run(["nsenter", f"--net={NETNS_DIR / self.netns}", "--", "cat",
                      "/proc/net/dev"])
        for line in result.stdout.splitlines():
            name, _, counters = line.partition(":")
            if name.strip() == "eth0":
                return int(counters.split()[0])
        raise AssertionError(f"no eth0 in host {self.name}'s /proc/net/dev: {result.stdout}")

    def plugin_socket(self) -> Path:
        """The socket of this host's plugin (dockerd keeps it in /run/docker/plugins/ID)."""
        plugin_id = self.docker("plugin", "inspect", "--format", "{{.Id}}", ALIAS).strip()
        return Path("/run/docker/plugins") / plugin_id / "pyvol.sock"

    def pyvol(self, *args: str, timeout: float = 90) -> str:
        """The ``pyvol`` CLI against this host's plugin; its stdout, or DockerError."""
        command = [sys.executable, "-m", "plugin.cli", "--socket", str(self.plugin_socket())]
        result = run([*command, *args], timeout=timeout, check=False, env=self.env, cwd=REPO)
        if result.returncode != 0:
            raise DockerError(result)
        return result.stdout

    def plugin_enabled(self) -> bool:
        result = self.try_docker("plugin", "inspect", "--format", "{{.Enabled}}", ALIAS)
        return result.returncode == 0 and result.stdout.strip() == "true"

    # setup steps

    def load_image(self, archive: Path) -> None:
        self.docker("load", "-i", str(archive), timeout=120)

    def install_plugin(self, s3: S3Server, context: Path) -> None:
        """``docker plugin create pyvol CONTEXT``; set its data directory and S3; enable."""
        self.data_dir.mkdir(mode=0o711, exist_ok=True)
        self.docker("plugin", "create", ALIAS, str(context), timeout=300)
        self.docker("plugin", "set", ALIAS, f"data.source={self.data_dir}",
                    f"S3_ENDPOINT_URL={s3.url}", f"S3_BUCKET={s3.bucket}",
                    f"AWS_REGION={REGION}", f"AWS_ACCESS_KEY_ID={ACCESS_KEY}",
                    f"AWS_SECRET_ACCESS_KEY={SECRET_KEY}", f"HOST_NAME=host-{self.name}",
                    "LOG_LEVEL=DEBUG")
        self.docker("plugin", "enable", ALIAS, timeout=120)

    def clear(self) -> None:
        """Remove every container and every volume of this engine (between tests)."""
        ids = self.docker("ps", "-aq").split()
        if ids:
            self.docker("rm", "-f", *ids, timeout=120)
        names = self.docker("volume", "ls", "-q").split()
        if names:
            self.docker("volume", "rm", "-f", *names, timeout=120)


@dataclass
class Hosts:
    """A session's hosts (``hosts["a"]``), its S3 server and the network between them."""

    token: str
    subnet: str
    tmp: Path
    s3: S3Server
    hosts: dict[str, Host]
    timings: Timings = field(default_factory=Timings)
    setup_seconds: float = 0.0
    build_note: str = ""
    _cut: dict[str, CutMode] = field(default_factory=dict)

    @property
    def bridge_netns(self) -> str:
        return f"{PREFIX}{self.token}-br"

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    # partitions

    def cut(self, host: Host, how: CutMode = "reject") -> None:
        """Cut ``host`` off the network: from S3 and from the other hosts; nothing else
        changes, and its containers (``--network none``) do not notice.

        ``reject``: firewall rules in the host's namespace refuse every packet through its
        link, so every request fails at once, open connections included ("Connection reset by
        peer", "Connection refused"): the store looks down.  ``down``: its link goes down;
        new connections fail at once ("Network is unreachable"), open ones wait for their
        timeouts.  ``drop``: its port on the bridge goes down, so its packets vanish and
        every connection times out: a partition the host cannot see.
        """
        if self.is_cut(host):
            raise AssertionError(f"host {host.name} is already cut ({self._cut[host.name]})")
        if how == "reject":
            for rule in REJECT_RULES:
                _iptables(host.netns, "-I", *rule)
        elif how == "down":
            _ip("link", "set", "eth0", "down", netns=host.netns)
        else:
            _ip("link", "set", f"p-{host.name}", "down", netns=self.bridge_netns)
        self._cut[host.name] = how

    def heal(self, host: Host) -> None:
        """Undo :meth:`cut`; a host that is not cut is left as it is."""
        how = self._cut.pop(host.name, None)
        if how == "reject":
            for rule in REJECT_RULES:
                _iptables(host.netns, "-D", *rule)
        elif how == "down":
            _ip("link", "set", "eth0", "up", netns=host.netns)
        elif how == "drop":
            _ip("link", "set", f"p-{host.name}", "up", netns=self.bridge_netns)
        if how is not None:  # back when it reaches S3 again (a port takes a moment to forward)
            wait_for(lambda: host.reaches(self.s3.ip, self.s3.port, timeout=1), 30,
                     f"host {host.name} to reach S3 again after heal", pause=POLL)

    def is_cut(self, host: Host) -> bool:
        return host.name in self._cut

    # swarm

    @contextlib.contextmanager
    def swarm(self, manager: str = "a", timeout: float = 60) -> Iterator[Host]:
        """A swarm of every host, ``manager`` its only manager; all leave it at the end."""
        lead = self.hosts[manager]
        lead.docker("swarm", "init", "--advertise-addr", lead.ip, "--listen-addr",
                    f"{lead.ip}:2377")
        try:
            token = lead.docker("swarm", "join-token", "-q", "worker").strip()
            for host in self:
                if host is not lead:
                    host.docker("swarm", "join", "--token", token, "--advertise-addr",
                                host.ip, "--listen-addr", f"{host.ip}:2377",
                                f"{lead.ip}:2377", timeout=timeout)

            def all_ready() -> bool:
                rows = lead.docker("node", "ls", "--format", "{{.Status}}").split()
                return rows == ["Ready"] * len(self.hosts)
            wait_for(all_ready, timeout, "every host to be a Ready swarm node", pause=0.5)
            yield lead
        finally:
            for host in self:
                if host is not lead:
                    host.try_docker("swarm", "leave", "--force", timeout=60)
            lead.try_docker("swarm", "leave", "--force", timeout=60)

    # between tests

    def reset(self) -> None:
        """Heal every cut, start every stopped engine, remove every container and volume."""
        for host in self:
            if self.is_cut(host):
                self.heal(host)
            if not host.running():
                host.restart(kill=True)
            host.clear()

    # life

    @classmethod
    def start(cls, names: Iterable[str] = ("a", "b")) -> Hosts:
        """Set up a session; on failure, remove what was made and raise SetupError."""
        names = list(names)
        bad = [n for n in names if not (n.isascii() and n.isalnum() and n.islower())
               or len(n) > 8 or n in ("br", "s3", "machine")]
        if bad or len(set(names)) != len(names) or not names:
            raise SetupError(f"host names must be distinct, 1-8 lowercase letters or digits, "
                             f"not br, s3 or machine: {names}")
        started = time.monotonic()
        token = secrets.token_hex(3)
        # The owner file first: a session killed at any later point is found by it.
        (RUN_ROOT / f"{PREFIX}{token}.owner").write_text(f"{os.getpid()}\n")
        session: Hosts | None = None
        try:
            tmp = TMP_ROOT / f"{PREFIX}{token}"
            tmp.mkdir(mode=0o711)
            subnet = _pick_subnet()
            s3 = S3Server(netns=f"{PREFIX}{token}-s3", ip=f"{subnet}.{S3_HOST_ID}",
                          bucket=f"{PREFIX}{token}", log=tmp / "moto.log")
            hosts = {name: Host(name, token, f"{subnet}.{FIRST_HOST_ID + i}", tmp / name)
                     for i, name in enumerate(names)}
            session = cls(token, subnet, tmp, s3, hosts)
            session._bring_up()
        except BaseException as exc:
            left = session.close() if session is not None else destroy(token)
            if left:
                raise SetupError(f"the setup failed ({exc}), and its cleanup left: {left}") \
                    from exc
            raise
        session.setup_seconds = time.monotonic() - started
        return session

    def _bring_up(self) -> None:
        t = self.timings
        with t.step("network"):
            self._network()
        with ThreadPoolExecutor(max_workers=len(self.hosts) + 2) as pool:
            self.s3.start()
            build = pool.submit(self._timed, "plugin build",
                                lambda: ensure_plugin_build(self.token, self.tmp / "build.log"))
            image = self.tmp / "busybox.tar"
            saved = pool.submit(self._timed, "image save", lambda: main_docker(
                "save", "-o", str(image), BUSYBOX))
            engines = {h.name: pool.submit(self._timed, f"dockerd {h.name}", h.start)
                       for h in self}
            with t.step("moto"):
                self.s3.wait_ready()
            for future in (saved, *engines.values()):
                future.result()
            loads = [pool.submit(self._timed, f"image load {h.name}", h.load_image, image)
                     for h in self]
            self.build_note = build.result()
            with t.step("plugin contexts"):
                contexts = {h.name: self._plugin_context(h) for h in self}
            plugins = [pool.submit(self._timed, f"plugin {h.name}", h.install_plugin,
                                   self.s3, contexts[h.name]) for h in self]
            for future in (*loads, *plugins):
                future.result()
        for context in contexts.values():
            shutil.rmtree(context, ignore_errors=True)

    def _timed(self, what: str, work: Callable[..., Any], *args: Any) -> Any:
        with self.timings.step(what):
            return work(*args)

    def _network(self) -> None:
        br = self.bridge_netns
        run(["ip", "netns", "add", br])
        _ip("link", "set", "lo", "up", netns=br)
        _ip("link", "add", "br0", "type", "bridge", netns=br)
        _ip("link", "set", "br0", "up", netns=br)
        members = [(self.s3.netns, "s3", self.s3.ip), *((h.netns, h.name, h.ip) for h in self)]
        for netns, name, ip in members:
            run(["ip", "netns", "add", netns])
            _ip("link", "set", "lo", "up", netns=netns)
            _ip("link", "add", "eth0", "type", "veth", "peer", "name", f"p-{name}",
                "netns", br, netns=netns)
            _ip("addr", "add", f"{ip}/24", "dev", "eth0", netns=netns)
            _ip("link", "set", "eth0", "up", netns=netns)
            _ip("link", "set", f"p-{name}", "master", "br0", "up", netns=br)
        machine = f"pmh-{self.token}"
        _ip("link", "add", machine, "type", "veth", "peer", "name", "p-machine", "netns", br)
        _ip("addr", "add", f"{self.subnet}.{MACHINE_ID}/24", "dev", machine)
        _ip("link", "set", machine, "up")
        _ip("link", "set", "p-machine", "master", "br0", "up", netns=br)

    def _plugin_context(self, host: Host) -> Path:
        """build/ for ``host``: its rootfs hard-linked (copied if that fails), and config.json
        with a description of its own, so that its plugin ID is the host's own."""
        context = self.tmp / f"plugin-{host.name}"
        context.mkdir()
        config = json.loads((BUILD / "config.json").read_text())
        config["description"] += f" [{PREFIX}{self.token} host {host.name}]"
        (context / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if run(["cp", "-al", str(BUILD / "rootfs"), str(context / "rootfs")],
               check=False).returncode != 0:
            shutil.rmtree(context / "rootfs", ignore_errors=True)
            run(["cp", "-a", str(BUILD / "rootfs"), str(context / "rootfs")], timeout=300)
        return context

    def close(self) -> list[str]:
        """Tear everything down; returns what could not be removed (empty when all went)."""
        procs = [h.proc for h in self if h.proc is not None]
        return destroy(self.token, [*procs, *([self.s3.proc] if self.s3.proc else [])])


def _plugin_run_dirs(tmp: Path) -> list[Path]:
    """``/run/docker/plugins/ID`` of the plugins of the engines under ``tmp``: dockerd 20.10
    keeps them there whatever its exec root, and a killed dockerd leaves them."""
    return [Path("/run/docker/plugins") / d.name for d in tmp.glob("*/docker/plugins/*")
            if len(d.name) == 64 and all(c in "0123456789abcdef" for c in d.name)]


def destroy(token: str, procs: Iterable[subprocess.Popen[bytes]] = ()) -> list[str]:
    """Remove everything of session ``token``, found by its names: kill the processes in its
    namespaces (and their descendants), detach the mounts under its directories, delete the
    namespaces (which deletes their links) and the directories.  ``procs``: the session's own
    children, waited for so that they do not stay zombies.  Returns what is left."""
    left: list[str] = []
    netns_names = sorted(p.name for p in NETNS_DIR.glob(f"{PREFIX}{token}-*")) \
        if NETNS_DIR.is_dir() else []
    for netns in netns_names:
        try:
            kill_all(netns)
        except SetupError as exc:
            left.append(str(exc))
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    tmp = TMP_ROOT / f"{PREFIX}{token}"
    run_dirs = [*sorted(RUN_ROOT.glob(f"{PREFIX}{token}-*")), *_plugin_run_dirs(tmp)]
    for path in (tmp, *run_dirs):
        unmount_under(path)
    for netns in netns_names:
        result = run(["ip", "netns", "del", netns], check=False)
        if result.returncode != 0:
            left.append(describe(result))
    run(["ip", "link", "del", f"pmh-{token}"], check=False)
    for path in (tmp, *run_dirs):
        still = mounts_under(path)
        if still:
            left.append(f"still mounted under {path}: {still}")
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    loops = loops_under(tmp)
    if loops:
        left.append(f"loop devices still backed by files under {tmp}: {loops}")
    (RUN_ROOT / f"{PREFIX}{token}.owner").unlink(missing_ok=True)
    return left


def leftover_tokens() -> list[str]:
    """Tokens of earlier sessions whose process is gone (killed before its teardown)."""
    tokens = []
    for owner in RUN_ROOT.glob(f"{PREFIX}*.owner"):
        token = owner.name.removeprefix(PREFIX).removesuffix(".owner")
        try:
            pid = int(owner.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        if not pid or not alive(pid):
            tokens.append(token)
    return tokens


def environment_problem() -> str | None:
    """Why the multi-host tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "they must run as root (network namespaces, dockerd)"
    for command in ("docker", "dockerd", "nsenter", "ip", "make"):
        if shutil.which(command) is None:
            return f"there is no {command} on PATH (`make provision`)"
    info = main_docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    if info.returncode != 0:
        return f"the main Docker engine does not answer (`make provision`): {info.stderr[-300:]}"
    if main_docker("image", "inspect", BUSYBOX, check=False).returncode != 0:
        return f"the test image {BUSYBOX} is missing; build it with `scripts/provision.sh images`"
    probe = run([sys.executable, "-c", "import moto.server, boto3"], check=False)
    if probe.returncode != 0:
        return f"{sys.executable} cannot import moto.server (`make .venv/.installed`)"
    return None
