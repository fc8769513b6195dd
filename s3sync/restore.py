"""Restore: rebuild a snapshot into an empty directory, verifying every blob.

Before anything is written the manifest and tree are fetched and validated and the store is
listed once, so a missing pack is refused with ``dst`` untouched.  Content is then streamed:
ranged GETs run ahead in a thread pool (up to :data:`WINDOW` plain bytes, so memory does not
grow with file or chunk sizes), each blob is checked against its hash as it is taken, and
:func:`backends.tree.materialize` writes files, links, fifos, owners, modes, mtimes and
xattrs (all validated first: see ``manifest.py``).  When the whole snapshot fits in the
window it is downloaded and verified before the first file is created.  On any failure
``dst`` is emptied again, so the caller sees the complete tree or an empty directory, never a mix.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from backends.fs import remove_tree
from backends.tree import (
    PATH_FLAGS,
    SPARSE_BLOCK,
    DirectoryView,
    Entry,
    TreeView,
    all_zero,
    materialize,
    open_beneath,
    open_dir,
)
from s3sync.cache import Cached
from s3sync.errors import CorruptObject, S3SyncError
from s3sync.manifest import ChunkRef, Manifest, Tree
from s3sync.remote import Plain, Remote, Span, plan
from s3sync.sealing import Codec

WINDOW = 64 << 20
"""Most plain bytes downloaded ahead and held (see :class:`Prefetcher`)."""

Progress = Callable[[int, int], None]


class Local:
    """Blobs a restore can read from a copy of the volume on this host instead of
    downloading: every blob of every file that the last push or restore here recorded
    (``files``, the store's cache) and that has not changed since (same change key).  Each
    one read is checked against its id; one that does not match is downloaded after all."""

    def __init__(self, view: TreeView, files: dict[str, Cached]) -> None:
        self.view = view
        self.files: dict[str, tuple[Entry, list[ChunkRef]]] = {}
        """Path -> (file, its blobs as recorded), for the files unchanged since."""
        self.checked: dict[str, tuple[Entry, list[ChunkRef]]] = {}
        """Files whose recorded change key was racy (written within a timestamp tick of
        the snapshot that pushed them: ctime recorded as 0) and otherwise matches: never
        linked, but their blobs are read (each checked against its id, as every read is)."""
        for entry in view.entries():
            cached = files.get(entry.path) if entry.kind == "file" else None
            if cached is None:
                continue
            key = entry.change_key()
            if cached.key == key:
                self.files[entry.path] = (entry, cached.refs)
            elif cached.key[3] == 0 and cached.key[:3] == key[:3]:
                self.checked[entry.path] = (entry, cached.refs)
        self._blobs: dict[str, tuple[Entry, int, int]] | None = None
        self._root: int | None = open_dir(view.root) if isinstance(view, DirectoryView) \
            else None
        """Files to link are opened beneath it, O_PATH (a link needs no readable file)."""
        self._open: tuple[str, BinaryIO] | None = None
        self.read_bytes = 0
        self.linked_bytes = 0
        """Bytes of files linked from this host's copy, neither read nor written."""

    def whole(self, entry: Entry, refs: list[ChunkRef]) -> int | None:
        """A descriptor of this host's file at ``entry``'s path if its content is exactly
        ``refs`` (same blobs, unchanged since recorded): linked, not written (see
        :func:`backends.tree.materialize`)."""
        found = self.files.get(entry.path)
        if found is None or (found[1] != refs and _blob_ids(found[1]) != _blob_ids(refs)):
            return None  # (the same blobs may be recorded in other packs: ids decide)
        try:
            if self._root is not None:
                fd = open_beneath(self._root, entry.path, PATH_FLAGS)
            else:
                with self.view.open(found[0]) as stream:
                    fd = os.dup(stream.fileno())
        except OSError:
            return None
        self.linked_bytes += entry.size
        return fd

    @property
    def blobs(self) -> dict[str, tuple[Entry, int, int]]:
        """Blob id -> (file, offset, size); made on first use (a move that links whole
        files reads few blobs, if any)."""
        if self._blobs is None:
            self._blobs = {}
            for entry, refs in (*self.files.values(), *self.checked.values()):
                offset = 0
                for ref in refs:
                    self._blobs.setdefault(ref.hash, (entry, offset, ref.size))
                    offset += ref.size
        return self._blobs

    def read(self, ref: ChunkRef, codec: Codec) -> bytes | None:
        found = self.blobs.get(ref.hash)
        if found is None:
            return None
        entry, offset, size = found
        try:
            if self._open is None or self._open[0] != entry.path:
                self._close_open()
                self._open = (entry.path, self.view.open(entry))
            data = os.pread(self._open[1].fileno(), size, offset)
        except OSError:
            return None
        if len(data) != ref.size or codec.content_id(data) != ref.hash:
            return None  # changed under us: download it
        self.read_bytes += len(data)
        return data

    def _close_open(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def close(self) -> None:
        self._close_open()
        if self._root is not None:
            os.close(self._root)
            self._root = None


def _blob_ids(refs: list[ChunkRef]) -> list[tuple[str, int]]:
    return [(r.hash, r.size) for r in refs]


def restore(remote: Remote, manifest: Manifest, dst: Path, progress: Progress | None,
            pool: ThreadPoolExecutor, local: Local | None = None) -> None:
    """``local``: blobs to take from this host's copy of the volume (only the rest is
    downloaded: a volume moving back to a host that had it fetches what changed)."""
    _check_empty(dst)
    tree = remote.tree(manifest)
    sizes = remote.pack_sizes()
    missing = sorted({r.pack for refs in tree.chunks.values() for r in refs
                      if sizes.get(r.pack, -1) < r.offset + r.length})
    if missing:
        raise CorruptObject(
            f"snapshot {manifest.snapshot.id} needs {len(missing)} object(s) missing from "
            f"{remote.where} or cut short (e.g. {remote.layout.pack(missing[0])}): restore "
            "another snapshot; the next push uploads lost content again")
    here = {} if local is None else {r.hash for refs in tree.chunks.values() for r in refs
                                     if r.hash in local.blobs}
    fetcher = Prefetcher(remote, tree, manifest.snapshot.id, pool, sizes, skip=here)
    total = sum(e.size for e in tree.entries if e.kind == "file")
    done = 0

    def take(ref: ChunkRef) -> Plain:
        if ref.hash in here:
            assert local is not None  # noqa: S101 -- here is empty without it
            data = local.read(ref, remote.codec)
            if data is not None:
                return data
            return remote.fetch([ref], manifest.snapshot.id)[(ref.pack, ref.offset)]
        return fetcher.take(ref)

    def write(entry: Entry, fd: int) -> None:
        nonlocal done
        out = SparseWriter(fd, writers)
        try:
            for ref in tree.chunks[entry.path]:
                out.add(take(ref))
            out.finish()
        finally:
            out.close()
        done += entry.size
        if progress is not None:
            progress(done, total)

    try:
        with ThreadPoolExecutor(WRITERS, "s3-write") as writers:
            fetcher.start()
            materialize(tree.entries, dst, write, None if local is None else
                        lambda entry: local.whole(entry, tree.chunks[entry.path]))
    except BaseException as exc:
        fetcher.close()
        if local is not None:
            local.close()
        _empty(dst)
        if isinstance(exc, OSError):
            raise S3SyncError(
                f"restoring snapshot {manifest.snapshot.id} into {dst} failed: {exc}; "
                f"{dst} was emptied again") from exc
        raise
    fetcher.close()
    if local is not None:
        local.close()


def _check_empty(dst: Path) -> None:
    if dst.is_symlink() or not dst.is_dir():
        raise S3SyncError(f"cannot restore into {dst}: it is not an existing directory")
    if any(dst.iterdir()):
        raise S3SyncError(f"cannot restore into {dst}: it is not empty; restore into a new, "
                          "empty directory")


def _empty(dst: Path) -> None:
    """Empty ``dst`` again after a failed restore (fd-relative: any depth, no symlink walk)."""
    for child in os.scandir(dst):
        with contextlib.suppress(OSError):
            remove_tree(Path(child.path))


FLUSH = 8 << 20
"""Most plain bytes :class:`SparseWriter` gathers before one ``pwritev``."""
WRITERS = 2
"""Threads writing restored content to disk (see :class:`SparseWriter`)."""
IN_FLIGHT = 4
"""Most gathered writes of one file queued or running at once."""


class SparseWriter:
    """Appends blobs to a file as :func:`backends.tree.write_sparse` does -- skipping each
    all-zero :data:`~backends.tree.SPARSE_BLOCK` of a blob instead of writing it, so holes
    stay holes -- but gathers the runs of data, across blobs, into one ``pwritev`` per
    :data:`FLUSH` bytes, run by ``pool`` (inline without one).

    Why a pool: putting new pages in the page cache is kernel work that, on one thread, took
    most of a large restore's time (1.5 of 1.7 s for 8 x 64 MiB into fresh pages here, the
    downloads waiting on it); writes at explicit offsets let two threads do it while this one
    hands out the next blobs.  At most :data:`IN_FLIGHT` writes (views of blobs) are held.

    :meth:`finish` waits for every write and leaves the descriptor's offset after the last
    byte (or hole) added; :meth:`close` waits for them whatever happened: call it before the
    descriptor is closed, or a write still running would land in whichever file reuses the
    number."""

    __slots__ = ("_fd", "_pending", "_pool", "_size", "_start", "_writes")

    def __init__(self, fd: int, pool: ThreadPoolExecutor | None = None) -> None:
        self._fd = fd
        self._pool = pool
        self._pending: list[memoryview] = []
        self._start = os.lseek(fd, 0, os.SEEK_CUR)
        """File offset of the first pending byte."""
        self._size = 0
        self._writes: list[Future[None]] = []

    def add(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        length = len(view)
        pos = run = 0
        while pos < length:
            end = min(pos + SPARSE_BLOCK, length)
            if all_zero(data, pos, end):
                if run < pos:
                    self._queue(view[run:pos])
                self._flush()
                self._start += end - pos  # a hole: nothing written there
                run = end
            pos = end
        if run < length:
            self._queue(view[run:length])

    def _queue(self, view: memoryview) -> None:
        self._pending.append(view)
        self._size += len(view)
        if self._size >= FLUSH or len(self._pending) >= 256:
            self._flush()

    def _flush(self, inline: bool = False) -> None:
        if not self._pending:
            return
        pending, start = self._pending, self._start
        self._pending, self._start, self._size = [], start + self._size, 0
        if self._pool is None or inline:
            _write_at(self._fd, pending, start)
            return
        while len(self._writes) >= IN_FLIGHT:
            self._writes.pop(0).result()
        self._writes.append(self._pool.submit(_write_at, self._fd, pending, start))

    def finish(self) -> None:
        # The last run is written here: a small file (most files) never waits for a
        # thread hand-off, which cost more than its write.
        self._flush(inline=True)
        while self._writes:
            self._writes.pop(0).result()
        os.lseek(self._fd, self._start, os.SEEK_SET)

    def close(self) -> None:
        for write in self._writes:
            with contextlib.suppress(Exception):
                write.result()
        self._writes.clear()


def _write_at(fd: int, views: list[memoryview], offset: int) -> None:
    while views:
        written = os.pwritev(fd, views, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]


class Prefetcher:
    """Downloads spans ahead of the writer and hands out each blob, verified, as it is needed.

    Memory is bounded by :data:`WINDOW` plain bytes plus one span, whatever the sizes of
    files: spans are submitted while the plain bytes held stay within the window; a span is
    kept until the last blob reference to it has been taken, so content that several files
    share is downloaded once, unless keeping it would overflow the window: then it is
    dropped and downloaded again when next needed.  Each span holds at most
    :data:`~s3sync.remote.SPAN_MAX` plain bytes and each blob at most
    :data:`~s3sync.blobs.CHUNK_MAX` (the manifest parser refuses larger ones).

    The pool only downloads; each blob is unsealed and checked against its id in the thread
    that takes it.  Why: those are short C calls that let go of the GIL, and a pool thread
    that lets go of it while the taking thread runs Python (creating 10,000 files) waits
    for that thread's whole switch interval to get it back -- several times per blob.
    Measured on a 10,000-file restore into tmpfs: 0.57 s plain and 0.78 s encrypted with
    the checks in the pool; 0.51 s and 0.56 s with them here (``bench/s3_ab.py``).  When
    the whole snapshot fits in the window, every blob is checked in :meth:`start`, before
    the first file is created.
    """

    def __init__(self, remote: Remote, tree: Tree, snapshot_id: str,
                 pool: ThreadPoolExecutor, sizes: dict[str, int] | None = None,
                 skip: Collection[str] = ()) -> None:
        self._remote = remote
        self._sizes = sizes or {}
        self._snapshot = snapshot_id
        self._pool = pool
        order = [r for e in tree.entries if e.kind == "file" for r in tree.chunks[e.path]
                 if r.hash not in skip]
        self._spans = plan(order)
        self._where: dict[tuple[str, int], int] = {}
        for i, span in enumerate(self._spans):
            for ref in span.refs:
                self._where[(ref.pack, ref.offset)] = i
        self._order = order
        self._pos = 0
        self._uses = [0] * len(self._spans)
        for ref in order:
            self._uses[self._where[(ref.pack, ref.offset)]] += 1
        self._blob_uses = Counter((ref.pack, ref.offset) for ref in order)
        self._futures: dict[int, Future[bytes]] = {}
        self._opened: dict[tuple[str, int], Plain] = {}
        """Verified blobs that are taken again later (shared content), or all of them
        when the snapshot fits in the window."""
        self._next = 0
        self._held = 0

    def start(self) -> None:
        self._top_up()
        if self._next == len(self._spans):
            # Everything fits: verify it all before writing anything.
            for i, future in list(self._futures.items()):
                span, data = self._spans[i], memoryview(future.result())
                for ref in span.refs:
                    self._opened[(ref.pack, ref.offset)] = self._remote.open_at(
                        span, data, ref, self._snapshot)
                self._futures[i] = _opened  # the stored bytes are not needed again

    def _top_up(self) -> None:
        while self._next < len(self._spans) and (
                self._held + self._spans[self._next].plain <= WINDOW or not self._futures):
            self._submit(self._next)
            self._next += 1

    def _submit(self, i: int) -> None:
        if i not in self._futures and self._uses[i] > 0:
            self._held += self._spans[i].plain
            span: Span = self._spans[i]
            self._futures[i] = self._pool.submit(self._remote.download, span, self._snapshot,
                                                 self._sizes.get(span.pack))

    def take(self, ref: ChunkRef) -> Plain:
        at = (ref.pack, ref.offset)
        i = self._where[at]
        if i not in self._futures:
            self._submit(i)
        blob = self._open(i, at, ref)
        self._uses[i] -= 1
        self._pos += 1
        following = self._order[self._pos] if self._pos < len(self._order) else None
        again = following is not None and \
            self._where[(following.pack, following.offset)] == i
        if self._uses[i] == 0 or (self._held > WINDOW and not again):
            del self._futures[i]  # done, or too much held: fetched again if needed later
            self._held -= self._spans[i].plain
            for other in self._spans[i].refs:
                self._opened.pop((other.pack, other.offset), None)
            self._top_up()
        return blob

    def _open(self, i: int, at: tuple[str, int], ref: ChunkRef) -> Plain:
        left = self._blob_uses[at] = self._blob_uses[at] - 1
        blob = self._opened.pop(at, None) if left == 0 else self._opened.get(at)
        if blob is None:
            blob = self._remote.open_at(self._spans[i], memoryview(self._futures[i].result()),
                                        ref, self._snapshot)
            if left > 0:
                self._opened[at] = blob
        return blob

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._opened.clear()


_opened: Future[bytes] = Future()
"""Stands for a span whose blobs are all opened already."""
_opened.set_result(b"")
