"""Connection settings for the S3 sync engine: where the store is and how hard to retry.

Credentials come from the plugin's settings (its environment), never from volume options.
Empty values mean "let boto3 find them" (its standard chain: environment, shared config,
instance metadata).  Neither ``repr`` nor ``str`` ever shows the secret key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from s3sync.errors import BadEndpoint

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^/?#]*@")


def redact(text: str) -> str:
    """``text`` with the credentials of a URL in it (``user:secret@``) replaced by ``***@``.

    Every endpoint pyvol shows in a message, a log line or the state database goes through
    here; it never raises, whatever the text.
    """
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}***@", text)


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str = ""
    """Empty: AWS's own endpoint for ``region``."""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Config:
        """Read S3_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""
        source = os.environ if env is None else env
        return cls(
            endpoint_url=source.get("S3_ENDPOINT_URL", "").strip(),
            region=source.get("AWS_REGION", "").strip(),
            access_key_id=source.get("AWS_ACCESS_KEY_ID", "").strip(),
            secret_access_key=source.get("AWS_SECRET_ACCESS_KEY", "").strip(),
        )

    def __repr__(self) -> str:
        key = f"{self.access_key_id[:4]}..." if self.access_key_id else ""
        secret = "***" if self.secret_access_key else ""
        return (f"S3Config(endpoint_url={redact(self.endpoint_url)!r}, region={self.region!r}, "
                f"access_key_id={key!r}, secret_access_key={secret!r})")

    __str__ = __repr__

    @property
    def where(self) -> str:
        """The endpoint as shown in messages (credentials in it redacted)."""
        return redact(self.endpoint_url) or f"AWS S3 ({self.region or 'default region'})"

    def check_endpoint(self) -> None:
        """Raise :class:`BadEndpoint`, saying what to fix, unless the endpoint is usable.

        Usable: empty (AWS), or ``http(s)://host[:port][/path]`` with no credentials, query
        or fragment.  Credentials belong in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; the
        message shows the URL with them redacted.
        """
        url = self.endpoint_url
        if not url:
            return
        shown = redact(url)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise BadEndpoint(
                f"S3_ENDPOINT_URL {shown!r} is not a valid URL ({redact(str(exc))}): set it to "
                "http(s)://HOST[:PORT], e.g. https://s3.example.com:9000") from None
        if "@" in parts.netloc:
            raise BadEndpoint(
                f"S3_ENDPOINT_URL {shown!r} contains credentials: set it to "
                f"{parts.scheme}://{parts.netloc.rpartition('@')[2]} and put the key in "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (docker plugin set)")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadEndpoint(
                f"S3_ENDPOINT_URL {shown!r} must start with http:// or https:// and name a "
                "host, e.g. https://s3.example.com:9000")
        if parts.query or parts.fragment or (port is not None and port == 0):
            raise BadEndpoint(
                f"S3_ENDPOINT_URL {shown!r} must be http(s)://HOST[:PORT] without a query, "
                "a fragment or port 0")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter around whole-object operations.

    botocore retries each HTTP request a few times itself; this loop re-runs a whole
    operation (a GET including its body stream, a PUT, a LIST page) until ``deadline``
    seconds have passed since its first attempt or ``attempts`` runs have failed.
    """

    attempts: int = 8
    base_delay: float = 0.2
    max_delay: float = 8.0
    deadline: float = 120.0
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    botocore_attempts: int = 3
