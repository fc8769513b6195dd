"""S3 sync engine: off-host, incremental, point-in-time copies of a volume.

boto3 is imported only inside this package (``client.py``).  See ``store.py`` for the API,
``layout.py`` for the objects in the bucket, ``push.py``, ``restore.py`` and ``prune.py`` for
how each operation stays safe.
"""

from __future__ import annotations

from s3sync.check import CheckReport
from s3sync.config import RetryPolicy, S3Config
from s3sync.errors import (
    AccessDenied,
    BadEndpoint,
    BucketMissing,
    CorruptObject,
    EndpointUnreachable,
    S3SyncError,
    SnapshotNotFound,
    StoreBusy,
    TransientFailure,
)
from s3sync.manifest import RemoteSnapshot
from s3sync.prune import PruneReport
from s3sync.store import RemoteStore

__all__ = [
    "AccessDenied",
    "BadEndpoint",
    "BucketMissing",
    "CheckReport",
    "CorruptObject",
    "EndpointUnreachable",
    "PruneReport",
    "RemoteSnapshot",
    "RemoteStore",
    "RetryPolicy",
    "S3Config",
    "S3SyncError",
    "SnapshotNotFound",
    "StoreBusy",
    "TransientFailure",
]
