"""Crafting bucket objects as a hostile bucket writer would: packs, tree parts and manifests
built with pyvol's own formats (so everything but the planted field is valid), and the
helpers to drive the real server's S3 sync against them."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sync_support import SyncServer, s3_status

from s3sync import blobs
from s3sync.manifest import ChunkRef, Manifest, RemoteSnapshot, encode_manifest
from tests.support.waiting import wait_for

Record = dict[str, Any]


class PackBuilder:
    """Blobs back to back, as a push writes them; its name is the BLAKE3 of its bytes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pending: list[list[Any]] = []

    def add(self, plain: bytes, stored: bytes | None = None, size: int | None = None,
            digest: str | None = None) -> list[Any]:
        """A blob reference [hash, pack, offset, length, size]; the pack name is filled in by
        :meth:`upload`."""
        data = stored if stored is not None else bytes(blobs.pack_form(plain))
        ref = [digest or blobs.digest(plain), "", len(self.buf), len(data),
               len(plain) if size is None else size]
        self.buf += data
        self.pending.append(ref)
        return ref

    def upload(self, client: Any, bucket: str, prefix: str) -> str:
        body = bytes(self.buf)
        name = blobs.digest(body)
        client.put_object(Bucket=bucket, Key=f"{prefix}/data/{name}", Body=body)
        for ref in self.pending:
            ref[1] = name
        return name


def forge(client: Any, bucket: str, prefix: str, records: Iterable[Record],
          content: dict[str, bytes] | None = None, *, snapshot_id: str | None = None,
          created: datetime | None = None) -> str:
    """Write a complete snapshot of ``records`` (the root directory added unless given) with
    ``content`` (path -> bytes) as file blobs; returns its id."""
    rows = [dict(r) for r in records]
    if not any(r["path"] == "." for r in rows):
        rows.insert(0, {"path": ".", "kind": "dir", "mode": 0o755})
    data = PackBuilder()
    for row in rows:
        if row["path"] in (content or {}):
            plain = (content or {})[row["path"]]
            row.setdefault("size", len(plain))
            row["c"] = [data.add(plain)] if plain else []
    if data.buf:
        data.upload(client, bucket, prefix)
    part = PackBuilder()
    ref = part.add(json.dumps(rows, separators=(",", ":")).encode())
    part.upload(client, bucket, prefix)
    return put_manifest(client, bucket, prefix, [ref], snapshot_id=snapshot_id, created=created)


def put_manifest(client: Any, bucket: str, prefix: str, tree: list[list[Any]], *,
                 snapshot_id: str | None = None, created: datetime | None = None) -> str:
    when = created or datetime.now(UTC)
    sid = snapshot_id or when.strftime("%Y%m%dT%H%M%S.%fZ")
    snap = RemoteSnapshot(id=sid, created=when, size=0, files=0, uploaded_bytes=0)
    manifest = Manifest(snap, when - timedelta(seconds=1), tuple(ChunkRef(*r) for r in tree))
    client.put_object(Bucket=bucket, Key=f"{prefix}/snapshots/{sid}",
                      Body=encode_manifest(manifest))
    return sid


def restore_outcome(server: SyncServer, name: str, timeout: float = 30) -> dict[str, Any]:
    """Status.s3 once the restore at create has ended (idle, or error with a message)."""
    def ended() -> dict[str, Any] | None:
        s3 = s3_status(server.client, name)
        return s3 if s3["state"] in ("idle", "error") else None
    result: dict[str, Any] = wait_for(ended, timeout, f"the restore of {name} to end")
    return result


def privileged(root: Path) -> list[str]:
    """Everything under ``root`` a bucket writer must never plant: files whose exec would
    change user or group id, device nodes, security/trusted xattrs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                found.append(f"device {path}")
            elif not stat.S_ISDIR(st.st_mode) and (
                    (st.st_mode & stat.S_ISUID and st.st_mode & 0o111)
                    or (st.st_mode & stat.S_ISGID and st.st_mode & stat.S_IXGRP)):
                found.append(f"setuid/setgid {path}")
            if not stat.S_ISLNK(st.st_mode):
                for attr in os.listxattr(path, follow_symlinks=False):
                    if attr.startswith(("security.capability", "trusted.")):
                        found.append(f"xattr {attr} on {path}")
    return found
