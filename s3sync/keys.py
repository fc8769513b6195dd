"""Key objects: the store's master key, wrapped under each passphrase.

Like restic's ``keys/`` folder: one small object per passphrase, so adding, listing and
removing passphrases never touches the data, and any one passphrase opens the store.  A key
object is versioned JSON (``id`` is also the object's name, ``keys/<id>`` by convention)::

    {"v": 1, "id": "<32 hex>", "created": "2026-12-02T02:20:00Z",
     "kdf": "argon2id", "memory_kib": 65536, "iterations": 4, "lanes": 4,
     "salt": "<b64, 16 bytes>", "nonce": "<b64, 12 bytes>", "wrapped": "<b64, 64 + 16 bytes>"}

The passphrase (NFC-normalised UTF-8) and the salt go through Argon2id (RFC 9106); the 32-byte
result is an AES-256-GCM key that seals the 64 bytes of :meth:`Master.material` under a random
nonce.  The AAD is every other field of the object, canonically serialised, so the id, creation
time and KDF cost cannot be changed without the unwrap failing.  restic uses scrypt (calibrated
when a repository is created) and Kopia scrypt (N=65536, r=8, p=1); Argon2id is the memory-hard
KDF RFC 9106 recommends, and ``cryptography`` has it from version 44.  The cost,
:data:`DEFAULT_COST` (64 MiB, 4 passes, 4 lanes), takes 0.2-0.45 s on the 2-core development
host (``bench/crypto_micro.py`` measures it); a fixed cost, not one calibrated per host, so a
key made on a fast host still opens in bounded time on a slow one.  It is stored in each
object, so it can be raised later for new keys without breaking old ones; :data:`MAX_COST`
bounds what a forged object can make a host spend.

Not secret, and not authenticated until the object is opened: ``id``, ``created`` and the
cost, which :func:`describe` reads for ``key ls``.  Trying a passphrase costs one KDF run per
key object (:func:`unlock`); there is no passphrase hint, which would leak.

Concurrency: :func:`add_key` writes a new object and never conflicts.  :func:`remove_key` is
read-check-write, so two concurrent removals could each see the other's key and leave none:
:class:`s3sync.store.RemoteStore` serialises them in its process (a lock per store) and, across
hosts, never removes the key its own passphrase opens, so each host's key survives.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from s3sync.crypto import KEY_BYTES, Master
from s3sync.errors import BadKeyObject, LastKey, WrongPassphrase

VERSION: Final = 1
KDF: Final = "argon2id"
SALT: Final = 16
NONCE: Final = 12
KEY_ID_BYTES: Final = 16
MAX_KEYS: Final = 32
"""Most key objects :func:`unlock` tries (each try costs one KDF run)."""
_AAD_PREFIX: Final = b"pyvol key object\x00"
_FIELDS: Final = ("v", "id", "created", "kdf", "memory_kib", "iterations", "lanes", "salt",
                  "nonce", "wrapped")
MAX_BYTES: Final = 4096

Passphrase = str | bytes


@dataclass(frozen=True)
class KdfCost:
    memory_kib: int
    iterations: int
    lanes: int


DEFAULT_COST: Final = KdfCost(memory_kib=64 << 10, iterations=4, lanes=4)
MAX_COST: Final = KdfCost(memory_kib=1 << 20, iterations=16, lanes=16)


@dataclass(frozen=True)
class KeyInfo:
    """What ``key ls`` shows: never a secret."""

    id: str
    created: datetime
    cost: KdfCost


@dataclass(frozen=True)
class KeyListing:
    keys: list[KeyInfo]
    damaged: dict[str, str]
    """Key object id -> why it cannot be read."""


class KeyStore(Protocol):
    """Where key objects live (the bucket's ``keys/`` folder; a dict in tests)."""

    def key_objects(self) -> dict[str, bytes]:
        """Every key object, by id."""
        ...

    def put_key_object(self, key_id: str, blob: bytes) -> None: ...

    def delete_key_object(self, key_id: str) -> None: ...


@dataclass(frozen=True)
class _Parsed:
    info: KeyInfo
    salt: bytes
    nonce: bytes
    wrapped: bytes
    aad: bytes


def _secret(passphrase: Passphrase) -> bytes:
    if isinstance(passphrase, str):
        return unicodedata.normalize("NFC", passphrase).encode()
    return bytes(passphrase)


_KDF_LOCK: Final = threading.Lock()
"""One Argon2id derivation at a time in this process: two at once in two threads never
return (``cryptography`` 50 on OpenSSL; found by the two-host race test), and each already
uses several lanes."""


def _kek(passphrase: Passphrase, salt: bytes, cost: KdfCost) -> AESGCM:
    kdf = Argon2id(salt=salt, length=KEY_BYTES, iterations=cost.iterations, lanes=cost.lanes,
                   memory_cost=cost.memory_kib)
    with _KDF_LOCK:
        return AESGCM(kdf.derive(_secret(passphrase)))


def _aad(fields: Mapping[str, object]) -> bytes:
    header = {k: v for k, v in fields.items() if k != "wrapped"}
    return _AAD_PREFIX + json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _check_cost(cost: KdfCost) -> None:
    if not (1 <= cost.lanes <= MAX_COST.lanes and 1 <= cost.iterations <= MAX_COST.iterations
            and 8 * cost.lanes <= cost.memory_kib <= MAX_COST.memory_kib):
        raise ValueError(f"KDF cost {cost} is outside 1..{MAX_COST.iterations} passes, "
                         f"1..{MAX_COST.lanes} lanes, 8 KiB per lane..{MAX_COST.memory_kib} KiB")


def wrap(master: Master, passphrase: Passphrase, *, cost: KdfCost = DEFAULT_COST,
         now: datetime | None = None) -> tuple[str, bytes]:
    """A new key object for ``master`` under ``passphrase``: ``(key id, object bytes)``.

    The id is random, so two wraps of one master under one passphrase are two keys.
    """
    _check_cost(cost)
    if not _secret(passphrase):
        raise ValueError("the passphrase is empty")
    key_id = os.urandom(KEY_ID_BYTES).hex()
    created = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    salt, nonce = os.urandom(SALT), os.urandom(NONCE)
    fields: dict[str, object] = {
        "v": VERSION, "id": key_id, "created": created, "kdf": KDF,
        "memory_kib": cost.memory_kib, "iterations": cost.iterations, "lanes": cost.lanes,
        "salt": _b64(salt), "nonce": _b64(nonce),
    }
    wrapped = _kek(passphrase, salt, cost).encrypt(nonce, master.material(), _aad(fields))
    fields["wrapped"] = _b64(wrapped)
    return key_id, json.dumps(fields, indent=1).encode() + b"\n"


def _parse(blob: bytes, key_id: str) -> _Parsed:
    """The fields of key object ``key_id``, or :class:`BadKeyObject` saying what is wrong."""

    def bad(why: str) -> BadKeyObject:
        return BadKeyObject(f"key object {key_id} is unusable: {why}")

    if len(blob) > MAX_BYTES:
        raise bad(f"{len(blob)} bytes, more than a key object has ({MAX_BYTES})")
    try:
        fields = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON (truncated or overwritten?)") from None
    if not isinstance(fields, dict):
        raise bad("not a JSON object")
    if type(fields.get("v")) is not int or fields["v"] != VERSION:
        raise bad(f"format version {fields.get('v')!r}; this pyvol reads version {VERSION}")
    if sorted(fields) != sorted(_FIELDS):
        raise bad(f"fields {sorted(fields)}, expected {sorted(_FIELDS)}")
    if fields["kdf"] != KDF:
        raise bad(f"KDF {fields['kdf']!r}; this pyvol knows {KDF!r}")
    if fields["id"] != key_id:
        raise bad(f"it holds key {fields['id']!r}: renamed or replayed")
    ints = [fields[k] for k in ("memory_kib", "iterations", "lanes")]
    if not all(type(v) is int for v in ints):
        raise bad("KDF cost is not three integers")
    cost = KdfCost(*ints)
    try:
        _check_cost(cost)
    except ValueError as exc:
        raise bad(str(exc)) from None
    try:
        created = datetime.strptime(fields["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        salt, nonce, wrapped = (base64.b64decode(fields[k], validate=True)
                                for k in ("salt", "nonce", "wrapped"))
    except (TypeError, ValueError, binascii.Error):
        raise bad("a field is malformed (created, salt, nonce or wrapped)") from None
    if (len(salt), len(nonce), len(wrapped)) != (SALT, NONCE, 2 * KEY_BYTES + 16):
        raise bad("salt, nonce or wrapped key has the wrong length")
    return _Parsed(KeyInfo(key_id, created, cost), salt, nonce, wrapped, _aad(fields))


def describe(blob: bytes, key_id: str) -> KeyInfo:
    """The public part of a key object, read without a passphrase (not yet authenticated)."""
    return _parse(blob, key_id).info


def unwrap(blob: bytes, passphrase: Passphrase, key_id: str) -> Master:
    """The master key in key object ``key_id``.

    Raises :class:`BadKeyObject` if the object is malformed, and :class:`WrongPassphrase` if
    it does not open with ``passphrase`` -- which is also what a modified object looks like.
    """
    parsed = _parse(blob, key_id)
    try:
        material = _kek(passphrase, parsed.salt, parsed.info.cost).decrypt(
            parsed.nonce, parsed.wrapped, parsed.aad)
    except InvalidTag:
        raise WrongPassphrase(f"key {key_id} does not open with this passphrase "
                              "(or the key object was modified)") from None
    return Master.from_material(material)


def unlock(objects: Mapping[str, bytes], passphrase: Passphrase | None,
           where: str, accept: Callable[[Master], bool] | None = None) -> tuple[str, Master]:
    """``(key id, master)`` from the first key object (newest first) that ``passphrase`` opens
    and whose master ``accept`` takes (``keyring.py``: the one that opens the store's config;
    another is a lost creation race's leftover, or planted).

    ``where`` names the store (or volume) in errors.  Raises :class:`WrongPassphrase` if no
    passphrase is given or none opens, and :class:`BadKeyObject` if the store holds no usable
    key object, or more than :data:`MAX_KEYS`.  Damaged key objects are skipped and listed in
    the error if no other key opens.
    """
    if not objects:
        raise BadKeyObject(f"{where} has no key objects: it is not encrypted, or its keys/ "
                           "folder was deleted")
    if len(objects) > MAX_KEYS:
        raise BadKeyObject(f"{where} has {len(objects)} key objects, more than {MAX_KEYS}; "
                           "remove unused keys")
    if not passphrase:
        raise WrongPassphrase(f"{where} is encrypted and no passphrase was given")
    parsed, damaged = [], []
    for key_id, blob in objects.items():
        try:
            parsed.append(_parse(blob, key_id))
        except BadKeyObject as exc:
            damaged.append(str(exc))
    if not parsed:
        raise BadKeyObject(f"{where} has no usable key object: " + "; ".join(damaged))
    parsed.sort(key=lambda p: (p.info.created, p.info.id), reverse=True)
    foreign = []
    for p in parsed:
        try:
            material = _kek(passphrase, p.salt, p.info.cost).decrypt(p.nonce, p.wrapped, p.aad)
        except InvalidTag:
            continue
        master = Master.from_material(material)
        if accept is not None and not accept(master):
            foreign.append(p.info.id)
            continue
        return p.info.id, master
    note = f"; damaged and skipped: {'; '.join(damaged)}" if damaged else ""
    if foreign:
        raise WrongPassphrase(
            f"{where}: the passphrase opens key(s) {', '.join(foreign)}, but they hold another "
            "master key than the store's config (left by a host that lost the race to create "
            f"the store, or planted) and none of its other keys{note}")
    raise WrongPassphrase(f"{where}: the passphrase opens none of its {len(parsed)} keys{note}")


def add_key(store: KeyStore, master: Master, passphrase: Passphrase,
            cost: KdfCost = DEFAULT_COST) -> str:
    """Store a new key object for ``master`` (already unlocked) and return its id."""
    key_id, blob = wrap(master, passphrase, cost=cost)
    store.put_key_object(key_id, blob)
    return key_id


def list_keys(store: KeyStore) -> KeyListing:
    """Every key's id, creation time and cost (oldest first), and the damaged ones apart."""
    keys, damaged = [], {}
    for key_id, blob in store.key_objects().items():
        try:
            keys.append(describe(blob, key_id))
        except BadKeyObject as exc:
            damaged[key_id] = str(exc)
    return KeyListing(sorted(keys, key=lambda k: (k.created, k.id)), damaged)


def remove_key(store: KeyStore, key_id: str) -> None:
    """Delete key object ``key_id``; refused (:class:`LastKey`) if no other usable key would
    remain, and :class:`BadKeyObject` if there is no such key.

    A damaged key object may always be removed, as long as a usable one remains.
    """
    listing = list_keys(store)
    ids = {k.id for k in listing.keys}
    if key_id not in ids and key_id not in listing.damaged:
        raise BadKeyObject(f"no key {key_id}; keys: {', '.join(sorted(ids)) or 'none'}")
    if not ids - {key_id}:
        raise LastKey(f"key {key_id} is the last usable key; add another passphrase first "
                      "(without a key the data can never be read again)")
    store.delete_key_object(key_id)
