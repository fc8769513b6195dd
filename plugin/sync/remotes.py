"""The S3 side of the sync: one :class:`~s3sync.RemoteStore` per (bucket, prefix), and
how far each volume's running transfer with it is.

boto3 is imported only through ``s3sync``, and only when a volume first uses S3.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from backends.fs import make_private

if TYPE_CHECKING:
    from s3sync import RemoteStore, S3Config

Direction = Literal["syncing", "restoring"]


class Remotes:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self._config: S3Config | None = None
        self._stores: dict[tuple[str, str, bool], RemoteStore] = {}
        self._guard = threading.Lock()
        make_private(root / "s3cache")

    def get(self, bucket: str, prefix: str, encrypt: bool) -> RemoteStore:
        """The store of ``s3://bucket/prefix``, with its local cache; made on first use.

        ``encrypt`` (the volume's ``s3_encrypt``) hands it ``S3_PASSPHRASE``; refused if that
        is not set, so an encrypted volume never pushes in the clear.  Without it the store is
        plain, and refuses a prefix that holds key objects.
        """
        from s3sync import RemoteStore, S3Config, S3SyncError

        with self._guard:
            if self._config is None:
                self._config = S3Config.from_env(self.env)
            key = (bucket, prefix, encrypt)
            if key not in self._stores:
                passphrase = self.env.get("S3_PASSPHRASE") if encrypt else None
                if encrypt and not passphrase:
                    raise S3SyncError(
                        f"s3://{bucket}/{prefix} belongs to a volume created with "
                        "-o s3_encrypt=true, and S3_PASSPHRASE is not set: set it with "
                        "`docker plugin set pyvol S3_PASSPHRASE=...`")
                digest = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:32]
                cache = self.root / "s3cache" / digest
                cache.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._stores[key] = RemoteStore(self._config, bucket, prefix, cache,
                                                passphrase=passphrase)
            return self._stores[key]

    def cached(self, where: tuple[str, str]) -> RemoteStore | None:
        """The store of (bucket, prefix) if one was made (Status never makes one)."""
        return self._stores.get((*where, True)) or self._stores.get((*where, False))


class Transfers:
    """Per volume, the running upload or restore: (direction, bytes done, bytes total)."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[Direction, int, int]] = {}

    def start(self, volume: str, direction: Direction, total: int = 0) -> None:
        self._running[volume] = (direction, 0, total)

    def reporter(self, volume: str, direction: Direction) -> Callable[[int, int], None]:
        """The progress callback the remote store calls with (done, total)."""
        def progress(done: int, total: int) -> None:
            self._running[volume] = (direction, done, total)
        return progress

    def end(self, volume: str) -> None:
        self._running.pop(volume, None)

    def get(self, volume: str) -> tuple[Direction, int, int] | None:
        return self._running.get(volume)

    def percent(self, volume: str) -> int | None:
        progress = self._running.get(volume)
        if progress is None:
            return None
        _, done, total = progress
        return 100 * done // total if total else 0
