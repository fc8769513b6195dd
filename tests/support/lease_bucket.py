"""A fake bucket with S3's conditional PUT semantics and a clock of its own, for the lease
tests (``tests/unit/test_lease.py``, ``tests/unit/test_sync_leases.py``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from s3sync.client import ObjectTooBig, Versioned
from s3sync.errors import TransientFailure

EPOCH = datetime(2031, 5, 1, 12, 0, 0, tzinfo=UTC)
"""The store's clock: years away from this host's, which must never matter."""


class FakeBucket:
    """Objects with S3's conditional PUT semantics, LastModified in whole seconds, a clock."""

    where = "s3://fake at test"

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str, datetime]] = {}
        self.now = EPOCH
        self.writes = 0
        self.before_put: Callable[[], object] | None = None
        self.lose_reply = False
        """The next write lands but its reply is lost; the retry answers 412."""
        self.fail_after_write = False
        """The next write lands, then the request fails as if the network dropped."""

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def get_with_etag(self, key: str, limit: int = 1 << 16) -> Versioned | None:
        found = self.objects.get(key)
        if found is None:
            return None
        data, etag, modified = found
        if len(data) > limit:
            raise ObjectTooBig(f"object {key} is over {limit} bytes", etag)
        return Versioned(data, etag, modified, self.now.replace(microsecond=0))

    def put_new(self, key: str, body: bytes) -> str | None:
        return self._put(key, body, None)

    def put_if_match(self, key: str, body: bytes, etag: str) -> str | None:
        return self._put(key, body, etag)

    def server_time(self) -> datetime:
        return self.now.replace(microsecond=0)

    def put(self, key: str, body: bytes) -> None:
        """An unconditional write (a forger, or a test setting the scene)."""
        self.objects[key] = (body, f'"{hashlib.md5(body).hexdigest()}"',  # noqa: S324
                             self.now.replace(microsecond=0))

    def _put(self, key: str, body: bytes, etag: str | None) -> str | None:
        if self.before_put is not None:
            hook, self.before_put = self.before_put, None
            hook()
        current = self.objects.get(key)
        if etag is None and current is not None:
            return None
        if etag is not None and (current is None or current[1] != etag):
            return None
        self.put(key, body)
        self.writes += 1
        if self.lose_reply:
            self.lose_reply = False
            return None
        if self.fail_after_write:
            self.fail_after_write = False
            raise TransientFailure("the store kept dropping connections")
        return self.objects[key][1]
