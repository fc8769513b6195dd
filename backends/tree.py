"""Walk, capture and rebuild directory trees with full metadata, never following symlinks.

A tree is a list of :class:`Entry` in pre-order (a directory before its contents).  Entries
keep content references, not content: the snapshot store points them at immutable objects,
the S3 sync at remote chunks.  :func:`materialize` rebuilds a tree from entries plus a
function that writes one file's content, restoring mode, owner, mtime, symlinks (as links),
hard links within the tree, fifos, device nodes and extended attributes.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

Kind = Literal["dir", "file", "hardlink", "symlink", "fifo", "chardev", "blockdev", "socket"]

FICLONE = 0x40049409
COPY_CHUNK = 1 << 26


@dataclass(frozen=True)
class Entry:
    path: str
    """Relative POSIX path; ``"."`` is the tree's root directory."""
    kind: Kind
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    target: str | None = None
    """Symlink: the link text.  Hardlink: the path of the first entry of that inode."""
    rdev: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)
    """Extended attribute values, base64-encoded."""
    ref: str | None = None
    """Where the content lives (an object id, a chunk list key...), set by the store."""
    ino: int = 0
    ctime_ns: int = 0

    def change_key(self) -> tuple[int, int, int, int]:
        return (self.ino, self.size, self.mtime_ns, self.ctime_ns)

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy was most of an unchanged snapshot's time.
        data = {k: v for k, v in vars(self).items()
                if v not in (None, 0, {}) or k in ("path", "kind")}
        if "xattrs" in data:
            data["xattrs"] = dict(self.xattrs)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(**{"mode": 0, "uid": 0, "gid": 0, "mtime_ns": 0, **data})


class TreeView(Protocol):
    """A point-in-time tree: its entries and a way to read each file's content."""

    def entries(self) -> Sequence[Entry]: ...

    def open(self, entry: Entry) -> BinaryIO: ...


def _xattrs(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    values: dict[str, str] = {}
    for name in names:
        try:
            values[name] = base64.b64encode(
                os.getxattr(path, name, follow_symlinks=False)).decode()
        except OSError:
            continue
    return values


def _kind(mode: int) -> Kind | None:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode):
        return "chardev"
    if stat.S_ISBLK(mode):
        return "blockdev"
    if stat.S_ISSOCK(mode):
        return "socket"
    return None


def _entry(rel: str, abspath: str, st: os.stat_result, seen: dict[tuple[int, int], str]) -> Entry:
    kind = _kind(st.st_mode)
    assert kind is not None  # noqa: S101 -- every st_mode has a type
    target = None
    if kind == "symlink":
        target = os.readlink(abspath)
    elif kind == "file" and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        first = seen.get(key)
        if first is None:
            seen[key] = rel
        else:
            kind, target = "hardlink", first
    return Entry(
        path=rel, kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
        mtime_ns=st.st_mtime_ns, size=st.st_size if kind == "file" else 0, target=target,
        rdev=st.st_rdev if kind in ("chardev", "blockdev") else 0,
        xattrs=_xattrs(abspath) if kind != "symlink" else {},
        ino=st.st_ino, ctime_ns=st.st_ctime_ns,
    )


def scan(root: Path) -> Iterator[Entry]:
    """Yield the tree under ``root`` in pre-order; symlinks are reported, never followed."""
    seen: dict[tuple[int, int], str] = {}
    yield _entry(".", str(root), os.lstat(root), seen)
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            continue
        subdirs: list[tuple[str, str]] = []
        for child in children:
            rel = prefix + child.name
            try:
                st = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            entry = _entry(rel, child.path, st, seen)
            yield entry
            if entry.kind == "dir":
                subdirs.append((child.path, rel + "/"))
        stack.extend(reversed(subdirs))


class DirectoryView:
    """A live directory as a :class:`TreeView` (consistent only while nothing writes to it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._entries: list[Entry] | None = None

    def entries(self) -> Sequence[Entry]:
        if self._entries is None:
            self._entries = list(scan(self.root))
        return self._entries

    def open(self, entry: Entry) -> BinaryIO:
        fd = os.open(self.root / entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        return os.fdopen(fd, "rb")


def clone_or_copy(src: str | Path, dst: str | Path, mode: int = 0o600) -> str:
    """Copy ``src`` to a new file ``dst``; clone extents when the filesystem can.

    Returns the method used: ``"reflink"`` or ``"copy"``.  Never follows a symlink at either
    end and never overwrites an existing ``dst``.
    """
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
                return "reflink"
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY,
                                     errno.EPERM):
                    raise
            copy_fd(sfd, dfd)
            return "copy"
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def copy_fd(sfd: int, dfd: int) -> None:
    try:
        while os.copy_file_range(sfd, dfd, COPY_CHUNK):
            pass
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.lseek(sfd, 0, os.SEEK_SET)
        os.lseek(dfd, 0, os.SEEK_SET)
        os.ftruncate(dfd, 0)
        while chunk := os.read(sfd, 1 << 20):
            os.write(dfd, chunk)


WriteContent = Callable[[Entry, Path], None]
"""Create the regular file at the given path (it does not exist yet) with ``entry``'s content."""


def materialize(entries: Sequence[Entry], dst: Path, write: WriteContent) -> None:
    """Build the tree described by ``entries`` under the existing, empty directory ``dst``.

    Raises ValueError for an entry that would leave the tree: one whose parent is not a
    directory this call made before it (``..``, absolute paths and paths through the tree's
    own symlinks all fail that test, without a syscall), or a hard link to anything but a
    file made before it.
    """
    dirs: list[tuple[Path, Entry]] = []
    made_dirs = {"."}
    made_files: set[str] = set()
    for entry in entries:
        if entry.path == ".":
            path = dst
        else:
            parent, _, name = entry.path.rpartition("/")
            if (parent or ".") not in made_dirs or name in ("", ".", ".."):
                raise ValueError(f"entry {entry.path!r} leaves the tree")
            path = dst / entry.path
        if entry.kind == "dir":
            if entry.path != ".":
                path.mkdir(mode=0o700)
                made_dirs.add(entry.path)
            dirs.append((path, entry))
            continue
        if entry.kind == "file":
            write(entry, path)
            made_files.add(entry.path)
        elif entry.kind == "hardlink":
            if entry.target not in made_files:
                raise ValueError(f"hard link {entry.path!r} leaves the tree: its target "
                                 f"{entry.target!r} is no file made before it")
            os.link(dst / entry.target, path, follow_symlinks=False)
            continue
        elif entry.kind == "symlink":
            assert entry.target is not None  # noqa: S101
            os.symlink(entry.target, path)
        elif entry.kind == "fifo":
            os.mkfifo(path, 0o600)
        else:
            kind_bits = {"chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK,
                         "socket": stat.S_IFSOCK}[entry.kind]
            os.mknod(path, 0o600 | kind_bits, entry.rdev)
        _apply_metadata(path, entry)
    for path, entry in reversed(dirs):
        _apply_metadata(path, entry)


def _apply_metadata(path: Path, entry: Entry) -> None:
    link = entry.kind == "symlink"
    os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
    if not link:
        os.chmod(path, entry.mode)
        for name, value in entry.xattrs.items():
            try:
                os.setxattr(path, name, base64.b64decode(value), follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
    os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the tree under ``src`` into the empty directory ``dst`` (clones where possible)."""
    materialize(list(scan(src)), dst,
                lambda entry, path: _copy_entry(src / entry.path, path))


def _copy_entry(src: Path, dst: Path) -> None:
    clone_or_copy(src, dst)
