"""Sealed objects and keyed content ids (s3sync/crypto.py): every way a bucket object can be
forged, changed, cut, lengthened, swapped or replayed is refused with its name and cause."""

from __future__ import annotations

import base64
import os
import pickle

import blake3
import pytest

from s3sync import crypto
from s3sync.crypto import HEADER, SEGMENT, TAG, seal, unseal
from s3sync.errors import CorruptObject, TamperedObject

PINNED_OKM = ("c2f7cf5981df148f79cc8c28320248b0feb7f6bf8d03b1e5d2ed5f00d8db748be5e439bcf6"
              "e5ff99610035ec45c2242282c5ae5ab0bb2b07dfe082d23a849740897faa439ede270be976")

KEY_CHECK_AT = crypto.SALT
VERSION_AT = KEY_CHECK_AT + crypto.CHECK
KIND_AT = VERSION_AT + 1
NAME_CHECK_AT = KIND_AT + 1


@pytest.fixture
def master() -> crypto.Master:
    return crypto.new_master()


def refused(master: crypto.Master, sealed: crypto.Buffer, *, kind: crypto.Kind = "manifest",
            name: str = "snapshots/1") -> TamperedObject:
    with pytest.raises(TamperedObject) as info:
        unseal(master, kind, name, sealed)
    assert info.value.name == name
    assert f"{kind} object {name!r} refused ({info.value.cause})" in str(info.value)
    return info.value


def flipped(data: crypto.Buffer, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


# -- round trips --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 1000, SEGMENT - 1, SEGMENT, SEGMENT + 1,
                                  3 * SEGMENT + 5])
def test_round_trip_and_overhead(master: crypto.Master, size: int) -> None:
    data = os.urandom(size)
    sealed = seal(master, "blob", "ab" * 32, data)
    segments = max(1, -(-size // SEGMENT))
    assert len(sealed) == size + HEADER + segments * TAG
    assert unseal(master, "blob", "ab" * 32, sealed) == data


@pytest.mark.parametrize("kind", ["blob", "manifest", "index", "config", "lock"])
def test_every_kind_round_trips(master: crypto.Master, kind: crypto.Kind) -> None:
    assert unseal(master, kind, "x", seal(master, kind, "x", b"content")) == b"content"


def test_accepts_memoryview_and_bytearray(master: crypto.Master) -> None:
    data = bytearray(os.urandom(SEGMENT + 7))
    sealed = seal(master, "blob", "b", memoryview(data))
    assert unseal(master, "blob", "b", bytearray(sealed)) == data


def test_ciphertext_hides_plaintext_and_differs_each_time(master: crypto.Master) -> None:
    data = b"secret volume content " * 1000
    one, two = seal(master, "blob", "b", data), seal(master, "blob", "b", data)
    assert one != two
    assert b"secret volume content" not in one
    assert unseal(master, "blob", "b", one) == unseal(master, "blob", "b", two) == data


def test_unknown_kind_is_a_programming_error(master: crypto.Master) -> None:
    with pytest.raises(ValueError, match="unknown object kind 'pack'"):
        seal(master, "pack", "x", b"")  # type: ignore[arg-type]


# -- tampering: every byte region of the format ------------------------------------------

@pytest.mark.parametrize(("at", "cause"), [
    (0, "wrong key"),                     # salt: another object key
    (crypto.SALT - 1, "wrong key"),
    (KEY_CHECK_AT, "wrong key"),
    (VERSION_AT, "unknown format"),
    (KIND_AT, "wrong kind"),
    (NAME_CHECK_AT, "wrong name"),
    (HEADER, "modified"),                 # first ciphertext byte
    (HEADER + 500, "modified"),
    (-1, "modified"),                     # last tag byte
    (-TAG, "modified"),                   # first tag byte
])
def test_flipped_byte_is_refused(master: crypto.Master, at: int, cause: str) -> None:
    sealed = seal(master, "manifest", "snapshots/1", os.urandom(1000))
    assert refused(master, flipped(sealed, at)).cause == cause


def test_flipped_byte_in_a_middle_segment_names_it(master: crypto.Master) -> None:
    sealed = seal(master, "manifest", "snapshots/1", os.urandom(3 * SEGMENT))
    error = refused(master, flipped(sealed, HEADER + SEGMENT + TAG + 9))
    assert error.cause == "modified"
    assert "segment 2 of 3" in str(error)


def test_version_from_the_future_says_upgrade(master: crypto.Master) -> None:
    sealed = seal(master, "manifest", "snapshots/1", b"x")
    sealed[VERSION_AT] ^= 1 ^ 2
    error = refused(master, bytes(sealed))
    assert "format version 2" in str(error) and "upgrade pyvol" in str(error)


def test_unencrypted_object_is_not_a_sealed_one(master: crypto.Master) -> None:
    error = refused(master, b'{"v": 1, "files": []}' * 10)
    assert error.cause == "wrong key" and "unencrypted data" in str(error)


def test_no_header_byte_is_constant(master: crypto.Master) -> None:
    """Sealed blobs lie back to back in packs: a constant byte would mark where each starts
    (and so the run of blob lengths that fingerprints a known file)."""
    seals = [seal(master, "blob", "b", b"same") for _ in range(200)]
    constant = [i for i in range(HEADER) if len({s[i] for s in seals}) == 1]
    assert constant == []


# -- truncation and appending -------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 2, HEADER, HEADER + TAG - 1])
def test_cut_below_the_smallest_object(master: crypto.Master, keep: int) -> None:
    sealed = seal(master, "manifest", "snapshots/1", b"")
    assert refused(master, sealed[:keep]).cause == "truncated"


def test_cut_by_one_byte(master: crypto.Master) -> None:
    sealed = seal(master, "manifest", "snapshots/1", os.urandom(100))
    assert refused(master, sealed[:-1]).cause == "modified"


def test_cut_at_a_segment_boundary_is_truncation(master: crypto.Master) -> None:
    """The STREAM final flag: dropping whole trailing segments leaves valid segments, which
    must still be refused."""
    sealed = seal(master, "manifest", "snapshots/1", os.urandom(2 * SEGMENT + 10))
    for segments in (1, 2):
        error = refused(master, sealed[:HEADER + segments * (SEGMENT + TAG)])
        assert error.cause == "truncated"
        assert f"ends after segment {segments}" in str(error)


def test_cut_inside_the_last_segment(master: crypto.Master) -> None:
    sealed = seal(master, "manifest", "snapshots/1", os.urandom(SEGMENT + 1000))
    assert refused(master, sealed[:-500]).cause == "modified"


def test_appended_bytes(master: crypto.Master) -> None:
    sealed = seal(master, "manifest", "snapshots/1", os.urandom(100))
    assert refused(master, sealed + b"\x00").cause == "modified"


def test_appended_segment_after_a_full_final_one(master: crypto.Master) -> None:
    sealed = seal(master, "manifest", "snapshots/1", os.urandom(2 * SEGMENT))
    error = refused(master, sealed + os.urandom(TAG + 10))
    assert error.cause == "appended"


def test_reordered_segments(master: crypto.Master) -> None:
    sealed = seal(master, "manifest", "snapshots/1", os.urandom(3 * SEGMENT))
    stride = SEGMENT + TAG
    s0, s1 = sealed[HEADER:HEADER + stride], sealed[HEADER + stride:HEADER + 2 * stride]
    swapped = sealed[:HEADER] + s1 + s0 + sealed[HEADER + 2 * stride:]
    assert refused(master, swapped).cause == "modified"


def test_segment_spliced_from_another_object(master: crypto.Master) -> None:
    one = seal(master, "manifest", "snapshots/1", os.urandom(2 * SEGMENT))
    two = seal(master, "manifest", "snapshots/1", os.urandom(2 * SEGMENT))
    spliced = one[:HEADER + SEGMENT + TAG] + two[HEADER + SEGMENT + TAG:]
    assert refused(master, spliced).cause == "modified"


# -- swaps, replays and forgeries ---------------------------------------------------------

def test_objects_swapped_between_names(master: crypto.Master) -> None:
    first = seal(master, "manifest", "snapshots/1", b"first")
    second = seal(master, "manifest", "snapshots/2", b"second")
    assert refused(master, second, name="snapshots/1").cause == "wrong name"
    assert refused(master, first, name="snapshots/2").cause == "wrong name"


def test_replayed_under_another_name(master: crypto.Master) -> None:
    """A copy of a valid object under a new name (its original still in place) is refused."""
    blob_id = crypto.content_id(master, b"data")
    sealed = seal(master, "blob", blob_id, b"data")
    other = crypto.content_id(master, b"other data")
    assert refused(master, sealed, kind="blob", name=other).cause == "wrong name"


def test_kinds_swapped(master: crypto.Master) -> None:
    sealed = seal(master, "index", "snapshots/1", b"{}")
    error = refused(master, sealed)
    assert error.cause == "wrong kind"
    assert "its kind is 'index': swapped or replayed" in str(error)


def test_kind_byte_rewritten_to_pass_the_kind_check(master: crypto.Master) -> None:
    """The kind is bound into the name check and the AAD, not only stated in the header."""
    sealed = seal(master, "index", "snapshots/1", b"{}")
    sealed[KIND_AT] ^= crypto._KINDS["index"] ^ crypto._KINDS["manifest"]
    assert refused(master, bytes(sealed)).cause == "wrong name"


def test_name_check_forged_still_fails_authentication(master: crypto.Master) -> None:
    """The checks are diagnostics; the tags decide.  A header whose checks were copied from a
    genuine object of the right name still fails on the ciphertext of another."""
    genuine = seal(master, "manifest", "snapshots/1", b"genuine")
    other = seal(master, "manifest", "snapshots/2", b"forged!")
    forged = genuine[:HEADER] + other[HEADER:]
    assert refused(master, forged).cause == "modified"


def test_object_of_another_store(master: crypto.Master) -> None:
    other = crypto.new_master()
    sealed = seal(other, "manifest", "snapshots/1", b"theirs")
    assert refused(master, sealed).cause == "wrong key"


def test_forged_random_object(master: crypto.Master) -> None:
    assert refused(master, os.urandom(HEADER + 300)).cause == "wrong key"


def test_refusal_is_a_corrupt_object_error(master: crypto.Master) -> None:
    assert issubclass(TamperedObject, CorruptObject)


# -- nonces -------------------------------------------------------------------------------

def test_object_keys_never_repeat_over_many_seals(master: crypto.Master) -> None:
    """Nonce reuse needs two objects under one key: the per-object salts must all differ."""
    salts = {bytes(seal(master, "blob", "b", b"same")[:KEY_CHECK_AT])
             for _ in range(20_000)}
    assert len(salts) == 20_000


def test_segment_nonces_differ_within_an_object(master: crypto.Master) -> None:
    sealed = seal(master, "blob", "b", bytes(4 * SEGMENT))
    stride = SEGMENT + TAG
    segments = {bytes(sealed[HEADER + i * stride:HEADER + (i + 1) * stride]) for i in range(4)}
    assert len(segments) == 4


# -- keyed content ids --------------------------------------------------------------------

def test_content_id_is_keyed(master: crypto.Master) -> None:
    data = b"the same file in two buckets"
    mine = crypto.content_id(master, data)
    assert mine == crypto.content_id(master, bytearray(data))
    assert len(mine) == 64 and int(mine, 16) >= 0
    assert mine != crypto.content_id(crypto.new_master(), data)
    assert mine != blake3.blake3(data).hexdigest()
    assert mine != crypto.content_id(master, data + b"!")


# -- secrets ------------------------------------------------------------------------------

def secret_forms(raw: bytes) -> list[bytes]:
    return [raw, raw.hex().encode(), base64.b64encode(raw), repr(raw).encode()]


def test_master_never_shows_its_keys(master: crypto.Master) -> None:
    shown = (repr(master) + str(master) + f"{master}" + repr([master])).encode()
    for key in (master.enc_key, master.id_key):
        assert not any(form in shown for form in secret_forms(key))
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(master)


def test_refusals_carry_no_key_bytes(master: crypto.Master) -> None:
    sealed = seal(master, "manifest", "snapshots/1", os.urandom(2 * SEGMENT))
    offsets = (0, KEY_CHECK_AT, VERSION_AT, KIND_AT, NAME_CHECK_AT, HEADER, -1)
    tampered: list[crypto.Buffer] = [flipped(sealed, at) for at in offsets]
    tampered += [sealed[:10], sealed[:HEADER + SEGMENT + TAG], sealed + os.urandom(TAG + 1)]
    for data in tampered:
        error = refused(master, data)
        shown = (str(error) + repr(error) + repr(error.args)).encode()
        for key in (master.enc_key, master.id_key):
            assert not any(form in shown for form in secret_forms(key))


def test_master_equality_and_material(master: crypto.Master) -> None:
    again = crypto.Master.from_material(master.material())
    assert again == master
    assert again != crypto.new_master()
    with pytest.raises(ValueError, match="64 bytes"):
        crypto.Master.from_material(b"short")


@pytest.mark.parametrize(("kind", "name"), [("manifest", "snapshots/2"), ("index", "snapshots/1")])
def test_header_rewritten_with_valid_checks_fails_the_tags(master: crypto.Master,
                                                          kind: crypto.Kind, name: str) -> None:
    """Rewrite the header of an object sealed as (kind, name) so that its kind and checks are
    those of ("manifest", "snapshots/1") -- what only a key holder could do: the checks pass,
    and the tags (whose AAD covers the header and the name) still refuse it."""
    sealed = seal(master, kind, name, b"payload")
    key = crypto._ObjectKey(master, bytes(sealed[:crypto.SALT]))
    code = crypto._KINDS["manifest"]
    sealed[KIND_AT] = code ^ key.mask[1]
    sealed[NAME_CHECK_AT:HEADER] = key.name_check(code, b"snapshots/1")
    assert refused(master, bytes(sealed)).cause == "modified"


def test_blobs_sealed_one_by_one_open_from_ranges_of_a_pack(master: crypto.Master) -> None:
    """The intended use in packs: each blob sealed under its content id, packed back to back,
    and read back by (offset, length) as restore's ranged GETs do."""
    contents = [os.urandom(n) for n in (0, 100, SEGMENT + 3, 4096)]
    pack, refs = bytearray(), []
    for data in contents:
        blob_id = crypto.content_id(master, data)
        sealed = seal(master, "blob", blob_id, data)
        refs.append((blob_id, len(pack), len(sealed)))
        pack += sealed
    for data, (blob_id, offset, length) in zip(contents, refs, strict=True):
        assert unseal(master, "blob", blob_id, pack[offset:offset + length]) == data
    first_id, _, first_length = refs[1]
    assert refused(master, pack[refs[2][1]:refs[2][1] + first_length], kind="blob",
                   name=first_id).cause == "wrong name"


def test_object_keys_are_blake3_derive_key_of_the_encryption_key_and_salt() -> None:
    """Pinned bytes: the format depends on this derivation never changing (BLAKE3 derive_key,
    context "pyvol 2026-12-02 sealed object keys v1", material enc_key + salt)."""
    enc_key, salt = bytes(range(32)), bytes(range(32, 64))
    okm = crypto._object_okm(enc_key, salt)
    assert len(okm) == crypto.CHECK + 2 + 2 * crypto.KEY_BYTES
    assert okm == blake3.blake3(enc_key + salt, derive_key_context=(
        "pyvol 2026-12-02 sealed object keys v1")).digest(len(okm))
    assert okm.hex() == PINNED_OKM
    assert crypto._object_okm(enc_key, bytes(32)) != okm
