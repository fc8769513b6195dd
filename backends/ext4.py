"""ext4 in an image file (a :class:`backends.filesystems.Filesystem`): make, grow, and read
usage from the superblock.  The default of ``-o fs=``: small (32 MiB at least, about 4 MiB
on the host when empty), but it grows while mounted only with CAP_SYS_RESOURCE.

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

import struct
from pathlib import Path

from backends.filesystems import ToolError as ToolError
from backends.filesystems import read_head, run
from backends.sizes import MIN_SIZE as MIN_SIZE

NAME = "ext4"
MKFS = ("mkfs.ext4", "-F", "-q", "-m", "0", "-b", "4096",
        "-E", "lazy_itable_init=1,lazy_journal_init=1")
MOUNT_OPTIONS = b"discard"
PACKAGE = "e2fsprogs"

SUPERBLOCK_OFFSET = 1024
MAGIC_OFFSET = SUPERBLOCK_OFFSET + 0x38
EXT4_MAGIC = 0xEF53
INCOMPAT_64BIT = 0x80
DESC_SIZE_64 = 64


def make(image: Path) -> None:
    """Make an empty ext4 filling the (sparse) file ``image``."""
    run([*MKFS, str(image)], PACKAGE)


def holds(image: Path) -> bool:
    raw = read_head(image, 2, MAGIC_OFFSET)
    return len(raw) == 2 and struct.unpack("<H", raw)[0] == EXT4_MAGIC


def grow_online(device: Path, mountpoint: Path) -> None:
    """Grow the mounted ext4 on ``device`` to fill it; the kernel does it online, which
    needs CAP_SYS_RESOURCE (:func:`can_grow_online`)."""
    run(["resize2fs", str(device)], PACKAGE)


def grow_offline(image: Path) -> None:
    """Grow the ext4 in ``image``, which nothing may have mounted, to fill it: resize2fs
    wants a fresh check first (e2fsck exit 1 means it fixed something, which is fine)."""
    run(["e2fsck", "-f", "-p", str(image)], PACKAGE, ok=(0, 1))
    run(["resize2fs", str(image)], PACKAGE)


CAP_SYS_RESOURCE = 24


def can_grow_online() -> bool:
    """Whether this process may resize a mounted ext4 (EXT4_IOC_RESIZE_FS checks
    CAP_SYS_RESOURCE; Docker's default set and many plugin configs lack it, and a managed
    plugin cannot get it where dockerd's own bounding set lacks it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError):
        pass
    return False


def usage(image: Path) -> tuple[int, int] | None:
    """(total bytes, free bytes) from the superblock in ``image``, or None if it holds no
    ext4.  Exact when it is not mounted; while mounted the kernel updates it only now and
    then, so read statvfs instead."""
    raw = read_head(image, 1024, SUPERBLOCK_OFFSET)
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
