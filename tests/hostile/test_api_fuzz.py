"""Every input gets a clean error, never a 500 from a crash: odd JSON types and sizes on every
Docker verb and management endpoint, snapshot names too long for the disk, a snapshot racing
a Remove, and junk names that must not make the server grow."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from functional_support import Plugin, PluginProcess, StartServer
from orch_support import Background, Gate

from plugin.app import ROUTES
from tests.support.processes import rss

M1 = "a" * 64
FIELDS = ("Name", "Volume", "ID", "Opts", "All", "Snapshot", "Confirm")
ODD = [None, 0, -1, 2**70, 1.5, True, False, [], ["x", 1], {}, {"mode": 7}, {"mode": None},
       {"mode": ["0700"]}, "", " ", "../x", "a/b", "x\x00y", "é" * 10, "x" * 300, "-x",
       "fz@snap", {"Name": "fz"}]


def assert_clean(reply_raw: bytes, status: int, what: str) -> None:
    assert status in (200, 500), f"{what}: HTTP {status}"
    import json
    body = json.loads(reply_raw)
    assert isinstance(body, dict), f"{what}: {reply_raw[:200]!r}"
    err = body.get("Err")
    if status == 500:
        assert isinstance(err, str) and err, f"{what}: a 500 without Err"
    assert not (err or "").startswith("internal error"), f"{what}: {err}"


def test_odd_json_types_get_clean_errors_on_every_endpoint(
        server: PluginProcess, plugin: Plugin) -> None:
    plugin.ok("VolumeDriver.Create", {"Name": "fz", "Opts": None})
    for endpoint, field, value in itertools.product(sorted(ROUTES), FIELDS, ODD):
        for body in ({field: value}, {"Name": "fz", "Volume": "fz", field: value}):
            reply = plugin.send(endpoint, body)
            assert_clean(reply.raw, reply.status, f"{endpoint} {body!r:.100}")
    for raw in (b"[]", b"7", b"null", b'"x"', b"{", b"\xff\xfe", b"[" * 100_000):
        for endpoint in sorted(ROUTES):
            reply = plugin.send(endpoint, raw=raw)
            assert_clean(reply.raw, reply.status, f"{endpoint} {raw[:20]!r}")
    huge = "x" * (1 << 20)
    for endpoint in sorted(ROUTES):
        reply = plugin.send(endpoint, {"Name": huge, "Volume": huge, "Snapshot": huge,
                                       "Opts": {huge: huge}})
        assert_clean(reply.raw, reply.status, f"{endpoint} with 1 MiB strings")
    crashed = [line for line in server.log.read_text(errors="replace").splitlines()
               if line.endswith(" crashed")]
    assert crashed == []


@pytest.mark.parametrize("length", [201, 246, 250, 255, 256])
def test_too_long_snapshot_names_are_refused_and_leave_nothing(
        shared: Plugin, shared_server: PluginProcess, length: int) -> None:
    volume = f"long{length}"
    shared.ok("VolumeDriver.Create", {"Name": volume, "Opts": None})
    err = shared.fails("pyvol/snapshot/create", {"Volume": volume, "Name": "s" * length})
    assert "invalid snapshot name" in err and "use 1-200 characters" in err, err
    snapdir = shared_server.root / "snapshots" / volume
    left = sorted(p.name for p in snapdir.rglob("*")) if snapdir.exists() else []
    assert [n for n in left if n not in ("objects", "entries", "catalog")] == []
    name = "s" * 200  # the longest accepted name works
    shared.ok("pyvol/snapshot/create", {"Volume": volume, "Name": name})
    assert [s["name"] for s in shared.ok("pyvol/snapshot/list", {"Volume": volume})[
        "Snapshots"]] == [name]


def test_a_snapshot_racing_a_remove_gets_a_clean_answer(
        start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(tmp_path, "snapshot:manual")
    gate.arm(monkeypatch)
    plugin = start_server(tmp_path / "root").client
    plugin.ok("VolumeDriver.Create", {"Name": "racy", "Opts": None})
    data = Path(plugin.ok("VolumeDriver.Mount", {"Name": "racy", "ID": M1})["Mountpoint"])
    for i in range(50):
        (data / f"f{i}").write_text(str(i))
    plugin.ok("VolumeDriver.Unmount", {"Name": "racy", "ID": M1})

    snapshot = Background(lambda: plugin.send("pyvol/snapshot/create",
                                              {"Volume": "racy", "Name": "s1"}))
    gate.wait_held()  # the snapshot has found the volume and is about to read it
    err = plugin.fails("VolumeDriver.Remove", {"Name": "racy"})
    assert re.search(r"volume 'racy' cannot be removed now: a manual snapshot of volume 'racy' "
                     r"is in progress \(running for \d+ s\); try again when it is done", err), err
    gate.release()
    reply = snapshot.result()
    assert reply.status == 200 and reply.body["Snapshot"]["files"] == 50, reply.raw
    plugin.ok("VolumeDriver.Remove", {"Name": "racy"})
    err = plugin.fails("pyvol/snapshot/create", {"Volume": "racy", "Name": "s2"})
    assert err.startswith("volume 'racy' not found"), err


def test_junk_names_do_not_make_the_server_grow(server: PluginProcess, plugin: Plugin) -> None:
    (worker,) = server.workers
    junk = "x" * (1 << 20)
    for i in range(10):  # warm up the allocator with requests of this size
        plugin.send("VolumeDriver.Remove", {"Name": f"{i}{junk}"})
    before = rss(worker)
    for i in range(300):
        err = plugin.fails("VolumeDriver.Remove", {"Name": f"{i}-{junk}"})
        assert err.startswith("invalid volume name"), err[:100]
        plugin.fails("VolumeDriver.Mount", {"Name": f"gone{i}", "ID": M1})
    grown = rss(worker) - before
    assert grown < 64 << 20, f"the server grew by {grown >> 20} MiB for 300 junk names"
