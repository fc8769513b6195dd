"""Restores from S3: the one a new volume asks for (``s3_restore``), run as its S3 job and
resumed after a restart, and the one ``pyvol sync restore`` runs in place.

Until the restore a volume asked for is done, its record is marked ``restoring``
(``plugin.sync.queue``) and Mount refuses the volume (:meth:`Restorer.refusal`): it never
serves half a volume.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from backends.base import VolumeContent
from backends.tree import DirectoryView
from plugin.errors import PyvolError
from plugin.jobs import Jobs
from plugin.options import S3Policy
from plugin.state import SyncRecord
from plugin.sync.queue import PushQueue
from plugin.sync.remotes import Remotes, Transfers
from plugin.testhooks import hold_point
from snapshots.store import SnapshotStore

if TYPE_CHECKING:
    from s3sync import RemoteStore

log = logging.getLogger(__name__)


class RestoreInProgress(PyvolError):
    pass


class SyncFailed(PyvolError):
    pass


class Restorer:
    def __init__(self, queue: PushQueue, snapshots: SnapshotStore, jobs: Jobs,
                 remotes: Remotes, transfers: Transfers) -> None:
        self.queue = queue
        self.snapshots = snapshots
        self.jobs = jobs
        self.remotes = remotes
        self.transfers = transfers

    def at_create(self, volume: str, policy: S3Policy, content: VolumeContent) -> None:
        """Queue the restore a new volume asked for; its record, marked ``restoring``, was
        committed by Create."""
        record = self.queue.attach(volume, policy)
        if record.restoring:
            self.submit(volume, policy, content)

    def submit(self, volume: str, policy: S3Policy, content: VolumeContent) -> None:
        """Queue the ``restoring`` marker's restore as the volume's S3 job (also at start-up)."""
        def run() -> None:
            self.jobs.progress[volume] = lambda: self.progress_text(volume)
            record = self.queue.get(volume)
            if record is not None and record.restoring:
                self.restore(volume, policy, record.restoring, content, at_create=True)

        self.jobs.submit(volume, "S3 restore", run)

    def in_place(self, volume: str, policy: S3Policy, snapshot_id: str,
                 content: VolumeContent) -> None:
        """Also completes a restore at create that failed (Mount refuses the volume until then)."""
        unfinished = bool(self.queue.attach(volume, policy).restoring)
        self.restore(volume, policy, snapshot_id, content, at_create=unfinished)

    def progress_text(self, volume: str) -> str | None:
        percent = self.transfers.percent(volume)
        return None if percent is None else f"{percent}% done"

    def restore(self, volume: str, policy: S3Policy, wanted: str, content: VolumeContent,
                *, at_create: bool) -> None:
        """Replace the volume's content with remote snapshot ``wanted`` (an id or ``latest``).

        ``at_create``: the restore a new volume asked for (or its completion by `pyvol sync
        restore`).  Then ``latest`` of an empty prefix restores nothing, a push still pending
        from a removed volume of the same name wins over the remote copy (it is newer), and a
        failure is recorded for Status.  Success clears ``restoring``, so Mount is allowed.
        """
        record = self.queue.attach(volume, policy)
        try:
            pending = record.snapshot if record.pending else None
            if at_create and wanted == "latest" and pending and any(
                    s.name == pending for s in self.snapshots.list_snapshots(volume)):
                content.replace(self.snapshots.populate_from(volume, pending))
                log.info("volume %s: restored from %s, the not yet uploaded last push of the "
                         "removed volume of the same name", volume, pending)
                self.queue.restored(volume, at_create=True, remote_id=None)
                return
            # A copy's restore at create reads the original's prefix (``s3_copy_of``).
            source = policy.copy_of if at_create and policy.copy_of else policy.prefix
            remote = self.remotes.get(policy.bucket, source, policy.encrypt)
            snaps = remote.list()
            if wanted == "latest":
                target = snaps[-1] if snaps else None
            else:  # a diverged snapshot too (kept aside by fencing): restorable by id
                target = next((s for s in snaps if s.id == wanted), None) or next(
                    (s for s in remote.diverged() if s.id == wanted), None)
            if target is None and (not (at_create and wanted == "latest") or
                                   source != policy.prefix):
                raise SyncFailed(f"remote snapshot {wanted!r} not found in "
                                 f"s3://{policy.bucket}/{source}: see "
                                 f"`pyvol sync ls {volume}`" if source == policy.prefix else
                                 f"s3://{policy.bucket}/{source} holds no snapshot "
                                 f"{wanted!r} to copy: check s3_copy_of")
            if target is None and at_create and policy.encrypt and source == policy.prefix:
                self._prepare(volume, policy, remote)
            if target is not None:
                chosen = target
                self.transfers.start(volume, "restoring", chosen.size)

                reused = 0
                with contextlib.ExitStack() as stack:
                    current = None
                    # What this host still has need not be downloaded.  Only from a plain
                    # directory: a backend whose data is mounted (``image``) cannot replace
                    # it while a view of it is open, so such a volume downloads it all.
                    if content.exists() and content.backend.capabilities.plain_directory:
                        with contextlib.suppress(Exception):
                            current = DirectoryView(stack.enter_context(content.view()))

                    def build(dst: Path) -> None:
                        nonlocal reused
                        hold_point("s3:restore")
                        local = remote.restore(chosen.id, dst,
                                               self.transfers.reporter(volume, "restoring"),
                                               current)
                        reused = local.read_bytes if local is not None else 0
                    content.replace(build)
                log.info("volume %s: restored remote snapshot %s from s3://%s/%s (%d bytes "
                         "of it read from this host's copy, not downloaded)", volume,
                         chosen.id, policy.bucket, source, reused)
            self.queue.restored(volume, at_create=at_create,  # a copy's source is not its own
                                remote_id=target.id if target and source == policy.prefix
                                else None)
        except Exception as exc:
            if at_create:
                self.queue.restore_failed(volume, f"restore failed: {exc}")
            raise
        finally:
            self.transfers.end(volume)

    @staticmethod
    def _prepare(volume: str, policy: S3Policy, remote: RemoteStore) -> None:
        """A new encrypted volume on an empty prefix makes the prefix's key now (its first
        push then spends no Argon2id on it).  Best effort: a failure here (a bucket that
        cannot be written yet, say) only leaves it to the first push, which reports it."""
        try:
            remote.prepare()
        except Exception as exc:  # the first push makes it, and reports why it cannot
            log.warning("volume %s: could not make the encryption key of s3://%s/%s yet (%s); "
                        "its first push makes it", volume, policy.bucket, policy.prefix, exc)

    def refusal(self, volume: str, policy: S3Policy, record: SyncRecord) -> RestoreInProgress:
        """Why a volume still ``restoring`` cannot be mounted: how far its restore is, or
        why it did not complete and what to do."""
        percent = self.transfers.percent(volume)
        if percent is not None:
            return RestoreInProgress(
                f"volume {volume!r}: restore from s3://{policy.bucket}/{policy.prefix} in "
                f"progress, {percent}% done; try again shortly (`docker volume inspect {volume}` "
                "shows progress)")
        return RestoreInProgress(
            f"volume {volume!r}: its restore from s3://{policy.bucket}/{policy.prefix} has not "
            f"completed ({record.last_error or 'waiting to run'}); fix the S3 settings and run "
            f"`pyvol sync restore {volume} {record.restoring}`, or recreate the volume with "
            "-o s3_restore=never")
