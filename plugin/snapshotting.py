"""Snapshot policies in action: on last unmount, on a schedule, with retention.

Holds the snapshot store; the driver calls it at mount, unmount and remove.  Automatic
snapshots run as background jobs of their own queue (``Jobs``), so no Docker call waits on
them, except a Mount of the same volume, which waits until its on-unmount snapshot has read
the data, within the Mount's deadline: past it the Mount fails saying what runs (dockerd never
sends Unmount for a failed Mount, so nothing is counted).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.snapshots import SnapshotStore
from plugin.errors import InvalidName, VolumeBusy
from plugin.jobs import Jobs
from plugin.locks import Deadline
from plugin.options import SNAPSHOT_MAX, SNAPSHOT_NAME, SnapshotPolicy
from plugin.testhooks import fail_point, hold_point

log = logging.getLogger(__name__)

MOUNT_WAIT = 90.0
"""A cap below the call's own deadline (which is shorter today)."""
STATUS_SNAPSHOTS = 20


def validate_snapshot_name(name: str) -> str:
    if SNAPSHOT_NAME.fullmatch(name) is None:
        raise InvalidName(
            f"invalid snapshot name {name[:40]!r}: use 1-{SNAPSHOT_MAX} characters from A-Z a-z "
            "0-9 "
            "_ . : -, starting with a letter or digit"
        )
    return name


class Snapshotter:
    def __init__(self, store: SnapshotStore, jobs: Jobs) -> None:
        self.store = store
        self.jobs = jobs
        self._periodic: dict[str, tuple[SnapshotPolicy, Callable[[], Path]]] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # driver hooks

    def track(self, volume: str, policy: SnapshotPolicy, data: Callable[[], Path]) -> None:
        """Register a volume's periodic policy (at create and at start-up)."""
        if policy.every:
            with self._guard:
                self._periodic[volume] = (policy, data)

    def untrack(self, volume: str) -> None:
        with self._guard:
            self._periodic.pop(volume, None)

    def before_mount(self, volume: str, deadline: Deadline) -> None:
        """Wait, within ``deadline``, until the volume's snapshot has read the data; else raise
        :class:`VolumeBusy` saying what runs (a container must not write under a snapshot)."""
        if not self.jobs.wait(volume, deadline.remaining(MOUNT_WAIT)):
            raise VolumeBusy(
                f"volume {volume!r} cannot be mounted yet: its {self.jobs.describe(volume)} "
                "is still reading the data; try again shortly (`docker volume inspect "
                f"{volume}` shows snapshot_state)")

    def after_last_unmount(self, volume: str, policy: SnapshotPolicy, data: Path) -> None:
        if policy.on_unmount:
            self.jobs.submit(volume, "snapshot on unmount",
                             lambda: self._automatic(volume, policy, data), cancellable=True)

    def before_remove(self, volume: str, deadline: Deadline) -> None:
        """Drop the volume's queued automatic snapshots and wait (bounded) for a running one;
        raise :class:`VolumeBusy` if it is still running at the deadline."""
        dropped = self.jobs.cancel(volume)
        if dropped:
            log.info("volume %s: removed, so its queued %s will not run", volume,
                     ", ".join(dropped))
        if not self.jobs.wait(volume, deadline.remaining()):
            raise VolumeBusy(
                f"volume {volume!r} cannot be removed yet: its {self.jobs.describe(volume)} "
                "is still running; try again shortly")

    def on_remove(self, volume: str, policy: SnapshotPolicy) -> None:
        self.untrack(volume)
        if policy.on_remove == "delete":
            # A pending S3 push still reads its sync snapshot; the syncer drops it after.
            # At once: the data goes in the background (the driver runs ``store.purge``).
            self.store.discard(volume, keep_kinds=frozenset({"sync"}))

    def status(self, volume: str, policy: SnapshotPolicy) -> dict[str, Any]:
        snaps = [s for s in self.store.list_snapshots(volume) if s.kind != "sync"]
        status: dict[str, Any] = {
            "snapshot_policy": {
                "on_unmount": policy.on_unmount,
                "every_seconds": policy.every,
                "keep": policy.keep,
                "on_remove": policy.on_remove,
            },
            "snapshot_count": len(snaps),
            "snapshots": [
                {"name": s.name, "created": s.created.isoformat(), "kind": s.kind,
                 "size_bytes": s.size, "files": s.files}
                for s in reversed(snaps[-STATUS_SNAPSHOTS:])
            ],
        }
        if self.jobs.busy(volume):
            status["snapshot_state"] = "running"
        error = self.jobs.errors.get(volume)
        if error:
            status["snapshot_error"] = error
        return status

    def _automatic(self, volume: str, policy: SnapshotPolicy, data: Path) -> None:
        hold_point("snapshot:automatic")
        fail_point("snapshot:automatic")
        self.store.create(volume, data, kind="automatic")
        dropped = self.store.prune(volume, policy.keep)
        if dropped:
            log.info("volume %s: pruned %d automatic snapshot(s)", volume, len(dropped))

    # the schedule

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="snapshot-schedule", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            with self._guard:
                periodic = dict(self._periodic)
            now = time.time()
            for volume, (policy, data) in periodic.items():
                if self.jobs.busy(volume) or policy.every is None:
                    continue
                automatic = [s for s in self.store.list_snapshots(volume) if s.kind == "automatic"]
                last = automatic[-1].created.timestamp() if automatic else 0.0
                if now - last >= policy.every:
                    self.jobs.submit(volume, "periodic snapshot",
                                     self._periodic_job(volume, policy, data), cancellable=True)

    def _periodic_job(self, volume: str, policy: SnapshotPolicy,
                      data: Callable[[], Path]) -> Callable[[], None]:
        def run() -> None:
            path = data()
            if path.is_dir():
                self._automatic(volume, policy, path)
        return run
