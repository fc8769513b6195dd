"""Cached disk usage, so ``Get`` stays cheap on volumes of any size."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from backends.fs import tree_usage


@dataclass(frozen=True)
class Usage:
    size_bytes: int
    entries: int
    measured_at: datetime


class UsageCache:
    """Measure a directory's usage in the background; serve the last measurement.

    A measurement older than ``ttl`` seconds (or invalidated) is refreshed in the background;
    a caller with no measurement at all waits up to ``wait`` seconds for the first one.
    """

    def __init__(
        self,
        ttl: float = 30.0,
        wait: float = 0.2,
        measure: Callable[[Path], tuple[int, int]] = tree_usage,
    ) -> None:
        self._ttl = ttl
        self._wait = wait
        self._measure = measure
        self._lock = threading.Lock()
        self._values: dict[Path, tuple[Usage, float]] = {}
        self._running: dict[Path, Future[Usage]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage")

    def get(self, path: Path) -> Usage | None:
        with self._lock:
            cached = self._values.get(path)
            fresh = cached is not None and time.monotonic() - cached[1] < self._ttl
            future = None if fresh else self._start(path)
        if cached is not None:
            return cached[0]
        if future is None:
            return None
        try:
            return future.result(timeout=self._wait)
        except (FutureTimeout, OSError):
            return None

    def invalidate(self, path: Path) -> None:
        with self._lock:
            cached = self._values.get(path)
            if cached is not None:
                self._values[path] = (cached[0], float("-inf"))

    def forget(self, path: Path) -> None:
        with self._lock:
            self._values.pop(path, None)

    def _start(self, path: Path) -> Future[Usage]:
        running = self._running.get(path)
        if running is not None:
            return running
        future = self._pool.submit(self._run, path)
        self._running[path] = future
        return future

    def _run(self, path: Path) -> Usage:
        try:
            size, entries = self._measure(path)
            usage = Usage(size, entries, datetime.now(UTC))
            with self._lock:
                self._values[path] = (usage, time.monotonic())
            return usage
        finally:
            with self._lock:
                self._running.pop(path, None)
