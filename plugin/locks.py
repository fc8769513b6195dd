"""Bounded waits: one deadline per protocol call, and per-volume locks that cost nothing for
names that are not in use.

dockerd gives up on a plugin call after 30 s once the plugin was enabled (its default
``--timeout 30``), and never sends Unmount for a Mount it saw fail.  So every Docker verb
answers within :data:`CALL_BUDGET`: each call makes one :class:`Deadline` and every wait it
does (for the volume's lock, for a background job) takes its time from that one budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from plugin.errors import VolumeBusy

CALL_BUDGET = 25.0
"""Seconds a Docker verb may take in all: under dockerd's 30 s, with room for the transport."""


class Deadline:
    """The end of one call's time budget; ``None`` seconds means no bound (management API)."""

    def __init__(self, seconds: float | None = CALL_BUDGET) -> None:
        self._end = None if seconds is None else time.monotonic() + seconds

    def remaining(self, cap: float | None = None) -> float | None:
        """Seconds left (never negative), at most ``cap``; None when unbounded and no cap."""
        if self._end is None:
            return cap
        left = max(0.0, self._end - time.monotonic())
        return left if cap is None else min(left, cap)


class VolumeLocks:
    """One lock per volume name, kept only while some call holds or waits for it.

    An entry is dropped when its last user leaves, so the table never grows with the names
    callers invent (validated or not) or with volumes that no longer exist.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[str, tuple[threading.Lock, list[int]]] = {}

    @contextmanager
    def hold(self, name: str, deadline: Deadline, busy: Callable[[], str]) -> Iterator[None]:
        """Hold ``name``'s lock; raise :class:`VolumeBusy` (with ``busy()``) if the deadline
        passes first."""
        with self._guard:
            lock, users = self._entries.setdefault(name, (threading.Lock(), [0]))
            users[0] += 1
        try:
            timeout = deadline.remaining()
            if not lock.acquire(timeout=-1 if timeout is None else timeout):
                raise VolumeBusy(busy())
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._entries[name]

    def __len__(self) -> int:
        with self._guard:
            return len(self._entries)
