"""Helpers of the hostile tier: a container's moves, and trees read without trusting paths.

The readers here walk relative to directory descriptors on their own (not with
``backends.tree``), so they check pyvol's walk instead of repeating it, and they work on trees
deeper than PATH_MAX.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import stat
from pathlib import Path
from typing import Any

from functional_support import MIME

from tests.support.trees import DIR, FILE
from tests.support.unix_http import UnixHTTPConnection

Described = dict[str, tuple[Any, ...]]


def call(sock: Path, endpoint: str, payload: object, timeout: float) -> dict[str, Any]:
    """One plugin call that must answer within ``timeout`` seconds (raises TimeoutError)."""
    raw = (json.dumps(payload) + "\n").encode()
    conn = UnixHTTPConnection(sock, timeout=timeout)
    try:
        conn.request("POST", "/" + endpoint, body=raw,
                     headers={"Content-Type": MIME, "Accept": MIME})
        resp: http.client.HTTPResponse = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
    finally:
        conn.close()
    assert isinstance(body, dict)
    return body


def walk(root: Path | int) -> Described:
    """Every entry under ``root``: kind, mode, size, sha256 of content, link target.

    An explicit stack of directory descriptors: no recursion, no PATH_MAX, no symlink followed,
    no FIFO opened.
    """
    top = os.open(root, DIR) if not isinstance(root, int) else os.dup(root)
    out: Described = {}
    stack: list[tuple[int, str, list[str]]] = []
    fd, prefix = top, ""
    try:
        while True:
            if fd >= 0:
                subdirs: list[str] = []
                stack.append((fd, prefix, subdirs))
                with os.scandir(fd) as it:
                    children = sorted(it, key=lambda e: e.name)
                for child in children:
                    rel = prefix + child.name
                    st = child.stat(follow_symlinks=False)
                    digest = target = None
                    if stat.S_ISREG(st.st_mode):
                        digest = file_digest(fd, child.name)
                    elif stat.S_ISLNK(st.st_mode):
                        target = os.readlink(child.name, dir_fd=fd)
                    elif stat.S_ISDIR(st.st_mode):
                        subdirs.append(child.name)
                    out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                st.st_size if stat.S_ISREG(st.st_mode) else 0, digest, target)
                subdirs.reverse()
            fd = -1
            if not stack:
                return out
            parent, parent_prefix, pending = stack[-1]
            if not pending:
                os.close(stack.pop()[0])
                continue
            name = pending.pop()
            fd, prefix = os.open(name, DIR, dir_fd=parent), parent_prefix + name + "/"
    finally:
        for open_fd, _, _ in stack:
            os.close(open_fd)


def file_digest(dir_fd: int, name: str) -> str:
    fd = os.open(name, FILE, dir_fd=dir_fd)
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def allocated(root: Path) -> int:
    """Bytes allocated on disk (st_blocks) by all regular files under ``root``."""
    total = 0
    for path in root.rglob("*"):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            total += st.st_blocks * 512
    return total


def build_deep(root: Path, depth: int, name: str = "level") -> None:
    """``root/name/name/...`` ``depth`` levels deep (far past PATH_MAX), a file at each
    tenth level and at the bottom; built with ``mkdir(dir_fd=)`` as full paths cannot be."""
    fds = [os.open(root, DIR)]
    try:
        for level in range(depth):
            os.mkdir(name, 0o755, dir_fd=fds[-1])
            fds.append(os.open(name, DIR, dir_fd=fds[-1]))
            if level % 10 == 0 or level == depth - 1:
                fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fds[-1])
                os.write(fd, f"level {level}\n".encode())
                os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)


def data_map(path: Path) -> list[tuple[int, int]]:
    """The (start, end) data extents of a file, by SEEK_DATA/SEEK_HOLE."""
    extents = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            offset = end
    finally:
        os.close(fd)
    return extents
