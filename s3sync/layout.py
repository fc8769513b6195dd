"""Object keys under a store's prefix.

    <prefix>/snapshots/<id>     manifest of one snapshot (zstd JSON), written last by a push
    <prefix>/data/<pack-hash>   pack: blobs back to back, named by the BLAKE3 of its bytes
    <prefix>/locks/<kind>-<uuid> empty marker of a running push or prune
    <prefix>/keys/<key-id>      the master key wrapped under one passphrase (``keys.py``);
                                present only in an encrypted store, and then always
    <prefix>/config             sealed (kind ``config``) under the master key: which of the
                                key objects are this store's (``keyring.py``); written once,
                                by the first push, with If-None-Match
    <prefix>/diverged/<id>      manifest of a snapshot pushed by a host that had lost the
                                volume's lease: kept aside, never the latest (fencing)
    <prefix>/lease              which host may have the volume mounted (``lease.py``)
    <prefix>/lease-probe        scratch object proving the store enforces conditional writes

Every listing is of one of these four folders (``<prefix>/snapshots/`` ...), never of a bare
prefix: a volume with prefix ``team`` must never see, let alone delete, the objects of one
with prefix ``team/db`` (``team/db/...``), nor those of ``team/data/x`` (whose keys start with
``team/data/``).  So listings also keep only keys whose tail is a name this layout writes
(:meth:`Layout.own_pack`, :meth:`Layout.own_lock`, :meth:`Layout.own_key`; snapshot ids are
checked by the manifest module).
"""

from __future__ import annotations

import re

PACK_ID = re.compile(r"[0-9a-f]{64}")
KEY_ID = re.compile(r"[0-9a-f]{32}")


class Layout:
    def __init__(self, prefix: str) -> None:
        prefix = prefix.strip("/")
        self.root = f"{prefix}/" if prefix else ""
        self.snapshots = f"{self.root}snapshots/"
        self.data = f"{self.root}data/"
        self.locks = f"{self.root}locks/"
        self.keys = f"{self.root}keys/"
        self.config = f"{self.root}config"
        self.diverged = f"{self.root}diverged/"
        self.lease = f"{self.root}lease"
        self.lease_probe = f"{self.root}lease-probe"

    def snapshot(self, snapshot_id: str, diverged: bool = False) -> str:
        return (self.diverged if diverged else self.snapshots) + snapshot_id

    def pack(self, pack_id: str) -> str:
        return self.data + pack_id

    def lock(self, name: str) -> str:
        return self.locks + name

    def key(self, key_id: str) -> str:
        return self.keys + key_id

    def own_key(self, key: str) -> bool:
        return key.startswith(self.keys) and KEY_ID.fullmatch(key[len(self.keys):]) is not None

    def own_pack(self, key: str) -> bool:
        return key.startswith(self.data) and PACK_ID.fullmatch(key[len(self.data):]) is not None

    def own_lock(self, key: str) -> bool:
        return key.startswith(self.locks) and "/" not in key[len(self.locks):]

    @staticmethod
    def tail(key: str, folder: str) -> str:
        """The part of ``key`` after ``folder`` (which it must start with)."""
        return key[len(folder):]
