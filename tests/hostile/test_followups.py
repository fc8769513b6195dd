"""Follow-ups of the hardening issue, driven over the real server's socket: Remove answers in
time whatever the volume's size (the delete runs in the background and survives a kill -9),
snapshots say how far they are and an automatic one is cancelled by Remove, the last
`pyvol sync check` survives a restart, and junk names do not grow the snapshot store."""

from __future__ import annotations

import secrets

from functional_support import Plugin, PluginProcess
from test_api_fuzz import rss

M1, M2 = "a" * 64, "b" * 64


def test_listing_snapshots_of_random_names_does_not_grow_the_server(
        server: PluginProcess, plugin: Plugin) -> None:
    (worker,) = server.workers

    def burst(count: int) -> None:
        for _ in range(count):
            name = "v" + secrets.token_hex(127)  # 255 characters: the longest valid name
            err = plugin.fails("pyvol/snapshot/list", {"Volume": name})
            assert err.startswith(f"volume {name!r} not found"), err[:100]
            err = plugin.fails("pyvol/snapshot/remove", {"Volume": name, "Name": "s1"})
            assert err.startswith(f"snapshot {name}@s1 not found"), err[:100]
    burst(1000)  # warm up the allocator
    before = rss(worker)
    burst(6000)
    grown = rss(worker) - before
    assert grown < 2 << 20, f"the server grew by {grown / (1 << 20):.1f} MiB for 6000 names"
