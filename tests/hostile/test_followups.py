"""Follow-ups of the hardening issue, driven over the real server's socket: Remove answers in
time whatever the volume's size (the delete runs in the background and survives a kill -9),
snapshots say how far they are and an automatic one is cancelled by Remove, the last
`pyvol sync check` survives a restart, and junk names do not grow the snapshot store."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from functional_support import Plugin, PluginProcess, StartServer
from orch_support import DEADLINE, Gate, timed
from sync_support import mount, s3_settings, s3_status, sync_servers, unmount

from tests.support.processes import rss
from tests.support.waiting import wait_for

if TYPE_CHECKING:
    from s3_fixtures import MotoServer

pytest_plugins = ["s3_fixtures"]

M1, M2 = "a" * 64, "b" * 64


def staged(root: Path) -> list[Path]:
    """Removed data not deleted yet: volumes' and snapshots' bins."""
    return sorted(p for area in ("volumes", "snapshots")
                  for p in (root / area / ".removing").glob(".*"))


def test_remove_answers_at_once_and_a_restart_finishes_the_delete_it_left(
        start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(tmp_path, "remove:purge")
    gate.arm(monkeypatch)
    root = tmp_path / "root"
    server = start_server(root)
    plugin = server.client
    plugin.ok("VolumeDriver.Create", {"Name": "big", "Opts": {"snapshot_on_remove": "delete"}})
    data = Path(plugin.ok("VolumeDriver.Mount", {"Name": "big", "ID": M1})["Mountpoint"])
    for i in range(2000):
        (data / f"f{i}").write_text(f"old {i}")
    plugin.ok("VolumeDriver.Unmount", {"Name": "big", "ID": M1})
    plugin.ok("pyvol/snapshot/create", {"Volume": "big", "Name": "s1"})

    _, took = timed(lambda: plugin.ok("VolumeDriver.Remove", {"Name": "big"}))
    assert took < 5.0, f"Remove answered after {took:.1f} s"
    assert plugin.ok("VolumeDriver.List", {})["Volumes"] == []
    assert plugin.fails("VolumeDriver.Get", {"Name": "big"}).startswith(
        "volume 'big' not found")
    gate.wait_held()  # the delete runs after Remove answered: parked before it starts
    assert (root / "volumes" / ".removing").exists()
    assert len(staged(root)) == 2  # the data and the snapshots, renamed away whole

    plugin.ok("VolumeDriver.Create", {"Name": "big", "Opts": None})  # the same name at once
    data = Path(plugin.ok("VolumeDriver.Mount", {"Name": "big", "ID": M2})["Mountpoint"])
    assert list(data.iterdir()) == []
    (data / "new").write_text("new")
    plugin.ok("VolumeDriver.Unmount", {"Name": "big", "ID": M2})
    assert plugin.ok("pyvol/snapshot/list", {"Volume": "big"})["Snapshots"] == []

    server.kill9()  # in the middle of the delete
    monkeypatch.delenv("PYVOL_TEST_HOLD_AT")
    plugin = start_server(root).client
    wait_for(lambda: staged(root) == [], 30, "the restart to finish the delete")
    assert [v["Name"] for v in plugin.ok("VolumeDriver.List", {})["Volumes"]] == ["big"]
    data = Path(plugin.ok("VolumeDriver.Mount", {"Name": "big", "ID": M1})["Mountpoint"])
    assert [p.name for p in data.iterdir()] == ["new"]
    assert plugin.ok("pyvol/snapshot/list", {"Volume": "big"})["Snapshots"] == []


def test_listing_snapshots_of_random_names_does_not_grow_the_server(
        server: PluginProcess, plugin: Plugin) -> None:
    (worker,) = server.workers

    def burst(count: int) -> None:
        for _ in range(count):
            name = "v" + secrets.token_hex(127)  # 255 characters: the longest valid name
            err = plugin.fails("pyvol/snapshot/list", {"Volume": name})
            assert err.startswith(f"volume {name!r} not found"), err[:100]
            err = plugin.fails("pyvol/snapshot/remove", {"Volume": name, "Name": "s1"})
            assert err.startswith(f"snapshot {name}@s1 not found"), err[:100]
    burst(1000)  # warm up the allocator
    before = rss(worker)
    burst(6000)
    grown = rss(worker) - before
    assert grown < 2 << 20, f"the server grew by {grown / (1 << 20):.1f} MiB for 6000 names"


def test_the_last_sync_check_survives_a_restart_and_goes_with_delete_remote(
        moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    with sync_servers(tmp_path) as start:
        server = start(tmp_path / "root", s3_settings(moto.url))
        server.client.ok("VolumeDriver.Create", {"Name": "db", "Opts": {
            "s3_bucket": bucket, "s3_sync": "manual"}})
        wait_for(lambda: s3_status(server.client, "db")["state"] == "idle", 30, "the restore")
        (mount(server.client, "db", M1) / "f").write_text("checked")
        unmount(server.client, "db", M1)
        assert server.cli("sync", "db", "--wait").returncode == 0
        assert server.cli("sync", "check", "db").returncode == 0
        before = s3_status(server.client, "db")["last_check"]
        assert before["ok"] is True and before["snapshots"] == 1, before
        server.stop()

        again = start(tmp_path / "root", s3_settings(moto.url))
        assert s3_status(again.client, "db")["last_check"] == before
        done = again.cli("sync", "delete-remote", "db", "--yes")
        assert done.returncode == 0, done.stderr
        assert "last_check" not in s3_status(again.client, "db")
        again.stop()
        third = start(tmp_path / "root", s3_settings(moto.url))
        assert "last_check" not in s3_status(third.client, "db")


def test_an_on_unmount_snapshot_says_how_far_it_is_and_remove_cancels_it(
        start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(tmp_path, "snapshot:capture")  # held once the first file is stored
    gate.arm(monkeypatch)
    root = tmp_path / "root"
    plugin = start_server(root).client
    plugin.ok("VolumeDriver.Create", {"Name": "slow", "Opts": {"snapshot_on_unmount": "true"}})
    data = Path(plugin.ok("VolumeDriver.Mount", {"Name": "slow", "ID": M1})["Mountpoint"])
    for i in range(50):
        (data / f"f{i:02}").write_bytes(os.urandom(100 << 10))
    plugin.ok("VolumeDriver.Unmount", {"Name": "slow", "ID": M1})
    gate.wait_held()

    status = plugin.volume("slow")["Status"]
    assert status["snapshot_state"] == "running"
    assert status["snapshot_progress"] == {
        "scanned": 51, "files_done": 1, "files_total": 50, "bytes_done": 100 << 10,
        "bytes_total": 50 * (100 << 10)}
    err, took = timed(lambda: plugin.fails("VolumeDriver.Mount", {"Name": "slow", "ID": M2}))
    assert took < DEADLINE, f"Mount answered after {took:.1f} s"
    assert re.search(r"volume 'slow' cannot be mounted yet: its snapshot on unmount \(running "
                     r"for \d+ s, 1 of 50 files, 0\.1 of 4\.9 MiB stored\) is still reading "
                     r"the data; try again shortly", err), err
    assert plugin.mounts("slow") == 0

    _, took = timed(lambda: plugin.ok("VolumeDriver.Remove", {"Name": "slow"}))
    assert took < 5.0, f"Remove answered after {took:.1f} s"
    assert plugin.ok("VolumeDriver.List", {})["Volumes"] == []
    # Cancelled: nothing of it committed, nothing of it left (snapshots are kept on remove).
    snapdir = root / "snapshots" / "slow"
    assert list((snapdir / "catalog").iterdir()) == []
    assert list((snapdir / "entries").iterdir()) == []
    assert [p for p in (snapdir / "objects").rglob("*") if p.is_file()] == []
    plugin.ok("VolumeDriver.Create", {"Name": "slow", "Opts": None})
    assert plugin.ok("pyvol/snapshot/list", {"Volume": "slow"})["Snapshots"] == []


def test_an_s3_sync_snapshot_shows_its_progress_in_status(
        moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    gate = Gate(tmp_path, "s3:capture")  # held once the first file is stored
    with sync_servers(tmp_path) as start:
        server = start(tmp_path / "root", s3_settings(moto.url, **gate.env))
        server.client.ok("VolumeDriver.Create", {"Name": "docs", "Opts": {
            "s3_bucket": bucket, "s3_sync": "manual"}})
        wait_for(lambda: s3_status(server.client, "docs")["state"] == "idle", 30, "the restore")
        data = mount(server.client, "docs", M1)
        for i in range(20):
            (data / f"f{i:02}").write_bytes(os.urandom(64 << 10))
        unmount(server.client, "docs", M1)
        server.client.ok("pyvol/sync/push", {"Volume": "docs"})
        gate.wait_held()
        s3 = s3_status(server.client, "docs")
        assert s3["snapshot_progress"] == {
            "scanned": 21, "files_done": 1, "files_total": 20, "bytes_done": 64 << 10,
            "bytes_total": 20 * (64 << 10)}, s3
        gate.release()
        wait_for(lambda: "snapshot_progress" not in s3_status(server.client, "docs"), 30,
                 "the capture to end")
