"""Key stores in memory, for tests of :mod:`s3sync.keys` and :mod:`s3sync.keyring`."""

from __future__ import annotations


class DictKeys:
    """A :class:`s3sync.keys.KeyStore` in memory: key objects by id."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def key_objects(self) -> dict[str, bytes]:
        return dict(self.objects)

    def put_key_object(self, key_id: str, blob: bytes) -> None:
        self.objects[key_id] = blob

    def delete_key_object(self, key_id: str) -> None:
        del self.objects[key_id]
