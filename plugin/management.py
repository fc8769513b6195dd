"""pyvol's management API (the `pyvol` CLI): snapshots, S3 sync, resize, mount references.

Apart from the Docker verbs (``plugin.driver``), which it shares volumes with only through
the driver's public surface: its records (``record``, ``options_of``, ``content``), its
features (``snapshots``, ``sync``) and its :class:`~plugin.operations.VolumeGuard`.  A long
call (a restore, a manual snapshot) is registered under the volume's lock and runs outside
it; meanwhile the Docker verbs that conflict with it fail at once saying how far it is.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from plugin.errors import InvalidOption, SnapshotFailed, SnapshotNeeded, VolumeInUse, VolumeNotFound
from plugin.names import validate_volume_name
from plugin.operations import Operation
from plugin.snapshotting import Capture, validate_snapshot_name
from plugin.testhooks import hold_point
from snapshots.store import SnapshotInfo, default_name

if TYPE_CHECKING:
    from plugin.driver import Driver
    from plugin.options import S3Policy
    from plugin.state import VolumeRecord
    from s3sync import CheckReport, RemoteSnapshot
    from s3sync.keys import KeyInfo
    from s3sync.store import KeyList

log = logging.getLogger(__name__)


class Management:
    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.guard = driver.guard
        self.state = driver.state
        self.snapshots = driver.snapshots
        self.sync = driver.sync

    # size

    def resize(self, name: str, size_text: str) -> dict[str, Any]:
        """Grow a sized volume to ``size_text`` (``pyvol resize``); a shrink is refused.

        Runs outside the volume's lock (an offline grow checks the whole filesystem first):
        meanwhile Remove is refused, and the backend refuses a Mount it cannot serve.  Returns
        how it was done (``online`` while mounted) and the new size."""
        op = Operation(f"the resize of volume {name!r}", exclusive=False)
        with self.guard.locked(name):
            record = self.driver.record(name)
            backend = self.driver.backends[record.backend]
            option = next((o for o in backend.options if o.name == "size"), None)
            if option is None or not backend.capabilities.size_limit:
                raise InvalidOption(
                    f"volume {name!r} (backend {record.backend}) has no size limit to change: "
                    f"create a sized copy with `docker volume create -d pyvol -o size=SIZE "
                    f"-o from={name} NEW`")
            self.guard.refuse_if_busy(name, "resized")
            try:
                size = option.parse(size_text.strip())
            except ValueError as exc:
                raise InvalidOption(f"size {size_text!r}: {exc}") from None
            self.guard.begin(name, op)
        with self.guard.running(name, op):
            hold_point("resize")
            how = backend.resize(name, size)
            with self.guard.locked(name):
                record = self.driver.record(name)
                stored = {k: v for k, v in record.options.items()
                          if k.strip().lower() != "size"}
                stored["size"] = size_text.strip()
                self.state.set_options(name, stored)
        log.info("volume %s resized to %s (%s)", name, option.show(size), how)
        return {"Size": option.show(size), "SizeBytes": size, "How": how}

    # mount references

    def reset_mounts(self, name: str) -> int:
        """Forget all mount references of a volume (stale after a daemon crash)."""
        with self.guard.locked(name):
            record = self.driver.record(name)
            dropped = self.state.clear_mounts(name)
            if dropped:
                self.driver.unexpose(name, self.driver.backends[record.backend])
                log.warning("volume %s: %d mount reference(s) cleared by request", name, dropped)
                # As the last Unmount would have: the data written under those mounts is
                # pushed (a leased volume's lease is then freed, or the push kept aside if
                # another host took the volume over meanwhile).
                s3 = self.driver.options_of(record).s3
                if s3 is not None:
                    self.driver.sync.after_last_unmount(name, s3, self.driver.content(record))
            return dropped

    # snapshots

    def snapshot_create(self, volume: str, name: str | None) -> SnapshotInfo:
        """A manual snapshot, taken outside the volume's lock; Remove meanwhile is refused."""
        if name is not None:
            validate_snapshot_name(name)
        capture = Capture()
        op = Operation(f"a manual snapshot of volume {volume!r}", exclusive=False,
                       progress=capture.text)
        with self.guard.locked(volume):
            record = self.driver.record(volume)
            self.guard.refuse_if_busy(volume, "snapshotted", exclusive_only=True)
            content = self.driver.content(record)
            self.guard.begin(volume, op)
        with self.guard.running(volume, op):
            hold_point("snapshot:manual")
            try:
                return self.snapshots.store.create(volume, content, name, kind="manual",
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
        with self.guard.locked(volume):
            record = self._unmounted(volume)
            self.guard.refuse_if_busy(volume, "restored")
            store.get(volume, name)
            self.guard.begin(volume, op)
        with self.guard.running(volume, op):
            self.guard.wait_jobs(volume)
            hold_point("restore:snapshot")
            content = self.driver.content(record)
            safety = store.create(volume, content, f"pre-restore-{default_name()}",
                                  kind="safety")
            content.replace(store.populate_from(volume, name))
            log.info("volume %s restored from snapshot %s (safety snapshot %s)", volume, name,
                     safety.name)
            return safety

    def _unmounted(self, volume: str) -> VolumeRecord:
        record = self.driver.record(volume)
        mounts = self.state.mount_count(volume)
        if mounts:
            raise VolumeInUse(volume, mounts)
        return record

    # S3 sync

    def _s3(self, volume: str) -> tuple[VolumeRecord, S3Policy]:
        record = self.driver.record(volume)
        s3 = self.driver.options_of(record).s3
        if s3 is None:
            raise InvalidOption(
                f"volume {volume!r} has no S3 sync: create it with -o s3_bucket=NAME")
        return record, s3

    def sync_push(self, volume: str) -> None:
        """Queue a push now; returns at once (poll Get's Status.s3 to follow it)."""
        record, s3 = self._s3(volume)
        self.sync.request_push(volume, s3, self.driver.content(record))

    def sync_list(self, volume: str) -> list[RemoteSnapshot]:
        return self.sync.remote_list(self._s3(volume)[1])

    def sync_restore(self, volume: str, snapshot_id: str) -> SnapshotInfo | None:
        """Restore a remote snapshot in place, while unmounted; returns the safety snapshot.

        Runs outside the volume's lock: meanwhile Mount and Remove fail at once saying how far
        the restore is."""
        with self.guard.locked(volume):
            record, s3 = self._s3(volume)
            self._unmounted(volume)
            self.guard.refuse_if_busy(volume, "restored")
            op = Operation(f"the restore of volume {volume!r} from s3://{s3.bucket}/{s3.prefix}",
                           exclusive=True, progress=lambda: self.sync.progress_text(volume))
            self.guard.begin(volume, op)
        with self.guard.running(volume, op):
            self.guard.wait_jobs(volume)
            content = self.driver.content(record)
            safety = self.snapshots.store.create(
                volume, content, f"pre-restore-{default_name()}", kind="safety")
            self.sync.restore_in_place(volume, s3, snapshot_id, content)
            return safety

    def sync_delete_remote(self, volume: str) -> None:
        self.sync.delete_remote(volume, self._s3(volume)[1])

    def sync_check(self, volume: str, read_data: bool = False) -> CheckReport:
        """Check that the volume's remote snapshots are restorable (``pyvol sync check``)."""
        return self.sync.check(volume, self._s3(volume)[1], read_data)

    # the lease of a volume used from several hosts

    def lease_show(self, volume: str) -> dict[str, Any]:
        """The volume's lease as the bucket has it now (``pyvol lease show``)."""
        return self.sync.lease_show(volume, self._s3(volume)[1])

    def lease_break(self, volume: str, confirm: str) -> dict[str, Any]:
        """Free the volume's lease whoever holds it (``pyvol lease break VOLUME --yes``);
        its holder, if still running, is fenced: its later pushes never become latest."""
        if confirm != volume:
            raise InvalidOption(f"breaking the lease of {volume!r} needs Confirm={volume!r}: "
                                "its holder loses it (use `pyvol lease break VOLUME --yes`)")
        was = self.sync.lease_break(volume, self._s3(volume)[1])
        log.warning("volume %s: lease broken by hand (it was %s)", volume, was)
        return was

    # passphrases of an encrypted S3 copy: key objects only, never the data; beside pushes

    def _encrypted(self, volume: str) -> S3Policy:
        s3 = self._s3(volume)[1]
        if not s3.encrypt:
            raise InvalidOption(
                f"volume {volume!r} is not encrypted (it was created with s3_encrypt=false): "
                "its S3 copy has no passphrases to manage")
        return s3

    def sync_key_add(self, volume: str, passphrase: str) -> KeyInfo:
        """One more passphrase for the volume's S3 copy (``pyvol sync key add``)."""
        return self.sync.key_add(self._encrypted(volume), passphrase)

    def sync_key_list(self, volume: str) -> KeyList:
        return self.sync.key_list(self._encrypted(volume))

    def sync_key_remove(self, volume: str, key_id: str) -> None:
        """Remove one passphrase; refused for the last one and for the one the plugin's
        S3_PASSPHRASE opens (the message gives the rotation recipe)."""
        from s3sync.errors import KeyInUse

        try:
            self.sync.key_remove(self._encrypted(volume), key_id)
        except KeyInUse:
            raise KeyInUse(
                f"key {key_id} of volume {volume!r} is the one the plugin's S3_PASSPHRASE "
                f"opens, so it stays.  To rotate: `pyvol sync key add {volume}` (the new "
                "passphrase), then `docker plugin disable -f pyvol && docker plugin set pyvol "
                "S3_PASSPHRASE=NEW && docker plugin enable pyvol`, then "
                f"`pyvol sync key rm {volume} {key_id}`") from None
        log.info("volume %s: removed S3 key %s", volume, key_id)
