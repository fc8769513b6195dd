"""Everyday use of pyvol volumes through the docker CLI."""

from __future__ import annotations

import re
import shlex
from datetime import UTC, datetime, timedelta

import pytest
from e2e_support import (
    ALIAS,
    BUSYBOX,
    DRIVER,
    POLL,
    Scenario,
    docker,
    fails,
    inspect_volume,
    ok,
    run,
    volume_rows,
)

from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def test_written_in_one_container_read_in_the_next_and_kept_on_the_host(
    scenario: Scenario,
) -> None:
    vol = scenario.create("handoff")
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c",
                    "mkdir /data/sub && echo 'first container' > /data/sub/note"))
    assert ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "cat", "/data/sub/note")) == \
        "first container\n"
    on_host = scenario.plugin.volume_dir(vol) / "sub" / "note"
    assert on_host.read_text() == "first container\n"
    assert f"{DRIVER} {vol}" in volume_rows()


def test_two_running_containers_share_a_volume(scenario: Scenario) -> None:
    vol = scenario.create("shared")
    one = scenario.start("-v", f"{vol}:/data")
    two = scenario.start("-v", f"{vol}:/data")
    assert inspect_volume(vol)["Status"]["mounts"] == 2

    ok(scenario.sh(one, "echo from-one > /data/one"))
    ok(scenario.sh(two, "echo from-two > /data/two"))
    assert ok(scenario.sh(two, "cat /data/one")) == "from-one\n"
    assert ok(scenario.sh(one, "cat /data/two")) == "from-two\n"

    ok(docker("stop", "-t", "2", one))
    assert inspect_volume(vol)["Status"]["mounts"] == 1
    ok(scenario.sh(two, "echo still-writable > /data/after"))
    assert ok(scenario.sh(two, "cat /data/one /data/after")) == "from-one\nstill-writable\n"
    assert (scenario.plugin.volume_dir(vol) / "after").read_text() == "still-writable\n"

    ok(docker("stop", "-t", "2", two))
    assert inspect_volume(vol)["Status"]["mounts"] == 0


def test_volume_driver_flag_creates_the_volume_with_pyvol(scenario: Scenario) -> None:
    vol = scenario.name("auto")
    assert docker("volume", "inspect", vol).returncode != 0
    ok(scenario.run("--volume-driver", ALIAS, "-v", f"{vol}:/data", BUSYBOX, "sh", "-c",
                    "echo auto > /data/made"))
    volume = inspect_volume(vol)
    assert volume["Driver"] == DRIVER
    assert volume["Mountpoint"] == f"/mnt/pyvol/{vol}"
    assert (scenario.plugin.volume_dir(vol) / "made").read_text() == "auto\n"


def test_owner_and_mode_options(scenario: Scenario) -> None:
    before = datetime.now(UTC)
    vol = scenario.create("owned", "-o", "uid=1000", "-o", "gid=1000", "-o", "mode=0750",
                          "--label", "team=storage")
    assert ok(scenario.run("-v", f"{vol}:/data", BUSYBOX,
                           "stat", "-c", "%u:%g %a", "/data")) == "1000:1000 750\n"
    # The owner can write, others cannot even look inside.
    ok(scenario.run("--user", "1000:1000", "-v", f"{vol}:/data", BUSYBOX, "sh", "-c",
                    "dd if=/dev/zero of=/data/blob bs=1024 count=64 2>/dev/null"))
    denied = fails(scenario.run("--user", "2000:2000", "-v", f"{vol}:/data", BUSYBOX,
                                "ls", "/data"))
    assert "Permission denied" in denied

    volume = inspect_volume(vol)
    assert volume["Driver"] == DRIVER
    assert volume["Labels"] == {"team": "storage"}
    assert volume["Options"] == {"uid": "1000", "gid": "1000", "mode": "0750"}
    status = volume["Status"]
    assert status["options"] == {"backend": "local", "uid": "1000", "gid": "1000",
                                 "mode": "0750"}
    assert status["mounts"] == 0
    created = datetime.fromisoformat(volume["CreatedAt"])
    assert before - timedelta(seconds=5) <= created <= datetime.now(UTC) + timedelta(seconds=5)
    # The size is measured in the background: it catches up with the 64 KiB just written.
    wait_for(lambda: (inspect_volume(vol)["Status"].get("size_bytes") or 0) >= 64 * 1024, 10,
             "Status.size_bytes to count the 64 KiB file", pause=POLL)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-o", "colour=blue"], ["unknown option 'colour'",
                                 "valid options for backend local are: backend, from, gid, mode,",
                                 "uid"]),
        (["-o", "uid=alice"], ["option uid='alice' must be a number from 0 to"]),
        (["-o", "mode=0999"], ["option mode='0999' must be octal permission bits"]),
        (["-o", "snapshot_keep=0"], ["option snapshot_keep='0' must be a positive whole number"]),
        (["-o", "aws_secret_access_key=hunter2-e2e"], ["looks like a credential",
                                                        "docker plugin set pyvol"]),
    ],
    ids=["unknown-option", "bad-uid", "bad-mode", "bad-keep", "credential"],
)
def test_create_rejects_bad_options(scenario: Scenario, args: list[str],
                                    expected: list[str]) -> None:
    vol = scenario.name("bad")
    stderr = fails(docker("volume", "create", "-d", ALIAS, *args, vol))
    assert "VolumeDriver.Create" in stderr
    for text in expected:
        assert text in stderr
    assert "hunter2-e2e" not in stderr
    assert "no such volume" in fails(docker("volume", "inspect", vol)).lower()
    assert not scenario.plugin.volume_dir(vol).exists()


@pytest.mark.parametrize("bad", ["with space", "semi;colon", "-dash-first"])
def test_create_rejects_bad_names(scenario: Scenario, bad: str) -> None:
    name = f"{scenario.name('x')}{bad}" if not bad.startswith("-") else bad
    scenario.volumes.append(name)
    stderr = fails(docker("volume", "create", "-d", ALIAS, "--", name))
    assert f"invalid volume name '{name}'" in stderr
    assert "use 1-255 characters from A-Z a-z 0-9 _ . -" in stderr
    assert all(not row.endswith(f" {name}") for row in volume_rows())


def test_rm_in_use_fails_rm_of_a_free_volume_deletes_its_data(scenario: Scenario) -> None:
    vol = scenario.create("rm")
    user = scenario.start("-v", f"{vol}:/data")
    ok(scenario.sh(user, "echo keep > /data/f"))
    stderr = fails(docker("volume", "rm", vol))
    assert "volume is in use" in stderr
    assert user in stderr
    assert (scenario.plugin.volume_dir(vol) / "f").read_text() == "keep\n"

    ok(docker("rm", "-f", user))
    assert ok(docker("volume", "rm", vol)).strip() == vol
    assert not scenario.plugin.volume_dir(vol).exists()
    assert "no such volume" in fails(docker("volume", "inspect", vol)).lower()
    assert all(not row.endswith(f" {vol}") for row in volume_rows())


def test_create_again_with_other_options_is_a_silent_no_op(scenario: Scenario) -> None:
    # dockerd asks the plugin's Get first and never calls Create for a volume that exists, so
    # the plugin cannot refuse the new options: the volume keeps the ones it was created with.
    vol = scenario.create("again", "-o", "uid=1000")
    assert ok(docker("volume", "create", "-d", ALIAS, "-o", "uid=2000", vol)).strip() == vol
    volume = inspect_volume(vol)
    assert volume["Options"] == {"uid": "1000"}
    assert volume["Status"]["options"]["uid"] == "1000"
    assert ok(scenario.run("-v", f"{vol}:/data", BUSYBOX,
                           "stat", "-c", "%u", "/data")) == "1000\n"


def test_the_listing_command_that_errors_suggest_lists_pyvol_volumes(scenario: Scenario) -> None:
    vol = scenario.create("listed")
    stderr = fails(docker("volume", "create", "-d", ALIAS, "-o", f"from={vol}-missing",
                          scenario.name("clone")))
    suggested = re.search(r"`(docker volume ls [^`]*)`", stderr)
    assert suggested is not None, stderr
    listed = ok(run(shlex.split(suggested.group(1))))
    assert vol in listed.split()
