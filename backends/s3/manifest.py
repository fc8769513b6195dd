"""Snapshot records, manifests and the tree they point to, as stored in the bucket.

A manifest is a small zstd-compressed JSON document naming the snapshot and listing its tree
parts.  The tree (every :class:`~backends.tree.Entry`, files with their blob list) is cut
into parts at content-defined boundaries (a hash of the entry's path), and each part is a
blob like file content, so unchanged parts are never uploaded again.  A push that changed
few entries writes only a *patch* (records set, paths deleted) on top of the previous
snapshot's parts; once patches grow past a share of the tree, the next push writes fresh
parts.  Everything read back is validated before use: paths stay inside the tree, every
entry's directory is in the tree, hard links point at files of the tree.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from backends.s3 import blobs
from backends.s3.errors import CorruptObject
from backends.tree import Entry

FORMAT = "pyvol-s3/1"
SNAPSHOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
PART_MASK = 31
"""A tree part ends after an entry whose path hash has these bits clear (~32 entries)."""
PART_MAX = 512
VOLATILE = ("ino", "ctime_ns", "ref")
"""Entry fields that only describe the local inode: kept out of the remote tree."""


class ChunkRef(NamedTuple):
    """Where one blob lives: ``length`` stored bytes at ``offset`` in pack ``pack``."""

    hash: str
    pack: str
    offset: int
    length: int
    size: int
    """Plain size; ``length < size`` means the stored bytes are zstd-compressed."""


@dataclass(frozen=True)
class RemoteSnapshot:
    id: str
    created: datetime
    size: int
    """Bytes of regular-file content (hard links counted once)."""
    files: int
    """Regular files (hard links counted once)."""
    uploaded_bytes: int
    """Bytes of packs the push that made this snapshot uploaded (its small manifest aside)."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["created"] = self.created.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RemoteSnapshot:
        return cls(**{**data, "created": datetime.fromisoformat(data["created"])})


@dataclass(frozen=True)
class Manifest:
    snapshot: RemoteSnapshot
    started: datetime
    """When the push began, on the store's clock (its lock's LastModified)."""
    tree: tuple[ChunkRef, ...]
    """Base parts of the tree."""
    patches: tuple[ChunkRef, ...] = ()
    """Patches applied to the base, in order (pushes that changed little write only these)."""


def new_snapshot_id(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%fZ")


def encode_manifest(manifest: Manifest) -> bytes:
    snap = manifest.snapshot
    doc = {
        "format": FORMAT, "id": snap.id, "created": snap.created.isoformat(),
        "started": manifest.started.isoformat(), "size": snap.size, "files": snap.files,
        "uploaded_bytes": snap.uploaded_bytes,
        "blobs": f"fastcdc({blobs.CHUNK_MIN},{blobs.CHUNK_AVG},{blobs.CHUNK_MAX})+blake3+zstd",
        "tree": [list(ref) for ref in manifest.tree],
        "patches": [list(ref) for ref in manifest.patches],
    }
    return blobs.compress(json.dumps(doc, separators=(",", ":")).encode())


def decode_manifest(data: bytes, where: str) -> Manifest:
    try:
        doc = json.loads(blobs.decompress(data, 1 << 30))
        if doc.get("format") != FORMAT:
            raise ValueError(f"unknown format {doc.get('format')!r}")
        snap = RemoteSnapshot(
            id=str(doc["id"]), created=_aware(doc["created"]), size=int(doc["size"]),
            files=int(doc["files"]), uploaded_bytes=int(doc["uploaded_bytes"]))
        if SNAPSHOT_ID.fullmatch(snap.id) is None:
            raise ValueError(f"bad snapshot id {snap.id!r}")
        return Manifest(snap, _aware(doc["started"]), tuple(_ref(r) for r in doc["tree"]),
                        tuple(_ref(r) for r in doc.get("patches", [])))
    except Exception as exc:
        raise CorruptObject(
            f"manifest {where} is unreadable ({exc}); restore another snapshot "
            "(list them) or push again to write a new one") from None


def _aware(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no timezone")
    return value


def _ref(raw: Sequence[Any]) -> ChunkRef:
    digest, pack, offset, length, size = raw
    if not (isinstance(digest, str) and isinstance(pack, str) and len(digest) == 64
            and all(isinstance(n, int) and n >= 0 for n in (offset, length, size))
            and 0 < length <= size):
        raise ValueError(f"bad blob reference {raw!r}")
    return ChunkRef(digest, pack, offset, length, size)


# -- the tree ----------------------------------------------------------------------------

def record_text(entry: Entry, chunks: Sequence[ChunkRef] | None) -> bytes:
    """One entry as stored: its JSON (local-only fields dropped, blob list as ``c``)."""
    record = {k: v for k, v in entry.to_json().items() if k not in VOLATILE}
    if chunks:
        record["c"] = [list(c) for c in chunks]
    return json.dumps(record, separators=(",", ":")).encode()


def split_parts(records: Sequence[tuple[str, bytes]]) -> list[bytes]:
    """Cut (path, record) pairs into JSON-array parts at path-defined boundaries."""
    parts: list[bytes] = []
    current: list[bytes] = []
    for path, text in records:
        current.append(text)
        if zlib.crc32(path.encode()) & PART_MASK == 0 or len(current) >= PART_MAX:
            parts.append(b"[" + b",".join(current) + b"]")
            current = []
    if current or not parts:
        parts.append(b"[" + b",".join(current) + b"]")
    return parts


def encode_patch(changed: Sequence[bytes], deleted: Sequence[str]) -> bytes:
    """A patch over the snapshot's base parts: records set (added or replaced), paths deleted."""
    return (b'{"set":[' + b",".join(changed) + b'],"del":'
            + json.dumps(list(deleted), separators=(",", ":")).encode() + b"}")


@dataclass(frozen=True)
class Tree:
    entries: list[Entry]
    """Directories first (parents before children), then other entries, hard links last."""
    chunks: dict[str, list[ChunkRef]]
    """Blob list of every ``file`` entry, by path."""
    texts: dict[str, bytes]
    """Each entry's stored record, by path (what a later push diffs against)."""
    patched: int = 0
    """Records set or deleted by the patches."""


def _order(record: dict[str, Any]) -> tuple[int, str]:
    path = str(record.get("path"))
    kind = record.get("kind")
    rank = -1 if path == "." else 0 if kind == "dir" else 2 if kind == "hardlink" else 1
    return rank, path


def parse_tree(parts: Sequence[bytes], patches: Sequence[bytes], snapshot_id: str) -> Tree:
    """Rebuild and validate the tree; raises :class:`CorruptObject` on anything unsafe."""
    entries: list[Entry] = []
    chunks: dict[str, list[ChunkRef]] = {}
    kinds: dict[str, str] = {}
    try:
        records: dict[str, dict[str, Any]] = {}
        patched = 0
        for part in parts:
            for record in json.loads(part):
                if record["path"] in records:
                    raise ValueError(f"repeated path {record['path']!r}")
                records[record["path"]] = record
        for patch in patches:
            doc = json.loads(patch)
            for path in doc["del"]:
                if records.pop(path, None) is None:
                    raise ValueError(f"a patch deletes {path!r}, which is not in the tree")
            for record in doc["set"]:
                records[record["path"]] = record
            patched += len(doc["del"]) + len(doc["set"])
        texts = {path: json.dumps(r, separators=(",", ":")).encode()
                 for path, r in records.items()}
        for record in sorted(records.values(), key=_order):
            raw_chunks = record.pop("c", [])
            entry = Entry.from_json(record)
            _check(entry, kinds)
            kinds[entry.path] = entry.kind
            entries.append(entry)
            if entry.kind == "file":
                refs = [_ref(c) for c in raw_chunks]
                if sum(r.size for r in refs) != entry.size:
                    raise ValueError(f"{entry.path!r}: blob sizes do not add up")
                chunks[entry.path] = refs
        if not entries:
            raise ValueError("the tree is empty")
    except Exception as exc:
        raise CorruptObject(
            f"snapshot {snapshot_id} has an invalid tree ({exc}); it will not be restored: "
            "restore another snapshot") from None
    return Tree(entries, chunks, texts, patched)


def _check(entry: Entry, kinds: dict[str, str]) -> None:
    path = entry.path
    if not kinds:
        if path != "." or entry.kind != "dir":
            raise ValueError("the tree does not start with its root directory")
        return
    parts = path.split("/")
    if (path in kinds or "\0" in path or any(p in ("", ".", "..") for p in parts)):
        raise ValueError(f"unsafe or repeated path {path!r}")
    parent = "/".join(parts[:-1]) or "."
    if kinds.get(parent) != "dir":
        raise ValueError(f"{path!r} is not inside a directory of the tree")
    if entry.kind == "hardlink" and kinds.get(entry.target or "") != "file":
        raise ValueError(f"hard link {path!r} does not point at a file of the tree")
    if entry.kind == "symlink" and not entry.target:
        raise ValueError(f"symlink {path!r} has no target")
