"""50 parallel Mount and 50 parallel Unmount calls leave exact reference counts."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from functional_support import Plugin, PluginProcess

CALLS = 50


def in_parallel(plugin: Plugin, endpoint: str, name: str, ids: list[str]) -> list[dict[str, Any]]:
    barrier = threading.Barrier(len(ids))

    def call(mount_id: str) -> dict[str, Any]:
        barrier.wait()  # every request in flight at once
        return plugin.ok(endpoint, {"Name": name, "ID": mount_id})

    with ThreadPoolExecutor(len(ids)) as pool:
        return list(pool.map(call, ids))


def test_parallel_mounts_and_unmounts_are_exact(plugin: Plugin, server: PluginProcess) -> None:
    plugin.ok("VolumeDriver.Create", {"Name": "shared", "Opts": None})
    plugin.ok("VolumeDriver.Create", {"Name": "bystander", "Opts": None})
    plugin.ok("VolumeDriver.Mount", {"Name": "bystander", "ID": "id0"})
    # 30 distinct IDs plus 20 repeats of a few (the same ID mounted several times at once)
    ids = [f"{i:064x}" for i in range(30)] + [f"{i % 4:064x}" for i in range(20)]

    replies = in_parallel(plugin, "VolumeDriver.Mount", "shared", ids)
    mountpoint = plugin.volume("shared")["Mountpoint"]
    assert all(r == {"Mountpoint": mountpoint} for r in replies)
    assert plugin.mounts("shared") == CALLS
    assert f"in use by {CALLS} mount(s)" in plugin.fails("VolumeDriver.Remove",
                                                           {"Name": "shared"})

    replies = in_parallel(plugin, "VolumeDriver.Unmount", "shared", ids)
    assert all(r == {} for r in replies)
    assert plugin.mounts("shared") == 0
    assert plugin.mounts("bystander") == 1
    assert plugin.ok("VolumeDriver.Remove", {"Name": "shared"}) == {}
    assert plugin.ok("VolumeDriver.Unmount", {"Name": "bystander", "ID": "id0"}) == {}
    assert plugin.ok("VolumeDriver.Remove", {"Name": "bystander"}) == {}
    assert server.worker_pids() == server.workers


def test_parallel_calls_on_distinct_volumes(plugin: Plugin) -> None:
    names = [f"vol{i}" for i in range(CALLS)]
    barrier = threading.Barrier(CALLS)

    def lifecycle(name: str) -> None:
        barrier.wait()
        plugin.ok("VolumeDriver.Create", {"Name": name, "Opts": {"mode": "0700"}})
        plugin.ok("VolumeDriver.Mount", {"Name": name, "ID": name})
        plugin.ok("VolumeDriver.Mount", {"Name": name, "ID": name})

    with ThreadPoolExecutor(CALLS) as pool:
        list(pool.map(lifecycle, names))
    listed = plugin.ok("VolumeDriver.List", {})["Volumes"]
    assert sorted(v["Name"] for v in listed) == sorted(names)
    assert {plugin.mounts(name) for name in names} == {2}
