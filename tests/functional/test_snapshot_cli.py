"""The ``pyvol snapshot`` commands against a real ``pyvol serve`` on a unix socket.

Docker calls go through the plugin protocol exactly as dockerd sends them; the snapshot
commands run as a user runs them, in a subprocess.  Every failure must exit non-zero with one
line on stderr and change nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from functional_support import REPO, Plugin, PluginProcess

from tests.support.trees import contents


def run(server: PluginProcess, *args: str, via_env: bool = False,
        socket: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYVOL_SOCKET"}
    argv = [sys.executable, "-m", "plugin.cli"]
    if via_env:
        env["PYVOL_SOCKET"] = str(server.socket)
    else:
        argv += ["--socket", str(socket or server.socket)]
    return subprocess.run([*argv, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def ok(server: PluginProcess, *args: str, via_env: bool = False) -> str:
    done = run(server, *args, via_env=via_env)
    assert done.returncode == 0, f"pyvol {' '.join(args)}: {done.stderr}"
    assert done.stderr == ""
    return done.stdout


def fails(server: PluginProcess, *args: str, socket: Path | None = None) -> str:
    """Run a command that must fail; return its one line of stderr."""
    done = run(server, *args, socket=socket)
    assert done.returncode != 0, f"pyvol {' '.join(args)} succeeded: {done.stdout}"
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line: {done.stderr!r}"
    assert done.stdout == ""
    return lines[0]


def data_dir(plugin: Plugin, name: str) -> Path:
    return Path(plugin.ok("VolumeDriver.Path", {"Name": name})["Mountpoint"])


def ls(server: PluginProcess, volume: str) -> list[dict[str, Any]]:
    snaps = json.loads(ok(server, "snapshot", "ls", volume, "--json"))
    assert isinstance(snaps, list)
    return snaps


@pytest.fixture
def vol(plugin: Plugin) -> Path:
    plugin.ok("VolumeDriver.Create", {"Name": "vol", "Opts": {"snapshot_keep": "3"}})
    data = data_dir(plugin, "vol")
    (data / "a.txt").write_text("first")
    return data


def test_create_ls_rm_restore(server: PluginProcess, vol: Path) -> None:
    states, made = [], []
    for i in range(3):
        (vol / f"file-{i}").write_bytes(b"x" * (1000 * (i + 1)))
        states.append(contents(vol))
        out = ok(server, "snapshot", "create", "vol")
        volume, _, name = out.strip().partition("@")
        assert volume == "vol" and out.endswith("\n")
        made.append(name)
        time.sleep(0.01)
    assert made == sorted(made), "default names do not sort chronologically"
    assert ok(server, "snapshot", "create", "vol", "by-name_1.0:x") == "vol@by-name_1.0:x\n"
    assert ok(server, "snapshot", "ls", "vol").splitlines() == [*made, "by-name_1.0:x"]

    details = ls(server, "vol")
    assert [d["name"] for d in details] == [*made, "by-name_1.0:x"]
    created = [datetime.fromisoformat(d["created"]) for d in details]
    assert created == sorted(created)
    assert [(d["kind"], d["files"], d["size"]) for d in details[:3]] == [
        ("manual", 2, 5 + 1000), ("manual", 3, 5 + 3000), ("manual", 4, 5 + 6000)]

    assert ok(server, "snapshot", "rm", f"vol@{made[1]}") == ""
    assert ok(server, "snapshot", "ls", "vol").splitlines() == [made[0], made[2],
                                                                "by-name_1.0:x"]

    out = ok(server, "snapshot", "restore", f"vol@{made[0]}")
    assert contents(vol) == states[0]
    safety = ls(server, "vol")[-1]
    assert safety["kind"] == "safety"
    assert out == (f"restored vol from {made[0]}; previous content kept as "
                   f"vol@{safety['name']}\n")
    ok(server, "snapshot", "restore", f"vol@{safety['name']}")
    assert contents(vol) == states[2]

    assert ok(server, "snapshot", "rm", "--all", "vol") == ""
    assert ok(server, "snapshot", "ls", "vol") == ""
    assert ls(server, "vol") == []


def test_the_socket_can_come_from_the_environment(server: PluginProcess, vol: Path) -> None:
    ok(server, "snapshot", "create", "vol", "s1", via_env=True)
    assert ok(server, "snapshot", "ls", "vol", via_env=True) == "s1\n"


ERRORS: list[tuple[list[str], str]] = [
    (["snapshot", "create", "nosuch"], "volume 'nosuch' not found"),
    (["snapshot", "create", "vol", "s1"], "vol@s1 already exists"),
    (["snapshot", "create", "vol", "bad/name"], "invalid snapshot name"),
    (["snapshot", "create", "vol", "bad name"], "invalid snapshot name"),
    (["snapshot", "create", "vol", "_leading"], "invalid snapshot name"),
    (["snapshot", "create", "vol", "é"], "invalid snapshot name"),
    (["snapshot", "create", "vol", "x" * 256], "invalid snapshot name"),
    (["snapshot", "create", "bad@volume"], "invalid volume name"),
    (["snapshot", "ls", "nosuch"], "volume 'nosuch' not found"),
    (["snapshot", "rm", "vol@nope"], "vol@nope not found"),
    (["snapshot", "rm", "nosuch@s1"], "nosuch@s1 not found"),
    (["snapshot", "rm", "vol"], "expected VOLUME@SNAPSHOT"),
    (["snapshot", "rm", "vol@"], "expected VOLUME@SNAPSHOT"),
    (["snapshot", "rm", "@s1"], "expected VOLUME@SNAPSHOT"),
    (["snapshot", "rm", "--all", "nosuch"], "volume 'nosuch' not found"),
    (["snapshot", "rm", "--all", "vol@s1"], "give the VOLUME only"),
    (["snapshot", "restore", "vol@nope"], "vol@nope not found"),
    (["snapshot", "restore", "nosuch@s1"], "volume 'nosuch' not found"),
    (["snapshot", "restore", "vol"], "expected VOLUME@SNAPSHOT"),
    (["snapshot", "restore", "vol@bad/name"], "invalid snapshot name"),
    (["snapshot"], "required"),
    (["snapshot", "create"], "required: volume"),
    (["snapshot", "ls"], "required: volume"),
    (["snapshot", "frobnicate", "vol"], "invalid choice"),
    (["snapshot", "ls", "vol", "--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=[" ".join(a)[:50] for a, _ in ERRORS])
def test_every_error_is_one_line_and_changes_nothing(
        server: PluginProcess, vol: Path, args: list[str], message: str) -> None:
    ok(server, "snapshot", "create", "vol", "s1")
    (vol / "after-s1").write_text("changed")
    before = (ls(server, "vol"), contents(vol), server.client.ok("VolumeDriver.List", {}))
    assert message in fails(server, *args)
    assert (ls(server, "vol"), contents(vol),
            server.client.ok("VolumeDriver.List", {})) == before


def test_an_unreachable_plugin_is_one_line(server: PluginProcess, tmp_path: Path) -> None:
    line = fails(server, "snapshot", "ls", "vol", socket=tmp_path / "absent.sock")
    assert "cannot reach the plugin" in line and "absent.sock" in line


def test_restore_is_refused_while_the_volume_is_mounted(server: PluginProcess, vol: Path) -> None:
    plugin = server.client
    ok(server, "snapshot", "create", "vol", "s1")
    (vol / "a.txt").write_text("second")
    plugin.ok("VolumeDriver.Mount", {"Name": "vol", "ID": "container-1"})
    before = (ls(server, "vol"), contents(vol))
    line = fails(server, "snapshot", "restore", "vol@s1")
    assert "volume 'vol' is in use by 1 mount(s)" in line
    assert (ls(server, "vol"), contents(vol)) == before  # not even a safety snapshot
    plugin.ok("VolumeDriver.Unmount", {"Name": "vol", "ID": "container-1"})
    ok(server, "snapshot", "restore", "vol@s1")
    assert (vol / "a.txt").read_text() == "first"


def test_get_shows_snapshots_newest_first_with_sizes_and_the_policy(
        server: PluginProcess) -> None:
    plugin = server.client
    plugin.ok("VolumeDriver.Create", {"Name": "pol", "Opts": {
        "snapshot_on_unmount": "true", "snapshot_every": "6h", "snapshot_keep": "4",
        "snapshot_on_remove": "delete"}})
    data = data_dir(plugin, "pol")
    for i in range(3):
        (data / f"f{i}").write_bytes(b"y" * (10 ** (i + 2)))
        ok(server, "snapshot", "create", "pol", f"s{i}")
    status = plugin.volume("pol")["Status"]
    assert status["snapshot_policy"] == {"on_unmount": True, "every_seconds": 6 * 3600,
                                         "keep": 4, "on_remove": "delete"}
    # The 6h schedule takes its first snapshot within a second of Create: it may be listed.
    everything = status["snapshots"]
    assert status["snapshot_count"] == len(everything)
    assert {s["kind"] for s in everything} <= {"manual", "automatic"}
    assert len([s for s in everything if s["kind"] == "automatic"]) <= 1
    shown = [s for s in everything if s["kind"] == "manual"]
    assert [s["name"] for s in shown] == ["s2", "s1", "s0"]
    assert [(s["size_bytes"], s["files"], s["kind"]) for s in shown] == [
        (11100, 3, "manual"), (1100, 2, "manual"), (100, 1, "manual")]
    assert [s["created"] for s in everything] == [
        d["created"] for d in reversed(ls(server, "pol"))]


BAD_OPTIONS: list[tuple[dict[str, str], str]] = [
    ({"from": "not-a-pyvol-volume"}, "no pyvol volume 'not-a-pyvol-volume'"),
    ({"from": "vol@missing"}, "vol@missing not found"),
    ({"from": "vol@bad/name"}, "option from="),
    ({"snapshot_keep": "0"}, "snapshot_keep"),
    ({"snapshot_keep": "-3"}, "snapshot_keep"),
    ({"snapshot_keep": "ten"}, "snapshot_keep"),
    ({"snapshot_every": "soon"}, "snapshot_every"),
    ({"snapshot_every": "15"}, "snapshot_every"),
    ({"snapshot_every": "0m"}, "snapshot_every"),
    ({"snapshot_every": "1w"}, "snapshot_every"),
    ({"snapshot_on_unmount": "sometimes"}, "snapshot_on_unmount"),
    ({"snapshot_on_remove": "archive"}, "snapshot_on_remove"),
    ({"snapshot_kept": "3"}, "unknown option 'snapshot_kept'"),
]


@pytest.mark.parametrize(("opts", "message"), BAD_OPTIONS,
                         ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in BAD_OPTIONS])
def test_bad_options_create_nothing(server: PluginProcess, vol: Path, opts: dict[str, str],
                                    message: str, tmp_path: Path) -> None:
    plugin = server.client
    before = plugin.ok("VolumeDriver.List", {})
    volumes_dir = vol.parent
    on_disk = sorted(p.name for p in volumes_dir.iterdir())
    err = plugin.fails("VolumeDriver.Create", {"Name": "newvol", "Opts": opts})
    assert message in err
    assert plugin.ok("VolumeDriver.List", {}) == before
    assert sorted(p.name for p in volumes_dir.iterdir()) == on_disk
    assert "not found" in fails(server, "snapshot", "ls", "newvol")


def test_clones_and_what_removal_keeps(server: PluginProcess, vol: Path) -> None:
    plugin = server.client
    ok(server, "snapshot", "create", "vol", "s1")
    (vol / "a.txt").write_text("later")
    plugin.ok("VolumeDriver.Create", {"Name": "from-snap", "Opts": {"from": "vol@s1"}})
    plugin.ok("VolumeDriver.Create", {"Name": "from-live", "Opts": {"from": "vol"}})
    assert (data_dir(plugin, "from-snap") / "a.txt").read_text() == "first"
    assert (data_dir(plugin, "from-live") / "a.txt").read_text() == "later"

    plugin.ok("VolumeDriver.Remove", {"Name": "vol"})  # snapshots outlive their volume
    assert ok(server, "snapshot", "ls", "vol") == "s1\n"
    plugin.ok("VolumeDriver.Create", {"Name": "vol", "Opts": {"from": "vol@s1"}})
    assert (data_dir(plugin, "vol") / "a.txt").read_text() == "first"

    plugin.ok("VolumeDriver.Create", {"Name": "gone", "Opts": {"snapshot_on_remove": "delete"}})
    ok(server, "snapshot", "create", "gone", "s1")
    plugin.ok("VolumeDriver.Remove", {"Name": "gone"})
    assert "volume 'gone' not found" in fails(server, "snapshot", "ls", "gone")
