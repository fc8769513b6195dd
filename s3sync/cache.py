"""The local cache that makes an unchanged push cheap.

Per remote (endpoint, bucket, prefix) it keeps, in ``cache_dir/<hash>/``:

* ``files``: for each file path of the last push, its ``Entry.change_key()`` and blob list.
  A file whose change key still matches is neither read nor hashed again.
* the snapshot it last wrote or saw: a digest of each entry's record, its tree parts and
  patches, so the next push can write just a patch of what changed;
* ``manifests/<id>``: copies of manifests already fetched (they never change).

The cache is only a hint: every push drops entries whose packs the store no longer lists,
and a missing or unreadable cache just means reading and hashing everything once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from backends.fs import fsync_dir
from s3sync import blobs
from s3sync.manifest import SNAPSHOT_ID, ChunkRef

log = logging.getLogger(__name__)

VERSION = 3
ChangeKey = tuple[int, int, int, int]


class Cached(NamedTuple):
    """What the last push learnt about one file."""

    key: ChangeKey
    refs: list[ChunkRef]
    record: str
    """Digest of the file's stored record, valid while ``key`` still matches."""


@dataclass
class FileState:
    files: dict[str, Cached] = field(default_factory=dict)
    """Path -> change key, blob list and record digest, for every file of the last push."""
    snapshot: str = ""
    """The snapshot the fields below describe ("" when unknown)."""
    records: dict[str, str] = field(default_factory=dict)
    """Path -> digest of its stored record, for every entry of ``snapshot``."""
    tree: list[ChunkRef] = field(default_factory=list)
    patches: list[ChunkRef] = field(default_factory=list)
    patched: int = 0
    """Records written as patches since ``tree`` was written."""

    def drop_missing(self, packs: dict[str, int], bad: AbstractSet[tuple[str, int]] = frozenset()
                     ) -> int:
        """Forget every file or tree part stored where the store cannot serve it: in a pack
        it no longer lists, past the end of a pack (``packs``: id -> size), or at a place a
        check found corrupt (``bad``: (pack, offset))."""
        def usable(ref: ChunkRef) -> bool:
            return usable_ref(ref, packs, bad)
        gone = [path for path, cached in self.files.items()
                if not all(usable(r) for r in cached.refs)]
        for path in gone:
            del self.files[path]
        if not all(usable(r) for r in self.tree + self.patches):
            self.snapshot, self.records, self.tree, self.patches = "", {}, [], []
        return len(gone)

    def index(self) -> dict[str, ChunkRef]:
        """Blob hash -> where it is stored, for every blob this state knows."""
        known = {r.hash: r for cached in self.files.values() for r in cached.refs}
        known.update((r.hash, r) for r in self.tree + self.patches)
        return known


def usable_ref(ref: ChunkRef, packs: dict[str, int], bad: AbstractSet[tuple[str, int]]) -> bool:
    """Whether a push may deduplicate against ``ref``: its pack is listed, long enough, and
    no check found the blob bad."""
    size = packs.get(ref.pack)
    return size is not None and size >= ref.offset + ref.length and \
        (ref.pack, ref.offset) not in bad


class Cache:
    def __init__(self, cache_dir: Path, endpoint: str, bucket: str, prefix: str) -> None:
        name = hashlib.sha256(f"{endpoint}\0{bucket}\0{prefix}".encode()).hexdigest()[:24]
        self.root = cache_dir / name
        self._manifests = self.root / "manifests"

    def load(self) -> FileState:
        try:
            doc = json.loads(blobs.decompress((self.root / "files").read_bytes(), 1 << 31))
            if doc.get("version") != VERSION:
                return FileState()
            files = {path: Cached((k[0], k[1], k[2], k[3]), [ChunkRef(*r) for r in refs], d)
                     for path, (k, refs, d) in doc["files"].items()}
            return FileState(files, doc["snapshot"], doc["records"],
                             [ChunkRef(*r) for r in doc["tree"]],
                             [ChunkRef(*r) for r in doc["patches"]], doc["patched"])
        except FileNotFoundError:
            return FileState()
        except Exception as exc:
            log.warning("ignoring unreadable S3 sync cache %s (%s): files will be re-hashed",
                        self.root, exc)
            return FileState()

    def save(self, state: FileState) -> None:
        doc = {"version": VERSION,
               "files": {p: [list(c.key), [list(r) for r in c.refs], c.record]
                         for p, c in state.files.items()},
               "snapshot": state.snapshot, "records": state.records,
               "tree": [list(r) for r in state.tree],
               "patches": [list(r) for r in state.patches], "patched": state.patched}
        self._write(self.root / "files",
                    blobs.compress(json.dumps(doc, separators=(",", ":")).encode()))

    def bad(self) -> set[tuple[str, int]]:
        """(pack, offset) of the blobs the last data check found bad (see ``check.py``)."""
        try:
            return {(str(p), int(o)) for p, o in json.loads((self.root / "bad").read_bytes())}
        except FileNotFoundError:
            return set()
        except Exception as exc:
            log.warning("ignoring unreadable list of bad S3 blobs %s (%s)", self.root, exc)
            return set()

    def keep_bad(self, bad: Iterable[tuple[str, int]]) -> None:
        self._write(self.root / "bad", json.dumps(sorted(bad)).encode())

    def manifest(self, snapshot_id: str) -> bytes | None:
        if SNAPSHOT_ID.fullmatch(snapshot_id) is None:
            return None
        try:
            return (self._manifests / snapshot_id).read_bytes()
        except FileNotFoundError:
            return None

    def keep_manifest(self, snapshot_id: str, data: bytes) -> None:
        if SNAPSHOT_ID.fullmatch(snapshot_id) is not None:
            self._write(self._manifests / snapshot_id, data)

    def forget_manifests(self, keep: Iterable[str]) -> None:
        kept = set(keep)
        if self._manifests.is_dir():
            for path in self._manifests.iterdir():
                if path.name not in kept:
                    path.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
