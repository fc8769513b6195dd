"""Helpers of the unit tier: driver factories and bind-mount checks via mountinfo."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path

from plugin.driver import Driver

MakeDriver = Callable[..., Driver]
MS_BIND = 4096
MNT_DETACH = 2


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mounts_at(path: Path) -> int:
    """How many mounts are stacked on ``path`` (tmp paths need no mountinfo unescaping)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == target)


def mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def detach(path: Path) -> None:
    """Lazily unmount ``path`` behind the driver's back (as a new mount namespace would)."""
    if libc().umount2(str(path).encode(), MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), f"umount2 {path}")
