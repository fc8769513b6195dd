"""Packing blobs and planning ranged reads (s3sync/packs.py, remote.plan)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest

from s3sync import blobs, packs
from s3sync.client import Bucket
from s3sync.layout import Layout
from s3sync.manifest import ChunkRef
from s3sync.packs import PackWriter
from s3sync.remote import plan


class FakeBucket:
    """Stores PUTs in memory; fails the n-th PUT if asked to."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.fail_at = fail_at
        self.puts = 0
        self._lock = threading.Lock()

    def put(self, key: str, body: bytes) -> None:
        with self._lock:
            self.puts += 1
            if self.puts == self.fail_at:
                raise OSError("injected upload failure")
            self.objects[key] = body


def writer(bucket: FakeBucket, pool: ThreadPoolExecutor,
           existing: set[str] | None = None) -> PackWriter:
    return PackWriter(cast(Bucket, bucket), Layout("vol"), pool, existing or set(), in_flight=2)


def add(w: PackWriter, data: bytes) -> ChunkRef:
    return w.add(blobs.digest(data), blobs.pack_form(data), len(data))


def read(bucket: FakeBucket, ref: ChunkRef) -> bytes:
    pack = bucket.objects[f"vol/data/{ref.pack}"]
    return blobs.unpack(pack[ref.offset:ref.offset + ref.length], ref.size, ref.hash)


def test_blobs_are_packed_and_packs_named_by_content(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs, "PACK_TARGET", 100_000)
    bucket = FakeBucket()
    contents = [os.urandom(30_000) for _ in range(10)] + [b"z" * 50_000]
    with ThreadPoolExecutor(4) as pool:
        w = writer(bucket, pool)
        refs = [add(w, data) for data in contents]
        w.finish()
        resolved = [w.resolve(r) for r in refs]
    assert all(r.pack.startswith("@") for r in refs)
    assert len(bucket.objects) == 3  # 4 + 4 + 3 blobs: packs close once past the target
    for key, body in bucket.objects.items():
        assert key == f"vol/data/{blobs.digest(body)}"
    assert [read(bucket, r) for r in resolved] == contents
    assert resolved[-1].length < resolved[-1].size  # the compressible one
    assert w.uploaded_bytes == sum(map(len, bucket.objects.values()))


def test_packs_already_in_the_store_are_not_uploaded_again() -> None:
    data = os.urandom(1000)
    first = FakeBucket()
    with ThreadPoolExecutor(2) as pool:
        w = writer(first, pool)
        add(w, data)
        w.finish()
        (key,) = first.objects
        again = FakeBucket()
        w2 = writer(again, pool, existing={Layout.tail(key, "vol/data/")})
        ref = add(w2, data)
        w2.finish()
    assert again.objects == {}
    assert w2.uploaded_bytes == 0 and w2.stored(ref)


def test_upload_failure_is_raised_and_marks_what_did_not_land(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs, "PACK_TARGET", 10_000)
    bucket = FakeBucket(fail_at=2)
    with ThreadPoolExecutor(1) as pool:
        w = writer(bucket, pool)
        refs = []
        with pytest.raises(OSError, match="injected"):
            for _ in range(20):
                refs.append(add(w, os.urandom(10_000)))
            w.finish()
        w.abort()
    landed = [r for r in refs if w.stored(r)]
    assert landed and len(landed) < len(refs)
    assert {f"vol/data/{w.resolve(r).pack}" for r in landed} <= set(bucket.objects)


def ref(pack: str, offset: int, length: int) -> ChunkRef:
    return ChunkRef("0" * 64, pack, offset, length, length)


def test_plan_merges_close_blobs_of_a_pack_and_keeps_first_use_order() -> None:
    refs = [ref("p2", 0, 10), ref("p1", 100, 10), ref("p1", 0, 50), ref("p1", 0, 50),
            ref("p1", 5_000_000, 10)]
    spans = plan(refs, gap=1000)
    assert [(s.pack, s.start, s.end) for s in spans] == [
        ("p2", 0, 10), ("p1", 0, 110), ("p1", 5_000_000, 5_000_010)]
    assert [len(s.refs) for s in spans] == [1, 2, 1]


def test_fake_bucket_matches_the_bucket_interface() -> None:
    assert callable(getattr(Bucket, "put", None))
    sig: Any = Bucket.put
    assert sig.__code__.co_varnames[:3] == ("self", "key", "body")


def test_sealed_blobs_are_sealed_in_the_upload_thread_where_their_refs_say(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from s3sync import crypto
    from s3sync.sealing import Codec
    monkeypatch.setattr(packs, "PACK_TARGET", 100_000)
    codec = Codec(crypto.new_master())
    bucket = FakeBucket()
    contents = [os.urandom(30_000) for _ in range(7)] + [b"z" * 50_000, b"short"]
    with ThreadPoolExecutor(4) as pool:
        w = PackWriter(cast(Bucket, bucket), Layout("vol"), pool, set(), in_flight=2,
                       codec=codec)
        refs = []
        for data in contents:
            digest = codec.content_id(data)
            refs.append(w.add(digest, blobs.pack_form(data), len(data)))
        w.finish()
        resolved = [w.resolve(r) for r in refs]
    assert len(bucket.objects) > 1
    assert w.uploaded_bytes == sum(len(o) for o in bucket.objects.values())
    for ref, data in zip(resolved, contents, strict=True):
        pack = bucket.objects[f"vol/data/{ref.pack}"]
        assert codec.open_blob(pack[ref.offset:ref.offset + ref.length], ref.size,
                               ref.hash) == data
