"""Key objects (s3sync/keys.py): the master key wrapped under each passphrase; add, list and
remove passphrases without touching data; the last key is never removed."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from s3sync import crypto, keys
from s3sync.errors import BadKeyObject, LastKey, WrongPassphrase
from tests.support.keystores import DictKeys

CHEAP = keys.KdfCost(memory_kib=1024, iterations=1, lanes=1)
"""Tests run the real KDF at a low cost; one test uses the default."""
PASS = "correct horse battery staple"
OTHER = "another passphrase entirely"


@pytest.fixture
def master() -> crypto.Master:
    return crypto.new_master()


def edited(blob: bytes, **changes: object) -> bytes:
    fields = json.loads(blob)
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


# -- wrap and unwrap ----------------------------------------------------------------------

def test_round_trip_at_the_default_cost(master: crypto.Master) -> None:
    key_id, blob = keys.wrap(master, PASS)
    fields = json.loads(blob)
    assert fields["v"] == 1 and fields["kdf"] == "argon2id" and fields["id"] == key_id
    assert (fields["memory_kib"], fields["iterations"], fields["lanes"]) == (65536, 4, 4)
    assert keys.unwrap(blob, PASS, key_id) == master


def test_wrong_passphrase(master: crypto.Master) -> None:
    key_id, blob = keys.wrap(master, PASS, cost=CHEAP)
    with pytest.raises(WrongPassphrase, match=f"key {key_id} does not open"):
        keys.unwrap(blob, OTHER, key_id)


def test_passphrase_is_unicode_normalised(master: crypto.Master) -> None:
    """The same passphrase typed on two systems (composed vs decomposed é) opens the key."""
    key_id, blob = keys.wrap(master, "caf\u00e9", cost=CHEAP)
    assert keys.unwrap(blob, "cafe\u0301", key_id) == master
    assert keys.unwrap(blob, "caf\u00e9".encode(), key_id) == master


def test_empty_passphrase_is_refused(master: crypto.Master) -> None:
    with pytest.raises(ValueError, match="empty"):
        keys.wrap(master, "", cost=CHEAP)


def test_two_wraps_are_two_keys(master: crypto.Master) -> None:
    first_id, first = keys.wrap(master, PASS, cost=CHEAP)
    second_id, second = keys.wrap(master, PASS, cost=CHEAP)
    assert first_id != second_id
    assert json.loads(first)["salt"] != json.loads(second)["salt"]
    assert keys.unwrap(first, PASS, first_id) == keys.unwrap(second, PASS, second_id) == master


# -- corrupted, forged and renamed key objects --------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    ({"v": 2}, "format version 2; this pyvol reads version 1"),
    ({"v": True}, "format version True"),
    ({"kdf": "scrypt"}, "KDF 'scrypt'"),
    ({"extra": 1}, "fields"),
    ({"nonce": None}, "fields"),
    ({"memory_kib": 1 << 30}, "outside"),      # a forged cost would exhaust the host
    ({"iterations": 1000}, "outside"),
    ({"lanes": "4"}, "three integers"),
    ({"salt": "!!!"}, "malformed"),
    ({"created": "yesterday"}, "malformed"),
    ({"wrapped": base64.b64encode(b"short").decode()}, "wrong length"),
])
def test_malformed_key_object(master: crypto.Master, change: dict[str, object],
                              message: str) -> None:
    key_id, blob = keys.wrap(master, PASS, cost=CHEAP)
    with pytest.raises(BadKeyObject, match=f"key object {key_id} is unusable") as info:
        keys.unwrap(edited(blob, **change), PASS, key_id)
    assert message in str(info.value)


@pytest.mark.parametrize("damage", [
    lambda b: b[:len(b) // 2],
    lambda b: b"",
    lambda b: b"\xff" * 40,
    lambda b: b"[1, 2]",
    lambda b: b" " * 5000,
])
def test_unreadable_key_object(master: crypto.Master, damage: Callable[[bytes], bytes]) -> None:
    key_id, blob = keys.wrap(master, PASS, cost=CHEAP)
    with pytest.raises(BadKeyObject, match=f"key object {key_id} is unusable"):
        keys.unwrap(damage(blob), PASS, key_id)


def test_renamed_key_object(master: crypto.Master) -> None:
    key_id, blob = keys.wrap(master, PASS, cost=CHEAP)
    with pytest.raises(BadKeyObject, match=f"holds key '{key_id}': renamed or replayed"):
        keys.unwrap(blob, PASS, "0" * 32)


@pytest.mark.parametrize("change", [
    {"created": "2020-01-01T00:00:00Z"},       # authenticated metadata
    {"memory_kib": 2048},                      # another cost: another wrapping key
    {"salt": base64.b64encode(bytes(16)).decode()},
    {"nonce": base64.b64encode(bytes(12)).decode()},
])
def test_modified_fields_fail_authentication(master: crypto.Master,
                                             change: dict[str, object]) -> None:
    key_id, blob = keys.wrap(master, PASS, cost=CHEAP)
    with pytest.raises(WrongPassphrase):
        keys.unwrap(edited(blob, **change), PASS, key_id)


def test_modified_wrapped_key_fails_authentication(master: crypto.Master) -> None:
    key_id, blob = keys.wrap(master, PASS, cost=CHEAP)
    wrapped = bytearray(base64.b64decode(json.loads(blob)["wrapped"]))
    wrapped[0] ^= 1
    with pytest.raises(WrongPassphrase):
        keys.unwrap(edited(blob, wrapped=base64.b64encode(wrapped).decode()), PASS, key_id)


def test_describe_reads_the_public_part(master: crypto.Master) -> None:
    when = datetime(2026, 12, 2, 2, 20, tzinfo=UTC)
    key_id, blob = keys.wrap(master, PASS, cost=CHEAP, now=when)
    assert keys.describe(blob, key_id) == keys.KeyInfo(key_id, when, CHEAP)


# -- unlock: picking the key among several ------------------------------------------------

def test_unlock_by_either_passphrase(master: crypto.Master) -> None:
    first_id, first = keys.wrap(master, PASS, cost=CHEAP)
    second_id, second = keys.wrap(master, OTHER, cost=CHEAP)
    objects = {first_id: first, second_id: second}
    assert keys.unlock(objects, PASS, "volume db") == (first_id, master)
    assert keys.unlock(objects, OTHER, "volume db") == (second_id, master)


def test_unlock_with_a_wrong_passphrase_names_the_store(master: crypto.Master) -> None:
    objects = dict([keys.wrap(master, PASS, cost=CHEAP), keys.wrap(master, OTHER, cost=CHEAP)])
    with pytest.raises(WrongPassphrase,
                       match=r"volume db: the passphrase opens none of its 2 keys$"):
        keys.unlock(objects, "wrong", "volume db")


@pytest.mark.parametrize("passphrase", [None, ""])
def test_unlock_without_a_passphrase(master: crypto.Master, passphrase: str | None) -> None:
    objects = dict([keys.wrap(master, PASS, cost=CHEAP)])
    with pytest.raises(WrongPassphrase, match="volume db is encrypted and no passphrase"):
        keys.unlock(objects, passphrase, "volume db")


def test_unlock_skips_damaged_keys_and_lists_them(master: crypto.Master) -> None:
    good_id, good = keys.wrap(master, PASS, cost=CHEAP)
    bad_id, _ = keys.wrap(master, OTHER, cost=CHEAP)
    objects = {good_id: good, bad_id: b"garbage"}
    assert keys.unlock(objects, PASS, "volume db") == (good_id, master)
    with pytest.raises(WrongPassphrase, match=f"damaged and skipped: key object {bad_id}"):
        keys.unlock(objects, OTHER, "volume db")


def test_unlock_with_only_damaged_keys() -> None:
    with pytest.raises(BadKeyObject, match="volume db has no usable key object: key object a"):
        keys.unlock({"a": b"{}"}, PASS, "volume db")


def test_unlock_of_a_store_without_keys() -> None:
    with pytest.raises(BadKeyObject, match="volume db has no key objects"):
        keys.unlock({}, PASS, "volume db")


def test_unlock_bounds_the_work_a_bucket_can_ask_for() -> None:
    objects = {f"{i:032x}": b"{}" for i in range(keys.MAX_KEYS + 1)}
    with pytest.raises(BadKeyObject, match=f"{keys.MAX_KEYS + 1} key objects, more than"):
        keys.unlock(objects, PASS, "volume db")


def test_key_object_of_another_master_is_its_own_master(master: crypto.Master) -> None:
    """unlock returns the master the passphrase opens; whether it is this store's is checked
    by the first object it unseals (its key check)."""
    other = crypto.new_master()
    objects = dict([keys.wrap(other, PASS, cost=CHEAP)])
    _, found = keys.unlock(objects, PASS, "volume db")
    assert found == other != master


# -- add, list, remove --------------------------------------------------------------------

def test_add_list_remove(master: crypto.Master) -> None:
    store = DictKeys()
    first = keys.add_key(store, master, PASS, cost=CHEAP)
    second = keys.add_key(store, master, OTHER, cost=CHEAP)
    listing = keys.list_keys(store)
    assert {k.id for k in listing.keys} == {first, second} and listing.damaged == {}
    assert all(k.cost == CHEAP for k in listing.keys)

    keys.remove_key(store, first)
    assert [k.id for k in keys.list_keys(store).keys] == [second]
    with pytest.raises(WrongPassphrase):
        keys.unlock(store.key_objects(), PASS, "volume db")
    assert keys.unlock(store.key_objects(), OTHER, "volume db") == (second, master)


def test_removing_the_last_key_is_refused(master: crypto.Master) -> None:
    store = DictKeys()
    only = keys.add_key(store, master, PASS, cost=CHEAP)
    before = store.key_objects()
    with pytest.raises(LastKey, match=f"key {only} is the last usable key; add another"):
        keys.remove_key(store, only)
    assert store.key_objects() == before


def test_damaged_keys_do_not_count_as_remaining(master: crypto.Master) -> None:
    store = DictKeys()
    good = keys.add_key(store, master, PASS, cost=CHEAP)
    store.put_key_object("f" * 32, b"garbage")
    assert list(keys.list_keys(store).damaged) == ["f" * 32]
    with pytest.raises(LastKey):
        keys.remove_key(store, good)
    keys.remove_key(store, "f" * 32)
    assert list(store.key_objects()) == [good]


def test_removing_an_unknown_key(master: crypto.Master) -> None:
    store = DictKeys()
    good = keys.add_key(store, master, PASS, cost=CHEAP)
    with pytest.raises(BadKeyObject, match=f"no key {'0' * 32}; keys: {good}"):
        keys.remove_key(store, "0" * 32)


# -- secrets ------------------------------------------------------------------------------

def secret_forms(raw: bytes) -> list[bytes]:
    return [raw, raw.hex().encode(), base64.b64encode(raw), repr(raw).encode()]


def test_no_secret_in_objects_listings_or_errors(master: crypto.Master) -> None:
    store = DictKeys()
    key_id = keys.add_key(store, master, PASS, cost=CHEAP)
    blob = store.objects[key_id]
    shown = [blob, repr(keys.list_keys(store)).encode()]
    failures: list[Exception] = []
    attempts: list[Callable[[], object]] = [
        lambda: keys.unwrap(blob, OTHER, key_id),
        lambda: keys.unwrap(edited(blob, v=2), PASS, key_id),
        lambda: keys.unwrap(blob, PASS, "0" * 32),
        lambda: keys.unlock({key_id: blob}, OTHER, "volume db"),
        lambda: keys.unlock({key_id: blob, "x": b"{}"}, OTHER, "volume db"),
        lambda: keys.remove_key(store, key_id),
    ]
    for attempt in attempts:
        with pytest.raises((WrongPassphrase, BadKeyObject, LastKey)) as info:
            attempt()
        failures.append(info.value)
    shown += [(str(e) + repr(e)).encode() for e in failures]
    secrets = [PASS.encode(), OTHER.encode(), master.enc_key, master.id_key,
               master.material()]
    for text in shown:
        for secret in secrets:
            assert not any(form in text for form in secret_forms(secret))
