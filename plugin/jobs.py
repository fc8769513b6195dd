"""Background work per volume (snapshots, pushes) that Docker calls never wait on unbounded.

At most one job of a :class:`Jobs` instance runs per volume at a time.  Each feature has its
own instance (snapshots, S3), hence its own queue and its own error slot: an error is cleared
only by a later success of the same feature's job.  :meth:`Jobs.wait` always takes a bound
(a Mount waits for its volume's on-unmount snapshot at most for what is left of its deadline);
:meth:`Jobs.describe` says what runs and for how long, for the message of a call that gave up
waiting; :meth:`Jobs.cancel` drops queued jobs that may be dropped (automatic snapshots).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from backends.priority import lower_priority

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    what: str
    cancellable: bool
    future: Future[None] = field(default_factory=Future)
    started: float | None = None
    """time.monotonic() when it began running."""


class Jobs:
    """``workers`` caps how many volumes' jobs run at once.  Threads start on demand, so the
    default is generous: a Mount waits for its volume's job, which must not queue behind other
    volumes' long ones."""

    def __init__(self, workers: int = 64, name: str = "jobs") -> None:
        # Idle priority: Docker calls must not wait behind background work (CPU, GIL, disk).
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name,
                                        initializer=lower_priority)
        self._lock = threading.Lock()
        self._queued: dict[str, list[Job]] = {}
        self.errors: dict[str, str] = {}
        self.progress: dict[str, Callable[[], str | None]] = {}
        """Per volume, a function saying how far its running job is (set by the job)."""

    def submit(self, volume: str, what: str, work: Callable[[], None], *,
               cancellable: bool = False) -> Future[None]:
        """Queue ``work`` for ``volume`` after any job already queued for it.

        A queued job takes a worker only once the job before it is done: a backlog on one
        volume never holds workers that other volumes' jobs need.  ``cancellable``: the job
        may be dropped by :meth:`cancel` while it waits its turn.
        """
        job = Job(what, cancellable)
        with self._lock:
            queue = self._queued.setdefault(volume, [])
            before = queue[-1].future if queue else None
            queue.append(job)
        job.future.add_done_callback(lambda _: self._done(volume, job))
        if before is None:
            self._start(volume, job, work)
        else:
            before.add_done_callback(lambda _: self._start(volume, job, work))
        return job.future

    def _start(self, volume: str, job: Job, work: Callable[[], None]) -> None:
        try:
            self._pool.submit(self._run, volume, job, work)
        except RuntimeError:  # shut down: the job will never run
            job.future.cancel()

    def _run(self, volume: str, job: Job, work: Callable[[], None]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        job.started = time.monotonic()
        try:
            work()
            self.errors.pop(volume, None)
        except Exception as exc:
            log.exception("%s of volume %s failed", job.what, volume)
            self.errors[volume] = f"{job.what} failed: {exc}"
        finally:
            self.progress.pop(volume, None)
            job.future.set_result(None)

    def _done(self, volume: str, job: Job) -> None:
        with self._lock:
            queue = self._queued.get(volume, [])
            if job in queue:
                queue.remove(job)
            if not queue:
                self._queued.pop(volume, None)

    def busy(self, volume: str) -> bool:
        with self._lock:
            return volume in self._queued

    def wait(self, volume: str, timeout: float | None) -> bool:
        """Wait (at most ``timeout`` s) for the volume's queued jobs; False if some still run."""
        with self._lock:
            futures = [job.future for job in self._queued.get(volume, [])]
        if not futures:
            return True
        _, not_done = wait(futures, timeout=timeout)
        return not not_done

    def cancel(self, volume: str) -> list[str]:
        """Drop the volume's cancellable jobs that have not started; returns what was dropped."""
        with self._lock:
            queued = list(self._queued.get(volume, []))
        return [job.what for job in queued
                if job.cancellable and job.started is None and job.future.cancel()]

    def describe(self, volume: str) -> str | None:
        """What runs on the volume and how far it is, e.g. for a Mount that gave up waiting."""
        with self._lock:
            queued = list(self._queued.get(volume, []))
        if not queued:
            return None
        running = next((j for j in queued if j.started is not None), None)
        if running is None:
            return f"{queued[0].what} (about to start)"
        assert running.started is not None  # noqa: S101 -- just checked
        progress_fn = self.progress.get(volume)
        progress = progress_fn() if progress_fn else None
        text = f"{running.what} (running for {time.monotonic() - running.started:.0f} s"
        text += f", {progress})" if progress else ")"
        later = len(queued) - 1 - queued.index(running)
        if later:
            text += f", then {later} more job(s)"
        return text

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=False)
