"""Faults of the store: every failure is precise, local data is never touched, and nothing a
failed push left behind is visible as a snapshot."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from backends.tree import DirectoryView, scan
from s3sync import (
    AccessDenied,
    BucketMissing,
    CorruptObject,
    EndpointUnreachable,
    RetryPolicy,
    S3SyncError,
)
from s3sync.blobs import CHUNK_MAX
from tests.support.net import free_port

if TYPE_CHECKING:
    from s3_fixtures import MakeStore, MotoServer, Relay

pytest_plugins = ["s3_fixtures"]

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=5.0,
                   connect_timeout=1.0, read_timeout=5.0, botocore_attempts=1)



def fingerprint(root: Path) -> list[tuple[object, ...]]:
    """Metadata and content of every entry, ctime included: proof that nothing changed."""
    return [(e.path, e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.ctime_ns, e.size, e.ino,
             hashlib.sha256((root / e.path).read_bytes()).hexdigest() if e.kind == "file"
             else "") for e in scan(root)]


def make_tree(root: Path, files: int = 40, size: int = 200_000) -> None:
    root.mkdir()
    for i in range(files):
        (root / f"f{i:03d}").write_bytes(os.urandom(size))


def test_interrupted_push_leaves_the_previous_snapshot_intact(make_store: MakeStore, relay: Relay,
        bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    remote = make_store(relay.url, bucket, tmp_path / "cache", retry=FAST)
    first = remote.push(DirectoryView(src))
    expected = fingerprint(src)
    for i in range(40):
        (src / f"new{i:03d}").write_bytes(os.urandom(300_000))
    before = fingerprint(src)
    data_puts = 0

    def die_mid_push(method: str, path: str) -> int | None:
        nonlocal data_puts
        if method == "PUT" and "/data/" in path:
            data_puts += 1
            if data_puts > 1:
                relay.down = True  # the store dies after one pack landed
        return None
    relay.fault = die_mid_push
    with pytest.raises(S3SyncError):
        remote.push(DirectoryView(src))
    assert fingerprint(src) == before
    relay.down = False
    relay.fault = None
    assert remote.list() == [first]
    dst = tmp_path / "dst"
    dst.mkdir()
    remote.restore("latest", dst)
    assert [x[:6] + x[7:8] + x[9:] for x in fingerprint(dst)] == \
        [x[:6] + x[7:8] + x[9:] for x in expected]
    # The retry uploads what is missing (not what already landed) and completes.
    relay.reset()
    second = remote.push(DirectoryView(src))
    assert remote.list() == [first, second]
    assert relay.counters.uploaded < 40 * 300_000 + 100_000


def test_exception_in_the_middle_of_uploads_writes_no_manifest(make_store: MakeStore,
        moto: MotoServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    make_tree(src, files=8, size=3 * CHUNK_MAX)
    remote = make_store(moto.url, bucket, tmp_path / "cache", retry=FAST)
    first = remote.push(DirectoryView(src))
    for i in range(8):
        (src / f"f{i:03d}").write_bytes(os.urandom(3 * CHUNK_MAX))
    from s3sync.client import Bucket
    real_put = Bucket.put
    calls = {"n": 0}

    def failing_put(self: Bucket, key: str, body: bytes) -> None:
        if "/data/" in key:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("operator pressed ^C mid-upload")
        real_put(self, key, body)
    monkeypatch.setattr(Bucket, "put", failing_put)
    with pytest.raises(KeyboardInterrupt):
        remote.push(DirectoryView(src))
    monkeypatch.setattr(Bucket, "put", real_put)
    assert remote.list() == [first]


def test_injected_503s_and_500s_are_retried(make_store: MakeStore, relay: Relay, bucket: str,
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, files=10)
    seen = {"n": 0}

    def flaky(method: str, path: str) -> int | None:
        seen["n"] += 1
        return (503, 500, None)[seen["n"] % 3]
    relay.fault = flaky
    remote = make_store(relay.url, bucket, tmp_path / "cache",
                   retry=RetryPolicy(attempts=8, base_delay=0.01, max_delay=0.05,
                                     deadline=30, botocore_attempts=1))
    snap = remote.push(DirectoryView(src))
    dst = tmp_path / "dst"
    dst.mkdir()
    remote.restore(snap.id, dst)
    relay.fault = None
    assert sum(relay.counters.requests.values()) > 20
    assert [x[0] for x in fingerprint(dst)] == [x[0] for x in fingerprint(src)]


def test_store_that_keeps_failing_gives_a_transient_error(make_store: MakeStore, relay: Relay,
        bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, files=2)
    relay.fault = lambda method, path: 503
    with pytest.raises(S3SyncError, match=r"kept failing .*try again later"):
        make_store(relay.url, bucket, tmp_path / "cache", retry=FAST).push(DirectoryView(src))


def test_endpoint_down_is_a_clear_error_and_touches_nothing(make_store: MakeStore, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    import s3_fixtures

    src = tmp_path / "src"
    make_tree(src, files=3)
    before = fingerprint(src)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    remote = make_store(url, "any-bucket", tmp_path / "cache", retry=FAST)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(EndpointUnreachable, match=f"cannot reach the S3 endpoint {url}") as info:
        remote.push(DirectoryView(src))
    assert "S3_ENDPOINT_URL" in str(info.value)
    assert fingerprint(src) == before
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(EndpointUnreachable):
        remote.restore("latest", dst)
    assert list(dst.iterdir()) == []
    assert s3_fixtures.SECRET_KEY not in caplog.text + str(info.value) + repr(info.value)


def test_missing_bucket_is_named(make_store: MakeStore, moto: MotoServer,
                                 tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, files=1)
    with pytest.raises(BucketMissing, match="bucket 'no-such-bucket' does not exist"):
        remote = make_store(moto.url, "no-such-bucket", tmp_path / "cache", retry=FAST)
        remote.push(DirectoryView(src))


def test_wrong_credentials_are_refused(make_store: MakeStore,
                                       moto_auth: tuple[MotoServer, str, str], tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """Against moto with signature checks on.

    moto (5.2) mis-signs LIST requests whose prefix holds a "/", so a whole push cannot run
    there even with good keys; good keys are proven with check(), bad ones with push.
    """
    server, key, secret = moto_auth
    src = tmp_path / "src"
    make_tree(src, files=2)
    caplog.set_level(logging.DEBUG)
    make_store(server.url, "authed", tmp_path / "cache", key=key, secret=secret,
               retry=FAST).check()
    wrong_secret = "definitely-not-the-secret-0000000000000"
    for k, s, code in [(key, wrong_secret, "SignatureDoesNotMatch"),
                       ("AKIAUNKNOWN000000000", wrong_secret, "InvalidAccessKeyId")]:
        bad = make_store(server.url, "authed", tmp_path / "cache2", key=k, secret=s, retry=FAST)
        for action in (bad.check, functools.partial(bad.push, DirectoryView(src)), bad.list):
            refused = rf"refused access \(({code}|403)\).*AWS_SECRET"
            with pytest.raises(AccessDenied, match=refused) as i:
                action()
            assert wrong_secret not in str(i.value)
            assert secret not in str(i.value)
    assert secret not in caplog.text and wrong_secret not in caplog.text


def corrupt_one_pack(moto: MotoServer, bucket: str, how: str) -> None:
    s3 = moto.client()
    keys = [o["Key"] for o in s3.list_objects_v2(  # type: ignore[attr-defined]
        Bucket=bucket, Prefix="vol/data/")["Contents"]]
    biggest = max(keys, key=lambda k: s3.head_object(  # type: ignore[attr-defined]
        Bucket=bucket, Key=k)["ContentLength"])
    if how == "delete":
        s3.delete_object(Bucket=bucket, Key=biggest)  # type: ignore[attr-defined]
        return
    body = bytearray(s3.get_object(  # type: ignore[attr-defined]
        Bucket=bucket, Key=biggest)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=bucket, Key=biggest, Body=bytes(body))  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["flip", "delete"])
def test_restore_refuses_corrupt_or_missing_data_and_leaves_dst_empty(make_store: MakeStore,
        moto: MotoServer, bucket: str, tmp_path: Path, how: str) -> None:
    src = tmp_path / "src"
    make_tree(src, files=10)
    remote = make_store(moto.url, bucket, tmp_path / "cache", retry=FAST)
    snap = remote.push(DirectoryView(src))
    corrupt_one_pack(moto, bucket, how)
    dst = tmp_path / "dst"
    dst.mkdir()
    before = os.stat(dst)
    match = "is corrupt.*does not match its hash" if how == "flip" else "missing"
    with pytest.raises(CorruptObject, match=match):
        remote.restore(snap.id, dst)
    assert list(dst.iterdir()) == []
    after = os.stat(dst)
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == \
        (before.st_mode, before.st_uid, before.st_mtime_ns)


def test_push_repairs_a_cache_that_points_at_lost_data(make_store: MakeStore, moto: MotoServer,
        relay: Relay, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, files=10)
    remote = make_store(relay.url, bucket, tmp_path / "cache", retry=FAST)
    remote.push(DirectoryView(src))
    corrupt_one_pack(moto, bucket, "delete")
    (src / "touch").write_text("a change, so that a new snapshot is written")
    snap = remote.push(DirectoryView(src))
    dst = tmp_path / "dst"
    dst.mkdir()
    remote.restore(snap.id, dst)
    assert [x[-1] for x in fingerprint(dst)] == [x[-1] for x in fingerprint(src)]


def test_secrets_never_reach_repr_errors_or_logs(make_store: MakeStore, moto: MotoServer,
        relay: Relay, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import s3_fixtures

    caplog.set_level(logging.DEBUG)
    src = tmp_path / "src"
    make_tree(src, files=3)
    remote = make_store(relay.url, bucket, tmp_path / "cache", retry=FAST)
    remote.push(DirectoryView(src))
    texts = [repr(remote), str(remote), repr(remote.list())]
    relay.fault = lambda method, path: 503
    try:
        remote.push(DirectoryView(src))
    except S3SyncError as exc:
        texts += [str(exc), repr(exc), repr(exc.__cause__)]
    relay.fault = None
    texts.append(caplog.text)
    assert "botocore" in caplog.text  # DEBUG logging did capture the client's chatter
    # ... but never the signed headers, the canonical request or the signature.
    assert "Authorization" not in caplog.text and "Signature" not in caplog.text
    for text in texts:
        assert s3_fixtures.SECRET_KEY not in text
