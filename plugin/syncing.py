"""S3 sync in action: a durable push queue, restores at create, status for inspect.

A push has two stages.  First a local snapshot (kind ``sync``) captures a consistent view of
the volume; it runs as the volume's background job, so a Mount of that volume waits for it
(briefly: it is incremental, and never past the Mount's deadline) and no other call does.
The syncer has its own job queue: its errors never show as, or clear, a snapshot error.  Then
the upload runs from that snapshot on the upload pool, which nothing waits on.  The queue lives
in the state database (``sync.pending``), so a requested push survives a plugin restart or
kill -9 and resumes.
Local data is never touched by a failing push; a failure of any step (the capture included)
shows in Status.s3.last_error and is retried with backoff.  A local sync snapshot that a
pending push needs is never removed by a snapshot clean-up (:meth:`Syncer.needed_snapshots`).

boto3 is imported only through ``backends.s3``, and only when a volume uses S3.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.base import VolumeContent
from backends.fs import make_private
from backends.snapshots import SnapshotStore, default_name
from plugin.checking import Checks
from plugin.errors import PyvolError, VolumeBusy
from plugin.jobs import Jobs
from plugin.locks import Deadline
from plugin.options import S3Policy
from plugin.snapshotting import Capture
from plugin.state import StateStore, SyncRecord
from plugin.testhooks import fail_point, hold_point

if TYPE_CHECKING:
    from backends.s3 import CheckReport, RemoteSnapshot, RemoteStore, S3Config

log = logging.getLogger(__name__)

MountedData = Callable[[], VolumeContent | None]
"""The volume's content while it is mounted, else None (periodic pushes)."""

MOUNT_WAIT = 100.0
"""A cap on a Mount's wait for the restore; the Mount's own deadline is shorter today."""
RETRY_MIN, RETRY_MAX = 5.0, 300.0


class RestoreInProgress(PyvolError):
    pass


class SyncFailed(PyvolError):
    pass


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Syncer:
    def __init__(self, root: Path, state: StateStore, snapshots: SnapshotStore, jobs: Jobs,
                 env: dict[str, str]) -> None:
        self.root = root
        self.state = state
        self.snapshots = snapshots
        self.jobs = jobs
        self.env = env
        self.uploads = Jobs(workers=2, name="s3")
        self._config: S3Config | None = None
        self._remotes: dict[tuple[str, str], RemoteStore] = {}
        self._guard = threading.Lock()
        self._progress: dict[str, tuple[str, int, int]] = {}
        self._captures: dict[str, Capture] = {}
        """The running sync snapshot of each volume, for its progress."""
        self._retry_at: dict[str, tuple[float, Callable[[], None]]] = {}
        self._failures: dict[str, int] = {}
        self._periodic: dict[str, tuple[S3Policy, MountedData]] = {}
        self._stop = threading.Event()
        self.checks = Checks(state)
        make_private(root / "s3cache")

    # plumbing

    def remote(self, bucket: str, prefix: str) -> RemoteStore:
        from backends.s3 import RemoteStore, S3Config

        with self._guard:
            if self._config is None:
                self._config = S3Config.from_env(self.env)
            key = (bucket, prefix)
            if key not in self._remotes:
                digest = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:32]
                cache = self.root / "s3cache" / digest
                cache.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._remotes[key] = RemoteStore(self._config, bucket, prefix, cache)
            return self._remotes[key]

    def _record(self, volume: str, policy: S3Policy) -> SyncRecord:
        record = self.state.get_sync(volume)
        if record is None or (record.bucket, record.prefix) != (policy.bucket, policy.prefix):
            record = SyncRecord(volume=volume, bucket=policy.bucket, prefix=policy.prefix,
                                keep=policy.keep)
            self.state.put_sync(record)
        elif record.keep != policy.keep:  # a volume created again with another s3_keep
            record = replace(record, keep=policy.keep)
            self.state.put_sync(record)
        return record

    def _update(self, volume: str, **changes: Any) -> SyncRecord:
        record = self.state.get_sync(volume)
        assert record is not None  # noqa: S101 -- created by _record first
        record = replace(record, **changes)
        self.state.put_sync(record)
        return record

    # driver hooks

    def record_for_create(self, volume: str, policy: S3Policy) -> SyncRecord:
        """The sync record a new volume starts with, marked ``restoring`` if it asked for a
        restore; Create commits it in the same transaction as the volume record."""
        record = self.state.get_sync(volume)
        if record is None or (record.bucket, record.prefix) != (policy.bucket, policy.prefix):
            record = SyncRecord(volume=volume, bucket=policy.bucket, prefix=policy.prefix,
                                keep=policy.keep)
        record = replace(record, keep=policy.keep)
        if policy.restore != "never":
            record = replace(record, restoring=policy.restore, last_error=None,
                             last_error_at=None)
        return record

    def on_create(self, volume: str, policy: S3Policy, content: VolumeContent) -> None:
        """Queue the restore a new volume asked for (``s3_restore``, default ``latest``);
        its record, marked ``restoring``, was committed by Create."""
        self._record(volume, policy)
        record = self.state.get_sync(volume)
        if record is not None and record.restoring:
            self._queue_restore(volume, policy, content)

    def progress_text(self, volume: str) -> str | None:
        progress = self._progress.get(volume)
        if progress is None:
            return None
        _, done, total = progress
        return f"{100 * done // total if total else 0}% done"

    def _queue_restore(self, volume: str, policy: S3Policy, content: VolumeContent) -> None:
        def run() -> None:
            self.jobs.progress[volume] = lambda: self.progress_text(volume)
            record = self.state.get_sync(volume)
            if record is not None and record.restoring:
                self._restore(volume, policy, record.restoring, content, at_create=True)

        self.jobs.submit(volume, "S3 restore", run)

    def _restore(self, volume: str, policy: S3Policy, wanted: str, content: VolumeContent,
                 *, at_create: bool) -> None:
        """Replace the volume's content with remote snapshot ``wanted`` (an id or ``latest``).

        ``at_create``: the restore a new volume asked for (or its completion by `pyvol sync
        restore`).  Then ``latest`` of an empty prefix restores nothing, a push still pending
        from a removed volume of the same name wins over the remote copy (it is newer), and a
        failure is recorded for Status.  Success clears ``restoring``, so Mount is allowed.
        """
        record = self._record(volume, policy)
        try:
            pending = record.snapshot if record.pending else None
            if at_create and wanted == "latest" and pending and any(
                    s.name == pending for s in self.snapshots.list_snapshots(volume)):
                content.replace(self.snapshots.populate_from(volume, pending))
                log.info("volume %s: restored from %s, the not yet uploaded last push of the "
                         "removed volume of the same name", volume, pending)
                self._update(volume, restoring=None, last_error=None, last_error_at=None)
                return
            remote = self.remote(policy.bucket, policy.prefix)
            snaps = remote.list()
            if wanted == "latest":
                target = snaps[-1] if snaps else None
            else:
                target = next((s for s in snaps if s.id == wanted), None)
            if target is None and not (at_create and wanted == "latest"):
                raise SyncFailed(f"remote snapshot {wanted!r} not found in "
                                 f"s3://{policy.bucket}/{policy.prefix}: see "
                                 f"`pyvol sync ls {volume}`")
            if target is not None:
                chosen = target
                self._progress[volume] = ("restoring", 0, chosen.size)

                def build(dst: Path) -> None:
                    hold_point("s3:restore")
                    remote.restore(chosen.id, dst, self._progress_fn(volume, "restoring"))
                content.replace(build)
                log.info("volume %s: restored remote snapshot %s from s3://%s/%s", volume,
                         chosen.id, policy.bucket, policy.prefix)
            changes: dict[str, Any] = {"restoring": None}
            if at_create:
                changes.update(last_error=None, last_error_at=None,
                               last_id=target.id if target else record.last_id)
            self._update(volume, **changes)
        except Exception as exc:
            if at_create:
                self._update(volume, last_error=f"restore failed: {exc}", last_error_at=_now())
            raise
        finally:
            self._progress.pop(volume, None)

    def before_mount(self, volume: str, policy: S3Policy, deadline: Deadline) -> None:
        """Wait (within ``deadline``) for a pending restore and the sync snapshot; never serve
        half a volume.  Raises RestoreInProgress or VolumeBusy saying how far it is."""
        settled = self.jobs.wait(volume, deadline.remaining(MOUNT_WAIT))
        record = self.state.get_sync(volume)
        if record is None or not record.restoring:
            if not settled:
                raise VolumeBusy(
                    f"volume {volume!r} cannot be mounted yet: its {self.jobs.describe(volume)} "
                    "is still reading the data; try again shortly")
            return
        progress = self._progress.get(volume)
        if progress is not None:
            _, done, total = progress
            percent = 100 * done // total if total else 0
            raise RestoreInProgress(
                f"volume {volume!r}: restore from s3://{policy.bucket}/{policy.prefix} in "
                f"progress, {percent}% done; try again shortly (`docker volume inspect {volume}` "
                "shows progress)")
        raise RestoreInProgress(
            f"volume {volume!r}: its restore from s3://{policy.bucket}/{policy.prefix} has not "
            f"completed ({record.last_error or 'waiting to run'}); fix the S3 settings and run "
            f"`pyvol sync restore {volume} {record.restoring}`, or recreate the volume with "
            "-o s3_restore=never")

    def after_last_unmount(self, volume: str, policy: S3Policy, data: VolumeContent) -> None:
        if policy.sync != "manual":
            self.request_push(volume, policy, data)

    def request_push(self, volume: str, policy: S3Policy, data: VolumeContent) -> None:
        """Queue a push durably: snapshot now-ish, upload in the background."""
        self._record(volume, policy)
        self._update(volume, pending=True, snapshot=None)
        self._submit_capture(volume, data)

    def _submit_capture(self, volume: str, data: VolumeContent) -> None:
        self.jobs.submit(volume, "S3 sync snapshot", lambda: self._capture(volume, data))

    def _capture(self, volume: str, data: VolumeContent) -> None:
        """Take the pending push's snapshot; a failure is recorded and retried like an upload's."""
        record = self.state.get_sync(volume)
        if record is None or not record.pending:
            return
        if record.snapshot is None:
            capture = Capture(hold="s3:capture")
            self._captures[volume] = capture
            self.jobs.progress[volume] = capture.text
            try:
                fail_point("s3:capture")
                with data.view() as path:  # held until read, whatever unmounts meanwhile
                    info = self.snapshots.create(volume, path, f"sync-{default_name()}",
                                                 kind="sync", progress=capture.update)
            except Exception as exc:
                self._failed(volume, record, f"the snapshot for the push failed: {exc}",
                             lambda: self._submit_capture(volume, data))
                return
            finally:
                self._captures.pop(volume, None)
            record = self._update(volume, snapshot=info.name)
        self.uploads.submit(volume, "S3 push", lambda: self._upload(volume))

    def _failed(self, volume: str, record: SyncRecord, message: str,
                retry: Callable[[], None]) -> None:
        """Record a failed step of a push in Status and schedule ``retry`` with backoff."""
        failures = self._failures.get(volume, 0) + 1
        self._failures[volume] = failures
        delay = min(RETRY_MAX, RETRY_MIN * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)  # noqa: S311
        self._retry_at[volume] = (time.monotonic() + delay, retry)
        self._update(volume, last_error=message, last_error_at=_now())
        log.error("volume %s: push to s3://%s/%s failed (retry in %.0f s): %s", volume,
                  record.bucket, record.prefix, delay, message)

    def _upload(self, volume: str) -> None:
        record = self.state.get_sync(volume)
        if record is None or not record.pending or record.snapshot is None:
            return
        if not any(s.name == record.snapshot for s in self.snapshots.list_snapshots(volume)):
            # Nothing can bring it back: say so once instead of retrying for ever.
            message = (f"the local snapshot {volume}@{record.snapshot} this push needed is gone "
                       "(deleted outside pyvol?), so nothing was uploaded; push again with "
                       f"`pyvol sync {volume}` if the volume still exists")
            self._update(volume, pending=False, last_error=message, last_error_at=_now())
            self._failures.pop(volume, None)
            log.error("volume %s: %s", volume, message)
            return
        self._progress[volume] = ("syncing", 0, 0)
        try:
            remote = self.remote(record.bucket, record.prefix)
            pushed: RemoteSnapshot = remote.push(self.snapshots.view(volume, record.snapshot),
                                                 self._progress_fn(volume, "syncing"))
        except Exception as exc:
            self._failed(volume, record, str(exc), lambda: self._submit_upload(volume))
            return
        finally:
            self._progress.pop(volume, None)
        self._failures.pop(volume, None)
        self._retry_at.pop(volume, None)
        current = self.state.get_sync(volume)
        if current is None:  # `pyvol sync delete-remote` ran meanwhile
            return
        # A push requested while this one ran has its own snapshot (or is about to take it):
        # it stays pending, and its snapshot stays.
        newer = current.snapshot != record.snapshot
        self._update(volume, pending=current.pending and newer, last_ok_at=_now(),
                     last_id=pushed.id, last_error=None, last_error_at=None)
        log.info("volume %s: pushed remote snapshot %s (%d bytes uploaded)", volume, pushed.id,
                 pushed.uploaded_bytes)
        if self.state.get_volume(volume) is None and not newer:
            # The volume was removed while this push was pending: its last data is now safe.
            self._drop_old_sync_snapshots(volume, keep=set())
            self.state.delete_sync(volume)
            return
        self._drop_old_sync_snapshots(volume, keep={record.snapshot, current.snapshot})
        try:
            remote.prune(record.keep)
        except Exception as exc:
            log.warning("volume %s: pruning remote snapshots failed: %s", volume, exc)

    def _submit_upload(self, volume: str) -> None:
        self.uploads.submit(volume, "S3 push", self._upload_job(volume))

    def _upload_job(self, volume: str) -> Callable[[], None]:
        return lambda: self._upload(volume)

    def _drop_old_sync_snapshots(self, volume: str, keep: set[str | None]) -> None:
        for snap in self.snapshots.list_snapshots(volume):
            if snap.kind == "sync" and snap.name not in keep:
                self.snapshots.remove(volume, snap.name)

    def _progress_fn(self, volume: str, what: str) -> Any:
        def progress(done: int, total: int) -> None:
            self._progress[volume] = (what, done, total)
        return progress

    def before_remove(self, volume: str, data: VolumeContent, deadline: Deadline) -> None:
        """The local data goes; the remote copy stays.  A pending push still completes: its
        snapshot is taken now if it was not yet (within ``deadline``, else VolumeBusy)."""
        record = self.state.get_sync(volume)
        if record is not None and record.restoring and self.jobs.busy(volume):
            # Its content swap would bring the directory back after the removal.
            raise VolumeBusy(
                f"volume {volume!r} cannot be removed now: its restore from "
                f"s3://{record.bucket}/{record.prefix} is in progress, "
                f"{self.progress_text(volume) or 'about to start'}; try again when it is done "
                f"(`docker volume inspect {volume}` shows progress)")
        if record is not None and record.pending and record.snapshot is None and \
                not self.jobs.busy(volume) and data.exists():
            self._submit_capture(volume, data)  # its earlier attempt failed: once more, now
        if not self.jobs.wait(volume, deadline.remaining()):
            raise VolumeBusy(
                f"volume {volume!r} cannot be removed yet: its {self.jobs.describe(volume)} "
                "is still running; try again shortly")
        record = self.state.get_sync(volume)
        if record is not None and record.pending and record.snapshot is None and data.exists():
            raise VolumeBusy(
                f"volume {volume!r} cannot be removed yet: the snapshot its pending S3 push "
                f"needs could not be taken ({record.last_error}); fix that and try again")

    def why_needed(self, volume: str, name: str) -> str:
        record = self.state.get_sync(volume)
        if record is not None and record.pending and record.snapshot == name:
            return (f"the pending push to s3://{record.bucket}/{record.prefix} uploads it "
                    f"({record.last_error or 'not uploaded yet'})")
        return "the S3 sync of the volume takes its next snapshot against it"

    def needed_snapshots(self, volume: str) -> set[str]:
        """Local sync snapshots that must stay: the one a pending push uploads, and, while the
        volume syncs, the last pushed one (the base its next snapshot is taken against)."""
        record = self.state.get_sync(volume)
        if record is None:
            return set()
        needed = {record.snapshot} if record.pending and record.snapshot else set()
        if self.state.get_volume(volume) is not None:
            needed |= {s.name for s in self.snapshots.list_snapshots(volume) if s.kind == "sync"}
        return needed

    def status(self, volume: str, policy: S3Policy) -> dict[str, Any]:
        record = self.state.get_sync(volume)
        progress = self._progress.get(volume)
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
        }
        if record is not None:
            status["last_push"] = (
                {"at": record.last_ok_at, "remote_snapshot": record.last_id}
                if record.last_ok_at else None)
            if record.last_error:
                status["last_error"] = {"message": record.last_error, "at": record.last_error_at}
        if progress is not None:
            status["bytes_done"], status["bytes_total"] = progress[1], progress[2]
        capture = self._captures.get(volume)
        if capture is not None and capture.progress is not None:
            status["snapshot_progress"] = capture.progress.to_json()
        where = (policy.bucket, policy.prefix)
        status.update(self.checks.status(volume, where, self._remotes.get(where)))
        return {"s3": status}

    # explicit actions (CLI)

    def remote_list(self, policy: S3Policy) -> list[RemoteSnapshot]:
        snaps: list[RemoteSnapshot] = self.remote(policy.bucket, policy.prefix).list()
        return snaps

    def restore_in_place(self, volume: str, policy: S3Policy, snapshot_id: str,
                         content: VolumeContent) -> None:
        """Also completes a restore at create that failed (Mount refuses the volume until then)."""
        unfinished = bool(self._record(volume, policy).restoring)
        self._restore(volume, policy, snapshot_id, content, at_create=unfinished)

    def delete_remote(self, volume: str, policy: S3Policy) -> None:
        self.remote(policy.bucket, policy.prefix).delete_all()
        self.state.delete_sync(volume)
        self.checks.forget(volume)

    # the schedule and the durable queue

    def track(self, volume: str, policy: S3Policy, mounted_data: MountedData) -> None:
        """Push ``volume`` every ``policy.every`` seconds while it is mounted."""
        if policy.every:
            with self._guard:
                self._periodic[volume] = (policy, mounted_data)

    def untrack(self, volume: str) -> None:
        with self._guard:
            self._periodic.pop(volume, None)

    def start(self) -> None:
        """Resume pushes of removed volumes; run periodic pushes and retries."""
        for record in self.state.list_sync():
            if record.pending and record.snapshot and self.state.get_volume(record.volume) is None:
                log.info("volume %s (removed): resuming its pending S3 push", record.volume)
                self.uploads.submit(record.volume, "S3 push", self._upload_job(record.volume))
        threading.Thread(target=self._loop, name="s3-schedule", daemon=True).start()

    def resume(self, volume: str, policy: S3Policy, data: VolumeContent) -> None:
        """Queue again what a restart interrupted: the restore at create, a pending push."""
        record = self.state.get_sync(volume)
        if record is not None and record.restoring:
            log.info("volume %s: resuming its restore from s3://%s/%s", volume, record.bucket,
                     record.prefix)
            self._queue_restore(volume, policy, data)
        if record is not None and record.pending:
            log.info("volume %s: resuming a pending S3 push", volume)
            if record.snapshot is None:
                self._submit_capture(volume, data)
            else:
                self.uploads.submit(volume, "S3 push", lambda: self._upload(volume))

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        last_push: dict[str, float] = {}
        while not self._stop.wait(1.0):
            now = time.monotonic()
            for volume, (at, retry) in list(self._retry_at.items()):
                if now >= at and not self.uploads.busy(volume) and not self.jobs.busy(volume):
                    del self._retry_at[volume]
                    try:
                        retry()
                    except Exception:
                        log.exception("volume %s: the retry of its push could not be queued",
                                      volume)
            with self._guard:
                periodic = dict(self._periodic)
            for volume, (policy, mounted_data) in periodic.items():
                if policy.every is None:
                    continue
                try:
                    data = mounted_data()
                    if data is None:
                        continue
                    if now - last_push.setdefault(volume, now) >= policy.every and \
                            not self.jobs.busy(volume) and not self.uploads.busy(volume):
                        last_push[volume] = now
                        self.request_push(volume, policy, data)
                except Exception:
                    log.exception("volume %s: the periodic S3 push could not be queued", volume)

    def check(self, volume: str, policy: S3Policy, read_data: bool) -> CheckReport:
        """Check the volume's remote copy (``pyvol sync check``); the result shows in Status."""
        return self.checks.run(volume, (policy.bucket, policy.prefix),
                               self.remote(policy.bucket, policy.prefix), read_data)
