"""The volume driver: one method per VolumeDriver verb, no HTTP in sight.

The management API lives in ``plugin.management`` (``Driver.management``), the S3 sync in
``plugin.sync``.  Concurrency: each volume has its own lock (``plugin.operations``), so an
operation on one volume never delays another, and nothing slow runs under it: a long
management operation (a restore, a manual snapshot) marks the volume busy for a moment under
the lock and runs outside it, and the Docker verbs that conflict with it fail at once saying
what runs and how far it is.  Every Docker verb
answers within one deadline (``plugin.locks.CALL_BUDGET``) shared by all its waits.  Mount
references are counted per (volume, Docker mount ID) in the state store; the
backend (and, for a managed plugin, the bind mount under the propagated mount) is touched only
on the first mount and the last unmount.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from backends import REGISTRY, Backend
from backends.base import Populate, VolumeContent
from backends.errors import BackendError
from backends.fs import bind_mount, confined, is_mountpoint, make_private, unmount
from backends.tree import copy_tree
from plugin.errors import (
    CreateFailed,
    InvalidOption,
    VolumeBusy,
    VolumeExists,
    VolumeInUse,
    VolumeNotFound,
)
from plugin.jobs import Jobs
from plugin.locks import Deadline
from plugin.management import Management
from plugin.names import validate_volume_name
from plugin.operations import VolumeGuard
from plugin.options import (
    S3Policy,
    VolumeOptions,
    normalise,
    parse_options,
    with_default_encrypt,
    with_default_size,
)
from plugin.settings import Settings
from plugin.snapshotting import Snapshotter
from plugin.state import StateStore, SyncRecord, VolumeRecord
from plugin.sync import Syncer
from plugin.testhooks import crash_point, hold_point
from snapshots.store import SnapshotStore, image_cloner

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    mountpoint: Path
    created_at: datetime
    status: Mapping[str, Any] | None = None


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
        self.clones = Jobs(name="copy-jobs")
        """Copies of ``from=`` volumes and snapshots into new volumes."""
        self.jobs = Jobs(name="snapshot-jobs")
        """The snapshot feature's jobs; S3 has its own (``self.sync.jobs``)."""
        self.removals = Jobs(workers=1, name="removal-jobs")
        """Deletes removed volumes' data (and discarded snapshots) after Remove answered."""
        # The backend that clones its images for O(1) snapshots, if any (it opens them too).
        store = SnapshotStore(settings.root, images=next(
            (c for b in self.backends.values() if (c := image_cloner(b)) is not None), None))
        self.snapshots = Snapshotter(store, self.jobs)
        self.sync = Syncer(settings.root, self.state, store, Jobs(name="s3-jobs"),
                           dict(settings.s3_env), settings.host_name)
        self.guard = VolumeGuard([self.jobs, self.sync.jobs])
        """Each volume's lock and the management operations running on it."""
        self.management = Management(self)
        """The management API (``pyvol/*``), on the same volumes."""

    # helpers (also the management API's view of the volumes)

    def options_of(self, record: VolumeRecord) -> VolumeOptions:
        """Parse a stored record's raw options again, exactly as Create parsed them."""
        return parse_options(record.options, default_backend=record.backend,
                             backends=self.backends, volume=record.name)

    def content(self, record: VolumeRecord) -> VolumeContent:
        """What features read (in a view) and replace (staged) of the volume."""
        return VolumeContent(self.backends[record.backend], record.name)

    def record(self, name: str) -> VolumeRecord:
        """The volume's record; InvalidName or VolumeNotFound."""
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
        passphrase_set = bool(self.settings.s3_env.get("S3_PASSPHRASE"))
        raw_options = with_default_encrypt(with_default_size(
            self._inherit_size(raw_options), default_backend=self.settings.default_backend,
            backends=self.backends, default_size=self.settings.default_size),
            passphrase_set=passphrase_set)
        options = parse_options(raw_options, default_backend=self.settings.default_backend,
                                backends=self.backends, volume=name,
                                default_bucket=self.settings.s3_bucket,
                                passphrase_set=passphrase_set)
        stored = {k: str(v) for k, v in (raw_options or {}).items()}
        if options.s3 is not None:
            # Persist the bucket resolved now: a later S3_BUCKET change must not move it.
            stored = {k: v for k, v in stored.items() if k.strip().lower() != "s3_bucket"}
            stored["s3_bucket"] = options.s3.bucket
        deadline = Deadline()
        with self.guard.locked(name, deadline):
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
            self.sync.track(name, options.s3, content)
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
        keys = normalise(raw)
        source = keys.get("from")
        if source is None or "size" in keys or "backend" in keys:
            return raw
        record = self.state.get_volume(source.partition("@")[0])
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
        content = self.content(source)

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
        with self.guard.locked(name, deadline):
            record = self.record(name)
            mounts = self.state.mount_count(name)
            if mounts:
                raise VolumeInUse(name, mounts)
            self.guard.refuse_if_busy(name, "removed")
            options = self.options_of(record)
            backend = self.backends[record.backend]
            self.snapshots.before_remove(name, deadline)
            if options.s3 is not None:
                self.sync.before_remove(name, self.content(record), deadline)
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
        record = self.record(name)
        claims = 0  # Mounts that hold a volume's lease (see Syncer.before_mount)
        try:
            if self.state.mount_count(name) == 0:
                claims += self._settle(record, deadline)
            else:
                claims += self._claim(record)
            with self.guard.locked(name, deadline):
                record = self.record(name)
                self.guard.refuse_if_busy(name, "mounted", exclusive_only=True)
                backend = self.backends[record.backend]
                first = self.state.mount_count(name) == 0
                if first:
                    claims += self._settle(record, deadline)  # again: normally done at once
                    self._expose(name, backend.mount(name))
                try:
                    self.state.add_mount(name, mount_id)
                except BaseException:
                    if first:
                        self.unexpose(name, backend)
                    raise
                return self._mountpoint(record)
        finally:
            for _ in range(claims):
                self.sync.after_mount(name)

    def _claim(self, record: VolumeRecord) -> bool:
        """A Mount of a volume already mounted here: a leased one must still be this host's
        (see Syncer.claim_mounted); True if it claimed the lease (after_mount owed)."""
        s3 = self.options_of(record).s3
        return s3 is not None and self.sync.claim_mounted(record.name, s3)

    def _settle(self, record: VolumeRecord, deadline: Deadline) -> bool:
        """Wait for what must finish before a first Mount; True if it claimed the volume's
        lease (one :meth:`Syncer.after_mount` is then owed)."""
        self.guard.refuse_if_busy(record.name, "mounted", exclusive_only=True)
        s3 = self.options_of(record).s3
        claimed = False
        if s3 is not None:  # first: its bounded wait and precise refusal govern
            claimed = self.sync.before_mount(record.name, s3, deadline, self.content(record))
        try:
            self.snapshots.before_mount(record.name, deadline)
        except BaseException:
            if claimed:
                self.sync.after_mount(record.name)
            raise
        return claimed

    def unmount(self, name: str, mount_id: str) -> None:
        """Count one use less.  An unknown ID or volume is logged and succeeds."""
        with self.guard.locked(name):
            if self.state.get_volume(validate_volume_name(name)) is None:
                log.warning("unmount of unknown volume %s (mount %.80r) ignored", name, mount_id)
                return
            known, remaining = self.state.drop_mount(name, mount_id)
            if not known:
                log.warning("unmount of %s with unknown mount ID %.80r ignored", name, mount_id)
                return
            if remaining == 0:
                record = self.record(name)
                backend = self.backends[record.backend]
                self.unexpose(name, backend)
                options = self.options_of(record)
                # Each feature's job reads the data in a view of its own: the backend keeps
                # it available until the job is done, whatever the unmount released.
                content = self.content(record)
                self.snapshots.after_last_unmount(name, options.snapshot, content)
                if options.s3 is not None:
                    self.sync.after_last_unmount(name, options.s3, content)

    def path(self, name: str) -> Path:
        return self._mountpoint(self.record(name))

    def get(self, name: str) -> VolumeInfo:
        record = self.record(name)
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

    def unexpose(self, name: str, backend: Backend) -> None:
        try:
            if self.settings.mount_root is not None:
                unmount(confined(self.settings.mount_root, name))
        finally:
            backend.unmount(name)

    # start-up

    def start(self) -> None:
        """Start background work: recovery, schedules, and pushes a restart interrupted."""
        for record in self.state.list_volumes():
            options = self.options_of(record)
            content = self.content(record)
            self.snapshots.track(record.name, options.snapshot, content)
            if options.s3 is not None:
                self.sync.resume(record.name, options.s3, content)
                self.sync.track(record.name, options.s3, content)
        self.jobs.submit("", "snapshot recovery", self.snapshots.store.recover)
        self._purge_later(after_remove=False)  # what a restart interrupted
        self.snapshots.start()
        self.sync.start()

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
        if backend.capabilities.plain_directory and not any(path.iterdir()):
            # (Only a plain directory can be a create cut short: other backends build a
            # volume aside and rename it into place complete.)
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
