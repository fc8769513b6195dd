"""The codec push, restore and check store content through: plain exactly as before, or
sealed, with the keyed id checked again after unsealing."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from s3sync import blobs, crypto
from s3sync.errors import TamperedObject
from s3sync.manifest import ChunkRef, Manifest, RemoteSnapshot, encode_manifest
from s3sync.sealing import PLAIN_IN_ENCRYPTED, Codec

NOW = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
SID = "20261202T030000.000000Z"


def manifest(sid: str = SID) -> Manifest:
    snap = RemoteSnapshot(id=sid, created=NOW, size=5, files=1, uploaded_bytes=5)
    return Manifest(snap, NOW, (ChunkRef("a" * 64, "b" * 64, 0, 10, 10),), ())


def test_a_plain_codec_writes_what_pyvol_always_wrote() -> None:
    codec, data = Codec(), b"hello " * 100
    assert not codec.encrypted
    assert codec.content_id(data) == blobs.digest(data)
    assert codec.store_blob(codec.content_id(data), data) == blobs.pack_form(data)
    assert codec.encode_manifest(manifest()) == encode_manifest(manifest())
    assert codec.decode_manifest(encode_manifest(manifest()), SID, "k") == manifest()


@pytest.mark.parametrize("data", [b"x" * 5000, os.urandom(5000)])  # compressed, and raw
def test_a_sealed_blob_opens_only_as_itself(data: bytes) -> None:
    codec = Codec(crypto.new_master())
    digest = codec.content_id(data)
    assert digest != blobs.digest(data)  # keyed
    stored = codec.store_blob(digest, data)
    assert data not in bytes(stored)
    assert codec.open_blob(stored, len(data), digest) == data
    with pytest.raises(TamperedObject) as err:
        codec.open_blob(stored, len(data), "0" * 64)
    assert err.value.cause == "wrong name"
    with pytest.raises(TamperedObject) as err:
        Codec(crypto.new_master()).open_blob(stored, len(data), digest)
    assert err.value.cause == "wrong key"


def test_a_blob_sealed_under_its_name_with_other_content_fails_the_keyed_id() -> None:
    master = crypto.new_master()
    codec = Codec(master)
    digest = codec.content_id(b"the real content")
    forged = crypto.seal(master, "blob", digest, b"other content!!!")
    with pytest.raises(ValueError, match="keyed id"):
        codec.open_blob(forged, 16, digest)


def test_a_sealed_manifest_is_bound_to_its_name_and_plain_ones_are_refused() -> None:
    codec = Codec(crypto.new_master())
    sealed = codec.encode_manifest(manifest())
    assert codec.decode_manifest(sealed, SID, "vol/snapshots/" + SID) == manifest()
    other = "20261202T030001.000000Z"
    with pytest.raises(TamperedObject, match="wrong name") as err:
        codec.decode_manifest(sealed, other, "vol/snapshots/" + other)
    assert str(err.value).startswith("vol/snapshots/" + other)
    with pytest.raises(TamperedObject, match=PLAIN_IN_ENCRYPTED):
        codec.decode_manifest(encode_manifest(manifest()), SID, "vol/snapshots/" + SID)
    assert "key" not in repr(codec).lower()
