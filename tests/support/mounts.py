"""The mount table of this process's namespace (tmp paths need no mountinfo unescaping)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


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
