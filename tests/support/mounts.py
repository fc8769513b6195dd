"""The mount table of this process's namespace (tmp paths need no mountinfo unescaping)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from tests.support.waiting import eventually


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def mounts_at(path: Path) -> int:
    """How many mounts are stacked on ``path``."""
    target = os.path.realpath(path)
    return sum(1 for point in _mountpoints() if point == target)


def mounts_under(path: Path) -> list[str]:
    """The mountpoints at or below ``path``, in mount order."""
    prefix = os.path.realpath(path)
    return [p for p in _mountpoints() if p == prefix or p.startswith(prefix + "/")]


def release_mounts_under(path: Path) -> None:
    """Detach (lazily) what is still mounted at or below ``path``, deepest first: a server
    killed with a sized volume mounted leaves its filesystem mounted (autoclear then frees
    the loop device)."""
    for target in reversed(mounts_under(path)):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


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
    release_mounts_under(path)
    eventually(lambda: not loops_under(path))
    return mounts, loops_under(path)
