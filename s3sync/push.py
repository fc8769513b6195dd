"""Push: upload what changed since the last push, then write the manifest, last.

Order of events, and why an interrupted push is harmless:

1. take the locks (``locks.py``) and list the store's snapshots and packs once;
2. drop cache entries whose packs are gone (the store lost them or a prune swept them);
3. walk the tree: a file whose ``change_key`` matches the cache reuses its blob list without
   being opened; any other file is read, cut and hashed, and only blobs the store does not
   already hold are packed and uploaded (in parallel);
4. diff every entry's record against the newest snapshot's: nothing changed means nothing is
   written and that snapshot is returned; a few changes are written as one patch; many
   (past a quarter of the tree) mean fresh tree parts, of which only changed ones upload;
5. wait for every upload, then PUT the manifest.  Until that PUT the new snapshot does not
   exist; the previous ones are untouched.  The local tree is only ever read.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

from backends.tree import Entry, TreeView
from s3sync import blobs
from s3sync.cache import Cached, FileState, usable_ref
from s3sync.errors import CorruptObject, LeaseLost, S3SyncError
from s3sync.locks import remote_lock
from s3sync.manifest import (
    ChunkRef,
    Manifest,
    RemoteSnapshot,
    Tree,
    encode_patch,
    new_snapshot_id,
    pushable,
    record_text,
    split_parts,
)
from s3sync.packs import PackWriter
from s3sync.remote import Remote
from s3sync.sealing import Codec

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
VANISHED = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)
PATCH_MIN = 1000
PATCH_SHARE = 4
"""A push writes a patch while patches hold at most max(PATCH_MIN, entries/PATCH_SHARE)."""
MAX_PATCHES = 32


class Fence(Protocol):
    """The lease a push is made under (``lease.Tenure`` is one): its generation goes into
    the snapshot, and ``confirm`` (raising :class:`LeaseLost`) is asked right before the
    snapshot is written: a push whose host lost the lease is kept aside as diverged."""

    @property
    def generation(self) -> int: ...

    def confirm(self) -> object: ...


def push(remote: Remote, view: TreeView, progress: Progress | None,
         pool: ThreadPoolExecutor, fence: Fence | None = None) -> RemoteSnapshot:
    bucket, layout = remote.bucket, remote.layout
    with remote_lock(bucket, layout, "push") as held:
        catalog = remote.catalog()
        # The cheap structural check of the dedup base: one LIST of data/ (sizes included)
        # and the blobs a data check found bad; nothing is deduplicated against a pack that
        # is gone or short, or against a bad blob.  Such content is uploaded again.
        sizes = remote.pack_sizes()
        bad = remote.cache.bad()
        packs = set(sizes) - {pack for pack, _ in bad}
        state = remote.cache.load()
        lost = state.drop_missing(sizes, bad)
        if lost:
            log.warning("%d cached files point at data missing from %s; uploading them again",
                        lost, remote.where)
        newest = catalog.latest
        index = state.index()
        if newest is None:
            state.snapshot, state.records, state.tree, state.patches = "", {}, [], []
        elif state.snapshot != newest.snapshot.id:
            # A new cache, or another host pushed since: learn the newest snapshot's tree, so
            # content it holds is not uploaded again and this push can be a patch over it.
            try:
                tree = remote.tree(newest)
            except CorruptObject as exc:
                log.warning("the newest snapshot in %s cannot be read (%s); writing a complete "
                            "new one instead of a patch over it", remote.where, exc)
                tree = Tree([], {}, {})
                newest_parts: tuple[ChunkRef, ...] = ()
            else:
                newest_parts = newest.tree + newest.patches
            index.update((r.hash, r) for refs in tree.chunks.values() for r in refs
                         if usable_ref(r, sizes, bad))
            index.update((r.hash, r) for r in newest_parts if usable_ref(r, sizes, bad))
            state.snapshot = newest.snapshot.id
            state.records = {p: _digest(t) for p, t in tree.texts.items()}
            state.tree = list(newest.tree) if newest_parts else []
            state.patches = list(newest.patches) if newest_parts else []
            state.patched = tree.patched

        writer = PackWriter(bucket, layout, pool, packs, in_flight=remote.workers,
                            codec=remote.codec)
        files: dict[str, Cached] = {}
        try:
            walked, size, count = _walk(view, state, index, writer, files, progress,
                                        remote.codec)
            writer.seal()
            digests, texts = _records(walked, writer)
            for path, cached in files.items():
                files[path] = cached._replace(record=digests[path])
            changed = [p for p, d in digests.items() if state.records.get(p) != d]
            deleted = [p for p in state.records if p not in digests]
            if newest is not None and not changed and not deleted:
                writer.finish()
                remote.cache.save(replace(state, files=_resolved(files, writer)))
                return newest.snapshot
            patched = state.patched + len(changed) + len(deleted)
            if newest is not None and len(state.patches) < MAX_PATCHES and \
                    patched <= max(PATCH_MIN, len(digests) // PATCH_SHARE):
                patch = encode_patch([texts(p) for p in changed], deleted)
                tree_refs = list(state.tree)
                patch_refs = [*state.patches, _add(patch, index, writer, remote.codec)]
            else:
                parts = split_parts([(p, texts(p)) for p in digests])
                tree_refs = [_add(part, index, writer, remote.codec) for part in parts]
                patch_refs, patched = [], 0
            writer.finish()
        except BaseException:
            writer.abort()
            _save_partial(remote, state, files, writer)
            raise

        created = datetime.now(UTC)
        if newest is not None and created <= newest.snapshot.created:
            created = newest.snapshot.created + timedelta(microseconds=1)
        diverged = False
        if fence is not None:
            try:
                fence.confirm()
            except LeaseLost as exc:
                diverged = True
                log.error("%s: this host lost the volume's lease (%s): the snapshot is kept "
                          "aside as diverged, never the volume's latest", remote.where, exc)
        snapshot = RemoteSnapshot(id=new_snapshot_id(created), created=created, size=size,
                                  files=count, uploaded_bytes=writer.uploaded_bytes,
                                  generation=fence.generation if fence is not None else 0,
                                  diverged=diverged)
        manifest = Manifest(snapshot, held.started, tuple(writer.resolve(r) for r in tree_refs),
                            tuple(writer.resolve(r) for r in patch_refs))
        data = remote.codec.encode_manifest(manifest)
        try:
            bucket.put(layout.snapshot(snapshot.id, diverged), data)
        except BaseException:
            _save_partial(remote, state, files, writer)
            raise
        if diverged:
            _save_partial(remote, state, files, writer)
            return snapshot
        remote.cache.keep_manifest(snapshot.id, data)
        remote.cache.save(FileState(_resolved(files, writer), snapshot.id, digests,
                                    list(manifest.tree), list(manifest.patches), patched))
        return snapshot


def _digest(text: bytes) -> str:
    return blobs.digest(text)[:32]


def _add(blob: bytes, index: dict[str, ChunkRef], writer: PackWriter, codec: Codec) -> ChunkRef:
    """Store a tree part or patch unless the store already has it."""
    digest = codec.content_id(blob)
    ref = index.get(digest)
    if ref is None:
        ref = index[digest] = writer.add(digest, blobs.pack_form(blob), len(blob))
    return ref


def _resolved(files: dict[str, Cached], writer: PackWriter) -> dict[str, Cached]:
    return {p: c._replace(refs=[writer.resolve(r) for r in c.refs]) for p, c in files.items()}


Walked = list[tuple[Entry, list[ChunkRef], str]]


def _records(walked: Walked, writer: PackWriter,
             ) -> tuple[dict[str, str], Callable[[str], bytes]]:
    """Digest of every entry's record (cached ones are not serialised again), and a way to
    get any record's text."""
    by_path: dict[str, tuple[Entry, list[ChunkRef]]] = {}
    texts: dict[str, bytes] = {}
    digests: dict[str, str] = {}
    for entry, refs, known in walked:
        by_path[entry.path] = (entry, refs)
        if known:
            digests[entry.path] = known
        else:
            serialised = record_text(entry, [writer.resolve(r) for r in refs])
            texts[entry.path] = serialised
            digests[entry.path] = _digest(serialised)

    def text(path: str) -> bytes:
        found = texts.get(path)
        if found is None:
            entry, refs = by_path[path]
            found = record_text(entry, [writer.resolve(r) for r in refs])
        return found
    return digests, text


def _walk(view: TreeView, state: FileState, index: dict[str, ChunkRef], writer: PackWriter,
          files: dict[str, Cached], progress: Progress | None,
          codec: Codec) -> tuple[Walked, int, int]:
    entries = _pushable(view.entries())
    total = sum(e.size for e in entries if e.kind == "file")
    done = size = count = 0
    vanished: set[str] = set()
    records: Walked = []
    for entry in entries:
        if entry.kind == "hardlink" and entry.target in vanished:
            continue
        if entry.kind != "file":
            records.append((entry, [], ""))
            continue
        key = entry.change_key()
        cached = state.files.get(entry.path)
        known = ""
        if cached is not None and cached.key == key:
            refs, known = cached.refs, cached.record
        else:
            try:
                refs = _read(view, entry, index, writer, codec)
            except OSError as exc:
                if exc.errno in VANISHED:
                    vanished.add(entry.path)  # deleted or replaced since the scan
                    continue
                raise S3SyncError(f"cannot read {entry.path!r} to upload it ({exc.strerror}); "
                                  "no snapshot was written: fix the file and push again"
                                  ) from None
        actual = sum(r.size for r in refs)
        if actual != entry.size:
            entry = replace(entry, size=actual)  # it changed while we read it
        files[entry.path] = Cached(key, refs, known)
        records.append((entry, refs, known))
        size += actual
        count += 1
        done += entry.size
        if progress is not None:
            progress(min(done, total), total)
    if progress is not None:
        progress(total, total)
    return records, size, count


def _pushable(entries: Sequence[Entry]) -> list[Entry]:
    """The entries as a push records them: what a restore accepts (``manifest`` rules)."""
    out: list[Entry] = []
    devices = changed = 0
    for entry in entries:
        kept = pushable(entry)
        if kept is None:
            devices += 1
        else:
            changed += kept is not entry
            out.append(kept)
    if devices:
        log.warning("leaving %d device node(s) out of the S3 snapshot: a restore never creates "
                    "device nodes", devices)
    if changed:
        log.warning("%d entries lose setuid/setgid bits or xattrs outside user.* in the S3 "
                    "snapshot: a restore never applies them", changed)
    return out


def _read(view: TreeView, entry: Entry, index: dict[str, ChunkRef],
          writer: PackWriter, codec: Codec) -> list[ChunkRef]:
    refs: list[ChunkRef] = []
    with view.open(entry) as stream:
        for piece in blobs.cut(stream, entry.size):
            digest = codec.content_id(piece)
            ref = index.get(digest)
            if ref is None:
                ref = index[digest] = writer.add(digest, blobs.pack_form(piece),
                                                 len(piece))
            refs.append(ref)
    return refs


def _save_partial(remote: Remote, state: FileState, files: dict[str, Cached],
                  writer: PackWriter) -> None:
    """Remember the files whose blobs did reach the store, so a retry skips them."""
    kept = dict(state.files)
    for path, cached in files.items():
        if all(writer.stored(r) for r in cached.refs):
            kept[path] = cached._replace(refs=[writer.resolve(r) for r in cached.refs])
    try:
        remote.cache.save(replace(state, files=kept))
    except OSError as exc:
        log.warning("could not save the S3 sync cache after a failed push: %s", exc)
