"""Pushes: the two jobs that move a requested push through its states (``plugin.sync.queue``).

First a local snapshot (kind ``sync``) captures a consistent view of the volume; it runs as
the volume's S3 job, so a Mount of that volume waits for it (briefly: it is incremental, and
never past the Mount's deadline) and no other call does.  Then the upload runs from that
snapshot on the upload pool, which nothing waits on.  Local data is never touched by a
failing push; a failure of either step is recorded in the queue (Status.s3.last_error) and
retried with backoff (``plugin.sync.scheduler``).  A local sync snapshot that a pending push
needs is never removed by a snapshot clean-up (:meth:`Pusher.needed_snapshots`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from backends.base import VolumeContent
from plugin.jobs import Jobs
from plugin.options import S3Policy
from plugin.snapshotting import Capture
from plugin.state import StateStore
from plugin.sync.queue import PushQueue, push_state
from plugin.sync.remotes import Remotes, Transfers
from plugin.sync.scheduler import Backoff
from plugin.testhooks import fail_point, hold_point
from snapshots.store import SnapshotStore, default_name

if TYPE_CHECKING:
    from s3sync.push import Fence

log = logging.getLogger(__name__)


class Pusher:
    def __init__(self, state: StateStore, queue: PushQueue, snapshots: SnapshotStore,
                 jobs: Jobs, uploads: Jobs, remotes: Remotes, transfers: Transfers,
                 backoff: Backoff) -> None:
        self.state = state
        self.queue = queue
        self.snapshots = snapshots
        self.jobs = jobs
        """The volume's S3 jobs (captures, restores): a Mount waits for them."""
        self.uploads = uploads
        self.remotes = remotes
        self.transfers = transfers
        self.backoff = backoff
        self.captures: dict[str, Capture] = {}
        """The running sync snapshot of each volume, for its progress."""
        self.on_progress: Callable[[str, int, int], None] = lambda volume, done, total: None
        """Told (volume, bytes done, bytes total) as an upload goes (the lease shows it)."""
        self.on_pushed: Callable[[str], None] = lambda volume: None
        """Told a volume's push is done and nothing newer is pending."""
        self.fence_for: Callable[[str], Fence | None] = lambda volume: None
        """The lease a volume's push is made under (``s3sync.push.Fence``), if any."""
        self.diverged: dict[str, list[str]] = {}
        """Per volume, the snapshots this host pushed after losing the lease (Status)."""

    def request(self, volume: str, policy: S3Policy, content: VolumeContent) -> None:
        """Queue a push durably: snapshot now-ish, upload in the background."""
        self.queue.request(volume, policy)
        self.submit_capture(volume, content)

    def retry(self, volume: str, content: VolumeContent | None) -> None:
        """Run again what the push's state says is left (after a failure, or a restart)."""
        state = push_state(self.queue.get(volume))
        if state == "captured":
            self.submit_upload(volume)
        elif state == "requested" and content is not None:
            self.submit_capture(volume, content)

    def submit_capture(self, volume: str, content: VolumeContent) -> None:
        self.jobs.submit(volume, "S3 sync snapshot", lambda: self._capture(volume, content))

    def submit_upload(self, volume: str) -> None:
        self.uploads.submit(volume, "S3 push", lambda: self._upload(volume))

    def _capture(self, volume: str, content: VolumeContent) -> None:
        """requested -> captured, then queue the upload; a failure is retried like an
        upload's."""
        state = push_state(self.queue.get(volume))
        if state == "idle":
            return
        if state == "requested":
            capture = Capture(hold="s3:capture")
            self.captures[volume] = capture
            self.jobs.progress[volume] = capture.text
            try:
                fail_point("s3:capture")
                # The store reads the volume in a view of its own (held until read, whatever
                # unmounts meanwhile), or clones its image where the backend can.
                info = self.snapshots.create(volume, content, f"sync-{default_name()}",
                                             kind="sync", progress=capture.update)
            except Exception as exc:
                self._failed(volume, f"the snapshot for the push failed: {exc}", content)
                return
            finally:
                self.captures.pop(volume, None)
            self.queue.captured(volume, info.name)
        self.submit_upload(volume)

    def _failed(self, volume: str, message: str, content: VolumeContent | None) -> None:
        """Record a failed step of a push in Status and schedule its retry with backoff."""
        record = self.queue.failed(volume, message)
        delay = self.backoff.failed(volume, content)
        log.error("volume %s: push to s3://%s/%s failed (retry in %.0f s): %s", volume,
                  record.bucket, record.prefix, delay, message)

    def _upload(self, volume: str) -> None:
        """captured -> idle (or lost); a failure is retried."""
        record = self.queue.get(volume)
        if record is None or push_state(record) != "captured" or record.snapshot is None:
            return
        snapshot = record.snapshot
        if not any(s.name == snapshot for s in self.snapshots.list_snapshots(volume)):
            # Nothing can bring it back: say so once instead of retrying for ever.
            message = (f"the local snapshot {volume}@{snapshot} this push needed is gone "
                       "(deleted outside pyvol?), so nothing was uploaded; push again with "
                       f"`pyvol sync {volume}` if the volume still exists")
            self.queue.lost(volume, message)
            self.backoff.reset(volume)
            log.error("volume %s: %s", volume, message)
            return
        self.transfers.start(volume, "syncing")
        try:
            remote = self.remotes.get(record.bucket, record.prefix, record.encrypt)
            report = self.transfers.reporter(volume, "syncing")

            def progress(done: int, total: int) -> None:
                report(done, total)
                self.on_progress(volume, done, total)
                hold_point("s3:upload")  # test hook: a push held mid-upload, its locks held

            fence = self.fence_for(volume)
            with self.snapshots.view(volume, snapshot) as view:
                pushed = remote.push(view, progress, fence)
        except Exception as exc:
            self._failed(volume, str(exc), None)
            return
        finally:
            self.transfers.end(volume)
        self.backoff.succeeded(volume)
        current = self.queue.pushed(volume, snapshot, pushed.id)
        if current is None:  # `pyvol sync delete-remote` ran meanwhile
            return
        if pushed.diverged:
            self.diverged.setdefault(volume, []).append(pushed.id)
            log.error("volume %s: pushed %s as a diverged snapshot (this host had lost the "
                      "lease; another host's data is the latest): restore it by id if it "
                      "holds what you need", volume, pushed.id)
        else:
            log.info("volume %s: pushed remote snapshot %s (%d bytes uploaded)", volume,
                     pushed.id, pushed.uploaded_bytes)
        # A push requested while this one ran has its own snapshot (or is about to take it):
        # it stays pending, and its snapshot stays.
        newer = current.snapshot != snapshot
        if not newer and self.queue.forget_if_removed(volume):
            # The volume was removed while this push was pending: its last data is now safe.
            # (A volume of the same name being created meanwhile keeps the record, and with
            # it the restore it asked for, and this snapshot, which its restore may read.)
            drop_sync_snapshots(self.snapshots, volume, pushed=snapshot, keep=set())
            self.on_pushed(volume)
            return
        drop_sync_snapshots(self.snapshots, volume, pushed=snapshot,
                            keep={snapshot, current.snapshot})
        try:
            remote.prune(record.keep)
        except Exception as exc:
            log.warning("volume %s: pruning remote snapshots failed: %s", volume, exc)
        if not newer:
            self.on_pushed(volume)

    def resume_removed(self) -> None:
        """Upload the captured pushes of removed volumes (after a restart)."""
        for record in self.state.list_sync():
            if push_state(record) == "captured" and self.state.get_volume(record.volume) is None:
                log.info("volume %s (removed): resuming its pending S3 push", record.volume)
                self.submit_upload(record.volume)

    def needed_snapshots(self, volume: str) -> set[str]:
        """Local sync snapshots that must stay: the one a pending push uploads, and, while the
        volume syncs, the last pushed one (the base its next snapshot is taken against)."""
        record = self.queue.get(volume)
        if record is None:
            return set()
        needed = {record.snapshot} if record.pending and record.snapshot else set()
        if self.state.get_volume(volume) is not None:
            needed |= {s.name for s in self.snapshots.list_snapshots(volume) if s.kind == "sync"}
        return needed

    def why_needed(self, volume: str, name: str) -> str:
        record = self.queue.get(volume)
        if record is not None and record.pending and record.snapshot == name:
            return (f"the pending push to s3://{record.bucket}/{record.prefix} uploads it "
                    f"({record.last_error or 'not uploaded yet'})")
        return "the S3 sync of the volume takes its next snapshot against it"


def drop_sync_snapshots(store: SnapshotStore, volume: str, pushed: str,
                        keep: set[str | None]) -> None:
    """Drop the volume's sync snapshots that the push of ``pushed`` made useless: those taken
    before it, except ``keep``.  A newer one belongs to a later request, possibly one whose
    capture has committed it but not yet recorded it in the queue: it stays."""
    snaps = store.list_snapshots(volume)
    upto = next((s.created for s in snaps if s.name == pushed), None)
    for snap in snaps:
        if snap.kind == "sync" and snap.name not in keep and \
                (upto is None or snap.created <= upto):
            store.remove(volume, snap.name)
