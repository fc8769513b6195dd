"""The restore's prefetch window (s3sync/restore.py Prefetcher): memory stays bounded by
the window plus one span whatever the tree, shared content is fetched again rather than held
without bound, and blobs come out in order."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from backends.tree import Entry
from s3sync import restore
from s3sync.manifest import ChunkRef, Tree
from s3sync.remote import Span

KiB = 1 << 10


class FakeRemote:
    def __init__(self) -> None:
        self.fetched: list[tuple[str, int]] = []

        self.opened: list[tuple[str, int]] = []
        self.threads: set[str] = set()

    def download(self, span: Span, snapshot_id: str, pack_size: int | None = None) -> bytes:
        self.fetched.append((span.pack, span.start))
        return b"stored"

    def open_at(self, span: Span, data: memoryview, ref: ChunkRef, snapshot_id: str) -> bytes:
        assert bytes(data) == b"stored"
        self.opened.append((ref.pack, ref.offset))
        self.threads.add(threading.current_thread().name)
        return ref.hash.encode()[:8] * (ref.size // 8)


def ref(pack: int, offset: int, size: int = 64 * KiB) -> ChunkRef:
    return ChunkRef(f"{pack:02d}{offset:06d}".ljust(64, "0"), f"{pack:064d}", offset, size, size)


def tree(files: dict[str, list[ChunkRef]]) -> Tree:
    entries = [Entry(".", "dir", 0o755, 0, 0, 0)]
    entries += [Entry(p, "file", 0o644, 0, 0, 0, size=sum(r.size for r in refs))
                for p, refs in files.items()]
    return Tree(entries, dict(files), {})


def drain(monkeypatch: pytest.MonkeyPatch, files: dict[str, list[ChunkRef]], window: int
          ) -> tuple[int, FakeRemote]:
    monkeypatch.setattr(restore, "WINDOW", window)
    remote = FakeRemote()
    most = 0
    with ThreadPoolExecutor(4) as pool:
        fetcher = restore.Prefetcher(remote, tree(files), "s", pool)  # type: ignore[arg-type]
        fetcher.start()
        for refs in files.values():
            for r in refs:
                assert fetcher.take(r) == r.hash.encode()[:8] * (r.size // 8)
                most = max(most, fetcher._held)
        fetcher.close()
    return most, remote


def test_held_bytes_stay_within_the_window_plus_one_span(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    # 40 packs of 4 MiB in 64 KiB blobs; one blob of each is used again at the very end, so
    # keeping every span until its last use would hold all 160 MiB.
    files: dict[str, Any] = {f"f{p}": [ref(p, o * 64 * KiB) for o in range(64)]
                             for p in range(40)}
    files["again"] = [files[f"f{p}"][0] for p in range(40)]
    most, remote = drain(monkeypatch, files, 8 << 20)
    assert most <= (8 << 20) + (4 << 20)
    assert len(remote.fetched) <= 80  # each span at most once more at the end: no thrashing


def test_a_span_used_by_consecutive_blobs_is_fetched_once(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    files = {"big": [ref(1, o * 64 * KiB) for o in range(100)]}
    _, remote = drain(monkeypatch, files, 1 << 20)
    assert len(remote.fetched) == len(set(remote.fetched))


def test_blobs_are_opened_in_the_taking_thread_and_shared_ones_once_per_download(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The pool only downloads (see Prefetcher: checks in the pool waited for the GIL).
    shared = ref(1, 0)
    files = {"a": [shared, ref(1, 64 * KiB)], "b": [shared], "c": [ref(2, 0), shared]}
    _, remote = drain(monkeypatch, files, 1 << 20)
    assert remote.threads == {threading.current_thread().name}
    assert len(remote.opened) == len(set(remote.opened)) == 3
    assert sorted(remote.fetched) == sorted(set(remote.fetched))


def test_a_snapshot_that_fits_the_window_is_all_checked_before_the_first_blob_is_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restore, "WINDOW", 8 << 20)
    files = {f"f{p}": [ref(p, o * 64 * KiB) for o in range(4)] for p in range(3)}
    remote = FakeRemote()
    with ThreadPoolExecutor(2) as pool:
        fetcher = restore.Prefetcher(remote, tree(files), "s", pool)  # type: ignore[arg-type]
        fetcher.start()
        assert len(remote.opened) == 12  # before anything is written
        for refs in files.values():
            for r in refs:
                assert fetcher.take(r) == r.hash.encode()[:8] * (r.size // 8)
        fetcher.close()
    assert len(remote.opened) == 12


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("flush", [1, 100 * KiB, 8 << 20])
def test_sparse_writer_writes_what_write_sparse_writes(tmp_path: Any, flush: int, threads: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Same bytes, same holes as backends.tree.write_sparse, however writes are gathered,
    inline or by a pool of writer threads."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from backends.tree import SPARSE_BLOCK, write_sparse
    monkeypatch.setattr(restore, "FLUSH", flush)
    zero = bytes(SPARSE_BLOCK)
    blobs = [os.urandom(3000), zero * 2 + b"x" * 10, zero, bytearray(os.urandom(SPARSE_BLOCK * 3)),
             b"\0" * 100, os.urandom(SPARSE_BLOCK) + zero + os.urandom(5), zero * 3]
    paths = []
    for name, gathered in (("old", False), ("new", True)):
        path = tmp_path / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        if gathered:
            with ThreadPoolExecutor(threads) if threads else contextlib.nullcontext() as pool:
                writer = restore.SparseWriter(fd, pool)
                try:
                    for blob in blobs:
                        writer.add(blob)
                    writer.finish()
                finally:
                    writer.close()
        else:
            for blob in blobs:
                write_sparse(fd, bytes(blob))
        assert os.lseek(fd, 0, os.SEEK_CUR) == sum(len(b) for b in blobs)
        os.ftruncate(fd, sum(len(b) for b in blobs))
        os.close(fd)
        paths.append(path)
    old, new = paths
    assert new.read_bytes() == old.read_bytes() == b"".join(bytes(b) for b in blobs)
    assert new.stat().st_blocks == old.stat().st_blocks


def test_a_file_pushed_with_a_racy_change_key_is_read_and_checked_never_linked(
        tmp_path: Any) -> None:
    """A file written within a timestamp tick of the snapshot that pushed it has ctime 0 in
    its recorded key: its blobs are still taken from this host's copy (each checked against
    its id), but the file is never linked on the strength of that key."""
    from backends.tree import DirectoryView
    from s3sync.cache import Cached
    from s3sync.sealing import Codec

    codec = Codec()
    data = b"written just before the snapshot" * 1000
    (tmp_path / "f").write_bytes(data)
    info = (tmp_path / "f").stat()
    ref = ChunkRef(codec.content_id(data), "pack", 0, len(data), len(data))
    racy = Cached((info.st_ino, info.st_size, info.st_mtime_ns, 0), [ref], "")
    here = restore.Local(DirectoryView(tmp_path), {"f": racy})
    try:
        entry = Entry(path="f", kind="file", mode=0o644, uid=0, gid=0, size=len(data),
                      mtime_ns=info.st_mtime_ns)
        assert here.whole(entry, [ref]) is None  # never linked on a racy key
        assert here.read(ref, codec) == data  # but read here, checked against its id
        forged = ChunkRef(codec.content_id(b"other"), "pack", 0, len(data), len(data))
        assert here.read(forged, codec) is None  # (another id is not found here)
        # Another file in its place (same size and mtime, another inode): not used at all.
        moved = Cached((info.st_ino + 1, info.st_size, info.st_mtime_ns, 0), [ref], "")
        other = restore.Local(DirectoryView(tmp_path), {"f": moved})
        assert other.read(ref, codec) is None
        other.close()
    finally:
        here.close()
