"""One bucket behind boto3: whole-object operations with retries and precise errors.

This is the only module that imports boto3/botocore.  botocore retries single requests a few
times itself (standard mode); :meth:`Bucket._run` re-runs a whole operation, a GET including
the read of its body, with exponential backoff and full jitter, until the
:class:`RetryPolicy` budget (attempts and total seconds) is spent.  Every failure leaves as an
:class:`S3SyncError` subclass whose message says what to do and carries no secret.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.exceptions as bx
from botocore.config import Config

from s3sync.config import RetryPolicy, S3Config
from s3sync.errors import (
    AccessDenied,
    BadEndpoint,
    BucketMissing,
    ConditionalWriteUnsupported,
    CorruptObject,
    EndpointUnreachable,
    S3SyncError,
    TransientFailure,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")

ACCESS_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "InvalidClientTokenId", "AuthorizationHeaderMalformed", "AllAccessDisabled",
})
THROTTLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
    "ServiceUnavailable", "TooManyRequestsException", "RequestLimitExceeded",
})
UNREACHABLE = (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ProxyConnectionError,
               bx.ConnectionClosedError, bx.ReadTimeoutError, bx.SSLError)
STREAM_ERRORS = (bx.IncompleteReadError, bx.ResponseStreamingError, bx.ChecksumError,
                 bx.HTTPClientError)
_jitter = secrets.SystemRandom()

# At DEBUG, these botocore modules log request headers (Authorization: the signature), the
# canonical request and signature, request parameters and response headers and bodies, and
# urllib3 logs request lines: whatever LOG_LEVEL says, they never go below WARNING.  The rest
# of botocore (event hooks, endpoint resolution, retries) still logs at DEBUG for debugging.
QUIET_LOGGERS = ("botocore.auth", "botocore.endpoint", "botocore.parsers", "botocore.awsrequest",
                 "botocore.handlers", "botocore.utils", "botocore.httpsession",
                 "botocore.httpchecksum", "botocore.credentials", "urllib3", "s3transfer")
for _name in QUIET_LOGGERS:
    logging.getLogger(_name).setLevel(logging.WARNING)


class _DeleteFailed(Exception):
    """DeleteObjects answered 200 but listed per-key errors."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _Conflict(Exception):
    """Another conditional write of the same key is in flight: try again."""


class ObjectMissing(CorruptObject):
    """GET or HEAD of a key that does not exist."""


class ObjectTooBig(CorruptObject):
    """An object over the size its reader allows; ``etag`` names that version of it."""

    def __init__(self, message: str, etag: str) -> None:
        super().__init__(message)
        self.etag = etag


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime
    """The store's own clock (LastModified), timezone-aware."""


@dataclass(frozen=True)
class Versioned:
    """One read of an object: its bytes, the ETag naming that write, and the store's clock."""

    data: bytes
    etag: str
    modified: datetime
    """When this version was written (LastModified), on the store's clock."""
    now: datetime
    """When the store answered (its ``Date`` header): the store's clock, not this host's."""


class Bucket:
    """A bucket through one thread-safe boto3 client; methods may run from many threads."""

    def __init__(self, config: S3Config, bucket: str, retry: RetryPolicy, pool: int = 16,
                 *, where: str = "") -> None:
        self.config = config
        self.name = bucket
        self.retry = retry
        self.where = where or f"s3://{bucket} at {config.where}"
        config.check_endpoint()
        session = boto3.session.Session(
            aws_access_key_id=config.access_key_id or None,
            aws_secret_access_key=config.secret_access_key or None,
            region_name=config.region or None,
        )
        try:
            self._client: S3Client = self._make_client(session, config, retry, pool)
        except ValueError as exc:  # botocore's own endpoint checks, its text may hold the URL
            raise BadEndpoint(
                f"S3_ENDPOINT_URL {config.where!r} was refused ({type(exc).__name__}): set it "
                "to http(s)://HOST[:PORT], e.g. https://s3.example.com:9000") from None
        self._lock = threading.Lock()
        self.requests = 0

    @staticmethod
    def _make_client(session: boto3.session.Session, config: S3Config, retry: RetryPolicy,
                     pool: int) -> S3Client:
        return session.client(
            "s3",
            endpoint_url=config.endpoint_url or None,
            config=Config(
                max_pool_connections=pool,
                connect_timeout=retry.connect_timeout,
                read_timeout=retry.read_timeout,
                retries={"mode": "standard", "total_max_attempts": retry.botocore_attempts},
                # Every blob carries its own blake3 hash, checked on restore; skip the
                # per-request CRC32 pass that botocore would add by default.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"} if config.endpoint_url else None,
            ),
        )

    # -- operations ----------------------------------------------------------------------

    def put(self, key: str, body: bytes) -> None:
        self._run(f"uploading {key}", lambda: self._client.put_object(
            Bucket=self.name, Key=key, Body=body, ContentLength=len(body)))

    def put_if_absent(self, key: str, body: bytes) -> bool:
        """Write ``key`` only if no object has that key (``If-None-Match: *``); whether it was
        written.  Of two hosts racing to create one key, exactly one gets True.

        A concurrent conditional write of the same key (AWS: 409 ConditionalRequestConflict)
        is retried like a throttled request.  Raises :class:`ConditionalWriteUnsupported` if
        the endpoint rejects the condition itself.
        """
        def op() -> bool:
            try:
                self._client.put_object(Bucket=self.name, Key=key, Body=body,
                                        ContentLength=len(body), IfNoneMatch="*")
            except bx.ClientError as exc:
                code, status = _code(exc)
                if code == "PreconditionFailed" or status == 412:
                    return False
                if code == "ConditionalRequestConflict":
                    raise _Conflict(code) from None
                if code in ("NotImplemented", "InvalidArgument") or status == 501:
                    raise ConditionalWriteUnsupported(
                        f"{self.where} does not support conditional writes (If-None-Match, "
                        f"{code}) while creating {key}: pyvol needs them to create an "
                        "encrypted store's key safely; use an S3 store that supports them "
                        "(AWS S3 and MinIO do)") from None
                raise
            return True
        return self._run(f"creating {key}", op)

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes, or bytes ``[start, end)``; raises :class:`ObjectMissing`."""
        def op() -> bytes:
            if start is None or end is None:
                resp = self._client.get_object(Bucket=self.name, Key=key)
            else:
                resp = self._client.get_object(Bucket=self.name, Key=key,
                                               Range=f"bytes={start}-{end - 1}")
            data = resp["Body"].read()
            if start is not None and end is not None and len(data) != end - start:
                raise CorruptObject(
                    f"object {key} in {self.where} is shorter than the snapshot says "
                    f"({len(data)} of {end - start} bytes from offset {start})")
            return data
        return self._run(f"downloading {key}", op)

    def size(self, key: str) -> int | None:
        """The object's size in bytes (one HEAD), or None if there is no such object."""
        try:
            resp = self._run("reading an object's size",
                             lambda: self._client.head_object(Bucket=self.name, Key=key))
        except ObjectMissing:
            return None
        return int(resp["ContentLength"])

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix``, one retried LIST call per page of 1000."""
        found: list[ObjectInfo] = []
        token = ""
        while True:
            def page(token: str = token) -> tuple[list[ObjectInfo], str]:
                if token:
                    resp = self._client.list_objects_v2(Bucket=self.name, Prefix=prefix,
                                                        ContinuationToken=token)
                else:
                    resp = self._client.list_objects_v2(Bucket=self.name, Prefix=prefix)
                items = [ObjectInfo(o["Key"], o["Size"], o["LastModified"])
                         for o in resp.get("Contents", [])]
                nxt = resp.get("NextContinuationToken", "") if resp.get("IsTruncated") else ""
                return items, nxt
            items, token = self._run(f"listing {prefix}", page)
            found.extend(items)
            if not token:
                return found

    def delete(self, keys: Sequence[str], *, retry: bool = True) -> None:
        """Delete ``keys`` (missing ones are fine), 1000 per request; one try if not ``retry``."""
        if len(keys) == 1:  # DELETE has no body; DeleteObjects sends XML
            key = keys[0]
            self._run(f"deleting {key}", lambda: self._client.delete_object(
                Bucket=self.name, Key=key), retry)
            return
        for i in range(0, len(keys), 1000):
            batch = list(keys[i:i + 1000])

            def op(batch: list[str] = batch) -> None:
                resp = self._client.delete_objects(
                    Bucket=self.name,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
                errors = resp.get("Errors", [])
                if errors:
                    code = errors[0].get("Code", "Unknown")
                    if code in THROTTLE_CODES or code in ACCESS_CODES:
                        raise _DeleteFailed(code)
                    raise S3SyncError(f"{self.where} refused to delete {errors[0].get('Key')} "
                                      f"({code}) and {len(errors) - 1} more")
            self._run(f"deleting {len(batch)} objects", op, retry)

    def check(self) -> None:
        """Prove the endpoint answers, the credentials work and the bucket exists."""
        self._run("checking the bucket", lambda: self._client.head_bucket(Bucket=self.name))

    # -- conditional writes (leases) ------------------------------------------------------

    def get_with_etag(self, key: str, limit: int = 1 << 16) -> Versioned | None:
        """The object with its ETag and the store's clock, or None if it does not exist.

        Objects over ``limit`` bytes are refused (:class:`ObjectTooBig`) before their body is
        read: the bucket is hostile input.
        """
        def op() -> Versioned | None:
            try:
                resp = self._client.get_object(Bucket=self.name, Key=key)
            except bx.ClientError as exc:
                if _code(exc)[0] in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
            with resp["Body"] as body:
                if resp.get("ContentLength", 0) > limit:
                    raise ObjectTooBig(
                        f"object {key} in {self.where} is {resp['ContentLength']} bytes, over "
                        f"the {limit} this object may have: delete or replace it",
                        resp["ETag"])
                data = body.read(limit + 1)
            if len(data) > limit:
                raise ObjectTooBig(f"object {key} in {self.where} is over {limit} bytes: "
                                   "delete or replace it", resp["ETag"])
            return Versioned(data, resp["ETag"], resp["LastModified"],
                             _server_date(resp["ResponseMetadata"], self.where))
        return self._run(f"reading {key}", op)

    def put_new(self, key: str, body: bytes) -> str | None:
        """Create ``key`` only if no object has that key (If-None-Match: *).

        The new ETag, or None if an object was there (or a racing conditional write was).
        """
        return self._conditional(key, body, None)

    def put_if_match(self, key: str, body: bytes, etag: str) -> str | None:
        """Replace ``key`` only if its current version has ``etag`` (If-Match).

        The new ETag, or None if the object changed or is gone.
        """
        return self._conditional(key, body, etag)

    def server_time(self) -> datetime:
        """The store's clock (the ``Date`` header of a HEAD of the bucket)."""
        resp = self._run("reading the store's clock",
                         lambda: self._client.head_bucket(Bucket=self.name))
        return _server_date(resp["ResponseMetadata"], self.where)

    def probe_conditional_writes(self, key: str) -> None:
        """Prove the endpoint enforces If-None-Match and If-Match on PUT, using object ``key``.

        Raises :class:`ConditionalWriteUnsupported` if either condition that must fail
        succeeds: such an endpoint would let two hosts both believe they hold a lease.
        """
        self.put(key, b"pyvol conditional-write probe")
        refused = "multi-host volumes need an S3 endpoint that enforces conditional writes " \
            "(AWS S3, MinIO and Ceph RGW do); use one, or keep each volume on one host"
        if self.put_new(key, b"must not replace the probe") is not None:
            raise ConditionalWriteUnsupported(
                f"{self.where} ignored If-None-Match: * (it replaced the existing {key}): "
                + refused)
        if self.put_if_match(key, b"must not replace the probe", '"0"') is not None:
            raise ConditionalWriteUnsupported(
                f"{self.where} ignored If-Match with a wrong ETag (it replaced {key}): "
                + refused)

    def _conditional(self, key: str, body: bytes, etag: str | None) -> str | None:
        header = "If-None-Match" if etag is None else "If-Match"

        def op() -> str | None:
            try:
                if etag is None:
                    resp = self._client.put_object(Bucket=self.name, Key=key, Body=body,
                                                   ContentLength=len(body), IfNoneMatch="*")
                else:
                    resp = self._client.put_object(Bucket=self.name, Key=key, Body=body,
                                                   ContentLength=len(body), IfMatch=etag)
            except bx.ClientError as exc:
                code, status = _code(exc)
                # 409 ConditionalRequestConflict: a racing conditional write won (AWS).
                if status in (409, 412) or code in ("PreconditionFailed", "NoSuchKey",
                                                    "ConditionalRequestConflict"):
                    return None
                if status == 501 or code == "NotImplemented":
                    raise ConditionalWriteUnsupported(
                        f"{self.where} does not implement {header} on PUT ({code}): "
                        "multi-host volumes need an S3 endpoint that enforces conditional "
                        "writes (AWS S3, MinIO and Ceph RGW do)") from None
                raise
            return resp["ETag"]
        return self._run(f"writing {key} ({header})", op)

    # -- retries and errors --------------------------------------------------------------

    def _run(self, what: str, op: Callable[[], T], retry: bool = True) -> T:
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            with self._lock:
                self.requests += 1
            try:
                return op()
            except Exception as exc:
                elapsed = time.monotonic() - started
                delay = _jitter.uniform(0, min(self.retry.max_delay,
                                               self.retry.base_delay * 2 ** (attempt - 1)))
                if (not retry or not transient(exc) or attempt >= self.retry.attempts
                        or elapsed + delay > self.retry.deadline):
                    translated = self._translate(exc, what, attempt, elapsed)
                    if translated is exc:
                        raise
                    raise translated from exc
                time.sleep(delay)

    def _translate(self, exc: Exception, what: str, attempt: int, elapsed: float) -> Exception:
        if isinstance(exc, S3SyncError):
            return exc
        tried = f"{attempt} attempt{'s' if attempt > 1 else ''} over {elapsed:.1f}s"
        if isinstance(exc, bx.ClientError | _DeleteFailed):
            code, status = _code(exc)
            if code in ACCESS_CODES or status == 403:
                return AccessDenied(
                    f"{self.where} refused access ({code}) while {what}: check "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the plugin settings "
                    "(docker plugin set) and that they may list, read, write and delete in "
                    f"bucket {self.name!r}")
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and "bucket" in what):
                return BucketMissing(
                    f"bucket {self.name!r} does not exist at {self.config.where}: create it "
                    f"(e.g. aws s3 mb s3://{self.name}) or point s3_bucket at an existing one")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectMissing(f"object missing in {self.where} while {what}")
            if status >= 500 or status == 429 or code in THROTTLE_CODES:
                return TransientFailure(
                    f"{self.where} kept failing ({code}, HTTP {status}) while {what}, "
                    f"{tried}: the store is overloaded or down; try again later")
            return S3SyncError(f"{self.where} rejected {what}: {code} (HTTP {status})")
        if isinstance(exc, _Conflict):
            return TransientFailure(
                f"{self.where} kept answering {exc} while {what}, {tried}: another host is "
                "writing the same object; try again")
        if isinstance(exc, UNREACHABLE):
            return EndpointUnreachable(
                f"cannot reach the S3 endpoint {self.config.where} while {what} "
                f"({type(exc).__name__}), {tried}: check S3_ENDPOINT_URL / AWS_REGION in the "
                "plugin settings and that the store is up and reachable from this host")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return AccessDenied(
                f"no usable S3 credentials for {self.where}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY with `docker plugin set`")
        if isinstance(exc, STREAM_ERRORS):
            return TransientFailure(
                f"{self.where} kept dropping data ({type(exc).__name__}) while {what}, "
                f"{tried}: try again later")
        if isinstance(exc, bx.BotoCoreError):
            return S3SyncError(f"S3 request to {self.where} failed while {what}: "
                               f"{type(exc).__name__}")
        return exc


def _code(exc: bx.ClientError | _DeleteFailed) -> tuple[str, int]:
    if isinstance(exc, _DeleteFailed):
        return exc.code, 403 if exc.code in ACCESS_CODES else 503
    code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
    return code, int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def transient(exc: BaseException) -> bool:
    """Whether running the same operation again may succeed."""
    if isinstance(exc, bx.ClientError | _DeleteFailed):
        code, status = _code(exc)
        return status >= 500 or status == 429 or code in THROTTLE_CODES
    return isinstance(exc, UNREACHABLE + STREAM_ERRORS + (_Conflict,))


def _server_date(meta: Mapping[str, Any], where: str) -> datetime:
    date = meta.get("HTTPHeaders", {}).get("date", "")
    try:
        when = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        raise S3SyncError(f"{where} sent no valid Date header ({date[:40]!r}); leases are "
                          "timed by the store's clock: use an endpoint that sends one") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
