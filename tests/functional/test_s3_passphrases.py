"""An encrypted store's keys against a real S3 API (moto): two hosts racing to create the
first master key end with one, and passphrases are added, listed and removed without
touching data."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from backends.tree import DirectoryView
from s3sync import S3SyncError, keyring
from s3sync.errors import KeyInUse, LastKey, NotEncrypted, WrongPassphrase
from tests.support.trees import contents

if TYPE_CHECKING:
    from s3_fixtures import MakeStore, MotoServer

pytest_plugins = ["s3_fixtures"]

PASSPHRASE = "first passphrase 51b2"
NEW = "second passphrase 8c0d"
ROUNDS = 8


def keys_in(client: Any, bucket: str, prefix: str) -> list[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("Contents", [])
    return sorted(o["Key"] for o in listed
                  if o["Key"].startswith(f"{prefix}/keys/") or o["Key"] == f"{prefix}/config")


def tree(root: Path, tag: str) -> Path:
    root.mkdir(parents=True)
    (root / "tag").write_text(tag)
    (root / "data").write_bytes(tag.encode() * 10_000)
    return root


def test_two_hosts_racing_the_first_push_end_with_one_master_key(
        make_store: MakeStore, moto: MotoServer, bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The hook makes the race happen: both hosts have written their key object before
    # either writes config, so one of them loses every round.
    real_put = keyring.BucketKeyring.put_config_if_absent
    barrier: list[threading.Barrier] = []

    def both_keys_first(self: keyring.BucketKeyring, blob: bytes) -> bool:
        if threading.current_thread().name.startswith("host-"):
            barrier[0].wait(60)
        return real_put(self, blob)

    monkeypatch.setattr(keyring.BucketKeyring, "put_config_if_absent", both_keys_first)
    client: Any = moto.client()
    for n in range(ROUNDS):
        prefix = f"race-{n}"
        barrier[:] = [threading.Barrier(2)]
        sources = [tree(tmp_path / f"src-{n}-{h}", f"round {n} host {h}") for h in "ab"]
        stores = [make_store(moto.url, bucket, tmp_path / f"cache-{n}-{h}", prefix=prefix,
                             passphrase=PASSPHRASE) for h in "ab"]
        failures: list[BaseException] = []

        def push(i: int, sources: list[Path] = sources, stores: list[Any] = stores,
                 failures: list[BaseException] = failures) -> None:
            try:
                stores[i].push(DirectoryView(sources[i]))
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=push, args=(i,), name=f"host-{i}") for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert failures == []
        found = keys_in(client, bucket, prefix)
        assert len(found) == 2 and f"{prefix}/config" in found, f"round {n}: {found}"

        reader = make_store(moto.url, bucket, tmp_path / f"cache-{n}-r", prefix=prefix,
                            passphrase=PASSPHRASE)
        snaps = reader.list()
        assert len(snaps) == 2
        restored = []
        for snap in snaps:
            dst = tmp_path / f"dst-{n}-{snap.id}"
            dst.mkdir()
            reader.restore(snap.id, dst)
            restored.append(contents(dst))
        assert sorted(map(str, restored)) == sorted(str(contents(s)) for s in sources)


def test_passphrases_are_added_listed_and_removed_without_touching_data(
        make_store: MakeStore, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client: Any = moto.client()
    src = tree(tmp_path / "src", "keys")
    old = make_store(moto.url, bucket, tmp_path / "c1", passphrase=PASSPHRASE)
    with pytest.raises(NotEncrypted, match="push first"):
        old.add_key(NEW)
    snap = old.push(DirectoryView(src))
    first = old.keys()
    assert [k.id for k in first.keys] == [first.current] and first.damaged == {}

    data_before = {k for k in (o["Key"] for o in client.list_objects_v2(
        Bucket=bucket).get("Contents", [])) if "/keys/" not in k}
    added = old.add_key(NEW)
    listing = old.keys()
    # Listed by creation time, to the second: two keys made in one second may come either way.
    assert sorted(k.id for k in listing.keys) == sorted([first.current, added.id])
    assert listing.current == first.current
    with pytest.raises(KeyInUse, match=f"key {first.current} is the one S3_PASSPHRASE opens"):
        old.remove_key(first.current)

    new = make_store(moto.url, bucket, tmp_path / "c2", passphrase=NEW)
    assert new.keys().current == added.id
    new.remove_key(first.current)
    with pytest.raises(KeyInUse):
        new.remove_key(added.id)
    data_after = {k for k in (o["Key"] for o in client.list_objects_v2(
        Bucket=bucket).get("Contents", [])) if "/keys/" not in k}
    assert data_after == data_before
    dst = tmp_path / "dst"
    dst.mkdir()
    new.restore(snap.id, dst)
    assert contents(dst) == contents(src)

    stale = make_store(moto.url, bucket, tmp_path / "c3", passphrase=PASSPHRASE)
    with pytest.raises(WrongPassphrase, match="opens none of its 1 keys"):
        stale.list()


def test_the_last_key_and_plain_stores(make_store: MakeStore, moto: MotoServer, bucket: str,
                                       tmp_path: Path) -> None:
    from s3sync import keys as keys_mod

    client: Any = moto.client()
    src = tree(tmp_path / "src", "last")
    store = make_store(moto.url, bucket, tmp_path / "c1", passphrase=PASSPHRASE)
    store.push(DirectoryView(src))
    ring = keyring.BucketKeyring(store._remote.bucket, store._remote.layout)
    with pytest.raises(LastKey, match="last usable key"):
        keys_mod.remove_key(ring, store.keys().current)

    plain = make_store(moto.url, bucket, tmp_path / "c2", prefix="other")
    plain.push(DirectoryView(src))
    with pytest.raises(NotEncrypted, match="not encrypted"):
        plain.keys()

    # A prefix holding only a config (its keys deleted) is still refused to a plain store.
    client.delete_object(Bucket=bucket, Key=f"vol/keys/{store.keys().current}")
    refused = make_store(moto.url, bucket, tmp_path / "c3")
    with pytest.raises(S3SyncError, match="is encrypted"):
        refused.push(DirectoryView(src))
    assert store.delete_all() > 0
    assert keys_in(client, bucket, "vol") == []


def test_concurrent_key_changes_lose_no_key(make_store: MakeStore, moto: MotoServer,
                                            bucket: str, tmp_path: Path) -> None:
    src = tree(tmp_path / "src", "concurrent")
    first = make_store(moto.url, bucket, tmp_path / "c1", passphrase=PASSPHRASE)
    first.push(DirectoryView(src))
    first.add_key(NEW)
    second = make_store(moto.url, bucket, tmp_path / "c2", passphrase=NEW)
    stores = [first, second, make_store(moto.url, bucket, tmp_path / "c3", passphrase=NEW)]

    def run(jobs: list[Any]) -> list[Any]:
        results: list[Any] = [None] * len(jobs)

        def one(i: int) -> None:
            try:
                results[i] = jobs[i]()
            except Exception as exc:
                results[i] = exc
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return results

    # Six adds at once from three stores (in one process they share a key lock; across hosts
    # each add is an object of its own, so none can overwrite another).
    added = run([lambda s=s, n=n: s.add_key(f"extra {n}") for n, s in enumerate(stores * 2)])
    assert all(not isinstance(a, Exception) for a in added), added
    ids = {k.id for k in first.keys().keys}
    assert {a.id for a in added} <= ids and len(ids) == 8

    # Each host removes every key but its own at once: both hosts' keys survive.
    current = {first.keys().current, second.keys().current}
    others = sorted(ids - current)
    results = run([lambda k=k, s=s: s.remove_key(k) for k in others for s in stores[:2]])
    assert all(r is None or "no key" in str(r) for r in results), results
    assert {k.id for k in first.keys().keys} == current
    for store in stores:
        dst = tmp_path / f"dst-{id(store)}"
        dst.mkdir()
        store.restore("latest", dst)
        assert contents(dst) == contents(src)


def test_planted_giants_in_keys_and_config_are_refused_unread(
        make_store: MakeStore, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    from s3sync.errors import BadKeyObject

    client: Any = moto.client()
    src = tree(tmp_path / "src", "giants")
    store = make_store(moto.url, bucket, tmp_path / "c1", passphrase=PASSPHRASE)
    store.push(DirectoryView(src))
    giant = "f" * 32
    client.put_object(Bucket=bucket, Key=f"vol/keys/{giant}", Body=b"{" * (8 << 20))
    assert store.keys().damaged == {
        giant: f"key object {giant} is unusable: 4097 bytes, more than a key object has (4096)"}
    client.put_object(Bucket=bucket, Key="vol/config", Body=b"x" * (8 << 20))
    other = make_store(moto.url, bucket, tmp_path / "c2", passphrase=PASSPHRASE)
    with pytest.raises(BadKeyObject, match=r"vol/config is 8388608 bytes, more than a config"):
        other.list()
