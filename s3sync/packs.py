"""Pack objects: many blobs in one upload, several uploads in flight.

One PUT per small file is what makes file-by-file sync slow; a pack holds blobs back to back
until it reaches :data:`PACK_TARGET` bytes and is named by the BLAKE3 hash of its bytes.
In an encrypted store the writer is given each blob's pack form (``blobs.pack_form``) and
seals it at once, in the walk's thread.  (Sealing in the upload threads, as an earlier
version did, was slower: a thread that seals a small blob lets go of the GIL in each short
C call and then waits for the walk's switch interval to get it back.  On 10,000 small files
that made encryption cost 1.17x a plain push, against 1.08x sealed in the walk; on
8 x 64 MiB, 1.05x against 1.00x: ``bench/s3_ab.py --op push``.)  A
blob added to the open pack gets a provisional reference (pack ``@<n>``) that
:meth:`PackWriter.resolve` turns into the real name once the pack is sealed.  Sealed packs
upload from a thread pool; at most ``in_flight`` are held in memory at once.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

from s3sync import blobs
from s3sync.client import Bucket
from s3sync.layout import Layout
from s3sync.manifest import ChunkRef
from s3sync.sealing import Codec

PACK_TARGET = 8 << 20


class PackWriter:
    def __init__(self, bucket: Bucket, layout: Layout, pool: ThreadPoolExecutor,
                 existing: set[str], in_flight: int = 8, codec: Codec | None = None) -> None:
        self._bucket = bucket
        self._codec = codec if codec is not None and codec.encrypted else None
        self._layout = layout
        self._pool = pool
        self._existing = existing
        self._slots = threading.BoundedSemaphore(in_flight)
        self._buf = bytearray()
        self._seq = 0
        self._ids: dict[int, Future[str]] = {}
        self._names: dict[int, str] = {}
        self._uploaded: set[int] = set()
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.uploaded_bytes = 0
        self.new_packs = 0

    def add(self, digest: str, packed: blobs.Buffer, size: int) -> ChunkRef:
        """Append one blob, given its pack form; raises the first upload failure as soon as
        it is known."""
        if self._error is not None:
            raise self._error
        if self._codec is not None:
            packed = self._codec.seal_packed(digest, packed)
        ref = ChunkRef(digest, f"@{self._seq}", len(self._buf), len(packed), size)
        self._buf += packed
        if len(self._buf) >= PACK_TARGET:
            self.seal()
        return ref

    def seal(self) -> None:
        """Close the open pack (if it holds anything) and start its upload."""
        if not self._buf:
            return
        buf, self._buf = self._buf, bytearray()
        seq, self._seq = self._seq, self._seq + 1
        name: Future[str] = Future()
        self._ids[seq] = name
        self._slots.acquire()
        try:
            future = self._pool.submit(self._upload, seq, name, buf)
        except BaseException:
            self._slots.release()
            raise
        self._futures.append(future)

    def _upload(self, seq: int, name: Future[str], buf: bytearray) -> None:
        try:
            data = bytes(buf)
            del buf
            # Hashed here, not in seal(): the walk goes on reading on the other core.
            pack_id = blobs.digest(data)
            name.set_result(pack_id)
            if self._error is not None:
                return
            if pack_id not in self._existing:
                self._bucket.put(self._layout.pack(pack_id), data)
                with self._lock:
                    self.uploaded_bytes += len(data)
                    self.new_packs += 1
            with self._lock:
                self._uploaded.add(seq)
        except BaseException as exc:
            if not name.done():
                name.set_exception(exc)
            with self._lock:
                if self._error is None:
                    self._error = exc
            raise
        finally:
            self._slots.release()

    def resolve(self, ref: ChunkRef) -> ChunkRef:
        if not ref.pack.startswith("@"):
            return ref
        seq = int(ref.pack[1:])
        name = self._names.get(seq)
        if name is None:
            name = self._names[seq] = self._ids[seq].result()
        return ref._replace(pack=name)

    def stored(self, ref: ChunkRef) -> bool:
        """Whether the blob ``ref`` is known to be in the store (uploaded or already there)."""
        return not ref.pack.startswith("@") or int(ref.pack[1:]) in self._uploaded

    def finish(self) -> None:
        """Seal, wait for every upload, and raise the first failure."""
        if self._error is None:
            self.seal()
        wait(self._futures)
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        for future in self._futures:
            future.cancel()
        wait(self._futures)
        for name in self._ids.values():
            if not name.done():
                name.cancel()
