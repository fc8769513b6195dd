"""kill -9 at each step of Create (``PYVOL_TEST_CRASH_AT``), then a restart on the same root:
dockerd's retried Create with the same options succeeds, the volume has the options asked for
(never the defaults of an adopted directory), and an S3 volume is not served before its
restore finished, then is served restored (not empty)."""

from __future__ import annotations

import http.client
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from functional_support import Plugin, PluginProcess, StartServer
from orch_support import Gate
from sync_support import mount, s3_settings, s3_status, sync_servers, unmount, wait_pushed

from tests.support.processes import alive
from tests.support.waiting import wait_for

if TYPE_CHECKING:
    from s3_fixtures import MotoServer

pytest_plugins = ["s3_fixtures"]

POINTS = ["create:after-record", "create:after-data", "create:after-commit"]
M1 = "a" * 64


def create_killed(plugin: Plugin, server: PluginProcess, name: str, opts: dict[str, str]) -> None:
    """Create, which the server's crash hook answers by dying; wait until it is gone."""
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plugin.send("VolumeDriver.Create", {"Name": name, "Opts": opts})
    assert server.proc is not None
    assert server.proc.wait(10) is not None, "the server survived its crash point"
    # Also until nothing answers on the socket: a worker the master forked again just before
    # it died would accept the next server's first call and then vanish.
    wait_for(lambda: not any(alive(pid) for pid in server.workers) and not server._listening(),
             10, "the killed worker to be gone")


@pytest.mark.parametrize("point", POINTS)
def test_a_clone_killed_during_create_gets_the_options_asked_for(
        point: str, start_server: StartServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    first = start_server(root)
    first.client.ok("VolumeDriver.Create", {"Name": "source", "Opts": None})
    data = Path(first.client.ok("VolumeDriver.Mount", {"Name": "source", "ID": M1})["Mountpoint"])
    (data / "file").write_text("cloned")
    first.client.ok("VolumeDriver.Unmount", {"Name": "source", "ID": M1})
    first.stop()

    opts = {"from": "source", "mode": "0700", "snapshot_on_unmount": "true"}
    monkeypatch.setenv("PYVOL_TEST_CRASH_AT", point)
    doomed = start_server(root)
    create_killed(doomed.client, doomed, "clone", opts)
    monkeypatch.delenv("PYVOL_TEST_CRASH_AT")

    plugin = start_server(root).client
    plugin.ok("VolumeDriver.Create", {"Name": "clone", "Opts": opts})  # dockerd's retry
    status = plugin.volume("clone")["Status"]
    assert status["options"] == {"backend": "local", "mode": "0700", "source": "source"}
    assert status["snapshot_policy"]["on_unmount"] is True
    data = Path(plugin.ok("VolumeDriver.Mount", {"Name": "clone", "ID": M1})["Mountpoint"])
    assert (data / "file").read_text() == "cloned"
    assert [v["Name"] for v in plugin.ok("VolumeDriver.List", {})["Volumes"]] == \
        ["clone", "source"]


@pytest.mark.parametrize("point", POINTS)
def test_an_s3_volume_killed_during_create_is_restored_before_it_is_served(
        point: str, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    with sync_servers(tmp_path) as start:
        source = start(tmp_path / "host-a", s3_settings(moto.url))
        source.client.ok("VolumeDriver.Create", {"Name": "docs", "Opts": {"s3_bucket": bucket}})
        (mount(source.client, "docs", M1) / "tag").write_text("from the bucket")
        unmount(source.client, "docs", M1)
        wait_pushed(source.client, "docs")

        opts = {"s3_bucket": bucket, "s3_keep": "7"}
        doomed = start(tmp_path / "host-b", s3_settings(moto.url, PYVOL_TEST_CRASH_AT=point))
        create_killed(doomed.client, doomed, "docs", opts)

        gate = Gate(tmp_path, "s3:restore")
        target = start(tmp_path / "host-b", s3_settings(moto.url, PYVOL_TEST_MOUNT_WAIT="1",
                                                        **gate.env))
        plugin = target.client
        plugin.ok("VolumeDriver.Create", {"Name": "docs", "Opts": opts})  # dockerd's retry
        gate.wait_held()
        err = plugin.fails("VolumeDriver.Mount", {"Name": "docs", "ID": M1})
        assert f"volume 'docs': restore from s3://{bucket}/docs in progress" in err, err
        assert plugin.mounts("docs") == 0
        assert s3_status(plugin, "docs")["keep"] == 7
        gate.release()
        wait_for(lambda: s3_status(plugin, "docs")["state"] == "idle", 30, "the restore")
        assert (mount(plugin, "docs", M1) / "tag").read_text() == "from the bucket"
