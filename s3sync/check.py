"""Check: is every snapshot in the store restorable?  Structure always, content on request.

Structure (cheap: one LIST of ``data/``, manifests from the local cache, tree parts fetched):
every object under ``snapshots/`` is a valid manifest (else a *warning*: it is skipped by
every operation; in an encrypted store one that fails authentication -- tampered, replayed
or planted -- is a *problem*), every tree part and patch decodes and passes the restore
rules, and every blob a snapshot references lies in a pack that exists and is long enough
to hold it.

With ``read_data`` every referenced blob is downloaded (span by span, memory bounded by the
pool's width times :data:`~s3sync.remote.SPAN_MAX`) and checked against its hash.

The blobs found bad are remembered in the local cache (:meth:`Cache.keep_bad`): a later push
drops them from its dedup index and uploads that content again, so one rotten byte in the
bucket is not carried forward into every new snapshot.  Missing and short packs need no
memory: every push compares its index with the listing it makes anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from s3sync.client import ObjectMissing
from s3sync.errors import CorruptObject, S3SyncError, TamperedObject
from s3sync.manifest import ChunkRef
from s3sync.remote import Remote, Span, plan

SHOWN = 20
"""Problems listed in a report (the count covers all)."""


@dataclass
class CheckReport:
    snapshots: int = 0
    packs: int = 0
    blobs: int = 0
    """Distinct blobs referenced by the valid snapshots."""
    read_data: bool = False
    problems: list[str] = field(default_factory=list)
    """What makes a snapshot unrestorable, each naming the object."""
    warnings: list[str] = field(default_factory=list)
    """Objects under ``snapshots/`` that are not valid snapshots (skipped everywhere)."""
    bad: set[tuple[str, int]] = field(default_factory=set)
    """(pack, offset) of every blob found missing, short or corrupt."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "read_data": self.read_data, "snapshots": self.snapshots,
                "packs": self.packs, "blobs": self.blobs, "problems": len(self.problems),
                "first_problems": self.problems[:SHOWN], "warnings": self.warnings[:SHOWN]}


def check(remote: Remote, read_data: bool, pool: ThreadPoolExecutor) -> CheckReport:
    report = CheckReport(read_data=read_data)
    catalog = remote.catalog()
    refused = [str(exc) for exc in catalog.refused.values()]
    report.warnings = [s for s in catalog.skipped if s not in refused]
    report.problems.extend(refused)
    report.snapshots = len(catalog.manifests)
    sizes = remote.pack_sizes()
    report.packs = len(sizes)
    where: dict[tuple[str, int], ChunkRef] = {}
    users: dict[tuple[str, int], str] = {}
    for manifest in catalog.manifests:
        sid = manifest.snapshot.id
        parts = manifest.tree + manifest.patches
        if _structure(remote, sid, parts, sizes, report):
            continue  # its tree cannot be read: its blobs cannot be known
        try:
            tree = remote.tree(manifest)
        except S3SyncError as exc:
            report.problems.append(f"snapshot {sid}: {exc}")
            continue
        refs = [r for chunks in tree.chunks.values() for r in chunks]
        _structure(remote, sid, refs, sizes, report)
        for ref in (*parts, *refs):
            where.setdefault((ref.pack, ref.offset), ref)
            users.setdefault((ref.pack, ref.offset), sid)
    report.blobs = len(where)
    if read_data:
        readable = [r for k, r in where.items() if k not in report.bad]
        for bad in pool.map(lambda s: _verify(remote, s), plan(readable)):
            for ref, why in bad:
                report.bad.add((ref.pack, ref.offset))
                report.problems.append(
                    f"{remote.layout.pack(ref.pack)}: the blob at offset {ref.offset} "
                    f"({ref.hash[:16]}...) {why}; snapshot {users[(ref.pack, ref.offset)]} and "
                    "any other using it cannot be restored: push again to upload it anew")
    return report


def _structure(remote: Remote, sid: str, refs: Iterable[ChunkRef], sizes: dict[str, int],
               report: CheckReport) -> bool:
    """Record every ref whose pack is missing or too short; whether any was."""
    found = False
    for ref in refs:
        size = sizes.get(ref.pack)
        if size is not None and size >= ref.offset + ref.length:
            continue
        found = True
        if (ref.pack, ref.offset) in report.bad:
            continue
        report.bad.add((ref.pack, ref.offset))
        key = remote.layout.pack(ref.pack)
        why = "is missing" if size is None else (
            f"is {size} bytes long but must hold {ref.offset + ref.length}")
        report.problems.append(f"{key} {why}: snapshot {sid} cannot be restored; the next "
                               "push uploads that content again if the volume still has it")
    return found


def _verify(remote: Remote, span: Span) -> list[tuple[ChunkRef, str]]:
    key = remote.layout.pack(span.pack)
    try:
        data = remote.bucket.get(key, span.start, span.end)
    except ObjectMissing:
        return [(ref, "is missing") for ref in span.refs]
    except CorruptObject:
        return [(ref, "is cut short") for ref in span.refs]
    view = memoryview(data)
    bad: list[tuple[ChunkRef, str]] = []
    for ref in span.refs:
        try:
            remote.codec.open_blob(
                view[ref.offset - span.start:ref.offset - span.start + ref.length],
                ref.size, ref.hash)
        except TamperedObject as exc:
            bad.append((ref, f"is refused ({exc.cause}: {exc})"))
        except ValueError as exc:
            bad.append((ref, f"is corrupt ({exc})"))
    return bad
