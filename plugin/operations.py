"""What the Docker verbs and the management API share: each volume's lock and the long
operations running on it.

A long management operation (a restore, a manual snapshot) is registered under the volume's
lock (:meth:`VolumeGuard.begin`) and runs outside it (:meth:`VolumeGuard.running`); a call
that conflicts with it fails at once (:meth:`VolumeGuard.refuse_if_busy`) saying what runs
and how far it is.  A call that gives up waiting for the lock says the same, and also which
background job (the features' :class:`~plugin.jobs.Jobs`) runs on the volume.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from plugin.errors import VolumeBusy
from plugin.jobs import Jobs
from plugin.locks import Deadline, VolumeLocks
from plugin.names import validate_volume_name

MANAGEMENT_WAIT = 600.0
"""How long a management call (restore) waits for the volume's background jobs."""


@dataclass(eq=False)
class Operation:
    """A long management operation on a volume, run outside its lock."""

    what: str
    exclusive: bool
    """Exclusive (a restore): no Mount meanwhile.  Otherwise (a manual snapshot) only Remove
    and other operations are refused."""
    progress: Callable[[], str | None] = lambda: None
    started: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        progress = self.progress()
        return (f"{self.what} is in progress ({progress or 'running'} for "
                f"{time.monotonic() - self.started:.0f} s)")


class VolumeGuard:
    """Per-volume locks, the operations registry, and the features' job queues (``jobs``),
    which it only reads: to describe them and to wait for them."""

    def __init__(self, jobs: Sequence[Jobs]) -> None:
        self.locks = VolumeLocks()
        self._jobs = tuple(jobs)
        self._operations: dict[str, list[Operation]] = {}
        self._guard = threading.Lock()

    @contextmanager
    def locked(self, name: str, deadline: Deadline | None = None) -> Iterator[None]:
        """Hold the volume's lock (the name is validated first: no lock for junk names);
        VolumeBusy, saying what runs, if ``deadline`` (default: one call's) passes first."""
        validate_volume_name(name)
        with self.locks.hold(name, deadline or Deadline(), lambda: self._busy_text(name)):
            yield

    def _ops(self, name: str) -> list[Operation]:
        with self._guard:
            return list(self._operations.get(name, []))

    def _busy_text(self, name: str) -> str:
        running = [op.describe() for op in self._ops(name)]
        for jobs in self._jobs:
            if (job := jobs.describe(name)) is not None:
                running.append(f"{job} is running")
        return (f"volume {name!r} is busy ({'; '.join(running) or 'another call holds it'}); "
                "try again shortly")

    def refuse_if_busy(self, name: str, verb: str, *, exclusive_only: bool = False) -> None:
        """Raise VolumeBusy if a management operation runs on the volume (call under its
        lock); ``exclusive_only``: only if an exclusive one (a restore) runs."""
        for op in self._ops(name):
            if op.exclusive or not exclusive_only:
                raise VolumeBusy(f"volume {name!r} cannot be {verb} now: {op.describe()}; try "
                                 "again when it is done")

    def begin(self, name: str, op: Operation) -> None:
        """Register ``op`` (call under the volume's lock, after refuse_if_busy)."""
        with self._guard:
            self._operations.setdefault(name, []).append(op)

    @contextmanager
    def running(self, name: str, op: Operation) -> Iterator[None]:
        """Run ``op`` outside the lock (registered by :meth:`begin`); unregister it after."""
        try:
            yield
        finally:
            with self._guard:
                ops = self._operations.get(name, [])
                if op in ops:
                    ops.remove(op)
                if not ops:
                    self._operations.pop(name, None)

    def wait_jobs(self, name: str) -> None:
        """Wait for the volume's background jobs (a restore must not race one); VolumeBusy
        if they do not finish within :data:`MANAGEMENT_WAIT`."""
        for jobs in self._jobs:
            if not jobs.wait(name, MANAGEMENT_WAIT):
                raise VolumeBusy(f"volume {name!r}: its {jobs.describe(name)} did not finish "
                                 f"within {MANAGEMENT_WAIT:.0f} s; try again later")
