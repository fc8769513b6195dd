"""Settings, retries and error translation (s3sync/config.py, client.py).

The operations here are local callables: no request leaves the process.
"""

from __future__ import annotations

import re
import time
from typing import Any

import botocore.exceptions as bx
import pytest

from s3sync import (
    AccessDenied,
    BucketMissing,
    EndpointUnreachable,
    RetryPolicy,
    S3Config,
    S3SyncError,
    TransientFailure,
)
from s3sync.client import Bucket, ObjectMissing

SECRET = "s3cr3t-value-that-must-not-leak"
CONFIG = S3Config(endpoint_url="http://127.0.0.1:9", region="us-east-1",
                  access_key_id="AKIAEXAMPLEKEY000000", secret_access_key=SECRET)


def test_from_env_reads_the_four_settings() -> None:
    env = {"S3_ENDPOINT_URL": " http://127.0.0.1:9000 ", "AWS_REGION": "eu-west-1",
           "AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": SECRET, "OTHER": "x"}
    assert S3Config.from_env(env) == S3Config("http://127.0.0.1:9000", "eu-west-1", "AKIA1",
                                              SECRET)
    assert S3Config.from_env({}) == S3Config()


def test_repr_and_str_never_show_the_secret() -> None:
    for text in (repr(CONFIG), str(CONFIG), f"{CONFIG}", repr([CONFIG])):
        assert SECRET not in text
        assert "***" in text
        assert "AKIAEXAMPLEKEY000000" not in text
    assert "***" not in repr(S3Config())


def client_error(code: str, status: int) -> bx.ClientError:
    return bx.ClientError({"Error": {"Code": code, "Message": "m"},  # type: ignore[typeddict-item]
                           "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def bucket(**retry: Any) -> Bucket:
    policy = RetryPolicy(**{"base_delay": 0.001, "max_delay": 0.01, **retry})
    return Bucket(CONFIG, "bkt", policy)


def flaky(failures: list[BaseException], result: str = "done") -> Any:
    calls = {"n": 0}

    def op() -> str:
        calls["n"] += 1
        if failures:
            raise failures.pop(0)
        return result
    op.calls = calls  # type: ignore[attr-defined]
    return op


@pytest.mark.parametrize("exc", [
    client_error("SlowDown", 503), client_error("InternalError", 500),
    client_error("Throttling", 400), client_error("X", 429),
    bx.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    bx.ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
    bx.IncompleteReadError(actual_bytes=1, expected_bytes=2),
])
def test_transient_faults_are_retried_until_success(exc: BaseException) -> None:
    op = flaky([exc, exc, exc])
    assert bucket()._run("testing", op) == "done"
    assert op.calls["n"] == 4


@pytest.mark.parametrize(("exc", "kind", "words"), [
    (client_error("InvalidAccessKeyId", 403), AccessDenied, "AWS_ACCESS_KEY_ID"),
    (client_error("SignatureDoesNotMatch", 403), AccessDenied, "AWS_SECRET_ACCESS_KEY"),
    (client_error("AccessDenied", 403), AccessDenied, "may list, read, write"),
    (client_error("NoSuchBucket", 404), BucketMissing, "create it"),
    (client_error("NoSuchKey", 404), ObjectMissing, "missing"),
    (client_error("InvalidArgument", 400), S3SyncError, "rejected"),
    (bx.NoCredentialsError(), AccessDenied, "docker plugin set"),
])
def test_permanent_faults_fail_at_once_with_a_precise_message(
        exc: BaseException, kind: type[Exception], words: str) -> None:
    op = flaky([exc])
    with pytest.raises(kind, match=words) as info:
        bucket()._run("testing", op)
    assert op.calls["n"] == 1
    assert SECRET not in str(info.value)


def test_retries_stop_after_the_attempt_budget() -> None:
    op = flaky([client_error("SlowDown", 503)] * 10)
    with pytest.raises(TransientFailure, match="3 attempts") as info:
        bucket(attempts=3)._run("uploading k", op)
    assert "uploading k" in str(info.value) and "try again later" in str(info.value)
    assert op.calls["n"] == 3


def test_retries_stop_at_the_deadline() -> None:
    def op() -> None:
        time.sleep(0.05)
        raise bx.EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    store = bucket(attempts=1000, deadline=0.3, base_delay=0.05, max_delay=0.05)
    started = time.monotonic()  # after building the client: that takes a second under load
    with pytest.raises(EndpointUnreachable,
                       match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:9") as info:
        store._run("x", op)
    # 1000 attempts would take 100 s: a few seconds (a loaded machine) shows the deadline held.
    assert time.monotonic() - started < 3.0
    assert "S3_ENDPOINT_URL" in str(info.value)
    assert SECRET not in str(info.value)


def test_no_retry_means_one_attempt() -> None:
    op = flaky([client_error("SlowDown", 503)] * 3)
    with pytest.raises(TransientFailure):
        bucket()._run("x", op, retry=False)
    assert op.calls["n"] == 1


@pytest.mark.parametrize(("url", "shown"), [
    ("https://KEY:SECRET@s3.example.com:9000/x", "https://***@s3.example.com:9000/x"),
    ("http://user@host", "http://***@host"),
    ("KEY:SECRET@host:9000", "***@host:9000"),
    ("https://host/path@x", "https://host/path@x"),
    ("", ""),
])
def test_credentials_in_urls_are_redacted(url: str, shown: str) -> None:
    from s3sync.config import S3Config, redact

    assert redact(url) == shown
    assert "SECRET" not in S3Config(endpoint_url=url).where
    assert "SECRET" not in repr(S3Config(endpoint_url=url))


@pytest.mark.parametrize(("url", "message"), [
    ("https://KEY:S3CR3T@host:9000", "contains credentials: set it to https://host:9000"),
    ("localhost:9000", "must start with http:// or https://"),
    ("ftp://host", "must start with http:// or https://"),
    ("http://", "must start with http:// or https://"),
    ("http://host:99999", "is not a valid URL"),
    ("http://[::1", "is not a valid URL"),
    ("http://host/?a=b", "without a query"),
])
def test_a_malformed_endpoint_is_a_named_error_that_says_what_to_fix(url: str,
                                                                    message: str) -> None:
    from s3sync import BadEndpoint, RetryPolicy, S3Config
    from s3sync.client import Bucket

    with pytest.raises(BadEndpoint, match=re.escape(message)) as info:
        Bucket(S3Config(endpoint_url=url, region="us-east-1"), "b", RetryPolicy())
    assert "S3CR3T" not in str(info.value)
