"""Reading what pushes wrote: snapshot listings, manifests, blobs and trees.

Blobs are fetched per pack, with nearby blobs merged into one ranged GET, and every blob is
checked against its BLAKE3 hash (keyed, after unsealing, in an encrypted store: ``sealing.py``)
before anyone sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from s3sync.blobs import CHUNK_MAX
from s3sync.cache import Cache
from s3sync.client import Bucket, ObjectMissing
from s3sync.errors import CorruptObject, SnapshotNotFound, TamperedObject
from s3sync.layout import Layout
from s3sync.manifest import SNAPSHOT_ID, ChunkRef, Manifest, Tree, parse_tree
from s3sync.packs import PACK_TARGET
from s3sync.sealing import Codec

MERGE_GAP = 1 << 20
"""Blobs of one pack closer than this are fetched by one ranged GET."""
SPAN_MAX = PACK_TARGET + 2 * CHUNK_MAX
"""Most stored, and most plain, bytes of one ranged GET (unless one blob is larger).

Above the largest pack a push writes (it closes a pack once :data:`PACK_TARGET` is passed,
by at most one sealed blob), so an incompressible pack is one GET, not a GET of its first
8 MiB and another of the blob that crossed the line (which doubled the requests of a large
restore)."""

log = logging.getLogger(__name__)

Plain = bytes | bytearray
"""A verified blob's content (unsealing gives a ``bytearray``: not copied again)."""


@dataclass(frozen=True)
class Catalog:
    manifests: list[Manifest]
    """Valid snapshots, oldest first by their recorded creation time."""
    skipped: list[str]
    """Objects under ``snapshots/`` that are not valid snapshots: "key: why"."""
    refused: dict[str, TamperedObject] = field(default_factory=dict)
    """Snapshot id -> why: the part of ``skipped`` that failed authentication in an
    encrypted store (tampered, replayed or planted), problems rather than mere junk."""

    @property
    def latest(self) -> Manifest | None:
        return self.manifests[-1] if self.manifests else None


@dataclass(frozen=True)
class Remote:
    """What every operation on one (bucket, prefix) needs."""

    bucket: Bucket
    layout: Layout
    cache: Cache
    workers: int
    skipped: list[str] = field(default_factory=list)
    """What the last :meth:`catalog` skipped (updated in place), for Status warnings."""
    codec: Codec = field(default_factory=Codec)
    """Plain, or sealed under the store's master key once it is unlocked (``store.py``)."""

    @property
    def where(self) -> str:
        return f"{self.bucket.where}, prefix {self.layout.root or '/'}"

    def snapshot_ids(self) -> list[str]:
        """Ids of the valid snapshots in the store, oldest first (by their recorded time)."""
        return [m.snapshot.id for m in self.catalog().manifests]

    def catalog(self) -> Catalog:
        """Every valid snapshot, oldest first by its lease generation, then its own recorded
        time (``created``, then id),
        and every object under ``snapshots/`` that is not one, with why.

        Key order means nothing: whoever can write to the bucket can add ``snapshots/README``
        or ``snapshots/99999999`` that sorts last.  An object whose name is not a snapshot id,
        whose manifest does not decode, or that names another id is skipped and reported,
        never fatal, so one junk object cannot block listing, restore or push.
        """
        ids: list[str] = []
        skipped: list[str] = []
        for info in self.bucket.list(self.layout.snapshots):
            tail = Layout.tail(info.key, self.layout.snapshots)
            if SNAPSHOT_ID.fullmatch(tail):
                ids.append(tail)
            else:
                skipped.append(f"{info.key}: not a snapshot (its name is no snapshot id)")

        refused: dict[str, TamperedObject] = {}

        def load(snapshot_id: str) -> Manifest | str:
            try:
                return self.manifest(snapshot_id)
            except SnapshotNotFound:
                return ""  # deleted since the listing (a prune): not a problem
            except TamperedObject as exc:
                refused[snapshot_id] = exc
                return str(exc)
            except CorruptObject as exc:
                return str(exc)

        found: list[Manifest] = []
        if ids:
            with ThreadPoolExecutor(min(self.workers, len(ids))) as pool:
                for snapshot_id, got in zip(ids, pool.map(load, ids), strict=True):
                    if isinstance(got, Manifest):
                        found.append(got)
                    elif snapshot_id in refused:
                        skipped.append(got)  # names the object already
                    elif got:
                        skipped.append(f"{self.layout.snapshot(snapshot_id)}: {got}")
        # A later lease generation is newer whatever the hosts' clocks say (fencing).
        found.sort(key=lambda m: (m.snapshot.generation, m.snapshot.created, m.snapshot.id))
        self.skipped[:] = skipped
        if skipped:
            log.warning("%s: skipped %d object(s) that are not valid snapshots, e.g. %s",
                        self.where, len(skipped), skipped[0])
        return Catalog(found, skipped, refused)

    def pack_sizes(self) -> dict[str, int]:
        """Every pack of this store with its size in bytes (one LIST of ``data/``)."""
        return {Layout.tail(o.key, self.layout.data): o.size
                for o in self.bucket.list(self.layout.data) if self.layout.own_pack(o.key)}

    def manifest(self, snapshot_id: str) -> Manifest:
        key = self.layout.snapshot(snapshot_id)
        data = self.cache.manifest(snapshot_id)
        if data is None:
            try:
                data = self.bucket.get(key)
            except ObjectMissing:
                raise SnapshotNotFound(
                    f"snapshot {snapshot_id!r} is not in {self.where}: list the snapshots "
                    "and pick one, or use 'latest'") from None
            manifest = self.codec.decode_manifest(data, snapshot_id, key)
            self.cache.keep_manifest(snapshot_id, data)
        else:
            manifest = self.codec.decode_manifest(data, snapshot_id, key)
        if manifest.snapshot.id != snapshot_id:
            raise CorruptObject(f"manifest {key} names snapshot {manifest.snapshot.id!r}; "
                                "it was moved or overwritten: restore another snapshot")
        return manifest

    def diverged(self) -> list[Manifest]:
        """The snapshots kept aside under ``diverged/`` (pushed by a host that had lost the
        lease), oldest first; unreadable objects there are skipped with a warning."""
        found: list[Manifest] = []
        for info in self.bucket.list(self.layout.diverged):
            snapshot_id = Layout.tail(info.key, self.layout.diverged)
            if not SNAPSHOT_ID.fullmatch(snapshot_id):
                continue
            try:
                manifest = self.diverged_manifest(snapshot_id)
            except (CorruptObject, SnapshotNotFound) as exc:
                log.warning("%s: skipped %s: %s", self.where, info.key, exc)
                continue
            found.append(manifest)
        found.sort(key=lambda m: (m.snapshot.created, m.snapshot.id))
        return found

    def diverged_manifest(self, snapshot_id: str) -> Manifest:
        key = self.layout.snapshot(snapshot_id, diverged=True)
        try:
            data = self.bucket.get(key)
        except ObjectMissing:
            raise SnapshotNotFound(f"snapshot {snapshot_id!r} is not in {self.where}") from None
        manifest = self.codec.decode_manifest(data, snapshot_id, key, diverged=True)
        if manifest.snapshot.id != snapshot_id:
            raise CorruptObject(f"manifest {key} names snapshot {manifest.snapshot.id!r}; "
                                "it was moved or overwritten")
        return replace(manifest, snapshot=replace(manifest.snapshot, diverged=True))

    def manifests(self, ids: Iterable[str]) -> list[Manifest]:
        wanted = list(ids)
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.manifest, wanted))

    def tree(self, manifest: Manifest) -> Tree:
        found = self.fetch(manifest.tree + manifest.patches, manifest.snapshot.id)
        return parse_tree([bytes(found[(r.pack, r.offset)]) for r in manifest.tree],
                          [bytes(found[(r.pack, r.offset)]) for r in manifest.patches],
                          manifest.snapshot.id)

    def fetch(self, refs: Iterable[ChunkRef], snapshot_id: str) -> dict[tuple[str, int], Plain]:
        """Plain content of every blob in ``refs``, keyed by (pack, offset), verified."""
        spans = plan(refs)
        found: dict[tuple[str, int], Plain] = {}
        with ThreadPoolExecutor(self.workers) as pool:
            for result in pool.map(lambda s: self.fetch_span(s, snapshot_id), spans):
                found.update(result)
        return found

    def fetch_span(self, span: Span, snapshot_id: str,
                   pack_size: int | None = None) -> dict[tuple[str, int], Plain]:
        """The verified blobs of ``span`` (:meth:`download` then :meth:`open_at`)."""
        data = memoryview(self.download(span, snapshot_id, pack_size))
        return {(ref.pack, ref.offset): self.open_at(span, data, ref, snapshot_id)
                for ref in span.refs}

    def download(self, span: Span, snapshot_id: str, pack_size: int | None = None) -> bytes:
        """The stored bytes of ``span``, not yet verified; a span that covers the whole pack
        (its listed ``pack_size``) is one plain GET, with no range for the server to cut
        out."""
        key = self.layout.pack(span.pack)
        whole = span.start == 0 and span.end == pack_size
        try:
            data = self.bucket.get(key) if whole else self.bucket.get(key, span.start, span.end)
        except ObjectMissing:
            raise CorruptObject(
                f"snapshot {snapshot_id} needs {key}, which is missing from {self.where}: "
                "restore another snapshot; the next push uploads lost content again") from None
        if whole and len(data) != span.end:
            raise CorruptObject(
                f"object {key} in {self.where} is {len(data)} bytes, not the {span.end} it "
                f"was when listed: snapshot {snapshot_id} cannot be restored from it: restore "
                "another snapshot, or push again to write a good copy")
        return data

    def open_at(self, span: Span, data: memoryview, ref: ChunkRef, snapshot_id: str) -> Plain:
        """The plain content of blob ``ref`` of ``span``, whose stored bytes (from
        :meth:`download`) are ``data``: unsealed and checked against its id, or refused
        naming its pack."""
        stored = data[ref.offset - span.start:ref.offset - span.start + ref.length]
        try:
            return self.codec.open_blob(stored, ref.size, ref.hash)
        except TamperedObject as exc:
            key = self.layout.pack(span.pack)
            raise TamperedObject(
                f"object {key} is refused: the blob at offset {ref.offset} does not "
                f"authenticate ({exc.cause}: {exc}); snapshot {snapshot_id} cannot be "
                "restored from it: restore another snapshot, or push again to write a "
                "good copy", key, exc.cause) from None
        except ValueError as exc:
            raise CorruptObject(
                f"object {self.layout.pack(span.pack)} is corrupt: the blob at offset "
                f"{ref.offset} ({exc}); snapshot {snapshot_id} cannot be restored from it: "
                "restore another snapshot, or push again to write a good copy") from None


@dataclass
class Span:
    """One ranged GET: bytes [start, end) of a pack, holding ``refs``."""

    pack: str
    start: int
    end: int
    refs: list[ChunkRef] = field(default_factory=list)
    plain: int = 0
    """Plain bytes of its blobs: the memory its verified content takes."""

    @property
    def length(self) -> int:
        return self.end - self.start


def plan(refs: Iterable[ChunkRef], gap: int = MERGE_GAP, most: int = SPAN_MAX) -> list[Span]:
    """Group blobs into ranged GETs, packs in order of first use, each blob once.

    A span grows while both its stored length and its blobs' plain size stay within ``most``
    (a span of one larger blob, e.g. a tree part, stays one span).
    """
    by_pack: dict[str, dict[int, ChunkRef]] = {}
    for ref in refs:
        by_pack.setdefault(ref.pack, {}).setdefault(ref.offset, ref)
    spans: list[Span] = []
    for pack, located in by_pack.items():
        current: Span | None = None
        for offset in sorted(located):
            ref = located[offset]
            end = offset + ref.length
            if (current is None or offset - current.end > gap
                    or max(current.end, end) - current.start > most
                    or current.plain + ref.size > most):
                current = Span(pack, offset, end)
                spans.append(current)
            current.end = max(current.end, end)
            current.refs.append(ref)
            current.plain += ref.size
    return spans
