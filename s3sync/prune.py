"""Prune: keep the newest N snapshots, then sweep data that none of them references.

Mark and sweep, with two safety rules against pushes running elsewhere:

* Manifests go first, then packs; a pack is deleted only if no kept snapshot references it,
  so a kept snapshot always stays restorable.
* The sweep runs only when no other client's push marker is live (``locks.py``); and even
  then it deletes only packs whose LastModified is older than the start of the newest kept
  snapshot's push (both on the store's clock), so packs a concurrent push has just uploaded
  are never taken.  Packs that only some kept blobs use are kept whole (no repacking).
"""

from __future__ import annotations

from dataclasses import dataclass

from s3sync.layout import Layout
from s3sync.locks import remote_lock
from s3sync.remote import Remote


@dataclass(frozen=True)
class PruneReport:
    removed: tuple[str, ...]
    """Ids of the snapshots deleted."""
    kept: tuple[str, ...]
    deleted_packs: int
    freed_bytes: int
    swept: bool
    """False when the sweep was skipped (another client's push is running)."""


def prune(remote: Remote, keep: int) -> PruneReport:
    if keep < 1:
        raise ValueError("prune keeps at least one snapshot; use delete_all to remove everything")
    bucket, layout = remote.bucket, remote.layout
    with remote_lock(bucket, layout, "prune") as held:
        ids = remote.snapshot_ids()
        removed, kept = ids[:-keep], ids[-keep:]
        bucket.delete([layout.snapshot(i) for i in removed])
        remote.cache.forget_manifests(kept)
        if not kept or held.running("push"):
            return PruneReport(tuple(removed), tuple(kept), 0, 0, False)
        manifests = remote.manifests(kept)
        used: set[str] = set()
        # Diverged snapshots are never pruned: their data stays restorable by id.
        for manifest in [*manifests, *remote.diverged()]:
            used.update(r.pack for r in manifest.tree + manifest.patches)
            tree = remote.tree(manifest)
            used.update(r.pack for refs in tree.chunks.values() for r in refs)
        cutoff = max(m.started for m in manifests)
        doomed = [o for o in bucket.list(layout.data) if layout.own_pack(o.key)
                  and Layout.tail(o.key, layout.data) not in used and o.modified < cutoff]
        bucket.delete([o.key for o in doomed])
        return PruneReport(tuple(removed), tuple(kept), len(doomed),
                           sum(o.size for o in doomed), True)
