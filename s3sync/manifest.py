"""Snapshot records, manifests and the tree they point to, as stored in the bucket.

A manifest is a small zstd-compressed JSON document naming the snapshot and listing its tree
parts.  The tree (every :class:`~backends.tree.Entry`, files with their blob list) is cut
into parts at content-defined boundaries (a hash of the entry's path), and each part is a
blob like file content, so unchanged parts are never uploaded again.  A push that changed
few entries writes only a *patch* (records set, paths deleted) on top of the previous
snapshot's parts; once patches grow past a share of the tree, the next push writes fresh
parts.

What a restore accepts
----------------------
The bucket is hostile: whoever can write to it can forge any manifest, tree part or pack.  A
restore runs as root, so everything read back is validated against what a push can produce,
and a snapshot that breaks a rule is refused as a whole, naming the entry, before anything
is written.  Push and restore apply the same rules (:func:`pushable` on the way up):

* **records**: only the keys a push writes (path, kind, mode, uid, gid, mtime_ns, size,
  target, rdev, xattrs, c), each of its JSON type (integers are never booleans).
* **kinds**: dir, file, hardlink, symlink, fifo, socket.  Device nodes (chardev, blockdev) are
  never restored: a push leaves them out (with a logged warning) and a restore refuses them,
  so ``rdev`` is always 0.
* **mode**: permission bits only (0..0o7777), and no set-id bit that takes effect on exec:
  on anything but a directory, setuid together with any execute bit, or setgid together
  with group execute, is refused (the kernel applies them exactly then); a push clears those
  bits (logged), so an S3 copy never carries an executable setuid/setgid file.  Until the
  bucket is authenticated (encryption issue) a bucket writer must not be able to plant a
  setuid-root binary.  Inert combinations (setgid without group execute, the old
  mandatory-locking marker), setgid and sticky on directories are kept.
* **owner**: uid and gid in 0..2**32-2 (2**32-1 is chown's "no change").
* **xattrs**: only ``user.*`` and the POSIX ACLs ``system.posix_acl_access`` /
  ``system.posix_acl_default`` (they grant no more than mode bits can, and the kernel
  validates them); ``security.*`` (file capabilities, SELinux labels), ``trusted.*`` and other
  ``system.*`` names are dropped by a push and refused by a restore.  Names up to 255 bytes,
  values valid base64 of up to 64 KiB (the kernel's own limits), none on links (a push
  records a hard link's xattrs on its file).
* **sizes**: a file's size is the sum of its blob sizes; every other kind has size 0 and no
  blobs.  A blob is at most :data:`blobs.CHUNK_MAX` plain bytes and stored in at most that
  many (a push stores raw what does not compress) plus, in an encrypted store, what sealing
  adds (:func:`s3sync.crypto.overhead`), so memory per blob is bounded whatever the
  manifest declares; tree parts are at most :data:`TREE_PART_MAX`, manifests decompress to at
  most :data:`MANIFEST_MAX`.
* **names**: a path is ``/``-separated components, none empty, ``.`` or ``..``, none longer
  than NAME_MAX (255 bytes), no NUL; every entry's parent is a directory of the tree.
* **links**: a symlink target is any non-empty text without NUL up to 4095 bytes, created as
  a link and never followed; a hard link points at a file of the tree.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import stat
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from backends.tree import Entry
from s3sync import blobs
from s3sync.crypto import overhead
from s3sync.errors import CorruptObject

FORMAT = "pyvol-s3/1"
MANIFEST_MAX = 64 << 20
"""Most bytes a manifest may decompress to (a 10-million-entry tree needs about 40 MB)."""
TREE_PART_MAX = 64 << 20
"""Most plain bytes of one tree part or patch."""
NAME_MAX = 255
LINK_MAX = 4095
XATTR_MAX = 64 << 10
ID_MAX = (1 << 32) - 2
KINDS = frozenset({"dir", "file", "hardlink", "symlink", "fifo", "socket"})
"""Kinds a push records and a restore accepts: device nodes are neither."""
ACL_XATTRS = frozenset({"system.posix_acl_access", "system.posix_acl_default"})
RECORD_KEYS = {"path": str, "kind": str, "mode": int, "uid": int, "gid": int, "mtime_ns": int,
               "size": int, "target": str, "rdev": int, "xattrs": dict, "c": list}
HASH = re.compile(r"[0-9a-f]{64}")
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
    generation: int = 0
    """The lease generation it was pushed under (``lease.py``); 0 for a volume without one.
    A higher generation is always newer, whatever the clocks of the hosts say."""
    diverged: bool = False
    """Pushed by a host that had lost the lease: kept aside under ``diverged/``, never the
    volume's latest, restorable by id."""

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
        "uploaded_bytes": snap.uploaded_bytes, "generation": snap.generation,
        "blobs": f"fastcdc({blobs.CHUNK_MIN},{blobs.CHUNK_AVG},{blobs.CHUNK_MAX})+blake3+zstd",
        "tree": [list(ref) for ref in manifest.tree],
        "patches": [list(ref) for ref in manifest.patches],
    }
    return blobs.compress(json.dumps(doc, separators=(",", ":")).encode())


def decode_manifest(data: bytes, where: str) -> Manifest:
    try:
        doc = json.loads(blobs.decompress(data, MANIFEST_MAX))
        if doc.get("format") != FORMAT:
            raise ValueError(f"unknown format {doc.get('format')!r}")
        snap = RemoteSnapshot(
            id=str(doc["id"]), created=_aware(doc["created"]), size=int(doc["size"]),
            files=int(doc["files"]), uploaded_bytes=int(doc["uploaded_bytes"]),
            generation=_generation(doc.get("generation", 0)))
        if SNAPSHOT_ID.fullmatch(snap.id) is None:
            raise ValueError(f"bad snapshot id {snap.id!r}")
        return Manifest(snap, _aware(doc["started"]),
                        tuple(_ref(r, TREE_PART_MAX) for r in doc["tree"]),
                        tuple(_ref(r, TREE_PART_MAX) for r in doc.get("patches", [])))
    except Exception as exc:
        raise CorruptObject(
            f"manifest {where} is unreadable ({exc}); restore another snapshot "
            "(list them) or push again to write a new one") from None


def _generation(value: Any) -> int:
    if type(value) is not int or not 0 <= value < 1 << 53:
        raise ValueError(f"bad lease generation {str(value)[:40]!r}")
    return value


def _aware(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no timezone")
    return value


def _ref(raw: Sequence[Any], most: int = blobs.CHUNK_MAX) -> ChunkRef:
    """A blob reference as stored; refused unless a push could have written it: hashes and
    pack names are 64 hex digits, ``0 < length <= size <= most`` (plus what sealing adds to
    ``length`` in an encrypted store)."""
    if not isinstance(raw, list) or len(raw) != 5:
        raise ValueError(f"bad blob reference {str(raw)[:200]}")
    digest, pack, offset, length, size = raw
    if not (isinstance(digest, str) and isinstance(pack, str)
            and HASH.fullmatch(digest) and HASH.fullmatch(pack)
            and all(type(n) is int for n in (offset, length, size))
            and 0 <= offset < 1 << 62 and 0 < length <= size + overhead(size)):
        raise ValueError(f"bad blob reference {str(raw)[:200]}")
    if size > most:
        raise ValueError(f"blob {digest} declares {size} bytes, more than any push writes "
                         f"({most})")
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
                if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                    raise ValueError(f"a record is not an entry: {str(record)[:200]}")
                if record["path"] in records:
                    raise ValueError(f"repeated path {record['path']!r}")
                records[record["path"]] = record
        for patch in patches:
            doc = json.loads(patch)
            for path in doc["del"]:
                if records.pop(path, None) is None:
                    raise ValueError(f"a patch deletes {path!r}, which is not in the tree")
            for record in doc["set"]:
                if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                    raise ValueError(f"a record is not an entry: {str(record)[:200]}")
                records[record["path"]] = record
            patched += len(doc["del"]) + len(doc["set"])
        texts = {path: json.dumps(r, separators=(",", ":")).encode()
                 for path, r in records.items()}
        for record in sorted(records.values(), key=_order):
            _check_record(record)
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


def _check_record(record: dict[str, Any]) -> None:
    """Refuse a record a push cannot have written (see the module docstring's rules)."""
    path = record["path"]
    for key, value in record.items():
        want = RECORD_KEYS.get(key)
        if want is None:
            raise ValueError(f"entry {path!r} has an unknown field {key!r}")
        if type(value) is not want:
            raise ValueError(f"entry {path!r}: field {key!r} is not a {want.__name__}")
    kind = record.get("kind")
    if kind not in KINDS:
        raise ValueError(f"entry {path!r} is a {kind!r}: only {', '.join(sorted(KINDS))} "
                         "are restored (never device nodes)")
    mode = record.get("mode", 0)
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"entry {path!r} has mode {mode:#o}: only permission bits are allowed")
    if kind != "dir" and _setid(mode):
        raise ValueError(f"entry {path!r} has mode {mode:#o}: executable setuid/setgid "
                         "entries are never restored from S3")
    for key in ("uid", "gid"):
        if not 0 <= record.get(key, 0) <= ID_MAX:
            raise ValueError(f"entry {path!r} has an impossible {key} {record[key]}")
    if not -(1 << 63) <= record.get("mtime_ns", 0) < 1 << 63:
        raise ValueError(f"entry {path!r} has an impossible mtime")
    if record.get("rdev", 0) != 0:
        raise ValueError(f"entry {path!r} has device numbers: device nodes are never restored")
    size = record.get("size", 0)
    if size < 0 or (kind != "file" and size != 0):
        raise ValueError(f"entry {path!r} ({kind}) has an impossible size {size}")
    if kind != "file" and "c" in record:
        raise ValueError(f"entry {path!r} ({kind}) has content blobs")
    _check_name(path)
    target = record.get("target")
    if kind in ("symlink", "hardlink"):
        if not target or "\0" in target or len(_bytes(target)) > LINK_MAX:
            raise ValueError(f"{kind} {path!r} has an empty, too long or NUL-bearing target")
    elif target is not None:
        raise ValueError(f"entry {path!r} ({kind}) has a link target")
    xattrs = record.get("xattrs", {})
    if xattrs and kind in ("symlink", "hardlink"):
        raise ValueError(f"entry {path!r} ({kind}) carries xattrs")
    for name, value in xattrs.items():
        if not xattr_allowed(name):
            raise ValueError(f"entry {path!r} has xattr {name[:300]!r}: only user.* and POSIX "
                             "ACLs are restored from S3")
        if not isinstance(value, str) or len(value) > XATTR_MAX * 4 // 3 + 4:
            raise ValueError(f"entry {path!r}: xattr {name!r} has a bad or too long value")
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"entry {path!r}: xattr {name!r} is not base64") from None


def _bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(f"name {text[:300]!r} is not a file name") from None


def _check_name(path: str) -> None:
    if path == ".":
        return
    if "\0" in path:
        raise ValueError(f"entry {path[:300]!r} has a NUL in its name")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"unsafe path {path[:300]!r}")
        if len(_bytes(part)) > NAME_MAX:
            raise ValueError(f"entry {path[:300]!r} has a name longer than {NAME_MAX} bytes")


def _setid(mode: int) -> bool:
    """Whether exec of a file with ``mode`` would change its user or group id."""
    return bool((mode & stat.S_ISUID and mode & 0o111)
                or (mode & stat.S_ISGID and mode & stat.S_IXGRP))


def xattr_allowed(name: str) -> bool:
    """Whether an xattr is carried through S3: ``user.*`` and POSIX ACLs only."""
    return (((name.startswith("user.") and len(name) > 5) or name in ACL_XATTRS)
            and "\0" not in name and len(_bytes(name)) <= NAME_MAX)


def pushable(entry: Entry) -> Entry | None:
    """``entry`` as a push records it (the same rules a restore enforces): None for a device
    node; set-id bits that would act on exec cleared; xattrs outside ``user.*`` and the
    POSIX ACLs dropped."""
    if entry.kind not in KINDS:
        return None
    mode = entry.mode & 0o7777
    if entry.kind != "dir" and _setid(mode):
        mode &= ~(stat.S_ISUID | stat.S_ISGID)
    xattrs = entry.xattrs
    if xattrs and (entry.kind in ("symlink", "hardlink")
                   or any(not xattr_allowed(n) for n in xattrs)):
        xattrs = {} if entry.kind in ("symlink", "hardlink") else {
            n: v for n, v in xattrs.items() if xattr_allowed(n)}
    if mode == entry.mode and xattrs is entry.xattrs:
        return entry
    return replace(entry, mode=mode, xattrs=xattrs)
