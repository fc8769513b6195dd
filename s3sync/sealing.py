"""How a store names and stores its objects: plain, or sealed under its master key.

:class:`Codec` is the one place push, restore, check and prune turn content into stored bytes
and back.  A plain codec (no master) is exactly the format pyvol always wrote: blobs named by
unkeyed BLAKE3, zstd when it pays, manifests as zstd JSON.  An encrypted codec
(:mod:`s3sync.crypto`) names content by keyed BLAKE3, compresses first, then seals each blob
on its own (kind ``blob``, name = its content id) so a pack's blobs stay single ranged GETs,
and seals each manifest under its store-relative name (``snapshots/<id>``).  After unsealing,
a blob's keyed id is computed again and compared, so a blob sealed under its own name but
with other content (impossible without the key) would still be caught.

Which codec a store uses is decided once per store by :mod:`s3sync.store` from its ``keys/``
folder; a prefix is either encrypted or plain, never both.
"""

from __future__ import annotations

import hmac

from s3sync import blobs, crypto
from s3sync.crypto import Master
from s3sync.errors import CorruptObject, TamperedObject
from s3sync.manifest import MANIFEST_MAX, Manifest, decode_manifest, encode_manifest

PLAIN_IN_ENCRYPTED = "an unencrypted snapshot in an encrypted prefix is refused"


class Codec:
    """Plain when ``master`` is None, else sealed under it.  Never shows the key."""

    __slots__ = ("_master",)

    def __init__(self, master: Master | None = None) -> None:
        self._master = master

    def __repr__(self) -> str:
        return f"Codec({'encrypted' if self._master else 'plain'})"

    @property
    def encrypted(self) -> bool:
        return self._master is not None

    def content_id(self, data: blobs.Buffer) -> str:
        if self._master is None:
            return blobs.digest(data)
        return crypto.content_id(self._master, data)

    def store_blob(self, digest: str, plain: blobs.Buffer) -> blobs.Buffer:
        """What a pack holds for the blob ``plain`` named ``digest``."""
        return self.seal_packed(digest, blobs.pack_form(plain))

    def seal_packed(self, digest: str, packed: blobs.Buffer) -> blobs.Buffer:
        """What a pack holds for the blob named ``digest`` whose pack form
        (:func:`s3sync.blobs.pack_form`) is ``packed``."""
        if self._master is None:
            return packed
        return crypto.seal(self._master, "blob", digest, packed)

    def open_blob(self, stored: blobs.Buffer, size: int, digest: str) -> bytes | bytearray:
        """Plain content of a stored blob (a new buffer, not a view of ``stored``).

        ``ValueError`` if it does not match ``digest``; :class:`TamperedObject` if sealed and
        it does not authenticate as blob ``digest`` (the caller names the pack).
        """
        if self._master is None:
            return blobs.unpack(stored, size, digest)
        inner = crypto.unseal(self._master, "blob", digest, stored)
        data = blobs.decompress(inner, size) if len(inner) < size else inner  # no copy
        if len(data) != size or not hmac.compare_digest(self.content_id(data), digest):
            raise ValueError("content does not match its keyed id")
        return data

    def encode_manifest(self, manifest: Manifest) -> bytes:
        """Sealed under its store-relative name: ``snapshots/<id>``, or ``diverged/<id>``
        for a diverged snapshot, so neither can be moved into the other's place."""
        data = encode_manifest(manifest)
        if self._master is None:
            return data
        return bytes(crypto.seal(self._master, "manifest",
                                 _name(manifest.snapshot.id, manifest.snapshot.diverged), data))

    def decode_manifest(self, data: bytes, snapshot_id: str, key: str,
                        diverged: bool = False) -> Manifest:
        """The manifest stored as ``key`` (the snapshot ``snapshot_id``), or
        :class:`CorruptObject` (:class:`TamperedObject` if sealed and refused) naming ``key``."""
        if self._master is None:
            return decode_manifest(data, key)
        if len(data) > MANIFEST_MAX + crypto.overhead(MANIFEST_MAX):
            raise TamperedObject(f"{key}: refused: {len(data)} bytes, more than any sealed "
                                 "manifest has", key, "appended")
        try:
            plain = crypto.unseal(self._master, "manifest", _name(snapshot_id, diverged), data)
        except TamperedObject as exc:
            if exc.cause == "wrong key" and _plain_manifest(data, key):
                raise TamperedObject(f"{key}: refused: {PLAIN_IN_ENCRYPTED} (planted "
                                     "by someone without the key, or written by a pyvol with "
                                     "no passphrase set)", key, "wrong key") from None
            raise TamperedObject(f"{key}: {exc}; restore another snapshot", key,
                                 exc.cause) from None
        return decode_manifest(bytes(plain), key)


def _name(snapshot_id: str, diverged: bool = False) -> str:
    """The store-relative name a manifest is sealed under (``crypto`` docstring)."""
    return f"{'diverged' if diverged else 'snapshots'}/{snapshot_id}"


def _plain_manifest(data: bytes, key: str) -> bool:
    try:
        decode_manifest(data, key)
    except CorruptObject:
        return False
    return True
