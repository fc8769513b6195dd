"""A small client for the plugin's socket, used by the ``pyvol`` CLI.

It finds the socket of the managed plugin (``docker plugin inspect pyvol``), or of a legacy
``pyvol serve``, unless one is given.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from plugin.errors import PyvolError

PLUGIN_DIR = Path("/run/docker/plugins")


class ClientError(PyvolError):
    pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("plugin.moby.localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def find_socket(alias: str = "pyvol") -> Path:
    """The managed plugin's socket, else a legacy server's, else an error saying what to do."""
    env = os.environ.get("PYVOL_SOCKET")
    if env:
        return Path(env)
    docker = shutil.which("docker")
    if docker:
        try:
            out = subprocess.run([docker, "plugin", "inspect", "--format", "{{.Id}}", alias],
                                 capture_output=True, text=True, timeout=15, check=False)
            plugin_id = out.stdout.strip()
            if out.returncode == 0 and plugin_id:
                candidate = PLUGIN_DIR / plugin_id / "pyvol.sock"
                if candidate.exists():
                    return candidate
        except (OSError, subprocess.TimeoutExpired):
            pass
    found = sorted(glob.glob(str(PLUGIN_DIR / "*" / "pyvol.sock")))
    if len(found) == 1:
        return Path(found[0])
    legacy = PLUGIN_DIR / "pyvol.sock"
    if legacy.exists():
        return legacy
    raise ClientError(
        "cannot find the pyvol plugin's socket: is the plugin enabled (`docker plugin ls`)? "
        "Pass --socket PATH to name it"
    )


def call(sock: Path, endpoint: str, body: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """POST ``body`` to ``endpoint``; return the answer or raise ClientError with its Err."""
    conn = _UnixConnection(str(sock), timeout)
    try:
        conn.request("POST", "/" + endpoint, body=json.dumps(body) + "\n")
        response = conn.getresponse()
        raw = response.read()
    except OSError as exc:
        raise ClientError(f"cannot reach the plugin at {sock}: {exc}") from exc
    finally:
        conn.close()
    try:
        answer = json.loads(raw or b"{}")
    except ValueError:
        raise ClientError(f"the plugin answered {endpoint} with something not JSON") from None
    if not isinstance(answer, dict):
        raise ClientError(f"the plugin answered {endpoint} with something not a JSON object")
    if answer.get("Err"):
        raise ClientError(str(answer["Err"]))
    return answer
