"""What the ``image`` backend needs of a filesystem in an image file, and the parts every
filesystem shares (running its tools, mount, unmount).

A filesystem is a module (:mod:`backends.ext4`, :mod:`backends.xfs`) that meets
:class:`Filesystem`.  Which one a volume holds is read from its image's superblock
(:meth:`Filesystem.holds`), so nothing else records it: it survives restarts, and a
replace or restore builds the new image with the same one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import subprocess
from pathlib import Path
from typing import Protocol

from backends.fs import libc

log = logging.getLogger(__name__)

MNT_DETACH = 2
TOOL_TIMEOUT = 120.0
"""mkfs and grow tools take seconds on a sparse image even at 16 TiB; a hung one is an error."""


class ToolError(Exception):
    """A filesystem tool failed or is missing; the message says which and why."""


class Filesystem(Protocol):
    """One filesystem type, as a module: constants and functions."""

    NAME: str
    """As ``-o fs=`` and mount(2) spell it."""
    MIN_SIZE: int
    """The smallest image its mkfs accepts (and that leaves room for data)."""
    MOUNT_OPTIONS: bytes

    def make(self, image: Path) -> None:
        """Make an empty filesystem filling the (sparse) file ``image``."""

    def holds(self, image: Path) -> bool:
        """Whether ``image`` starts with this filesystem's superblock."""

    def can_grow_online(self) -> bool:
        """Whether this process may grow it while mounted."""

    def grow_online(self, device: Path, mountpoint: Path) -> None:
        """Grow the filesystem mounted from ``device`` on ``mountpoint`` to fill the device."""

    def grow_offline(self, image: Path) -> None:
        """Grow the filesystem in ``image``, which nothing may have mounted, to fill it."""

    def usage(self, image: Path) -> tuple[int, int] | None:
        """(total bytes, free bytes) from the superblock at rest, or None if it is not there."""


def run(args: list[str], package: str, ok: tuple[int, ...] = (0,)) -> None:
    """Run a tool of ``package``; raise :class:`ToolError` with its last line of output."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
        if done.returncode not in ok:
            raise subprocess.CalledProcessError(done.returncode, args, done.stdout, done.stderr)
    except FileNotFoundError as exc:
        raise ToolError(f"{args[0]} is missing: install {package}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{args[0]} did not finish within {TOOL_TIMEOUT:.0f} s") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise ToolError(f"{args[0]} failed ({exc.returncode}): "
                        f"{detail[-1] if detail else 'no output'}") from exc


def read_head(image: Path, length: int, offset: int = 0) -> bytes:
    fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def mount(fs: Filesystem, device: Path, target: Path) -> None:
    if libc().mount(os.fsencode(device), os.fsencode(target), fs.NAME.encode(), 0,
                    fs.MOUNT_OPTIONS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount {device} ({fs.NAME}) on {target}: "
                           f"{os.strerror(err)}")


def unmount(target: Path) -> None:
    """Unmount ``target``; if it is busy (a process has a file or its cwd there), detach it
    lazily: it goes away, and the loop device with it, when the last user lets go."""
    c = libc()
    if c.umount2(os.fsencode(target), 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not mounted
        return
    if err != errno.EBUSY:
        raise OSError(err, f"cannot unmount {target}: {os.strerror(err)}")
    log.warning("%s is busy: detaching it lazily; its loop device is freed when the last "
                "process using it lets go", target)
    if c.umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot detach {target}: {os.strerror(err)}")
