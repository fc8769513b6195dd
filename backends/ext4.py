"""ext4 in an image file: make, mount, unmount, grow, and read usage from the superblock.

mkfs flags, measured on a fresh 10 GiB sparse image (Linux 6.18, e2fsprogs 1.47):

* ``-E lazy_itable_init=1,lazy_journal_init=1`` and mke2fs's default discard: on a regular
  file the discard punches holes (a no-op on a sparse file) and, since holes read as zeros,
  mke2fs flags every group's inode table as zeroed, so the kernel's lazy-init thread never
  writes zeros later.  The host spends 4.2 MiB.  With ``-E nodiscard`` the journal is
  written out (68 MiB) and the inode tables are left for the kernel to zero (it allocates
  them in the image as it goes).
* ``-m 0``: no blocks reserved for root; a volume's whole size is the container's.
* ``-b 4096``: one block size for every size (mke2fs picks 1 KiB for small filesystems,
  which caps their growth).

Mounted with ``discard``: blocks freed in the volume are punched out of the image, so the
host gets them back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

MKFS = ("mkfs.ext4", "-F", "-q", "-m", "0", "-b", "4096",
        "-E", "lazy_itable_init=1,lazy_journal_init=1")
MOUNT_OPTIONS = b"discard"
MNT_DETACH = 2
TOOL_TIMEOUT = 120.0
"""mkfs and resize2fs of a sparse image take seconds even at 16 TiB; a hung one is an error."""

SUPERBLOCK_OFFSET = 1024
EXT4_MAGIC = 0xEF53
INCOMPAT_64BIT = 0x80
DESC_SIZE_64 = 64


class ToolError(Exception):
    """An e2fsprogs tool failed or is missing; the message says which and why."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _run(args: list[str], ok: tuple[int, ...] = (0,)) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
        if done.returncode not in ok:
            raise subprocess.CalledProcessError(done.returncode, args, done.stdout, done.stderr)
    except FileNotFoundError as exc:
        raise ToolError(f"{args[0]} is missing: install e2fsprogs") from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{args[0]} did not finish within {TOOL_TIMEOUT:.0f} s") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise ToolError(f"{args[0]} failed ({exc.returncode}): "
                        f"{detail[-1] if detail else 'no output'}") from exc


def make(image: Path) -> None:
    """Make an empty ext4 filling the (sparse) file ``image``."""
    _run([*MKFS, str(image)])


def grow(device: Path) -> None:
    """Grow the mounted ext4 on ``device`` to fill it; the kernel does it online, which
    needs CAP_SYS_RESOURCE (:func:`can_grow_online`)."""
    _run(["resize2fs", str(device)])


def grow_offline(image: Path) -> None:
    """Grow the ext4 in ``image``, which nothing may have mounted, to fill it: resize2fs
    wants a fresh check first (e2fsck exit 1 means it fixed something, which is fine)."""
    _run(["e2fsck", "-f", "-p", str(image)], ok=(0, 1))
    _run(["resize2fs", str(image)])


CAP_SYS_RESOURCE = 24


def can_grow_online() -> bool:
    """Whether this process may resize a mounted ext4 (EXT4_IOC_RESIZE_FS checks
    CAP_SYS_RESOURCE; Docker's default set and many plugin configs lack it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError):
        pass
    return False


def mount(device: Path, target: Path) -> None:
    if _libc().mount(os.fsencode(device), os.fsencode(target), b"ext4", 0,
                     MOUNT_OPTIONS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount {device} on {target}: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Unmount ``target``; if it is busy (a process has a file or its cwd there), detach it
    lazily: it goes away, and the loop device with it, when the last user lets go."""
    libc = _libc()
    if libc.umount2(os.fsencode(target), 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not mounted
        return
    if err != errno.EBUSY:
        raise OSError(err, f"cannot unmount {target}: {os.strerror(err)}")
    log.warning("%s is busy: detaching it lazily; its loop device is freed when the last "
                "process using it lets go", target)
    if libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot detach {target}: {os.strerror(err)}")


def usage(image: Path) -> tuple[int, int] | None:
    """(total bytes, free bytes) from the superblock in ``image``, or None if it holds no
    ext4.  Exact when it is not mounted; while mounted the kernel updates it only now and
    then, so read statvfs instead."""
    fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, 1024, SUPERBLOCK_OFFSET)
    finally:
        os.close(fd)
    if len(raw) < 1024 or struct.unpack_from("<H", raw, 0x38)[0] != EXT4_MAGIC:
        return None
    blocks, = struct.unpack_from("<I", raw, 0x4)
    free, = struct.unpack_from("<I", raw, 0xC)
    log_block_size, = struct.unpack_from("<I", raw, 0x18)
    incompat, = struct.unpack_from("<I", raw, 0x60)
    desc_size, = struct.unpack_from("<H", raw, 0xFE)
    if incompat & INCOMPAT_64BIT and desc_size >= DESC_SIZE_64:
        blocks |= struct.unpack_from("<I", raw, 0x150)[0] << 32
        free |= struct.unpack_from("<I", raw, 0x158)[0] << 32
    block_size = 1024 << log_block_size
    return blocks * block_size, free * block_size
