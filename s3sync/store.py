"""RemoteStore: an off-host, snapshotted copy of one directory in an S3-compatible store.

The local directory is the source of truth: push only reads it, and no failure of the store
changes it.  Each push that changes something becomes a point-in-time snapshot that can be
listed and restored.  Every method raises :class:`~s3sync.errors.S3SyncError`
subclasses with messages that say what to do.

Encryption (``crypto.py``, ``keys.py``, ``keyring.py``, ``sealing.py``): a prefix is
encrypted exactly when it holds key objects (``keys/``) or a ``config``.  Given a passphrase,
the store unlocks the master key once, on its first operation, and keeps it in memory only;
the first push into an empty prefix (or :meth:`RemoteStore.prepare`, which a new volume's
create calls) creates the master key, its first key object and ``config`` -- race-free
across hosts (``keyring.py``).  Refused, before anything is written:
an encrypted prefix without a passphrase or with a wrong one, and a passphrase for a prefix
that already holds unencrypted snapshots.  Plain stores work exactly as before.

Passphrases (:meth:`RemoteStore.add_key`, :meth:`~RemoteStore.keys`,
:meth:`~RemoteStore.remove_key`) change only key objects, never data, and run beside pushes.
In this process they are serialised by a lock of their own; across hosts, additions never
conflict (each is a new object), and a removal never takes the key its own passphrase opens
(:class:`~s3sync.errors.KeyInUse`), so every host's removals leave at least its own key.
"""

from __future__ import annotations

import builtins
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from backends.priority import lower_priority
from backends.tree import TreeView
from s3sync import check as check_mod
from s3sync import keyring
from s3sync import keys as keys_mod
from s3sync import prune as prune_mod
from s3sync import push as push_mod
from s3sync import restore as restore_mod
from s3sync.cache import Cache
from s3sync.check import CheckReport
from s3sync.client import Bucket
from s3sync.config import RetryPolicy, S3Config
from s3sync.crypto import Master
from s3sync.errors import KeyInUse, NotEncrypted, S3SyncError, SnapshotNotFound, WrongPassphrase
from s3sync.hostid import Host
from s3sync.keys import KeyInfo
from s3sync.layout import Layout
from s3sync.lease import Lease
from s3sync.locks import local_lock
from s3sync.manifest import SNAPSHOT_ID, RemoteSnapshot
from s3sync.prune import PruneReport
from s3sync.push import Fence, Progress
from s3sync.remote import Catalog, Remote
from s3sync.restore import Local
from s3sync.sealing import Codec


@dataclass(frozen=True)
class KeyList:
    """What ``key ls`` shows: never a secret."""

    keys: list[KeyInfo]
    """Oldest first."""
    damaged: dict[str, str]
    """Key object id -> why it cannot be read."""
    current: str
    """The id of the key this store's passphrase opens; empty if its key was removed since
    this store unlocked (it keeps the master in memory, but a restart would be refused)."""


PASSPHRASE_SETTING = "S3_PASSPHRASE"  # noqa: S105 -- a setting's name, not a secret
"""What the plugin's users set; named in errors so they say what to do."""


class RemoteStore:
    def __init__(self, config: S3Config, bucket: str, prefix: str, cache_dir: Path, *,
                 retry: RetryPolicy | None = None, workers: int = 8,
                 passphrase: str | None = None) -> None:
        prefix = prefix.strip("/")
        if not prefix or ".." in prefix.split("/") or "//" in prefix:
            raise S3SyncError(f"S3 prefix {prefix!r} must be a non-empty relative key prefix, "
                              "e.g. the volume name")
        client = Bucket(config, bucket, retry or RetryPolicy(), pool=workers * 2 + 4)
        layout = Layout(prefix)
        self._remote = Remote(client, layout, Cache(cache_dir, config.endpoint_url, bucket,
                                                    prefix), workers)
        self._lock = local_lock(config.endpoint_url, bucket, prefix)
        self._workers = workers
        self._passphrase = passphrase or None
        self._unlocked = False
        self._unlocking = threading.Lock()
        self._ring = keyring.BucketKeyring(client, layout)
        self._keys_lock = local_lock(config.endpoint_url, bucket, prefix, kind="keys")
        self._master: Master | None = None
        self._key_id = ""
        self._probed = False

    def __repr__(self) -> str:
        return f"RemoteStore({self._remote.where})"

    @property
    def encrypted(self) -> bool:
        """Whether this store's master key is unlocked (after its first operation)."""
        return self._remote.codec.encrypted

    def _open(self, push: bool = False) -> Remote:
        """The remote, its master key unlocked if the prefix is encrypted; see the module
        docstring.  A plain store looks at ``keys/`` and ``config`` again before each push, so
        it never writes an unencrypted snapshot into a prefix another host has encrypted
        since."""
        with self._unlocking:
            remote = self._remote
            if self._unlocked and (remote.codec.encrypted or not push):
                return remote
            where = remote.where
            if keyring.encrypted(self._ring):
                if not self._passphrase:
                    raise WrongPassphrase(
                        f"{where} is encrypted (it holds key objects under keys/ or a config) "
                        f"and this volume is not: create it with -o s3_encrypt=true, with "
                        f"{PASSPHRASE_SETTING} set to the prefix's passphrase")
                try:
                    key_id, master = keyring.unlock(self._ring, self._passphrase, where,
                                                    write=push)
                except WrongPassphrase as exc:
                    raise WrongPassphrase(f"{exc}: set {PASSPHRASE_SETTING} to the passphrase "
                                          "this store was created with") from None
            elif self._passphrase:
                plain = [o for o in remote.bucket.list(remote.layout.snapshots)
                         if SNAPSHOT_ID.fullmatch(Layout.tail(o.key, remote.layout.snapshots))]
                if plain:
                    raise S3SyncError(
                        f"{where} holds {len(plain)} unencrypted snapshot(s) and no key "
                        "objects, and an encrypted volume never reads or writes a plain prefix: "
                        "to use it unencrypted, create the volume with -o s3_encrypt=false; to "
                        "move it to encryption, copy it into a new volume with a prefix of its "
                        "own (-o from=VOLUME -o s3_encrypt=true)")
                if not push:
                    return remote  # nothing to read yet; the first push creates the key
                key_id, master = keyring.create(self._ring, self._passphrase, where)
            else:
                self._unlocked = True
                return remote
            self._key_id = key_id
            self._master = master
            self._remote = replace(remote, codec=Codec(master))
            self._unlocked = True
            return self._remote

    def prepare(self) -> None:
        """Unlock an encrypted store's master key, making it now if the prefix has none:
        what a new encrypted volume's create does, so that the prefix is marked encrypted
        from then on and the first push does not spend an Argon2id on it.  Refused like a
        push into the prefix would be (a wrong passphrase, unencrypted snapshots there).
        Nothing to do for a plain store."""
        if self._passphrase:
            self._open(push=True)

    # -- passphrases ------------------------------------------------------------------

    def _unlocked_master(self) -> Master:
        self._open()
        if self._master is None:
            raise NotEncrypted(
                f"{self._remote.where} has no key yet: it is not encrypted, or nothing was "
                "pushed to it yet; push first")
        return self._master

    def add_key(self, passphrase: str) -> KeyInfo:
        """Wrap the master key under one more ``passphrase``; returns the new key.  Touches
        no data; runs beside pushes.  Raises :class:`NotEncrypted` before the first push."""
        master = self._unlocked_master()
        if not passphrase:
            raise S3SyncError("the new passphrase is empty: give a non-empty one")
        with self._keys_lock:
            key_id = keys_mod.add_key(self._ring, master, passphrase)
            blob = self._ring.key_objects().get(key_id)
        if blob is None:
            raise S3SyncError(f"key {key_id} vanished from {self._remote.where} right after "
                              "it was written: another client is deleting this prefix")
        return keys_mod.describe(blob, key_id)

    def keys(self) -> KeyList:
        """Every key (id, creation time, cost; never a secret), the damaged ones apart, and
        which one this store's passphrase opened."""
        self._unlocked_master()
        with self._keys_lock:
            listing = keys_mod.list_keys(self._ring)
            if self._key_id not in {k.id for k in listing.keys}:
                # Removed since (by another host, mid-rotation): which one opens now, if any?
                try:
                    self._key_id, _ = keyring.unlock(self._ring, self._passphrase,
                                                     self._remote.where)
                except WrongPassphrase:
                    self._key_id = ""
                listing = keys_mod.list_keys(self._ring)
        return KeyList(listing.keys, listing.damaged, self._key_id)

    def remove_key(self, key_id: str) -> None:
        """Delete key ``key_id``.  Refused: the last usable key (:class:`LastKey`), the key
        this store's passphrase opened (:class:`KeyInUse`), and an unknown id
        (:class:`BadKeyObject`)."""
        current = self.keys().current
        if key_id == current:
            raise KeyInUse(f"key {key_id} is the one {PASSPHRASE_SETTING} opens on this host; "
                           f"set {PASSPHRASE_SETTING} to another key's passphrase first")
        with self._keys_lock:
            keys_mod.remove_key(self._ring, key_id)

    def lease(self, host: Host, volume: str, ttl: float, *, probe: bool = True) -> Lease:
        """The lease of this store's prefix (``lease.py``), seen from ``host``.

        The first call proves the endpoint enforces conditional writes
        (:class:`ConditionalWriteUnsupported` otherwise): a lease on one that ignores them
        would let two hosts both hold it.  ``probe=False``: only to look at the lease."""
        remote = self._remote
        with self._unlocking:
            if probe and not self._probed:
                remote.bucket.probe_conditional_writes(remote.layout.lease_probe)
                self._probed = True
        return Lease(remote.bucket, remote.layout, host, volume=volume, ttl=ttl)

    @property
    def requests(self) -> int:
        """Requests sent so far, retries included (for tests and benchmarks)."""
        return self._remote.bucket.requests

    def check(self) -> None:
        """Prove that the endpoint answers, the credentials work and the bucket exists.

        Raises EndpointUnreachable, AccessDenied or BucketMissing; sends one HEAD request.
        """
        self._remote.bucket.check()

    def push(self, view: TreeView, progress: Progress | None = None,
             fence: Fence | None = None) -> RemoteSnapshot:
        """Upload what changed and write a new snapshot; return it.

        If nothing changed since the newest snapshot (same content and metadata), nothing is
        written and that snapshot is returned, so no-op pushes do not crowd real history out
        of ``prune``.  ``progress(done, total)`` gets bytes of file content processed.  An
        interrupted push leaves every existing snapshot intact; the new one does not exist.
        ``fence``: the volume's lease (see :class:`s3sync.push.Fence`).
        """
        remote = self._open(push=True)
        with self._lock, ThreadPoolExecutor(self._workers, "s3-push",
                                            initializer=lower_priority) as pool:
            return push_mod.push(remote, view, progress, pool, fence)

    def diverged(self) -> builtins.list[RemoteSnapshot]:
        """Snapshots kept aside (pushed by a host that had lost the lease), oldest first."""
        remote = self._open()
        return [m.snapshot for m in remote.diverged()]

    def list(self) -> builtins.list[RemoteSnapshot]:
        """Every valid snapshot in the store, oldest first (by recorded time)."""
        return [m.snapshot for m in self.catalog().manifests]

    def catalog(self) -> Catalog:
        """Valid snapshots, oldest first, and the objects skipped as invalid (for warnings)."""
        return self._open().catalog()

    @property
    def warnings(self) -> builtins.list[str]:
        """Objects under ``snapshots/`` the last listing (of any operation) skipped as invalid
        snapshots, as "key: why"."""
        return list(self._remote.skipped)

    def resolve(self, snapshot_id: str) -> str:
        """``latest`` to the newest valid snapshot's id (by recorded time, not key order);
        any other id checked to be a valid snapshot."""
        catalog = self.catalog()
        ids = [m.snapshot.id for m in catalog.manifests]
        if snapshot_id == "latest" and ids:
            return ids[-1]
        if snapshot_id in ids:
            return snapshot_id
        if snapshot_id in catalog.refused:
            raise catalog.refused[snapshot_id]
        hint = (f"the newest is {ids[-1]!r} ({len(ids)} in all)" if ids
                else "there are none yet: push first")
        raise SnapshotNotFound(f"no snapshot {snapshot_id!r} in {self._remote.where}; {hint}")

    def restore(self, snapshot_id: str, dst: Path, progress: Progress | None = None,
                local: TreeView | None = None) -> Local | None:
        """Rebuild snapshot ``snapshot_id`` (or ``latest``) in the existing, empty ``dst``.

        Every blob is checked against its hash; a missing or corrupt object raises
        :class:`CorruptObject` and ``dst`` is left empty.  ``local``: this host's current
        copy of the volume; the blobs it still holds unchanged since this store's last push
        or restore here are read from it, not downloaded (returned, with how many bytes).
        """
        remote = self._open()
        try:
            manifest = remote.manifest(self.resolve(snapshot_id))
        except SnapshotNotFound as missing:
            if snapshot_id == "latest" or not SNAPSHOT_ID.fullmatch(snapshot_id):
                raise
            try:  # a diverged snapshot: restorable by its id, never as latest
                manifest = remote.diverged_manifest(snapshot_id)
            except SnapshotNotFound:
                raise SnapshotNotFound(f"{missing} (nor is it a diverged snapshot)") from None
        here = None if local is None else restore_mod.Local(local, remote.cache.load().files)
        with ThreadPoolExecutor(self._workers, "s3-restore", initializer=lower_priority) as pool:
            restore_mod.restore(remote, manifest, dst, progress, pool, here)
        return here

    def verify(self, read_data: bool = False) -> CheckReport:
        """Check that every snapshot is restorable (see ``check.py``); never changes the store.

        With ``read_data`` every blob is downloaded and hashed, and the bad ones are
        remembered, so the next push uploads their content again instead of deduplicating
        against them.
        """
        with ThreadPoolExecutor(self._workers, "s3-check", initializer=lower_priority) as pool:
            report = check_mod.check(self._open(), read_data, pool)
        if read_data:
            self._remote.cache.keep_bad(report.bad)
        return report

    def prune(self, keep: int) -> PruneReport:
        """Keep the newest ``keep`` snapshots; delete the rest and data only they used."""
        remote = self._open()
        with self._lock:
            return prune_mod.prune(remote, keep)

    def delete_all(self) -> int:
        """Delete this store's snapshots, packs, lock markers, key objects and config and the
        local cache; returns objects deleted.

        Only keys this layout writes are listed and deleted (``<prefix>/snapshots/<id>``,
        ``<prefix>/data/<pack>``, ``<prefix>/locks/<name>``, ``<prefix>/keys/<id>``,
        ``<prefix>/config``), never
        "everything under the prefix": another volume's prefix ``<prefix>/db`` lies under it and
        stays intact.
        """
        remote = self._remote
        layout, bucket = remote.layout, remote.bucket
        with self._lock:
            keys = [o.key for o in bucket.list(layout.snapshots)
                    if SNAPSHOT_ID.fullmatch(Layout.tail(o.key, layout.snapshots))]
            keys += [o.key for o in bucket.list(layout.data) if layout.own_pack(o.key)]
            keys += [o.key for o in bucket.list(layout.locks) if layout.own_lock(o.key)]
            # Key objects too: with the data gone they unlock nothing.
            keys += [o.key for o in bucket.list(layout.keys) if layout.own_key(o.key)]
            if self._ring.config_object() is not None:
                keys.append(layout.config)
            if keys:
                bucket.delete(keys)
            remote.cache.clear()
            return len(keys)
