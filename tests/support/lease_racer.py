"""One "host" racing for a volume's lease, driven line by line on stdin (functional tests).

    python -m tests.support.lease_racer URL BUCKET HOST_ID HOST_NAME

``take R``: read the lease, print ``ready R``, then wait for a ``go`` line before the
conditional write: the driver releases both racers' writes together, from the same read,
so the race happens every round instead of by luck.  Then prints ``won R GENERATION`` or
``held R MESSAGE``.  ``release``: free the lease won last, print ``released``.  ``quit``.
"""

from __future__ import annotations

import sys

from s3sync import RetryPolicy, S3Config
from s3sync.client import Bucket
from s3sync.errors import LeaseHeld
from s3sync.hostid import Host
from s3sync.layout import Layout
from s3sync.lease import Lease, Tenure

ACCESS_KEY = "AKIAPYVOLTESTKEY0000"
SECRET_KEY = "pyvol-test-secret-do-not-log-0123456789"


class GatedBucket(Bucket):
    """Holds the next conditional write until the driver says ``go``."""

    gate = ""

    def _wait(self) -> None:
        if self.gate:
            print(f"ready {self.gate}", flush=True)
            self.gate = ""
            line = sys.stdin.readline().strip()
            if line != "go":
                raise SystemExit(f"expected go, got {line!r}")

    def put_new(self, key: str, body: bytes) -> str | None:
        self._wait()
        return super().put_new(key, body)

    def put_if_match(self, key: str, body: bytes, etag: str) -> str | None:
        self._wait()
        return super().put_if_match(key, body, etag)


def main(url: str, bucket_name: str, host_id: str, name: str) -> None:
    config = S3Config(endpoint_url=url, region="us-east-1", access_key_id=ACCESS_KEY,
                      secret_access_key=SECRET_KEY)
    bucket = GatedBucket(config, bucket_name, RetryPolicy())
    lease = Lease(bucket, Layout("vol"), Host(host_id, name), volume="db", ttl=60)
    won: Tenure | None = None
    print("started", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "take":
            bucket.gate = arg
            try:
                won = lease.take()
            except LeaseHeld as exc:
                print(f"held {arg} {exc}", flush=True)
            else:
                print(f"won {arg} {won.generation}", flush=True)
        elif command == "release" and won is not None:
            won.release()
            won = None
            print("released", flush=True)
        elif command == "quit":
            return
        else:
            raise SystemExit(f"unknown command {line!r}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
