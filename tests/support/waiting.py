"""Bounded polling: every wait in the tests has a deadline and says what it waited for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, pause: float = 0.05) -> T:
    """Call ``check`` every ``pause`` seconds until it returns something true, and return that;
    fail the test (AssertionError) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(pause)


def eventually(condition: Callable[[], bool], timeout: float = 5.0, pause: float = 0.02) -> bool:
    """Whether ``condition`` turns true within ``timeout`` seconds (polled every ``pause``);
    for callers that assert with a message of their own."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
    return True
