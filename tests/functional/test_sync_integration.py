"""S3 sync through the real server: options, push on unmount, restore at create on another
host, the durable queue across restarts and kill -9, faults of the store, and the CLI.

Each test talks to ``pyvol serve`` over its unix socket exactly as dockerd does, and to a real
S3 API (moto in its own process, behind a relay that can delay or fail requests).  "Another
host" is a second server on a root of its own with the same bucket.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sync_support import (
    StartSync,
    SyncServer,
    at_rest,
    build_tree,
    create,
    mount,
    s3_settings,
    s3_status,
    unmount,
    wait_pushed,
)

from tests.support.trees import files_containing, picture
from tests.support.waiting import wait_for

if TYPE_CHECKING:
    from s3_fixtures import MotoServer, Relay

pytest_plugins = ["s3_fixtures"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown of test trees needs root")

M1, M2 = "a" * 64, "b" * 64


@pytest.fixture
def start(start_each_backend: StartSync) -> StartSync:
    """The whole sync suite runs once per storage backend (``local``, ``image``)."""
    return start_each_backend


FAST_CALL = 1.5  # the relay holds every request 2 s: a call under this never waited on S3
"""Unmount and Remove must return within this, whatever the store does."""


@pytest.fixture
def relay(moto: MotoServer) -> Iterator[Relay]:
    """The relay of ``s3_fixtures``, except that a client going away mid-request (these tests
    kill servers) ends the connection quietly instead of raising in the relay's thread."""
    from s3_fixtures import Relay

    class QuietRelay(Relay):
        def _serve(self, conn: Any) -> None:
            try:
                super()._serve(conn)
            except OSError:
                conn.close()

    r = QuietRelay(moto.port)
    try:
        yield r
    finally:
        r.close()


def settings(url: str, bucket: str = "", **extra: str) -> dict[str, str]:
    """The plugin settings, with ``S3_BUCKET`` always set (empty: no default bucket)."""
    return s3_settings(url, S3_BUCKET=bucket, **extra)


_hosts = iter(range(1_000_000))


def elsewhere(start: StartSync, url: str, tmp_path: Path, bucket: str, prefix: str,
              **opts: str) -> Path:
    """Mount the remote copy at ``prefix`` as a new volume of another host (a server on a root
    of its own): two volumes of one host never share a prefix."""
    other = start(tmp_path / f"elsewhere-{next(_hosts)}", settings(url))
    create(other, "check", s3_bucket=bucket, s3_prefix=prefix, s3_sync="manual", **opts)
    return mount(other.client, "check", M1)


def remote_ids(server: SyncServer, name: str) -> list[str]:
    result = server.cli("sync", "ls", name)
    assert result.returncode == 0, result.stderr
    return [line.split("\t")[0] for line in result.stdout.splitlines()]


def quiet(moto: MotoServer, bucket: str, prefix: str) -> None:
    """Wait until no push or prune of ``prefix`` runs (the store holds no lock marker)."""
    client: Any = moto.client()
    wait_for(lambda: client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/locks/")
             .get("KeyCount", 0) == 0, 10, f"the S3 operations on {prefix} to end")


class Gate:
    """A relay fault that holds requests of ``method`` for pack data until ``open`` is set;
    with ``refuse`` the held requests are then answered 503 instead of forwarded (for a client
    that was killed meanwhile)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.open = threading.Event()
        self.held = threading.Event()
        self.refuse = False

    def __call__(self, method: str, path: str) -> int | None:
        if method != self.method or "/data/" not in path:
            return None
        self.held.set()
        self.open.wait(60)
        return 503 if self.refuse else None


@pytest.fixture
def gates(relay: Relay) -> Iterator[list[Gate]]:
    """Gates a test installs on the relay; all opened when it ends, whatever happened."""
    made: list[Gate] = []
    try:
        yield made
    finally:
        for gate in made:
            gate.refuse = True
            gate.open.set()


def write_and_unmount(server: SyncServer, name: str, fill: Callable[[Path], None]) -> float:
    data = mount(server.client, name, M1)
    fill(data)
    return unmount(server.client, name, M1)


def test_push_on_unmount_and_restore_at_create_on_another_host(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    first = start(tmp_path / "host-a", settings(moto.url))
    create(first, "photos", s3_bucket=bucket)
    # The restore at create finds an empty prefix: nothing to restore.
    s3 = wait_for(lambda: (s := s3_status(first.client, "photos"))["state"] == "idle" and s,
                  10, "the restore check at create")
    assert s3 == {"state": "idle", "bucket": bucket, "prefix": "photos", "mode": "on-unmount",
                  "keep": 30, "encrypted": False, "last_push": None}

    data = mount(first.client, "photos", M1)
    build_tree(data, "v1", big=3_000_000)
    expected = picture(data)
    took = unmount(first.client, "photos", M1)
    assert took < FAST_CALL
    s3 = wait_pushed(first.client, "photos")
    assert "last_error" not in s3
    listing = first.cli("sync", "ls", "photos")
    assert listing.returncode == 0, listing.stderr
    rows = [line.split("\t") for line in listing.stdout.splitlines()]
    assert len(rows) == 1
    snap_id, created, size, files = rows[0]
    assert snap_id == s3["last_push"]["remote_snapshot"]
    assert created.startswith(time.strftime("%Y-%m-%d", time.gmtime()))
    with at_rest(first, "photos") as data:
        inodes = {p.lstat().st_ino for p in data.rglob("*") if p.is_file() and not p.is_symlink()}
    assert int(files) == len(inodes)  # a hard link is one file
    assert int(size) >= 3_000_000

    second = start(tmp_path / "host-b", settings(moto.url))
    create(second, "photos", s3_bucket=bucket)
    restored = mount(second.client, "photos", M1)
    assert picture(restored) == expected
    s3 = s3_status(second.client, "photos")
    assert s3["state"] == "idle"
    assert "last_error" not in s3


def test_options_pick_bucket_prefix_mode_restore_and_keep(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    other = f"{bucket}-other"
    moto.client().create_bucket(Bucket=other)  # type: ignore[attr-defined]
    server = start(tmp_path / "root", settings(moto.url, bucket=bucket))
    create(server, "by-setting", s3_sync="manual")
    create(server, "tuned", s3_sync="10m", s3_prefix="/team/tuned/", s3_keep="5",
           s3_restore="never")
    create(server, "elsewhere", s3_bucket=other)
    create(server, "plain")

    tuned = s3_status(server.client, "tuned")
    assert tuned == {"state": "idle", "bucket": bucket, "prefix": "team/tuned",
                     "mode": "every 600s", "keep": 5, "encrypted": False,
                     "last_push": None}
    by_setting = wait_for(lambda: (s := s3_status(server.client, "by-setting"))["state"] == "idle"
                          and s, 10, "the restore check of by-setting")
    assert (by_setting["bucket"], by_setting["prefix"], by_setting["mode"]) == (
        bucket, "by-setting", "manual")
    assert s3_status(server.client, "elsewhere")["bucket"] == other
    assert "s3" not in server.client.volume("plain")["Status"]

    for opts, message in (({"s3_sync": "sometimes"}, "must be on-unmount, manual or a duration"),
                          ({"s3_keep": "0"}, "must be a positive whole number"),
                          ({"s3_prefix": "../up"}, "must be a relative key prefix"),
                          ({"s3_restore": "latest!"}, "must be latest, never or a remote")):
        err = server.client.fails("VolumeDriver.Create", {"Name": "bad", "Opts": opts})
        assert message in err, err
    assert "not found" in server.client.fails("VolumeDriver.Get", {"Name": "bad"})

    # Manual: the last unmount pushes nothing.
    write_and_unmount(server, "by-setting", lambda d: (d / "f").write_text("x"))
    # (A push is queued within the Unmount call: had one been, Status would say so now.)
    assert s3_status(server.client, "by-setting")["state"] == "idle"
    assert s3_status(server.client, "by-setting")["last_push"] is None
    assert remote_ids(server, "by-setting") == []
    server.stop()

    # The bucket resolved at create stays, even when the plugin's default changes; a server
    # without a default refuses -o s3_sync alone, saying where the bucket goes.
    again = start(tmp_path / "root", settings(moto.url))
    assert s3_status(again.client, "by-setting")["bucket"] == bucket
    assert s3_status(again.client, "tuned") == tuned
    err = again.client.fails("VolumeDriver.Create", {"Name": "nobucket",
                                                      "Opts": {"s3_sync": "manual"}})
    assert "S3 sync needs a bucket" in err and "S3_BUCKET" in err, err


def test_credential_options_are_refused_saying_where_credentials_go(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(moto.url))
    value = "not-a-real-secret-but-treat-it-as-one-42"
    for key in ("aws_secret_access_key", "AWS_ACCESS_KEY_ID", "s3_secret", "s3-password",
                "s3_session_token", "credentials"):
        err = server.client.fails("VolumeDriver.Create", {
            "Name": "v", "Opts": {"s3_bucket": bucket, key: value}})
        assert "credentials are never volume options" in err, (key, err)
        assert "docker plugin set pyvol AWS_ACCESS_KEY_ID=" in err, (key, err)
        assert value not in err
        assert "not found" in server.client.fails("VolumeDriver.Get", {"Name": "v"})
    assert server.client.ok("VolumeDriver.List", {})["Volumes"] == []
    assert value not in server.log_text()
    assert files_containing(server.root, value.encode()) == []


def test_secrets_never_reach_inspect_logs_or_state(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    from s3_fixtures import ACCESS_KEY, SECRET_KEY

    root = tmp_path / "root"
    server = start(root, settings(moto.url, LOG_LEVEL="DEBUG"))
    create(server, "vault", s3_bucket=bucket)
    write_and_unmount(server, "vault", lambda d: build_tree(d, "secret-test"))
    wait_pushed(server.client, "vault")
    # A failed push too: its error message must not carry the secret either.
    create(server, "nobucket", s3_bucket=f"{bucket}-missing", s3_restore="never")
    write_and_unmount(server, "nobucket", lambda d: (d / "f").write_text("x"))
    wait_for(lambda: s3_status(server.client, "nobucket")["state"] == "error", 15,
             "the push to a missing bucket to fail")
    shown = [
        server.client.send("VolumeDriver.Get", {"Name": "vault"}).raw.decode(),
        server.client.send("VolumeDriver.Get", {"Name": "nobucket"}).raw.decode(),
        server.client.send("VolumeDriver.List", {}).raw.decode(),
        server.cli("sync", "ls", "--json", "vault").stdout,
        server.cli("sync", "vault", "--wait").stdout,
    ]
    server.stop()
    log = server.log_text()
    assert "botocore" in log, "DEBUG logging did not reach the log; the check proves nothing"
    assert SECRET_KEY not in log
    assert files_containing(root, SECRET_KEY.encode()) == []
    for text in shown:
        assert SECRET_KEY not in text
        assert ACCESS_KEY not in text


def test_view_is_taken_after_the_last_container_detached(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(moto.url))
    plugin = server.client
    create(server, "shared", s3_bucket=bucket)
    data = mount(plugin, "shared", M1)
    mount(plugin, "shared", M2)
    (data / "tag").write_text("v1")
    unmount(plugin, "shared", M1)  # another container still uses it: no push queued
    assert s3_status(plugin, "shared")["last_push"] is None
    assert s3_status(plugin, "shared")["state"] == "idle"
    (data / "tag").write_text("v2")
    assert unmount(plugin, "shared", M2) < FAST_CALL
    # A container starting right away writes after the unmount: not part of that push.
    data = mount(plugin, "shared", M1)
    (data / "tag").write_text("v3")
    pushed = wait_pushed(plugin, "shared")["last_push"]["remote_snapshot"]
    assert remote_ids(server, "shared") == [pushed]

    check = elsewhere(start, moto.url, tmp_path, bucket, "shared", s3_restore=pushed)
    assert (check / "tag").read_text() == "v2"
    unmount(plugin, "shared", M1)
    newer = wait_pushed(plugin, "shared", pushed)["last_push"]["remote_snapshot"]
    assert remote_ids(server, "shared") == [pushed, newer]


def test_periodic_sync_pushes_while_mounted_and_on_unmount(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(moto.url))
    plugin = server.client
    create(server, "live", s3_bucket=bucket, s3_sync="1s")
    assert s3_status(plugin, "live")["mode"] == "every 1s"
    data = mount(plugin, "live", M1)
    (data / "tag").write_text("p1")
    first = wait_pushed(plugin, "live", timeout=15)["last_push"]
    assert plugin.mounts("live") == 1
    (data / "tag").write_text("p2")
    second = wait_pushed(plugin, "live", first["at"], timeout=15)["last_push"]
    while second["remote_snapshot"] == first["remote_snapshot"]:  # p2 not written yet: a no-op
        second = wait_pushed(plugin, "live", second["at"], timeout=15)["last_push"]
    assert plugin.mounts("live") == 1
    (data / "tag").write_text("p3")
    unmount(plugin, "live", M1)
    # The push the unmount queued is pending until done: idle means it is in the store.
    wait_pushed(plugin, "live", second["at"], timeout=15)
    assert (elsewhere(start, moto.url, tmp_path, bucket, "live") / "tag").read_text() == "p3"
    assert len(remote_ids(server, "live")) >= 3


def test_manual_push_with_wait_and_keep_prunes_old_remote_snapshots(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(moto.url))
    create(server, "kept", s3_bucket=bucket, s3_sync="manual", s3_keep="2")
    pushed = []
    for i in range(3):
        write_and_unmount(server, "kept", lambda d, i=i: (d / "tag").write_text(f"v{i}"))
        result = server.cli("sync", "kept", "--wait")
        assert result.returncode == 0, result.stderr
        match = re.fullmatch(r"pushed kept as remote snapshot (\S+)\n", result.stdout)
        assert match, result.stdout
        pushed.append(match.group(1))
        assert s3_status(server.client, "kept")["last_push"]["remote_snapshot"] == pushed[-1]
    listing = server.cli("sync", "ls", "kept").stdout.splitlines()
    assert [row.split("\t")[0] for row in listing] == pushed[1:]
    times = [row.split("\t")[1] for row in listing]
    assert times == sorted(times)

    queued = server.cli("sync", "kept")
    assert queued.returncode == 0
    assert queued.stdout.startswith("push of kept queued")
    usage = server.cli("sync", "ls")
    assert usage.returncode != 0 and "usage: pyvol sync VOLUME [--wait]" in usage.stderr


@pytest.mark.parametrize("fault", ["endpoint down", "HTTP 503 on writes"])
def test_store_faults_retry_with_backoff_and_touch_nothing(
        start: StartSync, moto: MotoServer, relay: Relay, bucket: str, tmp_path: Path,
        fault: str) -> None:
    server = start(tmp_path / "root", settings(relay.url))
    plugin = server.client
    create(server, "docs", s3_bucket=bucket)
    data = mount(plugin, "docs", M1)
    build_tree(data, "v1")
    v1 = picture(data)
    unmount(plugin, "docs", M1)
    first = wait_pushed(plugin, "docs")["last_push"]
    quiet(moto, bucket, "docs")

    if fault == "endpoint down":
        relay.down = True
    else:
        relay.fault = lambda method, path: 503 if method in ("PUT", "POST", "DELETE") else None
    data = mount(plugin, "docs", M1)
    (data / "tag").write_text("v2")
    (data / "added").write_bytes(os.urandom(50_000))
    v2 = picture(data)
    assert unmount(plugin, "docs", M1) < FAST_CALL

    def failed_twice() -> dict[str, Any] | None:
        s3 = s3_status(plugin, "docs")
        return s3 if server.log_text().count("push to s3://") >= 2 and \
            s3["state"] == "error" else None
    s3 = wait_for(failed_twice, 20, "two failed attempts")
    assert s3["last_push"] == first, "a failed push must never look like a success"
    assert s3["last_error"]["at"] > first["at"]
    expected = "cannot reach the S3 endpoint" if fault == "endpoint down" else "HTTP 503"
    assert expected in s3["last_error"]["message"], s3
    delays = [int(d) for d in re.findall(
        rf"volume docs: push to s3://{bucket}/docs failed \(retry in (\d+) s\)",
        server.log_text())]
    assert len(delays) >= 2 and delays[1] > delays[0], delays
    with at_rest(server, "docs") as data:
        assert picture(data) == v2, "a failing push changed local data"

    # The previous remote snapshot is still listed and restorable (reads work here for the
    # 503 fault, after the outage otherwise).
    if fault == "endpoint down":
        listing = server.cli("sync", "ls", "docs")
        assert listing.returncode == 1 and "cannot reach the S3 endpoint" in listing.stderr
        relay.down = False
    old = elsewhere(start, moto.url, tmp_path, bucket, "docs",
                    s3_restore=first["remote_snapshot"])
    assert picture(old) == v1

    relay.fault = None
    s3 = wait_pushed(plugin, "docs", first["at"], timeout=20)
    assert "last_error" not in s3
    assert remote_ids(server, "docs") == [first["remote_snapshot"],
                                          s3["last_push"]["remote_snapshot"]]
    assert picture(elsewhere(start, moto.url, tmp_path, bucket, "docs")) == v2


def test_missing_bucket_is_reported_and_recovers_once_created(
        start: StartSync, moto: MotoServer, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(moto.url))
    plugin = server.client
    missing = f"pyvol-missing-{os.getpid()}-{time.monotonic_ns()}"
    create(server, "fresh", s3_bucket=missing)
    create(server, "writer", s3_bucket=missing, s3_restore="never", s3_sync="manual")

    # The restore at create cannot look at the bucket: Status says so, Mount refuses.
    s3 = wait_for(lambda: (s := s3_status(plugin, "fresh")).get("last_error") and s, 15,
                  "the restore at create to fail")
    assert s3["state"] == "error", s3
    assert f"bucket '{missing}' does not exist" in s3["last_error"]["message"]
    err = plugin.fails("VolumeDriver.Mount", {"Name": "fresh", "ID": M1})
    assert "has not completed" in err and "pyvol sync restore fresh latest" in err, err
    assert plugin.mounts("fresh") == 0

    # A push to it fails clearly (`--wait` exits 1 saying why) and is retried; local data
    # stays as it was.
    data = mount(plugin, "writer", M1)
    build_tree(data, "w1")
    expected = picture(data)
    unmount(plugin, "writer", M1)
    result = server.cli("sync", "writer", "--wait")
    assert result.returncode == 1
    assert result.stderr.startswith(f"pyvol: push of writer failed: bucket '{missing}' does "
                                    "not exist"), result.stderr
    assert result.stderr.endswith("(it is retried in the background)\n")
    s3 = s3_status(plugin, "writer")
    assert s3["state"] == "error"
    assert "create it" in s3["last_error"]["message"]
    assert s3["last_push"] is None
    assert f"volume writer: push to s3://{missing}/writer failed" in server.log_text()
    with at_rest(server, "writer") as data:
        assert picture(data) == expected

    moto.client().create_bucket(Bucket=missing)  # type: ignore[attr-defined]
    s3 = wait_pushed(plugin, "writer", timeout=20)
    assert "last_error" not in s3
    # What the refusal told the user to do works: the volume becomes usable.
    result = server.cli("sync", "restore", "fresh", "latest")
    assert result.returncode == 0, result.stderr
    assert s3_status(plugin, "fresh")["state"] == "idle"
    assert list(mount(plugin, "fresh", M1).iterdir()) == []


def test_unmount_and_remove_never_wait_on_the_store_and_pending_pushes_complete(
        start: StartSync, relay: Relay, bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(relay.url))
    plugin = server.client
    expected = {}
    for name in ("slow", "dead"):
        create(server, name, s3_bucket=bucket, s3_restore="never")
    relay.fault = lambda method, path: time.sleep(2) or None  # type: ignore[func-returns-value]
    for name in ("slow", "dead"):
        if name == "dead":
            relay.down = True
        data = mount(plugin, name, M1)
        build_tree(data, name)
        expected[name] = picture(data)
        assert unmount(plugin, name, M1) < FAST_CALL
        assert s3_status(plugin, name)["state"] in ("pending", "syncing")
        started = time.monotonic()
        plugin.ok("VolumeDriver.Remove", {"Name": name})
        assert time.monotonic() - started < FAST_CALL
        assert not data.exists()
        assert "not found" in plugin.fails("VolumeDriver.Get", {"Name": name})

    relay.down = False
    relay.fault = None
    for name in ("slow", "dead"):
        wait_for(lambda name=name: f"volume {name}: pushed remote snapshot" in server.log_text(),
                 20, f"the pending push of the removed volume {name}")
    other = start(tmp_path / "other-host", settings(relay.url))
    for name in ("slow", "dead"):
        create(other, name, s3_bucket=bucket)
        assert picture(mount(other.client, name, M1)) == expected[name]


def test_pending_push_survives_kill_9_and_restart(
        start: StartSync, relay: Relay, gates: list[Gate], bucket: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    server = start(root, settings(relay.url))
    create(server, "durable", s3_bucket=bucket)
    gate = Gate("PUT")
    gates.append(gate)
    relay.fault = gate
    data = mount(server.client, "durable", M1)
    build_tree(data, "k1", big=4_000_000)
    expected = picture(data)
    total = sum(p.stat().st_size for p in data.rglob("*")
                if p.is_file() and not p.is_symlink() and p.name != "tag-hardlink")
    unmount(server.client, "durable", M1)
    assert gate.held.wait(15), "the push never started uploading"
    s3 = s3_status(server.client, "durable")
    assert s3["state"] == "syncing", s3
    assert s3["bytes_total"] == total and 0 < s3["bytes_done"] <= total, s3
    server.kill9()
    relay.fault = None
    gate.refuse = True
    gate.open.set()

    again = start(root, settings(relay.url))
    s3 = wait_pushed(again.client, "durable", timeout=20)
    assert remote_ids(again, "durable") == [s3["last_push"]["remote_snapshot"]]

    # A graceful restart while the store is down: the push waits in the queue, then resumes.
    relay.down = True
    write_and_unmount(again, "durable", lambda d: (d / "tag").write_text("k2"))
    wait_for(lambda: s3_status(again.client, "durable")["state"] == "error", 15,
             "the push to fail")
    again.stop()
    relay.down = False
    third = start(root, settings(relay.url))
    assert s3_status(third.client, "durable")["last_push"] == s3["last_push"]
    latest = wait_pushed(third.client, "durable", s3["last_push"]["at"], timeout=20)
    ids = remote_ids(third, "durable")
    assert ids == [s3["last_push"]["remote_snapshot"], latest["last_push"]["remote_snapshot"]]

    elsewhere = start(tmp_path / "other-host", settings(relay.url))
    create(elsewhere, "durable", s3_bucket=bucket, s3_restore=ids[0])
    assert picture(mount(elsewhere.client, "durable", M1)) == expected


def test_mount_waits_for_the_restore_at_create_which_survives_kill_9(
        start: StartSync, relay: Relay, gates: list[Gate], bucket: str, tmp_path: Path) -> None:
    source = start(tmp_path / "host-a", settings(relay.url))
    create(source, "big", s3_bucket=bucket)
    data = mount(source.client, "big", M1)
    build_tree(data, "big", big=9_000_000)
    expected = picture(data)
    unmount(source.client, "big", M1)
    wait_pushed(source.client, "big")

    # The restore at create of another host is under way when its plugin is killed.
    gate = Gate("GET")
    gates.append(gate)
    relay.fault = gate
    target = start(tmp_path / "host-b", settings(relay.url))
    create(target, "big", s3_bucket=bucket)
    s3 = wait_for(lambda: (s := s3_status(target.client, "big")).get("bytes_total") and s, 10,
                  "the restore to start")
    assert s3["state"] == "restoring"
    assert s3["bytes_total"] >= 9_000_000
    path = Path(target.client.volume("big")["Mountpoint"])  # (a sized volume's: not mounted)
    shown = list(path.iterdir()) if path.exists() else []
    assert shown == [], "a restoring volume shows part of its content"
    target.kill9()
    gate.refuse = True
    gate.open.set()

    # Restarted, it restores again; a Mount meanwhile waits for the whole volume.
    gate = Gate("GET")
    gates.append(gate)
    relay.fault = gate
    target = start(tmp_path / "host-b", settings(relay.url))
    assert s3_status(target.client, "big")["state"] == "restoring"
    result: dict[str, Any] = {}
    mounter = threading.Thread(target=lambda: result.update(
        mountpoint=mount(target.client, "big", M1), seen=picture(path)))
    mounter.start()
    mounter.join(1.5)
    assert mounter.is_alive(), "Mount returned while the restore was still running"
    assert (list(path.iterdir()) if path.exists() else []) == []
    gate.open.set()
    mounter.join(30)
    assert result["seen"] == expected
    assert s3_status(target.client, "big")["state"] == "idle"


def test_mount_during_a_long_restore_fails_saying_how_far_it_is(
        start: StartSync, relay: Relay, gates: list[Gate], bucket: str, tmp_path: Path) -> None:
    source = start(tmp_path / "host-a", settings(relay.url))
    create(source, "slow", s3_bucket=bucket)
    write_and_unmount(source, "slow", lambda d: build_tree(d, "slow", big=9_000_000))
    wait_pushed(source.client, "slow")

    gate = Gate("GET")
    gates.append(gate)
    relay.fault = gate
    target = start(tmp_path / "host-b", settings(relay.url, PYVOL_TEST_MOUNT_WAIT="1"))
    create(target, "slow", s3_bucket=bucket)
    err = target.client.fails("VolumeDriver.Mount", {"Name": "slow", "ID": M1})
    assert re.search(rf"volume 'slow': restore from s3://{bucket}/slow in progress, \d+% done; "
                     r"try again shortly", err), err
    assert target.client.mounts("slow") == 0
    gate.open.set()
    wait_for(lambda: s3_status(target.client, "slow")["state"] == "idle", 30,
             "the restore to finish")
    assert (mount(target.client, "slow", M1) / "tag").read_text() == "slow"


def test_restore_in_place_from_the_cli_keeps_a_safety_snapshot(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(moto.url))
    plugin = server.client
    create(server, "site", s3_bucket=bucket, s3_sync="manual")
    pictures = []
    for tag in ("r1", "r2"):
        data = mount(plugin, "site", M1)
        for child in data.iterdir():
            child.unlink() if not child.is_dir() or child.is_symlink() else None
        (data / "tag").write_text(tag)
        (data / f"only-in-{tag}").write_text(tag)
        pictures.append(picture(data))
        unmount(plugin, "site", M1)
        assert server.cli("sync", "site", "--wait").returncode == 0
    ids = remote_ids(server, "site")
    assert len(ids) == 2

    mount(plugin, "site", M1)
    busy = server.cli("sync", "restore", "site", ids[0])
    assert busy.returncode == 1 and "is in use by 1 mount(s)" in busy.stderr, busy.stderr
    unmount(plugin, "site", M1)
    bogus = server.cli("sync", "restore", "site", "20200101T000000Z-nope")
    assert bogus.returncode == 1
    assert "not found" in bogus.stderr and "pyvol sync ls site" in bogus.stderr, bogus.stderr
    with at_rest(server, "site") as data:
        assert picture(data) == pictures[1]

    done = server.cli("sync", "restore", "site", ids[0])
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(rf"restored site from remote snapshot {ids[0]}; previous content kept "
                         r"as site@(pre-restore-\S+)\n", done.stdout)
    assert match, done.stdout
    data = mount(plugin, "site", M1)
    assert picture(data) == pictures[0]
    unmount(plugin, "site", M1)
    back = server.cli("snapshot", "restore", f"site@{match.group(1)}")
    assert back.returncode == 0, back.stderr
    assert picture(mount(plugin, "site", M1)) == pictures[1]
    unmount(plugin, "site", M1)

    refused = server.cli("sync", "delete-remote", "site")
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    assert remote_ids(server, "site") == ids
    gone = server.cli("sync", "delete-remote", "site", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert remote_ids(server, "site") == []
    objects = moto.client().list_objects_v2(Bucket=bucket, Prefix="site/")  # type: ignore[attr-defined]
    assert objects.get("KeyCount", 0) == 0
    assert picture(mount(plugin, "site", M1)) == pictures[1], "delete-remote touched local data"


def test_remove_then_create_again_at_once_restores_the_newest_data(
        start: StartSync, relay: Relay, bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(relay.url))
    plugin = server.client
    create(server, "again", s3_bucket=bucket)
    write_and_unmount(server, "again", lambda d: (d / "tag").write_text("old"))
    wait_pushed(plugin, "again")
    relay.fault = lambda method, path: time.sleep(0.5) or None  # type: ignore[func-returns-value]
    write_and_unmount(server, "again", lambda d: (d / "tag").write_text("new"))
    plugin.ok("VolumeDriver.Remove", {"Name": "again"})
    create(server, "again", s3_bucket=bucket)
    assert (mount(plugin, "again", M1) / "tag").read_text() == "new"
    unmount(plugin, "again", M1)
    relay.fault = None
    wait_pushed(plugin, "again", timeout=20)


def test_a_push_requested_while_another_uploads_is_not_lost(
        start: StartSync, relay: Relay, gates: list[Gate], bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(relay.url))
    plugin = server.client
    create(server, "busy", s3_bucket=bucket, s3_restore="never")
    gate = Gate("PUT")
    gates.append(gate)
    relay.fault = gate
    write_and_unmount(server, "busy", lambda d: build_tree(d, "b1", big=2_000_000))
    assert gate.held.wait(15), "the first push never started uploading"
    data = mount(plugin, "busy", M1)
    (data / "tag").write_text("b2")
    expected = picture(data)
    unmount(plugin, "busy", M1)
    assert s3_status(plugin, "busy")["state"] == "syncing"
    gate.open.set()

    def two_pushes() -> bool:
        s3 = s3_status(plugin, "busy")
        return s3["state"] == "idle" and len(remote_ids(server, "busy")) == 2
    wait_for(two_pushes, 20, "both pushes", pause=0.3)
    assert picture(elsewhere(start, relay.url, tmp_path, bucket, "busy")) == expected


def test_volumes_whose_remote_copies_nest_are_refused_at_create(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(moto.url))
    create(server, "a", s3_bucket=bucket, s3_prefix="team")
    create(server, "g", s3_bucket=bucket, s3_prefix="ops/db")
    for name, prefix, how, other in (
            ("b", "team/db", "lies inside", "team"), ("c", "/team/", "is the same as", "team"),
            ("d", "team/db/x", "lies inside", "team"), ("h", "ops", "contains", "ops/db")):
        err = server.client.fails("VolumeDriver.Create", {"Name": name, "Opts": {
            "s3_bucket": bucket, "s3_prefix": prefix}})
        owner = "a" if other == "team" else "g"
        assert err == (
            f"volume {name!r}: its remote copy s3://{bucket}/{prefix.strip('/')} {how} the "
            f"remote copy s3://{bucket}/{other} of volume {owner!r}: give it an s3_prefix that "
            "neither contains nor lies inside another volume's"), err
    err = server.client.fails("VolumeDriver.Create", {"Name": "team", "Opts": {
        "s3_bucket": bucket}})  # the default prefix is the volume's name
    assert "is the same as the remote copy" in err and "volume 'a'" in err, err
    create(server, "e", s3_bucket=bucket, s3_prefix="teamdb")  # not inside "team"
    moto.client().create_bucket(Bucket=f"{bucket}-x")  # type: ignore[attr-defined]
    create(server, "f", s3_bucket=f"{bucket}-x", s3_prefix="team")  # another bucket
    names = [v["Name"] for v in server.client.ok("VolumeDriver.List", {})["Volumes"]]
    assert names == ["a", "e", "f", "g"]


def sync_snapshots(server: SyncServer, volume: str) -> list[str]:
    catalog = server.root / "snapshots" / volume / "catalog"
    return sorted(p.stem for p in catalog.glob("sync-*.json"))


def test_snapshot_cleanup_keeps_the_snapshot_a_pending_push_needs(
        start: StartSync, relay: Relay, bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(relay.url))
    plugin = server.client
    create(server, "old", s3_bucket=bucket, s3_restore="never")
    plugin.ok("pyvol/snapshot/create", {"Volume": "old", "Name": "manual1"})
    relay.down = True
    write_and_unmount(server, "old", lambda d: (d / "tag").write_text("precious"))
    plugin.ok("VolumeDriver.Remove", {"Name": "old"})  # the push stays pending
    wait_for(lambda: "volume old: push to s3://" in server.log_text(), 15, "a failed push")
    (needed,) = sync_snapshots(server, "old")

    result = server.cli("snapshot", "rm", f"old@{needed}")
    assert result.returncode == 1, result
    assert f"snapshot old@{needed} is kept for S3: the pending push to s3://{bucket}/old " \
        "uploads it" in result.stderr, result.stderr
    result = server.cli("snapshot", "rm", "--all", "old")
    assert result.returncode == 0, result.stderr
    assert f"kept old@{needed}: S3 sync still needs it" in result.stdout, result.stdout
    assert sync_snapshots(server, "old") == [needed]
    assert not (server.root / "snapshots" / "old" / "catalog" / "manual1.json").exists()

    relay.down = False
    wait_for(lambda: "volume old: pushed remote snapshot" in server.log_text(), 30,
             "the pending push to complete")
    assert (elsewhere(start, relay.url, tmp_path, bucket, "old") / "tag").read_text() == \
        "precious"


def test_a_push_whose_snapshot_is_gone_says_so_and_stops_retrying(
        start: StartSync, relay: Relay, bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", settings(relay.url))
    create(server, "lost", s3_bucket=bucket, s3_restore="never")
    relay.down = True
    write_and_unmount(server, "lost", lambda d: (d / "tag").write_text("v1"))
    wait_for(lambda: s3_status(server.client, "lost")["state"] == "error", 15, "a failed push")
    server.kill9()
    for path in (server.root / "snapshots" / "lost" / "catalog").glob("sync-*.json"):
        path.unlink()  # gone behind pyvol's back (pyvol itself refuses to remove it)
    relay.down = False
    server = start(tmp_path / "root", settings(relay.url))

    def gone() -> dict[str, Any] | None:
        s3 = s3_status(server.client, "lost")
        return s3 if "is gone" in (s3.get("last_error") or {}).get("message", "") else None
    s3 = wait_for(gone, 15, "the push to report its snapshot gone")
    assert s3["state"] == "error", s3
    assert re.fullmatch(r"the local snapshot lost@sync-\S+ this push needed is gone \(deleted "
                        r"outside pyvol\?\), so nothing was uploaded; push again with `pyvol "
                        r"sync lost` if the volume still exists", s3["last_error"]["message"])
    attempts = server.log_text().count("volume lost: push to s3://")
    time.sleep(3)  # retries come after 1 s, 2 s: none may come
    assert server.log_text().count("volume lost: push to s3://") == attempts
    assert server.cli("sync", "lost", "--wait").returncode == 0
    assert "last_error" not in s3_status(server.client, "lost")


def test_each_feature_keeps_its_own_errors(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    server = start(tmp_path / "root", settings(
        moto.url, PYVOL_TEST_FAIL_AT=f"snapshot:automatic={flag}"))
    plugin = server.client
    # An S3 restore that fails is an S3 error, not a snapshot error.
    create(server, "lone", s3_bucket=bucket, s3_restore="nosuchid")
    s3 = wait_for(lambda: (s := s3_status(plugin, "lone")).get("last_error") and s, 15,
                  "the failed restore")
    assert s3["last_error"]["message"].startswith("restore failed: remote snapshot 'nosuchid' "
                                                  "not found"), s3
    assert "snapshot_error" not in plugin.volume("lone")["Status"]

    # A failed snapshot stays reported after a successful S3 push of the same volume.
    flag.touch()
    create(server, "both", s3_bucket=bucket, snapshot_on_unmount="true")
    write_and_unmount(server, "both", lambda d: (d / "tag").write_text("x"))
    wait_pushed(plugin, "both")
    status = plugin.volume("both")["Status"]
    assert status.get("snapshot_error", "").startswith(
        "snapshot on unmount failed: injected failure"), status


def test_a_failed_capture_shows_in_status_and_is_retried(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    server = start(tmp_path / "root", settings(moto.url, PYVOL_TEST_FAIL_AT=f"s3:capture={flag}"))
    plugin = server.client
    create(server, "cap", s3_bucket=bucket)
    write_and_unmount(server, "cap", lambda d: (d / "tag").write_text("x"))

    def failed() -> dict[str, Any] | None:
        s3 = s3_status(plugin, "cap")
        return s3 if s3["state"] == "error" else None
    s3 = wait_for(failed, 15, "the failed capture in Status")
    assert s3["last_error"]["message"] == ("the snapshot for the push failed: injected failure "
                                           "at s3:capture (test hook)"), s3
    assert "snapshot_error" not in plugin.volume("cap")["Status"]
    flag.unlink()
    wait_pushed(plugin, "cap", timeout=30)
