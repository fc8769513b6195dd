"""What a user sees of a directory tree, read with plain system calls (never with
``backends.tree``, whose walk the tests check instead of repeating)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def describe(root: Path) -> dict[str, tuple[Any, ...]]:
    """Per path (``root`` itself as "."): its type, mode, owner, mtime, content digest, link
    text, device number, user xattrs and which other paths share its inode."""
    inodes: dict[int, list[str]] = {}
    paths = [root, *sorted(root.rglob("*"))]
    for p in paths:
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            inodes.setdefault(st.st_ino, []).append(str(p.relative_to(root)))
    state: dict[str, tuple[Any, ...]] = {}
    for p in paths:
        st = p.lstat()
        rel = str(p.relative_to(root))
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
        xattrs = {} if stat.S_ISLNK(st.st_mode) else {
            name: os.getxattr(p, name, follow_symlinks=False)
            for name in os.listxattr(p, follow_symlinks=False) if name.startswith("user.")}
        group = tuple(sorted(inodes[st.st_ino])) if stat.S_ISREG(st.st_mode) else ()
        rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
        state[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                      st.st_mtime_ns, digest, link, rdev, xattrs, group)
    return state


def picture(root: Path) -> list[tuple[Any, ...]]:
    """What a user can observe of every entry below ``root`` (not ``root`` itself): kind,
    mode, owner, mtime, size, content hash or link text, and which entries share an inode.
    The same on any host that holds the same tree, so trees compare across hosts."""
    out: list[tuple[Any, ...]] = []
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if os.path.islink(path):
                what = "link:" + os.readlink(path)
            elif path.is_dir():
                what = "dir"
            else:
                what = hashlib.sha256(path.read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    what += " same-inode-as:" + inodes.setdefault(st.st_ino, rel)
            out.append((rel, what, oct(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                        st.st_size))
    return out


def contents(root: Path) -> dict[str, str]:
    """The sha256 of every regular file below ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def inodes(root: Path) -> set[tuple[int, int]]:
    """(device, inode) of every entry below ``root`` but symlinks: on btrfs each subvolume
    numbers its inodes from 256 again."""
    return {(st.st_dev, st.st_ino) for st in (p.lstat() for p in root.rglob("*"))
            if not stat.S_ISLNK(st.st_mode)}


def files_containing(root: Path, needle: bytes) -> list[str]:
    """The regular files under ``root`` (as relative paths) whose content contains ``needle``.

    Walked relative to directory descriptors: no symlink followed, no FIFO opened, no PATH_MAX.
    An entry that vanishes during the walk (a running server's temporary file) is passed over.
    """
    found = []
    stack = [(os.open(root, DIR), "")]
    try:
        while stack:
            fd, prefix = stack.pop()
            try:
                with os.scandir(fd) as it:
                    for child in it:
                        with contextlib.suppress(FileNotFoundError):
                            st = child.stat(follow_symlinks=False)
                            if stat.S_ISDIR(st.st_mode):
                                stack.append((os.open(child.name, DIR, dir_fd=fd),
                                              prefix + child.name + "/"))
                            elif stat.S_ISREG(st.st_mode):
                                sub = os.open(child.name, FILE, dir_fd=fd)
                                with open(sub, "rb") as f:
                                    if needle in f.read():
                                        found.append(prefix + child.name)
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
    return found
