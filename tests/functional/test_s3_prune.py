"""Prune and delete_all: what is kept stays restorable, and concurrent pushes are safe."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from backends.tree import DirectoryView
from s3sync import RemoteStore
from tests.support.trees import contents

if TYPE_CHECKING:
    from s3_fixtures import MakeStore, MotoServer

pytest_plugins = ["s3_fixtures"]



def data_keys(moto: MotoServer, bucket: str) -> set[str]:
    listing = moto.client().list_objects_v2(  # type: ignore[attr-defined]
        Bucket=bucket, Prefix="vol/data/")
    return {o["Key"] for o in listing.get("Contents", [])}


def push_versions(remote: RemoteStore, src: Path, n: int,
                  ) -> list[tuple[str, dict[str, str]]]:
    versions = []
    for i in range(n):
        (src / f"v{i}").write_bytes(os.urandom(200_000))  # unique to this version
        if i:
            (src / f"v{i - 1}").unlink()
        versions.append((remote.push(DirectoryView(src)).id, contents(src)))
        time.sleep(1.1)  # the store's LastModified has one-second resolution
    return versions


def test_prune_keeps_the_newest_and_they_still_restore(make_store: MakeStore, moto: MotoServer,
        bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "shared").write_bytes(os.urandom(100_000))
    remote = make_store(moto.url, bucket, tmp_path / "cache")
    versions = push_versions(remote, src, 4)
    packs_before = data_keys(moto, bucket)
    report = remote.prune(2)
    assert report.removed == (versions[0][0], versions[1][0])
    assert report.kept == (versions[2][0], versions[3][0])
    assert report.swept and report.deleted_packs >= 1 and report.freed_bytes >= 200_000
    assert [s.id for s in remote.list()] == [versions[2][0], versions[3][0]]
    assert len(data_keys(moto, bucket)) == len(packs_before) - report.deleted_packs
    for snap_id, expected in versions[2:]:
        dst = tmp_path / f"dst-{snap_id}"
        dst.mkdir()
        remote.restore(snap_id, dst)
        assert contents(dst) == expected
    again = remote.prune(2)
    assert again.removed == () and again.deleted_packs == 0


def test_prune_never_sweeps_while_another_client_pushes(make_store: MakeStore, moto: MotoServer,
        bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    remote = make_store(moto.url, bucket, tmp_path / "cache")
    push_versions(remote, src, 3)
    before = data_keys(moto, bucket)
    # Another host's push is running: its marker is in the store.
    moto.client().put_object(Bucket=bucket, Key="vol/locks/push-otherhost",  # type: ignore[attr-defined]
                             Body=b"")
    report = remote.prune(1)
    assert len(report.removed) == 2 and not report.swept
    assert data_keys(moto, bucket) == before
    moto.client().delete_object(Bucket=bucket, Key="vol/locks/push-otherhost")  # type: ignore[attr-defined]
    assert remote.prune(1).swept
    assert len(data_keys(moto, bucket)) < len(before)


def test_prune_spares_data_newer_than_the_newest_snapshot(make_store: MakeStore, moto: MotoServer,
        bucket: str, tmp_path: Path) -> None:
    """Packs a push uploaded after the newest manifest's push began may be in flight."""
    src = tmp_path / "src"
    src.mkdir()
    remote = make_store(moto.url, bucket, tmp_path / "cache")
    push_versions(remote, src, 2)
    orphan = "vol/data/" + "f" * 64  # uploaded by a push that has not written its manifest
    moto.client().put_object(Bucket=bucket, Key=orphan, Body=b"in flight")  # type: ignore[attr-defined]
    remote.prune(1)
    assert orphan in data_keys(moto, bucket)


def test_prune_and_push_in_one_process_do_not_overlap(make_store: MakeStore, moto: MotoServer,
        bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    remote = make_store(moto.url, bucket, tmp_path / "cache")
    push_versions(remote, src, 2)
    twin = make_store(moto.url, bucket, tmp_path / "cache")  # same bucket and prefix
    from s3sync import push as push_mod
    inside = threading.Event()
    release = threading.Event()
    real = push_mod._walk

    def slow_walk(*args: object, **kw: object) -> object:
        inside.set()
        release.wait(10)
        return real(*args, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(push_mod, "_walk", slow_walk)
    (src / "more").write_bytes(os.urandom(1000))
    pusher = threading.Thread(target=remote.push, args=(DirectoryView(src),))
    pusher.start()
    assert inside.wait(10)
    done = threading.Event()
    pruner = threading.Thread(target=lambda: (twin.prune(1), done.set()))
    pruner.start()
    assert not done.wait(0.5)  # waits for the push
    release.set()
    pusher.join(10)
    pruner.join(10)
    assert done.is_set()
    assert len(remote.list()) == 1


def test_delete_all_removes_everything_under_the_prefix(make_store: MakeStore, moto: MotoServer,
        bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    remote = make_store(moto.url, bucket, tmp_path / "cache")
    remote.push(DirectoryView(src))
    moto.client().put_object(Bucket=bucket, Key="other/keep", Body=b"")  # type: ignore[attr-defined]
    assert remote.delete_all() >= 2
    listing = moto.client().list_objects_v2(Bucket=bucket)  # type: ignore[attr-defined]
    assert [o["Key"] for o in listing["Contents"]] == ["other/keep"]
    assert remote.list() == []
    assert remote.delete_all() == 0


def test_prune_needs_keep_of_at_least_one(make_store: MakeStore, moto: MotoServer, bucket: str,
        tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="delete_all"):
        make_store(moto.url, bucket, tmp_path / "cache").prune(0)
