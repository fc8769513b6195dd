"""Point-in-time snapshots of volume directories: incremental, read-only, crash-safe.

Layout under ``<root>/snapshots/<volume>/``:

- ``objects/xx/<id>``: immutable file contents (mode 0400), shared between snapshots, never
  with the live volume: a file is cloned (reflink on XFS/btrfs) or copied into a new inode.
- ``entries/<name>.json``: the snapshot's tree (``backends.tree.Entry`` list).
- ``catalog/<name>.json``: its summary.  Written last, atomically: this is the commit point.
  A snapshot without a catalog file does not exist; :meth:`SnapshotStore.recover` sweeps what
  an interrupted one left behind.

When a volume goes, :meth:`SnapshotStore.discard` takes its snapshots away at once (a rename
of ``<volume>/`` into ``.removing/.<random>/``, or, when some must stay, the removal of the
others' catalog files) and :meth:`SnapshotStore.purge` deletes the data later, in the
background.

A new snapshot reuses the objects of the newest one for files whose (inode, size, mtime,
ctime) did not change, so its cost is proportional to what changed.

A volume that is a btrfs subvolume gets native snapshots instead: ``subvols/<name>`` is a
read-only snapshot of the whole subvolume, taken atomically in one ioctl, sharing extents
copy-on-write; the entries and catalog files work as above.

A volume whose backend offers ``image-reflink`` (an ``image`` volume on a host filesystem
that reflinks) is snapshotted as a whole: ``images/<name>`` is a clone of its image file,
taken with the filesystem frozen (one instant, no data copied).  Reading one needs the clone
mounted: the store mounts it through the backend on first use and unmounts it when its last
reader is done (a :meth:`SnapshotStore.populate_from` call, a closed or collected
:class:`SnapshotView`).  Neither kind is ever the base of an incremental file snapshot.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, runtime_checkable

from backends import btrfs
from backends.base import VolumeContent
from backends.errors import BackendError
from backends.fs import (
    confined,
    fsync_dir,
    make_private,
    remove_tree,
    syncfs,
    write_atomic,
)
from backends.priority import lower_priority
from backends.tree import (
    Entry,
    clone_fd,
    clone_or_copy,
    materialize,
    open_dir,
    open_file,
    scan,
)

log = logging.getLogger(__name__)

Kind = Literal["manual", "automatic", "safety", "sync"]
NATIVE = "btrfs-snapshot"
"""The method of snapshots taken as read-only btrfs subvolume snapshots."""
IMAGE = "image-reflink"
"""The method of snapshots taken as clones of a volume's image file."""
WHOLE = frozenset({NATIVE, IMAGE})
"""Methods whose snapshots hold no objects: never the base of an incremental one."""
COPY_THREADS = 4
RACY_NS = 100_000_000
RACY_COARSE_NS = 2_000_000_000
"""A file whose ctime lies within one timestamp tick of a scan's start may change again in that
tick, after we copied it, without changing its change key (kernels before 6.13 stamp ctime from
a clock ticking every 1-10 ms; some filesystems keep whole seconds).  Such a file is recorded
with ``ctime_ns=0``, so the next snapshot stores it again instead of trusting the key."""


@runtime_checkable
class ImageCloner(Protocol):
    """A backend whose volumes are image files it can clone in O(1) (``backends.image``);
    it offers ``image-reflink`` in ``capabilities.snapshot_methods`` when its host can."""

    def clone_image(self, volume: str, target: Path) -> None:
        """Make the new file ``target`` a clone of the volume's image as of one instant."""

    def open_image(self, path: Path) -> AbstractContextManager[Path]:
        """Mount the clone ``path`` read-only while the context lasts."""


def image_cloner(backend: object) -> ImageCloner | None:
    """``backend`` as an :class:`ImageCloner`, if it is one and offers ``image-reflink``."""
    methods = getattr(getattr(backend, "capabilities", None), "snapshot_methods", ())
    if IMAGE in methods and isinstance(backend, ImageCloner):
        return backend
    return None


class SnapshotNotFound(BackendError):
    def __init__(self, volume: str, name: str) -> None:
        super().__init__(
            f"snapshot {volume}@{name} not found: list them with `pyvol snapshot ls {volume}`"
        )


class SnapshotExists(BackendError):
    pass


class SnapshotCancelled(BackendError):
    """The caller asked a snapshot to stop; nothing of it was committed."""


@dataclass(frozen=True)
class Progress:
    """How far a snapshot is: entries scanned, then files and bytes stored of those to store
    (unchanged files are shared with the previous snapshot and cost nothing)."""

    scanned: int = 0
    files_done: int = 0
    files_total: int | None = None
    """``None`` while the tree is being scanned."""
    bytes_done: int = 0
    bytes_total: int = 0

    def text(self) -> str:
        if self.files_total is None:
            return f"scanning, {self.scanned} entries so far"
        return (f"{self.files_done} of {self.files_total} files, "
                f"{self.bytes_done / MiB:.1f} of {self.bytes_total / MiB:.1f} MiB stored")

    def to_json(self) -> dict[str, int | None]:
        return asdict(self)


OnProgress = Callable[[Progress], None]
"""Told each step of a snapshot (from the capture's threads; keep it cheap)."""
Cancelled = Callable[[], bool]
"""Polled by a capture between files: True stops it with :class:`SnapshotCancelled`."""
MiB = 1 << 20
SCAN_REPORT = 1000
"""Entries between two progress reports (and cancellation checks) while scanning."""


@dataclass(frozen=True)
class SnapshotInfo:
    volume: str
    name: str
    created: datetime
    kind: Kind
    size: int
    """Bytes of file content in the snapshot."""
    files: int
    copied_bytes: int
    """Bytes this snapshot had to store anew (the rest is shared with older snapshots)."""
    method: str
    """``btrfs-snapshot`` (native, atomic), ``reflink``, ``copy`` or ``none`` (nothing new)."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["created"] = self.created.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SnapshotInfo:
        return cls(**{**data, "created": datetime.fromisoformat(data["created"])})


def _racy(entry: Entry, started: int) -> Entry:
    """``entry`` with ``ctime_ns=0`` if it changed within a timestamp tick of ``started``
    (the capture's start), so that its change key is never trusted (:data:`RACY_NS`)."""
    whole_seconds = entry.ctime_ns % 1_000_000_000 == 0
    if entry.ctime_ns >= started - (RACY_COARSE_NS if whole_seconds else RACY_NS):
        return replace(entry, ctime_ns=0)
    return entry


def default_name() -> str:
    """A UTC timestamp name that sorts chronologically."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


Opener = Callable[[Entry], int]
"""Open a file entry's stored content for reading; returns a descriptor."""


class SnapshotView:
    """One snapshot as a ``backends.tree.TreeView`` (for S3 pushes).

    What its files are read from is set up on the first :meth:`open` and released by
    :meth:`close` (or leaving a ``with`` block); a view dropped unclosed releases it when
    it is collected, which CPython does as soon as the last reference goes."""

    def __init__(self, reader: AbstractContextManager[Opener], entries: Sequence[Entry]
                 ) -> None:
        self._reader = reader
        self._entries = entries
        self._opener: Opener | None = None
        self._held = ExitStack()
        self._guard = threading.Lock()
        self._release = weakref.finalize(self, self._held.close)

    def entries(self) -> Sequence[Entry]:
        return self._entries

    def open(self, entry: Entry) -> BinaryIO:
        with self._guard:
            if self._opener is None:
                if not self._release.alive:
                    raise ValueError("this snapshot view is closed")
                self._opener = self._held.enter_context(self._reader)
            opener = self._opener
        return os.fdopen(opener(entry), "rb")

    def close(self) -> None:
        with self._guard:
            self._opener = None
            self._release()

    def __enter__(self) -> SnapshotView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SnapshotStore:
    def __init__(self, root: Path, images: ImageCloner | None = None) -> None:
        """``images`` opens ``image-reflink`` snapshots (the ``image`` backend of the same
        root); else the first backend a :meth:`create` is given that offers them does."""
        self.root = root / "snapshots"
        self._images = images
        self._mounts: dict[tuple[int, int], tuple[int, ExitStack, list[int]]] = {}
        """Image clones mounted for readers, by (device, inode): root descriptor, what
        unmounts it, and how many readers hold it."""
        self._mounting = threading.Lock()
        self._removing = self.root / ".removing"
        make_private(self.root)
        make_private(self._removing)
        self._unswept: set[str] = set()
        """Volumes whose discarded snapshots' objects :meth:`purge` still has to sweep."""
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}
        self._guard = threading.Lock()
        self._catalog: dict[str, list[SnapshotInfo]] = {}
        """Only volumes that have a snapshot directory: a miss is not cached, so callers
        asking about names without snapshots never grow it."""

    @contextmanager
    def _lock(self, volume: str) -> Iterator[None]:
        """Hold the volume's lock; its entry lives only while some thread holds or waits."""
        with self._guard:
            lock, users = self._locks.setdefault(volume, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._locks[volume]

    def _dir(self, volume: str, *parts: str) -> Path:
        return confined(self.root, volume, *parts)

    # reading

    def list_snapshots(self, volume: str) -> list[SnapshotInfo]:
        """The volume's snapshots, oldest first (served from memory after the first call)."""
        with self._guard:
            cached = self._catalog.get(volume)
        if cached is not None:
            return list(cached)
        catalog = self._dir(volume, "catalog")
        infos = []
        try:
            items = os.scandir(catalog)
        except (FileNotFoundError, NotADirectoryError):
            return []  # not cached: junk names must not grow the cache
        with items:
            for entry in items:
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    infos.append(SnapshotInfo.from_json(json.loads(Path(entry.path).read_text())))
        infos.sort(key=lambda i: (i.created, i.name))
        with self._guard:
            self._catalog.setdefault(volume, infos)
            infos = self._catalog[volume]
        return list(infos)

    def get(self, volume: str, name: str) -> SnapshotInfo:
        for info in self.list_snapshots(volume):
            if info.name == name:
                return info
        raise SnapshotNotFound(volume, name)

    def entries(self, volume: str, name: str) -> list[Entry]:
        self.get(volume, name)
        path = self._dir(volume, "entries", f"{name}.json")
        return [Entry.from_json(item) for item in json.loads(path.read_bytes())]

    def _reader(self, volume: str, name: str) -> AbstractContextManager[Opener]:
        """Open file entries' content while the context lasts: an object, or a file of a
        native btrfs snapshot or of a mounted image clone (copies of volume content, so
        opened like it: beneath the snapshot's root, no symlinks)."""
        method = self.get(volume, name).method
        if method == IMAGE:
            return self._clone_reader(volume, name)
        if method == NATIVE:
            subvol = self._dir(volume, "subvols", name)

            def open_native(entry: Entry) -> int:
                root_fd = open_dir(subvol)
                try:
                    return open_file(root_fd, entry.path)[0]
                finally:
                    os.close(root_fd)
            return nullcontext(open_native)
        objects = str(self._dir(volume, "objects"))  # pathlib joins cost as much as a clone

        def open_object(entry: Entry) -> int:
            ref = entry.ref
            assert ref is not None  # noqa: S101 -- every file entry has an object
            return os.open(f"{objects}/{ref[:2]}/{ref}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return nullcontext(open_object)

    @contextmanager
    def _clone_reader(self, volume: str, name: str) -> Iterator[Opener]:
        """Mount the snapshot's image clone, or share the mount another reader holds, and
        unmount it when the last reader is done.  Keyed by the clone's inode, so a snapshot
        removed and taken again under the same name is never read through the old mount."""
        images = self._images
        if images is None:
            raise BackendError(
                f"snapshot {volume}@{name} is a clone of an image volume, and this snapshot "
                "store has no image backend to mount it (a bug: the plugin must build it with "
                "SnapshotStore(root, images=...)); its data is intact")
        clone = self._dir(volume, "images", name)
        with self._mounting:
            try:
                st = os.stat(clone, follow_symlinks=False)
            except FileNotFoundError:
                raise SnapshotNotFound(volume, name) from None
            key = (st.st_dev, st.st_ino)
            held = self._mounts.get(key)
            if held is None:
                stack = ExitStack()
                try:
                    root_fd = open_dir(stack.enter_context(images.open_image(clone)))
                except BaseException:
                    stack.close()
                    raise
                stack.callback(os.close, root_fd)
                held = self._mounts[key] = (root_fd, stack, [0])
            held[2][0] += 1
        root_fd = held[0]

        def open_cloned(entry: Entry) -> int:
            return open_file(root_fd, entry.path)[0]
        try:
            yield open_cloned
        finally:
            with self._mounting:
                held[2][0] -= 1
                if not held[2][0]:
                    del self._mounts[key]
                    held[1].close()

    def view(self, volume: str, name: str) -> SnapshotView:
        """The snapshot's tree; close it when done (an image clone stays mounted until
        then, or until the view is collected)."""
        return SnapshotView(self._reader(volume, name), self.entries(volume, name))

    def volumes(self) -> set[str]:
        return {e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")}

    # writing

    def create(self, volume: str, data: Path | VolumeContent, name: str | None = None,
               kind: Kind = "manual", progress: OnProgress | None = None,
               cancelled: Cancelled | None = None) -> SnapshotInfo:
        """Snapshot ``data`` as ``volume@name``; complete or absent after a crash.

        ``data`` is the volume's directory, or its content: then the store's image backend
        (``images``) clones the volume's image (O(1), one instant), and any other backend is
        read inside its view.  ``progress`` is told how far it is; ``cancelled`` is polled
        between files, and when it turns True the snapshot stops with
        :class:`SnapshotCancelled`, leaving nothing."""
        if isinstance(data, VolumeContent):
            images = self._images
            if images is None or image_cloner(data.backend) is not images:
                with data.view() as path:
                    return self.create(volume, path, name, kind, progress, cancelled)
            return self._commit(volume, name, kind, lambda n: self._capture_image(
                volume, n, images, progress or (lambda p: None), cancelled or (lambda: False)))

        path = data

        def capture(name: str) -> tuple[list[Entry], int, str]:
            if btrfs.is_subvolume(path):
                return self._capture_native(volume, name, path)
            base = [i for i in self.list_snapshots(volume) if i.method not in WHOLE]
            previous = {e.path: e for e in self.entries(volume, base[-1].name)} \
                if base else {}
            root_fd = open_dir(path)
            try:
                return self._capture(root_fd, self._dir(volume, "objects"), previous,
                                     progress or (lambda p: None), cancelled or (lambda: False))
            finally:
                os.close(root_fd)
        return self._commit(volume, name, kind, capture)

    def _commit(self, volume: str, name: str | None, kind: Kind,
                capture: Callable[[str], tuple[list[Entry], int, str]]) -> SnapshotInfo:
        """Under the volume's lock: ``capture(name)`` the snapshot's data and entries, write
        the entries, then the catalog file (the commit point)."""
        with self._lock(volume):
            name = name or default_name()
            if any(i.name == name for i in self.list_snapshots(volume)):
                raise SnapshotExists(
                    f"snapshot {volume}@{name} already exists: pick another name or remove it "
                    f"with `pyvol snapshot rm {volume}@{name}`")
            objects = self._dir(volume, "objects")
            for sub in ("objects", "entries", "catalog"):
                self._dir(volume, sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            entries, copied, method = capture(name)
            files = [e for e in entries if e.kind == "file"]
            entries_path = self._dir(volume, "entries", f"{name}.json")
            entries_path.write_bytes(json.dumps([e.to_json() for e in entries],
                                                separators=(",", ":")).encode())
            syncfs(objects)
            info = SnapshotInfo(volume=volume, name=name, created=datetime.now(UTC), kind=kind,
                                size=sum(e.size for e in files), files=len(files),
                                copied_bytes=copied, method=method)
            write_atomic(self._dir(volume, "catalog", f"{name}.json"),
                         json.dumps(info.to_json()).encode())
            with self._guard:
                self._catalog.setdefault(volume, []).append(info)
            log.info("snapshot %s@%s: %d files, %d bytes stored anew (%s)", volume, name,
                     info.files, copied, method)
            return info

    def _capture_image(self, volume: str, name: str, images: ImageCloner,
                       progress: OnProgress, cancelled: Cancelled
                       ) -> tuple[list[Entry], int, str]:
        """Clone the volume's image to ``images/<name>`` (no data copied) and list the
        clone's tree from a read-only mount of it (metadata only).  A crash leaves a clone
        without a catalog file, which :meth:`_sweep` deletes; a failure deletes it now."""
        clones = self._dir(volume, "images")
        clones.mkdir(mode=0o700, exist_ok=True)
        clone = self._dir(volume, "images", name)
        clone.unlink(missing_ok=True)  # left by a crash: not committed, since not listed
        progress(Progress())
        started = time.time_ns()
        try:
            images.clone_image(volume, clone)
            fsync_dir(clones)
            entries: list[Entry] = []
            with images.open_image(clone) as root:
                for entry in scan(root):
                    if len(entries) % SCAN_REPORT == SCAN_REPORT - 1:
                        if cancelled():
                            raise SnapshotCancelled("the snapshot was cancelled while scanning")
                        progress(Progress(scanned=len(entries) + 1))
                    entries.append(_racy(entry, started) if entry.kind == "file" else entry)
            if cancelled():
                raise SnapshotCancelled("the snapshot was cancelled")
        except BaseException:
            clone.unlink(missing_ok=True)
            raise
        progress(Progress(scanned=len(entries), files_total=0))
        return entries, 0, IMAGE

    def _capture_native(self, volume: str, name: str,
                        data: Path) -> tuple[list[Entry], int, str]:
        """One atomic, read-only btrfs snapshot of the volume's subvolume; no data copied."""
        subvols = self._dir(volume, "subvols")
        subvols.mkdir(mode=0o700, exist_ok=True)
        target = self._dir(volume, "subvols", name)
        btrfs.snapshot(data, target, readonly=True)
        return list(scan(target)), 0, NATIVE

    def _capture(self, root_fd: int, objects: Path, previous: dict[str, Entry],
                 progress: OnProgress, cancelled: Cancelled) -> tuple[list[Entry], int, str]:
        """Scan the open volume directory ``root_fd`` and store its changed files.

        Every file is opened beneath ``root_fd`` without following symlinks and checked
        after opening (:func:`backends.tree.open_file`).  One that vanished or became
        something else than a regular file since the scan is left out, with a warning (and
        so are hard links to it); one replaced by another regular file is stored as it is now.
        """
        entries: list[Entry] = []
        todo: list[int] = []
        started = time.time_ns()
        progress(Progress())
        for entry in scan(root_fd):
            if len(entries) % SCAN_REPORT == SCAN_REPORT - 1:
                if cancelled():
                    raise SnapshotCancelled("the snapshot was cancelled while scanning")
                progress(Progress(scanned=len(entries) + 1))
            if entry.kind == "file":
                old = previous.get(entry.path)
                if old is not None and old.kind == "file" and old.ref and \
                        old.change_key() == entry.change_key():
                    entry = replace(entry, ref=old.ref)
                else:
                    entry = replace(entry, ref=secrets.token_hex(12))
                    todo.append(len(entries))
                entry = _racy(entry, started)
            entries.append(entry)
        methods: set[str] = set()
        buckets: set[str] = set()
        skipped: set[str] = set()
        # Plain strings: pathlib's joins cost as much as a clone per file.
        objects_dir = str(objects)
        done = Progress(scanned=len(entries), files_total=len(todo),
                        bytes_total=sum(entries[i].size for i in todo))
        done_guard = threading.Lock()
        progress(done)

        def store(index: int) -> str | None:
            nonlocal done
            if cancelled():
                raise SnapshotCancelled("the snapshot was cancelled")
            method = store_one(index)
            with done_guard:
                done = replace(done, files_done=done.files_done + 1,
                               bytes_done=done.bytes_done + entries[index].size)
                now = done
            progress(now)
            return method

        def store_one(index: int) -> str | None:
            entry = entries[index]
            assert entry.ref is not None  # noqa: S101
            try:
                sfd, st = open_file(root_fd, entry.path)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                log.warning("snapshot: skipping %s: it was removed or replaced since the "
                            "scan (%s)", entry.path, exc.strerror)
                skipped.add(entry.path)
                return None
            try:
                if st.st_ino != entry.ino:  # another file was renamed over it: take that one
                    entries[index] = replace(entry, mode=stat.S_IMODE(st.st_mode),
                                             uid=st.st_uid, gid=st.st_gid,
                                             mtime_ns=st.st_mtime_ns, size=st.st_size,
                                             ino=st.st_ino, ctime_ns=0)
                bucket = f"{objects_dir}/{entry.ref[:2]}"
                if bucket not in buckets:
                    os.makedirs(bucket, mode=0o700, exist_ok=True)
                    buckets.add(bucket)
                method = clone_or_copy(sfd, f"{bucket}/{entry.ref}", mode=0o400)
            finally:
                os.close(sfd)
            methods.add(method)
            return method

        # Clones are small metadata updates that threads only make contend (measured on XFS
        # and btrfs: one thread is fastest); copies move data, so they run in parallel.
        try:
            first, rest = None, todo
            while first is None and rest:
                first, rest = store(rest[0]), rest[1:]
            if first == "reflink" or len(rest) < 2:
                for index in rest:
                    store(index)
            else:
                with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="snapshot",
                                        initializer=lower_priority) as pool:
                    list(pool.map(store, rest))
            if cancelled():
                raise SnapshotCancelled("the snapshot was cancelled")
        except BaseException:
            # Nothing of this snapshot is committed; drop the objects it stored already.
            for index in todo:
                ref = entries[index].ref
                with contextlib.suppress(OSError):
                    os.unlink(f"{objects_dir}/{ref[:2]}/{ref}")  # type: ignore[index]
            raise
        copied = sum(entries[i].size for i in todo if entries[i].path not in skipped)
        if skipped:
            entries = [e for e in entries if e.path not in skipped
                       and not (e.kind == "hardlink" and e.target in skipped)]
        method = "none" if not methods else ("copy" if "copy" in methods else "reflink")
        return entries, copied, method

    def remove(self, volume: str, name: str) -> None:
        with self._lock(volume):
            self.get(volume, name)
            self._dir(volume, "catalog", f"{name}.json").unlink()
            with self._guard:
                self._catalog[volume] = [i for i in self._catalog.get(volume, [])
                                         if i.name != name]
            self._dir(volume, "entries", f"{name}.json").unlink(missing_ok=True)
            self._sweep(volume)

    def prune(self, volume: str, keep: int) -> list[str]:
        """Drop automatic snapshots beyond the newest ``keep``; manual ones stay."""
        automatic = [i for i in self.list_snapshots(volume) if i.kind == "automatic"]
        doomed = [i.name for i in automatic[:-keep]] if keep else [i.name for i in automatic]
        for name in doomed:
            self.remove(volume, name)
        return doomed

    def remove_all(self, volume: str, keep_kinds: frozenset[str] = frozenset()) -> None:
        """Remove every snapshot of the volume, except those of ``keep_kinds``."""
        kept = [i for i in self.list_snapshots(volume) if i.kind in keep_kinds]
        if kept:
            for info in self.list_snapshots(volume):
                if info.kind not in keep_kinds:
                    self.remove(volume, info.name)
            return
        with self._lock(volume):
            try:
                # The catalog (the commit point) first: a crash part-way through leaves each
                # snapshot complete or absent, never listed with its objects gone.
                remove_tree(self._dir(volume, "catalog"))
                self._destroy_subvolumes(volume, keep=set())
                remove_tree(self._dir(volume))
            finally:
                with self._guard:
                    self._catalog.pop(volume, None)

    def discard(self, volume: str, keep_kinds: frozenset[str] = frozenset()) -> None:
        """Take every snapshot of the volume away, except those of ``keep_kinds``, in time
        independent of their size: :meth:`purge` deletes their data later."""
        with self._lock(volume):
            kept = [i for i in self.list_snapshots(volume) if i.kind in keep_kinds]
            try:
                if kept:
                    # Each catalog file is its snapshot's commit point: unlinked, it is gone.
                    for info in self.list_snapshots(volume):
                        if info.kind not in keep_kinds:
                            self._dir(volume, "catalog", f"{info.name}.json").unlink()
                    with self._guard:
                        self._unswept.add(volume)
                elif self._dir(volume).is_dir():
                    bin_ = self._removing / f".{secrets.token_hex(8)}"
                    bin_.mkdir(mode=0o700)
                    os.rename(self._dir(volume), confined(bin_, volume))
                    fsync_dir(bin_)
                    fsync_dir(self.root)
            finally:
                with self._guard:
                    self._catalog.pop(volume, None)

    def purge(self) -> None:
        """Delete what :meth:`discard` took away (slow: run it in the background).  After a
        crash, the next call finishes (``recover`` sweeps what stayed in place)."""
        with self._guard:
            unswept, self._unswept = self._unswept, set()
        for volume in sorted(unswept):
            with self._lock(volume):
                self._sweep(volume)
        for bin_ in os.scandir(self._removing):
            for item in os.scandir(bin_.path):
                subvols = Path(item.path) / "subvols"
                if subvols.is_dir():
                    for sub in os.scandir(subvols):
                        btrfs.destroy_subvolume(Path(sub.path))
            remove_tree(Path(bin_.path))

    def populate_from(self, volume: str, name: str) -> Callable[[Path], None]:
        """A ``populate`` function that rebuilds ``volume@name`` into a new directory (an
        image clone is mounted while it runs)."""
        entries = self.entries(volume, name)

        def populate(dst: Path) -> None:
            with self._reader(volume, name) as opener:
                def write(entry: Entry, fd: int) -> None:
                    sfd = opener(entry)
                    try:
                        clone_fd(sfd, fd)
                    finally:
                        os.close(sfd)
                materialize(entries, dst, write)

        return populate

    # maintenance

    def _sweep(self, volume: str) -> None:
        """Delete objects and entry files no committed snapshot references."""
        names = {i.name for i in self.list_snapshots(volume)}
        entries_dir = self._dir(volume, "entries")
        referenced: set[str] = set()
        if entries_dir.is_dir():
            with os.scandir(entries_dir) as items:
                for item in items:
                    name = item.name.removesuffix(".json")
                    if name not in names:
                        os.unlink(item.path)
                        continue
                    for entry in json.loads(Path(item.path).read_bytes()):
                        if entry.get("ref"):
                            referenced.add(entry["ref"])
        self._destroy_subvolumes(volume, keep=names)
        clones = self._dir(volume, "images")
        if clones.is_dir():
            with os.scandir(clones) as items:
                for item in items:
                    if item.name not in names:
                        os.unlink(item.path)  # a mount of it (a reader) keeps its data
        objects = self._dir(volume, "objects")
        if objects.is_dir():
            with os.scandir(objects) as buckets:
                for bucket in buckets:
                    with os.scandir(bucket.path) as objs:
                        for obj in objs:
                            if obj.name not in referenced:
                                os.unlink(obj.path)

    def _destroy_subvolumes(self, volume: str, keep: set[str]) -> None:
        subvols = self._dir(volume, "subvols")
        if not subvols.is_dir():
            return
        with os.scandir(subvols) as items:
            for item in items:
                if item.name not in keep:
                    btrfs.destroy_subvolume(Path(item.path))

    def recover(self) -> None:
        """Remove what interrupted snapshots left: uncommitted entries and orphan objects."""
        for volume in self.volumes():
            with self._lock(volume):
                for tmp in self._dir(volume, "catalog").glob(".*.tmp") if \
                        self._dir(volume, "catalog").is_dir() else []:
                    tmp.unlink()
                self._sweep(volume)
