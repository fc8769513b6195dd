"""The plugin and the engine come and go; volumes, their data and their labels stay."""

from __future__ import annotations

import pytest
from e2e_support import (
    ALIAS,
    BUSYBOX,
    DRIVER,
    REF,
    REF2,
    Scenario,
    cannot_run,
    docker,
    fails,
    foreign_running_containers,
    inspect_volume,
    ok,
    plugin_field,
    pyvol,
    restart_dockerd,
    volume_rows,
)

pytestmark = pytest.mark.e2e


def _read(scenario: Scenario, vol: str, path: str = "/data/f") -> str:
    return ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "cat", path))


def test_disable_and_enable_with_a_running_container(scenario: Scenario) -> None:
    vol = scenario.create("disable")
    sized = scenario.create("disable-sized", "-o", "size=64M")
    user = scenario.start("-v", f"{vol}:/data", "-v", f"{sized}:/sized")
    ok(scenario.sh(user, "echo before > /data/f"))
    ok(scenario.sh(user, "echo before > /sized/f"))
    try:
        assert ok(docker("plugin", "disable", "-f", ALIAS)).strip() == ALIAS
        stderr = fails(docker("volume", "inspect", vol))
        assert "found but disabled" in stderr
        assert DRIVER in stderr
    finally:
        ok(docker("plugin", "enable", ALIAS, timeout=120))

    # The running container kept its bind mount; it reads and writes as before.
    assert ok(scenario.sh(user, "cat /data/f")) == "before\n"
    ok(scenario.sh(user, "echo after > /data/g"))
    assert (scenario.plugin.volume_dir(vol) / "g").read_text() == "after\n"
    assert inspect_volume(vol)["Status"]["mounts"] == 1
    # The sized volume's filesystem, still mounted in the container, was found again (not
    # attached a second time, which would corrupt it): both see the same files.
    ok(scenario.sh(user, "echo after > /sized/g"))
    assert inspect_volume(sized)["Status"]["mounts"] == 1

    ok(docker("stop", "-t", "2", user))
    assert inspect_volume(vol)["Status"]["mounts"] == 0
    assert _read(scenario, sized, "/data/g") == "after\n"
    assert _read(scenario, sized) == "before\n"
    ok(docker("rm", user))
    assert ok(docker("volume", "rm", vol)).strip() == vol
    assert not scenario.plugin.volume_dir(vol).exists()


def test_a_container_stopped_while_the_plugin_is_disabled_leaves_a_count_to_reset(
    scenario: Scenario,
) -> None:
    # dockerd cannot send the Unmount to a disabled plugin, and the plugin cannot tell a lost
    # Unmount from a running container: the count stays, and the error names the way out.
    vol = scenario.create("stale")
    user = scenario.start("-v", f"{vol}:/data")
    try:
        ok(docker("plugin", "disable", "-f", ALIAS))
        ok(docker("stop", "-t", "2", user))
    finally:
        ok(docker("plugin", "enable", ALIAS, timeout=120))
    ok(docker("rm", user))
    assert inspect_volume(vol)["Status"]["mounts"] == 1
    stderr = fails(docker("volume", "rm", vol))
    assert f"volume '{vol}' is in use by 1 mount(s)" in stderr
    assert f"`pyvol mounts reset {vol}`" in stderr
    assert ok(pyvol("mounts", "reset", vol)) == f"cleared 1 mount reference(s) of {vol}\n"
    assert ok(docker("volume", "rm", vol)).strip() == vol
    assert not scenario.plugin.volume_dir(vol).exists()


def test_daemon_restart_keeps_volumes_labels_and_data(scenario: Scenario) -> None:
    others = foreign_running_containers()
    if others:
        cannot_run(f"restarting dockerd would stop running containers these tests did not "
                   f"start: {', '.join(others)}")
    vol = scenario.create("restart", "-o", "mode=0700", "--label", "purpose=restart-test")
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", "echo survives > /data/f"))
    sized = scenario.create("restart-sized", "-o", "size=64M")
    ok(scenario.run("-v", f"{sized}:/data", BUSYBOX, "sh", "-c", "echo sized > /data/f"))
    running = scenario.start("-v", f"{vol}:/data", "-v", f"{sized}:/sized")
    assert inspect_volume(vol)["Status"]["mounts"] == 1

    restart_dockerd()

    assert _read(scenario, sized) == "sized\n"
    assert inspect_volume(sized)["Status"]["size_limit"] == "64 MiB"

    assert plugin_field("{{.Enabled}}") == "true"
    # Without live-restore the graceful shutdown stopped the container (an Unmount).
    assert ok(docker("inspect", "--format", "{{.State.Running}}", running)).strip() == "false"
    volume = inspect_volume(vol)
    assert volume["Driver"] == DRIVER
    assert volume["Labels"] == {"purpose": "restart-test"}
    assert volume["Options"] == {"mode": "0700"}
    assert volume["Status"]["options"]["mode"] == "0700"
    assert volume["Status"]["mounts"] == 0
    assert _read(scenario, vol) == "survives\n"
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", "echo again > /data/f"))
    assert _read(scenario, vol) == "again\n"

    # The stopped container starts again on the same volume.
    ok(docker("start", running))
    assert ok(scenario.sh(running, "cat /data/f")) == "again\n"
    ok(docker("rm", "-f", running))
    assert ok(docker("volume", "rm", vol)).strip() == vol


def test_upgrade_keeps_volumes_and_data(scenario: Scenario) -> None:
    vol = scenario.create("upgrade", "--label", "v=1")
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", "echo from-v1 > /data/f"))
    sized = scenario.create("upgrade-sized", "-o", "size=64M")
    ok(scenario.run("-v", f"{sized}:/data", BUSYBOX, "sh", "-c", "echo sized-v1 > /data/f"))

    stderr = fails(docker("plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check",
                          ALIAS, REF2, timeout=300))
    assert "disabled before upgrading" in stderr
    ok(docker("plugin", "disable", "-f", ALIAS))
    out = ok(docker("plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check",
                    ALIAS, REF2, timeout=300))
    assert f"Upgraded plugin {DRIVER} to {REF2}" in out
    # dockerd writes `docker plugin set` mount sources into the plugin's config, and an
    # upgrade replaces that config: the data mount is back at its default source. Set it
    # again before enabling, or the plugin would start on /var/lib/docker-plugins/pyvol.
    ok(docker("plugin", "set", ALIAS, f"data.source={scenario.plugin.data}"))
    ok(docker("plugin", "enable", ALIAS, timeout=120))

    assert plugin_field("{{.PluginReference}}") == REF2
    volume = inspect_volume(vol)
    assert volume["Labels"] == {"v": "1"}
    assert volume["Status"]["mounts"] == 0
    assert _read(scenario, vol) == "from-v1\n"
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", "echo from-v2 >> /data/f"))
    assert (scenario.plugin.volume_dir(vol) / "f").read_text() == "from-v1\nfrom-v2\n"
    assert _read(scenario, sized) == "sized-v1\n"
    assert inspect_volume(sized)["Status"]["size_limit"] == "64 MiB"


def test_reinstall_with_the_same_alias_and_data_finds_old_volumes(scenario: Scenario) -> None:
    vol = scenario.create("reinstall", "-o", "uid=1000", "--label", "keep=me")
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", "echo precious > /data/f"))
    sized = scenario.create("reinstall-sized", "-o", "size=64M")
    ok(scenario.run("-v", f"{sized}:/data", BUSYBOX, "sh", "-c", "echo sized > /data/f"))

    assert ok(docker("plugin", "rm", "-f", ALIAS, timeout=120)).strip() == ALIAS
    assert all(not row.endswith(f" {vol}") for row in volume_rows())
    assert fails(docker("volume", "inspect", vol))

    scenario.plugin.install(REF)
    assert plugin_field("{{.PluginReference}}") == REF
    assert f"{DRIVER} {vol}" in volume_rows()
    volume = inspect_volume(vol)
    assert volume["Labels"] == {"keep": "me"}
    assert volume["Status"]["options"]["uid"] == "1000"
    assert _read(scenario, vol) == "precious\n"
    assert ok(scenario.run("-v", f"{vol}:/data", BUSYBOX,
                           "stat", "-c", "%u", "/data")) == "1000\n"
    assert _read(scenario, sized) == "sized\n"
    assert inspect_volume(sized)["Status"]["size_limit"] == "64 MiB"
