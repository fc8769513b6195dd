"""Object keys under a store's prefix.

    <prefix>/snapshots/<id>     manifest of one snapshot (zstd JSON), written last by a push
    <prefix>/data/<pack-hash>   pack: blobs back to back, named by the BLAKE3 of its bytes
    <prefix>/locks/<kind>-<uuid> empty marker of a running push or prune
"""

from __future__ import annotations


class Layout:
    def __init__(self, prefix: str) -> None:
        prefix = prefix.strip("/")
        self.root = f"{prefix}/" if prefix else ""
        self.snapshots = f"{self.root}snapshots/"
        self.data = f"{self.root}data/"
        self.locks = f"{self.root}locks/"

    def snapshot(self, snapshot_id: str) -> str:
        return self.snapshots + snapshot_id

    def pack(self, pack_id: str) -> str:
        return self.data + pack_id

    def lock(self, name: str) -> str:
        return self.locks + name

    @staticmethod
    def tail(key: str, folder: str) -> str:
        """The part of ``key`` after ``folder`` (which it must start with)."""
        return key[len(folder):]
