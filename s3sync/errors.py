"""Errors of the S3 sync engine.

Every message names the endpoint, bucket and prefix (or the object) involved and says what to
do.  None ever contains a secret: messages are built from our own text and botocore's error
codes, never from request headers or credentials.
"""

from __future__ import annotations

from backends.errors import BackendError


class S3SyncError(BackendError):
    """An S3 sync operation failed; local data was not changed by the failure."""


class EndpointUnreachable(S3SyncError):
    """The S3 endpoint did not answer (refused, timed out, DNS) within the retry budget."""


class BadEndpoint(S3SyncError):
    """S3_ENDPOINT_URL is malformed or carries credentials; the message says what to fix."""


class AccessDenied(S3SyncError):
    """The store refused the credentials (unknown key, bad signature, no permission)."""


class BucketMissing(S3SyncError):
    """The bucket does not exist."""


class CorruptObject(S3SyncError):
    """A stored object is missing, truncated or does not match its content hash."""


class SnapshotNotFound(S3SyncError):
    """No remote snapshot has the requested id."""


class StoreBusy(S3SyncError):
    """Another process holds a conflicting lock on the same bucket and prefix."""


class TransientFailure(S3SyncError):
    """The store kept failing (5xx, throttling, dropped connections) past the retry budget."""


class TamperedObject(CorruptObject):
    """A sealed object failed authentication: forged, modified, truncated, swapped or replayed.

    ``name`` is the object's name and ``cause`` one of :data:`s3sync.crypto.Cause`.
    """

    def __init__(self, message: str, name: str, cause: str) -> None:
        super().__init__(message)
        self.name = name
        self.cause = cause


class WrongPassphrase(S3SyncError):
    """No key object of the store opens with the passphrase given (or none was given)."""


class BadKeyObject(S3SyncError):
    """A key object is malformed, of an unknown version, or was renamed; or none exists."""


class LastKey(S3SyncError):
    """Removing this key would leave the store with no key: the data could never be read."""


class ConditionalWriteUnsupported(S3SyncError):
    """The endpoint rejects, or visibly ignores, ``If-None-Match: *`` on a PUT: two hosts
    could then each create a different master key for one store."""


class KeyInUse(S3SyncError):
    """The key to remove is the one this store's own passphrase opens."""


class NotEncrypted(S3SyncError):
    """A key operation on a store that holds no key (plain, or not pushed to yet)."""


class BadHostId(S3SyncError):
    """The host id file in the data directory is malformed or unreadable."""


class BadLeaseObject(CorruptObject):
    """A volume's lease object is malformed, of an unknown version, or too big."""


class LeaseHeld(S3SyncError):
    """Another host holds the volume's live lease; the message names it and its state."""


class LeaseLost(S3SyncError):
    """This host no longer holds a lease it took: taken over, broken by hand or gone."""
