"""Volume content is hostile: a container swaps path components, plants FIFOs, and makes
sparse and very deep trees, at any instant, while pyvol snapshots, clones, measures or pushes.

Races are made to happen: either deterministically (the swap runs between the scan and the
copy, by wrapping the scan the code under test calls), or by a swapper thread looping while
the real server snapshots and clones, with a bound on every call.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from functional_support import Plugin, PluginProcess, StartServer
from hostile_support import (
    allocated,
    build_deep,
    call,
    data_map,
    walk,
)

import snapshots.store as snapshots_module
from backends import tree as tree_module
from backends.fs import remove_tree
from backends.tree import DirectoryView, Entry, copy_tree
from snapshots.store import SnapshotStore
from tests.support.trees import files_containing

CANARY = b"HOST-CANARY: bytes from outside the volume, never to be copied into pyvol's data"
INSIDE = b"inside the volume\n"
BOUND = 20.0
"""Seconds any one operation may take here; a blocked one fails the test instead of hanging."""


def data_dir(plugin: Plugin, name: str) -> Path:
    return Path(plugin.ok("VolumeDriver.Path", {"Name": name})["Mountpoint"])


def swap_after_scan(monkeypatch: pytest.MonkeyPatch, module: Any,
                    swap: Callable[[], None]) -> list[int]:
    """Make ``module.scan`` run ``swap`` once the scan is complete: the instant between the
    scan and the copy, in the old code and the new alike."""
    real = module.scan
    done: list[int] = []

    def scan_then_swap(root: Any) -> Iterator[Entry]:
        yield from real(root)
        if not done:
            swap()
            done.append(1)

    monkeypatch.setattr(module, "scan", scan_then_swap)
    return done


# 1. a directory swapped for a symlink to a host directory


def build_chain(data: Path, outside: Path, depth: int) -> tuple[list[str], Callable[[], None]]:
    """``data/c0/c1/.../secret`` (harmless) and ``outside/c<depth>.../secret`` (the canary);
    the returned swap replaces ``data/c0/.../c<depth-1>`` by a symlink to ``outside``."""
    chain = [f"c{i}" for i in range(depth + 2)]
    inner = data.joinpath(*chain)
    inner.mkdir(parents=True)
    (inner / "secret").write_bytes(INSIDE)
    (data / "plain").write_bytes(INSIDE)
    twin = outside.joinpath(*chain[depth:])
    twin.mkdir(parents=True)
    (twin / "secret").write_bytes(CANARY)
    swapped = data.joinpath(*chain[:depth])

    def swap() -> None:
        swapped.rename(swapped.with_name("moved-away"))
        swapped.symlink_to(outside)

    return chain, swap


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_a_directory_swapped_for_a_symlink_leaks_nothing_into_a_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int) -> None:
    data, outside = tmp_path / "vol", tmp_path / "outside"
    chain, swap = build_chain(data, outside, depth)
    store = SnapshotStore(tmp_path / "root")
    swapped = swap_after_scan(monkeypatch, snapshots_module, swap)
    store.create("v", data, "s1")
    assert swapped, "the swap did not run between the scan and the copy"
    assert files_containing(store.root, CANARY) == []
    restored = tmp_path / "restored"
    restored.mkdir()
    store.populate_from("v", "s1")(restored)
    assert files_containing(restored, CANARY) == []
    paths = {e.path for e in store.entries("v", "s1")}
    assert "/".join([*chain, "secret"]) not in paths, "a file read through the link"
    assert (restored / "plain").read_bytes() == INSIDE


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_a_directory_swapped_for_a_symlink_leaks_nothing_into_a_clone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int) -> None:
    data, outside, clone = tmp_path / "vol", tmp_path / "outside", tmp_path / "clone"
    chain, swap = build_chain(data, outside, depth)
    clone.mkdir()
    swapped = swap_after_scan(monkeypatch, tree_module, swap)
    copy_tree(data, clone)
    assert swapped
    assert files_containing(clone, CANARY) == []
    assert not clone.joinpath(*chain, "secret").exists()
    assert (clone / "plain").read_bytes() == INSIDE


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_a_push_view_never_reads_through_a_swapped_directory(
        tmp_path: Path, depth: int) -> None:
    data, outside = tmp_path / "vol", tmp_path / "outside"
    chain, swap = build_chain(data, outside, depth)
    view = DirectoryView(data)
    entries = {e.path: e for e in view.entries()}
    swap()
    with pytest.raises(OSError) as raised:
        view.open(entries["/".join([*chain, "secret"])])
    assert raised.value.errno == errno.ELOOP
    with view.open(entries["plain"]) as f:
        assert f.read() == INSIDE


def test_the_open_hook_swaps_at_the_last_instant_and_still_nothing_leaks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The swap at the very moment a file is opened (``tree.BEFORE_OPEN``), each level."""
    for depth in (1, 3):
        data, outside = tmp_path / f"vol{depth}", tmp_path / f"outside{depth}"
        chain, swap = build_chain(data, outside, depth)
        target = "/".join([*chain, "secret"])
        calls: list[str] = []

        def hook(path: str, target: str = target, swap: Callable[[], None] = swap,
                 calls: list[str] = calls) -> None:
            calls.append(path)
            if path == target:
                swap()

        monkeypatch.setattr(tree_module, "BEFORE_OPEN", hook)
        store = SnapshotStore(tmp_path / f"root{depth}")
        store.create("v", data, "s1")
        assert target in calls
        assert files_containing(store.root, CANARY) == []


def test_swapping_while_the_server_snapshots_and_clones_leaks_nothing(
        server: PluginProcess, plugin: Plugin, tmp_path: Path) -> None:
    """A container swapping ``d`` for a symlink to a host directory in a tight loop."""
    plugin.ok("VolumeDriver.Create", {"Name": "race", "Opts": {}})
    data = data_dir(plugin, "race")
    outside = tmp_path / "outside"
    outside.mkdir()
    (data / "d").mkdir()
    for i in range(60):
        (data / "d" / f"f{i:03}").write_bytes(INSIDE)
        (outside / f"f{i:03}").write_bytes(CANARY)
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        d, real = data / "d", data / "d.real"
        while not stop.is_set():
            d.rename(real)
            d.symlink_to(outside)
            time.sleep(0.0005)
            d.unlink()
            real.rename(d)
            swaps[0] += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        for i in range(15):
            reply = call(server.socket, "pyvol/snapshot/create",
                         {"Volume": "race", "Name": f"s{i}"}, BOUND)
            assert not reply.get("Err"), reply
            if i % 5 == 0:
                reply = call(server.socket, "VolumeDriver.Create",
                             {"Name": f"clone{i}", "Opts": {"from": "race"}}, BOUND)
                assert not reply.get("Err"), reply
    finally:
        stop.set()
        thread.join(BOUND)
    assert swaps[0] > 10, "the swapper did not run"
    for i in range(15):
        reply = call(server.socket, "VolumeDriver.Create",
                     {"Name": f"from-s{i}", "Opts": {"from": f"race@s{i}"}}, BOUND)
        assert not reply.get("Err"), reply
    assert files_containing(server.root, CANARY) == []


# 2. FIFOs


def test_a_file_swapped_for_a_fifo_mid_snapshot_is_skipped_without_blocking(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "vol"
    data.mkdir()
    (data / "f").write_bytes(INSIDE)
    (data / "g").write_bytes(INSIDE)

    def swap() -> None:
        (data / "f").unlink()
        os.mkfifo(data / "f")

    swap_after_scan(monkeypatch, snapshots_module, swap)
    store = SnapshotStore(tmp_path / "root")
    thread = threading.Thread(target=store.create, args=("v", data, "s1"), daemon=True)
    thread.start()
    thread.join(BOUND)
    blocked = thread.is_alive()
    if blocked:  # release the old code's blocked open so the test run can go on
        fd = os.open(data / "f", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(BOUND)
    assert not blocked, "the snapshot blocked on a FIFO"
    assert [e.path for e in store.entries("v", "s1")] == [".", "g"]


def test_a_file_swapped_for_a_fifo_is_never_opened_by_a_clone_or_a_push(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, clone = tmp_path / "vol", tmp_path / "clone"
    data.mkdir()
    clone.mkdir()
    (data / "f").write_bytes(INSIDE)

    def swap() -> None:
        (data / "f").unlink()
        os.mkfifo(data / "f")

    view = DirectoryView(data)
    entry = view.entries()[1]
    swap()
    result: list[object] = []

    def read() -> None:
        try:
            view.open(entry)
        except OSError as exc:
            result.append(exc.errno)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), "the push view blocked on a FIFO"
    assert result == [errno.ENOENT]
    (data / "f").unlink()
    (data / "f").write_bytes(INSIDE)
    swap_after_scan(monkeypatch, tree_module, swap)
    thread = threading.Thread(target=copy_tree, args=(data, clone), daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), "the clone blocked on a FIFO"
    assert list(clone.iterdir()) == []


def test_fifos_in_a_volume_never_block_the_server(
        server: PluginProcess, plugin: Plugin) -> None:
    """A FIFO at rest is stored as a FIFO; one swapped in while snapshots run is skipped."""
    plugin.ok("VolumeDriver.Create", {"Name": "pipes", "Opts": {}})
    data = data_dir(plugin, "pipes")
    os.mkfifo(data / "fifo")
    for i in range(40):
        (data / f"f{i:02}").write_bytes(INSIDE * 100)
    stop = threading.Event()

    def swapper() -> None:
        i = 0
        while not stop.is_set():
            path = data / f"f{i % 40:02}"
            path.unlink()
            os.mkfifo(path)
            time.sleep(0.001)
            path.unlink()
            path.write_bytes(INSIDE * 100)
            i += 1

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        for i in range(10):
            reply = call(server.socket, "pyvol/snapshot/create",
                         {"Volume": "pipes", "Name": f"s{i}"}, BOUND)
            assert not reply.get("Err"), reply
    finally:
        stop.set()
        thread.join(BOUND)
        for i in range(40):  # release an open blocked on one of them (the old code)
            with contextlib.suppress(OSError):
                os.close(os.open(data / f"f{i:02}", os.O_WRONLY | os.O_NONBLOCK))
    reply = call(server.socket, "VolumeDriver.Create",
                 {"Name": "pipes-copy", "Opts": {"from": "pipes@s9"}}, BOUND)
    assert not reply.get("Err"), reply
    assert stat.S_ISFIFO(os.lstat(data_dir(plugin, "pipes-copy") / "fifo").st_mode)


# 10. sparse files


MiB = 1 << 20


def make_sparse(data: Path) -> None:
    with open(data / "big", "wb") as f:
        f.truncate(2 << 30)
    with open(data / "mixed", "wb") as f:
        f.write(b"A" * MiB)
        f.seek(32 * MiB)
        f.write(b"B" * MiB)
        f.truncate(64 * MiB)


def check_sparse(path: Path, mixed: str) -> None:
    """Sizes and content as made, holes where they were (hashing 2 GiB of zeros is not
    needed: a file with no data extent at all reads as zeros)."""
    assert allocated(path) < 8 * MiB, f"{path}: {allocated(path)} bytes allocated"
    assert (path / "big").stat().st_size == 2 << 30
    assert data_map(path / "big") == []
    assert (path / "mixed").stat().st_size == 64 * MiB
    assert data_map(path / "mixed") == [(0, MiB), (32 * MiB, 33 * MiB)]
    assert hashlib.sha256((path / "mixed").read_bytes()).hexdigest() == mixed


def test_sparse_files_stay_sparse_through_snapshot_clone_and_restore(
        server: PluginProcess, plugin: Plugin) -> None:
    plugin.ok("VolumeDriver.Create", {"Name": "holes", "Opts": {}})
    data = data_dir(plugin, "holes")
    make_sparse(data)
    mixed = hashlib.sha256(b"A" * MiB + bytes(31 * MiB) + b"B" * MiB + bytes(31 * MiB)
                           ).hexdigest()
    check_sparse(data, mixed)
    reply = call(server.socket, "pyvol/snapshot/create", {"Volume": "holes", "Name": "s1"},
                 BOUND)
    assert not reply.get("Err"), reply
    assert allocated(server.root / "snapshots") < 8 * MiB
    for name, source in (("from-snap", "holes@s1"), ("from-vol", "holes")):
        reply = call(server.socket, "VolumeDriver.Create",
                     {"Name": name, "Opts": {"from": source}}, BOUND)
        assert not reply.get("Err"), reply
        check_sparse(data_dir(plugin, name), mixed)
    (data / "big").unlink()
    (data / "mixed").unlink()
    reply = call(server.socket, "pyvol/snapshot/restore", {"Volume": "holes", "Name": "s1"},
                 BOUND)
    assert not reply.get("Err"), reply
    check_sparse(data_dir(plugin, "holes"), mixed)


def test_write_sparse_seeks_over_zero_runs(tmp_path: Path) -> None:
    """The helper an S3 restore uses to write a blob: zero runs become holes."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        tree_module.write_sparse(fd, b"x" * 4096 + bytes(8 * MiB) + b"y" * 4096)
        tree_module.write_sparse(fd, bytes(4 * MiB))
        os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))
    finally:
        os.close(fd)
    assert path.stat().st_size == 4096 + 8 * MiB + 4096 + 4 * MiB
    assert path.stat().st_blocks * 512 < MiB
    with open(path, "rb") as f:
        content = f.read()
    assert content == b"x" * 4096 + bytes(8 * MiB) + b"y" * 4096 + bytes(4 * MiB)


# 11. deep trees


DEPTH = 2000


@pytest.fixture
def deep_cleanup(server: PluginProcess) -> Iterator[None]:
    """Remove what a failed run leaves: pytest's own rmtree recurses and fails on it."""
    yield
    remove_tree(server.root / "volumes")


@pytest.mark.usefixtures("deep_cleanup")
def test_a_tree_deeper_than_path_max_snapshots_clones_measures_and_removes(
        server: PluginProcess, plugin: Plugin) -> None:
    plugin.ok("VolumeDriver.Create", {"Name": "deep", "Opts": {}})
    data = data_dir(plugin, "deep")
    build_deep(data, DEPTH)
    original = walk(data)
    assert len(original) == DEPTH + DEPTH // 10 + 1
    assert max(len(p) for p in original) > 4096 * 2  # far past PATH_MAX
    reply = call(server.socket, "pyvol/snapshot/create", {"Volume": "deep", "Name": "s1"},
                 BOUND)
    assert not reply.get("Err"), reply
    assert reply["Snapshot"]["files"] == DEPTH // 10 + 1
    for name, source in (("deep-from-snap", "deep@s1"), ("deep-from-vol", "deep")):
        reply = call(server.socket, "VolumeDriver.Create",
                     {"Name": name, "Opts": {"from": source}}, BOUND)
        assert not reply.get("Err"), reply
        assert walk(data_dir(plugin, name)) == original
    deadline = time.monotonic() + BOUND
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = plugin.volume("deep")["Status"]
        if status.get("entries") is not None:
            break
        time.sleep(0.1)
    assert status.get("entries") == len(original), status
    build_deep(data, 3, name="extra")  # changed content, then restored away
    reply = call(server.socket, "pyvol/snapshot/restore", {"Volume": "deep", "Name": "s1"},
                 BOUND)
    assert not reply.get("Err"), reply
    assert walk(data) == original
    for name in ("deep-from-snap", "deep-from-vol", "deep"):
        reply = call(server.socket, "VolumeDriver.Remove", {"Name": name}, BOUND)
        assert not reply.get("Err"), reply
    assert not data.exists()
    removing = server.root / "volumes" / ".removing"
    deadline = time.monotonic() + 60  # the delete runs in the background after Remove
    while list(removing.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(removing.iterdir()) == []


# 4. other host users


PRIVATE_DIRS = ["", "volumes", "volumes/.creating", "volumes/.removing", "volumes/.replacing",
                "snapshots", "s3cache"]


def test_the_data_root_is_private_and_wider_modes_are_corrected(
        start_server: StartServer, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for sub in ("volumes", "snapshots"):
        (root / sub).mkdir(parents=True)
    os.chmod(root, 0o755)  # noqa: S103 -- the wide modes start-up must narrow
    os.chmod(root / "volumes", 0o711)  # noqa: S103
    os.chmod(root / "snapshots", 0o755)  # noqa: S103
    server = start_server(root)
    for sub in PRIVATE_DIRS:
        mode = stat.S_IMODE((root / sub).stat().st_mode)
        assert mode == 0o700, f"{root / sub}: {mode:04o}"
    plugin = server.client
    plugin.ok("VolumeDriver.Create", {"Name": "priv", "Opts": {}})
    tool = data_dir(plugin, "priv") / "tool"
    tool.write_bytes(b"#!/bin/sh\necho ran\n")
    os.chmod(tool, 0o4755)  # noqa: S103 -- a setuid file a container planted
    # root reaches it (so the checks below can fail), an unprivileged host user does not
    assert subprocess.run(["/usr/bin/stat", str(tool)], capture_output=True,
                          check=False).returncode == 0
    denied = subprocess.run(["/usr/bin/stat", str(tool)], capture_output=True, text=True,
                            user=65534, group=65534, extra_groups=[], check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    with pytest.raises(PermissionError):
        subprocess.run([str(tool)], user=65534, group=65534, extra_groups=[], check=False,
                       capture_output=True)
