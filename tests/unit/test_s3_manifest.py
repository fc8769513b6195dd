"""Manifests, snapshot ids and the stored tree (s3sync/manifest.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from backends.tree import Entry
from s3sync import blobs
from s3sync.errors import CorruptObject
from s3sync.manifest import (
    SNAPSHOT_ID,
    ChunkRef,
    Manifest,
    RemoteSnapshot,
    decode_manifest,
    encode_manifest,
    encode_patch,
    new_snapshot_id,
    parse_tree,
    record_text,
    split_parts,
)

H = "ab" * 32
P = "cd" * 32


def snapshot(**kw: Any) -> RemoteSnapshot:
    base = {"id": "20240101T000000.000001Z",
            "created": datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
            "size": 10, "files": 2, "uploaded_bytes": 7}
    return RemoteSnapshot(**{**base, **kw})


def test_manifest_round_trips() -> None:
    m = Manifest(snapshot(), datetime(2024, 1, 1, tzinfo=UTC), (ChunkRef(H, P, 0, 5, 9),))
    data = encode_manifest(m)
    assert decode_manifest(data, "k") == m


@pytest.mark.parametrize("data", [b"", b"not zstd", blobs.compress(b"{}"),
                                  blobs.compress(b'{"format": "other/9"}')])
def test_unreadable_manifest_is_corrupt_object(data: bytes) -> None:
    with pytest.raises(CorruptObject, match="manifest k is unreadable"):
        decode_manifest(data, "k")


def test_remote_snapshot_json_round_trip() -> None:
    snap = snapshot()
    assert RemoteSnapshot.from_json(json.loads(json.dumps(snap.to_json()))) == snap


def test_snapshot_ids_sort_by_time_and_match_the_id_pattern() -> None:
    t = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    ids = [new_snapshot_id(t + timedelta(microseconds=n)) for n in (0, 1, 10**6, 10**9)]
    assert ids == sorted(ids)
    assert all(SNAPSHOT_ID.fullmatch(i) for i in ids)
    assert ids[0] == "20240506T070809.123456Z"


def entry(path: str, kind: str = "file", **kw: Any) -> Entry:
    return Entry(**{"path": path, "kind": kind, "mode": 0o644, "uid": 0, "gid": 0,  # type: ignore[arg-type]
                    "mtime_ns": 1, **kw})


def rec(e: Entry, chunks: list[ChunkRef] | None = None) -> tuple[str, bytes]:
    return e.path, record_text(e, chunks)


def records(n: int) -> list[tuple[str, bytes]]:
    out = [rec(entry(".", "dir"))]
    out += [rec(entry(f"f{i:05d}", size=1), [ChunkRef(H, P, i, 1, 1)]) for i in range(n)]
    return out


def test_parts_are_stable_under_an_insertion() -> None:
    """Content-defined part boundaries: one new entry changes at most two parts."""
    base = records(2000)
    inserted = rec(entry("f00999x", size=1), [ChunkRef(H, P, 0, 1, 1)])
    edited = [*base[:1000], inserted, *base[1000:]]
    before, after = set(split_parts(base)), split_parts(edited)
    assert len(before) > 20
    assert sum(part not in before for part in after) <= 2


def test_tree_round_trips_and_drops_volatile_fields() -> None:
    e = Entry(path="a", kind="file", mode=0o600, uid=5, gid=6, mtime_ns=7, size=3,
              ino=99, ctime_ns=100, xattrs={"user.k": "dg=="})
    recs = [rec(entry(".", "dir")), rec(e, [ChunkRef(H, P, 0, 3, 3)])]
    assert b"ino" not in recs[1][1] and b"ctime_ns" not in recs[1][1]
    tree = parse_tree(split_parts(recs), [], "s")
    assert tree.texts["a"] == recs[1][1]
    assert tree.entries[1] == Entry(path="a", kind="file", mode=0o600, uid=5, gid=6,
                                    mtime_ns=7, size=3, xattrs={"user.k": "dg=="})
    assert tree.chunks["a"] == [ChunkRef(H, P, 0, 3, 3)]


BAD_TREES: dict[str, list[dict[str, Any]]] = {
    "no root": [{"path": "a", "kind": "dir"}],
    "dot-dot": [{"path": ".", "kind": "dir"}, {"path": "../etc", "kind": "dir"}],
    "absolute": [{"path": ".", "kind": "dir"}, {"path": "/etc", "kind": "dir"}],
    "dot segment": [{"path": ".", "kind": "dir"}, {"path": "a/./b", "kind": "dir"}],
    "no directory": [{"path": ".", "kind": "dir"}, {"path": "d/f", "kind": "fifo"}],
    "duplicate": [{"path": ".", "kind": "dir"}, {"path": "f", "kind": "fifo"},
                  {"path": "f", "kind": "fifo"}],
    "under a file": [{"path": ".", "kind": "dir"}, {"path": "f", "kind": "fifo"},
                     {"path": "f/x", "kind": "fifo"}],
    "hardlink outside": [{"path": ".", "kind": "dir"},
                         {"path": "h", "kind": "hardlink", "target": "/etc/shadow"}],
    "hardlink to a dir": [{"path": ".", "kind": "dir"}, {"path": "d", "kind": "dir"},
                          {"path": "h", "kind": "hardlink", "target": "d"}],
    "sizes differ": [{"path": ".", "kind": "dir"},
                     {"path": "f", "kind": "file", "size": 5, "c": [[H, P, 0, 3, 3]]}],
    "bad ref": [{"path": ".", "kind": "dir"},
                {"path": "f", "kind": "file", "size": 3, "c": [["x", P, 0, 3, 3]]}],
    "unknown field": [{"path": ".", "kind": "dir", "evil": 1}],
}


@pytest.mark.parametrize("name", sorted(BAD_TREES))
def test_unsafe_trees_are_refused(name: str) -> None:
    part = json.dumps(BAD_TREES[name]).encode()
    with pytest.raises(CorruptObject, match="snapshot s1 has an invalid tree"):
        parse_tree([part], [], "s1")


def test_patches_set_and_delete_records_and_the_result_is_ordered_for_restore() -> None:
    base = [rec(entry(".", "dir")), rec(entry("d", "dir")), rec(entry("d/old", "fifo")),
            rec(entry("keep", size=1), [ChunkRef(H, P, 0, 1, 1)])]
    # Links come before their targets in scan order when names sort that way.
    patch = encode_patch([record_text(entry("a-link", "hardlink", target="z/new"), None),
                          record_text(entry("z", "dir"), None),
                          record_text(entry("z/new", size=2), [ChunkRef(H, P, 0, 2, 2)]),
                          record_text(entry("keep", size=3), [ChunkRef(H, P, 0, 3, 3)])],
                         ["d/old"])
    tree = parse_tree(split_parts(base), [patch], "s")
    assert [e.path for e in tree.entries] == [".", "d", "z", "keep", "z/new", "a-link"]
    assert tree.chunks["keep"] == [ChunkRef(H, P, 0, 3, 3)]
    assert tree.patched == 5
    assert "d/old" not in tree.texts


def test_a_patch_deleting_an_unknown_path_is_corrupt() -> None:
    with pytest.raises(CorruptObject, match="not in the tree"):
        parse_tree(split_parts([rec(entry(".", "dir"))]), [encode_patch([], ["ghost"])], "s")


def test_blob_references_larger_than_a_push_writes_are_refused() -> None:
    from s3sync.crypto import overhead
    from s3sync.manifest import _ref

    assert _ref([H, P, 0, 5, blobs.CHUNK_MAX]).size == blobs.CHUNK_MAX
    assert _ref([H, P, 0, 5 + overhead(5), 5]).length == 5 + overhead(5)  # a sealed blob
    for bad in ([H, P, 0, 5, blobs.CHUNK_MAX + 1], [H, P, 0, 6 + overhead(5), 5], [H, "x", 0, 5, 5],
                [H, P, -1, 5, 5], [H, P, True, 5, 5], [H, P, 0, 5]):
        with pytest.raises(ValueError):
            _ref(bad)


def test_a_zstd_frame_declaring_more_than_the_limit_is_refused_before_allocation() -> None:
    frame = blobs.compress(bytes(8 << 20))
    with pytest.raises(ValueError, match="declares"):
        blobs.decompress(frame, 1 << 20)
    with pytest.raises(ValueError, match="declares"):
        blobs.unpack(frame, 1 << 20, H)
    assert blobs.decompress(frame, 8 << 20) == bytes(8 << 20)


def test_push_records_only_what_a_restore_accepts() -> None:
    from s3sync.manifest import pushable

    assert pushable(entry("dev", "chardev", rdev=259)) is None
    kept = pushable(entry("bin", mode=0o4755, size=5, xattrs={"security.capability": "AA==",
                                                      "user.a": "AA==",
                                                      "system.posix_acl_access": "AA=="}))
    assert kept is not None
    assert kept.mode == 0o755
    assert kept.xattrs == {"user.a": "AA==", "system.posix_acl_access": "AA=="}
    assert pushable(entry("lock", mode=0o2644)) == entry("lock", mode=0o2644)
    assert pushable(entry("d", "dir", mode=0o3775)) == entry("d", "dir", mode=0o3775)
    line = record_text(kept, [ChunkRef(H, P, 0, 5, 5)])
    assert parse_tree([b"[" + record_text(entry(".", "dir"), None) + b"," + line + b"]"],
                      [], "s").entries[1] == kept
