"""Walk, capture and rebuild directory trees with full metadata, never following symlinks.

A tree is a list of :class:`Entry` in pre-order (a directory before its contents).  Entries
keep content references, not content: the snapshot store points them at immutable objects,
the S3 sync at remote chunks.  :func:`materialize` rebuilds a tree from entries plus a
function that writes one file's content, restoring mode, owner, mtime, symlinks (as links),
hard links within the tree, fifos, device nodes and extended attributes.

Volume content is hostile: a container may swap any path component at any instant.  So every
walk and every open here works relative to an already-open directory descriptor and never
follows a symlink: directories are opened with ``O_DIRECTORY | O_NOFOLLOW`` one component at
a time (or with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` in one call), files with
``O_PATH | O_NOFOLLOW`` and checked with ``fstat`` before they are reopened for reading, so a
FIFO, socket or device is never opened.  A swap yields the old content, the new content or a
skipped entry (logged), never bytes from outside the tree, and depth has no PATH_MAX limit.
Copies keep holes (``SEEK_DATA``/``SEEK_HOLE``) and never hold more than a chunk in memory.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

Kind = Literal["dir", "file", "hardlink", "symlink", "fifo", "chardev", "blockdev", "socket"]

log = logging.getLogger(__name__)

FICLONE = 0x40049409
COPY_CHUNK = 1 << 26
READ_CHUNK = 1 << 20
SPARSE_BLOCK = 1 << 16
"""Granularity at which :func:`write_sparse` looks for runs of zero bytes to seek over."""
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
FD_CACHE = 64
"""Directory descriptors :func:`materialize` keeps open (the least recently used are closed)."""

BEFORE_OPEN: Callable[[str], None] | None = None
"""Test hook: called with an entry's path just before :func:`open_file` resolves it, so a
test can swap path components at the worst moment, deterministically."""


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


class Changed(OSError):
    """An entry is no longer what the scan saw (another type, or gone); it is skipped."""

    def __init__(self, path: str, what: str, code: int = errno.ENOENT) -> None:
        super().__init__(code, f"{path} {what} since the scan")


# Resolving relative to a directory descriptor

SYS_OPENAT2 = 437
"""The same number on every architecture (the syscall is newer than the unified table)."""
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
OPENAT2_PATH_MAX = 4000


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_openat2_ok: bool | None = None
_syscall: Any = None


def _openat2(dir_fd: int, path: str, flags: int) -> int | None:
    """``openat2`` refusing symlinks and ``..`` escapes; None where the kernel lacks it."""
    global _openat2_ok, _syscall
    if _openat2_ok is False:
        return None
    if _syscall is None:
        _syscall = ctypes.CDLL(None, use_errno=True).syscall
        _syscall.restype = ctypes.c_long
    how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd = int(_syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd),
                      ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                      ctypes.c_size_t(ctypes.sizeof(how))))
    if fd >= 0:
        _openat2_ok = True
        return fd
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and _openat2_ok is None:
        _openat2_ok = False  # an old kernel, or a seccomp filter that refuses it
        return None
    if err == errno.EAGAIN:
        return None  # a concurrent rename anywhere on the host: resolve step by step
    raise OSError(err, os.strerror(err), path)


def _parts(path: str) -> list[str]:
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise OSError(errno.EINVAL, "not a plain relative path", path)
    return parts


def open_beneath(root_fd: int, path: str, flags: int = PATH_FLAGS) -> int:
    """Open ``path`` (relative, ``/``-separated) under ``root_fd`` without following any
    symlink on the way, the last component included, and without leaving ``root_fd``.

    Raises OSError (ELOOP, ENOTDIR, ENOENT...) when a component is not what it must be.
    A path longer than PATH_MAX is resolved in pieces, each beneath the previous one.
    """
    fd, rest = root_fd, path
    try:
        while True:
            if len(rest) < OPENAT2_PATH_MAX:
                found = _openat2(fd, rest, flags | os.O_NOFOLLOW)
                if found is not None:
                    return found
                break
            cut = rest.rfind("/", 0, OPENAT2_PATH_MAX)
            sub = _openat2(fd, rest[:cut], DIR_FLAGS) if cut > 0 else None
            if sub is None:
                break
            if fd != root_fd:
                os.close(fd)
            fd, rest = sub, rest[cut + 1:]
        return _open_by_components(fd, rest, flags)
    finally:
        if fd != root_fd:
            os.close(fd)


def _open_by_components(base: int, path: str, flags: int) -> int:
    """open_beneath without openat2: one ``O_NOFOLLOW`` component at a time."""
    *dirs, name = _parts(path)
    fd = base
    try:
        for part in dirs:
            sub = os.open(part, DIR_FLAGS, dir_fd=fd)
            if fd != base:
                os.close(fd)
            fd = sub
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        if fd != base:
            os.close(fd)


def open_dir(path: str | Path) -> int:
    return os.open(path, DIR_FLAGS)


def open_file(root_fd: int, path: str) -> tuple[int, os.stat_result]:
    """Open the regular file ``path`` under ``root_fd`` for reading; return it and its stat.

    The file is first opened with ``O_PATH`` (which opens nothing) and checked with ``fstat``;
    only a regular file is then reopened for reading, so a FIFO, socket or device swapped in
    is never opened.  Raises :class:`Changed` for anything but a regular file.
    """
    if BEFORE_OPEN is not None:
        BEFORE_OPEN(path)
    if path == ".":
        raise Changed(path, "is the tree's root, not a file")
    proc = _has_proc()
    # Without /proc the file is opened directly; O_NONBLOCK still keeps a FIFO from blocking.
    pinned = open_beneath(root_fd, path, PATH_FLAGS if proc else READ_FLAGS)
    try:
        st = os.fstat(pinned)
        if not stat.S_ISREG(st.st_mode):
            raise Changed(path, "is no longer a regular file",
                          errno.ELOOP if stat.S_ISLNK(st.st_mode) else errno.ENOENT)
        if not proc:
            fd, pinned = pinned, -1
            return fd, st
        # The O_PATH descriptor pins the inode: this reopens exactly the file checked above.
        return os.open(f"/proc/self/fd/{pinned}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY), st
    finally:
        if pinned >= 0:
            os.close(pinned)


_proc: bool | None = None


def _has_proc() -> bool:
    global _proc
    if _proc is None:
        _proc = os.path.isdir("/proc/self/fd")
        if not _proc:
            log.warning("/proc is not mounted: files are opened directly (O_NONBLOCK)")
    return _proc


# Scanning

def _xattrs(target: str | int) -> dict[str, str]:
    """Extended attributes of an open descriptor, or of a ``/proc/self/fd/DIR/name`` path
    (the directory is pinned by its descriptor; the name is not followed)."""
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError:
        return {}
    values: dict[str, str] = {}
    for name in names:
        try:
            values[name] = base64.b64encode(
                os.getxattr(target, name, follow_symlinks=follow)).decode()
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


def _entry(rel: str, dir_fd: int, name: str | None, st: os.stat_result,
           seen: dict[tuple[int, int], str]) -> Entry:
    """The entry for ``name`` in the open directory ``dir_fd`` (None: ``dir_fd`` itself)."""
    kind = _kind(st.st_mode)
    assert kind is not None  # noqa: S101 -- every st_mode has a type
    target = None
    if kind == "symlink":
        assert name is not None  # noqa: S101 -- the root is opened as a directory
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError as exc:  # replaced (EINVAL: no longer a link) or removed since listed
            if exc.errno not in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
                raise
            raise Changed(rel, f"is no longer a symlink ({exc.strerror})") from None
    elif kind == "file" and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        first = seen.get(key)
        if first is None:
            seen[key] = rel
        else:
            kind, target = "hardlink", first
    xattrs: dict[str, str] = {}
    if kind != "symlink":
        xattrs = _xattrs(dir_fd if name is None else f"/proc/self/fd/{dir_fd}/{name}")
    return Entry(
        path=rel, kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
        mtime_ns=st.st_mtime_ns, size=st.st_size if kind == "file" else 0, target=target,
        rdev=st.st_rdev if kind in ("chardev", "blockdev") else 0,
        xattrs=xattrs, ino=st.st_ino, ctime_ns=st.st_ctime_ns,
    )


Listing = list[tuple[str, os.stat_result]]


def _list(fd: int, sort: bool) -> Listing:
    children: Listing = []
    with os.scandir(fd) as it:
        for child in it:
            try:
                children.append((child.name, child.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    if sort:
        children.sort(key=lambda c: c[0])
    return children


def walk(root_fd: int, sort: bool = True) -> Generator[tuple[int, str, Listing], None, None]:
    """Yield ``(dir_fd, prefix, children)`` for every directory under ``root_fd``, parents
    first; ``prefix`` is the directory's relative path plus ``/`` (empty for the root).

    Each directory is opened relative to its parent's descriptor with ``O_NOFOLLOW`` and must
    be the inode the parent's listing showed; one that was swapped or removed meanwhile is
    skipped with a warning.  An explicit stack holds one descriptor per level (no recursion,
    no PATH_MAX); ``dir_fd`` stays open only while the caller handles that directory.
    """
    stack: list[tuple[int, str, list[tuple[str, int, int]]]] = []
    fd: int | None = root_fd
    prefix = ""
    try:
        while True:
            if fd is not None:
                subdirs: list[tuple[str, int, int]] = []
                stack.append((fd, prefix, subdirs))
                children = _list(fd, sort)
                yield fd, prefix, children
                subdirs.extend((name, st.st_dev, st.st_ino) for name, st in reversed(children)
                               if stat.S_ISDIR(st.st_mode))
            fd = None
            if not stack:
                return
            parent, parent_prefix, pending = stack[-1]
            if not pending:
                stack.pop()
                if parent != root_fd:
                    os.close(parent)
                continue
            name, dev, ino = pending.pop()
            rel = parent_prefix + name
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                log.warning("skipping the content of %s: it was removed or replaced by "
                            "something else during the walk", rel)
                continue
            try:
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            if (st.st_dev, st.st_ino) != (dev, ino):
                os.close(fd)
                fd = None
                log.warning("skipping the content of %s: it was replaced during the walk", rel)
                continue
            prefix = rel + "/"
    finally:
        for open_fd, _, _ in stack:
            if open_fd != root_fd:
                os.close(open_fd)


def scan(root: str | Path | int) -> Iterator[Entry]:
    """Yield the tree under ``root`` (a path, or an open directory descriptor that stays
    open) in pre-order, each directory's entries sorted by name; symlinks are reported,
    never followed."""
    own = not isinstance(root, int)
    root_fd = open_dir(root) if not isinstance(root, int) else root
    try:
        seen: dict[tuple[int, int], str] = {}
        yield _entry(".", root_fd, None, os.fstat(root_fd), seen)
        for dir_fd, prefix, children in walk(root_fd):
            entries = []
            for name, st in children:
                try:
                    entries.append(_entry(prefix + name, dir_fd, name, st, seen))
                except Changed as exc:
                    log.warning("skipping %s: %s", prefix + name, exc.strerror)
            yield from entries
    finally:
        if own:
            os.close(root_fd)


class DirectoryView:
    """A live directory as a :class:`TreeView` (consistent only while nothing writes to it).

    Files are opened with :func:`open_file`: never through a symlink, never a FIFO.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._entries: list[Entry] | None = None

    def entries(self) -> Sequence[Entry]:
        if self._entries is None:
            self._entries = list(scan(self.root))
        return self._entries

    def open(self, entry: Entry) -> BinaryIO:
        root_fd = open_dir(self.root)
        try:
            fd, _ = open_file(root_fd, entry.path)
        finally:
            os.close(root_fd)
        return os.fdopen(fd, "rb")


# Copying content

def clone_or_copy(src: str | Path | int, dst: str | Path, mode: int = 0o600) -> str:
    """Copy ``src`` (a path, or a descriptor open for reading) to a new file ``dst``.

    Clones extents when the filesystem can, else copies keeping holes.  Returns the method
    used: ``"reflink"`` or ``"copy"``.  Never follows a symlink at either end, never opens
    anything but a regular file for reading, and never overwrites an existing ``dst``.
    """
    if isinstance(src, int):
        sfd = src
    else:
        sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                      | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(sfd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(src))
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      mode)
        try:
            return clone_fd(sfd, dfd)
        finally:
            os.close(dfd)
    finally:
        if sfd is not src:
            os.close(sfd)


def clone_fd(sfd: int, dfd: int) -> str:
    """Give the empty file ``dfd`` the content of ``sfd``: ``"reflink"`` or ``"copy"``."""
    try:
        fcntl.ioctl(dfd, FICLONE, sfd)
        return "reflink"
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY,
                             errno.EPERM):
            raise
    copy_fd(sfd, dfd)
    return "copy"


def copy_fd(sfd: int, dfd: int) -> None:
    """Copy the regular file ``sfd`` into the empty file ``dfd`` keeping its holes.

    Only data extents (``SEEK_DATA``/``SEEK_HOLE``) are copied, with ``copy_file_range``
    (or reads of at most :data:`READ_CHUNK` bytes), then ``dfd`` is truncated to the size
    ``sfd`` had when the copy began: a 10 TiB sparse file costs nothing.
    """
    size = os.fstat(sfd).st_size
    offset = copied_to = 0
    while offset < size:
        try:
            start = os.lseek(sfd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            start = offset  # no SEEK_DATA here: treat the rest as data
        if start >= size:
            break
        try:
            end = os.lseek(sfd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            end = size
        end = min(end, size)
        done = _copy_range(sfd, dfd, start, end - start)
        copied_to = start + done
        if done < end - start:
            break  # the source shrank while we copied it
        offset = end
    if copied_to < size:
        os.ftruncate(dfd, size)  # a trailing hole (an ftruncate per file costs 5% of a copy)


def _copy_range(sfd: int, dfd: int, offset: int, length: int) -> int:
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(sfd, dfd, min(length - done, COPY_CHUNK),
                                   offset + done, offset + done)
            if n == 0:
                return done
            done += n
        return done
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    while done < length:
        chunk = os.pread(sfd, min(length - done, READ_CHUNK), offset + done)
        if not chunk:
            return done
        view, at = memoryview(chunk), offset + done
        while view:
            written = os.pwrite(dfd, view, at)
            view, at = view[written:], at + written
        done += len(chunk)
    return done


_ZEROS = memoryview(bytes(SPARSE_BLOCK))


def all_zero(data: bytes | bytearray, start: int, end: int) -> bool:
    """Whether ``data[start:end]`` (at most :data:`SPARSE_BLOCK` bytes) is all zero bytes.

    A memcmp against zeros, which stops at the first byte that differs: on data it costs
    nanoseconds per block where counting the zero bytes read all of them (a fifth of a
    restore's time on large files)."""
    return data.startswith(_ZEROS[:end - start], start)


def write_sparse(fd: int, data: bytes) -> None:
    """Append ``data`` at ``fd``'s offset, seeking over runs of zero bytes instead of writing
    them, so a restored file keeps its holes.  The file's size is fixed up by
    :func:`materialize` after the writer returns (a trailing hole is no write at all)."""
    view = memoryview(data)
    length = len(data)
    pos = 0
    while pos < length:
        end = min(pos + SPARSE_BLOCK, length)
        if all_zero(data, pos, end):
            os.lseek(fd, end - pos, os.SEEK_CUR)
        else:
            chunk = view[pos:end]
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
        pos = end


# Rebuilding

WriteContent = Callable[[Entry, int], None]
"""Write ``entry``'s content into the given descriptor: a new, empty regular file, open for
writing.  The writer must not close it; it may seek over holes (see :func:`write_sparse`).
Raising :class:`Changed` skips the entry (its source is gone), with a warning."""


Reuse = Callable[[Entry], int | None]
"""A descriptor (open for reading, of a regular file) whose content is already ``entry``'s,
to be hard-linked into the new tree instead of written; None to write it.  The builder
closes it."""


def materialize(entries: Sequence[Entry], dst: Path, write: WriteContent,
                reuse: Reuse | None = None) -> None:
    """Build the tree described by ``entries`` under the existing, empty directory ``dst``.

    Every entry is made relative to the descriptor of its parent directory, which this call
    made itself (``mkdir``/``openat``/``symlinkat``/``mknodat``/``linkat`` with ``dir_fd``),
    never through a path, so depth is unlimited.  A directory's metadata (mode, owner, xattrs,
    mtime) is applied once its last child is made.

    Raises ValueError for an entry that would leave the tree: one whose parent is not a
    directory this call made before it (``..``, absolute paths and paths through the tree's
    own symlinks all fail that test, without a syscall), or a hard link to anything but a
    file made before it.

    ``reuse``: files whose content already exists on this filesystem are hard-linked from
    there (by descriptor, never by path), then given the entry's metadata; where a link is
    not possible (another filesystem) they are written as usual.
    """
    root_fd = open_dir(dst)
    builder = _Builder(root_fd, write, reuse)
    try:
        builder.build(entries)
    finally:
        builder.close()
        os.close(root_fd)


def _parent(path: str) -> str:
    return path.rpartition("/")[0] or "."


class _Builder:
    def __init__(self, root_fd: int, write: WriteContent, reuse: Reuse | None = None) -> None:
        self.root_fd = root_fd
        self.write = write
        self.reuse = reuse
        self.fds: OrderedDict[str, int] = OrderedDict()
        self.dirs: dict[str, Entry | None] = {".": None}
        self.skipped: set[str] = set()
        self.files: set[str] = set()

    def _linked(self, entry: Entry, name: str, pfd: int) -> bool:
        """Link a reused file's content in place of writing it (see :func:`materialize`)."""
        source = self.reuse(entry) if self.reuse is not None else None
        if source is None:
            return False
        try:
            info = os.fstat(source)
            if not stat.S_ISREG(info.st_mode) or info.st_size != entry.size or \
                    not _link_fd(source, name, pfd):
                return False
        finally:
            os.close(source)
        self.files.add(entry.path)
        if (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode), info.st_mtime_ns) == \
                (entry.uid, entry.gid, entry.mode, entry.mtime_ns) and not entry.xattrs:
            return True  # already as the snapshot has it (the common case: an unchanged file)
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            _apply_fd(fd, entry)
        finally:
            os.close(fd)
        return True

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def dir_fd(self, rel: str) -> int:
        """The descriptor of the directory ``rel`` this call made (opened again if evicted)."""
        if rel == ".":
            return self.root_fd
        fd = self.fds.get(rel)
        if fd is not None:
            self.fds.move_to_end(rel)
            return fd
        return self._cache(rel, open_beneath(self.root_fd, rel, DIR_FLAGS))

    def _cache(self, rel: str, fd: int) -> int:
        self.fds[rel] = fd
        if len(self.fds) > FD_CACHE:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def _finish_dir(self, rel: str) -> None:
        entry = self.dirs[rel]
        if entry is None or rel == ".":
            return  # the root's metadata is applied last, by build()
        fd = self.fds.pop(rel, None)
        if fd is None:
            fd = open_beneath(self.root_fd, rel, DIR_FLAGS)
        try:
            _apply_fd(fd, entry)
        finally:
            os.close(fd)

    def build(self, entries: Sequence[Entry]) -> None:
        pending: dict[str, int] = {}
        for entry in entries:
            if entry.path != ".":
                parent = _parent(entry.path)
                pending[parent] = pending.get(parent, 0) + 1
        root: Entry | None = None
        for entry in entries:
            if entry.path == ".":
                if entry.kind != "dir":
                    raise ValueError("the tree's root entry is not a directory")
                root = self.dirs["."] = entry
                continue
            parent, _, name = entry.path.rpartition("/")
            parent = parent or "."
            if parent not in self.dirs or name in ("", ".", ".."):
                raise ValueError(f"entry {entry.path!r} leaves the tree")
            pfd = self.dir_fd(parent)
            self._make(entry, name, pfd)
            pending[parent] -= 1
            if entry.kind == "dir":
                if pending.get(entry.path):  # its children come later: keep it at hand
                    self._cache(entry.path, os.open(name, DIR_FLAGS, dir_fd=pfd))
                else:
                    self._finish_dir(entry.path)
            if pending[parent] == 0:
                self._finish_dir(parent)
        if root is not None:
            _apply_fd(self.root_fd, root)

    def _make(self, entry: Entry, name: str, pfd: int) -> None:
        kind = entry.kind
        if kind == "dir":
            os.mkdir(name, 0o700, dir_fd=pfd)
            self.dirs[entry.path] = entry
            return
        if kind == "file":
            if self._linked(entry, name, pfd):
                return
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                self.write(entry, fd)
                end = os.lseek(fd, 0, os.SEEK_CUR)
                if end and end > os.fstat(fd).st_size:
                    os.ftruncate(fd, end)  # the writer sought over a trailing hole
                _apply_fd(fd, entry)
            except Changed as exc:
                log.warning("skipping %s: %s", entry.path, exc.strerror)
                os.unlink(name, dir_fd=pfd)
                self.skipped.add(entry.path)
                return
            finally:
                os.close(fd)
            self.files.add(entry.path)
            return
        if kind == "hardlink":
            if entry.target in self.skipped:
                log.warning("skipping the hard link %s: its target was skipped", entry.path)
                return
            if entry.target not in self.files:
                raise ValueError(f"hard link {entry.path!r} leaves the tree: its target "
                                 f"{entry.target!r} is no file made before it")
            assert entry.target is not None  # noqa: S101
            tparent, _, tname = entry.target.rpartition("/")
            src_fd = self.dir_fd(tparent or ".")
            pfd = self.dir_fd(_parent(entry.path))  # again: looking up src_fd may evict it
            os.link(tname, name, src_dir_fd=src_fd, dst_dir_fd=pfd, follow_symlinks=False)
            return
        if kind == "symlink":
            assert entry.target is not None  # noqa: S101
            os.symlink(entry.target, name, dir_fd=pfd)
            os.chown(name, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=pfd,
                     follow_symlinks=False)
            return
        if kind == "fifo":
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            kind_bits = {"chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK,
                         "socket": stat.S_IFSOCK}[kind]
            os.mknod(name, 0o600 | kind_bits, entry.rdev, dir_fd=pfd)
        # O_PATH opens nothing (no FIFO wait, no device open); /proc/self/fd/N then names
        # exactly this inode for the calls that have no descriptor form for it.
        pinned = os.open(name, PATH_FLAGS, dir_fd=pfd)
        try:
            _apply_path(f"/proc/self/fd/{pinned}", entry)
        finally:
            os.close(pinned)


def _set_xattrs(target: str | int, entry: Entry) -> None:
    for name, value in entry.xattrs.items():
        try:
            os.setxattr(target, name, base64.b64decode(value))
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise


def _link_fd(source: int, name: str, pfd: int) -> bool:
    """Hard-link the open regular file ``source`` as ``name`` in ``pfd``; False if this
    filesystem cannot (another one, or links not supported)."""
    try:
        os.link(f"/proc/self/fd/{source}", name, dst_dir_fd=pfd, follow_symlinks=True)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOENT, errno.EOPNOTSUPP):
            return False
        raise
    return True


def _apply_fd(fd: int, entry: Entry) -> None:
    os.chown(fd, entry.uid, entry.gid)
    os.chmod(fd, entry.mode)
    _set_xattrs(fd, entry)
    os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))


def _apply_path(path: str, entry: Entry) -> None:
    os.chown(path, entry.uid, entry.gid)
    os.chmod(path, entry.mode)
    _set_xattrs(path, entry)
    os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the tree under ``src`` into the empty directory ``dst`` (clones where possible).

    Files are opened relative to ``src``'s descriptor (:func:`open_file`); one that vanished
    or was replaced by something else than a regular file since the scan is skipped, with a
    warning, as are hard links to it.
    """
    root_fd = open_dir(src)
    try:
        entries = list(scan(root_fd))
        materialize(entries, dst, lambda entry, fd: _copy_entry(root_fd, entry, fd))
    finally:
        os.close(root_fd)


def _copy_entry(root_fd: int, entry: Entry, dfd: int) -> None:
    try:
        sfd, _ = open_file(root_fd, entry.path)
    except OSError as exc:
        if isinstance(exc, Changed) or exc.errno not in (errno.ENOENT, errno.ENOTDIR,
                                                         errno.ELOOP):
            raise
        raise Changed(entry.path, f"was removed or replaced ({exc.strerror})") from None
    try:
        clone_fd(sfd, dfd)
    finally:
        os.close(sfd)
