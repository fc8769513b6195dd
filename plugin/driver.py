"""The volume driver: one method per VolumeDriver verb, no HTTP in sight.

Concurrency: each volume has its own lock, so a slow operation on one volume never delays
another.  Mount references are counted per (volume, Docker mount ID) in the state store; the
backend (and, for a managed plugin, the bind mount under the propagated mount) is touched only
on the first mount and the last unmount.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from backends import REGISTRY, Backend
from backends.fs import bind_mount, confined, is_mountpoint, unmount
from plugin.errors import VolumeExists, VolumeInUse, VolumeNotFound
from plugin.names import validate_volume_name
from plugin.options import VolumeOptions, parse_options
from plugin.settings import Settings
from plugin.state import StateStore, VolumeRecord

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
        settings.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.state = state or StateStore(settings.root / "state.db")
        self.backends: Mapping[str, Backend] = backends or {
            name: factory(settings.root) for name, factory in REGISTRY.items()
        }
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # helpers

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            yield

    def options_of(self, record: VolumeRecord) -> VolumeOptions:
        """Parse a stored record's raw options again, exactly as Create parsed them."""
        return parse_options(record.options, default_backend=record.backend,
                             backends=self.backends.keys())

    def _record(self, name: str) -> VolumeRecord:
        record = self.state.get_volume(validate_volume_name(name))
        if record is None:
            raise VolumeNotFound(name)
        return record

    def _mountpoint(self, record: VolumeRecord) -> Path:
        """Where containers see the volume: under the propagated mount, or the data itself."""
        if self.settings.mount_root is None:
            return self.backends[record.backend].path(record.name)
        return confined(self.settings.mount_root, record.name)

    # the VolumeDriver verbs

    def create(self, name: str, raw_options: Mapping[str, object] | None) -> None:
        """Create a volume.  Idempotent for the same options; other options raise VolumeExists."""
        validate_volume_name(name)
        options = parse_options(raw_options, default_backend=self.settings.default_backend,
                                backends=self.backends.keys())
        with self._locked(name):
            existing = self.state.get_volume(name)
            if existing is not None:
                if self.options_of(existing) == options:
                    return
                raise VolumeExists(
                    f"volume {name!r} already exists with options "
                    f"{self.options_of(existing).describe()}, not {options.describe()}: use the "
                    "same options, or pick another name"
                )
            backend = self.backends[options.backend]
            backend.create(name, options.dir_spec())
            try:
                self.state.add_volume(VolumeRecord(
                    name=name, backend=options.backend,
                    options={k: str(v) for k, v in (raw_options or {}).items()},
                ))
            except BaseException:
                backend.remove(name)
                raise
        log.info("created volume %s with %s", name, options.describe())

    def remove(self, name: str) -> None:
        """Delete a volume and its data.  Raises VolumeNotFound or VolumeInUse."""
        with self._locked(name):
            record = self._record(name)
            mounts = self.state.mount_count(name)
            if mounts:
                raise VolumeInUse(name, mounts)
            self.backends[record.backend].remove(name)
            self.state.delete_volume(name)

    def mount(self, name: str, mount_id: str) -> Path:
        """Count a use of the volume by ``mount_id``; set it up on the first one.

        A failed mount leaves no reference behind.
        """
        with self._locked(name):
            record = self._record(name)
            backend = self.backends[record.backend]
            first = self.state.mount_count(name) == 0
            if first:
                self._expose(name, backend.mount(name))
            try:
                self.state.add_mount(name, mount_id)
            except BaseException:
                if first:
                    self._unexpose(name, backend)
                raise
            return self._mountpoint(record)

    def unmount(self, name: str, mount_id: str) -> None:
        """Count one use less.  An unknown ID or volume is logged and succeeds."""
        with self._locked(name):
            if self.state.get_volume(validate_volume_name(name)) is None:
                log.warning("unmount of unknown volume %s (mount %s) ignored", name, mount_id)
                return
            known, remaining = self.state.drop_mount(name, mount_id)
            if not known:
                log.warning("unmount of %s with unknown mount ID %s ignored", name, mount_id)
                return
            if remaining == 0:
                self._unexpose(name, self.backends[self._record(name).backend])

    def path(self, name: str) -> Path:
        return self._mountpoint(self._record(name))

    def get(self, name: str) -> VolumeInfo:
        record = self._record(name)
        return VolumeInfo(name=record.name, mountpoint=self._mountpoint(record),
                          created_at=record.created_at, status=self._status(record))

    def list(self) -> list[VolumeInfo]:
        return [
            VolumeInfo(name=r.name, mountpoint=self._mountpoint(r), created_at=r.created_at)
            for r in self.state.list_volumes()
        ]

    # internals

    def _status(self, record: VolumeRecord) -> dict[str, Any]:
        """Never raises: Get of an existing volume must not fail (dockerd would purge it)."""
        status: dict[str, Any] = {}
        try:
            status["options"] = self.options_of(record).describe()
            status["mounts"] = self.state.mount_count(record.name)
            status.update(self.backends[record.backend].status(record.name))
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

    # start-up

    def recover(self) -> None:
        """Reconcile state and disk after a restart or crash; never deletes user data."""
        interrupted: set[str] = set()
        on_disk: dict[str, str] = {}
        for backend_name, backend in self.backends.items():
            interrupted |= backend.recover()
            on_disk.update(dict.fromkeys(backend.names(), backend_name))
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
                    unmount(entry)
        for name in sorted(mounted):
            record = self.state.get_volume(name)
            if record is None:
                continue
            try:
                self._expose(name, self.backends[record.backend].mount(name))
                log.info("volume %s: %d mount(s) restored", name, mounted[name])
            except Exception as exc:
                log.error("volume %s: could not restore its mount: %s", name, exc)
