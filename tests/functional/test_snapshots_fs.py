"""Snapshots on real ext4, XFS and btrfs filesystems (loop-mounted images).

The driver runs with its root on the loop filesystem, so snapshots, restores and clones use
what that filesystem offers: native subvolume snapshots on btrfs, reflinks (shared extents)
on XFS, copies on ext4.  The
last test kills a real ``pyvol serve`` with SIGKILL in the middle of a snapshot.

Loop mounts need root; without them these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from functional_support import REPO, PluginProcess
from loopfs import FSTYPES, REFLINK, LoopUnavailable, loop_filesystem, used_bytes

from plugin.driver import Driver
from plugin.settings import Settings
from tests.support.trees import describe, inodes

MiB = 1 << 20
StartServer = Callable[[Path], PluginProcess]


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires the loop-mounted filesystem tests to run")
    pytest.skip(reason)


@pytest.fixture(params=FSTYPES)
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(filesystem type, mountpoint) of a fresh 2 GiB loop filesystem."""
    fstype = str(request.param)
    try:
        with loop_filesystem(fstype, tmp_path / "loop", size=2 << 30) as mountpoint:
            yield fstype, mountpoint
    except LoopUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture
def driver(fs: tuple[str, Path]) -> Iterator[Driver]:
    _, mountpoint = fs
    driver = Driver(Settings(root=mountpoint / "root", socket=mountpoint / "unused.sock"))
    yield driver
    driver.snapshots.stop()
    driver.jobs.shutdown()
    driver.state.close()


# what a user sees of a tree


def fill(data: Path) -> None:
    """Every kind of entry, with unusual metadata, and a few MiB of content."""
    (data / "docs" / "deep").mkdir(parents=True)
    (data / "docs" / "a.txt").write_bytes(b"alpha\n" * 1000)
    (data / "docs" / "deep" / "b.bin").write_bytes(os.urandom(3 * MiB))
    os.link(data / "docs" / "deep" / "b.bin", data / "hardlink.bin")
    os.setxattr(data / "docs" / "a.txt", "user.origin", b"pyvol test")
    os.setxattr(data / "docs", "user.dir", b"directory attribute")
    os.chown(data / "docs" / "a.txt", 1234, 5678)
    os.chmod(data / "docs", 0o2775)  # noqa: S103 -- a setgid directory, the metadata under test
    (data / "shadow").symlink_to("/etc/shadow")
    (data / "relative").symlink_to("docs/a.txt")
    os.mkfifo(data / "pipe", 0o640)
    (data / "empty").write_bytes(b"")
    for i, p in enumerate(sorted([data, *data.rglob("*")], key=lambda p: -len(p.parts))):
        when = 1_500_000_000_000_000_000 + i * 1_000_003
        os.utime(p, ns=(when, when), follow_symlinks=False)


def change(data: Path) -> None:
    with open(data / "docs" / "deep" / "b.bin", "r+b") as f:  # in place, through the hard link
        f.seek(MiB)
        f.write(b"changed in place")
    (data / "docs" / "a.txt").unlink()
    (data / "new.txt").write_text("new file")
    os.chmod(data / "empty", 0o600)
    (data / "docs" / "deep").rename(data / "moved")


def expected_method(fstype: str) -> str:
    """btrfs volumes are subvolumes, snapshotted natively; XFS reflinks; ext4 copies."""
    return {"btrfs": "btrfs-snapshot", "xfs": "reflink"}.get(fstype, "copy")


# the tests


def test_snapshot_change_restore_in_place_and_into_a_new_volume(
        fs: tuple[str, Path], driver: Driver) -> None:
    fstype, _ = fs
    driver.create("vol", None)
    data = driver.path("vol")
    fill(data)
    original = describe(data)
    s1 = driver.management.snapshot_create("vol", "s1")
    assert s1.method == expected_method(fstype)
    change(data)
    changed = describe(data)
    assert changed != original

    driver.create("copy", {"from": "vol@s1"})
    assert describe(driver.path("copy")) == original
    safety = driver.management.snapshot_restore("vol", "s1")
    assert describe(data) == original
    assert inodes(data).isdisjoint(inodes(driver.path("copy")))
    driver.management.snapshot_restore("vol", safety.name)
    assert describe(data) == changed
    methods = {s.name: s.method for s in driver.management.snapshot_list("vol")}
    assert methods[safety.name] == expected_method(fstype)


def test_a_sized_volume_snapshots_by_cloning_its_image_where_the_host_can(
        fs: tuple[str, Path], driver: Driver) -> None:
    """On XFS and btrfs data directories, a snapshot of a sized volume is a clone of its image
    (O(1), atomic: the volume's filesystem is frozen for the instant of the clone); on ext4
    its files are copied."""
    fstype, root = fs
    driver.create("sized", {"size": "64M"})
    data = driver.mount("sized", "m1")
    fill(data)
    (data / "big").write_bytes(os.urandom(24 * MiB))
    original = describe(data)
    before = used_bytes(root)
    s1 = driver.management.snapshot_create("sized", "s1")
    grew = used_bytes(root) - before
    if fstype in REFLINK:
        assert s1.method == "image-reflink"
        assert grew < 8 * MiB  # no data copied
    else:
        assert s1.method == "copy"
        assert grew >= 24 * MiB
    change(data)
    (data / "big").write_bytes(b"rewritten")
    driver.unmount("sized", "m1")

    driver.create("copy", {"from": "sized@s1"})
    copy = driver.mount("copy", "c1")
    assert describe(copy) == original
    driver.unmount("copy", "c1")
    safety = driver.management.snapshot_restore("sized", "s1")
    assert safety.method == s1.method
    data = driver.mount("sized", "m2")
    assert describe(data) == original
    assert driver.get("sized").status["size_limit"] == "64 MiB"  # type: ignore[index]
    driver.unmount("sized", "m2")


def test_clones_are_independent_of_their_source(fs: tuple[str, Path], driver: Driver) -> None:
    driver.create("src", None)
    source = driver.path("src")
    fill(source)
    original = describe(source)
    driver.management.snapshot_create("src", "s1")
    driver.create("live-clone", {"from": "src"})
    driver.create("snap-clone", {"from": "src@s1"})
    clones = [driver.path("live-clone"), driver.path("snap-clone")]
    for clone in clones:
        assert describe(clone) == original
        assert inodes(clone).isdisjoint(inodes(source))
    change(source)  # writes in place into the shared blocks of a reflinked file
    for clone in clones:
        assert describe(clone) == original
    changed = describe(source)
    for clone in clones:
        with open(clone / "hardlink.bin", "r+b") as f:
            f.write(b"written in the clone")
        (clone / "only-in-clone").write_text("x")
    assert describe(source) == changed
    for clone in clones:  # the clone's own hard-link group saw the write
        assert (clone / "docs" / "deep" / "b.bin").read_bytes().startswith(b"written in the")


def test_snapshots_on_unmount_keep_the_newest_n(fs: tuple[str, Path], driver: Driver) -> None:
    fstype, _ = fs
    driver.create("auto", {"snapshot_on_unmount": "true", "snapshot_keep": "2"})
    data = driver.path("auto")
    fill(data)
    driver.management.snapshot_create("auto", "by-hand")
    states = []
    for i in range(4):
        driver.mount("auto", f"container-{i}")
        (data / "round").write_text(str(i))
        states.append(describe(data))
        driver.unmount("auto", f"container-{i}")
        assert driver.jobs.wait("auto", 60), "the on-unmount snapshot did not finish"
    snaps = driver.management.snapshot_list("auto")
    assert [s.kind for s in snaps] == ["manual", "automatic", "automatic"]
    assert {s.method for s in snaps[1:]} <= {expected_method(fstype), "none"}
    for snap, expected in zip(snaps[1:], states[2:], strict=True):
        driver.create(f"check-{snap.name.replace(':', '-')}", {"from": f"auto@{snap.name}"})
        assert describe(driver.path(f"check-{snap.name.replace(':', '-')}")) == expected
    status = driver.get("auto").status or {}
    assert [s["name"] for s in status["snapshots"]] == [s.name for s in reversed(snaps)]
    assert status["snapshot_policy"] == {"on_unmount": True, "every_seconds": None, "keep": 2,
                                         "on_remove": "keep"}


def test_reflink_filesystems_share_extents_copying_ones_do_not(
        fs: tuple[str, Path], driver: Driver) -> None:
    fstype, mountpoint = fs
    driver.create("big", None)
    size = 200 * MiB
    block = os.urandom(MiB)
    with open(driver.path("big") / "big.bin", "wb") as f:
        for i in range(size // MiB):
            f.write(i.to_bytes(8, "little") + block[8:])
    before = used_bytes(mountpoint)
    snap = driver.management.snapshot_create("big", "s1")
    after_snapshot = used_bytes(mountpoint)
    driver.create("restored", {"from": "big@s1"})
    after_restore = used_bytes(mountpoint)
    stored = 0 if fstype == "btrfs" else size  # a native snapshot stores nothing itself
    assert (snap.method, snap.copied_bytes) == (expected_method(fstype), stored)
    grew = [after_snapshot - before, after_restore - after_snapshot]
    if fstype in REFLINK:
        assert all(g < size // 10 for g in grew), f"{fstype}: extents not shared: {grew}"
    else:
        assert all(g > size * 9 // 10 for g in grew), f"{fstype}: expected full copies: {grew}"
    with open(driver.path("restored") / "big.bin", "rb") as f:
        f.seek(size - MiB)
        assert f.read(8) == (size // MiB - 1).to_bytes(8, "little")


# kill -9 in the middle of a snapshot, on a real server


def objects_on_disk(root: Path, volume: str) -> set[str]:
    objects = root / "snapshots" / volume / "objects"
    return {p.name for p in objects.rglob("*") if p.is_file()} if objects.is_dir() else set()


def refs_of(root: Path, volume: str, name: str) -> set[str]:
    entries = json.loads((root / "snapshots" / volume / "entries" / f"{name}.json").read_bytes())
    return {e["ref"] for e in entries if e.get("ref")}


def test_native_btrfs_snapshot_cut_short_by_a_crash_never_lists(
        fs: tuple[str, Path], start_server: StartServer) -> None:
    """A native snapshot is one ioctl, too quick to kill mid-way: build what a crash between
    the ioctl and the catalog write leaves (a read-only subvolume and its entries, no
    catalog) and check a restarted server neither lists nor keeps it."""
    fstype, mountpoint = fs
    if fstype != "btrfs":
        pytest.skip("native snapshots exist on btrfs only")
    from backends import btrfs

    root = mountpoint / "root"
    server = start_server(root)
    api = server.client
    api.ok("VolumeDriver.Create", {"Name": "vol", "Opts": {}})
    data = Path(api.ok("VolumeDriver.Path", {"Name": "vol"})["Mountpoint"])
    fill(data)
    assert api.ok("pyvol/snapshot/create", {"Volume": "vol", "Name": "old"})[
        "Snapshot"]["method"] == "btrfs-snapshot"
    server.kill9()
    subvols = root / "snapshots" / "vol" / "subvols"
    btrfs.snapshot(data, subvols / "doomed", readonly=True)
    (root / "snapshots" / "vol" / "entries" / "doomed.json").write_text("[]")

    api = start_server(root).client
    listed = api.ok("pyvol/snapshot/list", {"Volume": "vol"})["Snapshots"]
    assert [s["name"] for s in listed] == ["old"]
    deadline = time.monotonic() + 60
    while (subvols / "doomed").exists():
        assert time.monotonic() < deadline, "the orphan subvolume was never destroyed"
        time.sleep(0.1)
    assert (subvols / "old").is_dir()
    api.ok("pyvol/snapshot/create", {"Volume": "vol", "Name": "doomed"})


def test_kill_9_in_the_middle_of_a_snapshot(fs: tuple[str, Path],
                                            start_server: StartServer) -> None:
    fstype, mountpoint = fs
    if fstype == "btrfs":
        pytest.skip("btrfs volumes snapshot natively in one ioctl; see the test above")
    root = mountpoint / "root"
    server = start_server(root)
    api = server.client
    api.ok("VolumeDriver.Create", {"Name": "vol", "Opts": {}})
    data = Path(api.ok("VolumeDriver.Path", {"Name": "vol"})["Mountpoint"])
    fill(data)
    old_state = describe(data)
    api.ok("pyvol/snapshot/create", {"Volume": "vol", "Name": "old"})
    old_objects = objects_on_disk(root, "vol")

    files = 6000  # a few hundred MiB in thousands of files: seconds on ext4, long enough
    block = os.urandom(48 * 1024)
    for i in range(files):
        sub = data / "bulk" / f"d{i % 60:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}").write_bytes(i.to_bytes(8, "little") + block)
    os.sync()

    cli = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "--socket", str(server.socket), "snapshot",
         "create", "vol", "doomed"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(objects_on_disk(root, "vol") - old_objects) < 100:
            assert cli.poll() is None, f"the snapshot ended before we could kill it: " \
                                       f"{cli.communicate()}"
            assert time.monotonic() < deadline, "the snapshot never started storing objects"
            time.sleep(0.005)
        server.kill9()
        _, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode != 0
    assert len(err.strip().splitlines()) == 1, err
    stored = objects_on_disk(root, "vol") - old_objects
    assert 0 < len(stored) < files, f"{len(stored)} objects: the kill did not land mid-snapshot"
    assert not (root / "snapshots" / "vol" / "catalog" / "doomed.json").exists()

    restarted = start_server(root)
    api = restarted.client
    listed = api.ok("pyvol/snapshot/list", {"Volume": "vol"})["Snapshots"]
    assert [s["name"] for s in listed] == ["old"]
    assert "doomed" not in json.dumps(api.volume("vol")["Status"])
    # recovery runs in the background after start: the orphans go, eventually
    deadline = time.monotonic() + 120
    while objects_on_disk(root, "vol") != refs_of(root, "vol", "old"):
        assert time.monotonic() < deadline, "orphan objects of the killed snapshot remain"
        time.sleep(0.2)
    assert sorted(p.name for p in (root / "snapshots" / "vol" / "entries").iterdir()) == \
        ["old.json"]
    reply = api.send("pyvol/snapshot/restore", {"Volume": "vol", "Name": "doomed"})
    assert "vol@doomed not found" in reply.err

    api.ok("pyvol/snapshot/restore", {"Volume": "vol", "Name": "old"})
    assert describe(data) == old_state
    kinds = [s["kind"] for s in api.ok("pyvol/snapshot/list", {"Volume": "vol"})["Snapshots"]]
    assert kinds == ["manual", "safety"]
    # the name of the killed snapshot is free again
    api.ok("pyvol/snapshot/create", {"Volume": "vol", "Name": "doomed"})


def test_unavailable_loop_mounts_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires"):
        unavailable("mount -o loop is not permitted here")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="not permitted"):
        unavailable("mount -o loop is not permitted here")
