"""Crash-safe plugin state in SQLite (WAL mode): volume records and mount references.

Every change is one transaction, O(1) in the number of volumes.  Options are stored raw, as
Docker sent them, and parsed again on load.  A volume's record (with its options and, for S3,
the "restoring" marker) is written in one transaction *before* its data directory is put in
place, flagged ``creating`` until Create completes: after a crash, recovery finishes or rolls
back the create, and never adopts a directory with options other than the ones asked for.
A failed write raises :class:`StateError` and fails the call that caused it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from backends.priority import normal
from plugin.errors import StateError

log = logging.getLogger(__name__)

CHECKPOINT_DELAY = 1.0
"""Seconds from a commit to the background checkpoint that it schedules."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    options TEXT NOT NULL,
    created_at TEXT NOT NULL,
    creating INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS mounts (
    name TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    mount_id TEXT NOT NULL,
    count INTEGER NOT NULL CHECK (count > 0),
    PRIMARY KEY (name, mount_id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sync (
    volume TEXT PRIMARY KEY,
    bucket TEXT NOT NULL,
    prefix TEXT NOT NULL,
    keep INTEGER NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0,
    snapshot TEXT,
    restoring TEXT,
    last_ok_at TEXT,
    last_id TEXT,
    last_error TEXT,
    last_error_at TEXT,
    encrypt INTEGER NOT NULL DEFAULT 0,
    generation INTEGER
);
CREATE TABLE IF NOT EXISTS checks (
    volume TEXT PRIMARY KEY,
    bucket TEXT NOT NULL,
    prefix TEXT NOT NULL,
    result TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class SyncRecord:
    """A volume's S3 sync bookkeeping; outlives the volume while a push is pending."""

    volume: str
    bucket: str
    prefix: str
    keep: int
    pending: bool = False
    """A push was requested and has not succeeded yet (durable queue)."""
    snapshot: str | None = None
    """The local snapshot the pending push uploads, once taken."""
    restoring: str | None = None
    """Remote snapshot id (or ``latest``) being restored into the volume."""
    last_ok_at: str | None = None
    last_id: str | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    encrypt: bool = False
    """The volume's ``s3_encrypt``: a pending push of a removed volume still seals."""
    generation: int | None = None
    """A leased volume (``s3_lease``): the lease generation this host's copy descends from,
    the last tenure this host held.  Another host's tenure since breaks the line."""


SYNC_FIELDS = tuple(SyncRecord.__dataclass_fields__)

_SYNC_OF = f"SELECT {', '.join(SYNC_FIELDS)} FROM sync WHERE volume = ?"  # noqa: S608

SyncChange = Callable[[SyncRecord | None], SyncRecord]
"""Makes a volume's sync record from the one stored (None: it has none)."""


@dataclass(frozen=True)
class VolumeRecord:
    name: str
    backend: str
    options: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class StateStore:
    """Thread-safe; one connection serialised by a lock (SQLite calls take microseconds).

    Volume records and mount totals are also kept in memory, written through after each
    commit, so ``Get`` and ``List`` never wait on the database.  That is exact because one
    process owns the store (the server runs a single worker).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        self._lock = threading.Lock()
        self._checkpoint_due = False
        self._closed = False
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Checkpoints run in the background (:meth:`_checkpoint`), not in the commit of
            # whichever Mount or Unmount crosses the WAL's threshold: that one would wait
            # for the database file's writes and fsync too.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(volumes)")}
            if "creating" not in columns:  # a database of an older pyvol
                self._db.execute(
                    "ALTER TABLE volumes ADD COLUMN creating INTEGER NOT NULL DEFAULT 0")
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(sync)")}
            if "encrypt" not in columns:  # a database of a pyvol without encryption
                self._db.execute("ALTER TABLE sync ADD COLUMN encrypt INTEGER NOT NULL DEFAULT 0")
            if "generation" not in columns:  # a database of a pyvol without leases
                self._db.execute("ALTER TABLE sync ADD COLUMN generation INTEGER")
            self._volumes: dict[str, VolumeRecord] = {}
            self._creating: dict[str, VolumeRecord] = {}
            for row in self._db.execute(
                    "SELECT name, backend, options, created_at, creating FROM volumes"):
                record = _record(row[:4])
                (self._creating if row[4] else self._volumes)[record.name] = record
            self._totals: dict[str, int] = {
                str(name): int(total) for name, total in self._db.execute(
                    "SELECT name, SUM(count) FROM mounts GROUP BY name")
            }
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the state database {path}: {exc}") from exc

    @contextmanager
    def _tx(self, *, per_boot: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction.  ``per_boot``: the change only matters until the host reboots
        (mount references, which start-up drops after a reboot anyway), so its commit skips
        the fsync (synchronous=NORMAL): it survives kill -9 of the plugin like any other
        commit, and only an OS crash, after which it is discarded regardless, can lose it.
        Under a disk flooded by snapshot copies that fsync was most of a Mount's time."""
        # Every Mount and Unmount commits under this lock: a background thread holds it at
        # normal priority, or its fsync would queue behind all the disk's other writes.
        with normal(), self._lock:
            try:
                if per_boot:
                    self._db.execute("PRAGMA synchronous=NORMAL")
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        yield self._db
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
                    self._db.execute("COMMIT")
                finally:
                    if per_boot:
                        self._db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise StateError(f"the state database {self.path} failed: {exc}") from exc
            if not self._checkpoint_due:
                self._checkpoint_due = True
                timer = threading.Timer(CHECKPOINT_DELAY, self._checkpoint)
                timer.daemon = True
                timer.start()

    def _checkpoint(self) -> None:
        """Copy committed WAL pages into the database file, outside every call's path.

        PASSIVE: it never blocks a writer.  Once it has caught up, the next commit writes the
        WAL from its start again, so the WAL file does not grow and a commit's fsync
        rewrites blocks in place (no journal commit of the file's size).
        """
        with self._lock:
            self._checkpoint_due = False
            if self._closed:
                return
        try:
            with normal(), contextlib.closing(sqlite3.connect(
                    f"file:{quote(str(self.path))}?mode=rw", uri=True,
                    isolation_level=None)) as db:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.warning("checkpoint of the state database %s failed (retried after the next "
                        "change): %s", self.path, exc)

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StateError(f"the state database {self.path} failed: {exc}") from exc

    # volumes

    def add_volume(self, record: VolumeRecord, *, creating: bool = False,
                   sync: SyncChange | None = None) -> None:
        """Insert a volume record (and its sync record) in one transaction.

        ``creating``: the record is written before the data exists; it stays invisible to
        :meth:`get_volume` and :meth:`list_volumes` until :meth:`finish_create`.
        ``sync`` makes the volume's sync record from the one stored, read in the same
        transaction: a push of a removed volume of the same name, ending meanwhile on another
        thread, can neither be overwritten nor overwrite it.
        """
        with self._tx() as db:
            db.execute(
                "INSERT INTO volumes (name, backend, options, created_at, creating) "
                "VALUES (?, ?, ?, ?, ?)",
                (record.name, record.backend, json.dumps(dict(record.options), sort_keys=True),
                 record.created_at.isoformat(), int(creating)),
            )
            if sync is not None:
                self._put_sync(db, sync(self._get_sync(db, record.name)))
        (self._creating if creating else self._volumes)[record.name] = record

    def set_options(self, name: str, options: Mapping[str, str]) -> VolumeRecord:
        """Replace a volume's stored raw options (``pyvol resize`` records the new size)."""
        record = replace(self._volumes[name], options=dict(options))
        with self._tx() as db:
            db.execute("UPDATE volumes SET options = ? WHERE name = ?",
                       (json.dumps(dict(options), sort_keys=True), name))
        self._volumes[name] = record
        return record

    def finish_create(self, name: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE volumes SET creating = 0 WHERE name = ?", (name,))
        self._volumes[name] = self._creating.pop(name)

    def abort_create(self, name: str, sync: SyncRecord | None = None) -> None:
        """Drop a record still ``creating``; put back ``sync`` (the sync record as it was
        before, if any) or, without it, clear the restore the create had asked for."""
        with self._tx() as db:
            db.execute("DELETE FROM volumes WHERE name = ? AND creating = 1", (name,))
            if sync is not None:
                self._put_sync(db, sync)
            else:
                db.execute("UPDATE sync SET restoring = NULL WHERE volume = ?", (name,))
                db.execute("DELETE FROM sync WHERE volume = ? AND pending = 0 AND "
                           "last_ok_at IS NULL", (name,))
        self._creating.pop(name, None)

    def creating_volumes(self) -> list[VolumeRecord]:
        """Records whose Create has not completed (after a crash: for recovery)."""
        return sorted(self._creating.values(), key=lambda r: r.name)

    def get_volume(self, name: str) -> VolumeRecord | None:
        return self._volumes.get(name)

    def list_volumes(self) -> list[VolumeRecord]:
        return sorted(self._volumes.values(), key=lambda r: r.name)

    def delete_volume(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM volumes WHERE name = ?", (name,))
        self._volumes.pop(name, None)
        self._totals.pop(name, None)

    # mount references, counted per (volume, Docker mount ID)

    def mount_count(self, name: str) -> int:
        return self._totals.get(name, 0)

    def _set_total(self, name: str, total: int) -> int:
        if total:
            self._totals[name] = total
        else:
            self._totals.pop(name, None)
        return total

    def add_mount(self, name: str, mount_id: str) -> int:
        """Count one more use of ``name`` by ``mount_id``; return the volume's total."""
        with self._tx(per_boot=True) as db:
            db.execute(
                "INSERT INTO mounts (name, mount_id, count) VALUES (?, ?, 1) "
                "ON CONFLICT (name, mount_id) DO UPDATE SET count = count + 1",
                (name, mount_id),
            )
            total = int(db.execute(
                "SELECT SUM(count) FROM mounts WHERE name = ?", (name,)).fetchone()[0])
        return self._set_total(name, total)

    def drop_mount(self, name: str, mount_id: str) -> tuple[bool, int]:
        """Count one use less; return (whether the ID was known, the volume's total)."""
        with self._tx(per_boot=True) as db:
            row = db.execute(
                "SELECT count FROM mounts WHERE name = ? AND mount_id = ?", (name, mount_id)
            ).fetchone()
            if row is not None:
                if row[0] > 1:
                    db.execute("UPDATE mounts SET count = count - 1 WHERE name = ? AND "
                               "mount_id = ?", (name, mount_id))
                else:
                    db.execute("DELETE FROM mounts WHERE name = ? AND mount_id = ?",
                               (name, mount_id))
            total = db.execute(
                "SELECT COALESCE(SUM(count), 0) FROM mounts WHERE name = ?", (name,)
            ).fetchone()[0]
        return row is not None, self._set_total(name, int(total))

    def mounted_volumes(self) -> dict[str, int]:
        return dict(self._totals)

    def clear_mounts(self, name: str | None = None) -> int:
        """Forget mount references: of one volume, or of all when ``name`` is None."""
        with self._tx() as db:
            if name is None:
                dropped = db.execute("DELETE FROM mounts").rowcount
            else:
                dropped = db.execute("DELETE FROM mounts WHERE name = ?", (name,)).rowcount
        if name is None:
            self._totals.clear()
        else:
            self._totals.pop(name, None)
        return dropped

    # S3 sync bookkeeping

    def put_sync(self, record: SyncRecord) -> None:
        with self._tx() as db:
            self._put_sync(db, record)

    @staticmethod
    def _put_sync(db: sqlite3.Connection, record: SyncRecord) -> None:
        values = tuple(getattr(record, f) for f in SYNC_FIELDS)
        db.execute(
            f"INSERT OR REPLACE INTO sync ({', '.join(SYNC_FIELDS)}) "  # noqa: S608
            f"VALUES ({', '.join('?' * len(SYNC_FIELDS))})", values)

    def update_sync(self, volume: str, change: SyncChange) -> SyncRecord:
        """Read, change and write the volume's sync record in one transaction, so changes made
        on other threads (a push ending, a Create) are never lost.  ``change`` may raise: then
        nothing is written."""
        with self._tx() as db:
            record = change(self._get_sync(db, volume))
            self._put_sync(db, record)
        return record

    def forget_sync_of_removed(self, volume: str) -> bool:
        """Drop the sync record only if no volume of that name exists, not even one being
        created; True if it was dropped."""
        with self._tx() as db:
            cursor = db.execute("DELETE FROM sync WHERE volume = ? AND NOT EXISTS "
                                "(SELECT 1 FROM volumes WHERE name = ?)", (volume, volume))
            return cursor.rowcount > 0

    @staticmethod
    def _get_sync(db: sqlite3.Connection, volume: str) -> SyncRecord | None:
        row = db.execute(_SYNC_OF, (volume,)).fetchone()
        return None if row is None else _sync(row)

    def get_sync(self, volume: str) -> SyncRecord | None:
        rows = self._read(_SYNC_OF, (volume,))
        return _sync(rows[0]) if rows else None

    def list_sync(self) -> list[SyncRecord]:
        rows = self._read(f"SELECT {', '.join(SYNC_FIELDS)} FROM sync")  # noqa: S608
        return [_sync(row) for row in rows]

    def delete_sync(self, volume: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sync WHERE volume = ?", (volume,))

    # the last `pyvol sync check` of each volume's remote copy

    def put_check(self, volume: str, where: tuple[str, str],
                  result: Mapping[str, object] | None) -> None:
        """Keep ``result`` as the last check of ``volume``'s copy at ``where`` (bucket,
        prefix), replacing the one before; ``None`` forgets it.  One transaction."""
        with self._tx() as db:
            if result is None:
                db.execute("DELETE FROM checks WHERE volume = ?", (volume,))
            else:
                db.execute("INSERT OR REPLACE INTO checks (volume, bucket, prefix, result) "
                           "VALUES (?, ?, ?, ?)", (volume, *where, json.dumps(dict(result))))

    def get_check(self, volume: str, where: tuple[str, str]) -> dict[str, object] | None:
        """The last check kept for ``volume``, if it was of the copy at ``where``."""
        rows = self._read("SELECT result FROM checks WHERE volume = ? AND bucket = ? AND "
                          "prefix = ?", (volume, *where))
        return dict(json.loads(str(rows[0][0]))) if rows else None

    # small key/value facts (boot id, schema notes)

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                       "SET value = excluded.value", (key, value))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()


def _sync(row: tuple[object, ...]) -> SyncRecord:
    data = dict(zip(SYNC_FIELDS, row, strict=True))
    data["pending"] = bool(data["pending"])
    data["encrypt"] = bool(data["encrypt"])
    return SyncRecord(**data)  # type: ignore[arg-type]


def _record(row: tuple[object, ...]) -> VolumeRecord:
    name, backend, options, created_at = row
    return VolumeRecord(
        name=str(name),
        backend=str(backend),
        options=json.loads(str(options)),
        created_at=datetime.fromisoformat(str(created_at)),
    )
