"""Client-side encryption: the master key, sealed objects and keyed content ids.

Push, restore, check and prune reach it through :class:`s3sync.sealing.Codec`, which a
:class:`~s3sync.store.RemoteStore` given a passphrase builds once it has unlocked the master
key.  Key objects (the master key wrapped under each passphrase) live in :mod:`s3sync.keys`,
stored under ``<prefix>/keys/`` (:mod:`s3sync.layout`).

How it works
------------
* **Master key**: two independent random 256-bit keys, one to encrypt (``enc_key``) and one to
  name content (``id_key``).  Two keys, not one, because each primitive gets its own key (an
  AES key never doubles as a BLAKE3 key), and because the id key's outputs are public (they
  appear in object names and manifests) while the encryption key's are not.  Borg keeps a
  separate random ``id_key`` the same way; Kopia derives both from one secret with HKDF.
* **Keyed content ids**: ``BLAKE3(data, key=id_key)``.  Equal files in two buckets get
  different names, and nobody without the key can test whether a bucket holds a given file.
  restic names blobs by an unkeyed SHA-256 (hidden only because its indexes are encrypted);
  pyvol follows Borg and Kopia (HMAC ids) here.
* **Sealing an object** (:func:`seal`): a random 256-bit salt per object; BLAKE3's key
  derivation mode (``derive_key``, with a context string of its own) over the encryption key
  and that salt gives the object its own AES-256-GCM key (and the header's checks and mask,
  below).  BLAKE3 ``derive_key`` rather than HKDF-SHA256 because a tree of small files seals
  every blob as its own object: it costs about 1.6 us per object here, against 31 us for
  ``cryptography``'s HKDF (which ran in every blob's seal and unseal, half of encryption's
  cost on a 10,000-file restore).  The plaintext is cut in :data:`SEGMENT` (1 MiB) segments, each
  sealed with nonce = segment number (11 bytes, big-endian) + a final flag (1 byte): the
  STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizar (2015), as Tink's
  AES-GCM-HKDF streaming AEAD and age use it.  Every segment's associated data is the header
  (salt, checks, format version, kind) followed by the object's name, so an object cannot be
  moved to another name or kind, segments cannot be reordered, and a cut at a segment
  boundary is caught by the missing final flag.
* **Why derived keys rather than random nonces**: random 96-bit nonces under one key are
  limited to about 2^32 objects (NIST SP 800-38D) before a collision -- which would leak the
  XOR of two plaintexts and GCM's authentication key -- becomes a real risk, and a bucket
  storing every blob as its own object could approach that over years.  With a key per object
  two objects share a key only if two 256-bit salts collide (about 2^-177 after 2^40
  objects); within an object, nonces are a counter.  No state (like Borg 1's nonce
  reservation file) is kept, so any number of hosts can write one bucket.  Borg 2 does much
  the same per session instead of per object, and also puts the chunk id in the AAD.
* **Why AES-256-GCM**: hardware AES and carry-less multiply make it the fastest AEAD in
  ``cryptography`` on the hosts pyvol targets (about 7 GB/s against 2.4 GB/s for
  ChaCha20-Poly1305 on the 2-core development host); ChaCha20-Poly1305 would win only on
  CPUs without AES-NI.  Sealing costs far less than zstd (``bench/crypto_micro.py``).
* **Diagnosable refusals**: the header carries two 64-bit checks, one of the key and salt
  alone and one of the kind and name, so a refusal can say "sealed under another key" or
  "stored under another name" rather than only "failed".  They are diagnostics only:
  security rests on the GCM tags, whose AAD covers the header and the name.  (AES-GCM is not
  key-committing; the key check also makes an object sealed under another master key fail
  before any segment is decrypted.)
* **Nothing in a sealed object is constant**: no magic, and the version and kind bytes are
  masked with two bytes derived from the key and salt.  Sealed blobs sit back to back in
  packs; a constant prefix would show at rest where each blob starts, and FastCDC's cut
  points are not keyed, so the run of blob lengths would let anyone test whether a bucket
  holds a known file -- exactly what keyed ids are meant to prevent.  (restic likewise keeps
  blob boundaries inside its encrypted pack header.)  The key check doubles as the magic:
  unencrypted data, or another store's, fails it.
* **Compression happens before encryption** (the caller passes :mod:`s3sync.blobs` output);
  ciphertext does not compress.

Format, version 1 (:data:`HEADER` = 50 bytes, then segments)::

    salt (32) | key check (8) | version ^ mask[0] | kind ^ mask[1] | name check (8)
    segment 0 ciphertext | tag (16) | segment 1 ... | final segment | tag (16)

    okm = BLAKE3-derive_key(context=CONTEXT, material=enc_key + salt), first 74 bytes
          (CONTEXT = "pyvol 2026-12-02 sealed object keys v1")
    key check = okm[0:8], mask = okm[8:10]  -- kept by every version, to read the version
    AES key = okm[10:42], name-check key = okm[42:74]         -- version 1
    name check = BLAKE3(kind byte + name, key=name-check key)[:8]

Overhead per object: 50 + 16 per started MiB (66 bytes for a blob under 1 MiB; restic spends 32
per blob plus its entry in the pack header).  Each object is sealed whole in memory -- blobs
are at most 2 MiB and packs tens of MiB, which pyvol already holds in memory to upload -- but
the segments let a later reader authenticate a stream piece by piece.  Blobs inside a pack
should be sealed one by one (kind ``blob``, named by their content id) so that restore's ranged
GETs still fetch single blobs.

Names bound into an object are relative to the store (``snapshots/<id>``, not
``<prefix>/snapshots/<id>``), so a whole store can be copied to another bucket or prefix.
Not hidden: each object's size; and from whoever serves or watches the bucket's traffic,
which byte ranges of a pack a restore reads (restic has the same leak).  Not detected:
rolling an object back to an older version sealed under the same name (restic and Borg have
the same limit); names that are never reused make this harmless.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Final, Literal, get_args

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from s3sync.errors import TamperedObject

Kind = Literal["blob", "manifest", "index", "config", "lock"]
Cause = Literal["truncated", "appended", "modified", "wrong key", "wrong name", "wrong kind",
                "unknown format"]

KEY_BYTES: Final = 32
VERSION: Final = 1
SALT: Final = 32
CHECK: Final = 8
TAG: Final = 16
HEADER: Final = SALT + CHECK + 2 + CHECK
SEGMENT: Final = 1 << 20
_KINDS: Final[dict[str, int]] = {kind: code for code, kind in enumerate(get_args(Kind), 1)}
_CONTEXT: Final = "pyvol 2026-12-02 sealed object keys v1"
"""BLAKE3 ``derive_key`` context of object keys: globally unique, hard-coded, as BLAKE3 asks."""
_AT_KEY_CHECK: Final = SALT
_AT_VERSION: Final = SALT + CHECK
_AT_NAME_CHECK: Final = _AT_VERSION + 2

Buffer = bytes | bytearray | memoryview
_Refuse = Callable[[Cause, str], TamperedObject]


class Master:
    """The store's two secret keys.  Never printed: ``repr`` and ``str`` show no key bytes."""

    __slots__ = ("_enc", "_id")

    def __init__(self, enc_key: bytes, id_key: bytes) -> None:
        if len(enc_key) != KEY_BYTES or len(id_key) != KEY_BYTES:
            raise ValueError(f"a master key is two keys of {KEY_BYTES} bytes")
        self._enc = bytes(enc_key)
        self._id = bytes(id_key)

    @property
    def enc_key(self) -> bytes:
        return self._enc

    @property
    def id_key(self) -> bytes:
        return self._id

    def material(self) -> bytes:
        """The 64 bytes that :mod:`s3sync.keys` wraps."""
        return self._enc + self._id

    @classmethod
    def from_material(cls, material: bytes) -> Master:
        if len(material) != 2 * KEY_BYTES:
            raise ValueError(f"master key material is {2 * KEY_BYTES} bytes")
        return cls(material[:KEY_BYTES], material[KEY_BYTES:])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Master):
            return NotImplemented
        return hmac.compare_digest(self.material(), other.material())

    def __repr__(self) -> str:
        return "Master(<secret>)"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a master key is not pickled (it would leave the process in clear)")


def overhead(size: int) -> int:
    """Bytes :func:`seal` adds to a plaintext of ``size`` bytes."""
    return HEADER + max(1, -(-size // SEGMENT)) * TAG


def new_master() -> Master:
    """A fresh master key for a new store: 64 bytes from the OS's CSPRNG."""
    return Master(os.urandom(KEY_BYTES), os.urandom(KEY_BYTES))


def content_id(master: Master, data: Buffer) -> str:
    """The keyed BLAKE3 (256 bits, hex) of ``data``: a content's name in an encrypted store."""
    return blake3.blake3(data, key=master.id_key).hexdigest()


class _ObjectKey:
    """What the salt derives: the key check, the version/kind mask, the object's AES key, and
    the key of its name check (see the format above)."""

    __slots__ = ("_name_key", "aead", "key_check", "mask")

    def __init__(self, master: Master, salt: bytes) -> None:
        okm = _object_okm(master.enc_key, salt)
        self.key_check = okm[:CHECK]
        self.mask = okm[CHECK:CHECK + 2]
        self.aead = AESGCM(okm[CHECK + 2:CHECK + 2 + KEY_BYTES])
        self._name_key = okm[CHECK + 2 + KEY_BYTES:]

    def name_check(self, code: int, name: bytes) -> bytes:
        return blake3.blake3(bytes([code]) + name, key=self._name_key).digest(CHECK)

    def header(self, salt: bytes, code: int, name: bytes) -> bytes:
        masked = bytes([VERSION ^ self.mask[0], code ^ self.mask[1]])
        return salt + self.key_check + masked + self.name_check(code, name)


_OKM: Final = CHECK + 2 + 2 * KEY_BYTES


def _object_okm(enc_key: bytes, salt: bytes) -> bytes:
    """The object's key material: BLAKE3 in its key derivation mode (see the format above)."""
    return blake3.blake3(enc_key + salt, derive_key_context=_CONTEXT).digest(_OKM)


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _code(kind: str) -> int:
    try:
        return _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown object kind {kind!r}; kinds: {', '.join(_KINDS)}") from None


def seal(master: Master, kind: Kind, name: str, plaintext: Buffer) -> bytearray:
    """Encrypt and authenticate ``plaintext`` as the object ``name`` of kind ``kind``.

    Never fails for valid arguments; every call uses a fresh random salt, so sealing the same
    plaintext twice gives different bytes.  Returns a new buffer the caller owns (a
    ``bytearray``, not ``bytes``: converting would copy the whole object once more).
    """
    code = _code(kind)
    raw_name = name.encode()
    salt = os.urandom(SALT)
    key = _ObjectKey(master, salt)
    header = key.header(salt, code, raw_name)
    aad = header + raw_name
    size = len(plaintext)
    count = max(1, -(-size // SEGMENT))
    out = bytearray(HEADER + size + count * TAG)
    out[:HEADER] = header
    src, dst = memoryview(plaintext), memoryview(out)
    pos = HEADER
    for i in range(count):
        piece = src[i * SEGMENT:(i + 1) * SEGMENT]
        end = pos + len(piece) + TAG
        key.aead.encrypt_into(_nonce(i, i == count - 1), piece, aad, dst[pos:end])
        pos = end
    return out


def unseal(master: Master, kind: Kind, name: str, sealed: Buffer) -> bytearray:
    """The plaintext of the object ``name``, or :class:`TamperedObject` naming it and the cause.

    Refused: anything not sealed by :func:`seal` under this master key as this kind and name,
    or changed since in any byte -- including cut short or lengthened.  Nothing is returned
    unless every segment authenticates.  Returns a new ``bytearray`` (see :func:`seal`).
    """
    code = _code(kind)
    raw_name = name.encode()
    view = memoryview(sealed)

    def refuse(cause: Cause, detail: str) -> TamperedObject:
        return TamperedObject(f"{kind} object {name!r} refused ({cause}): {detail}", name, cause)

    if len(view) < HEADER + TAG:
        raise refuse("truncated", f"{len(view)} bytes, fewer than any sealed object has "
                                  f"({HEADER + TAG})")
    header = bytes(view[:HEADER])
    salt = header[:SALT]
    key = _ObjectKey(master, salt)
    if not hmac.compare_digest(header[_AT_KEY_CHECK:_AT_VERSION], key.key_check):
        raise refuse("wrong key", "not sealed under this store's key: another store's object, "
                                  "unencrypted data, or its first bytes were changed")
    version = header[_AT_VERSION] ^ key.mask[0]
    if version != VERSION:
        raise refuse("unknown format", f"format version {version}; this pyvol reads "
                                       f"version {VERSION} (upgrade pyvol)")
    found = header[_AT_VERSION + 1] ^ key.mask[1]
    if found != code:
        kind_found = next((k for k, c in _KINDS.items() if c == found), f"unknown ({found})")
        raise refuse("wrong kind", f"its kind is {kind_found!r}: swapped or replayed")
    if not hmac.compare_digest(header[_AT_NAME_CHECK:], key.name_check(code, raw_name)):
        raise refuse("wrong name", "sealed under another name: swapped or replayed")

    aad = header + raw_name
    body = view[HEADER:]
    stride = SEGMENT + TAG
    count = max(1, -(-len(body) // stride))
    last = len(body) - (count - 1) * stride
    if last < TAG:
        raise refuse("truncated", f"its last segment is {last} bytes, shorter than a tag; "
                                  "cut short or lengthened")
    out = bytearray(len(body) - count * TAG)
    dst = memoryview(out)
    for i in range(count):
        piece = body[i * stride:(i + 1) * stride]
        final = i == count - 1
        start = i * SEGMENT
        try:
            key.aead.decrypt_into(_nonce(i, final), piece, aad, dst[start:start + len(piece) - TAG])
        except InvalidTag:
            raise _diagnose(key.aead, i, count, piece, aad, refuse) from None
    return out


def _diagnose(aead: AESGCM, i: int, count: int, piece: memoryview, aad: bytes,
              refuse: _Refuse) -> TamperedObject:
    """Why segment ``i`` failed: a valid segment with the other final flag means the object
    was cut at a segment boundary (truncated) or had bytes added after its end (appended)."""
    final = i == count - 1
    try:
        aead.decrypt(_nonce(i, not final), piece, aad)
    except InvalidTag:
        return refuse("modified", f"segment {i + 1} of {count} fails authentication (bytes "
                                  "changed, added or cut inside it)")
    if final:
        return refuse("truncated", f"it ends after segment {i + 1}, which is not its last")
    return refuse("appended", f"bytes follow its final segment ({i + 1} of {count})")
