"""Fixtures of the end-to-end tier: a real Docker engine, the plugin installed as a user does.

The session builds the plugin (``make plugin``), pushes it to the local registry as
127.0.0.1:5000/pyvol:e2e (and the same build as :e2e2, for the upgrade test), removes the
local copy and installs it from the registry under the alias ``pyvol`` with a data directory
of its own under /tmp.  At the end it removes its containers, volumes, plugin and directory.

Without a usable engine the tests skip, saying why; with ``PYVOL_E2E=required`` (CI sets it
in .ci/run) they fail instead.  ``PYVOL_E2E_REUSE=1`` skips the build when both tags are
already in the registry (for fast iteration; CI always builds).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import (
    ALIAS,
    DRIVER,
    LABEL,
    PYTHON_IMAGE,
    REF,
    REF2,
    REPO,
    TMP_PREFIX,
    Installed,
    Scenario,
    cannot_run,
    describe,
    docker,
    engine_problem,
    plugin_field,
    registry_has,
    registry_retag,
    run,
)

from tests.support.mounts import mounts_under

_tags = itertools.count(1)
LOCK = Path("/run/lock" if Path("/run/lock").is_dir() else "/tmp") / "pyvol-e2e.lock"
LOCK_WAIT = 300.0


@pytest.fixture(scope="session", autouse=True)
def engine() -> None:
    """A Docker engine, the test images and the local registry, or skip (fail in CI)."""
    problem = engine_problem()
    if problem is not None:
        cannot_run(problem)


def _ours(source: str) -> bool:
    path = Path(source)
    return path.name == "data" and path.parent.parent == Path("/tmp") \
        and path.parent.name.startswith(TMP_PREFIX)


def _remove_everything_of_the_plugin() -> None:
    """Volumes of the installed ``pyvol`` (which the caller knows to be ours), then it."""
    if plugin_field("{{.Enabled}}") == "true":
        for name in docker("volume", "ls", "-q", "--filter", f"driver={DRIVER}").stdout.split():
            docker("volume", "rm", "-f", name)
    docker("plugin", "rm", "-f", ALIAS, timeout=120)


def _clear_leftovers() -> None:
    """Remove what an interrupted earlier run left behind; refuse to touch anything else."""
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}").stdout.split()
    if ids:
        docker("rm", "-f", *ids, timeout=120)
    if docker("plugin", "inspect", ALIAS).returncode != 0:
        return
    mounts = json.loads(plugin_field("{{json .Settings.Mounts}}"))
    sources = [m.get("Source") or "" for m in mounts if m.get("Name") == "data"]
    if not sources or not all(_ours(s) for s in sources):
        cannot_run(
            f"a plugin named {ALIAS!r} that these tests did not install is present (data in "
            f"{', '.join(sources) or '?'}); they install their own under that alias and leave "
            f"yours alone: remove it (`docker plugin rm -f {ALIAS}`) or use another machine")
    _remove_everything_of_the_plugin()
    for source in sources:
        shutil.rmtree(Path(source).parent, ignore_errors=True)


def _build_and_push() -> None:
    if os.environ.get("PYVOL_E2E_REUSE") == "1" and registry_has(REF) and registry_has(REF2):
        return
    # The local base image by default: the build then needs no network beyond 127.0.0.1.
    base = os.environ.get("PYVOL_E2E_BASE_IMAGE") or PYTHON_IMAGE
    for command in (["make", "plugin", f"PLUGIN_NAME={REF}", f"BASE_IMAGE={base}"],
                    ["docker", "plugin", "push", REF]):
        result = run(command, timeout=900, cwd=REPO)
        if result.returncode != 0:
            pytest.fail(f"building the plugin failed: {describe(result)}", pytrace=False)
    docker("plugin", "rm", "-f", REF)
    registry_retag(REF, REF2)


@contextlib.contextmanager
def _one_session_at_a_time() -> Iterator[None]:
    """The engine has one alias ``pyvol``: sessions on the same host take turns."""
    with LOCK.open("a+") as f:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.seek(0)
                    pytest.fail(f"another end-to-end session ({f.read().strip() or '?'}) still "
                                f"holds {LOCK} after {LOCK_WAIT:.0f} s", pytrace=False)
                time.sleep(1)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def pyvol_plugin(engine: None) -> Iterator[Installed]:
    with _one_session_at_a_time():
        yield from _installed_plugin()


def _installed_plugin() -> Iterator[Installed]:
    _clear_leftovers()
    _build_and_push()
    token = secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{token}-", dir="/tmp"))
    plugin = Installed(token=token, tmp=tmp, data=tmp / "data")
    # A bind mount's source must exist before enable: neither dockerd nor runc creates it.
    # The default source (/var/lib/docker-plugins/pyvol) is deliberately NOT created: after
    # `docker plugin upgrade` dockerd falls back to it (see test_e2e_lifecycle.py), and a
    # missing directory makes that fail loudly instead of serving an empty or foreign root.
    plugin.data.mkdir(mode=0o711)
    try:
        plugin.install()
        yield plugin
    finally:
        ids = docker("ps", "-aq", "--filter", f"label={plugin.containers_label}").stdout.split()
        if ids:
            docker("rm", "-f", *ids, timeout=120)
        if docker("plugin", "inspect", ALIAS).returncode == 0:
            if plugin_field("{{.Enabled}}") != "true":
                docker("plugin", "set", ALIAS, f"data.source={plugin.data}")
                docker("plugin", "enable", ALIAS, timeout=120)
            _remove_everything_of_the_plugin()
        if not mounts_under(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def scenario(pyvol_plugin: Installed) -> Iterator[Scenario]:
    """Unique names and labelled containers for one test; all removed when it ends."""
    s = Scenario(pyvol_plugin, tag=f"{pyvol_plugin.token}{next(_tags):02d}")
    try:
        yield s
    finally:
        s.cleanup()
