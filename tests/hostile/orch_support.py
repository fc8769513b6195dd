"""Helpers of the orchestration tests in the hostile tier: the server's test hooks
(``plugin.testhooks``) armed through the environment, and calls answered in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import wait_for

DEADLINE = 26.0
"""Every Docker verb answers within 25 s (dockerd gives up at 30 s); one second for the test."""


class Gate:
    """A hold point of the server: ``env`` arms it, ``wait_held`` waits until a job is parked
    there, ``release`` lets it go on."""

    def __init__(self, tmp: Path, point: str) -> None:
        self.release_file = tmp / f"release-{point.replace(':', '-')}"
        self.env = {"PYVOL_TEST_HOLD_AT": f"{point}={self.release_file}"}

    def arm(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Arm the hold point in servers started from now on (they inherit the environment)."""
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)

    def wait_held(self, timeout: float = 30) -> None:
        held = Path(str(self.release_file) + ".held")
        wait_for(held.exists, timeout, "the server to reach the hold point", pause=0.02)

    def release(self) -> None:
        self.release_file.touch()


class Background:
    """Run one call in a thread; ``result()`` joins it and returns what it returned."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._out: dict[str, Any] = {}
        self._thread = threading.Thread(target=lambda: self._out.update(value=call()),
                                        daemon=True)
        self._thread.start()

    def result(self, timeout: float = 60) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the call did not answer"
        return self._out["value"]


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started
