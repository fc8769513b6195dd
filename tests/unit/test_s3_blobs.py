"""Cutting, naming and storing blobs (s3sync/blobs.py)."""

from __future__ import annotations

import io
import os

import pytest

from s3sync import blobs


def cut_all(data: bytes) -> list[bytes]:
    return [bytes(piece) for piece in blobs.cut(io.BytesIO(data), len(data))]


def test_small_file_is_one_blob() -> None:
    data = os.urandom(blobs.CHUNK_MIN - 1)
    assert cut_all(data) == [data]


def test_empty_file_has_no_blobs() -> None:
    assert cut_all(b"") == []


def test_large_file_cut_within_bounds_and_reassembles() -> None:
    data = os.urandom(blobs.WINDOW * 2 + 12345)  # crosses read windows
    pieces = cut_all(data)
    assert b"".join(pieces) == data
    assert all(len(p) <= blobs.CHUNK_MAX for p in pieces)
    assert all(len(p) >= blobs.CHUNK_MIN for p in pieces[:-1])
    assert len(pieces) > (len(data) // blobs.CHUNK_MAX)


def test_cutting_does_not_depend_on_read_windows() -> None:
    """Cut points are a function of content only, so one file always yields the same blobs."""
    data = os.urandom(blobs.WINDOW + 3 * blobs.CHUNK_MAX)
    whole = list(blobs._chunker.cut_buf(data))
    assert [len(p) for p in cut_all(data)] == [c.length for c in whole]


def test_edit_in_one_region_changes_only_nearby_blobs() -> None:
    data = bytearray(os.urandom(32 << 20))
    before = {blobs.digest(p) for p in cut_all(bytes(data))}
    data[16 << 20:(16 << 20) + 1000] = os.urandom(1000)
    after = cut_all(bytes(data))
    new = [p for p in after if blobs.digest(p) not in before]
    assert 1 <= len(new) <= 2
    assert sum(map(len, new)) <= 2 * blobs.CHUNK_MAX


def test_insertion_shifts_only_nearby_blobs() -> None:
    """Content-defined cuts: bytes inserted mid-file do not change the blobs after them."""
    data = os.urandom(24 << 20)
    before = {blobs.digest(p) for p in cut_all(data)}
    edited = data[:10 << 20] + b"inserted!" + data[10 << 20:]
    after = cut_all(edited)
    new = [p for p in after if blobs.digest(p) not in before]
    assert 1 <= len(new) <= 2


def test_compressible_blob_is_stored_compressed_and_round_trips() -> None:
    data = b"pyvol " * 50_000
    stored = blobs.pack_form(data)
    assert len(stored) < len(data) // 10
    assert blobs.unpack(stored, len(data), blobs.digest(data)) == data


def test_random_blob_is_stored_raw() -> None:
    for size in (100, 10_000, 1 << 20):
        data = os.urandom(size)
        assert blobs.pack_form(data) is data


def test_mixed_blob_with_compressible_probe_regions_is_still_judged_whole() -> None:
    data = b"\0" * 8192 + os.urandom(200_000) + b"\0" * 8192
    stored = blobs.pack_form(data)
    # The probe says "compressible"; the full pass then keeps raw unless it saves 1/32.
    assert blobs.unpack(stored, len(data), blobs.digest(data)) == data


@pytest.mark.parametrize("damage", ["flip", "truncate", "wrong-size"])
def test_unpack_refuses_damaged_blobs(damage: str) -> None:
    for data in (os.urandom(5000), b"abc" * 5000):
        stored = bytearray(blobs.pack_form(data))
        size = len(data)
        if damage == "flip":
            stored[len(stored) // 2] ^= 0xFF
        elif damage == "truncate":
            del stored[-10:]
        else:
            size += 1
        with pytest.raises(ValueError):
            blobs.unpack(bytes(stored), size, blobs.digest(data))


def test_digest_is_blake3_hex() -> None:
    assert blobs.digest(b"") == ("af1349b9f5f9a1a6a0404dea36dcc949"
                                 "9bcb25c9adc112b7cc9a93cae41f3262")
    assert len(blobs.digest(os.urandom(10))) == 64
