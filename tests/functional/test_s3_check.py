"""The check engine and the push's trust in its dedup base, against a real S3 API (moto):
missing, truncated and rotten packs, and a forged newer manifest that points a hash at
garbage.  Each case: ``verify`` names the object, and the next push uploads the content
again so that the newest snapshot restores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from backends.tree import DirectoryView
from s3sync.manifest import decode_manifest, encode_manifest
from tests.support.trees import contents

if TYPE_CHECKING:
    from s3_fixtures import MakeStore, MotoServer

pytest_plugins = ["s3_fixtures"]


def packs(client: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="vol/data/")
                  .get("Contents", []))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    for i in range(3):
        (root / f"f{i}").write_bytes(os.urandom(200_000 + i))
    return root


def restored(store: Any, tmp_path: Path, name: str) -> dict[str, str]:
    dst = tmp_path / name
    dst.mkdir()
    store.restore("latest", dst)
    return contents(dst)


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_a_damaged_pack_is_reported_and_the_next_push_uploads_it_again(
        damage: str, make_store: MakeStore, moto: MotoServer, bucket: str, src: Path,
        tmp_path: Path) -> None:
    client: Any = moto.client()
    store = make_store(moto.url, bucket, tmp_path / "cache")
    store.push(DirectoryView(src))
    assert store.verify(read_data=True).ok
    (key,) = [k for k in packs(client, bucket)
              if client.head_object(Bucket=bucket, Key=k)["ContentLength"] > 500_000]
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    if damage == "delete":
        client.delete_object(Bucket=bucket, Key=key)
    elif damage == "truncate":
        client.put_object(Bucket=bucket, Key=key, Body=bytes(body[:len(body) // 2]))
    else:
        body[len(body) // 2] ^= 0x40
        client.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    structural = store.verify()
    assert structural.ok is (damage == "flip")  # rot needs reading the data
    report = store.verify(read_data=True)
    assert not report.ok and key in report.problems[0]

    store.push(DirectoryView(src))  # nothing changed locally
    assert restored(store, tmp_path, "dst") == contents(src)


def test_a_newer_manifest_pointing_a_hash_at_garbage_is_not_deduplicated_against(
        make_store: MakeStore, moto: MotoServer, bucket: str, src: Path,
        tmp_path: Path) -> None:
    client: Any = moto.client()
    store = make_store(moto.url, bucket, tmp_path / "cache")
    store.push(DirectoryView(src))
    # Another "host" (no cache) learns the store; a forger then rewrites the newest manifest's
    # content so that its blobs point at a junk pack of the same length.
    (snap,) = store.list()
    key = f"vol/snapshots/{snap.id}"
    manifest = decode_manifest(client.get_object(Bucket=bucket, Key=key)["Body"].read(), key)
    for pack in packs(client, bucket):
        size = client.head_object(Bucket=bucket, Key=pack)["ContentLength"]
        if size > 500_000:
            client.put_object(Bucket=bucket, Key=pack, Body=os.urandom(size))
    client.put_object(Bucket=bucket, Key=key, Body=encode_manifest(manifest))
    other = make_store(moto.url, bucket, tmp_path / "cache2")
    report = other.verify(read_data=True)
    assert not report.ok and "corrupt" in report.problems[0]
    (src / "new").write_bytes(b"a change, so a new snapshot is written")
    other.push(DirectoryView(src))
    assert restored(other, tmp_path, "dst") == contents(src)
