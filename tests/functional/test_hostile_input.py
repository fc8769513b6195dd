"""Hostile volume names: refused with an Err, and nothing appears outside the data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from functional_support import Plugin, PluginProcess

CANARY = f"/tmp/pyvol-canary-{os.getpid()}"
HOSTILE = [
    "../x",
    "../../../../../../tmp/pyvol-canary",
    "..",
    ".",
    "a/b",
    "a/../../b",
    "x\0y",
    "\0",
    "a" * 300,
    "/etc",
    "/etc/passwd",
    CANARY,
    ".hidden",
    ".creating",
    ".removing",
    "-rf",
    "x\ny",
    "x y",
    "vol-é",
    "C:\\windows",
    "~root",
    "$(touch /tmp/pwned)",
]
ENDPOINTS = ["VolumeDriver.Create", "VolumeDriver.Mount", "VolumeDriver.Path",
             "VolumeDriver.Get", "VolumeDriver.Unmount", "VolumeDriver.Remove"]


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")
            if not p.name.startswith("state.db") and not p.name.endswith(".log")}


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_name_is_refused_and_touches_nothing(
    shared: Plugin, shared_server: PluginProcess, name: str
) -> None:
    base = shared_server.root.parent
    before = tree(base)
    for endpoint in ENDPOINTS:
        payload = {"Name": name, "Opts": {"mode": "0777"}, "ID": "a" * 64}
        err = shared.fails(endpoint, payload)
        assert "invalid volume name" in err, f"{endpoint}: {err}"
        assert "A-Z a-z 0-9 _ . -" in err
    assert tree(base) == before
    for outside in (CANARY, "/tmp/pyvol-canary", "/tmp/pwned", "/x", "/b"):
        assert not Path(outside).exists(), outside
    names = [v["Name"] for v in shared.ok("VolumeDriver.List", {})["Volumes"]]
    assert names == [n for n in names if n != name]
    assert shared.ok("VolumeDriver.Capabilities", {})


def test_names_at_the_length_limit(shared: Plugin, shared_server: PluginProcess) -> None:
    longest = "n" * 255
    assert shared.ok("VolumeDriver.Create", {"Name": longest, "Opts": None}) == {}
    assert Path(shared.volume(longest)["Mountpoint"]).is_dir()
    assert shared.ok("VolumeDriver.Remove", {"Name": longest}) == {}
    err = shared.fails("VolumeDriver.Create", {"Name": "n" * 256, "Opts": None})
    assert "invalid volume name" in err
    anonymous = "0123456789abcdef" * 4  # docker run -v /dst makes 64-hex names
    assert shared.ok("VolumeDriver.Create", {"Name": anonymous, "Opts": None}) == {}
    assert shared.ok("VolumeDriver.Remove", {"Name": anonymous}) == {}
