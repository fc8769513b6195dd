"""Test hooks in the real server, honoured only when their environment variable is set.

The hostile tier kills or stalls the server at named points to make races and crashes happen
(it does not hope for them).  Unset, each hook is one dictionary lookup.

- ``PYVOL_TEST_CRASH_AT=POINT``: SIGKILL this process on reaching POINT (e.g.
  ``create:after-data``).
- ``PYVOL_TEST_HOLD_AT=POINT=FILE``: on reaching POINT, create ``FILE.held`` and block until
  FILE exists (e.g. ``snapshot:automatic=/tmp/release``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

HOLD_LIMIT = 600.0


def crash_point(point: str) -> None:
    if os.environ.get("PYVOL_TEST_CRASH_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def hold_point(point: str) -> None:
    spec = os.environ.get("PYVOL_TEST_HOLD_AT")
    if not spec:
        return
    at, _, release = spec.partition("=")
    if at != point or not release:
        return
    Path(release + ".held").touch()
    deadline = time.monotonic() + HOLD_LIMIT
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
