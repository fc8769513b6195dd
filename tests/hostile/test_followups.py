"""Follow-ups of the hardening issue, driven over the real server's socket: Remove answers in
time whatever the volume's size (the delete runs in the background and survives a kill -9),
snapshots say how far they are and an automatic one is cancelled by Remove, the last
`pyvol sync check` survives a restart, and junk names do not grow the snapshot store."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from functional_support import Plugin, PluginProcess
from orch_support import s3_settings
from sync_support import mount, s3_status, sync_servers, unmount, wait_for
from test_api_fuzz import rss

if TYPE_CHECKING:
    from s3_fixtures import MotoServer

pytest_plugins = ["s3_fixtures"]

M1, M2 = "a" * 64, "b" * 64


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
