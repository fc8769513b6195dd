"""Size-limited volumes (``-o size=``) through dockerd, as a container sees them."""

from __future__ import annotations

import pytest
from e2e_support import BUSYBOX, Scenario, docker, fails, inspect_volume, ok, pyvol, wait_for

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def _df_kib(scenario: Scenario, vol: str) -> int:
    """The size of the filesystem a container sees at /data, by ``df`` (KiB)."""
    out = ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "df", "-k", "/data"))
    return int(out.splitlines()[-1].split()[1])


def test_a_container_writing_past_the_limit_gets_enospc_and_keeps_earlier_data(
        scenario: Scenario) -> None:
    vol = scenario.create("limit", "-o", "size=64M")
    assert 54 * 1024 <= _df_kib(scenario, vol) <= 64 * 1024
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c",
                    "dd if=/dev/urandom of=/data/keep bs=1M count=2 2>/dev/null && "
                    "md5sum /data/keep > /data/keep.md5 && ls -A /data"))
    full = scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c",
                        "dd if=/dev/zero of=/data/big bs=1M count=200 && sync")
    assert full.returncode != 0
    assert "No space left on device" in full.stderr
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "md5sum", "-c", "/data/keep.md5"))
    listed = ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "ls", "-A", "/data")).split()
    assert listed == ["big", "keep", "keep.md5"]  # no lost+found

    status = inspect_volume(vol)["Status"]
    assert status["backend"] == "image"
    assert status["options"]["size"] == "64 MiB"
    assert (status["size_limit"], status["size_limit_bytes"]) == ("64 MiB", 64 * MiB)
    assert status["used_bytes"] > 50 * MiB
    assert 0 <= status["free_bytes"] < 4 * MiB
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "rm", "/data/big"))
    wait_for(lambda: inspect_volume(vol)["Status"]["free_bytes"] > 50 * MiB, 10,
             "the freed space to show")


def test_resize_grows_a_volume_a_running_container_uses(scenario: Scenario) -> None:
    vol = scenario.create("grow", "-o", "size=320M", "-o", "fs=xfs")
    running = scenario.start("-v", f"{vol}:/data")
    before = int(ok(scenario.sh(running, "df -k /data")).splitlines()[-1].split()[1])
    out = ok(pyvol("resize", vol, "1G"))
    assert out == f"{vol}: resized to 1 GiB (online)\n"
    after = int(ok(scenario.sh(running, "df -k /data")).splitlines()[-1].split()[1])
    assert after > before + 600 * 1024
    ok(scenario.sh(running, "dd if=/dev/zero of=/data/big bs=1M count=400 && sync"))
    err = fails(pyvol("resize", vol, "512M"))
    assert "shrink" in err
    ok(docker("rm", "-f", running))
    status = inspect_volume(vol)["Status"]
    assert (status["size_limit"], status["filesystem"]) == ("1 GiB", "xfs")
    # What the user asked at create stays in Options; Status shows the size now.
    assert inspect_volume(vol)["Options"] == {"size": "320M", "fs": "xfs"}


def test_snapshot_restore_and_clone_of_a_sized_volume(scenario: Scenario) -> None:
    vol = scenario.create("snap", "-o", "size=64M")
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", "echo one > /data/f"))
    assert ok(pyvol("snapshot", "create", vol, "s1")).strip() == f"{vol}@s1"
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", "echo two > /data/f"))

    clone = scenario.create("clone", "-o", f"from={vol}@s1")
    bigger = scenario.create("bigger", "-o", f"from={vol}", "-o", "size=128M")
    assert inspect_volume(clone)["Status"]["size_limit"] == "64 MiB"
    assert inspect_volume(bigger)["Status"]["size_limit"] == "128 MiB"
    read = ("-v", f"{clone}:/data", BUSYBOX, "cat", "/data/f")
    assert ok(scenario.run(*read)) == "one\n"
    assert ok(scenario.run("-v", f"{bigger}:/data", BUSYBOX, "cat", "/data/f")) == "two\n"

    ok(pyvol("snapshot", "restore", f"{vol}@s1"))
    assert ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "cat", "/data/f")) == "one\n"
    assert inspect_volume(vol)["Status"]["size_limit"] == "64 MiB"
