"""Helpers for tests that make loop devices and mounts: find them, wait for them to go, and
clear whatever a failed test left (unmount first, then the autoclear devices free
themselves)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from unit_support import MNT_DETACH, libc

from tests.support.mounts import mounts_under
from tests.support.waiting import eventually

HAS_LOOP = Path("/dev/loop-control").exists()
needs_loop = pytest.mark.skipif(
    not HAS_LOOP, reason="/dev/loop-control is absent: image volumes need loop devices")


def loops_under(path: Path) -> list[int]:
    """Loop devices whose backing file lies under ``path``."""
    prefix = os.path.realpath(path) + "/"
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):
            backing = (entry / "loop" / "backing_file").read_text().strip()
            if backing.startswith(prefix):
                found.append(int(entry.name[4:]))
    return sorted(found)



def clear_under(path: Path) -> tuple[list[str], list[int]]:
    """Detach every mount under ``path``, wait for its loop devices to free themselves, and
    return what was left behind (mounts, devices) for the test to fail on."""
    mounts = mounts_under(path)
    c = libc()
    for point in sorted(mounts, key=len, reverse=True):
        c.umount2(point.encode(), MNT_DETACH)
    eventually(lambda: not loops_under(path))
    return mounts, loops_under(path)
