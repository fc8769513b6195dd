"""Encrypted stores against a real S3 API (moto): round trips, passphrases, and every way a
bucket writer without the key can tamper, each refused by name and reported by ``verify``."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from backends.tree import DirectoryView
from s3sync import CorruptObject, S3SyncError
from s3sync.errors import TamperedObject, WrongPassphrase
from s3sync.manifest import new_snapshot_id
from tests.support.trees import contents

if TYPE_CHECKING:
    from s3_fixtures import MakeStore, MotoServer

pytest_plugins = ["s3_fixtures"]

PASSPHRASE = "correct horse battery staple 7f3a"
MARKER = b"pyvol-plaintext-marker-5c1e"
SECRET_NAME = "payroll-2026-confidential.txt"


def objects(client: Any, bucket: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listed}


def put(client: Any, bucket: str, key: str, body: bytes) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=body)


def keys_under(client: Any, bucket: str, folder: str) -> list[str]:
    return sorted(k for k in objects(client, bucket) if k.startswith(folder))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / SECRET_NAME).write_bytes(b"salary table " * 5000 + MARKER)
    # Incompressible, so a plain store keeps it (and the marker) raw.
    (root / "random.bin").write_bytes(os.urandom(1 << 20) + MARKER + os.urandom(3 << 20))
    for i in range(5):
        (root / "sub" / f"f{i}").write_bytes(os.urandom(1000 + i))
    return root


def restore_into(store: Any, tmp_path: Path, name: str, snapshot: str = "latest") -> Path:
    dst = tmp_path / name
    dst.mkdir()
    store.restore(snapshot, dst)
    return dst


def test_encrypted_round_trip_and_a_second_host_with_the_passphrase(
        make_store: MakeStore, moto: MotoServer, bucket: str, src: Path,
        tmp_path: Path) -> None:
    client: Any = moto.client()
    store = make_store(moto.url, bucket, tmp_path / "c1", passphrase=PASSPHRASE)
    first = store.push(DirectoryView(src))
    assert store.encrypted
    assert len(keys_under(client, bucket, "vol/keys/")) == 1
    assert contents(restore_into(store, tmp_path, "d1")) == contents(src)
    assert store.verify(read_data=True).ok

    other = make_store(moto.url, bucket, tmp_path / "c2", passphrase=PASSPHRASE)
    assert other.list() == [first]
    assert contents(restore_into(other, tmp_path, "d2")) == contents(src)
    # Same master key, so the same keyed ids: an unchanged tree uploads nothing.
    assert other.push(DirectoryView(src)) == first
    (src / "sub" / "new").write_bytes(b"new file")
    second = other.push(DirectoryView(src))
    assert second.uploaded_bytes < 100_000
    assert contents(restore_into(store, tmp_path, "d3")) == contents(src)
    # Prune reads sealed manifests and trees to know which packs are still used.
    report = other.prune(1)
    assert report.removed == (first.id,) and report.swept
    assert other.verify(read_data=True).ok
    assert contents(restore_into(other, tmp_path, "d4")) == contents(src)
    assert other.delete_all() > 0
    assert objects(client, bucket) == {}  # the key objects too


def test_nothing_secret_or_plain_is_in_the_bucket(make_store: MakeStore, moto: MotoServer,
                                                  bucket: str, src: Path,
                                                  tmp_path: Path) -> None:
    client: Any = moto.client()
    make_store(moto.url, bucket, tmp_path / "c1", passphrase=PASSPHRASE).push(DirectoryView(src))
    stored = objects(client, bucket)
    assert stored
    for key, body in stored.items():
        assert PASSPHRASE not in key
        for needle in (PASSPHRASE.encode(), MARKER, SECRET_NAME.encode()):
            assert needle not in body, (key, needle)
    # The control: a plain store does hold the marker, so the scan above can see it.
    make_store(moto.url, bucket, tmp_path / "c2", prefix="plain").push(DirectoryView(src))
    assert any(MARKER in b for k, b in objects(client, bucket).items() if k.startswith("plain/"))


@pytest.mark.parametrize("passphrase", [None, "wrong passphrase"])
def test_a_missing_or_wrong_passphrase_is_refused_and_writes_nothing(
        passphrase: str | None, make_store: MakeStore, moto: MotoServer, bucket: str,
        src: Path, tmp_path: Path) -> None:
    client: Any = moto.client()
    make_store(moto.url, bucket, tmp_path / "c1", passphrase=PASSPHRASE).push(DirectoryView(src))
    before = objects(client, bucket)
    store = make_store(moto.url, bucket, tmp_path / "c2", passphrase=passphrase)
    cause = ("this volume is not: create it with -o s3_encrypt=true" if passphrase is None
             else "opens none of its 1 keys")
    for attempt in (store.list, lambda: store.push(DirectoryView(src)),
                    lambda: store.verify(read_data=True), lambda: store.prune(1)):
        with pytest.raises(WrongPassphrase, match=cause) as raised:
            attempt()
        assert "S3_PASSPHRASE" in str(raised.value)
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(WrongPassphrase, match="S3_PASSPHRASE"):
        store.restore("latest", dst)
    assert list(dst.iterdir()) == []
    assert objects(client, bucket) == before


def test_a_passphrase_for_a_prefix_with_unencrypted_snapshots_is_refused(
        make_store: MakeStore, moto: MotoServer, bucket: str, src: Path,
        tmp_path: Path) -> None:
    client: Any = moto.client()
    make_store(moto.url, bucket, tmp_path / "c1").push(DirectoryView(src))
    before = objects(client, bucket)
    store = make_store(moto.url, bucket, tmp_path / "c2", passphrase=PASSPHRASE)
    with pytest.raises(S3SyncError, match=r"unencrypted snapshot.*-o s3_encrypt=false"):
        store.push(DirectoryView(src))
    with pytest.raises(S3SyncError, match="unencrypted snapshot"):
        store.list()
    assert objects(client, bucket) == before


def _tamper(how: str, client: Any, bucket: str, make_store: MakeStore, moto: MotoServer,
            src: Path, tmp_path: Path) -> tuple[str, str, str]:
    """Two pushes, then one tampering: (object named, snapshot to restore, expected cause)."""
    store = make_store(moto.url, bucket, tmp_path / "c1", passphrase=PASSPHRASE)
    if how == "swap two packs":
        # Two pushes of one equal-sized file each: two packs of equal size, so only
        # authentication (not a size check) can tell them apart.
        tree = tmp_path / "two"
        tree.mkdir()
        for name in ("a", "b"):
            (tree / name).write_bytes(os.urandom(100_000))
            last = store.push(DirectoryView(tree))
        sized: dict[int, list[str]] = {}
        for key, body in objects(client, bucket).items():
            if key.startswith("vol/data/"):
                sized.setdefault(len(body), []).append(key)
        a, b = next(keys for keys in sized.values() if len(keys) == 2)
        body_a, body_b = objects(client, bucket)[a], objects(client, bucket)[b]
        put(client, bucket, a, body_b)
        put(client, bucket, b, body_a)
        return "vol/data/", last.id, "wrong name"
    old = store.push(DirectoryView(src))
    (src / "sub" / "later").write_bytes(os.urandom(300_000))
    new = store.push(DirectoryView(src))
    packs = keys_under(client, bucket, "vol/data/")
    sizes = {k: len(b) for k, b in objects(client, bucket).items() if k in packs}
    packs.sort(key=sizes.__getitem__, reverse=True)  # largest first: they hold file content
    assert len(packs) >= 2
    forged = new_snapshot_id(datetime(2099, 1, 1, tzinfo=UTC))
    if how == "flip a byte in a pack":
        key = packs[0]
        body = bytearray(objects(client, bucket)[key])
        body[len(body) // 2] ^= 0x01
        put(client, bucket, key, bytes(body))
        return key, new.id, "modified"
    if how == "truncate a manifest":
        key = f"vol/snapshots/{new.id}"
        put(client, bucket, key, objects(client, bucket)[key][:-20])
        return key, new.id, "modified"
    if how == "replay an old manifest":
        key = f"vol/snapshots/{forged}"
        put(client, bucket, key, objects(client, bucket)[f"vol/snapshots/{old.id}"])
        return key, forged, "wrong name"
    assert how == "plant an unencrypted manifest"
    plain = make_store(moto.url, bucket, tmp_path / "cp", prefix="plainvol")
    planted = plain.push(DirectoryView(src))
    key = f"vol/snapshots/{planted.id}"
    put(client, bucket, key, objects(client, bucket)[f"plainvol/snapshots/{planted.id}"])
    return key, planted.id, "an unencrypted snapshot in an encrypted prefix is refused"


@pytest.mark.parametrize("how", ["flip a byte in a pack", "swap two packs",
                                 "truncate a manifest", "replay an old manifest",
                                 "plant an unencrypted manifest"])
def test_tampering_is_refused_naming_the_object_and_reported_by_verify(
        how: str, make_store: MakeStore, moto: MotoServer, bucket: str, src: Path,
        tmp_path: Path) -> None:
    client: Any = moto.client()
    named, snapshot, cause = _tamper(how, client, bucket, make_store, moto, src, tmp_path)
    reader = make_store(moto.url, bucket, tmp_path / "fresh", passphrase=PASSPHRASE)
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(CorruptObject) as raised:
        reader.restore(snapshot, dst)
    assert named in str(raised.value) and cause in str(raised.value)
    assert isinstance(raised.value, TamperedObject)
    assert list(dst.iterdir()) == []
    assert snapshot not in [s.id for s in reader.list()] or "pack" in how
    report = reader.verify(read_data=True)
    assert not report.ok
    assert any(named in p and cause in p for p in report.problems), report.problems
