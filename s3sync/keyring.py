"""An encrypted store's master key: unlocked, or created by the first push without a race.

Two hosts whose first pushes into one empty prefix overlap must not each create a master key
(each would then write blobs and manifests the other refuses as "wrong key").  The store's
``config`` object (``<prefix>/config``, sealed as kind ``config``, name ``config``, under the
master key) settles it: a creator writes its key object, then ``config`` with
``If-None-Match: *`` (:meth:`s3sync.client.Bucket.put_if_absent`).  Exactly one creator's
write succeeds; the others get 412 Precondition Failed, delete their own key object and unlock
again with the winner's keys (which needs a passphrase that opens one of them).

A master key counts only if it opens ``config``: a key object whose master does not (a lost
race's leftover not yet deleted, or one planted by someone with write access) is skipped.  A
creator that crashed between its key and its ``config`` leaves a key and no ``config``; the
next push that opens the key writes ``config`` for it, conditionally as well, and a creator
that then finds ``config`` written under its own master keeps its key.  Reads never write:
without ``config`` there is no data yet (every push writes it first), so a reader just
unlocks the newest key it can.

``config`` holds versioned JSON (``{"v": 1, "created": "..."}``) so later formats can be
recognised and refused by name.  An endpoint that ignores ``If-None-Match`` is caught when
the creator reads ``config`` back and it is not its own (best effort: only if the other
write landed first); one that rejects the header raises
:class:`~s3sync.errors.ConditionalWriteUnsupported`.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from typing import Final, Protocol

from s3sync import crypto
from s3sync import keys as keys_mod
from s3sync.client import Bucket, ObjectMissing
from s3sync.crypto import Master, new_master
from s3sync.errors import BadKeyObject, ConditionalWriteUnsupported, TamperedObject
from s3sync.keys import Passphrase
from s3sync.layout import Layout

CONFIG_VERSION: Final = 1
CONFIG_NAME: Final = "config"
CONFIG_MAX: Final = 4096
ROUNDS: Final = 4
"""How often an opener reads again after losing a race to write ``config``."""


class Keyring(keys_mod.KeyStore, Protocol):
    """Key objects and the ``config`` object of one store."""

    def config_object(self) -> bytes | None:
        """``config``'s bytes, or None if there is none."""
        ...

    def put_config_if_absent(self, blob: bytes) -> bool:
        """Write ``config`` unless one exists; whether it was written."""
        ...


class BucketKeyring:
    """:class:`Keyring` over a bucket: ``<prefix>/keys/<id>`` and ``<prefix>/config``."""

    def __init__(self, bucket: Bucket, layout: Layout) -> None:
        self.bucket = bucket
        self.layout = layout

    def key_objects(self) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for info in self.bucket.list(self.layout.keys):
            if self.layout.own_key(info.key):
                try:
                    if info.size > keys_mod.MAX_BYTES:  # read only enough to refuse it
                        blob = self.bucket.get(info.key, 0, keys_mod.MAX_BYTES + 1)
                    else:
                        blob = self.bucket.get(info.key)
                    found[Layout.tail(info.key, self.layout.keys)] = blob
                except ObjectMissing:
                    continue  # removed since the listing
        return found

    def put_key_object(self, key_id: str, blob: bytes) -> None:
        self.bucket.put(self.layout.key(key_id), blob)

    def delete_key_object(self, key_id: str) -> None:
        self.bucket.delete([self.layout.key(key_id)])

    def config_object(self) -> bytes | None:
        size = self.bucket.size(self.layout.config)
        if size is None:
            return None
        if size > CONFIG_MAX:
            raise BadKeyObject(
                f"{self.bucket.where}: {self.layout.config} is {size} bytes, more than a config "
                f"has ({CONFIG_MAX}): planted or overwritten; restore it from a copy, or delete "
                "it if this prefix holds no data of yours")
        try:
            return self.bucket.get(self.layout.config)
        except ObjectMissing:
            return None

    def put_config_if_absent(self, blob: bytes) -> bool:
        return self.bucket.put_if_absent(self.layout.config, blob)


def seal_config(master: Master, now: datetime | None = None) -> bytes:
    created = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = json.dumps({"v": CONFIG_VERSION, "created": created}).encode()
    return bytes(crypto.seal(master, "config", CONFIG_NAME, body))


def opens_config(master: Master, blob: bytes, where: str) -> bool:
    """Whether ``blob`` is a ``config`` sealed under ``master``.  Raises
    :class:`BadKeyObject` if it is, but of a format this pyvol does not read."""
    if len(blob) > CONFIG_MAX:
        return False
    try:
        plain = crypto.unseal(master, "config", CONFIG_NAME, blob)
    except TamperedObject:
        return False
    try:
        fields = json.loads(bytes(plain))
        version = fields.get("v") if isinstance(fields, dict) else None
    except ValueError:
        version = None
    if type(version) is not int or version != CONFIG_VERSION:
        raise BadKeyObject(f"{where}: its config has format version {version!r}; this pyvol "
                           f"reads version {CONFIG_VERSION}: upgrade pyvol")
    return True


def encrypted(ring: Keyring) -> bool:
    """Whether the store holds key objects or a ``config`` (it is, or was made, encrypted)."""
    # config first: one small object, where key objects are each downloaded to be listed.
    return ring.config_object() is not None or bool(ring.key_objects())


def unlock(ring: Keyring, passphrase: Passphrase | None, where: str,
           write: bool = False) -> tuple[str, Master]:
    """``(key id, master)`` of the store; see the module docstring.  With ``write`` (a push),
    a missing ``config`` is written for the newest key the passphrase opens.

    Raises what :func:`s3sync.keys.unlock` raises; :class:`WrongPassphrase` also when the
    passphrase opens only keys whose master does not open ``config``.
    """
    for _ in range(ROUNDS):
        objects = ring.key_objects()
        config = ring.config_object()
        if config is not None:
            return keys_mod.unlock(objects, passphrase, where,
                                   accept=functools.partial(opens_config, blob=config,
                                                            where=where))
        key_id, master = keys_mod.unlock(objects, passphrase, where)
        if not write or ring.put_config_if_absent(seal_config(master)):
            return key_id, master
        # Another host wrote config since we looked: read again.
    raise ConditionalWriteUnsupported(
        f"{where}: its config kept changing while it was unlocked ({ROUNDS} rounds); if "
        "nothing else is creating this store, the endpoint does not honour If-None-Match")


def create(ring: Keyring, passphrase: Passphrase, where: str) -> tuple[str, Master]:
    """A new master key with its first key object and ``config``; if another host created
    the store first, its master instead (unlocked with ``passphrase``)."""
    master = new_master()
    key_id = keys_mod.add_key(ring, master, passphrase)
    won = ring.put_config_if_absent(seal_config(master))
    config = ring.config_object()
    if won:
        if config is None or not opens_config(master, config, where):
            raise ConditionalWriteUnsupported(
                f"{where}: the config this host just created with If-None-Match was "
                "replaced at once: the endpoint ignores conditional writes, so two hosts can "
                "create two master keys; use an S3 store that supports them")
        return key_id, master
    if config is not None and opens_config(master, config, where):
        return key_id, master  # an opener wrote config for our key (see the docstring)
    ring.delete_key_object(key_id)
    return unlock(ring, passphrase, where, write=True)
