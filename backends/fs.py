"""Filesystem helpers shared by the backends: confined paths, bind mounts, sizes.

Every path built from user input goes through :func:`confined`, which proves it stays under
its root.  Mount calls go straight to libc (no shell, no extra binaries in the rootfs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from backends.errors import BackendError, UnsafePath

MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2


def confined(root: Path, *parts: str) -> Path:
    """Return ``root/parts...``, refusing anything that would resolve outside ``root``.

    Parts must be single, non-empty path components; ``..``, ``/`` and NUL are rejected
    before any filesystem access.
    """
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\0" in part:
            raise UnsafePath(f"refusing path component {part!r} under {root}")
    path = root.joinpath(*parts)
    # The parts are plain names, so only a symlink among them can lead out of the root: a
    # link planted inside it is resolved and checked (an lstat per part, no realpath).
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            if not path.resolve().is_relative_to(root.resolve()):
                raise UnsafePath(f"path {path} escapes {root}")
            break
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete a directory tree without following symlinks out of it; missing is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if path.exists():
        shutil.rmtree(path)


class Cancelled(Exception):
    pass


def tree_usage(path: Path, cancelled: Callable[[], bool] = lambda: False) -> tuple[int, int]:
    """Return (bytes on disk, number of entries) below ``path``; never follows symlinks.

    Hard-linked files are counted once.  Entries that vanish during the walk are skipped.
    Raises :class:`Cancelled` soon after ``cancelled()`` turns true.
    """
    total = 0
    count = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(path)]
    while stack:
        if cancelled():
            raise Cancelled(str(path))
        current = stack.pop()
        try:
            with os.scandir(current) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    count += 1
                    if st.st_nlink > 1 and not entry.is_dir(follow_symlinks=False):
                        key = (st.st_dev, st.st_ino)
                        if key in seen:
                            continue
                        seen.add(key)
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total, count


_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def bind_mount(source: Path, target: Path) -> None:
    """Bind-mount ``source`` on ``target`` (created if missing)."""
    target.mkdir(parents=True, exist_ok=True)
    rc = _load_libc().mount(
        str(source).encode(), str(target).encode(), None, MS_BIND | MS_REC, None
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise BackendError(
            f"cannot bind-mount {source} on {target}: {os.strerror(err)}"
            + (" (the plugin needs CAP_SYS_ADMIN)" if err == errno.EPERM else "")
        )


def unmount(target: Path) -> None:
    """Lazily unmount ``target`` and remove the empty mountpoint; not mounted is fine."""
    rc = _load_libc().umount2(str(target).encode(), MNT_DETACH)
    if rc != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise BackendError(f"cannot unmount {target}: {os.strerror(err)}")
    try:
        target.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EBUSY):
            raise


MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape_mountinfo(field: bytes) -> bytes:
    """Undo mountinfo's octal escapes (``\\040`` for a space, ``\\134`` for a backslash)."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def is_mountpoint(path: Path) -> bool:
    """Whether something is mounted on ``path``, bind mounts within one filesystem included.

    ``os.path.ismount`` compares device numbers with the parent's, so it misses a bind mount
    of a directory from the same filesystem; mountinfo lists every mount.
    """
    try:
        target = os.fsencode(os.path.realpath(path))
        with MOUNTINFO.open("rb") as f:
            return any(
                len(fields) > 4 and _unescape_mountinfo(fields[4]) == target
                for fields in (line.split() for line in f)
            )
    except OSError:
        try:
            return os.path.ismount(path)
        except OSError:
            return False


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path`` (one call instead of an fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _load_libc().syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync, rename and directory fsync."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)
