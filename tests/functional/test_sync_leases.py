"""A volume used from two hosts (``-o s3_lease=true``) through the real server: one host
mounts it at a time, the other is refused naming it, the volume moves with its data once
the first host's push is done, a dead host's lease expires, and `pyvol lease` shows and
breaks it.

"Hosts" are two servers on roots of their own (each with its own host id) sharing one bucket
on the real S3 API (moto behind a relay); each is named by the ``HOST_NAME`` setting.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sync_support import (
    StartSync,
    SyncServer,
    build_tree,
    create,
    mount,
    s3_settings,
    s3_status,
    unmount,
    wait_pushed,
)

from tests.support.trees import picture
from tests.support.waiting import wait_for

pytest_plugins = ["s3_fixtures"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown of test trees needs root")

M1, M2 = "a" * 64, "b" * 64
TTL = "5s"


def host(start: StartSync, tmp_path: Path, name: str, url: str) -> SyncServer:
    return start(tmp_path / name, s3_settings(url, HOST_NAME=name))


def refusal(server: SyncServer, name: str) -> str:
    reply = server.client.send("VolumeDriver.Mount", {"Name": name, "ID": M2})
    err: str = reply.body.get("Err", "")
    assert err, f"the mount of {name} on {server.root.name} succeeded: {reply.body}"
    return err


def lease_of(server: SyncServer, name: str) -> dict[str, Any]:
    result = server.cli("lease", "show", name, "--json")
    assert result.returncode == 0, result.stderr
    shown: dict[str, Any] = json.loads(result.stdout)
    return shown


def test_a_leased_volume_is_mounted_on_one_host_at_a_time_and_moves_with_its_data(
        start: StartSync, relay: Any, bucket: str, tmp_path: Path) -> None:
    a = host(start, tmp_path, "host-a", relay.url)
    b = host(start, tmp_path, "host-b", relay.url)
    for server in (a, b):
        create(server, "db", s3_bucket=bucket, s3_lease="true", s3_lease_ttl=TTL)

    data = mount(a.client, "db", M1)
    build_tree(data, "written on a", big=4_000_000)
    on_a = picture(data)
    shown = s3_status(a.client, "db")["lease"]
    assert shown["holder"]["name"] == "host-a" and shown["state"] == "mounted", shown

    # While a has it mounted, b is refused, and told who has it and what it does.
    err = refusal(b, "db")
    assert "host-a" in err and "mounted" in err and "lease break" in err, err
    assert s3_status(b.client, "db")["lease"] == {"held": False}
    assert lease_of(b, "db")["holder"]["name"] == "host-a"

    # a lets go: its push runs, then the lease is free; b takes it and sees a's data.
    unmount(a.client, "db", M1)
    wait_pushed(a.client, "db")
    wait_for(lambda: lease_of(b, "db")["state"] == "free", 10, "a to free the lease")
    assert s3_status(a.client, "db")["lease"] == {"held": False}
    assert picture(mount(b.client, "db", M1)) == on_a
    assert s3_status(b.client, "db")["lease"]["holder"]["name"] == "host-b"
    assert "host-b" in refusal(a, "db")

    # A change on b goes back to a the same way.
    moved = b.root / "volumes" / "db"
    (moved / "tag").write_text("changed on b")
    on_b = picture(moved)
    unmount(b.client, "db", M1)
    wait_pushed(b.client, "db")
    wait_for(lambda: lease_of(a, "db")["state"] == "free", 10, "b to free the lease")
    relay.reset()
    assert picture(mount(a.client, "db", M1)) == on_b
    # a still had all but the changed file: it downloaded only that (and the tree).
    assert relay.reset().downloaded < 1_000_000
    unmount(a.client, "db", M1)


def test_a_dead_hosts_lease_expires_and_another_host_takes_over_its_last_push(
        start: StartSync, relay: Any, bucket: str, tmp_path: Path) -> None:
    a = host(start, tmp_path, "host-a", relay.url)
    create(a, "db", s3_bucket=bucket, s3_lease="true", s3_lease_ttl=TTL)
    data = mount(a.client, "db", M1)
    build_tree(data, "pushed")
    pushed = picture(data)
    assert a.cli("sync", "db", "--wait").returncode == 0
    (data / "tag").write_text("written after the last push")
    a.kill9()

    b = host(start, tmp_path, "host-b", relay.url)
    create(b, "db", s3_bucket=bucket, s3_lease="true", s3_lease_ttl=TTL)
    assert "host-a" in refusal(b, "db")
    started = time.monotonic()
    mounted = wait_for(lambda: b.client.send("VolumeDriver.Mount",
                                             {"Name": "db", "ID": M1}).body.get("Mountpoint"),
                       30, "a's lease to expire")
    assert time.monotonic() - started < 15
    assert picture(Path(mounted)) == pushed
    assert lease_of(b, "db")["holder"]["name"] == "host-b"

    # a comes back (a reboot) after b used the volume: its copy, with the write b never
    # saw, is behind the volume's line; its next Mount brings it to the newest snapshot.
    unmount(b.client, "db", M1)
    wait_for(lambda: lease_of(b, "db")["state"] == "free", 30, "b to free the lease")
    a = host(start, tmp_path, "host-a", relay.url)
    # a's dockerd never unmounts what its dead container had mounted: the stale mount must
    # not let a serve its copy (b went on without its last write): refused, saying how.
    err = refusal(a, "db")
    assert "taken over by another host" in err and "pyvol mounts reset db" in err, err
    assert a.cli("mounts", "reset", "db").returncode == 0
    # The reset is the Unmount that never came: a pushes the write b never saw, which is
    # kept aside, never the latest; a's next Mount pulls the volume's line.
    diverged = wait_for(lambda: s3_status(a.client, "db").get("diverged"), 30,
                        "a's push to be kept aside")
    assert len(diverged["snapshots"]) == 1, diverged
    assert picture(mount(a.client, "db", M2)) == pushed


def test_lease_show_and_break_by_hand(start: StartSync, relay: Any, bucket: str,
                                      tmp_path: Path) -> None:
    a = host(start, tmp_path, "host-a", relay.url)
    b = host(start, tmp_path, "host-b", relay.url)
    for server in (a, b):
        create(server, "db", s3_bucket=bucket, s3_lease="true", s3_lease_ttl="6s")
    assert lease_of(b, "db") == {"state": "none"}
    mount(a.client, "db", M1)
    text = b.cli("lease", "show", "db")
    assert text.returncode == 0 and "mounted, held by host-a" in text.stdout, text

    refused = b.cli("lease", "break", "db")
    assert refused.returncode != 0 and "--yes" in refused.stderr
    broke = b.cli("lease", "break", "db", "--yes")
    assert broke.returncode == 0 and "held by host-a" in broke.stdout, broke
    assert lease_of(b, "db")["state"] == "free"
    mount(b.client, "db", M1)
    # a finds out at its next renewal: Status says its tenure is lost.
    wait_for(lambda: s3_status(a.client, "db")["lease"].get("state") == "lost", 30,
             "a to notice its lease was broken")


def test_an_endpoint_without_conditional_writes_is_refused_at_mount(
        start: StartSync, relay: Any, bucket: str, tmp_path: Path) -> None:
    relay.strip_headers = ("if-none-match", "if-match")
    a = host(start, tmp_path, "host-a", relay.url)
    create(a, "db", s3_bucket=bucket, s3_lease="true")
    err = refusal(a, "db")
    assert "conditional writes" in err, err


def test_a_push_from_a_host_that_lost_the_lease_is_kept_aside_never_latest(
        start: StartSync, relay: Any, bucket: str, tmp_path: Path) -> None:
    a = host(start, tmp_path, "host-a", relay.url)
    b = host(start, tmp_path, "host-b", relay.url)
    for server in (a, b):
        create(server, "db", s3_bucket=bucket, s3_lease="true", s3_lease_ttl="1h")
    data = mount(a.client, "db", M1)
    (data / "tag").write_text("first, pushed while a held the lease")
    assert a.cli("sync", "db", "--wait").returncode == 0
    first = s3_status(a.client, "db")["last_push"]["remote_snapshot"]

    # a is cut off and given up for dead: its lease is broken and b takes over.
    assert b.cli("lease", "break", "db", "--yes").returncode == 0
    on_b = mount(b.client, "db", M1)
    assert (on_b / "tag").read_text() == "first, pushed while a held the lease"
    (on_b / "tag").write_text("b's, the volume's line from now on")
    unmount(b.client, "db", M1)
    latest = wait_pushed(b.client, "db")["last_push"]["remote_snapshot"]

    # a comes back and pushes what it wrote meanwhile: kept aside, never the latest.
    (data / "tag").write_text("a's, written after it lost the lease")
    unmount(a.client, "db", M1)
    diverged = wait_for(lambda: s3_status(a.client, "db").get("diverged"), 30,
                        "a's push to be kept aside")
    assert len(diverged["snapshots"]) == 1, diverged
    kept = diverged["snapshots"][0]
    rows = [line.split("\t") for line in b.cli("sync", "ls", "db").stdout.splitlines()]
    assert [r[0] for r in rows if len(r) == 4] == [first, latest]
    assert [r[0] for r in rows if r[-1] == "diverged"] == [kept]

    # The next host to mount gets b's data; a's is restorable by id.
    c = host(start, tmp_path, "host-c", relay.url)
    create(c, "db", s3_bucket=bucket, s3_lease="true")
    assert (mount(c.client, "db", M1) / "tag").read_text() == "b's, the volume's line from now on"
    d = host(start, tmp_path, "host-d", relay.url)
    create(d, "db", s3_bucket=bucket, s3_restore=kept, s3_sync="manual")
    assert (mount(d.client, "db", M1) / "tag").read_text() == \
        "a's, written after it lost the lease"


def test_an_independent_copy_reads_the_original_and_pushes_only_to_its_own_prefix(
        start: StartSync, relay: Any, bucket: str, tmp_path: Path) -> None:
    a = host(start, tmp_path, "host-a", relay.url)
    create(a, "db", s3_bucket=bucket, s3_lease="true", s3_lease_ttl="1h")
    data = mount(a.client, "db", M1)
    (data / "tag").write_text("the original")
    assert a.cli("sync", "db", "--wait").returncode == 0
    original = s3_status(a.client, "db")["last_push"]["remote_snapshot"]

    # While a holds the lease, b copies the last push into a volume of its own.
    b = host(start, tmp_path, "host-b", relay.url)
    create(b, "db-copy", s3_bucket=bucket, s3_copy_of="db")
    copy = mount(b.client, "db-copy", M1)
    assert (copy / "tag").read_text() == "the original"
    (copy / "tag").write_text("the copy")
    unmount(b.client, "db-copy", M1)
    wait_pushed(b.client, "db-copy")
    assert "host-a" in lease_of(a, "db")["holder"]["name"]
    assert [line.split("\t")[0] for line in a.cli("sync", "ls", "db").stdout.splitlines()] \
        == [original]
    assert len(b.cli("sync", "ls", "db-copy").stdout.splitlines()) == 1

    bad = b.client.send("VolumeDriver.Create", {"Name": "x", "Opts": {
        "s3_bucket": bucket, "s3_copy_of": "db", "s3_lease": "true"}}).body["Err"]
    assert "s3_copy_of" in bad and "s3_lease" in bad


def test_a_volume_without_s3_lease_never_pushes_into_a_leased_prefix(
        start: StartSync, relay: Any, bucket: str, tmp_path: Path) -> None:
    a = host(start, tmp_path, "host-a", relay.url)
    create(a, "db", s3_bucket=bucket, s3_lease="true", s3_lease_ttl="1h")
    mount(a.client, "db", M1)
    b = host(start, tmp_path, "host-b", relay.url)
    create(b, "db", s3_bucket=bucket)  # forgot -o s3_lease=true
    data = mount(b.client, "db", M1)
    (data / "tag").write_text("b's, unleased")
    unmount(b.client, "db", M1)
    diverged = wait_for(lambda: s3_status(b.client, "db").get("diverged"), 30,
                        "b's push to be kept aside")
    assert len(diverged["snapshots"]) == 1
    rows = a.cli("sync", "ls", "db").stdout.splitlines()
    assert [r.split("\t")[0] for r in rows] == diverged["snapshots"]  # listed, aside
    assert all(r.endswith("\tdiverged") for r in rows)  # nothing became the latest


def test_a_pull_longer_than_the_mount_deadline_goes_on_and_mount_says_how_far(
        start: StartSync, relay: Any, bucket: str, tmp_path: Path) -> None:
    a = host(start, tmp_path, "host-a", relay.url)
    b = start(tmp_path / "host-b", s3_settings(relay.url, HOST_NAME="host-b",
                                                PYVOL_TEST_MOUNT_WAIT="1"))
    for server in (a, b):
        create(server, "db", s3_bucket=bucket, s3_lease="true", s3_lease_ttl=TTL)
    data = mount(a.client, "db", M1)
    build_tree(data, "big", big=9_000_000)
    on_a = picture(data)
    unmount(a.client, "db", M1)
    wait_pushed(a.client, "db")
    wait_for(lambda: lease_of(b, "db")["state"] == "free", 10, "a to free the lease")

    go_on = threading.Event()

    def slow_data(method: str, path: str) -> int | None:
        if method == "GET" and "/data/" in path:
            go_on.wait(60)
        return None
    relay.fault = slow_data
    try:
        # b's pull outlasts the Mount's deadline: refused saying how far it is...
        err = refusal(b, "db")
        assert re.search(r"in progress, \d+% done", err), err
        # ...while b goes on pulling under its lease: a is refused, naming b and its pull.
        err = refusal(a, "db")
        assert "host-b" in err and "pulling" in err, err
    finally:
        go_on.set()
        relay.fault = None
    mounted = wait_for(lambda: b.client.send("VolumeDriver.Mount",
                                             {"Name": "db", "ID": M1}).body.get("Mountpoint"),
                       30, "b's pull to finish")
    assert picture(Path(mounted)) == on_a
