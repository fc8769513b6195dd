"""Start-up and shutdown deadlines, and a restart on the same root."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest
from functional_support import MIME, STOP_DEADLINE, StartServer

from tests.support.unix_http import UnixHTTPConnection

MOUNT_ID = "9" * 64


def test_restart_sees_the_same_volumes_options_and_mounts(
    start_server: StartServer, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    first = start_server(root)
    plugin = first.client
    plugin.ok("VolumeDriver.Create", {"Name": "plain", "Opts": None})
    plugin.ok("VolumeDriver.Create", {"Name": "tuned",
                                      "Opts": {"Mode": "0o700", "UID": " 42 ", "gid": "43"}})
    for mount_id in (MOUNT_ID, MOUNT_ID, "1" * 64):
        plugin.ok("VolumeDriver.Mount", {"Name": "tuned", "ID": mount_id})
    before = plugin.ok("VolumeDriver.List", {})["Volumes"]
    got_before = {v["Name"]: plugin.volume(v["Name"]) for v in before}
    first.stop()

    second = start_server(root)
    plugin = second.client
    after = plugin.ok("VolumeDriver.List", {})["Volumes"]
    assert [(v["Name"], v["Mountpoint"], v["CreatedAt"]) for v in after] == [
        (v["Name"], v["Mountpoint"], v["CreatedAt"]) for v in before]
    for name, volume in got_before.items():
        again = plugin.volume(name)
        assert again["CreatedAt"] == volume["CreatedAt"]
        assert again["Status"]["options"] == volume["Status"]["options"]
        assert again["Status"]["mounts"] == volume["Status"]["mounts"]
    assert plugin.volume("tuned")["Status"]["options"] == {
        "backend": "local", "uid": "42", "gid": "43", "mode": "0700"}
    assert plugin.mounts("tuned") == 3

    # Create with the same options (differently written) is still a no-op; others conflict.
    assert plugin.ok("VolumeDriver.Create", {"Name": "tuned",
                                             "Opts": {"mode": "700", "uid": "42",
                                                      "gid": "43"}}) == {}
    assert "already exists" in plugin.fails("VolumeDriver.Create",
                                            {"Name": "tuned", "Opts": None})
    # The counts carry on across the restart.
    assert "in use by 3 mount(s)" in plugin.fails("VolumeDriver.Remove", {"Name": "tuned"})
    for mount_id in (MOUNT_ID, MOUNT_ID, "1" * 64, "1" * 64):
        plugin.ok("VolumeDriver.Unmount", {"Name": "tuned", "ID": mount_id})
    assert plugin.mounts("tuned") == 0
    assert plugin.ok("VolumeDriver.Remove", {"Name": "tuned"}) == {}


def test_sigterm_with_an_idle_keepalive_connection(start_server: StartServer,
                                                   tmp_path: Path) -> None:
    # dockerd's Go client keeps idle connections open; shutdown must not wait on them for long.
    server = start_server(tmp_path / "root")
    conn = UnixHTTPConnection(server.socket)
    try:
        conn.request("POST", "/VolumeDriver.List", body=b"{}\n",
                     headers={"Accept": MIME, "Host": "plugin.moby.localhost"})
        resp = conn.getresponse()
        assert json.loads(resp.read()) == {"Volumes": []}
        assert resp.getheader("Connection") != "close"
        took = server.stop()  # fails the test past the 10 s deadline
        assert took < STOP_DEADLINE
        with pytest.raises((OSError, http.client.HTTPException)):
            conn.request("POST", "/VolumeDriver.List", body=b"{}\n")
            conn.getresponse()
    finally:
        conn.close()
