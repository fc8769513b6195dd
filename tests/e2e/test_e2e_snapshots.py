"""Snapshots through dockerd and the host's ``pyvol`` CLI (which finds the managed plugin)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from e2e_support import BUSYBOX, POLL, Scenario, docker, fails, inspect_volume, ok, pyvol

from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def _write(scenario: Scenario, vol: str, text: str) -> None:
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", f"echo {text} > /data/f"))


def _read(scenario: Scenario, vol: str) -> str:
    return ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "cat", "/data/f")).strip()


def _idle(vol: str) -> dict[str, Any]:
    """The volume's Status once no snapshot job of it is queued or running."""
    wait_for(lambda: "snapshot_state" not in inspect_volume(vol)["Status"], 30,
             f"the snapshot jobs of {vol} to finish", pause=POLL)
    status: dict[str, Any] = inspect_volume(vol)["Status"]
    assert "snapshot_error" not in status, status
    return status


def _snapshots(vol: str) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(ok(pyvol("snapshot", "ls", "--json", vol)))
    return listed


def test_snapshot_on_unmount_keeps_the_newest_two(scenario: Scenario) -> None:
    vol = scenario.create("auto", "-o", "snapshot_on_unmount=true", "-o", "snapshot_keep=2")
    for text in ("one", "two", "three"):
        _write(scenario, vol, text)
    status = _idle(vol)

    names = ok(pyvol("snapshot", "ls", vol)).splitlines()
    assert len(names) == 2
    listed = _snapshots(vol)
    assert [s["name"] for s in listed] == names
    assert [s["kind"] for s in listed] == ["automatic", "automatic"]
    assert [s["size"] for s in listed] == [len("two\n"), len("three\n")]
    assert status["snapshot_count"] == 2
    assert status["snapshot_policy"] == {"on_unmount": True, "every_seconds": None, "keep": 2,
                                         "on_remove": "keep"}


def test_manual_snapshot_restore_and_clones(scenario: Scenario) -> None:
    vol = scenario.create("manual")
    _write(scenario, vol, "original")
    assert ok(pyvol("snapshot", "create", vol, "s1")).strip() == f"{vol}@s1"
    _write(scenario, vol, "changed")

    out = ok(pyvol("snapshot", "restore", f"{vol}@s1"))
    assert out.startswith(f"restored {vol} from s1; previous content kept as {vol}@pre-restore-")
    assert _read(scenario, vol) == "original"

    # A restore while a container uses the volume is refused with one line on stderr.
    user = scenario.start("-v", f"{vol}:/data")
    refused = pyvol("snapshot", "restore", f"{vol}@s1")
    assert refused.returncode != 0
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"pyvol: volume '{vol}' is in use by 1 mount(s)")
    ok(scenario.sh(user, "echo live > /data/f"))
    assert (scenario.plugin.volume_dir(vol) / "f").read_text() == "live\n"

    # Clones: from a snapshot, and from the live volume (while it is in use).
    from_snap = scenario.create("clone", "-o", f"from={vol}@s1")
    from_live = scenario.create("clone2", "-o", f"from={vol}")
    assert _read(scenario, from_snap) == "original"
    assert _read(scenario, from_live) == "live"
    _write(scenario, from_snap, "clone-edit")
    _write(scenario, from_live, "clone2-edit")
    assert ok(scenario.sh(user, "cat /data/f")) == "live\n"
    ok(scenario.sh(user, "echo source-edit > /data/f"))
    assert _read(scenario, from_snap) == "clone-edit"
    assert _read(scenario, from_live) == "clone2-edit"
    assert inspect_volume(from_snap)["Options"] == {"from": f"{vol}@s1"}


def test_inspect_lists_snapshots_newest_first_with_sizes_and_policy(scenario: Scenario) -> None:
    vol = scenario.create("status", "-o", "snapshot_on_unmount=yes", "-o", "snapshot_keep=3")
    _write(scenario, vol, "a")
    ok(pyvol("snapshot", "create", vol, "manual-1"))
    _write(scenario, vol, "bbbbbbbb")
    status = _idle(vol)

    snaps = status["snapshots"]
    assert [s["kind"] for s in snaps] == ["automatic", "manual", "automatic"]
    assert snaps[1]["name"] == "manual-1"
    created = [datetime.fromisoformat(s["created"]) for s in snaps]
    assert created == sorted(created, reverse=True)
    assert [s["size_bytes"] for s in snaps] == [len("bbbbbbbb\n"), len("a\n"), len("a\n")]
    assert all(s["files"] == 1 for s in snaps)
    assert status["snapshot_count"] == 3
    assert status["snapshot_policy"]["on_unmount"] is True
    assert status["snapshot_policy"]["keep"] == 3

    # Removing a snapshot shows at once.
    ok(pyvol("snapshot", "rm", f"{vol}@manual-1"))
    assert "manual-1" not in ok(pyvol("snapshot", "ls", vol)).split()
    assert "not found" in fails(pyvol("snapshot", "restore", f"{vol}@manual-1"))


def test_a_hostile_container_cannot_leak_hang_or_fill_through_snapshots(
        scenario: Scenario) -> None:
    """A running container swaps a directory for a symlink to the plugin's own /etc as fast as
    it can, keeps a FIFO and a 10 GiB sparse file, while snapshots are taken through the CLI
    and on unmount.  Every snapshot holds the container's data or none of it, never a byte of
    the plugin's /etc; nothing hangs; the sparse file costs nothing in snapshots and clones."""
    vol = scenario.create("hostile", "-o", "snapshot_on_unmount=true")
    cid = scenario.start("-v", f"{vol}:/data")
    ok(docker("exec", cid, "sh", "-c",
              "mkdir /data/d && echo mine > /data/d/passwd && mkfifo /data/pipe"
              " && ln -s /etc /data/etc-link && truncate -s 10G /data/sparse"))
    ok(docker("exec", "-d", cid, "sh", "-c",
              "while true; do mv /data/d /data/d.x && ln -s /etc /data/d && rm /data/d"
              " && mv /data/d.x /data/d; done"))
    names = [f"race{i}" for i in range(8)]
    for name in names:
        assert ok(pyvol("snapshot", "create", vol, name)).strip() == f"{vol}@{name}"
    ok(docker("rm", "-f", cid))  # the last unmount: an on-unmount snapshot of the same tree
    _idle(vol)
    probe = "; ".join(
        f'if [ -L /data/{d} ]; then echo {d}=link:$(readlink /data/{d}); '
        f'elif [ -d /data/{d} ]; then echo {d}=$(ls /data/{d}):$(cat /data/{d}/passwd); '
        f'else echo {d}=absent; fi' for d in ("d", "d.x"))
    probe += ("; echo etc-link=$(readlink /data/etc-link); test -p /data/pipe && echo pipe=fifo"
              "; echo sparse=$(stat -c '%s,%b' /data/sparse)")
    for name in [*names[::3], _snapshots(vol)[-1]["name"]]:
        clone = scenario.create("hclone", "-o", f"from={vol}@{name}")
        seen = dict(line.split("=", 1) for line in ok(scenario.run(
            "-v", f"{clone}:/data", BUSYBOX, "sh", "-c", probe)).splitlines())
        # The directory as it was, the link, nothing, or (renamed away between the listing
        # and the descent) an empty directory: never anything of the plugin's /etc.
        allowed = ("passwd:mine", "link:/etc", "absent", ":")
        assert seen["d"] in allowed and seen["d.x"] in allowed, (name, seen)
        assert seen["etc-link"] == "/etc" and seen["pipe"] == "fifo", (name, seen)
        assert seen["sparse"] == f"{10 << 30},0", (name, seen)
    # The next container mounts at once: nothing is stuck on the FIFO.  (The swapper died
    # somewhere in its loop: the directory is d.x, or d if no d.x.)
    assert ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c",
                           "cat /data/d.x/passwd 2>/dev/null || cat /data/d/passwd"),
              ).strip() == "mine"
