"""Real ext4, XFS and btrfs filesystems on loop devices, for tests and benchmarks.

Each lives in a sparse image file under a work directory, made with the filesystem's mkfs and
mounted with ``mount -o loop``.  That needs root and loop devices: where either is missing,
:class:`LoopUnavailable` says why, and the caller decides whether that skips or fails.
Teardown unmounts (lazily as a last resort), detaches the loop device and deletes the image,
also when the code using the filesystem failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FSTYPES = ("ext4", "xfs", "btrfs")
MKFS: dict[str, list[str]] = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
PACKAGES = {"ext4": "e2fsprogs", "xfs": "xfsprogs", "btrfs": "btrfs-progs"}
REFLINK = frozenset({"xfs", "btrfs"})
"""Filesystems where a file can be cloned (FICLONE) instead of copied."""


class LoopUnavailable(Exception):
    """This machine cannot loop-mount the filesystem: the message says why."""


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _umount(mountpoint: Path) -> None:
    """Unmount, retrying while something still holds the filesystem; detach lazily at last."""
    for _ in range(50):
        if not _mounted(mountpoint):
            return
        if _run(["umount", str(mountpoint)]).returncode == 0:
            return
        time.sleep(0.1)
    _run(["umount", "-l", str(mountpoint)])


def _detach(image: Path) -> None:
    """Detach any loop device still backed by ``image`` (mount -o loop sets autoclear)."""
    found = _run(["losetup", "-j", str(image)])
    for line in found.stdout.splitlines():
        device = line.split(":", 1)[0]
        if device:
            _run(["losetup", "-d", device])


@contextmanager
def loop_filesystem(fstype: str, workdir: Path, size: int = 1 << 30) -> Iterator[Path]:
    """Yield the mountpoint of a fresh ``fstype`` filesystem of ``size`` bytes (sparse)."""
    if fstype not in MKFS:
        raise ValueError(f"unknown filesystem {fstype!r}; known: {', '.join(FSTYPES)}")
    if os.geteuid() != 0:
        raise LoopUnavailable("mount -o loop needs root")
    mkfs = shutil.which(MKFS[fstype][0])
    if mkfs is None:
        raise LoopUnavailable(f"{MKFS[fstype][0]} is missing: apt-get install {PACKAGES[fstype]}")
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / f"{fstype}.img"
    mountpoint = workdir / f"{fstype}-mnt"
    with open(image, "wb") as f:
        f.truncate(size)
    try:
        made = _run([mkfs, *MKFS[fstype][1:], str(image)])
        if made.returncode != 0:
            raise RuntimeError(f"{' '.join(MKFS[fstype])} failed: {made.stderr.strip()}")
        mountpoint.mkdir(exist_ok=True)
        mounted = _run(["mount", "-o", "loop", "-t", fstype, str(image), str(mountpoint)])
        if mounted.returncode != 0:
            raise LoopUnavailable(
                f"mount -o loop of {fstype} is not permitted here: {mounted.stderr.strip()}")
        try:
            yield mountpoint
        finally:
            _umount(mountpoint)
    finally:
        _detach(image)
        image.unlink(missing_ok=True)
        if mountpoint.is_dir() and not _mounted(mountpoint):
            shutil.rmtree(mountpoint, ignore_errors=True)


def used_bytes(path: Path) -> int:
    """Bytes in use on the filesystem holding ``path``, after flushing it."""
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize
