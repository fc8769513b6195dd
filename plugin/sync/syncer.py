"""The S3 sync as the driver and the management API see it: one call per moment of a
volume's life (create, mount, last unmount, remove, start-up) and per `pyvol sync` command,
each handed to the part whose job it is.  It also answers Status.s3.

The S3 jobs (``jobs``: captures and restores, one at a time per volume) are the sync's own
queue: their errors never show as, or clear, a snapshot error.
"""

from __future__ import annotations

import functools
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
from plugin.sync.leases import Leases, Lost, Unleased
from plugin.sync.leases import describe as describe_lease
from plugin.sync.push import Pusher
from plugin.sync.queue import PushQueue, push_state
from plugin.sync.remotes import Remotes, Transfers
from plugin.sync.restore import Restorer
from plugin.sync.scheduler import Backoff, Scheduler
from s3sync.hostid import load_host
from snapshots.store import SnapshotStore

if TYPE_CHECKING:
    from s3sync import CheckReport, RemoteSnapshot, RemoteStore
    from s3sync.keys import KeyInfo
    from s3sync.push import Fence
    from s3sync.store import KeyList

log = logging.getLogger(__name__)

MOUNT_WAIT = 100.0
"""A cap on a Mount's wait for the restore; the Mount's own deadline is shorter today."""


class Syncer:
    def __init__(self, root: Path, state: StateStore, snapshots: SnapshotStore, jobs: Jobs,
                 env: dict[str, str], host_name: str = "") -> None:
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
        self.leases = Leases(self.remotes, functools.cache(
            lambda: load_host(root, host_name or None)))
        self.pusher.on_progress = self._push_progress
        self.pusher.on_pushed = self._pushed
        self.pusher.fence_for = self._fence
        self._policies: dict[str, S3Policy] = {}
        """Every synced volume's policy: pushes of leased ones (``s3_lease``) are fenced,
        and the others refuse a prefix that holds a lease."""

    # a volume's life

    def record_for_create(self, volume: str, policy: S3Policy) -> SyncChange:
        """How Create makes the sync record it commits with the volume's (see
        PushQueue.for_create)."""
        return self.queue.for_create(volume, policy)

    def on_create(self, volume: str, policy: S3Policy, content: VolumeContent) -> None:
        self.restorer.at_create(volume, policy, content)

    def track(self, volume: str, policy: S3Policy, content: VolumeContent) -> None:
        """Push the volume every ``policy.every`` seconds while it is mounted."""
        self._policies[volume] = policy
        self.scheduler.track(volume, policy, content)

    def before_mount(self, volume: str, policy: S3Policy, deadline: Deadline,
                     content: VolumeContent) -> bool:
        """Wait (within ``deadline``) for a pending restore and the sync snapshot; never serve
        half a volume.  Raises RestoreInProgress or VolumeBusy saying how far it is.

        A volume used from several hosts (``s3_lease``) is then leased to this host, or the
        Mount is refused naming the host that holds it; taken from another host, the
        volume is first brought up to the newest remote snapshot (the same wait).  True if
        the lease was claimed: the driver then calls :meth:`after_mount` once the Mount is
        over, whatever its outcome."""
        settled = self.jobs.wait(volume, deadline.remaining(MOUNT_WAIT))
        record = self.queue.get(volume)
        if record is None or not record.restoring:
            if not settled:
                raise VolumeBusy(
                    f"volume {volume!r} cannot be mounted yet: its {self.jobs.describe(volume)} "
                    "is still reading the data; try again shortly")
            if not policy.lease:
                return False
            if self._lease(volume, policy):
                try:
                    taken_over = not self._line_continues(volume)
                    self._record_tenure(volume, policy)
                    self._pull(volume, policy, content, deadline, taken_over=taken_over)
                except BaseException:
                    self.after_mount(volume)
                    raise
            return True
        raise self.restorer.refusal(volume, policy, record)

    def claim_mounted(self, volume: str, policy: S3Policy) -> bool:
        """A further Mount of a volume already mounted here.  A leased one must still be this
        host's: held elsewhere, it is refused naming the holder; taken over by another host
        since this host mounted it (its copy is behind the line, e.g. mounts left stale by a
        Docker daemon crash), it is refused saying how to get the newest data.  True if the
        lease was claimed (:meth:`after_mount` owed)."""
        if not policy.lease:
            return False
        taken = self._lease(volume, policy)
        if not self._line_continues(volume):  # also when held already: a retake races here
            self.leases.give_back(volume)
            raise VolumeBusy(
                f"volume {volume!r} was taken over by another host since it was mounted "
                "here: the copy on this host is behind the volume's latest data.  Stop the "
                "containers that use it on this host (after a Docker daemon crash, when "
                f"none does: `pyvol mounts reset {volume}`), then mount it again: this "
                "host then pulls the newest data")
        if taken:
            self._record_tenure(volume, policy)
        return True

    def _lease(self, volume: str, policy: S3Policy) -> bool:
        from s3sync.errors import LeaseHeld, S3SyncError

        try:
            return self.leases.acquire(volume, policy)
        except LeaseHeld as exc:
            raise VolumeBusy(f"volume {volume!r} cannot be mounted on this host: {exc}") \
                from None
        except S3SyncError as exc:
            raise VolumeBusy(
                f"volume {volume!r} cannot be mounted: it is used from several hosts "
                f"(s3_lease) and its lease in s3://{policy.bucket}/{policy.prefix} could not "
                f"be taken: {exc}") from None

    def _line_continues(self, volume: str) -> bool:
        """Whether the lease this host just took follows this host's own last tenure, so its
        copy (unpushed writes included) is the head of the volume's line.  False once another
        host held it since (taken over after an expiry, or broken by hand): then this host's
        copy is behind the line, whatever its last push was."""
        tenure = self.leases.tenure(volume)
        record = self.queue.get(volume)
        if tenure is None or record is None or record.generation is None:
            return True  # never leased here: the copy is what its last restore or push was
        return record.generation in (tenure.previous, tenure.generation)

    def _record_tenure(self, volume: str, policy: S3Policy) -> None:
        """This host's copy goes on under the lease it holds now: its generation is the one
        :meth:`_line_continues` checks the next take against."""
        tenure = self.leases.tenure(volume)
        if tenure is not None:
            self.queue.leased(volume, policy, tenure.generation)

    def _pull(self, volume: str, policy: S3Policy, content: VolumeContent,
              deadline: Deadline, *, taken_over: bool = False) -> None:
        """After a take: restore the newest remote snapshot unless this host's copy is it.
        ``taken_over``: another host held the lease since this host did: its copy is
        brought to the newest snapshot even if its last push was that one (what it wrote
        after, never pushed, is dropped: the other host went on without it)."""
        snaps = self._remote(policy).list()
        record = self.queue.get(volume)
        if not snaps or (not taken_over and record is not None
                         and record.last_id == snaps[-1].id):
            return
        newest = snaps[-1].id
        if taken_over:
            log.warning("volume %s: another host held it since this host did; this host's "
                        "copy is replaced by the newest snapshot %s (what was written here "
                        "after this host's last push, if anything, is dropped)", volume, newest)
        log.info("volume %s: pulling %s before the mount (this host's copy was %s)", volume,
                 newest, record.last_id if record else "none")
        self.queue.restore_requested(volume, policy, newest)
        self.restorer.submit(volume, policy, content)
        # A pull that outlasts this Mount goes on; once done, the lease is freed unless a
        # Mount came back for it meanwhile (Swarm retries the task).
        self.jobs.submit(volume, "lease check",
                         lambda: self.release_if_idle(volume, in_job=True))
        self.leases.report(volume, "pulling", force=True)
        settled = self.jobs.wait(volume, deadline.remaining(MOUNT_WAIT))
        record = self.queue.get(volume)
        if settled and (record is None or not record.restoring):
            self.leases.report(volume, "mounted", force=True)
            return
        raise self.restorer.refusal(volume, policy, record) if record is not None else \
            VolumeBusy(f"volume {volume!r} cannot be mounted yet: its pull from "
                       f"s3://{policy.bucket}/{policy.prefix} is still running")

    def _fence(self, volume: str) -> Fence | None:
        """The lease a push of a leased volume is made under.  Not held here (e.g. a push
        asked for while unmounted): taken for the push if free, else the push is fenced
        off (kept aside as diverged)."""
        from s3sync.errors import S3SyncError

        policy = self._policies.get(volume)
        if policy is None:
            return None
        if not policy.lease:
            return Unleased(self.leases.lease(volume, policy, probe=False))
        fence = self.leases.fence(volume)
        if fence is not None:
            return fence
        try:
            self.leases.acquire(volume, policy)
        except S3SyncError as exc:
            return Lost(0, f"this host does not hold the lease: {exc}")
        self.leases.unclaim(volume)
        if not self._line_continues(volume):
            tenure = self.leases.tenure(volume)
            self.leases.give_back(volume)
            return Lost(tenure.generation if tenure else 0,
                        "another host held the volume's lease since this host wrote this data")
        self._record_tenure(volume, policy)
        return self.leases.fence(volume)

    def _push_progress(self, volume: str, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        self.leases.report(volume, "pushing", f"{percent}%")

    def _pushed(self, volume: str) -> None:
        """A push is done and none is pending: free the lease unless mounted again."""
        self.release_if_idle(volume)

    def after_mount(self, volume: str) -> None:
        """A Mount that held the lease is over, mounted or failed (the driver's call)."""
        self.leases.unclaim(volume)
        self.release_if_idle(volume)

    def release_if_idle(self, volume: str, *, in_job: bool = False) -> None:
        """Free the lease if nothing here needs it: not mounted, no push pending, no job
        (but the one calling, ``in_job``)."""
        if self.state.mount_count(volume) == 0 and push_state(self.queue.get(volume)) == "idle" \
                and (in_job or not self.jobs.busy(volume)):
            self.leases.release(volume)

    def after_last_unmount(self, volume: str, policy: S3Policy, data: VolumeContent) -> None:
        """Push (also with ``s3_sync=manual`` when leased: the next host must see this
        data); the lease is freed once the push is done."""
        if policy.sync != "manual" or self.leases.holds(volume):
            self.leases.report(volume, "pushing", force=True)
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
        self.leases.release(volume)
        self._policies.pop(volume, None)

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
        if policy.lease and (self.state.mount_count(volume) or push_state(record) != "idle"):
            self.jobs.submit(volume, "lease", lambda: self._retake(volume, policy))

    def _retake(self, volume: str, policy: S3Policy) -> None:
        """After a restart: hold again the lease of a volume still mounted here or with a
        push to finish (this host's id is kept, so its own live lease is taken back)."""
        from s3sync.errors import S3SyncError

        try:
            self.leases.acquire(volume, policy)
        except S3SyncError as exc:
            log.error("volume %s is mounted here or has a push to finish, but its lease could "
                      "not be taken back after the restart: %s", volume, exc)
            return
        if not self._line_continues(volume):
            log.warning("volume %s: another host held its lease since this host did: not "
                        "taken back; a pending push from here will be kept aside as "
                        "diverged, and the next Mount here pulls the newest snapshot", volume)
            self.leases.give_back(volume)
            return
        self._record_tenure(volume, policy)
        self.leases.unclaim(volume)
        self.release_if_idle(volume, in_job=True)

    def stop(self) -> None:
        self.scheduler.stop()
        self.leases.stop()

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
        if policy.lease:
            status["lease"] = self.leases.status(volume) or {"held": False}
        diverged = self.pusher.diverged.get(volume)
        if diverged:
            status["diverged"] = {
                "snapshots": list(diverged),
                "why": "pushed after this host lost the volume's lease: kept aside, never the "
                       "latest; see `pyvol sync ls` and restore one by id if needed"}
        return {"s3": status}

    # explicit actions (CLI)

    def request_push(self, volume: str, policy: S3Policy, data: VolumeContent) -> None:
        self.pusher.request(volume, policy, data)

    def _remote(self, policy: S3Policy) -> RemoteStore:
        return self.remotes.get(policy.bucket, policy.prefix, policy.encrypt)

    def remote_list(self, policy: S3Policy) -> list[RemoteSnapshot]:
        """The volume's remote snapshots, oldest first; then, for a volume used from several
        hosts, the diverged ones (kept aside, restorable by id)."""
        remote = self._remote(policy)
        snaps: list[RemoteSnapshot] = remote.list()
        if policy.lease:
            snaps += remote.diverged()
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

    # the lease of a volume used from several hosts (`pyvol lease ...`)

    def lease_show(self, volume: str, policy: S3Policy) -> dict[str, Any]:
        return describe_lease(self.leases.lease(volume, policy).show())

    def lease_break(self, volume: str, policy: S3Policy) -> dict[str, Any]:
        """Free the lease whoever holds it (by hand: the holder loses it); as it was."""
        before = self.leases.lease(volume, policy).break_()
        self.leases.forget(volume)
        return describe_lease(before)
