"""XFS in an image file (a :class:`backends.filesystems.Filesystem`), chosen with
``-o fs=xfs``: it grows while mounted with only CAP_SYS_ADMIN (XFS_IOC_FSGROWFSDATA, through
``xfs_growfs``), which the plugin holds for mount(2) anyway, where ext4 needs
CAP_SYS_RESOURCE, which dockerd often cannot hand a plugin.

The price, measured with xfsprogs 6.1 on Linux 6.18: mkfs.xfs refuses a filesystem under
300 MiB, and writes out its log, 64 MiB at least (``-l size`` below 64m is refused), so a
fresh volume takes about 64 MiB on the host whatever its size (ext4: about 4 MiB).  The log
also comes out of the volume's size: statvfs shows a 1 GiB volume as 960 MiB.

``-m reflink=1`` (mkfs.xfs's default since 5.1, spelled out): copies within a volume can
share blocks.  Mounted with ``discard``: blocks freed in the volume are punched out of the
image once the log commits them (a sync, or the log worker within 30 s; a deleted file's
blocks are freed by a background worker first), so the host gets them back.  XFS has no
lost+found.  It cannot shrink, mounted or not.
"""

from __future__ import annotations

import struct
from pathlib import Path

from backends.filesystems import ToolError, read_head, run
from backends.sizes import MiB

NAME = "xfs"
MIN_SIZE = 300 * MiB
"""mkfs.xfs: "Filesystem must be larger than 300MB" (it takes exactly 300 MiB)."""
MKFS = ("mkfs.xfs", "-q", "-f", "-m", "reflink=1", "-s", "size=4096")
"""4 KiB sectors: once an image shares extents with a snapshot's clone, the kernel wants 4 KiB
aligned direct I/O on it; with 512-byte sectors the loop device falls back to buffered I/O."""
MOUNT_OPTIONS = b"discard"
PACKAGE = "xfsprogs"

MAGIC = b"XFSB"
# Superblock fields (big-endian): sb_blocksize u32 @4, sb_dblocks u64 @8,
# sb_fdblocks u64 @144.
RESERVE_BLOCKS = 8192
"""The kernel keeps min(5%, 8192 blocks) of free space in reserve while mounted
(xfs_default_resblks); statvfs leaves it out, the superblock at rest counts it."""


def make(image: Path) -> None:
    """Make an empty XFS filling the (sparse) file ``image``."""
    run([*MKFS, str(image)], PACKAGE)


def holds(image: Path) -> bool:
    return read_head(image, 4) == MAGIC


def can_grow_online() -> bool:
    """Always: growing needs CAP_SYS_ADMIN, which mounting it needed already."""
    return True


def grow_online(device: Path, mountpoint: Path) -> None:
    """Grow the XFS mounted on ``mountpoint`` to fill its device."""
    run(["xfs_growfs", "-d", str(mountpoint)], PACKAGE)


def grow_offline(image: Path) -> None:
    """XFS grows only while mounted: since :func:`can_grow_online` is always true, the image
    backend grows an idle XFS volume by mounting it, and never calls this."""
    raise ToolError(f"{image}: XFS grows only while mounted")


def usage(image: Path) -> tuple[int, int] | None:
    """(total bytes, free bytes) from the primary superblock in ``image``, or None if it
    holds no XFS.  Total includes the internal log.  Free leaves out the kernel's reserve,
    so it is within about 1% of what statvfs shows once mounted (the rest is per-group
    metadata reservations); with lazy counters the superblock is exact only after a clean
    unmount, and lags while mounted, so read statvfs then."""
    raw = read_head(image, 152)
    if len(raw) < 152 or raw[:4] != MAGIC:
        return None
    block_size, = struct.unpack_from(">I", raw, 4)
    blocks, = struct.unpack_from(">Q", raw, 8)
    free, = struct.unpack_from(">Q", raw, 144)
    free -= min(blocks // 20, RESERVE_BLOCKS)
    return blocks * block_size, max(free, 0) * block_size
