"""O(1) snapshots of ``image`` volumes: the image file is cloned (FICLONE) with its
filesystem frozen, where the host filesystem can reflink.

The data root lives on a loop-mounted XFS (reflink=1) made for each test; the backend and the
snapshot store are used directly (no server).  On an ext4 data root the same calls fall back
to the file method.  Loop mounts need root; without them these tests skip, except under
CI=true, where they fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from loopfs import LoopUnavailable, loop_filesystem, used_bytes

from backends.base import DirSpec, VolumeContent
from backends.errors import BackendError
from backends.image import FIFREEZE, FITHAW, ImageBackend
from backends.tree import scan
from snapshots.store import IMAGE, SnapshotStore
from tests.support.mounts import clear_under, loops_under, mounts_under
from tests.support.waiting import eventually

MiB = 1 << 20
VOLUME_SIZE = {"ext4": 512 * MiB, "xfs": 512 * MiB}
RECORD = 4096
"""One record of the fsyncing writer: its sequence number, then filler."""


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires the loop-mounted filesystem tests to run")
    pytest.skip(reason)


@dataclass
class World:
    host: Path
    """Mountpoint of the host filesystem that holds the data root."""
    root: Path
    backend: ImageBackend
    store: SnapshotStore

    def content(self, volume: str = "v") -> VolumeContent:
        return VolumeContent(self.backend, volume)

    def clone(self, name: str, volume: str = "v") -> Path:
        return self.store.root / volume / "images" / name

    def reader_mounts(self) -> list[str]:
        return mounts_under(self.backend.root / ".clones")


def make_world(fstype: str, tmp_path: Path) -> Iterator[World]:
    try:
        with loop_filesystem(fstype, tmp_path / "host", size=2 << 30) as host:
            root = host / "root"
            backend = ImageBackend(root)
            world = World(host, root, backend, SnapshotStore(root, images=backend))
            try:
                yield world
            finally:
                gc.collect()  # views a failed test dropped
                for volume, refs in list(backend._refs.items()):  # the tests' mounts
                    for _ in range(refs):
                        backend.unmount(volume)
                mounts, loops = clear_under(root)
            assert (mounts, loops) == ([], []), "mounts or loop devices left behind"
    except LoopUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture
def xfs_host(tmp_path: Path) -> Iterator[World]:
    """A data root on XFS with reflink=1: image volumes snapshot by cloning their image."""
    yield from make_world("xfs", tmp_path)


@pytest.fixture
def ext4_host(tmp_path: Path) -> Iterator[World]:
    yield from make_world("ext4", tmp_path)


@pytest.fixture(params=("ext4", "xfs"))
def volume_fs(request: pytest.FixtureRequest) -> str:
    """The filesystem inside the volume's image (XFS clones mount with nouuid)."""
    return str(request.param)


def create_volume(world: World, fs: str = "ext4", volume: str = "v") -> Path:
    """Create and mount ``volume``; returns its mountpoint."""
    world.backend.create(volume, DirSpec(params={"size": VOLUME_SIZE[fs], "fs": fs}))
    return world.backend.mount(volume)


def write_random(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())


def tree(path: Path) -> dict[str, str]:
    """Every entry under ``path``: its kind and mode, and a file's digest or a link's target."""
    out: dict[str, str] = {}
    for entry in scan(path):
        if entry.path == ".":
            continue
        if entry.kind == "file":
            with open(path / entry.path, "rb") as f:
                out[entry.path] = f"file {entry.mode:o} " + hashlib.file_digest(
                    f, "sha256").hexdigest()
        else:
            out[entry.path] = f"{entry.kind} {entry.mode:o} {entry.target or ''}"
    return out


def view_tree(world: World, name: str, volume: str = "v") -> dict[str, str]:
    """The snapshot as an S3 push reads it: ``store.view()``, entries, then each file."""
    out: dict[str, str] = {}
    with world.store.view(volume, name) as view:
        for entry in view.entries():
            if entry.path == ".":
                continue
            if entry.kind == "file":
                with view.open(entry) as f:
                    out[entry.path] = f"file {entry.mode:o} " + hashlib.file_digest(
                        f, "sha256").hexdigest()
            else:
                out[entry.path] = f"{entry.kind} {entry.mode:o} {entry.target or ''}"
    return out


def populate_small(path: Path) -> None:
    (path / "dir").mkdir()
    (path / "dir" / "small").write_bytes(b"hello")
    (path / "link").symlink_to("dir/small")
    os.link(path / "dir" / "small", path / "hard")


def test_a_snapshot_clones_the_image_in_one_instant_without_copying(
        xfs_host: World, volume_fs: str) -> None:
    world = xfs_host
    assert world.backend.capabilities.snapshot_methods == (IMAGE, "copy")
    assert ImageBackend.capabilities.snapshot_methods == ("copy",)  # the options parser's
    data = create_volume(world, volume_fs)
    populate_small(data)
    write_random(data / "big", 200)
    before_tree = tree(data)
    before = used_bytes(world.host)

    info = world.store.create("v", world.content(), "s1")

    grew = used_bytes(world.host) - before
    assert grew < 8 * MiB, f"the host filesystem grew by {grew / MiB:.1f} MiB for a clone"
    assert (info.method, info.copied_bytes) == (IMAGE, 0)
    assert (info.files, info.size) == (2, 200 * MiB + 5)  # big, small (hard: a link to it)
    assert world.clone("s1").stat().st_size == VOLUME_SIZE[volume_fs]
    assert world.reader_mounts() == []  # the scan's mount is gone

    # The volume stays writable (thawed), and later writes never reach the snapshot.
    with open(data / "big", "r+b") as f:
        f.write(os.urandom(10 * MiB))
        os.fsync(f.fileno())
    (data / "dir" / "small").write_bytes(b"changed")
    (data / "new").write_bytes(b"new")
    assert tree(data) != before_tree
    assert view_tree(world, "s1") == before_tree
    assert world.reader_mounts() == []

    # Restore (replace) and clone (from=v@s1) give the snapshot's content.
    world.backend.unmount("v")
    world.backend.replace("v", world.store.populate_from("v", "s1"))
    world.backend.create("w", DirSpec(params={"size": VOLUME_SIZE[volume_fs],
                                              "fs": volume_fs}),
                         world.store.populate_from("v", "s1"))
    assert world.reader_mounts() == []
    with world.backend.view("v") as restored:
        assert tree(restored) == before_tree
    with world.backend.view("w") as cloned:
        assert tree(cloned) == before_tree

    # The volume's image is new since the restore: once the old one is purged, the clone
    # alone holds its extents.
    world.backend.purge()
    before = used_bytes(world.host)
    world.store.remove("v", "s1")
    assert not world.clone("s1").exists()
    # XFS frees an unlinked file's extents in the background (inodegc).
    assert eventually(lambda: before - used_bytes(world.host) > 150 * MiB, 15), \
        f"removing the snapshot freed only {(before - used_bytes(world.host)) / MiB:.1f} MiB"


def test_a_snapshot_while_a_writer_fsyncs_holds_a_prefix_of_its_records(
        xfs_host: World, volume_fs: str) -> None:
    """The filesystem is frozen for the clone: the snapshot holds every record fsynced
    before the snapshot began, then a prefix of the rest, never a torn record."""
    world = xfs_host
    data = create_volume(world, volume_fs)
    stop = threading.Event()
    written = [0]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            fd = os.open(data / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                while not stop.is_set():
                    os.write(fd, struct.pack("<Q", written[0]) * (RECORD // 8))
                    os.fsync(fd)
                    written[0] += 1
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert eventually(lambda: written[0] >= 200, 30)
        synced = written[0]
        world.store.create("v", world.content(), "s1")
        at_snapshot = written[0]
        assert eventually(lambda: written[0] >= at_snapshot + 100, 30), "the writer is stuck"
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive() and errors == []

    with world.store.view("v", "s1") as view:
        entry = next((e for e in view.entries() if e.path == "log"), None)
        assert entry is not None, "the snapshot misses the file written before it"
        with view.open(entry) as f:
            content = f.read()
    assert len(content) % RECORD == 0, "a torn record"
    count = len(content) // RECORD
    assert synced <= count <= written[0]
    expected = b"".join(struct.pack("<Q", i) * (RECORD // 8) for i in range(count))
    assert content == expected



def test_a_view_holds_the_clone_mounted_until_closed_or_dropped(xfs_host: World) -> None:
    world = xfs_host
    data = create_volume(world)
    (data / "a").write_bytes(b"alpha")
    world.store.create("v", world.content(), "s1")

    view = world.store.view("v", "s1")
    assert world.reader_mounts() == []  # entries need no mount
    entry = next(e for e in view.entries() if e.path == "a")
    with view.open(entry) as f:
        assert f.read() == b"alpha"
    assert len(world.reader_mounts()) == 1
    second = world.store.view("v", "s1")
    with second.open(entry) as f:
        assert f.read() == b"alpha"
    assert len(world.reader_mounts()) == 1, "one clone is mounted once"

    # A snapshot removed while read stays readable until its readers are done.
    world.store.remove("v", "s1")
    assert not world.clone("s1").exists()
    with view.open(entry) as f:
        assert f.read() == b"alpha"
    view.close()
    assert len(world.reader_mounts()) == 1
    del second  # dropped unclosed, as plugin/syncing.py does after a push
    gc.collect()
    assert world.reader_mounts() == []
    assert eventually(lambda: len(loops_under(world.root)) == 1, 5)  # the volume's alone
    with pytest.raises(ValueError, match="closed"):
        view.open(entry)


def test_the_next_file_snapshot_copies_everything_instead_of_using_a_clone_as_base(
        xfs_host: World) -> None:
    world = xfs_host
    data = create_volume(world)
    write_random(data / "f", 3)
    world.store.create("v", world.content(), "image")
    info = world.store.create("v", data, "files")
    assert (info.method, info.copied_bytes) == ("copy", 3 * MiB)
    assert view_tree(world, "files") == view_tree(world, "image") == tree(data)


def test_discard_and_purge_delete_the_clones(xfs_host: World) -> None:
    world = xfs_host
    data = create_volume(world)
    write_random(data / "f", 1)
    world.store.create("v", world.content(), "s1")
    world.store.create("v", world.content(), "s2")
    world.store.discard("v")
    assert world.store.list_snapshots("v") == []
    world.store.purge()
    assert not (world.store.root / "v").exists()
    assert os.listdir(world.store.root / ".removing") == []


def test_recover_drops_a_clone_that_was_never_committed(xfs_host: World) -> None:
    world = xfs_host
    create_volume(world)
    world.store.create("v", world.content(), "kept")
    world.backend.clone_image("v", world.clone("crashed"))  # then a crash: no catalog
    world.store.recover()
    assert sorted(os.listdir(world.clone("kept").parent)) == ["kept"]
    assert [i.name for i in world.store.list_snapshots("v")] == ["kept"]


def test_recover_thaws_a_volume_a_crash_left_frozen(xfs_host: World) -> None:
    world = xfs_host
    data = create_volume(world)
    fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)  # as a crash between FIFREEZE and FITHAW leaves it
        done = threading.Event()

        def write() -> None:
            with open(data / "after", "wb") as f:
                f.write(b"x")
                os.fsync(f.fileno())
            done.set()

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        assert not done.wait(0.5), "the filesystem was not frozen"
        ImageBackend(world.root).recover()  # the next process
        assert done.wait(10), "a write still hangs after recover()"
        thread.join(10)
    finally:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, FITHAW, 0)  # never leave the test's filesystem frozen
        os.close(fd)
    assert (data / "after").read_bytes() == b"x"


def test_on_a_host_that_cannot_reflink_snapshots_fall_back_to_copies(
        ext4_host: World) -> None:
    world = ext4_host
    assert world.backend.capabilities.snapshot_methods == ("copy",)
    data = create_volume(world)
    populate_small(data)
    expected = tree(data)
    world.backend.unmount("v")  # the fallback reads the volume inside a view
    info = world.store.create("v", world.content(), "s1")
    assert (info.method, info.files) == ("copy", 1)  # small (hard: a link to it)
    assert not world.clone("s1").parent.exists()
    assert view_tree(world, "s1") == expected
    world.backend.replace("v", world.store.populate_from("v", "s1"))
    with world.backend.view("v") as restored:
        assert tree(restored) == expected


def test_a_restarted_store_reads_the_clones_through_the_backend_it_is_given(
        xfs_host: World) -> None:
    world = xfs_host
    data = create_volume(world)
    (data / "a").write_bytes(b"alpha")
    world.store.create("v", world.content(), "s1")
    expected = view_tree(world, "s1")

    backend = ImageBackend(world.root)
    backend.recover()
    restarted = World(world.host, world.root, backend, SnapshotStore(world.root, images=backend))
    restarted.store.recover()
    assert [i.method for i in restarted.store.list_snapshots("v")] == [IMAGE]
    assert view_tree(restarted, "s1") == expected

    alone = SnapshotStore(world.root)  # given no image backend, it says so
    with alone.view("v", "s1") as view, pytest.raises(
            BackendError, match=r"snapshot v@s1 is a clone of an image volume"):
        view.open(next(e for e in view.entries() if e.kind == "file"))
