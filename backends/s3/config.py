"""Connection settings for the S3 sync engine: where the store is and how hard to retry.

Credentials come from the plugin's settings (its environment), never from volume options.
Empty values mean "let boto3 find them" (its standard chain: environment, shared config,
instance metadata).  Neither ``repr`` nor ``str`` ever shows the secret key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


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
        return (f"S3Config(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
                f"access_key_id={key!r}, secret_access_key={secret!r})")

    __str__ = __repr__

    @property
    def where(self) -> str:
        """The endpoint as shown in messages."""
        return self.endpoint_url or f"AWS S3 ({self.region or 'default region'})"


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
