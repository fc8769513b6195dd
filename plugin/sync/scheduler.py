"""When pushes run by themselves: every ``s3_every`` seconds while a volume is mounted, and
again after a failure, with exponential backoff.  One thread, ticking every second.

A retry is data, not a callback: :class:`Backoff` keeps when each volume's failed push may
run again (and the content to capture, if the capture failed); when that time comes, the
pusher looks at the push's durable state to know what is left to do
(:meth:`~plugin.sync.push.Pusher.retry`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import TYPE_CHECKING

from backends.base import VolumeContent
from plugin.jobs import Jobs
from plugin.options import S3Policy
from plugin.state import StateStore

if TYPE_CHECKING:
    from plugin.sync.push import Pusher

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 5.0, 300.0


class Backoff:
    """The retry timers: per volume, its consecutive failures and when it may run again."""

    def __init__(self) -> None:
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, tuple[float, VolumeContent | None]] = {}

    def failed(self, volume: str, content: VolumeContent | None) -> float:
        """Count a failure; return the delay (s) until its retry is due."""
        failures = self._failures.get(volume, 0) + 1
        self._failures[volume] = failures
        delay: float = min(RETRY_MAX, RETRY_MIN * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)  # noqa: S311
        self._retry_at[volume] = (time.monotonic() + delay, content)
        return delay

    def succeeded(self, volume: str) -> None:
        self._failures.pop(volume, None)
        self._retry_at.pop(volume, None)

    def reset(self, volume: str) -> None:
        """Start counting afresh (the push ended without a retry to run)."""
        self._failures.pop(volume, None)

    def due(self, now: float) -> list[tuple[str, VolumeContent | None]]:
        return [(volume, content) for volume, (at, content) in list(self._retry_at.items())
                if now >= at]

    def take(self, volume: str) -> None:
        self._retry_at.pop(volume, None)


class Scheduler:
    def __init__(self, state: StateStore, pusher: Pusher, backoff: Backoff,
                 busy: tuple[Jobs, ...]) -> None:
        self.state = state
        self.pusher = pusher
        self.backoff = backoff
        self._busy = busy
        """The queues whose running job on a volume defers its scheduled pushes."""
        self._periodic: dict[str, tuple[S3Policy, VolumeContent]] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()

    def track(self, volume: str, policy: S3Policy, content: VolumeContent) -> None:
        """Push ``volume`` every ``policy.every`` seconds while it is mounted."""
        if policy.every:
            with self._guard:
                self._periodic[volume] = (policy, content)

    def untrack(self, volume: str) -> None:
        with self._guard:
            self._periodic.pop(volume, None)

    def start(self) -> None:
        threading.Thread(target=self._loop, name="s3-schedule", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _busy_on(self, volume: str) -> bool:
        return any(jobs.busy(volume) for jobs in self._busy)

    def _loop(self) -> None:
        last_push: dict[str, float] = {}
        while not self._stop.wait(1.0):
            now = time.monotonic()
            for volume, content in self.backoff.due(now):
                if not self._busy_on(volume):
                    self.backoff.take(volume)
                    try:
                        self.pusher.retry(volume, content)
                    except Exception:
                        log.exception("volume %s: the retry of its push could not be queued",
                                      volume)
            with self._guard:
                periodic = dict(self._periodic)
            for volume, (policy, content) in periodic.items():
                if policy.every is None:
                    continue
                try:
                    if not self.state.mount_count(volume):
                        continue
                    if now - last_push.setdefault(volume, now) >= policy.every and \
                            not self._busy_on(volume):
                        last_push[volume] = now
                        self.pusher.request(volume, policy, content)
                except Exception:
                    log.exception("volume %s: the periodic S3 push could not be queued", volume)
