"""keyring: the first master key is created once, whatever the interleaving of two creators;
only keys whose master opens the store's config count."""

from __future__ import annotations

import json

import pytest

from s3sync import crypto, keyring, keys
from s3sync.errors import BadKeyObject, ConditionalWriteUnsupported, WrongPassphrase
from tests.support.keystores import DictKeys

PASS = "correct horse battery staple"
WHERE = "s3://b, prefix vol/"


class DictRing(DictKeys):
    """A Keyring in memory, with an honest conditional write (or one that ignores it)."""

    def __init__(self, honest: bool = True) -> None:
        super().__init__()
        self.config: bytes | None = None
        self.honest = honest
        self.before_config: list[object] = []

    def config_object(self) -> bytes | None:
        return self.config

    def put_config_if_absent(self, blob: bytes) -> bool:
        if self.config is not None and self.honest:
            return False
        self.config = blob
        return True


@pytest.fixture(autouse=True)
def cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    cheap = keys.KdfCost(memory_kib=1024, iterations=1, lanes=1)
    real = keys.add_key
    monkeypatch.setattr(keys, "add_key", lambda store, master, passphrase, cost=cheap:
                        real(store, master, passphrase, cost))


def test_create_writes_one_key_and_a_config_that_its_master_opens() -> None:
    ring = DictRing()
    key_id, master = keyring.create(ring, PASS, WHERE)
    assert list(ring.objects) == [key_id]
    assert ring.config is not None and keyring.opens_config(master, ring.config, WHERE)
    assert not keyring.opens_config(crypto.new_master(), ring.config, WHERE)
    assert keyring.unlock(ring, PASS, WHERE) == (key_id, master)


def test_a_creator_that_loses_the_config_race_deletes_its_key_and_takes_the_winners() -> None:
    ring = DictRing()
    winner_id, winner = keyring.create(ring, PASS, WHERE)
    # The loser wrote its key before the winner's config landed; its config write fails.
    loser_id, loser = keyring.create(ring, PASS, WHERE)
    assert (loser_id, loser) == (winner_id, winner)
    assert list(ring.objects) == [winner_id]


def test_a_leftover_or_planted_key_that_the_passphrase_opens_is_skipped() -> None:
    ring = DictRing()
    key_id, master = keyring.create(ring, PASS, WHERE)
    planted_id = keys.add_key(ring, crypto.new_master(), PASS)  # newer: tried first
    assert keyring.unlock(ring, PASS, WHERE) == (key_id, master)
    ring.delete_key_object(key_id)
    with pytest.raises(WrongPassphrase, match=f"opens key.*{planted_id}.*another master"):
        keyring.unlock(ring, PASS, WHERE)


def test_a_crash_between_key_and_config_is_repaired_by_the_next_push_only() -> None:
    ring = DictRing()
    master = crypto.new_master()
    key_id = keys.add_key(ring, master, PASS)  # the creator died here
    assert keyring.unlock(ring, PASS, WHERE) == (key_id, master)
    assert ring.config is None  # a reader writes nothing
    assert keyring.unlock(ring, PASS, WHERE, write=True) == (key_id, master)
    assert ring.config is not None and keyring.opens_config(master, ring.config, WHERE)


def test_a_creator_keeps_its_key_when_an_opener_wrote_config_for_it() -> None:
    ring = DictRing()
    real_put = ring.put_config_if_absent

    def opener_first(blob: bytes) -> bool:
        # Between the creator's key and its config, another host's push repairs "the crash".
        ring.put_config_if_absent = real_put  # type: ignore[method-assign]
        keyring.unlock(ring, PASS, WHERE, write=True)
        return real_put(blob)

    ring.put_config_if_absent = opener_first  # type: ignore[method-assign]
    key_id, master = keyring.create(ring, PASS, WHERE)
    assert list(ring.objects) == [key_id]
    assert ring.config is not None and keyring.opens_config(master, ring.config, WHERE)


def test_an_endpoint_that_ignores_the_condition_is_named() -> None:
    ring = DictRing(honest=False)
    real_put = ring.put_config_if_absent

    def other_host_overwrites(blob: bytes) -> bool:
        real_put(blob)
        return real_put(keyring.seal_config(crypto.new_master()))

    ring.put_config_if_absent = other_host_overwrites  # type: ignore[method-assign]
    with pytest.raises(ConditionalWriteUnsupported, match="ignores conditional writes"):
        keyring.create(ring, PASS, WHERE)


def test_a_config_of_a_later_format_is_refused_by_name() -> None:
    master = crypto.new_master()
    blob = bytes(crypto.seal(master, "config", "config", json.dumps({"v": 2}).encode()))
    with pytest.raises(BadKeyObject, match=r"config has format version 2.*upgrade pyvol"):
        keyring.opens_config(master, blob, WHERE)
    blob = bytes(crypto.seal(master, "manifest", "config", json.dumps({"v": 1}).encode()))
    assert not keyring.opens_config(master, blob, WHERE)


def test_encrypted_sees_either_keys_or_a_config() -> None:
    ring = DictRing()
    assert not keyring.encrypted(ring)
    ring.config = b"x"
    assert keyring.encrypted(ring)
