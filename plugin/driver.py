"""The volume driver: one method per VolumeDriver verb, no HTTP in sight.

Concurrency: each volume has its own lock, so an operation on one volume never delays another,
and nothing slow runs under it: a long management operation (a restore, a manual snapshot)
marks the volume busy for a moment under the lock and runs outside it, and the Docker verbs
that conflict with it fail at once saying what runs and how far it is.  Every Docker verb
answers within one deadline (``plugin.locks.CALL_BUDGET``) shared by all its waits.  Mount
references are counted per (volume, Docker mount ID) in the state store; the
backend (and, for a managed plugin, the bind mount under the propagated mount) is touched only
on the first mount and the last unmount.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends import REGISTRY, Backend
from backends.base import Populate, VolumeContent
from backends.errors import BackendError
from backends.fs import bind_mount, confined, is_mountpoint, make_private, unmount
from backends.snapshots import SnapshotInfo, SnapshotStore, default_name
from backends.tree import copy_tree
from plugin.errors import (
    CreateFailed,
    InvalidOption,
    SnapshotFailed,
    SnapshotNeeded,
    VolumeBusy,
    VolumeExists,
    VolumeInUse,
    VolumeNotFound,
)
from plugin.jobs import Jobs
from plugin.locks import Deadline, VolumeLocks
from plugin.names import validate_volume_name
from plugin.options import S3Policy, VolumeOptions, parse_options, with_default_size
from plugin.settings import Settings
from plugin.snapshotting import Capture, Snapshotter, validate_snapshot_name
from plugin.state import StateStore, SyncRecord, VolumeRecord
from plugin.syncing import Syncer
from plugin.testhooks import crash_point, hold_point

if TYPE_CHECKING:
    from backends.s3 import CheckReport, RemoteSnapshot

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
MANAGEMENT_WAIT = 600.0
"""How long a management call (restore) waits for the volume's background jobs."""


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    mountpoint: Path
    created_at: datetime
    status: Mapping[str, Any] | None = None


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


class Driver:
    def __init__(
        self,
        settings: Settings,
        state: StateStore | None = None,
        backends: Mapping[str, Backend] | None = None,
    ) -> None:
        self.settings = settings
        # Each store makes its own directories private the same way (volumes, snapshots, the
        # S3 cache).  Containers reach a volume through its bind mount, so the parents' mode
        # does not limit them; it keeps other host users out.
        make_private(settings.root)
        self.state = state or StateStore(settings.root / "state.db")
        self.backends: Mapping[str, Backend] = backends or {
            name: factory(settings.root) for name, factory in REGISTRY.items()
        }
        self._locks = VolumeLocks()
        self._operations: dict[str, list[Operation]] = {}
        self._operations_guard = threading.Lock()
        self.clones = Jobs(name="copy-jobs")
        """Copies of ``from=`` volumes and snapshots into new volumes."""
        self.jobs = Jobs(name="snapshot-jobs")
        """The snapshot feature's jobs; S3 has its own (``self.sync.jobs``)."""
        self.removals = Jobs(workers=1, name="removal-jobs")
        """Deletes removed volumes' data (and discarded snapshots) after Remove answered."""
        store = SnapshotStore(settings.root)
        self.snapshots = Snapshotter(store, self.jobs)
        self.sync = Syncer(settings.root, self.state, store, Jobs(name="s3-jobs"),
                           dict(settings.s3_env))

    # helpers

    @contextmanager
    def _locked(self, name: str, deadline: Deadline | None = None) -> Iterator[None]:
        """Hold the volume's lock (the name is validated first: no lock for junk names)."""
        validate_volume_name(name)
        with self._locks.hold(name, deadline or Deadline(), lambda: self._busy_text(name)):
            yield

    def _busy_text(self, name: str) -> str:
        with self._operations_guard:
            ops = list(self._operations.get(name, []))
        running = [op.describe() for op in ops]
        for jobs in (self.jobs, self.sync.jobs):
            if (job := jobs.describe(name)) is not None:
                running.append(f"{job} is running")
        return (f"volume {name!r} is busy ({'; '.join(running) or 'another call holds it'}); "
                "try again shortly")

    def _refuse_if_busy(self, name: str, verb: str, *, exclusive_only: bool = False) -> None:
        """Raise VolumeBusy if a management operation runs on the volume (under its lock)."""
        with self._operations_guard:
            ops = list(self._operations.get(name, []))
        for op in ops:
            if op.exclusive or not exclusive_only:
                raise VolumeBusy(f"volume {name!r} cannot be {verb} now: {op.describe()}; try "
                                 "again when it is done")

    @contextmanager
    def _operation(self, name: str, op: Operation) -> Iterator[None]:
        """Run a long operation outside the lock; the caller registered it under the lock."""
        try:
            yield
        finally:
            with self._operations_guard:
                ops = self._operations.get(name, [])
                if op in ops:
                    ops.remove(op)
                if not ops:
                    self._operations.pop(name, None)

    def _begin(self, name: str, op: Operation) -> None:
        """Register ``op`` (call under the volume's lock, after _refuse_if_busy)."""
        with self._operations_guard:
            self._operations.setdefault(name, []).append(op)

    def options_of(self, record: VolumeRecord) -> VolumeOptions:
        """Parse a stored record's raw options again, exactly as Create parsed them."""
        return parse_options(record.options, default_backend=record.backend,
                             backends=self.backends, volume=record.name)

    def _content(self, record: VolumeRecord) -> VolumeContent:
        """What features read (in a view) and replace (staged) of the volume."""
        return VolumeContent(self.backends[record.backend], record.name)

    def _record(self, name: str) -> VolumeRecord:
        record = self.state.get_volume(validate_volume_name(name))
        if record is None:
            raise VolumeNotFound(name)
        return record

    def _mountpoint(self, record: VolumeRecord) -> Path:
        """Where containers see the volume: under the propagated mount, or the data itself.

        Names were validated at create, so under the mount root the path is built lexically
        (Get and List stay free of filesystem calls).
        """
        if self.settings.mount_root is None:
            try:
                return self.backends[record.backend].path(record.name)
            except BackendError:
                log.exception("volume %s: its data path is unsafe", record.name)
                return Path("/nonexistent/unsafe") / record.name
        return self.settings.mount_root / record.name

    # the VolumeDriver verbs

    def create(self, name: str, raw_options: Mapping[str, object] | None) -> None:
        """Create a volume.  Idempotent for the same options; other options raise VolumeExists.

        One atomic step: the record (options, and for S3 the restore marker) is committed,
        flagged ``creating``, before the data directory is renamed into place; after a kill
        at any point, :meth:`recover` finishes or rolls back, so a retry with the same options
        succeeds and an S3 volume is never served before its restore finished.

        A ``from=`` copy runs as a background job; Create waits for it within its deadline,
        else fails with VolumeBusy (the copy goes on; the same Create retried succeeds once
        it is done).  Until then the volume is invisible to Get and List.
        """
        validate_volume_name(name)
        raw_options = with_default_size(
            self._inherit_size(raw_options), default_backend=self.settings.default_backend,
            backends=self.backends, default_size=self.settings.default_size)
        options = parse_options(raw_options, default_backend=self.settings.default_backend,
                                backends=self.backends, volume=name,
                                default_bucket=self.settings.s3_bucket)
        stored = {k: str(v) for k, v in (raw_options or {}).items()}
        if options.s3 is not None:
            # Persist the bucket resolved now: a later S3_BUCKET change must not move it.
            stored = {k: v for k, v in stored.items() if k.strip().lower() != "s3_bucket"}
            stored["s3_bucket"] = options.s3.bucket
        deadline = Deadline()
        with self._locked(name, deadline):
            existing = self.state.get_volume(name)
            if existing is not None:
                if self.options_of(existing) == options:
                    return
                raise VolumeExists(
                    f"volume {name!r} already exists with options "
                    f"{self.options_of(existing).describe()}, not {options.describe()}: use the "
                    "same options, or pick another name"
                )
            if self.clones.busy(name):  # an earlier Create's copy still runs
                self._await_copy(name, options, deadline)
                return
            populate = self._populate(name, options)
            restore = None
            if options.s3 is not None:
                self._refuse_overlap(name, options.s3)
                restore = options.s3 if options.source is None else \
                    replace(options.s3, restore="never")
            before = self.state.get_sync(name)
            self.state.add_volume(
                VolumeRecord(name=name, backend=options.backend, options=stored), creating=True,
                sync=None if restore is None else self.sync.record_for_create(name, restore))
            crash_point("create:after-record")

            def build() -> None:
                self._build(name, options, populate, restore, before)
            if populate is None:
                build()
            else:
                self.clones.submit(name, f"copy of {options.source}", build)
                self._await_copy(name, options, deadline)

    def _build(self, name: str, options: VolumeOptions, populate: Populate | None,
               restore: S3Policy | None, before: SyncRecord | None) -> None:
        """Put the data in place and complete the create, or roll it back."""
        backend = self.backends[options.backend]
        try:
            if populate is not None:
                hold_point("create:copy")
            backend.create(name, options.dir_spec(), populate)
            crash_point("create:after-data")
            self.state.finish_create(name)
        except BaseException:
            if self.state.get_volume(name) is None:
                backend.remove(name)
                self._purge_later()
                self.state.abort_create(name, before)
            raise
        crash_point("create:after-commit")
        content = VolumeContent(backend, name)
        if options.s3 is not None and restore is not None:
            self.sync.on_create(name, restore, content)
            self.sync.track(name, options.s3, self._mounted_content_fn(content))
        self.snapshots.track(name, options.snapshot, content)
        log.info("created volume %s with %s", name, options.describe())

    def _await_copy(self, name: str, options: VolumeOptions, deadline: Deadline) -> None:
        creating = next((r for r in self.state.creating_volumes() if r.name == name), None)
        if creating is not None and self.options_of(creating) != options:
            raise VolumeExists(
                f"volume {name!r} is being created with options "
                f"{self.options_of(creating).describe()}, not {options.describe()}: use the "
                "same options, or pick another name")
        if not self.clones.wait(name, deadline.remaining()):
            raise VolumeBusy(
                f"volume {name!r} is being created: its {self.clones.describe(name)} goes on "
                "in the background; run the same create again shortly (it succeeds once the "
                "copy is done)")
        if self.state.get_volume(name) is None:
            raise CreateFailed(f"volume {name!r} could not be created: "
                               f"{self.clones.errors.pop(name, 'its copy failed')}")

    def _inherit_size(self, raw: Mapping[str, object] | None) -> Mapping[str, object] | None:
        """A clone keeps its source's size limit unless ``size`` or ``backend`` says otherwise.

        The size is added to the raw options, so it is stored and parsed again like any."""
        keys = {str(k).strip().lower(): v for k, v in (raw or {}).items()}
        source = keys.get("from")
        if not isinstance(source, str) or "size" in keys or "backend" in keys:
            return raw
        record = self.state.get_volume(source.strip().partition("@")[0])
        if record is None:
            return raw
        size = self.backends[record.backend].size(record.name)
        if size is None:
            return raw
        text = f"{size // 2**20}M" if size % 2**20 == 0 else f"{size // 1024}K"
        return {**(raw or {}), "size": text}

    def _refuse_overlap(self, name: str, s3: S3Policy) -> None:
        """Refuse a remote location that equals, contains or lies inside another volume's.

        The endpoint is plugin-wide (``S3_ENDPOINT_URL``), so (bucket, prefix) decides;
        prefixes nest at ``/`` boundaries only: ``team`` holds ``team/db``, not ``teamdb``.
        """
        taken: list[tuple[str, str, str, str]] = []  # (volume, as named, bucket, prefix)
        for other in [*self.state.list_volumes(), *self.state.creating_volumes()]:
            theirs = self.options_of(other).s3
            if theirs is not None:
                taken.append((other.name, f"volume {other.name!r}", theirs.bucket,
                              theirs.prefix))
        for sync in self.state.list_sync():  # removed volumes whose last push is pending
            if sync.pending and self.state.get_volume(sync.volume) is None:
                taken.append((sync.volume, f"removed volume {sync.volume!r} (its last push is "
                              "pending)", sync.bucket, sync.prefix))
        a = s3.prefix
        for volume, owner, bucket, b in taken:
            if volume == name:
                continue  # the same name again: it takes over its own remote copy
            if bucket == s3.bucket and (a == b or a.startswith(b + "/") or b.startswith(a + "/")):
                how = "is the same as" if a == b else "lies inside" if len(a) > len(b) else \
                    "contains"
                raise InvalidOption(
                    f"volume {name!r}: its remote copy s3://{s3.bucket}/{a} {how}"
                    f" the remote copy s3://{s3.bucket}/{b} of {owner}: give it "
                    "an s3_prefix that neither contains nor lies inside another volume's")

    def _populate(self, name: str, options: VolumeOptions) -> Populate | None:
        """What a new volume starts with: a copy of ``from=`` if given, else nothing."""
        if options.source is None:
            return None
        volume, _, snapshot = options.source.partition("@")
        if snapshot:
            return self.snapshots.store.populate_from(volume, snapshot)
        if volume == name:
            raise InvalidOption(f"option from={volume} names the volume being created")
        source = self.state.get_volume(volume)
        if source is None:
            raise InvalidOption(
                f"option from={volume}: no pyvol volume {volume!r} (a volume of another driver "
                "cannot be cloned); see `docker volume ls -f driver=pyvol:latest`"
            )
        content = self._content(source)

        def populate(dst: Path) -> None:
            with content.view() as data:
                copy_tree(data, dst)
        return populate

    def remove(self, name: str) -> None:
        """Delete a volume and its data, within the call's deadline whatever their size.

        The data (and with ``snapshot_on_remove=delete`` the snapshots) is renamed away and
        deleted by a background job; on return the volume is gone from Get and List and its
        name is free.  Queued automatic snapshots are dropped; a job still running at the
        deadline, a restore or a manual snapshot in progress make it fail with VolumeBusy
        (retry).  Also raises VolumeNotFound or VolumeInUse.
        """
        deadline = Deadline()
        with self._locked(name, deadline):
            record = self._record(name)
            mounts = self.state.mount_count(name)
            if mounts:
                raise VolumeInUse(name, mounts)
            self._refuse_if_busy(name, "removed")
            options = self.options_of(record)
            backend = self.backends[record.backend]
            self.snapshots.before_remove(name, deadline)
            if options.s3 is not None:
                self.sync.before_remove(name, self._content(record), deadline)
                self.sync.untrack(name)
            self.snapshots.on_remove(name, options.snapshot)
            backend.remove(name)
            self.state.delete_volume(name)
        self._purge_later()

    def _purge_later(self, *, after_remove: bool = True) -> None:
        """Queue the deletion of removed data (one job at a time; each deletes all)."""
        self.removals.submit("", "deletion of removed data",
                             lambda: self._purge(after_remove=after_remove))

    def _purge(self, *, after_remove: bool = False) -> None:
        if after_remove:
            hold_point("remove:purge")
        for backend in self.backends.values():
            backend.purge()
        self.snapshots.store.purge()

    def mount(self, name: str, mount_id: str) -> Path:
        """Count a use of the volume by ``mount_id``; set it up on the first one.

        A failed mount leaves no reference behind.  The first mount waits for the volume's
        restore and on-unmount snapshot, outside the lock and within the call's deadline;
        past it, or while a restore runs, it fails saying what runs and how far it is.
        """
        deadline = Deadline()
        record = self._record(name)
        if self.state.mount_count(name) == 0:
            self._settle(record, deadline)
        with self._locked(name, deadline):
            record = self._record(name)
            self._refuse_if_busy(name, "mounted", exclusive_only=True)
            backend = self.backends[record.backend]
            first = self.state.mount_count(name) == 0
            if first:
                self._settle(record, deadline)  # again: normally done at once
                self._expose(name, backend.mount(name))
            try:
                self.state.add_mount(name, mount_id)
            except BaseException:
                if first:
                    self._unexpose(name, backend)
                raise
            return self._mountpoint(record)

    def _settle(self, record: VolumeRecord, deadline: Deadline) -> None:
        self._refuse_if_busy(record.name, "mounted", exclusive_only=True)
        s3 = self.options_of(record).s3
        if s3 is not None:  # first: its bounded wait and precise refusal govern
            self.sync.before_mount(record.name, s3, deadline)
        self.snapshots.before_mount(record.name, deadline)

    def unmount(self, name: str, mount_id: str) -> None:
        """Count one use less.  An unknown ID or volume is logged and succeeds."""
        with self._locked(name):
            if self.state.get_volume(validate_volume_name(name)) is None:
                log.warning("unmount of unknown volume %s (mount %.80r) ignored", name, mount_id)
                return
            known, remaining = self.state.drop_mount(name, mount_id)
            if not known:
                log.warning("unmount of %s with unknown mount ID %.80r ignored", name, mount_id)
                return
            if remaining == 0:
                record = self._record(name)
                backend = self.backends[record.backend]
                self._unexpose(name, backend)
                options = self.options_of(record)
                # Each feature's job reads the data in a view of its own: the backend keeps
                # it available until the job is done, whatever the unmount released.
                content = self._content(record)
                self.snapshots.after_last_unmount(name, options.snapshot, content)
                if options.s3 is not None:
                    self.sync.after_last_unmount(name, options.s3, content)

    def reset_mounts(self, name: str) -> int:
        """Forget all mount references of a volume (stale after a daemon crash)."""
        with self._locked(name):
            record = self._record(name)
            dropped = self.state.clear_mounts(name)
            if dropped:
                self._unexpose(name, self.backends[record.backend])
                log.warning("volume %s: %d mount reference(s) cleared by request", name, dropped)
            return dropped

    def path(self, name: str) -> Path:
        return self._mountpoint(self._record(name))

    def get(self, name: str) -> VolumeInfo:
        record = self._record(name)
        return VolumeInfo(name=record.name, mountpoint=self._mountpoint(record),
                          created_at=record.created_at, status=self._status(record))

    def list_volumes(self) -> list[VolumeInfo]:
        return [
            VolumeInfo(name=r.name, mountpoint=self._mountpoint(r), created_at=r.created_at)
            for r in self.state.list_volumes()
        ]

    # internals

    def _status(self, record: VolumeRecord) -> dict[str, Any]:
        """Never raises: Get of an existing volume must not fail (dockerd would purge it)."""
        status: dict[str, Any] = {}
        try:
            options = self.options_of(record)
            status["backend"] = record.backend
            status["options"] = options.describe()
            status["mounts"] = self.state.mount_count(record.name)
            status.update(self.backends[record.backend].status(record.name))
            status.update(self.snapshots.status(record.name, options.snapshot))
            if options.s3 is not None:
                status.update(self.sync.status(record.name, options.s3))
        except Exception as exc:
            log.exception("status of volume %s failed", record.name)
            status["status_error"] = str(exc)
        return status

    def _expose(self, name: str, data: Path) -> None:
        if self.settings.mount_root is None:
            return
        target = confined(self.settings.mount_root, name)
        if not is_mountpoint(target):
            bind_mount(data, target)

    def _unexpose(self, name: str, backend: Backend) -> None:
        try:
            if self.settings.mount_root is not None:
                unmount(confined(self.settings.mount_root, name))
        finally:
            backend.unmount(name)

    # size (the management API)

    def resize(self, name: str, size_text: str) -> dict[str, Any]:
        """Grow a sized volume to ``size_text`` (``pyvol resize``); a shrink is refused.

        Returns how it was done (``online`` while mounted) and the new size."""
        with self._locked(name):
            record = self._record(name)
            backend = self.backends[record.backend]
            option = next((o for o in backend.options if o.name == "size"), None)
            if option is None or not backend.capabilities.size_limit:
                raise InvalidOption(
                    f"volume {name!r} (backend {record.backend}) has no size limit to change: "
                    f"create a sized copy with `docker volume create -d pyvol -o size=SIZE "
                    f"-o from={name} NEW`")
            self._refuse_if_busy(name, "resized")
            try:
                size = option.parse(size_text.strip())
            except ValueError as exc:
                raise InvalidOption(f"size {size_text!r}: {exc}") from None
            how = backend.resize(name, size)
            stored = {k: v for k, v in record.options.items() if k.strip().lower() != "size"}
            stored["size"] = size_text.strip()
            self.state.set_options(name, stored)
            log.info("volume %s resized to %s (%s)", name, option.show(size), how)
            return {"Size": option.show(size), "SizeBytes": size, "How": how}

    # snapshots (the management API)

    def snapshot_create(self, volume: str, name: str | None) -> SnapshotInfo:
        """A manual snapshot, taken outside the volume's lock; Remove meanwhile is refused."""
        if name is not None:
            validate_snapshot_name(name)
        capture = Capture()
        op = Operation(f"a manual snapshot of volume {volume!r}", exclusive=False,
                       progress=capture.text)
        with self._locked(volume):
            record = self._record(volume)
            self._refuse_if_busy(volume, "snapshotted", exclusive_only=True)
            content = self._content(record)
            self._begin(volume, op)
        with self._operation(volume, op):
            hold_point("snapshot:manual")
            try:
                with content.view() as data:
                    return self.snapshots.store.create(volume, data, name, kind="manual",
                                                       progress=capture.update)
            except OSError as exc:
                raise SnapshotFailed(f"the snapshot of volume {volume!r} failed: {exc}; check "
                                     "the volume and try again") from exc

    def snapshot_list(self, volume: str) -> list[SnapshotInfo]:
        validate_volume_name(volume)
        snaps = [s for s in self.snapshots.store.list_snapshots(volume) if s.kind != "sync"]
        if not snaps and self.state.get_volume(volume) is None:
            raise VolumeNotFound(volume)
        return snaps

    def snapshot_remove(self, volume: str, name: str | None) -> list[str]:
        """Remove one snapshot, or all of the volume's snapshots when ``name`` is None.

        Never removes a sync snapshot that S3 still needs (a pending push's, or the base of
        the volume's next one): naming one raises SnapshotNeeded; ``all`` skips them and
        returns their names.
        """
        validate_volume_name(volume)
        store = self.snapshots.store
        needed = self.sync.needed_snapshots(volume)
        if name is not None:
            validate_snapshot_name(name)
            if name in needed:
                raise SnapshotNeeded(
                    f"snapshot {volume}@{name} is kept for S3: "
                    f"{self.sync.why_needed(volume, name)}; it goes by itself once that push "
                    "is done")
            store.remove(volume, name)
            return []
        if not store.list_snapshots(volume) and self.state.get_volume(volume) is None:
            raise VolumeNotFound(volume)
        if not needed and self.state.get_sync(volume) is None:
            store.remove_all(volume)
            return []
        store.remove_all(volume, keep_kinds=frozenset({"sync"}))
        kept = []
        for snap in store.list_snapshots(volume):
            if snap.name in needed or snap.kind != "sync":
                kept.append(snap.name)
            else:
                store.remove(volume, snap.name)
        return kept

    def snapshot_restore(self, volume: str, name: str) -> SnapshotInfo:
        """Replace the volume's content with ``volume@name``; returns the safety snapshot.

        Only while unmounted: a safety snapshot of the current content is taken first.
        """
        validate_snapshot_name(name)
        store = self.snapshots.store
        op = Operation(f"a restore of volume {volume!r} from snapshot {name}", exclusive=True)
        with self._locked(volume):
            record = self._record(volume)
            mounts = self.state.mount_count(volume)
            if mounts:
                raise VolumeInUse(volume, mounts)
            self._refuse_if_busy(volume, "restored")
            store.get(volume, name)
            self._begin(volume, op)
        with self._operation(volume, op):
            self._wait_jobs(volume)
            hold_point("restore:snapshot")
            content = self._content(record)
            with content.view() as data:
                safety = store.create(volume, data, f"pre-restore-{default_name()}",
                                      kind="safety")
            content.replace(store.populate_from(volume, name))
            log.info("volume %s restored from snapshot %s (safety snapshot %s)", volume, name,
                     safety.name)
            return safety

    # S3 sync (the management API)

    def _s3(self, volume: str) -> tuple[VolumeRecord, S3Policy]:
        record = self._record(volume)
        s3 = self.options_of(record).s3
        if s3 is None:
            raise InvalidOption(
                f"volume {volume!r} has no S3 sync: create it with -o s3_bucket=NAME")
        return record, s3

    def sync_push(self, volume: str) -> None:
        """Queue a push now; returns at once (poll Get's Status.s3 to follow it)."""
        record, s3 = self._s3(volume)
        self.sync.request_push(volume, s3, self._content(record))

    def sync_list(self, volume: str) -> list[RemoteSnapshot]:
        return self.sync.remote_list(self._s3(volume)[1])

    def sync_restore(self, volume: str, snapshot_id: str) -> SnapshotInfo | None:
        """Restore a remote snapshot in place, while unmounted; returns the safety snapshot.

        Runs outside the volume's lock: meanwhile Mount and Remove fail at once saying how far
        the restore is."""
        with self._locked(volume):
            record, s3 = self._s3(volume)
            mounts = self.state.mount_count(volume)
            if mounts:
                raise VolumeInUse(volume, mounts)
            self._refuse_if_busy(volume, "restored")
            op = Operation(f"the restore of volume {volume!r} from s3://{s3.bucket}/{s3.prefix}",
                           exclusive=True, progress=lambda: self.sync.progress_text(volume))
            self._begin(volume, op)
        with self._operation(volume, op):
            self._wait_jobs(volume)
            content = self._content(record)
            with content.view() as data:
                safety = self.snapshots.store.create(
                    volume, data, f"pre-restore-{default_name()}", kind="safety")
            self.sync.restore_in_place(volume, s3, snapshot_id, content)
            return safety

    def _wait_jobs(self, volume: str) -> None:
        for jobs in (self.jobs, self.sync.jobs):
            if not jobs.wait(volume, MANAGEMENT_WAIT):
                raise VolumeBusy(f"volume {volume!r}: its {jobs.describe(volume)} did not finish "
                                 f"within {MANAGEMENT_WAIT:.0f} s; try again later")

    def sync_delete_remote(self, volume: str) -> None:
        self.sync.delete_remote(volume, self._s3(volume)[1])

    # start-up

    def start(self) -> None:
        """Start background work: recovery, schedules, and pushes a restart interrupted."""
        for record in self.state.list_volumes():
            options = self.options_of(record)
            content = self._content(record)
            self.snapshots.track(record.name, options.snapshot, content)
            if options.s3 is not None:
                self.sync.resume(record.name, options.s3, content)
                self.sync.track(record.name, options.s3, self._mounted_content_fn(content))
        self.jobs.submit("", "snapshot recovery", self.snapshots.store.recover)
        self._purge_later(after_remove=False)  # what a restart interrupted
        self.snapshots.start()
        self.sync.start()

    def _mounted_content_fn(self, content: VolumeContent) -> Callable[[], VolumeContent | None]:
        return lambda: content if self.state.mount_count(content.volume) else None

    def recover(self) -> None:
        """Reconcile state and disk after a restart or crash; never deletes user data."""
        interrupted: set[str] = set()
        on_disk: dict[str, str] = {}
        for backend_name, backend in self.backends.items():
            interrupted |= backend.recover()
            on_disk.update(dict.fromkeys(backend.names(), backend_name))
        for record in self.state.creating_volumes():
            if record.name in on_disk:  # the rename was the last step: only the flag is left
                log.info("volume %s: finishing its create that a restart interrupted",
                         record.name)
                self.state.finish_create(record.name)
            else:
                log.info("volume %s: rolling back its create that a restart interrupted",
                         record.name)
                self.state.abort_create(record.name)
        records = {r.name: r for r in self.state.list_volumes()}
        for name in sorted(interrupted & records.keys() - on_disk.keys()):
            log.info("volume %s: finishing a removal that a restart interrupted", name)
            self.state.delete_volume(name)
            del records[name]
        for name in sorted(records.keys() - on_disk.keys()):
            log.error("volume %s has a record but no data directory: restore %s or remove the "
                      "volume", name, self.backends[records[name].backend].path(name))
        for name in sorted(on_disk.keys() - records.keys()):
            self._adopt(name, on_disk[name])
        self._restore_mounts()

    def _adopt(self, name: str, backend_name: str) -> None:
        backend = self.backends[backend_name]
        path = backend.path(name)
        try:
            validate_volume_name(name)
        except Exception:
            log.warning("directory %s is not a valid volume name; left alone", path)
            return
        if not any(path.iterdir()):
            log.info("removing empty directory %s: its create did not complete", path)
            backend.remove(name)
            return
        log.warning("directory %s holds data but had no record: adopted as volume %s with "
                    "default options", path, name)
        self.state.add_volume(VolumeRecord(name=name, backend=backend_name, options={}))

    def _restore_mounts(self) -> None:
        boot_id = BOOT_ID.read_text().strip() if BOOT_ID.exists() else ""
        if boot_id and self.state.get_meta("boot_id") not in (None, boot_id):
            dropped = self.state.clear_mounts()
            if dropped:
                log.warning("host rebooted since the last run: dropped %d stale mount "
                            "reference(s)", dropped)
        self.state.set_meta("boot_id", boot_id)
        mounted = self.state.mounted_volumes()
        if self.settings.mount_root is not None and self.settings.mount_root.is_dir():
            for entry in self.settings.mount_root.iterdir():
                if entry.name not in mounted:
                    log.info("releasing stale mount %s", entry)
                    try:
                        unmount(entry)
                    except (OSError, BackendError) as exc:
                        log.warning("cannot release %s: %s", entry, exc)
        for name in sorted(mounted):
            record = self.state.get_volume(name)
            if record is None:
                continue
            try:
                self._expose(name, self.backends[record.backend].mount(name))
                log.info("volume %s: %d mount(s) restored", name, mounted[name])
            except Exception as exc:
                log.error("volume %s: could not restore its mount: %s", name, exc)

    def sync_check(self, volume: str, read_data: bool = False) -> CheckReport:
        """Check that the volume's remote snapshots are restorable (``pyvol sync check``)."""
        return self.sync.check(volume, self._s3(volume)[1], read_data)
