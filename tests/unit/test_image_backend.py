"""The ``image`` backend on real loop devices: limits, host disk use, one device per image,
no leaks, resize, replace and recovery after a real kill -9, over both filesystems where
they differ (ext4 and XFS; XFS images are at least 300 MiB, sparse, so cheap).  The
contract suite (test_backend_contract.py) covers what every backend shares, on ext4."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loop_support import needs_loop

from backends import REGISTRY, ext4, loop
from backends.base import DirSpec
from backends.errors import BackendError
from backends.image import ImageBackend, SizeShrink, VolumeInUse
from backends.sizes import GiB, MiB, format_size
from plugin.errors import InvalidOption
from plugin.options import parse_options
from tests.support.mounts import clear_under, loops_under, mounts_at, mounts_under
from tests.support.processes import CAP_SYS_RESOURCE, has_capability
from tests.support.waiting import eventually

pytestmark = needs_loop
REPO = Path(__file__).resolve().parents[2]
FILESYSTEMS = ("ext4", "xfs")
SMALL = {"ext4": 64 * MiB, "xfs": 320 * MiB}
"""A small volume of each filesystem (XFS: mkfs.xfs refuses under 300 MiB)."""



@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "root"
    mounts, loops = clear_under(tmp_path)
    assert (mounts, loops) == ([], []), "mounts or loop devices left behind"


@pytest.fixture
def backend(root: Path) -> ImageBackend:
    return ImageBackend(root)


@pytest.fixture(params=FILESYSTEMS)
def fs(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def sized(size: int, fs: str = "ext4", **kwargs: int) -> DirSpec:
    params: dict[str, object] = {"size": size}
    if fs != "ext4":  # ext4 is the default: leave it implicit
        params["fs"] = fs
    return DirSpec(params=params, **kwargs)


def statvfs_total(path: Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_blocks * vfs.f_frsize


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


def test_xfs_needs_300_mib(backend: ImageBackend) -> None:
    for size in (MiB, 64 * MiB, 300 * MiB - 4096):
        with pytest.raises(BackendError, match=r"^volume 'v': -o fs=xfs needs -o size of at "
                                               r"least 300M \(not .*\); use -o fs=ext4"):
            backend.create("v", sized(size, "xfs"))
    with pytest.raises(BackendError, match=r"'v': -o fs='btrfs' must be ext4 or xfs"):
        backend.create("v", sized(GiB, "btrfs"))
    assert backend.names() == set()
    assert os.listdir(backend.root / ".creating") == []
    backend.create("v", sized(300 * MiB, "xfs"))  # exactly the minimum is fine
    assert backend.status("v")["filesystem"] == "xfs"


def test_the_fs_option_is_parsed_and_picks_the_image_backend() -> None:
    options = parse_options({"fs": " XFS ", "size": "1G"}, default_backend="local",
                            backends=REGISTRY)
    assert options.backend == "image"
    assert options.dir_spec().params == {"fs": "xfs", "size": GiB}
    with pytest.raises(InvalidOption, match=r"option fs='btrfs': 'btrfs' must be ext4 or xfs"):
        parse_options({"fs": "btrfs", "size": "1G"}, default_backend="image",
                      backends=REGISTRY)


def test_a_new_volume_is_empty_with_the_spec_applied(backend: ImageBackend, fs: str) -> None:
    backend.create("v", sized(SMALL[fs], fs, uid=1234, gid=5678, mode=0o2770))
    assert stat.S_IMODE(os.stat(backend.image("v")).st_mode) == 0o600
    with backend.view("v") as path:
        assert os.listdir(path) == []  # no lost+found: initdb refuses a non-empty directory
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o2770)
    assert backend.status("v")["filesystem"] == fs


def test_writing_past_the_limit_fails_with_enospc_and_keeps_earlier_data(
        backend: ImageBackend, fs: str) -> None:
    size_mib = SMALL[fs] // MiB
    backend.create("v", sized(SMALL[fs], fs))
    with backend.view("v") as path:
        (path / "kept").write_text("before")
        block = b"x" * MiB
        written = 0
        with pytest.raises(OSError) as excinfo, open(path / "big", "wb") as f:
            for _ in range(2 * size_mib):
                f.write(block)
                f.flush()
                written += 1
            os.fsync(f.fileno())
        assert excinfo.value.errno == errno.ENOSPC
        # ext4 keeps about 2.5% for itself, XFS its 64 MiB log and reserves.
        assert size_mib - (24 if fs == "ext4" else 100) <= written < size_mib
        assert (path / "kept").read_text() == "before"
        (path / "big").unlink()
        (path / "after").write_text("room again")
    with backend.view("v") as path:
        assert (path / "kept").read_text() == "before"


def test_statvfs_shows_the_size(backend: ImageBackend, fs: str) -> None:
    backend.create("v", sized(1 * GiB, fs))
    with backend.view("v") as path:
        vfs = os.statvfs(path)
        total = vfs.f_blocks * vfs.f_frsize
        if fs == "ext4":
            assert 0.95 * GiB < total <= GiB  # ext4's metadata takes the rest
            # No blocks reserved for root (-m 0); ext4 keeps only its own small reserve for
            # metadata (2%, at most 4096 blocks).
            assert vfs.f_bfree - vfs.f_bavail <= 4096
        else:
            assert total == GiB - 64 * MiB  # the internal log
            assert vfs.f_bfree == vfs.f_bavail  # XFS reserves nothing for root
            assert vfs.f_bfree * vfs.f_frsize > 0.9 * total


def test_status_mounted_and_at_rest(backend: ImageBackend, fs: str) -> None:
    size = 256 * MiB if fs == "ext4" else 320 * MiB
    backend.create("v", sized(size, fs))
    fresh = backend.status("v")
    with backend.view("v") as path:
        fill(path / "data", 20)
        mounted = backend.status("v")
    rest = backend.status("v")
    assert set(rest) == {"size_limit", "size_limit_bytes", "used_bytes", "free_bytes",
                         "host_bytes", "filesystem"}
    assert rest["filesystem"] == mounted["filesystem"] == fs
    assert rest["size_limit"] == format_size(size) and rest["size_limit_bytes"] == size
    if fs == "ext4":
        assert rest["free_bytes"] == mounted["free_bytes"]  # superblock agrees with statvfs
    else:  # the superblock counts no per-group reservations: within 1% of statvfs
        assert 0 <= rest["free_bytes"] - mounted["free_bytes"] < size // 100
    assert rest["used_bytes"] == size - rest["free_bytes"]
    assert 20 * MiB <= rest["used_bytes"] - fresh["used_bytes"] < 21 * MiB
    baseline = 0 if fs == "ext4" else 64 * MiB  # XFS's log is written out
    assert 20 * MiB <= rest["host_bytes"] - baseline < 30 * MiB
    backend.image("v").write_bytes(b"garbage")  # never raises for an existing volume
    assert backend.status("v")["used_bytes"] is None
    assert backend.status("v")["filesystem"] is None


def test_host_disk_use_follows_the_data(backend: ImageBackend, fs: str) -> None:
    backend.create("v", sized(10 * GiB, fs))
    image = backend.image("v")
    fresh = host_bytes(image)
    baseline = 0 if fs == "ext4" else 64 * MiB  # XFS's log is written out
    assert fresh - baseline < 8 * MiB, f"a fresh 10 GiB volume takes {fresh} bytes on the host"
    with backend.view("v") as path:
        time.sleep(2)  # the kernel's lazy inode-table init would write now
        os.sync()
        assert host_bytes(image) - baseline < 8 * MiB
        fill(path / "data", 100)
        assert host_bytes(image) >= baseline + 100 * MiB
        (path / "data").unlink()

        def returned() -> bool:
            # The journal or log commit that frees the blocks issues the discards, which
            # punch holes in the image.  XFS frees an unlinked file's blocks in a background
            # worker after the unlink: statfs hurries it, and a sync then commits what it
            # freed (left alone, XFS commits within 30 s).
            os.statvfs(path)
            os.sync()
            return host_bytes(image) - baseline < 10 * MiB

        assert eventually(returned), host_bytes(image)


def test_the_filesystem_is_known_after_a_restart_and_kept_by_replace(
        backend: ImageBackend, root: Path, fs: str) -> None:
    backend.create("v", sized(SMALL[fs], fs))
    restarted = ImageBackend(root)  # no record but the image itself
    assert restarted.status("v")["filesystem"] == fs
    with restarted.view("v") as path:
        (path / "old").write_text("old")
    restarted.replace("v", lambda p: (p / "new").write_text("new"))
    assert restarted.status("v")["filesystem"] == fs
    assert restarted.size("v") == SMALL[fs]
    with ImageBackend(root).view("v") as path:
        assert os.listdir(path) == ["new"]


def test_loop_devices_use_direct_io(backend: ImageBackend, root: Path) -> None:
    backend.create("v", sized(64 * MiB))
    with backend.view("v"):
        [number] = loops_under(root)
        dio = Path(f"/sys/block/loop{number}/loop/dio").read_text().strip()
        assert dio == "1", "the loop device caches pages twice (buffered, not direct I/O)"
        found = loop.find(backend.image("v"))
        assert found is not None and found.flags & loop.LO_FLAGS_AUTOCLEAR


def test_a_kernel_refusing_direct_io_gets_a_buffered_device(
        backend: ImageBackend, root: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real = fcntl.ioctl

    def refuse_dio(fd: int, request: int, arg: object = 0, *rest: object) -> object:
        if request == loop.LOOP_CONFIGURE and isinstance(arg, bytes):
            info = arg[8:8 + loop.INFO64.size]
            if loop.INFO64.unpack(info)[8] & loop.LO_FLAGS_DIRECT_IO:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, request, arg, *rest)  # type: ignore[call-overload]

    monkeypatch.setattr(fcntl, "ioctl", refuse_dio)
    monkeypatch.setattr(loop, "_direct_io", True)
    with caplog.at_level(logging.INFO, logger="backends.loop"):
        backend.create("v", sized(64 * MiB))
        backend.create("w", sized(64 * MiB))
        with backend.view("v"), backend.view("w"):
            assert len(loops_under(root)) == 2
            for number in loops_under(root):
                assert Path(f"/sys/block/loop{number}/loop/dio").read_text().strip() == "0"
    assert caplog.text.count("refuses direct I/O") == 1  # logged once, not per device


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
    assert eventually(lambda: loops_under(root) == [])


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
    assert eventually(lambda: loops_under(root) == [])
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
    assert eventually(lambda: loops_under(root) == [])


def test_shrink_is_refused_with_what_to_do(backend: ImageBackend, fs: str) -> None:
    size = SMALL[fs]
    backend.create("v", sized(size, fs))
    why = "ext4 cannot shrink while mounted" if fs == "ext4" else "XFS cannot shrink"
    with pytest.raises(SizeShrink, match=rf"'v' is {format_size(size)}; it cannot shrink to "
                                         rf"{format_size(size // 2)} \({why}\).*"
                                         rf"-o size={size // 2 // MiB}MiB and -o from=v"):
        backend.resize("v", size // 2)
    assert backend.size("v") == size


def test_online_resize_while_a_file_is_open(backend: ImageBackend, fs: str) -> None:
    """XFS always grows online; ext4 only where this process holds CAP_SYS_RESOURCE, and
    otherwise says so and points at -o fs=xfs."""
    online = fs == "xfs" or has_capability(CAP_SYS_RESOURCE)
    backend.create("v", sized(SMALL[fs], fs))
    path = backend.mount("v")
    before = statvfs_total(path)
    try:
        with open(path / "open", "wb") as f:
            f.write(b"x" * MiB)
            if not online:
                with pytest.raises(VolumeInUse, match=r"'v' is in use, and growing a mounted "
                                                      r"ext4 volume needs CAP_SYS_RESOURCE.*"
                                                      r"-o fs=xfs grow online"):
                    backend.resize("v", 4 * SMALL[fs])
                assert backend.size("v") == SMALL[fs] and statvfs_total(path) == before
                return
            assert backend.resize("v", 4 * SMALL[fs]) == "online"
            for _ in range(SMALL[fs] // MiB + 50):  # more than the old size
                f.write(b"y" * MiB)
            os.fsync(f.fileno())
        assert backend.size("v") == 4 * SMALL[fs]
        assert statvfs_total(path) > before + 2 * SMALL[fs]
    finally:
        backend.unmount("v")


def test_xfs_grows_online_when_idle_too(backend: ImageBackend) -> None:
    backend.create("v", sized(320 * MiB, "xfs"))
    with backend.view("v") as path:
        (path / "f").write_text("kept")
    assert backend.resize("v", GiB) == "online"  # mounted for the grow, then let go
    with backend.view("v") as path:
        assert (path / "f").read_text() == "kept"
        assert statvfs_total(path) == GiB - 64 * MiB


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


def test_a_grow_cut_short_is_finished_by_the_next_resize(backend: ImageBackend,
                                                         fs: str) -> None:
    size = SMALL[fs]
    backend.create("v", sized(size, fs))
    with open(backend.image("v"), "r+b") as f:  # the image grew, then the process died
        f.truncate(2 * size)
    assert backend.resize("v", 2 * size) in ("online", "offline")
    with backend.view("v") as path:
        assert statvfs_total(path) > 1.8 * size - (0 if fs == "ext4" else 64 * MiB)


def test_replace_keeps_the_size_and_refuses_a_volume_in_use(backend: ImageBackend,
                                                            fs: str) -> None:
    size = SMALL[fs] + 32 * MiB
    backend.create("v", sized(size, fs))
    path = backend.mount("v")
    (path / "old").write_text("old")
    with pytest.raises(VolumeInUse, match=r"'v' is in use"):
        backend.replace("v", lambda p: (p / "new").write_text("new"))
    with pytest.raises(VolumeInUse, match=r"'v' is in use"):
        backend.remove("v")
    assert (path / "old").read_text() == "old"
    backend.unmount("v")
    backend.replace("v", lambda p: (p / "new").write_text("new"))
    assert backend.size("v") == size
    assert backend.status("v")["filesystem"] == fs
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
    assert eventually(lambda: loops_under(root) == [])
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


def test_a_new_process_mounts_a_volume_whose_device_an_old_one_left_bound(
        backend: ImageBackend, root: Path, tmp_path: Path) -> None:
    """A plugin restarted while a container uses a sized volume: the old plugin's mounts
    died with its namespace, the container's bind keeps the filesystem and its loop device.
    The new plugin reuses that device at once (it neither waits for it nor binds another)."""
    backend.create("v", sized(64 * MiB))
    data = backend.mount("v")
    (data / "f").write_text("in use")
    container = tmp_path / "container"
    container.mkdir()
    subprocess.run(["mount", "--bind", str(data), str(container)], check=True)
    try:
        subprocess.run(["umount", "-l", str(data)], check=True)  # the old namespace is gone
        assert len(loops_under(root)) == 1
        again = ImageBackend(root)
        done: list[Path] = []
        worker = threading.Thread(target=lambda: done.append(again.mount("v")), daemon=True)
        worker.start()
        worker.join(10)
        assert done, "mount blocked while the volume's device was still bound"
        assert (done[0] / "f").read_text() == "in use"
        (container / "g").write_text("shared")
        assert (done[0] / "g").read_text() == "shared"  # one filesystem, not a second mount
        assert len(loops_under(root)) == 1
        again.unmount("v")
    finally:
        subprocess.run(["umount", str(container)], check=False)
