"""moby's external volume driver scenarios (reference §5.1, §5.5) that apply to a managed plugin."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from e2e_support import (
    ALIAS,
    BUSYBOX,
    DRIVER,
    Scenario,
    docker,
    fails,
    inspect_volume,
    ok,
    volume_rows,
)

pytestmark = pytest.mark.e2e


def test_copy_up_of_an_image_directory(scenario: Scenario) -> None:
    vol = scenario.name("etc")
    passwd = ok(scenario.run("--volume-driver", ALIAS, "-v", f"{vol}:/etc", BUSYBOX,
                             "cat", "/etc/passwd"))
    assert passwd.startswith("root:x:0:0:root:/root:/bin/sh\n")
    copied = scenario.plugin.volume_dir(vol)
    assert (copied / "passwd").read_text() == passwd
    assert (copied / "group").is_file()
    # Two Mount/Unmount pairs (copy-up at create, then the run) leave no reference behind.
    assert inspect_volume(vol)["Status"]["mounts"] == 0
    assert ok(docker("volume", "rm", vol)).strip() == vol


def test_docker_cp_into_and_out_of_a_running_container(scenario: Scenario,
                                                       tmp_path: Path) -> None:
    vol = scenario.create("cp")
    user = scenario.start("-v", f"{vol}:/data")
    (tmp_path / "in.txt").write_text("copied in\n")
    ok(docker("cp", str(tmp_path / "in.txt"), f"{user}:/data/in.txt"))
    assert ok(scenario.sh(user, "cat /data/in.txt")) == "copied in\n"
    assert (scenario.plugin.volume_dir(vol) / "in.txt").read_text() == "copied in\n"
    ok(scenario.sh(user, "echo made inside > /data/out.txt"))
    ok(docker("cp", f"{user}:/data/out.txt", str(tmp_path / "out.txt")))
    assert (tmp_path / "out.txt").read_text() == "made inside\n"
    # docker cp mounts again with the running container's mount ID, then unmounts once.
    assert inspect_volume(vol)["Status"]["mounts"] == 1

    ok(docker("stop", "-t", "2", user))
    assert inspect_volume(vol)["Status"]["mounts"] == 0
    ok(docker("rm", user))
    assert ok(docker("volume", "rm", vol)).strip() == vol


@pytest.mark.parametrize("bad", ["../escape", "a/b", "x" * 300, ".creating"],
                         ids=["dotdot", "slash", "300-chars", "leading-dot"])
def test_unsafe_names_reach_the_plugin_and_are_rejected(scenario: Scenario, bad: str) -> None:
    scenario.volumes.append(bad)
    stderr = fails(docker("volume", "create", "-d", ALIAS, bad))
    # dockerd checks nothing for plugin volumes: the refusal is the plugin's.
    assert f"create {bad}: VolumeDriver.Create: invalid volume name" in stderr
    data = scenario.plugin.data
    assert not (data / "escape").exists()
    assert not (data.parent / "escape").exists()
    assert {p.name for p in data.iterdir()} <= {"images", "s3cache", "snapshots", "state.db",
                                                "state.db-shm", "state.db-wal", "volumes"}
    assert all(not row.endswith(f" {bad}") for row in volume_rows())


@pytest.mark.parametrize("odd", ["a..b", "255"], ids=["dots-inside", "255-chars"])
def test_unusual_but_valid_names_work(scenario: Scenario, odd: str) -> None:
    name = scenario.name(odd)
    if odd == "255":
        name = name + "n" * (255 - len(name))
        scenario.volumes.append(name)
    assert ok(docker("volume", "create", "-d", ALIAS, name)).strip() == name
    ok(scenario.run("-v", f"{name}:/data", BUSYBOX, "sh", "-c", "echo ok > /data/f"))
    assert (scenario.plugin.volume_dir(name) / "f").read_text() == "ok\n"
    assert f"{DRIVER} {name}" in volume_rows()
    assert ok(docker("volume", "rm", name)).strip() == name
    assert not scenario.plugin.volume_dir(name).exists()


def test_a_name_taken_by_another_driver_is_refused(scenario: Scenario) -> None:
    ours = scenario.create("ours")
    assert "volume name must be unique" in fails(docker("volume", "create", "-d", "local", ours))
    theirs = scenario.name("theirs")
    ok(docker("volume", "create", "-d", "local", theirs))
    assert "volume name must be unique" in fails(docker("volume", "create", "-d", ALIAS, theirs))
    assert inspect_volume(theirs)["Driver"] == "local"
    assert not scenario.plugin.volume_dir(theirs).exists()
    # The same create again with the inspected driver name is accepted (idempotent).
    assert ok(docker("volume", "create", "-d", DRIVER, ours)).strip() == ours


def test_the_data_directory_is_private_to_root(scenario: Scenario) -> None:
    """The README's install step makes the data directory 0711; the running plugin narrows it
    and everything a volume lives in to 0700, so no host user reaches volume data through it
    (a setuid file in a volume must not be runnable by a host user)."""
    vol = scenario.create("private")
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c",
                    "cp /bin/busybox /data/suid && chmod 4755 /data/suid"))
    data = scenario.plugin.data
    for path in (data, data / "volumes", data / "snapshots"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    suid = data / "volumes" / vol / "suid"
    assert suid.stat().st_mode & stat.S_ISUID
    pid = os.fork()
    if pid == 0:  # an unprivileged host user
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.stat(suid)
            os._exit(1)  # reachable: the test fails
        except PermissionError:
            os._exit(0)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a host user reached a file in a volume"
