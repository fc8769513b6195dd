"""The leases this host holds on volumes used from several hosts (``-o s3_lease=true``).

A volume's lease (:mod:`s3sync.lease`, an object in its S3 prefix) says which host may have it
mounted.  This host takes it at the first Mount, keeps it while the volume is mounted or its
last push is still uploading, renews it from one thread every third of its time to live, and
frees it once that push is done.  Another host's Mount meanwhile is refused, naming the holder
and what it is doing (``mounted``, ``pushing 62%``).

A tenure that could not be renewed in time, or that another host took over (after it
expired, or ``pyvol lease break``), is *lost*: it is never written again, Status says so, and
the volume's next Mount here takes the lease afresh (if it is free).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from plugin.options import S3Policy
from plugin.sync.remotes import Remotes

if TYPE_CHECKING:
    from s3sync.hostid import Host
    from s3sync.lease import Lease, LeaseInfo, State, Tenure
    from s3sync.push import Fence

log = logging.getLogger(__name__)

TICK = 1.0
"""Seconds between the renewal thread's looks at the held leases."""
PROGRESS_EVERY = 2.0
"""Least seconds between two writes of a push's progress into the lease."""


@dataclass
class Held:
    tenure: Tenure
    policy: S3Policy
    since: datetime
    lost: str | None = None
    want: tuple[State, str] | None = None
    """A state to write into the lease (by the renewal thread: calls never wait on S3)."""
    progress_at: float = 0.0
    release: bool = False
    """Free it (the renewal thread does, unless a Mount here takes it back first)."""
    releasing: threading.Lock = field(default_factory=threading.Lock)
    """Held while it is being freed: a Mount here waits, then takes it afresh."""
    claims: int = 0
    """Mounts between their take and their end (see :meth:`Leases.unclaim`): never freed
    meanwhile."""


class Leases:
    """The tenures of this host.  Mount takes a lease in its own call (it must know the
    answer); every other write -- state, progress, renewals, the release after the last
    push -- is done by one renewal thread, so Unmount and Remove never wait on S3."""

    def __init__(self, remotes: Remotes, host: Callable[[], Host]) -> None:
        self.remotes = remotes
        self._host = host
        self._held: dict[str, Held] = {}
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> Host:
        return self._host()

    def lease(self, volume: str, policy: S3Policy, *, probe: bool = True) -> Lease:
        """The volume's lease as an object (for `pyvol lease show|break`); ``probe=False``
        to look only, without proving the store enforces conditional writes."""
        store = self.remotes.get(policy.bucket, policy.prefix, policy.encrypt)
        return store.lease(self.host, volume, float(policy.lease_ttl), probe=probe)

    def acquire(self, volume: str, policy: S3Policy) -> bool:
        """Hold the volume's lease for a Mount: True if taken now, False if this host held
        it already (mounted elsewhere here, or its last push still running: the release it
        was waiting for is called off).

        Raises :class:`~s3sync.errors.LeaseHeld` naming the holder, and the store's errors
        (unreachable, no conditional writes) as they are."""
        with self._lock:
            held = self._held.get(volume)
        if held is not None:
            with held.releasing, self._lock:
                if (self._held.get(volume) is held and held.lost is None
                        and held.tenure.remaining() > 1.0):
                    held.release = False
                    held.claims += 1
                    if held.tenure.record.state != "mounted":
                        held.want = ("mounted", "")
                        self._lock.notify_all()
                    return False
        tenure = self.lease(volume, policy).take("mounted")
        with self._lock:
            self._held[volume] = Held(tenure, policy, datetime.now(UTC), claims=1)
            self._start()
        log.info("volume %s: took its lease (generation %d)", volume, tenure.generation)
        return True

    def fence(self, volume: str) -> Fence | None:
        """What a push of the volume is made under: this host's tenure (a lost one refuses
        to confirm), or None if this host holds none."""
        with self._lock:
            held = self._held.get(volume)
        if held is None:
            return None
        if held.lost is not None:
            return Lost(held.tenure.generation, held.lost)
        return held.tenure

    def tenure(self, volume: str) -> Tenure | None:
        """This host's tenure of the volume's lease, if it holds one."""
        with self._lock:
            held = self._held.get(volume)
        return held.tenure if held is not None else None

    def holds(self, volume: str) -> bool:
        with self._lock:
            held = self._held.get(volume)
            return held is not None and held.lost is None

    def report(self, volume: str, state: State, progress: str = "", *,
               force: bool = False) -> None:
        """Have the lease say what this host does with the volume (written at most every
        :data:`PROGRESS_EVERY` seconds unless ``force``); never waits, never raises."""
        with self._lock:
            held = self._held.get(volume)
            if held is None or held.lost is not None:
                return
            now = time.monotonic()
            if not force and now - held.progress_at < PROGRESS_EVERY:
                return
            held.progress_at = now
            held.want = (state, progress)
            self._lock.notify_all()

    def unclaim(self, volume: str) -> None:
        """A Mount that called :meth:`acquire` is over (mounted, or failed)."""
        with self._lock:
            held = self._held.get(volume)
            if held is not None and held.claims > 0:
                held.claims -= 1

    def release(self, volume: str) -> None:
        """Free the lease soon (the volume is unmounted here and its data pushed), unless a
        Mount here is under way."""
        with self._lock:
            held = self._held.get(volume)
            if held is not None and held.claims == 0:
                held.release = True
                self._lock.notify_all()

    def give_back(self, volume: str) -> None:
        """Free the lease now, in this thread, and forget it (a take that must not be used:
        no Mount here may reuse it meanwhile).  Best effort: a lease that cannot be freed
        expires."""
        with self._lock:
            held = self._held.pop(volume, None)
        if held is None:
            return
        with held.releasing:
            try:
                held.tenure.release()
            except Exception as exc:
                log.warning("volume %s: freeing its lease failed (%s); it expires in %.0f s",
                            volume, exc, max(0.0, held.tenure.remaining()))

    def forget(self, volume: str) -> None:
        with self._lock:
            self._held.pop(volume, None)

    def status(self, volume: str) -> dict[str, Any] | None:
        """What Status shows: this host's tenure, from memory (Get never calls S3)."""
        with self._lock:
            held = self._held.get(volume)
        if held is None:
            return None
        record = held.tenure.record
        host = self.host
        shown: dict[str, Any] = {
            "holder": {"id": host.id, "name": host.name},
            "since": held.since.isoformat(timespec="seconds"),
            "generation": record.generation,
            "state": record.state if held.lost is None else "lost",
        }
        if held.lost is not None:
            shown["lost"] = held.lost
        else:
            left = max(0.0, held.tenure.remaining())
            shown["expires"] = (datetime.now(UTC) + timedelta(seconds=left)).isoformat(
                timespec="seconds")
            if record.progress:
                shown["progress"] = record.progress
        return shown

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()

    # the renewal thread: every write but the take

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lease-renewal",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._lock.wait(TICK)
                held = list(self._held.items())
            for volume, lease in held:
                if lease.lost is None:
                    self._tend(volume, lease)

    def _tend(self, volume: str, held: Held) -> None:
        from s3sync.errors import LeaseLost

        tenure = held.tenure
        if tenure.remaining() <= 0:
            self._lose(volume, held, "this host could not renew it before it expired (the S3 "
                       "store unreachable, or this host paused)")
            return
        with self._lock:
            want, held.want = held.want, None
        try:
            with held.releasing:
                with self._lock:
                    release = held.release
                if release:
                    tenure.release()
                    with self._lock:
                        if self._held.get(volume) is held:
                            del self._held[volume]
                    log.info("volume %s: freed its lease", volume)
                    return
            if want is not None:
                tenure.update(*want)
            elif tenure.remaining() < tenure.record.ttl * 2 / 3:
                tenure.renew()
        except LeaseLost as exc:
            self._lose(volume, held, str(exc))
        except Exception as exc:
            with self._lock:
                if want is not None and held.want is None:
                    held.want = want  # written next time
            log.warning("volume %s: writing its lease failed (%s); retried, it holds for "
                        "%.0f s more", volume, exc, max(0.0, tenure.remaining()))

    @staticmethod
    def _lose(volume: str, held: Held, why: str) -> None:
        held.lost = why
        log.error("volume %s: this host lost its lease: %s; its pushes from now on are not "
                  "the volume's latest", volume, why)


@dataclass(frozen=True)
class Lost:
    """The fence of a push whose host does not hold the lease: never confirmed."""

    generation: int
    why: str

    def confirm(self) -> object:
        from s3sync.errors import LeaseLost

        raise LeaseLost(self.why)


@dataclass(frozen=True)
class Unleased:
    """The fence of a volume created without ``s3_lease``: its pushes are fenced off (kept
    aside) if its prefix holds a lease, i.e. other hosts use it as a leased volume."""

    lease: Lease
    generation: int = 0

    def confirm(self) -> object:
        from s3sync.errors import LeaseLost

        if self.lease.show() is not None:
            raise LeaseLost(f"{self.lease.bucket.where}: the prefix of {self.lease.volume} is "
                            "used from several hosts with a lease, and this volume was "
                            "created without -o s3_lease=true")
        return None


def describe(info: LeaseInfo | None) -> dict[str, Any]:
    """A lease as `pyvol lease show` prints it (JSON)."""
    if info is None:
        return {"state": "none"}
    record = info.record
    shown: dict[str, Any] = {"state": record.state if info.live or record.holder is None
                             else "expired", "generation": record.generation,
                             "ttl": record.ttl}
    if record.holder is not None:
        shown["holder"] = {"id": record.holder.id, "name": record.holder.name}
        shown["since"] = record.since.isoformat() if record.since else None
        shown["expires"] = info.expires.isoformat()
        if record.progress:
            shown["progress"] = record.progress
    return shown
