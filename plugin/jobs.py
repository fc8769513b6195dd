"""Background work per volume (snapshots, pushes) that Docker calls never wait on.

At most one job runs per volume at a time; :meth:`Jobs.wait` lets Mount wait for a volume's
pending job (the on-unmount snapshot must read the data before a container writes again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

log = logging.getLogger(__name__)


class Jobs:
    """``workers`` caps how many volumes' jobs run at once.  Threads start on demand, so the
    default is generous: a Mount waits for its volume's job, which must not queue behind other
    volumes' long ones."""

    def __init__(self, workers: int = 64, name: str = "jobs") -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pending: dict[str, Future[None]] = {}
        self.errors: dict[str, str] = {}

    def submit(self, volume: str, what: str, work: Callable[[], None]) -> Future[None]:
        """Queue ``work`` for ``volume`` after any job already queued for it.

        A queued job takes a worker only once the job before it is done: a backlog on one
        volume never holds workers that other volumes' jobs need.
        """
        future: Future[None] = Future()
        with self._lock:
            before = self._pending.get(volume)
            self._pending[volume] = future
        future.add_done_callback(lambda f: self._done(volume, f))
        if before is None:
            self._start(volume, what, work, future)
        else:
            before.add_done_callback(lambda _: self._start(volume, what, work, future))
        return future

    def _start(self, volume: str, what: str, work: Callable[[], None],
               future: Future[None]) -> None:
        try:
            self._pool.submit(self._run, volume, what, work, future)
        except RuntimeError:  # shut down: the job will never run
            future.cancel()

    def _run(self, volume: str, what: str, work: Callable[[], None],
             future: Future[None]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            work()
            self.errors.pop(volume, None)
        except Exception as exc:
            log.exception("%s of volume %s failed", what, volume)
            self.errors[volume] = f"{what} failed: {exc}"
        finally:
            future.set_result(None)

    def _done(self, volume: str, future: Future[None]) -> None:
        with self._lock:
            if self._pending.get(volume) is future:
                del self._pending[volume]

    def busy(self, volume: str) -> bool:
        with self._lock:
            return volume in self._pending

    def wait(self, volume: str, timeout: float | None = None) -> bool:
        """Wait for the volume's queued jobs; return False if they are still running."""
        with self._lock:
            future = self._pending.get(volume)
        if future is None:
            return True
        done, _ = wait([future], timeout=timeout)
        return bool(done)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=False)
