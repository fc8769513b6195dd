"""The S3 sync as the driver and the management API see it: one call per moment of a
volume's life (create, mount, last unmount, remove, start-up) and per `pyvol sync` command,
each handed to the part whose job it is.  It also answers Status.s3.

The S3 jobs (``jobs``: captures and restores, one at a time per volume) are the sync's own
queue: their errors never show as, or clear, a snapshot error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.base import VolumeContent
from plugin.checking import Checks
from plugin.errors import VolumeBusy
from plugin.jobs import Jobs
from plugin.locks import Deadline
from plugin.options import S3Policy
from plugin.state import StateStore, SyncChange
from plugin.sync.push import Pusher
from plugin.sync.queue import PushQueue, push_state
from plugin.sync.remotes import Remotes, Transfers
from plugin.sync.restore import Restorer
from plugin.sync.scheduler import Backoff, Scheduler
from snapshots.store import SnapshotStore

if TYPE_CHECKING:
    from s3sync import CheckReport, RemoteSnapshot, RemoteStore
    from s3sync.keys import KeyInfo
    from s3sync.store import KeyList

log = logging.getLogger(__name__)

MOUNT_WAIT = 100.0
"""A cap on a Mount's wait for the restore; the Mount's own deadline is shorter today."""


class Syncer:
    def __init__(self, root: Path, state: StateStore, snapshots: SnapshotStore, jobs: Jobs,
                 env: dict[str, str]) -> None:
        self.state = state
        self.jobs = jobs
        self.uploads = Jobs(workers=2, name="s3")
        self.queue = PushQueue(state)
        self.remotes = Remotes(root, env)
        self.transfers = Transfers()
        backoff = Backoff()
        self.pusher = Pusher(state, self.queue, snapshots, jobs, self.uploads, self.remotes,
                             self.transfers, backoff)
        self.restorer = Restorer(self.queue, snapshots, jobs, self.remotes, self.transfers)
        self.scheduler = Scheduler(state, self.pusher, backoff, (self.uploads, jobs))
        self.checks = Checks(state)

    # a volume's life

    def record_for_create(self, volume: str, policy: S3Policy) -> SyncChange:
        """How Create makes the sync record it commits with the volume's (see
        PushQueue.for_create)."""
        return self.queue.for_create(volume, policy)

    def on_create(self, volume: str, policy: S3Policy, content: VolumeContent) -> None:
        self.restorer.at_create(volume, policy, content)

    def track(self, volume: str, policy: S3Policy, content: VolumeContent) -> None:
        """Push the volume every ``policy.every`` seconds while it is mounted."""
        self.scheduler.track(volume, policy, content)

    def before_mount(self, volume: str, policy: S3Policy, deadline: Deadline) -> None:
        """Wait (within ``deadline``) for a pending restore and the sync snapshot; never serve
        half a volume.  Raises RestoreInProgress or VolumeBusy saying how far it is."""
        settled = self.jobs.wait(volume, deadline.remaining(MOUNT_WAIT))
        record = self.queue.get(volume)
        if record is None or not record.restoring:
            if not settled:
                raise VolumeBusy(
                    f"volume {volume!r} cannot be mounted yet: its {self.jobs.describe(volume)} "
                    "is still reading the data; try again shortly")
            return
        raise self.restorer.refusal(volume, policy, record)

    def after_last_unmount(self, volume: str, policy: S3Policy, data: VolumeContent) -> None:
        if policy.sync != "manual":
            self.pusher.request(volume, policy, data)

    def before_remove(self, volume: str, data: VolumeContent, deadline: Deadline) -> None:
        """The local data goes; the remote copy stays.  A pending push still completes: its
        snapshot is taken now if it was not yet (within ``deadline``, else VolumeBusy).
        Once this returns, periodic pushes of the volume stop."""
        record = self.queue.get(volume)
        if record is not None and record.restoring and self.jobs.busy(volume):
            # Its content swap would bring the directory back after the removal.
            raise VolumeBusy(
                f"volume {volume!r} cannot be removed now: its restore from "
                f"s3://{record.bucket}/{record.prefix} is in progress, "
                f"{self.progress_text(volume) or 'about to start'}; try again when it is done "
                f"(`docker volume inspect {volume}` shows progress)")
        if push_state(record) == "requested" and not self.jobs.busy(volume) and data.exists():
            self.pusher.submit_capture(volume, data)  # its earlier attempt failed: once more
        if not self.jobs.wait(volume, deadline.remaining()):
            raise VolumeBusy(
                f"volume {volume!r} cannot be removed yet: its {self.jobs.describe(volume)} "
                "is still running; try again shortly")
        record = self.queue.get(volume)
        if push_state(record) == "requested" and data.exists():
            assert record is not None  # noqa: S101 -- requested
            raise VolumeBusy(
                f"volume {volume!r} cannot be removed yet: the snapshot its pending S3 push "
                f"needs could not be taken ({record.last_error}); fix that and try again")
        self.scheduler.untrack(volume)

    def start(self) -> None:
        """Resume pushes of removed volumes; run periodic pushes and retries."""
        self.pusher.resume_removed()
        self.scheduler.start()

    def resume(self, volume: str, policy: S3Policy, data: VolumeContent) -> None:
        """Queue again what a restart interrupted: the restore at create, a pending push."""
        record = self.queue.get(volume)
        if record is not None and record.restoring:
            log.info("volume %s: resuming its restore from s3://%s/%s", volume, record.bucket,
                     record.prefix)
            self.restorer.submit(volume, policy, data)
        if push_state(record) != "idle":
            log.info("volume %s: resuming a pending S3 push", volume)
            self.pusher.retry(volume, data)

    def stop(self) -> None:
        self.scheduler.stop()

    # what Status and the CLI see

    def progress_text(self, volume: str) -> str | None:
        return self.restorer.progress_text(volume)

    def needed_snapshots(self, volume: str) -> set[str]:
        return self.pusher.needed_snapshots(volume)

    def why_needed(self, volume: str, name: str) -> str:
        return self.pusher.why_needed(volume, name)

    def status(self, volume: str, policy: S3Policy) -> dict[str, Any]:
        record = self.queue.get(volume)
        progress = self.transfers.get(volume)
        state = "idle"
        if record is not None and record.restoring:
            state = "error" if record.last_error and progress is None else "restoring"
        elif progress is not None:
            state = progress[0]
        elif record is not None and record.pending:
            state = "error" if record.last_error else "pending"
        elif record is not None and record.last_error:
            state = "error"
        status: dict[str, Any] = {
            "state": state,
            "bucket": policy.bucket,
            "prefix": policy.prefix,
            "mode": policy.sync if policy.sync != "periodic" else f"every {policy.every}s",
            "keep": policy.keep,
            "encrypted": policy.encrypt,
        }
        if record is not None:
            status["last_push"] = (
                {"at": record.last_ok_at, "remote_snapshot": record.last_id}
                if record.last_ok_at else None)
            if record.last_error:
                status["last_error"] = {"message": record.last_error, "at": record.last_error_at}
        if progress is not None:
            status["bytes_done"], status["bytes_total"] = progress[1], progress[2]
        capture = self.pusher.captures.get(volume)
        if capture is not None and capture.progress is not None:
            status["snapshot_progress"] = capture.progress.to_json()
        where = (policy.bucket, policy.prefix)
        status.update(self.checks.status(volume, where, self.remotes.cached(where)))
        return {"s3": status}

    # explicit actions (CLI)

    def request_push(self, volume: str, policy: S3Policy, data: VolumeContent) -> None:
        self.pusher.request(volume, policy, data)

    def _remote(self, policy: S3Policy) -> RemoteStore:
        return self.remotes.get(policy.bucket, policy.prefix, policy.encrypt)

    def remote_list(self, policy: S3Policy) -> list[RemoteSnapshot]:
        snaps: list[RemoteSnapshot] = self._remote(policy).list()
        return snaps

    def restore_in_place(self, volume: str, policy: S3Policy, snapshot_id: str,
                         content: VolumeContent) -> None:
        self.restorer.in_place(volume, policy, snapshot_id, content)

    def delete_remote(self, volume: str, policy: S3Policy) -> None:
        self._remote(policy).delete_all()
        self.queue.forget(volume)
        self.checks.forget(volume)

    def check(self, volume: str, policy: S3Policy, read_data: bool) -> CheckReport:
        """Check the volume's remote copy (``pyvol sync check``); the result shows in Status."""
        return self.checks.run(volume, (policy.bucket, policy.prefix),
                               self._remote(policy), read_data)

    # passphrases of an encrypted volume's S3 copy (`pyvol sync key ...`)

    def key_add(self, policy: S3Policy, passphrase: str) -> KeyInfo:
        return self._remote(policy).add_key(passphrase)

    def key_list(self, policy: S3Policy) -> KeyList:
        return self._remote(policy).keys()

    def key_remove(self, policy: S3Policy, key_id: str) -> None:
        self._remote(policy).remove_key(key_id)
