"""The HTTP layer: the only module that knows Flask and the wire format.

One route table maps each endpoint to a driver call (``pyvol/*``: to its management API,
``Driver.management``); one error handler turns exceptions into
``{"Err": message}``.  dockerd sends no Content-Type and sometimes no body, so the body is
parsed by hand and anything that is not a JSON object counts as ``{}``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from backends.errors import BackendError
from backends.priority import lowered
from plugin.driver import Driver, VolumeInfo
from plugin.errors import InvalidOption, InvalidRequest, PyvolError

if TYPE_CHECKING:
    from s3sync.keys import KeyInfo

log = logging.getLogger("pyvol.api")

Body = dict[str, Any]
Handler = Callable[[Driver, Body], Body]


def _name(body: Body) -> str:
    name = body.get("Name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("the request has no volume Name")
    return name


def _mount_id(body: Body) -> str:
    mount_id = body.get("ID", "")
    if not isinstance(mount_id, str):
        raise InvalidRequest("the request's mount ID must be a string")
    return mount_id


def _opts(body: Body) -> dict[str, object] | None:
    opts = body.get("Opts")
    if opts is not None and not isinstance(opts, dict):
        raise InvalidOption("Opts must be an object of key/value strings")
    return opts


def _volume(info: VolumeInfo) -> Body:
    wire: Body = {
        "Name": info.name,
        "Mountpoint": str(info.mountpoint),
        "CreatedAt": info.created_at.isoformat(),
    }
    if info.status is not None:
        wire["Status"] = dict(info.status)
    return wire


def _field(body: Body, key: str, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"the request needs a non-empty string {key!r}")
    return value


def _volume_arg(body: Body) -> str:
    volume = _field(body, "Volume")
    assert volume is not None  # noqa: S101 -- required
    return volume


def _snapshot_create(d: Driver, b: Body) -> Body:
    info = d.management.snapshot_create(_volume_arg(b), _field(b, "Name", required=False))
    return {"Snapshot": info.to_json()}


def _snapshot_remove(d: Driver, b: Body) -> Body:
    name = _field(b, "Name", required=False)
    if name is None and b.get("All") is not True:
        raise InvalidRequest("name a snapshot, or pass All: true to remove every snapshot")
    return {"Kept": d.management.snapshot_remove(_volume_arg(b), name)}


def _snapshot_restore(d: Driver, b: Body) -> Body:
    name = _field(b, "Name")
    assert name is not None  # noqa: S101 -- required
    return {"Safety": d.management.snapshot_restore(_volume_arg(b), name).to_json()}


def _sync_push(d: Driver, b: Body) -> Body:
    d.management.sync_push(_volume_arg(b))
    return {}


def _sync_status(d: Driver, b: Body) -> Body:
    status = d.get(_volume_arg(b)).status or {}
    return {"Status": status.get("s3")}


def _sync_restore(d: Driver, b: Body) -> Body:
    snapshot = _field(b, "Snapshot")
    assert snapshot is not None  # noqa: S101 -- required
    safety = d.management.sync_restore(_volume_arg(b), snapshot)
    return {"Safety": safety.to_json() if safety else None}


def _sync_delete_remote(d: Driver, b: Body) -> Body:
    volume = _volume_arg(b)
    if b.get("Confirm") != volume:
        raise InvalidRequest(f"deleting the remote copy needs Confirm: {volume!r}")
    d.management.sync_delete_remote(volume)
    return {}


def _key(info: KeyInfo, current: str | None = None) -> Body:
    """A key as the CLI shows it: never a secret."""
    wire: Body = {"id": info.id, "created": info.created.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if current is not None:
        wire["current"] = info.id == current
    return wire


def _sync_key_add(d: Driver, b: Body) -> Body:
    passphrase = _field(b, "Passphrase")
    assert passphrase is not None  # noqa: S101 -- required
    return {"Key": _key(d.management.sync_key_add(_volume_arg(b), passphrase))}


def _sync_key_list(d: Driver, b: Body) -> Body:
    listing = d.management.sync_key_list(_volume_arg(b))
    return {"Keys": [_key(k, listing.current) for k in listing.keys],
            "Damaged": listing.damaged}


def _sync_key_remove(d: Driver, b: Body) -> Body:
    key_id = _field(b, "Id")
    assert key_id is not None  # noqa: S101 -- required
    d.management.sync_key_remove(_volume_arg(b), key_id)
    return {}


def _create(d: Driver, b: Body) -> Body:
    d.create(_name(b), _opts(b))
    return {}


def _remove(d: Driver, b: Body) -> Body:
    d.remove(_name(b))
    return {}


def _mount(d: Driver, b: Body) -> Body:
    return {"Mountpoint": str(d.mount(_name(b), _mount_id(b)))}


def _unmount(d: Driver, b: Body) -> Body:
    d.unmount(_name(b), _mount_id(b))
    return {}


ROUTES: dict[str, Handler] = {
    "Plugin.Activate": lambda d, b: {"Implements": ["VolumeDriver"]},
    "VolumeDriver.Capabilities": lambda d, b: {"Capabilities": {"Scope": "local"}},
    "VolumeDriver.Create": _create,
    "VolumeDriver.Remove": _remove,
    "VolumeDriver.Mount": _mount,
    "VolumeDriver.Unmount": _unmount,
    "VolumeDriver.Path": lambda d, b: {"Mountpoint": str(d.path(_name(b)))},
    "VolumeDriver.Get": lambda d, b: {"Volume": _volume(d.get(_name(b)))},
    "VolumeDriver.List": lambda d, b: {"Volumes": [_volume(v) for v in d.list_volumes()]},
    # pyvol's management API, used by the `pyvol` CLI (documented in README.md)
    "pyvol/snapshot/create": _snapshot_create,
    "pyvol/snapshot/list": lambda d, b: {
        "Snapshots": [s.to_json() for s in d.management.snapshot_list(_volume_arg(b))]},
    "pyvol/snapshot/remove": _snapshot_remove,
    "pyvol/snapshot/restore": _snapshot_restore,
    "pyvol/resize": lambda d, b: d.management.resize(_volume_arg(b), str(_field(b, "Size"))),
    "pyvol/mounts/reset": lambda d, b: {"Cleared": d.management.reset_mounts(_volume_arg(b))},
    "pyvol/sync/push": _sync_push,
    "pyvol/sync/status": _sync_status,
    "pyvol/sync/list": lambda d, b: {
        "Snapshots": [s.to_json() for s in d.management.sync_list(_volume_arg(b))]},
    "pyvol/sync/restore": _sync_restore,
    "pyvol/sync/delete-remote": _sync_delete_remote,
    "pyvol/sync/check": lambda d, b: {"Check": d.management.sync_check(
        _volume_arg(b), b.get("ReadData") is True).to_json()},
    "pyvol/lease/show": lambda d, b: {"Lease": d.management.lease_show(_volume_arg(b))},
    "pyvol/lease/break": lambda d, b: {"Was": d.management.lease_break(
        _volume_arg(b), _field(b, "Confirm") or "")},
    "pyvol/sync/key/add": _sync_key_add,
    "pyvol/sync/key/list": _sync_key_list,
    "pyvol/sync/key/remove": _sync_key_remove,
}


BULK = frozenset({
    "pyvol/snapshot/create", "pyvol/snapshot/remove", "pyvol/snapshot/restore",
    "pyvol/sync/restore", "pyvol/sync/check", "pyvol/sync/delete-remote",
})
"""Management calls that walk, copy or delete whole trees in the calling thread: they run at
idle CPU and I/O priority, so Docker's calls on other volumes do not wait behind them."""


def _err(message: str, status: int = 500) -> tuple[Response, int]:
    return jsonify({"Err": message}), status


def create_app(driver: Driver, extra_routes: dict[str, Handler] | None = None) -> Flask:
    app = Flask("pyvol")
    routes = {**ROUTES, **(extra_routes or {})}

    @app.post("/<path:endpoint>")
    def dispatch(endpoint: str) -> Response | tuple[Response, int]:
        handler = routes.get(endpoint)
        if handler is None:
            log.warning("unknown endpoint %.80r", f"/{endpoint}")
            return _err(f"unknown endpoint /{endpoint}", 404)
        try:
            body = request.get_json(force=True, silent=True)
        except RecursionError:  # nested too deep for json; silent=True only covers ValueError
            body = None
        if not isinstance(body, dict):
            body = {}
        # Names are logged escaped and cut short: a hostile Name must not forge log lines.
        subject = body.get("Name", body.get("Volume", ""))
        started = time.perf_counter()
        try:
            with lowered() if endpoint in BULK else contextlib.nullcontext():
                result = handler(driver, body)
        except (PyvolError, BackendError) as exc:
            log.info("%s %.80r failed: %s", endpoint, subject, exc)
            return _err(str(exc))
        except Exception as exc:
            log.exception("%s %.80r crashed", endpoint, subject)
            return _err(f"internal error in pyvol during {endpoint}: {exc}; see the plugin log")
        log.info("%s %.80r ok (%.1f ms)", endpoint, subject,
                 (time.perf_counter() - started) * 1000)
        return jsonify(result)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        log.warning("%s %.80r refused: %s", request.method, request.path, exc.name)
        return _err(f"{exc.name}: use POST /VolumeDriver.<Method>", exc.code or 500)

    return app
