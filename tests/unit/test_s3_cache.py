"""The local push cache (s3sync/cache.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from s3sync.cache import Cache, Cached, FileState
from s3sync.manifest import ChunkRef

A, B = "a" * 64, "b" * 64


def ref(h: str, pack: str) -> ChunkRef:
    return ChunkRef(h, pack, 0, 1, 1)


def state() -> FileState:
    return FileState({"x": Cached((1, 2, 3, 4), [ref(A, "p1")], "r1"),
                      "y": Cached((5, 6, 7, 8), [ref(B, "p2")], "r2")},
                     snapshot="20240101T000000.000000Z", records={"x": "d1", "y": "d2"},
                     tree=[ref("c" * 64, "p3")], patches=[ref("e" * 64, "p2")], patched=2)


def test_round_trip(tmp_path: Path) -> None:
    cache = Cache(tmp_path, "http://e", "b", "p")
    cache.save(state())
    assert Cache(tmp_path, "http://e", "b", "p").load() == state()
    assert not list(cache.root.glob(".*.tmp"))


def test_each_remote_has_its_own_cache(tmp_path: Path) -> None:
    Cache(tmp_path, "http://e", "b", "p").save(state())
    assert Cache(tmp_path, "http://e", "b", "other").load() == FileState()
    assert Cache(tmp_path, "http://other", "b", "p").load() == FileState()


def test_missing_or_unreadable_cache_is_empty(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(tmp_path, "", "b", "p")
    assert cache.load() == FileState()
    cache.root.mkdir(parents=True)
    (cache.root / "files").write_bytes(b"garbage")
    assert cache.load() == FileState()
    assert "unreadable S3 sync cache" in caplog.text


def test_drop_missing_forgets_files_in_lost_packs() -> None:
    s = state()
    assert s.drop_missing({"p1": 1, "p2": 1, "p3": 1}) == 0
    assert s == state()
    assert s.drop_missing({"p2": 1, "p3": 1}) == 1
    assert list(s.files) == ["y"]
    assert s.snapshot == "20240101T000000.000000Z"


def test_a_lost_tree_part_forgets_the_snapshot_description() -> None:
    s = state()
    s.drop_missing({"p1": 1, "p2": 1})
    assert (s.snapshot, s.records, s.tree, s.patches) == ("", {}, [], [])
    assert set(s.index()) == {A, B}


def test_short_packs_and_bad_blobs_are_not_deduplicated_against() -> None:
    s = state()
    assert s.drop_missing({"p1": 0, "p2": 1, "p3": 1}) == 1  # p1 cut short: x is lost
    assert list(s.files) == ["y"]
    s = state()
    assert s.drop_missing({"p1": 1, "p2": 1, "p3": 1}, {("p2", 0)}) == 1  # a check found it bad
    assert list(s.files) == ["x"]
    assert (s.snapshot, s.tree, s.patches) == ("", [], [])  # a patch sat in the bad place


def test_bad_blobs_are_remembered(tmp_path: Path) -> None:
    cache = Cache(tmp_path, "", "b", "p")
    assert cache.bad() == set()
    cache.keep_bad({("p1", 10), ("p2", 0)})
    assert Cache(tmp_path, "", "b", "p").bad() == {("p1", 10), ("p2", 0)}


def test_manifest_copies(tmp_path: Path) -> None:
    cache = Cache(tmp_path, "", "b", "p")
    assert cache.manifest("20240101T000000.000000Z") is None
    cache.keep_manifest("20240101T000000.000000Z", b"m1")
    cache.keep_manifest("20240102T000000.000000Z", b"m2")
    cache.keep_manifest("../escape", b"no")
    assert cache.manifest("20240101T000000.000000Z") == b"m1"
    assert cache.manifest("../escape") is None
    assert not (tmp_path / "escape").exists()
    cache.forget_manifests(["20240102T000000.000000Z"])
    assert cache.manifest("20240101T000000.000000Z") is None
    assert cache.manifest("20240102T000000.000000Z") == b"m2"
    cache.clear()
    assert not cache.root.exists()
