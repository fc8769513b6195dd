"""A hostile bucket: whoever can write to it forges, truncates, swaps and junks objects under
a volume's prefix.  Each test crafts real objects (pyvol's own formats, see bucket_support)
in a real S3 API (moto), drives the real server over its socket as dockerd and the `pyvol`
CLI do, and asserts what a user sees: the refusal naming the entry, nothing privileged on
disk, bounded memory, the corruption reported and repaired, and no secret anywhere.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from bucket_support import (
    PackBuilder,
    forge,
    privileged,
    put_manifest,
    restore_outcome,
)
from sync_support import (
    StartSync,
    SyncServer,
    create,
    mount,
    s3_settings,
    s3_status,
    unmount,
)

from tests.support.processes import peak_rss, reset_peak

if TYPE_CHECKING:
    from s3_fixtures import MakeStore, MotoServer

pytest_plugins = ["s3_fixtures"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="restores chown and mknod as root")

M1 = "c" * 64
MiB = 1 << 20


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


CAPABILITY = b64(struct.pack("<IIIII", 0x02000001, 1 << 21, 0, 0, 0))  # cap_sys_admin, v2
FILE = {"path": "bin", "kind": "file", "mode": 0o755, "uid": 0, "gid": 0}
BAD: dict[str, tuple[list[dict[str, Any]], str]] = {
    # case: (records, the entry the refusal must name)
    "setuid-root": ([{**FILE, "mode": 0o4755}], "'bin'"),
    "setgid-exec": ([{**FILE, "mode": 0o2755}], "'bin'"),
    "chardev": ([{"path": "null", "kind": "chardev", "mode": 0o666, "rdev": os.makedev(1, 3)}],
                "'null'"),
    "blockdev": ([{"path": "disk", "kind": "blockdev", "mode": 0o666,
                   "rdev": os.makedev(8, 0)}], "'disk'"),
    "capability": ([{**FILE, "xattrs": {"security.capability": CAPABILITY}}], "'bin'"),
    "trusted-xattr": ([{**FILE, "xattrs": {"trusted.x": b64(b"1")}}], "'bin'"),
    "mode-bits": ([{**FILE, "mode": 0o140755}], "'bin'"),
    "uid-minus-one": ([{**FILE, "uid": 4294967295}], "'bin'"),
    "dotdot": ([{**FILE, "path": "../escape"}], "'../escape'"),
    "nul": ([{**FILE, "path": "a\0b"}], "'a\\x00b'"),
    "name-max": ([{**FILE, "path": "n" * 256}], "'" + "n" * 256 + "'"),
    "negative-size": ([{"path": "empty", "kind": "file", "size": -1}], "'empty'"),
    "fifo-rdev": ([{"path": "pipe", "kind": "fifo", "rdev": 5}], "'pipe'"),
    "symlink-xattr": ([{"path": "l", "kind": "symlink", "target": "x",
                        "xattrs": {"user.a": b64(b"1")}}], "'l'"),
    "unknown-field": ([{**FILE, "setcap": "cap_sys_admin+ep"}], "'bin'"),
    "bool-uid": ([{**FILE, "uid": True}], "'bin'"),
    "size-mismatch": ([{**FILE, "size": 1 << 40}], "'bin'"),
    "symlink-nul": ([{"path": "l", "kind": "symlink", "target": "/etc\0x"}], "'l'"),
    "hardlink-out": ([{"path": "h", "kind": "hardlink", "target": "../../etc/shadow"}],
                     "'h'"),
}


def test_a_forged_snapshot_with_a_privileged_or_impossible_entry_is_refused_naming_it(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client: Any = moto.client()
    server = start(tmp_path / "root", s3_settings(moto.url))
    # The same forging, with nothing planted, restores: so each refusal is the rule's doing.
    forge(client, bucket, "good", [{**FILE, "mode": 0o2744}, {"path": "d", "kind": "dir",
                                    "mode": 0o3777}], {"bin": b"#!/bin/sh\n"})
    create(server, "good", s3_bucket=bucket)
    assert "last_error" not in restore_outcome(server, "good")
    data = mount(server.client, "good", M1)
    assert (data / "bin").read_bytes() == b"#!/bin/sh\n"
    assert (data / "bin").stat().st_mode & 0o7777 == 0o2744  # setgid without g+x: inert
    assert (data / "d").stat().st_mode & 0o7777 == 0o3777
    unmount(server.client, "good", M1)

    refused = {}
    for case, (records, entry) in BAD.items():
        forge(client, bucket, case, records, {"bin": b"\x7fELF..."})
        create(server, case, s3_bucket=bucket)
        s3 = restore_outcome(server, case)
        refused[case] = (s3.get("last_error") or {}).get("message", "")
        assert "invalid tree" in refused[case] and entry in refused[case], (case, refused[case])
    assert privileged(server.root) == []


def test_a_chunk_declaring_a_gigabyte_is_refused_without_using_the_memory(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    import blake3
    import zstandard

    # ~100 KB: one zstd frame of 1 GiB of zeros, declared as one blob of that size.
    size = 1 << 30
    out = io.BytesIO()
    hasher = blake3.blake3()
    zero = bytes(16 * MiB)
    with zstandard.ZstdCompressor(level=3).stream_writer(out, size=size, closefd=False) as w:
        for _ in range(size // len(zero)):
            w.write(zero)
            hasher.update(zero)
    frame = out.getvalue()
    assert len(frame) < 200_000
    client: Any = moto.client()
    pack = PackBuilder()
    ref = pack.add(b"", stored=frame, size=size, digest=hasher.hexdigest())
    pack.upload(client, bucket, "bomb")
    part = PackBuilder()
    tree = part.add(json.dumps([{"path": ".", "kind": "dir", "mode": 0o755},
                                {"path": "big", "kind": "file", "size": size, "c": [ref]}]
                               ).encode())
    part.upload(client, bucket, "bomb")
    put_manifest(client, bucket, "bomb", [tree])

    server = start(tmp_path / "root", s3_settings(moto.url))
    (worker,) = server.workers
    before = peak_rss(worker)[0]
    reset_peak(worker)
    create(server, "bomb", s3_bucket=bucket)
    s3 = restore_outcome(server, "bomb")
    message = (s3.get("last_error") or {}).get("message", "")
    assert "more than any push writes" in message, message
    assert peak_rss(worker)[1] - before < 64 * MiB


def log_lines(size: int) -> Iterator[bytes]:
    """A log file: compresses ~20:1 but every chunk differs (a counter), so nothing dedups."""
    n = 0
    written = 0
    while written < size:
        block = b"".join(b"2026-12-01T22:00:00.%06dZ INFO worker-3 request id=%012d path=/api/v1/"
                         b"items status=200 bytes=%d\n" % (i % 1000000, i, i * 7 % 9973)
                         for i in range(n, n + 20000))
        n += 20000
        block = block[:size - written]
        written += len(block)
        yield block


def test_restoring_a_gigabyte_log_file_stays_within_256_mib(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path,
        make_store: MakeStore) -> None:
    from backends.tree import DirectoryView

    size = 1 << 30
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "app.log", "wb") as f:
        for block in log_lines(size):
            f.write(block)
    make_store(moto.url, bucket, tmp_path / "cache", prefix="logs").push(DirectoryView(src))
    (src / "app.log").unlink()

    server = start(tmp_path / "root", s3_settings(moto.url))
    (worker,) = server.workers
    before = peak_rss(worker)[0]
    reset_peak(worker)
    create(server, "logs", s3_bucket=bucket)
    s3 = restore_outcome(server, "logs", timeout=120)
    assert "last_error" not in s3, s3
    growth = peak_rss(worker)[1] - before
    data = mount(server.client, "logs", M1)
    with open(data / "app.log", "rb") as f:
        for block in log_lines(size):
            assert f.read(len(block)) == block
        assert f.read(1) == b""
    unmount(server.client, "logs", M1)
    print(f"restore of {size / MiB:.0f} MiB grew the server by {growth / MiB:.0f} MiB")
    assert growth < 256 * MiB, f"restore grew the server by {growth / MiB:.0f} MiB"


def push_wait(server: SyncServer, volume: str) -> None:
    result = server.cli("sync", volume, "--wait")
    assert result.returncode == 0, result.stderr


def write(server: SyncServer, volume: str, files: dict[str, bytes]) -> None:
    data = mount(server.client, volume, M1)
    for name, content in files.items():
        (data / name).write_bytes(content)
    unmount(server.client, volume, M1)


def test_check_reports_rot_and_missing_packs_and_the_next_push_repairs(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client: Any = moto.client()
    server = start(tmp_path / "root", s3_settings(moto.url))
    create(server, "db", s3_bucket=bucket, s3_sync="manual")
    restore_outcome(server, "db")
    content = {"a.bin": os.urandom(300_000), "b.bin": os.urandom(200_000)}
    write(server, "db", content)
    push_wait(server, "db")
    ok = server.cli("sync", "check", "db", "--read-data")
    assert ok.returncode == 0, ok.stderr
    assert s3_status(server.client, "db")["last_check"]["ok"] is True

    packs = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="db/data/")
             ["Contents"]]
    big = max(packs, key=lambda k: client.head_object(Bucket=bucket, Key=k)["ContentLength"])
    body = bytearray(client.get_object(Bucket=bucket, Key=big)["Body"].read())
    body[len(body) // 2] ^= 0x01  # bit rot
    client.put_object(Bucket=bucket, Key=big, Body=bytes(body))

    structural = server.cli("sync", "check", "db")
    assert structural.returncode == 0, structural.stderr  # the pack is there, long enough
    rot = server.cli("sync", "check", "db", "--read-data")
    assert rot.returncode == 1
    assert big in rot.stderr and "corrupt" in rot.stderr, rot.stderr
    last = s3_status(server.client, "db")["last_check"]
    assert last["ok"] is False and last["problems"] >= 1 and big in last["first_problems"][0]

    # Nothing changed in the volume; the push still uploads the rotten content again.
    push_wait(server, "db")
    assert server.cli("sync", "check", "db", "--read-data").returncode == 1  # the old snapshot
    # Read it back as another host would (one host never has two volumes on one prefix).
    other = start(tmp_path / "other", s3_settings(moto.url))
    create(other, "copy", s3_bucket=bucket, s3_prefix="db", s3_sync="manual")
    assert "last_error" not in restore_outcome(other, "copy")
    data = mount(other.client, "copy", "d" * 64)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == content
    unmount(other.client, "copy", "d" * 64)

    # A pack that disappears is found without reading any data.
    client.delete_object(Bucket=bucket, Key=packs[0])
    gone = server.cli("sync", "check", "db")
    assert gone.returncode == 1 and packs[0] in gone.stderr and "missing" in gone.stderr


def test_junk_under_snapshots_is_skipped_and_latest_is_by_recorded_time(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client: Any = moto.client()
    server = start(tmp_path / "root", s3_settings(moto.url))
    create(server, "web", s3_bucket=bucket, s3_sync="manual")
    restore_outcome(server, "web")
    write(server, "web", {"index.html": b"pushed"})
    push_wait(server, "web")
    client.put_object(Bucket=bucket, Key="web/snapshots/README", Body=b"backups of web")
    client.put_object(Bucket=bucket, Key="web/snapshots/99991231T235959.999999Z",
                      Body=b"\x28\xb5\x2f\xfd garbage")
    # A valid snapshot whose key sorts first but whose recorded time is the newest.
    forge(client, bucket, "web", [{"path": "index.html", "kind": "file", "mode": 0o644}],
          {"index.html": b"newest"}, snapshot_id="0-newest",
          created=datetime.now(UTC) + timedelta(hours=1))

    listing = server.cli("sync", "ls", "web")
    assert listing.returncode == 0, listing.stderr
    assert [row.split("\t")[0] for row in listing.stdout.splitlines()][-1] == "0-newest"
    other = start(tmp_path / "other", s3_settings(moto.url))
    create(other, "web2", s3_bucket=bucket, s3_prefix="web")
    s3 = restore_outcome(other, "web2")
    assert "last_error" not in s3, s3
    assert any("web/snapshots/README" in w for w in s3["warnings"]), s3
    assert any("99991231T235959.999999Z" in w for w in s3["warnings"]), s3
    data = mount(other.client, "web2", M1)
    assert (data / "index.html").read_bytes() == b"newest"
    unmount(other.client, "web2", M1)
    write(server, "web", {"index.html": b"again"})
    push_wait(server, "web")
    restored = server.cli("sync", "restore", "web", "latest")
    assert restored.returncode == 0, restored.stderr


def test_delete_remote_stops_at_the_prefix_boundary(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client: Any = moto.client()
    # One host refuses nested prefixes at create; hosts sharing a bucket cannot see each
    # other's volumes, so each volume here lives on a host of its own.
    hosts = {}
    for name, prefix in (("team", "team"), ("db", "team/db"), ("dat", "team/data/x")):
        hosts[name] = server = start(tmp_path / name, s3_settings(moto.url))
        create(server, name, s3_bucket=bucket, s3_prefix=prefix, s3_sync="manual")
        restore_outcome(server, name)
        write(server, name, {"f": name.encode() * 1000})
        push_wait(server, name)

    def keys(prefix: str) -> list[str]:
        """Snapshots and packs (not the lock markers of the prunes that follow each push)."""
        return [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)
                .get("Contents", []) if "/locks/" not in o["Key"]]
    others = keys("team/db/") + keys("team/data/x/")
    assert others
    deleted = hosts["team"].cli("sync", "delete-remote", "team", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert sorted(keys("team/")) == sorted(others)
    for name in ("db", "dat"):
        listing = hosts[name].cli("sync", "ls", name)
        assert listing.returncode == 0 and len(listing.stdout.splitlines()) == 1


def test_credentials_in_the_endpoint_never_show(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    secret = "S3CR3T-in-the-url-0123456789"
    host = moto.url.removeprefix("http://")
    server = start(tmp_path / "root", s3_settings(f"http://AKIAUSER:{secret}@{host}"))
    create(server, "v", s3_bucket=bucket)
    s3 = restore_outcome(server, "v")
    message = s3["last_error"]["message"]
    assert "S3_ENDPOINT_URL" in message and "contains credentials" in message, message
    assert "***@" in message
    push = server.cli("sync", "ls", "v")
    assert push.returncode == 1 and "contains credentials" in push.stderr
    for text in (json.dumps(s3), push.stderr, server.log_text()):
        assert secret not in text
    for path in server.root.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path

    bad = start(tmp_path / "root2", s3_settings("localhost:9000"))
    create(bad, "w", s3_bucket=bucket)
    message = restore_outcome(bad, "w")["last_error"]["message"]
    assert "S3_ENDPOINT_URL 'localhost:9000' must start with http:// or https://" in message
