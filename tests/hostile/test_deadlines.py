"""No Docker call outlives dockerd: Mount and Remove answer within 25 s whatever runs on the
volume, say what runs and how far it is, and a refused Mount leaves no reference behind
(dockerd never sends Unmount for a Mount it saw fail).  Long jobs are made long by the
server's hold hooks (``PYVOL_TEST_HOLD_AT``), not by hoping a job is slow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from functional_support import StartServer
from orch_support import DEADLINE, Background, Gate, timed

M1, M2 = "a" * 64, "b" * 64


def test_mount_and_remove_during_a_stuck_on_unmount_snapshot_answer_in_time(
        start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(tmp_path, "snapshot:automatic")
    gate.arm(monkeypatch)
    plugin = start_server(tmp_path / "root").client
    plugin.ok("VolumeDriver.Create", {"Name": "slow", "Opts": {"snapshot_on_unmount": "true"}})
    data = Path(plugin.ok("VolumeDriver.Mount", {"Name": "slow", "ID": M1})["Mountpoint"])
    (data / "file").write_text("v1")
    plugin.ok("VolumeDriver.Unmount", {"Name": "slow", "ID": M1})
    gate.wait_held()

    err, took = timed(lambda: plugin.fails("VolumeDriver.Mount", {"Name": "slow", "ID": M2}))
    assert took < DEADLINE, f"Mount answered after {took:.1f} s"
    assert re.search(r"volume 'slow' cannot be mounted yet: its snapshot on unmount \(running "
                     r"for \d+ s\) is still reading the data; try again shortly", err), err
    assert plugin.mounts("slow") == 0, "a refused Mount left a reference (no Unmount comes)"

    err, took = timed(lambda: plugin.fails("VolumeDriver.Remove", {"Name": "slow"}))
    assert took < DEADLINE, f"Remove answered after {took:.1f} s"
    assert "cannot be removed yet: its snapshot on unmount" in err and "try again" in err, err
    # Docker's cheap verbs never waited meanwhile.
    _, took = timed(lambda: plugin.volume("slow"))
    assert took < 5.0  # the snapshot is held until released: any answer shows Get never waited

    gate.release()
    plugin.ok("VolumeDriver.Mount", {"Name": "slow", "ID": M2})
    assert plugin.mounts("slow") == 1
    assert plugin.volume("slow")["Status"]["snapshot_count"] == 1
    plugin.ok("VolumeDriver.Unmount", {"Name": "slow", "ID": M2})


def test_a_restore_in_progress_makes_mount_and_remove_fail_at_once(
        start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(tmp_path, "restore:snapshot")
    gate.arm(monkeypatch)
    plugin = start_server(tmp_path / "root").client
    plugin.ok("VolumeDriver.Create", {"Name": "site", "Opts": None})
    data = Path(plugin.ok("VolumeDriver.Mount", {"Name": "site", "ID": M1})["Mountpoint"])
    (data / "tag").write_text("old")
    plugin.ok("VolumeDriver.Unmount", {"Name": "site", "ID": M1})
    plugin.ok("pyvol/snapshot/create", {"Volume": "site", "Name": "s1"})
    (data / "tag").write_text("new")

    restore = Background(lambda: plugin.send("pyvol/snapshot/restore",
                                             {"Volume": "site", "Name": "s1"}))
    gate.wait_held()
    err, took = timed(lambda: plugin.fails("VolumeDriver.Mount", {"Name": "site", "ID": M2}))
    assert took < 2.0, f"Mount queued behind the restore for {took:.1f} s"
    assert re.search(r"volume 'site' cannot be mounted now: a restore of volume 'site' from "
                     r"snapshot s1 is in progress \(running for \d+ s\); try again", err), err
    assert plugin.mounts("site") == 0
    err, took = timed(lambda: plugin.fails("VolumeDriver.Remove", {"Name": "site"}))
    assert took < 2.0 and "cannot be removed now: a restore" in err, err
    err = plugin.fails("pyvol/snapshot/restore", {"Volume": "site", "Name": "s1"})
    assert "cannot be restored now: a restore" in err, err

    gate.release()
    reply = restore.result()
    assert reply.status == 200 and "Safety" in reply.body, reply.raw
    data = Path(plugin.ok("VolumeDriver.Mount", {"Name": "site", "ID": M2})["Mountpoint"])
    assert (data / "tag").read_text() == "old"


def test_a_long_copy_at_create_answers_in_time_and_the_retried_create_succeeds(
        start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(tmp_path, "create:copy")
    gate.arm(monkeypatch)
    plugin = start_server(tmp_path / "root").client
    plugin.ok("VolumeDriver.Create", {"Name": "big", "Opts": None})
    data = Path(plugin.ok("VolumeDriver.Mount", {"Name": "big", "ID": M1})["Mountpoint"])
    (data / "file").write_text("copied")
    plugin.ok("VolumeDriver.Unmount", {"Name": "big", "ID": M1})

    opts = {"from": "big", "mode": "0700"}
    err, took = timed(lambda: plugin.fails("VolumeDriver.Create", {"Name": "copy", "Opts": opts}))
    assert took < DEADLINE, f"Create answered after {took:.1f} s"
    assert re.fullmatch(r"volume 'copy' is being created: its copy of big \(running for \d+ s\) "
                        r"goes on in the background; run the same create again shortly \(it "
                        r"succeeds once the copy is done\)", err), err
    assert "no such volume" not in err
    assert plugin.fails("VolumeDriver.Get", {"Name": "copy"}).startswith("volume 'copy' not found")
    err = plugin.fails("VolumeDriver.Create", {"Name": "copy", "Opts": {"from": "big"}})
    assert "is being created with options" in err, err
    gate.release()
    plugin.ok("VolumeDriver.Create", {"Name": "copy", "Opts": opts})  # dockerd's retry
    assert plugin.volume("copy")["Status"]["options"]["mode"] == "0700"
    data = Path(plugin.ok("VolumeDriver.Mount", {"Name": "copy", "ID": M1})["Mountpoint"])
    assert (data / "file").read_text() == "copied"
