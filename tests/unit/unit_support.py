"""Helpers of the unit tier: driver factories and bind mounts made and undone by hand (the
mount table itself is read with ``tests.support.mounts``)."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from pathlib import Path

from plugin.driver import Driver

MakeDriver = Callable[..., Driver]
MS_BIND = 4096
MNT_DETACH = 2


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def detach(path: Path) -> None:
    """Lazily unmount ``path`` behind the driver's back (as a new mount namespace would)."""
    if libc().umount2(str(path).encode(), MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), f"umount2 {path}")
