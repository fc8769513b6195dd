"""The ``image`` backend on real loop devices: limits, host disk use, one device per image,
no leaks, resize, replace and recovery after a real kill -9.  The contract suite
(test_backend_contract.py) covers what every backend shares."""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loop_support import clear_under, loops_under, needs_loop, wait_for
from unit_support import mounts_at, mounts_under

from backends import ext4, loop
from backends.base import DirSpec
from backends.errors import BackendError
from backends.image import ImageBackend, SizeShrink, VolumeInUse
from backends.sizes import GiB, MiB

pytestmark = needs_loop
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "root"
    mounts, loops = clear_under(tmp_path)
    assert (mounts, loops) == ([], []), "mounts or loop devices left behind"


@pytest.fixture
def backend(root: Path) -> ImageBackend:
    return ImageBackend(root)


def sized(size: int, **kwargs: int) -> DirSpec:
    return DirSpec(params={"size": size}, **kwargs)


def host_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def fill(path: Path, mib: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
        os.fsync(f.fileno())


def test_create_needs_a_size(backend: ImageBackend) -> None:
    with pytest.raises(BackendError, match=r"'v' needs a size.*-o size=SIZE"):
        backend.create("v", DirSpec())
    with pytest.raises(BackendError, match=r"'v'.*1 MiB is too small.*at least 32 MiB"):
        backend.create("v", sized(MiB))
    assert backend.names() == set()


def test_a_new_volume_is_empty_with_the_spec_applied(backend: ImageBackend) -> None:
    backend.create("v", sized(64 * MiB, uid=1234, gid=5678, mode=0o2770))
    assert stat.S_IMODE(os.stat(backend.image("v")).st_mode) == 0o600
    with backend.view("v") as path:
        assert os.listdir(path) == []  # no lost+found: initdb refuses a non-empty directory
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o2770)


def test_writing_past_the_limit_fails_with_enospc_and_keeps_earlier_data(
        backend: ImageBackend) -> None:
    backend.create("v", sized(64 * MiB))
    with backend.view("v") as path:
        (path / "kept").write_text("before")
        block = b"x" * MiB
        written = 0
        with pytest.raises(OSError) as excinfo, open(path / "big", "wb") as f:
            for _ in range(128):
                f.write(block)
                f.flush()
                written += 1
            os.fsync(f.fileno())
        assert excinfo.value.errno == errno.ENOSPC
        assert 40 <= written < 64
        assert (path / "kept").read_text() == "before"
        (path / "big").unlink()
        (path / "after").write_text("room again")
    with backend.view("v") as path:
        assert (path / "kept").read_text() == "before"


def test_statvfs_shows_the_size(backend: ImageBackend) -> None:
    backend.create("v", sized(1 * GiB))
    with backend.view("v") as path:
        vfs = os.statvfs(path)
        total = vfs.f_blocks * vfs.f_frsize
        assert 0.95 * GiB < total <= GiB  # ext4's metadata takes the rest
        # No blocks reserved for root (-m 0); ext4 keeps only its own small reserve for
        # metadata (2%, at most 4096 blocks).
        assert vfs.f_bfree - vfs.f_bavail <= 4096


def test_status_mounted_and_at_rest(backend: ImageBackend) -> None:
    backend.create("v", sized(256 * MiB))
    fresh = backend.status("v")
    with backend.view("v") as path:
        fill(path / "data", 20)
        mounted = backend.status("v")
    rest = backend.status("v")
    assert set(rest) == {"size_limit", "size_limit_bytes", "used_bytes", "free_bytes",
                         "host_bytes"}
    assert rest["size_limit"] == "256 MiB" and rest["size_limit_bytes"] == 256 * MiB
    assert rest["free_bytes"] == mounted["free_bytes"]  # superblock agrees with statvfs
    assert rest["used_bytes"] == 256 * MiB - rest["free_bytes"]
    assert 20 * MiB <= rest["used_bytes"] - fresh["used_bytes"] < 21 * MiB
    assert 20 * MiB <= rest["host_bytes"] < 30 * MiB
    backend.image("v").write_bytes(b"garbage")  # never raises for an existing volume
    assert backend.status("v")["used_bytes"] is None


def test_host_disk_use_follows_the_data(backend: ImageBackend) -> None:
    backend.create("v", sized(10 * GiB))
    image = backend.image("v")
    fresh = host_bytes(image)
    assert fresh < 8 * MiB, f"a fresh 10 GiB volume takes {fresh} bytes on the host"
    with backend.view("v") as path:
        time.sleep(2)  # the kernel's lazy inode-table init would write now
        os.sync()
        assert host_bytes(image) < 8 * MiB
        fill(path / "data", 100)
        assert host_bytes(image) >= 100 * MiB
        (path / "data").unlink()
        ext4_sync = os.open(path, os.O_RDONLY)
        try:
            os.fsync(ext4_sync)
        finally:
            os.close(ext4_sync)
        os.sync()  # the journal commit issues the discards: the image gets holes back
        assert wait_for(lambda: host_bytes(image) < 10 * MiB), host_bytes(image)


def test_one_loop_device_per_image_however_often_it_is_used(
        backend: ImageBackend, root: Path) -> None:
    backend.create("v", sized(64 * MiB))
    before = loops_under(root)
    assert before == []
    path = backend.mount("v")
    with backend.view("v"):
        backend.mount("v")
        assert len(loops_under(root)) == 1
        assert mounts_at(path) == 1
    fd = os.open(backend.image("v"), os.O_RDWR)
    try:  # binding it directly reuses the device too
        info, lfd = loop.attach(backend.image("v"), fd)
        os.close(lfd)
    finally:
        os.close(fd)
    assert loops_under(root) == [info.number]
    restarted = ImageBackend(root)  # a plugin restart in legacy mode: the mount is still there
    assert restarted.recover() == set()
    assert restarted.mount("v") == path
    assert loops_under(root) == [info.number] and mounts_at(path) == 1
    (path / "f").write_text("one filesystem")
    with restarted.view("v") as seen:
        assert (seen / "f").read_text() == "one filesystem"
    restarted.unmount("v")  # its last reference: it unmounts
    assert mounts_at(path) == 0
    assert wait_for(lambda: loops_under(root) == [])


def test_the_loop_device_is_freed_after_the_last_unmount(
        backend: ImageBackend, root: Path) -> None:
    backend.create("v", sized(64 * MiB))
    backend.create("w", sized(64 * MiB))
    assert loops_under(root) == []  # create leaves nothing bound
    backend.mount("v")
    backend.mount("w")
    backend.mount("v")
    assert len(loops_under(root)) == 2
    backend.unmount("v")
    assert len(loops_under(root)) == 2
    backend.unmount("v")
    backend.unmount("w")
    assert wait_for(lambda: loops_under(root) == [])
    assert not backend.path("v").exists() and not backend.path("w").exists()


def test_a_busy_unmount_detaches_and_frees_the_device_when_let_go(
        backend: ImageBackend, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend.create("v", sized(64 * MiB))
    path = backend.mount("v")
    (path / "f").write_text("x")
    held = os.open(path / "f", os.O_RDONLY)
    try:
        with caplog.at_level(logging.WARNING):
            backend.unmount("v")
        assert "busy" in caplog.text
        assert mounts_at(path) == 0
        assert len(loops_under(root)) == 1  # the open file still uses it
    finally:
        os.close(held)
    assert wait_for(lambda: loops_under(root) == [])


def test_shrink_is_refused_with_what_to_do(backend: ImageBackend) -> None:
    backend.create("v", sized(128 * MiB))
    with pytest.raises(SizeShrink, match=r"'v' is 128 MiB; it cannot shrink to 64 MiB.*"
                                         r"-o size=64MiB and -o from=v"):
        backend.resize("v", 64 * MiB)
    assert backend.size("v") == 128 * MiB


@pytest.mark.skipif(not ext4.can_grow_online(),
                    reason="growing a mounted ext4 needs CAP_SYS_RESOURCE, which this "
                           "process lacks")
def test_online_resize_while_a_file_is_open(backend: ImageBackend) -> None:
    backend.create("v", sized(64 * MiB))
    path = backend.mount("v")
    try:
        with open(path / "open", "wb") as f:
            f.write(b"x" * MiB)
            assert backend.resize("v", 256 * MiB) == "online"
            for _ in range(150):  # more than the old size
                f.write(b"y" * MiB)
            os.fsync(f.fileno())
        assert os.statvfs(path).f_blocks * 4096 > 230 * MiB
    finally:
        backend.unmount("v")


def test_without_cap_sys_resource_an_idle_volume_grows_offline(
        backend: ImageBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ext4, "can_grow_online", lambda: False)
    backend.create("v", sized(64 * MiB))
    with backend.view("v") as path:
        (path / "f").write_text("kept")
        with pytest.raises(VolumeInUse, match=r"'v' is in use.*CAP_SYS_RESOURCE"):
            backend.resize("v", 128 * MiB)
    assert backend.size("v") == 64 * MiB
    assert backend.resize("v", 128 * MiB) == "offline"
    assert backend.size("v") == 128 * MiB
    with backend.view("v") as path:
        assert (path / "f").read_text() == "kept"
        assert os.statvfs(path).f_blocks * 4096 > 110 * MiB


def test_a_grow_cut_short_is_finished_by_the_next_resize(backend: ImageBackend) -> None:
    backend.create("v", sized(64 * MiB))
    with open(backend.image("v"), "r+b") as f:  # the image grew, then the process died
        f.truncate(128 * MiB)
    assert backend.resize("v", 128 * MiB) in ("online", "offline")
    with backend.view("v") as path:
        assert os.statvfs(path).f_blocks * 4096 > 110 * MiB


def test_replace_keeps_the_size_and_refuses_a_volume_in_use(backend: ImageBackend) -> None:
    backend.create("v", sized(96 * MiB))
    path = backend.mount("v")
    (path / "old").write_text("old")
    with pytest.raises(VolumeInUse, match=r"'v' is in use"):
        backend.replace("v", lambda p: (p / "new").write_text("new"))
    with pytest.raises(VolumeInUse, match=r"'v' is in use"):
        backend.remove("v")
    assert (path / "old").read_text() == "old"
    backend.unmount("v")
    backend.replace("v", lambda p: (p / "new").write_text("new"))
    assert backend.size("v") == 96 * MiB
    with backend.view("v") as seen:
        assert os.listdir(seen) == ["new"]


def test_replace_refuses_when_a_mount_comes_during_the_build(backend: ImageBackend) -> None:
    backend.create("v", sized(64 * MiB))

    def populate(p: Path) -> None:
        (p / "new").write_text("new")
        backend.mount("v")  # a container starts meanwhile

    try:
        with pytest.raises(VolumeInUse):
            backend.replace("v", populate)
        assert os.listdir(backend.path("v")) == []  # the old content, still in use
    finally:
        backend.unmount("v")
    assert backend.recover() == set()


KILLED_IN_POPULATE = """
import os, signal, sys
from pathlib import Path
from backends.base import DirSpec
from backends.image import ImageBackend
def die(path):
    (path / "half").write_text("x")
    os.kill(os.getpid(), signal.SIGKILL)
b = ImageBackend(Path(sys.argv[1]))
if sys.argv[2] == "create":
    b.create("v", DirSpec(params={"size": 64 << 20}), die)
else:
    b.replace("v", die)
"""


@pytest.mark.parametrize("op", ["create", "replace"])
def test_recover_after_a_kill_during_populate(backend: ImageBackend, root: Path,
                                              op: str) -> None:
    if op == "replace":
        backend.create("v", sized(64 * MiB))
        with backend.view("v") as path:
            (path / "old").write_text("old")
    done = subprocess.run([sys.executable, "-c", KILLED_IN_POPULATE, str(root), op],
                          cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == -9, done.stderr
    assert len(mounts_under(root)) == 1  # the staging mount outlived its process
    restarted = ImageBackend(root)
    assert restarted.recover() == set()
    assert mounts_under(root) == []
    assert wait_for(lambda: loops_under(root) == [])
    images = root / "images"
    assert os.listdir(images / ".creating") == os.listdir(images / ".replacing") == []
    if op == "create":
        assert restarted.names() == set()
    else:
        with restarted.view("v") as path:
            assert os.listdir(path) == ["old"]


def test_missing_device_nodes_are_made(tmp_path: Path) -> None:
    node = tmp_path / "loop-control"
    assert loop._node(node, stat.S_IFCHR, *loop.CONTROL_DEV) == node
    st = os.stat(node)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(10, 237)
    assert loop._node(node, stat.S_IFCHR, *loop.CONTROL_DEV) == node  # present: kept
    with pytest.raises(loop.LoopError, match="is not the device 7:3"):
        loop._node(node, stat.S_IFBLK, 7, 3)
