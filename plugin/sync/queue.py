"""The durable push queue: each volume's :class:`~plugin.state.SyncRecord`, changed only
through the transitions below, each one transaction of the state database.

A volume's push is in one of three states, read from the record (the schema of the ``sync``
table is unchanged: ``pending`` and ``snapshot`` say it)::

    idle --request--> requested --captured--> captured --pushed--> idle
                          ^                       |  \\--lost (its snapshot is gone)--> idle
                          \\------request---------/
    requested, captured --failed--> the same state, with last_error (retried with backoff)

``request`` from ``captured`` supersedes the capture; the upload already running completes,
and ``pushed`` then leaves the newer request pending.  ``uploading`` is not a durable state:
a restart finds the push ``captured`` and uploads it again (pushes are idempotent).  The
``restoring`` marker is apart from it: set by Create (:meth:`PushQueue.for_create`), cleared by
``restored``; ``restore_failed`` records why it is still set.  Any other transition raises
:class:`IllegalTransition`.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Literal

from plugin.options import S3Policy
from plugin.state import StateStore, SyncChange, SyncRecord

PushState = Literal["idle", "requested", "captured"]


class IllegalTransition(RuntimeError):
    """A transition the push's current state does not allow (a bug, or a race lost to
    ``pyvol sync delete-remote``, which forgets the record)."""


def now() -> str:
    return datetime.now(UTC).isoformat()


def push_state(record: SyncRecord | None) -> PushState:
    if record is None or not record.pending:
        return "idle"
    return "requested" if record.snapshot is None else "captured"


class PushQueue:
    def __init__(self, state: StateStore) -> None:
        self.state = state

    def get(self, volume: str) -> SyncRecord | None:
        return self.state.get_sync(volume)

    def _change(self, volume: str, transition: str, allowed: tuple[PushState, ...],
                **changes: Any) -> SyncRecord:
        def change(record: SyncRecord | None) -> SyncRecord:
            if record is None or push_state(record) not in allowed:
                raise IllegalTransition(
                    f"volume {volume!r}: S3 push cannot go {transition} from "
                    f"{'no record' if record is None else push_state(record)}")
            return replace(record, **changes)
        return self.state.update_sync(volume, change)

    # the record itself

    @staticmethod
    def _located(volume: str, policy: S3Policy) -> SyncChange:
        """The volume's record for ``policy``'s location, made afresh (idle) if it had none
        or one for another location; its ``keep`` and ``encrypt`` follow the policy (a volume
        created again with another s3_keep or s3_encrypt)."""
        def change(record: SyncRecord | None) -> SyncRecord:
            if record is None or (record.bucket, record.prefix) != (policy.bucket,
                                                                     policy.prefix):
                return SyncRecord(volume=volume, bucket=policy.bucket, prefix=policy.prefix,
                                  keep=policy.keep, encrypt=policy.encrypt)
            return replace(record, keep=policy.keep, encrypt=policy.encrypt)
        return change

    @classmethod
    def for_create(cls, volume: str, policy: S3Policy) -> SyncChange:
        """How a new volume's record is made from the stored one (Create commits it with the
        volume's, in one transaction): marked ``restoring`` if it asked for a restore.  A
        pending push of a removed volume of the same name and location stays queued."""
        located = cls._located(volume, policy)

        def change(record: SyncRecord | None) -> SyncRecord:
            record = located(record)
            if policy.restore != "never":
                record = replace(record, restoring=policy.restore, last_error=None,
                                 last_error_at=None)
            return record
        return change

    def attach(self, volume: str, policy: S3Policy) -> SyncRecord:
        """The volume's record for ``policy``'s location (see :meth:`_located`), written."""
        return self.state.update_sync(volume, self._located(volume, policy))

    def forget(self, volume: str) -> None:
        """Drop the record: its remote copy was deleted."""
        self.state.delete_sync(volume)

    def forget_if_removed(self, volume: str) -> bool:
        """Drop the record of a removed volume whose last push is done, unless a volume of
        that name exists again (even one still being created: its restore reads the record).
        True if dropped."""
        return self.state.forget_sync_of_removed(volume)

    # push transitions

    def request(self, volume: str, policy: S3Policy) -> SyncRecord:
        """any -> requested: a push of the content as it is now (its snapshot is taken next)."""
        self.attach(volume, policy)
        return self._change(volume, "request", ("idle", "requested", "captured"),
                            pending=True, snapshot=None)

    def captured(self, volume: str, snapshot: str) -> SyncRecord:
        """requested -> captured: local snapshot ``snapshot`` holds what to upload."""
        return self._change(volume, "captured", ("requested",), snapshot=snapshot)

    def failed(self, volume: str, message: str) -> SyncRecord:
        """requested, captured -> the same, with the error for Status (retried by the caller)."""
        return self._change(volume, "failed", ("requested", "captured"),
                            last_error=message, last_error_at=now())

    def lost(self, volume: str, message: str) -> SyncRecord:
        """captured -> idle with an error: the snapshot to upload is gone, nothing can retry."""
        return self._change(volume, "lost", ("captured",), pending=False,
                            last_error=message, last_error_at=now())

    def pushed(self, volume: str, snapshot: str, remote_id: str) -> SyncRecord | None:
        """captured (``snapshot``) -> idle; a newer request (requested, or captured with
        another snapshot) stays pending.  None if the record was forgotten meanwhile; if it
        was made afresh (idle: the volume was created again at another location), the
        upload is still recorded as its last push."""
        current = self.state.get_sync(volume)
        if current is None:  # `pyvol sync delete-remote` ran meanwhile
            return None
        newer = current.snapshot != snapshot
        return self._change(volume, "pushed", ("idle", "requested", "captured"),
                            pending=current.pending and newer, last_ok_at=now(), last_id=remote_id,
                            last_error=None, last_error_at=None)

    # the restore marker

    def restored(self, volume: str, *, at_create: bool, remote_id: str | None) -> SyncRecord:
        """Clear ``restoring`` (Mount is allowed again).  ``at_create``: the restore Create
        asked for, so its error is cleared and ``remote_id`` (if any) becomes the last id."""
        changes: dict[str, Any] = {"restoring": None}
        if at_create:
            changes.update(last_error=None, last_error_at=None)
            if remote_id is not None:
                changes["last_id"] = remote_id
        return self._change(volume, "restored", ("idle", "requested", "captured"), **changes)

    def restore_requested(self, volume: str, policy: S3Policy, snapshot_id: str) -> SyncRecord:
        """Set ``restoring``: the volume is brought to remote snapshot ``snapshot_id`` (a
        leased volume taken from another host) before Mount is allowed."""
        self.attach(volume, policy)
        return self._change(volume, "restore_requested", ("idle", "requested", "captured"),
                            restoring=snapshot_id, last_error=None, last_error_at=None)

    def leased(self, volume: str, policy: S3Policy, generation: int) -> SyncRecord:
        """This host's copy now goes on under lease generation ``generation``."""
        self.attach(volume, policy)
        return self._change(volume, "leased", ("idle", "requested", "captured"),
                            generation=generation)

    def restore_failed(self, volume: str, message: str) -> SyncRecord:
        """Keep ``restoring`` and say why it is not done (Status, and Mount's refusal)."""
        return self._change(volume, "restore_failed", ("idle", "requested", "captured"),
                            last_error=message, last_error_at=now())
