"""Every endpoint over the real socket, with requests shaped exactly as dockerd sends them."""

from __future__ import annotations

import re
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from functional_support import Plugin, PluginProcess

from plugin.app import ROUTES

RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
DOCKER_ENDPOINTS = [
    "Plugin.Activate", "VolumeDriver.Capabilities", "VolumeDriver.Create",
    "VolumeDriver.Remove", "VolumeDriver.Mount", "VolumeDriver.Unmount", "VolumeDriver.Path",
    "VolumeDriver.Get", "VolumeDriver.List",
]
NO_ARGUMENT_NEEDED = {"Plugin.Activate", "VolumeDriver.Capabilities", "VolumeDriver.List"}
MOUNT_ID = "4f3c2b1a" * 8


def check_volume(volume: dict[str, Any], name: str, root: Path) -> None:
    """The Volume object as Go's proxyVolume decodes it."""
    assert volume["Name"] == name  # dockerd uses the returned name: echo it exactly
    mountpoint = Path(volume["Mountpoint"])
    assert mountpoint.is_absolute()
    assert root.resolve() in mountpoint.resolve().parents
    created = volume["CreatedAt"]
    assert isinstance(created, str)
    assert RFC3339.fullmatch(created), f"CreatedAt {created!r} is not strict RFC 3339"
    assert datetime.fromisoformat(created).utcoffset() is not None
    assert isinstance(volume.get("Status", {}), dict)


def test_every_docker_endpoint_is_routed() -> None:
    assert set(DOCKER_ENDPOINTS) <= ROUTES.keys()


def test_activate_and_capabilities(plugin: Plugin) -> None:
    # Activate comes with an empty body; List and Capabilities with {}.
    assert plugin.ok("Plugin.Activate") == {"Implements": ["VolumeDriver"]}
    assert plugin.ok("VolumeDriver.Capabilities", {}) == {"Capabilities": {"Scope": "local"}}


def test_volume_lifecycle(plugin: Plugin, server: PluginProcess) -> None:
    assert plugin.ok("VolumeDriver.List", {}) in ({"Volumes": []}, {"Volumes": None}, {})
    # docker run -v NAME:/dst sends Opts: null
    assert plugin.ok("VolumeDriver.Create", {"Name": "web", "Opts": None}) == {}

    volume = plugin.volume("web")
    check_volume(volume, "web", server.root)
    status = volume["Status"]
    assert status["mounts"] == 0
    assert status["options"] == {"backend": "local", "mode": "0755"}
    assert "size_bytes" in status
    mountpoint = Path(volume["Mountpoint"])
    assert mountpoint.is_dir()

    listed = plugin.ok("VolumeDriver.List", {})["Volumes"]
    assert [v["Name"] for v in listed] == ["web"]
    check_volume(listed[0], "web", server.root)
    assert listed[0]["Mountpoint"] == volume["Mountpoint"]

    assert plugin.ok("VolumeDriver.Path", {"Name": "web"}) == {"Mountpoint": str(mountpoint)}
    mounted = plugin.ok("VolumeDriver.Mount", {"Name": "web", "ID": MOUNT_ID})
    assert mounted == {"Mountpoint": str(mountpoint)}
    assert mountpoint.is_dir()
    assert plugin.mounts("web") == 1
    assert plugin.ok("VolumeDriver.Unmount", {"Name": "web", "ID": MOUNT_ID}) == {}
    assert plugin.mounts("web") == 0

    assert plugin.ok("VolumeDriver.Remove", {"Name": "web"}) == {}
    assert not mountpoint.exists()
    assert "not found" in plugin.fails("VolumeDriver.Get", {"Name": "web"})
    assert plugin.ok("VolumeDriver.List", {}) in ({"Volumes": []}, {"Volumes": None}, {})


def test_create_with_options(plugin: Plugin, server: PluginProcess) -> None:
    opts = {"mode": "0750", "uid": "1234", "gid": "4321"}
    assert plugin.ok("VolumeDriver.Create", {"Name": "db", "Opts": opts}) == {}
    status = plugin.volume("db")["Status"]
    assert status["options"] == {"backend": "local", "uid": "1234", "gid": "4321",
                                 "mode": "0750"}
    st = Path(plugin.volume("db")["Mountpoint"]).stat()
    assert stat.S_IMODE(st.st_mode) == 0o750
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    # the same options, written differently: a no-op
    same = {"Name": "db", "Opts": {"Mode": "750", "UID": "1234", "gid": " 4321 "}}
    assert plugin.ok("VolumeDriver.Create", same) == {}
    err = plugin.fails("VolumeDriver.Create", {"Name": "db", "Opts": {"uid": "1"}})
    assert "'db' already exists" in err
    err = plugin.fails("VolumeDriver.Create", {"Name": "other", "Opts": {"colour": "red"}})
    assert "unknown option 'colour'" in err
    assert "valid options for backend local are:" in err
    err = plugin.fails("VolumeDriver.Create",
                       {"Name": "other", "Opts": {"aws_secret_access_key": "hunter2"}})
    assert "docker plugin set" in err
    assert "hunter2" not in err
    assert [v["Name"] for v in plugin.ok("VolumeDriver.List", {})["Volumes"]] == ["db"]


def test_get_of_unknown_volume_is_an_err(plugin: Plugin) -> None:
    # Either an Err or Volume null makes dockerd call Create; anything else breaks create.
    reply = plugin.send("VolumeDriver.Get", {"Name": "nope"})
    assert "'nope' not found" in reply.err
    assert reply.body.get("Volume") is None


def test_remove_in_use(plugin: Plugin) -> None:
    plugin.ok("VolumeDriver.Create", {"Name": "busy", "Opts": None})
    plugin.ok("VolumeDriver.Mount", {"Name": "busy", "ID": MOUNT_ID})
    plugin.ok("VolumeDriver.Mount", {"Name": "busy", "ID": MOUNT_ID})
    err = plugin.fails("VolumeDriver.Remove", {"Name": "busy"})
    assert "volume 'busy' is in use by 2 mount(s)" in err
    # Unmount of an ID the plugin never saw (e.g. after a restart) succeeds.
    assert plugin.ok("VolumeDriver.Unmount", {"Name": "busy", "ID": "f" * 64}) == {}
    assert plugin.ok("VolumeDriver.Unmount", {"Name": "gone", "ID": MOUNT_ID}) == {}
    assert plugin.mounts("busy") == 2


def test_failed_mount_leaves_no_reference(plugin: Plugin) -> None:
    plugin.ok("VolumeDriver.Create", {"Name": "broken", "Opts": None})
    data = Path(plugin.volume("broken")["Mountpoint"])
    data.rmdir()  # deleted behind the plugin's back
    assert "missing" in plugin.fails("VolumeDriver.Mount", {"Name": "broken", "ID": MOUNT_ID})
    volume = plugin.volume("broken")  # Get still answers for an existing volume
    assert volume["Status"]["state"] == "missing"
    assert volume["Status"]["mounts"] == 0
    assert plugin.ok("VolumeDriver.Remove", {"Name": "broken"}) == {}


@pytest.mark.parametrize("endpoint", sorted(ROUTES))
def test_empty_body_gets_a_json_answer(shared: Plugin, endpoint: str) -> None:
    # A retried request can arrive with an empty body (see the protocol notes, section 2.1).
    reply = shared.send(endpoint, raw=b"")
    if endpoint in NO_ARGUMENT_NEEDED:
        assert reply.status == 200
        assert not reply.body.get("Err")
    elif endpoint in DOCKER_ENDPOINTS:
        assert "no volume Name" in reply.err
    elif reply.status != 200 or "Err" in reply.body:  # the plugin's own endpoints
        assert reply.err


NOT_AN_OBJECT: list[tuple[str, bytes]] = [
    ("not JSON", b"this is not json\n"),
    ("truncated", b'{"Name": "v"'),
    ("JSON array", b'["Name", "v"]\n'),
    ("JSON string", b'"v"\n'),
    ("JSON null", b"null\n"),
    ("JSON number", b"12\n"),
    ("invalid UTF-8", b'{"Name": "\xff\xfe"}\n'),
    ("binary", bytes(range(256))),
    ("deep nesting", b"[" * 100_000),
    ("deep object", b'{"a":' * 50_000),
    ("huge integer", b'{"Name": ' + b"9" * 100_000 + b"}\n"),
]
GARBAGE: list[tuple[str, bytes]] = [
    *NOT_AN_OBJECT,
    ("huge body", b'{"Name": "' + b"a" * 8_000_000 + b'", "Opts": null}\n'),
    ("lone surrogate", b'{"Name": "\\ud800"}\n'),
    ("Name number", b'{"Name": 5}\n'),
    ("Name null", b'{"Name": null}\n'),
    ("Name list", b'{"Name": ["v"]}\n'),
    ("Name object", b'{"Name": {"v": 1}}\n'),
    ("Name bool", b'{"Name": true}\n'),
    ("Name empty", b'{"Name": ""}\n'),
]


@pytest.mark.parametrize(("what", "raw"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_bodies_get_a_json_err(
    shared: Plugin, shared_server: PluginProcess, what: str, raw: bytes
) -> None:
    for endpoint in ("VolumeDriver.Create", "VolumeDriver.Get", "VolumeDriver.Mount",
                     "VolumeDriver.Remove"):
        reply = shared.send(endpoint, raw=raw)
        assert reply.err, f"{endpoint} with {what}"
        if (what, raw) in NOT_AN_OBJECT:  # read as {}: the same answer as an empty body
            assert reply.err == shared.send(endpoint, raw=b"").err
    assert shared.ok("VolumeDriver.Capabilities", {})
    assert shared_server.worker_pids() == shared_server.workers


WRONG_TYPES: list[tuple[str, dict[str, object]]] = [
    ("VolumeDriver.Create", {"Name": "typed", "Opts": "uid=1"}),
    ("VolumeDriver.Create", {"Name": "typed", "Opts": ["uid", "1"]}),
    ("VolumeDriver.Create", {"Name": "typed", "Opts": 1}),
    ("VolumeDriver.Create", {"Name": "typed", "Opts": {"uid": 1000}}),
    ("VolumeDriver.Create", {"Name": "typed", "Opts": {"uid": None}}),
    ("VolumeDriver.Create", {"Name": "typed", "Opts": {"uid": {"x": 1}}}),
    ("VolumeDriver.Mount", {"Name": "typed-m", "ID": 5}),
    ("VolumeDriver.Mount", {"Name": "typed-m", "ID": ["x"]}),
    ("VolumeDriver.Mount", {"Name": "typed-m", "ID": None}),
    ("VolumeDriver.Unmount", {"Name": "typed-m", "ID": {"a": 1}}),
]


@pytest.mark.parametrize(("endpoint", "payload"), WRONG_TYPES)
def test_wrong_field_types_get_a_json_err(
    shared: Plugin, endpoint: str, payload: dict[str, object]
) -> None:
    if endpoint != "VolumeDriver.Create":
        shared.ok("VolumeDriver.Create", {"Name": "typed-m", "Opts": None})
    assert shared.fails(endpoint, payload)
    names = [v["Name"] for v in shared.ok("VolumeDriver.List", {})["Volumes"]]
    assert "typed" not in names
    if endpoint != "VolumeDriver.Create":
        assert shared.mounts("typed-m") == 0


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/VolumeDriver.Nope"),
    ("POST", "/VolumeDriver.get"),  # the match is case-sensitive, as dockerd's calls are
    ("POST", "/"),
    ("POST", "/../../etc/passwd"),
    ("GET", "/VolumeDriver.List"),
    ("GET", "/"),
    ("PUT", "/VolumeDriver.Create"),
    ("DELETE", "/VolumeDriver.Remove"),
])
def test_unknown_endpoint_and_method_get_a_json_err(
    shared: Plugin, method: str, path: str
) -> None:
    reply = shared.send(path, {"Name": "x"}, method=method)
    assert reply.status != 200
    assert reply.err
    assert reply.status < 500


def test_socket_is_not_world_accessible(server: PluginProcess) -> None:
    mode = stat.S_IMODE(server.socket.stat().st_mode)
    assert stat.S_ISSOCK(server.socket.stat().st_mode)
    assert mode & 0o007 == 0, f"socket mode {mode:04o}"


def test_one_log_line_per_call(server: PluginProcess) -> None:
    plugin = server.client
    calls: list[tuple[str, object, str | None]] = [
        ("Plugin.Activate", None, None),
        ("VolumeDriver.Capabilities", {}, None),
        ("VolumeDriver.Create", {"Name": "logged", "Opts": None}, None),
        ("VolumeDriver.Get", {"Name": "logged"}, None),
        ("VolumeDriver.List", {}, None),
        ("VolumeDriver.Path", {"Name": "logged"}, None),
        ("VolumeDriver.Mount", {"Name": "logged", "ID": MOUNT_ID}, None),
        ("VolumeDriver.Unmount", {"Name": "logged", "ID": MOUNT_ID}, None),
        ("VolumeDriver.Remove", {"Name": "logged"}, None),
        ("VolumeDriver.Get", {"Name": "logged"}, "failed"),
        ("VolumeDriver.Create", {"Name": "x", "Opts": {"bogus": "1"}}, "failed"),
        # A hostile name must not forge extra log lines.
        ("VolumeDriver.Create", {"Name": "x\n2024-01-01 INFO pyvol.api: forged\r"}, "failed"),
        ("VolumeDriver.Get", None, "failed"),
        ("VolumeDriver.Nope", {}, "Nope"),
    ]
    before = len(server.api_log_lines())
    for endpoint, payload, _ in calls:
        plugin.send(endpoint, payload)
    plugin.send("VolumeDriver.List", {}, method="GET")
    lines = server.api_log_lines()[before:]
    assert len(lines) == len(calls) + 1, "\n".join(lines)
    for line, (endpoint, _, marker) in zip(lines, calls, strict=False):
        assert endpoint.split(".")[-1] in line
        assert (marker or " ok ") in line
    assert not any("forged" in line and "\\n" not in line for line in lines)
