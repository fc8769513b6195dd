"""Filesystem helpers shared by the backends: confined paths, bind mounts, sizes.

Every path built from user input goes through :func:`confined`, which proves it stays under
its root.  Mount calls go straight to libc (no shell, no extra binaries in the rootfs).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import resource
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from backends.errors import BackendError, UnsafePath
from backends.tree import DIR_FLAGS, walk

log = logging.getLogger(__name__)

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
    """Delete a directory tree without following symlinks out of it; missing is fine.

    Works relative to directory descriptors with an explicit stack (one descriptor per
    level): no recursion limit, no PATH_MAX, and a directory swapped for a symlink meanwhile
    is unlinked, never entered.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return
    parent = os.open(path.parent, DIR_FLAGS)
    try:
        _remove_at(parent, path.name)
    finally:
        os.close(parent)


def _remove_at(parent: int, name: str) -> None:
    """Remove the directory ``name`` of the open directory ``parent`` and all it holds."""
    try:
        top = os.open(name, DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return
    # Frames: (parent fd, name in it, own fd, subdirectories left to remove).
    stack: list[tuple[int, str, int, list[str] | None]] = [(parent, name, top, None)]
    try:
        while stack:
            up, here, fd, subdirs = stack[-1]
            if subdirs is None:
                subdirs = []
                with os.scandir(fd) as it:
                    for child in it:
                        if child.is_dir(follow_symlinks=False):
                            subdirs.append(child.name)
                        else:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(child.name, dir_fd=fd)
                stack[-1] = (up, here, fd, subdirs)
            if subdirs:
                sub = subdirs.pop()
                try:
                    stack.append((fd, sub, os.open(sub, DIR_FLAGS, dir_fd=fd), None))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    os.unlink(sub, dir_fd=fd)  # swapped for a file or link: not entered
                continue
            stack.pop()
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(here, dir_fd=up)
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)


PRIVATE = 0o700
"""Mode of pyvol's data root and of every directory under it that holds volume data."""


def make_private(path: Path) -> None:
    """Create ``path`` (and missing parents) mode 0700, or narrow an existing one to 0700.

    Volume data must not be reachable for other host users through pyvol's directories (a
    setuid file in a volume would otherwise run for them), as dockerd does with its data root.
    A wider mode found is corrected and logged.
    """
    path.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
    fd = os.open(path, DIR_FLAGS)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            log.warning("%s was mode %04o, readable or searchable by other host users; "
                        "setting it to %04o", path, mode, PRIVATE)
            os.chmod(fd, PRIVATE)
    finally:
        os.close(fd)


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one: walks hold one descriptor per level of
    a tree, and a container can make a tree thousands of levels deep."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # the kernel caps it at fs.nr_open anyway
        try:
            hard = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            return
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
    try:
        root = os.open(path, DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return 0, 0
    try:
        with contextlib.closing(walk(root, sort=False)) as dirs:
            for _, _, children in dirs:
                if cancelled():
                    raise Cancelled(str(path))
                for _, st in children:
                    count += 1
                    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                        key = (st.st_dev, st.st_ino)
                        if key in seen:
                            continue
                        seen.add(key)
                    total += st.st_blocks * 512
    finally:
        os.close(root)
    return total, count


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library, loaded once (with errno kept for ctypes.get_errno)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def bind_mount(source: Path, target: Path) -> None:
    """Bind-mount ``source`` on ``target`` (created if missing)."""
    target.mkdir(parents=True, exist_ok=True)
    rc = libc().mount(
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
    rc = libc().umount2(str(target).encode(), MNT_DETACH)
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
        if libc().syncfs(fd) != 0:
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


def move_to_bin(path: Path, bins: Path, name: str) -> None:
    """Rename ``path`` into a new bin ``bins/.<random>/name`` at once, whatever its size; the
    caller deletes the bins later.  A bin of its own holds the bare name (``name.suffix``
    would pass NAME_MAX for the longest names), and bins start with a dot, so they never
    clash with bare names parked in ``bins``.  On failure nothing moved and the empty bin is
    gone."""
    bin_ = bins / f".{secrets.token_hex(8)}"
    try:
        bin_.mkdir(mode=0o700)
        os.rename(path, confined(bin_, name))
        fsync_dir(bin_)
        fsync_dir(path.parent)
    except OSError:
        if os.path.lexists(path):
            remove_tree(bin_)
        raise
