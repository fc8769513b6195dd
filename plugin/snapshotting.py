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
from dataclasses import dataclass, field
from typing import Any

from backends.base import VolumeContent
from plugin.errors import InvalidName, VolumeBusy
from plugin.jobs import Jobs
from plugin.locks import Deadline
from plugin.options import SNAPSHOT_MAX, SNAPSHOT_NAME, SnapshotPolicy
from plugin.testhooks import fail_point, hold_point
from snapshots.store import Progress, SnapshotCancelled, SnapshotStore

log = logging.getLogger(__name__)

MOUNT_WAIT = 90.0
"""A cap below the call's own deadline (which is shorter today)."""
STATUS_SNAPSHOTS = 20
CANCEL_POLL = 0.2
"""Seconds between checks, while Remove waits, for an automatic snapshot to cancel."""


def validate_snapshot_name(name: str) -> str:
    if SNAPSHOT_NAME.fullmatch(name) is None:
        raise InvalidName(
            f"invalid snapshot name {name[:40]!r}: use 1-{SNAPSHOT_MAX} characters from A-Z a-z "
            "0-9 "
            "_ . : -, starting with a letter or digit"
        )
    return name


@dataclass(eq=False)
class Capture:
    """One running snapshot as others see it: how far it is, and its cancel flag."""

    hold: str | None = None
    """Test hook (``plugin.testhooks``) held once the first file is stored."""
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: Progress | None = None

    def update(self, progress: Progress) -> None:
        self.progress = progress
        if self.hold and progress.files_done == 1:
            hold_point(self.hold, until=self.cancel.is_set)

    def text(self) -> str | None:
        progress = self.progress
        return None if progress is None else progress.text()


class Snapshotter:
    def __init__(self, store: SnapshotStore, jobs: Jobs) -> None:
        self.store = store
        self.jobs = jobs
        self._captures: dict[str, Capture] = {}
        """The running automatic snapshot of each volume (Remove cancels it)."""
        self._periodic: dict[str, tuple[SnapshotPolicy, VolumeContent]] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # driver hooks

    def track(self, volume: str, policy: SnapshotPolicy, data: VolumeContent) -> None:
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

    def after_last_unmount(self, volume: str, policy: SnapshotPolicy,
                           data: VolumeContent) -> None:
        if policy.on_unmount:
            self.jobs.submit(volume, "snapshot on unmount",
                             lambda: self._automatic(volume, policy, data), cancellable=True)

    def before_remove(self, volume: str, deadline: Deadline) -> None:
        """Drop the volume's queued automatic snapshots and cancel a running one (it stops
        at its next file and leaves nothing); raise :class:`VolumeBusy` if it is still
        running at the deadline (then it is let finish: the volume stays)."""
        dropped = self.jobs.cancel(volume)
        if dropped:
            log.info("volume %s: removed, so its queued %s will not run", volume,
                     ", ".join(dropped))
        cancelled: set[Capture] = set()
        while True:
            with self._guard:
                capture = self._captures.get(volume)
            if capture is not None and capture not in cancelled:
                capture.cancel.set()
                cancelled.add(capture)
            left = deadline.remaining()
            if self.jobs.wait(volume, CANCEL_POLL if left is None else min(left, CANCEL_POLL)):
                return
            if left is not None and left <= CANCEL_POLL:
                break
        for capture in cancelled:
            capture.cancel.clear()
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
            with self._guard:
                capture = self._captures.get(volume)
            if capture is not None and capture.progress is not None:
                status["snapshot_progress"] = capture.progress.to_json()
        error = self.jobs.errors.get(volume)
        if error:
            status["snapshot_error"] = error
        return status

    def _automatic(self, volume: str, policy: SnapshotPolicy, data: VolumeContent) -> None:
        capture = Capture(hold="snapshot:capture")
        with self._guard:
            self._captures[volume] = capture
        self.jobs.progress[volume] = capture.text
        try:
            hold_point("snapshot:automatic")
            fail_point("snapshot:automatic")
            # The store reads the volume in a view of its own (held until read, whatever
            # unmounts meanwhile), or clones its image where the backend can.
            self.store.create(volume, data, kind="automatic", progress=capture.update,
                              cancelled=capture.cancel.is_set)
        except SnapshotCancelled:
            log.info("volume %s: its automatic snapshot was cancelled by its removal; "
                     "nothing of it was kept", volume)
            return
        finally:
            with self._guard:
                self._captures.pop(volume, None)
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
                      data: VolumeContent) -> Callable[[], None]:
        def run() -> None:
            if data.exists():
                self._automatic(volume, policy, data)
        return run
