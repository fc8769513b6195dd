"""btrfs subvolumes and read-only snapshots through ioctls (no btrfs-progs needed).

A volume created on btrfs is a subvolume, so a snapshot of it is one atomic, O(1) ioctl: the
whole tree at one instant, sharing extents copy-on-write.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from pathlib import Path

BTRFS_SUPER_MAGIC = 0x9123683E
FIRST_FREE_OBJECTID = 256
"""The inode number of every subvolume's root directory."""

_IOW_4096 = (1 << 30) | (4096 << 16) | (0x94 << 8)
IOC_SUBVOL_CREATE = _IOW_4096 | 14
IOC_SNAP_DESTROY = _IOW_4096 | 15
IOC_SNAP_CREATE_V2 = _IOW_4096 | 23
SUBVOL_RDONLY = 1 << 1
NAME_MAX_V1 = 4087
NAME_MAX_V2 = 4039


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def is_btrfs(path: Path) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        return False
    return bool((buf.f_type & 0xFFFFFFFF) == BTRFS_SUPER_MAGIC)


def is_subvolume(path: Path) -> bool:
    try:
        return os.lstat(path).st_ino == FIRST_FREE_OBJECTID and is_btrfs(path)
    except OSError:
        return False


def _vol_args(name: str, fd: int = 0) -> bytearray:
    encoded = name.encode()
    if len(encoded) > NAME_MAX_V1:
        raise OSError(f"subvolume name too long: {name!r}")
    buf = bytearray(4096)
    buf[0:8] = fd.to_bytes(8, "little", signed=True)
    buf[8:8 + len(encoded)] = encoded
    return buf


def _on_parent(path: Path, request: int) -> None:
    """Issue a name-only subvolume ioctl on ``path``'s parent directory."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(parent, request, _vol_args(path.name))
    finally:
        os.close(parent)


def create_subvolume(path: Path) -> None:
    """Create an empty subvolume at ``path`` (its parent must exist)."""
    _on_parent(path, IOC_SUBVOL_CREATE)


def snapshot(source: Path, target: Path, readonly: bool = True) -> None:
    """Atomically snapshot the subvolume ``source`` as the new subvolume ``target``."""
    src = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    parent = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        encoded = target.name.encode()
        if len(encoded) > NAME_MAX_V2:
            raise OSError(f"snapshot name too long: {target.name!r}")
        buf = bytearray(4096)
        buf[0:8] = src.to_bytes(8, "little", signed=True)
        buf[16:24] = (SUBVOL_RDONLY if readonly else 0).to_bytes(8, "little")
        buf[56:56 + len(encoded)] = encoded
        fcntl.ioctl(parent, IOC_SNAP_CREATE_V2, buf)
    finally:
        os.close(parent)
        os.close(src)


def destroy_subvolume(path: Path) -> None:
    """Delete the subvolume at ``path`` with everything in it (read-only ones too)."""
    _on_parent(path, IOC_SNAP_DESTROY)
