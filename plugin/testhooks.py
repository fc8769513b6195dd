"""Test hooks in the real server, honoured only when their environment variable is set.

The hostile tier kills or stalls the server at named points to make races and crashes happen
(it does not hope for them).  Unset, each hook is one dictionary lookup.

- ``PYVOL_TEST_CRASH_AT=POINT``: SIGKILL the server on reaching POINT (e.g.
  ``create:after-data``): its gunicorn master first (else it would start a new worker), then
  this process.
- ``PYVOL_TEST_HOLD_AT=POINT=FILE``: on reaching POINT, create ``FILE.held`` and block until
  FILE exists (e.g. ``snapshot:automatic=/tmp/release``), or until the caller's ``until()``
  turns True (a hold in a loop that can be cancelled ends when it is).
- ``PYVOL_TEST_FAIL_AT=POINT=FILE``: on reaching POINT, raise OSError while FILE exists.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

HOLD_LIMIT = 600.0


def crash_point(point: str) -> None:
    if os.environ.get("PYVOL_TEST_CRASH_AT") == point:
        parent = os.getppid()
        try:
            master = b"plugin.cli" in Path(f"/proc/{parent}/cmdline").read_bytes()
        except OSError:
            master = False
        if master:
            os.kill(parent, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def _armed(variable: str, point: str) -> str | None:
    spec = os.environ.get(variable)
    if not spec:
        return None
    at, _, path = spec.partition("=")
    return path if at == point and path else None


def fail_point(point: str) -> None:
    path = _armed("PYVOL_TEST_FAIL_AT", point)
    if path and Path(path).exists():
        raise OSError(f"injected failure at {point} (test hook)")


def hold_point(point: str, until: Callable[[], bool] | None = None) -> None:
    release = _armed("PYVOL_TEST_HOLD_AT", point)
    if not release:
        return
    Path(release + ".held").touch()
    deadline = time.monotonic() + HOLD_LIMIT
    while not Path(release).exists() and time.monotonic() < deadline and \
            not (until is not None and until()):
        time.sleep(0.05)
