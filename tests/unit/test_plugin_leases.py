"""This host's tenures (plugin/sync/leases.py) over a fake bucket: a Mount takes or keeps the
lease, progress and releases are written by the renewal thread (never in the caller), a Mount
under way is never released under it, and a tenure taken over by another host shows as lost."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from plugin.options import S3Policy
from plugin.sync import leases as leases_mod
from plugin.sync.leases import Leases, describe
from s3sync.errors import LeaseHeld
from s3sync.hostid import Host
from s3sync.layout import Layout
from s3sync.lease import Lease, decode
from tests.support.lease_bucket import FakeBucket
from tests.support.waiting import wait_for

A = Host("a" * 32, "host-a")
B = Host("b" * 32, "host-b")
POLICY = S3Policy(bucket="b", prefix="db", lease=True, lease_ttl=30)
KEY = "db/lease"


class FakeStore:
    def __init__(self, bucket: FakeBucket) -> None:
        self.bucket = bucket

    def lease(self, host: Host, volume: str, ttl: float, *, probe: bool = True) -> Lease:
        return Lease(self.bucket, Layout("db"), host, volume=volume, ttl=ttl)


class FakeRemotes:
    def __init__(self, bucket: FakeBucket) -> None:
        self.store = FakeStore(bucket)

    def get(self, bucket: str, prefix: str, encrypt: bool) -> FakeStore:
        return self.store


@pytest.fixture
def bucket() -> FakeBucket:
    return FakeBucket()


@pytest.fixture
def leases(bucket: FakeBucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[Leases]:
    monkeypatch.setattr(leases_mod, "TICK", 0.02)
    held = Leases(FakeRemotes(bucket), lambda: A)  # type: ignore[arg-type]
    yield held
    held.stop()


def stored(bucket: FakeBucket) -> dict[str, Any]:
    record = decode(bucket.objects[KEY][0], KEY)
    return {"state": record.state, "holder": record.holder, "generation": record.generation,
            "progress": record.progress}


def test_a_mount_takes_the_lease_and_a_second_one_keeps_it(leases: Leases,
                                                           bucket: FakeBucket) -> None:
    assert leases.acquire("db", POLICY) is True
    assert stored(bucket)["holder"] == A and stored(bucket)["generation"] == 1
    writes = bucket.writes
    assert leases.acquire("db", POLICY) is False  # mounted twice here: no new tenure
    assert bucket.writes == writes and stored(bucket)["generation"] == 1
    shown = leases.status("db")
    assert shown is not None and shown["holder"] == {"id": A.id, "name": "host-a"}
    assert shown["state"] == "mounted" and "expires" in shown


def test_another_hosts_mount_is_refused_naming_the_holder(leases: Leases,
                                                          bucket: FakeBucket) -> None:
    leases.acquire("db", POLICY)
    other = Leases(FakeRemotes(bucket), lambda: B)  # type: ignore[arg-type]
    with pytest.raises(LeaseHeld, match="host-a"):
        other.acquire("db", POLICY)
    assert other.status("db") is None


def test_progress_and_release_are_written_by_the_thread_not_the_caller(
        leases: Leases, bucket: FakeBucket) -> None:
    leases.acquire("db", POLICY)
    leases.unclaim("db")
    leases.report("db", "pushing", "62%", force=True)
    wait_for(lambda: stored(bucket)["progress"] == "62%", 5, "the progress to be written")
    assert stored(bucket)["state"] == "pushing"
    leases.release("db")
    wait_for(lambda: stored(bucket)["state"] == "free", 5, "the lease to be freed")
    assert stored(bucket)["generation"] == 1 and leases.status("db") is None
    assert not leases.holds("db")


def test_a_mount_under_way_is_never_released_under_it(leases: Leases,
                                                      bucket: FakeBucket) -> None:
    leases.acquire("db", POLICY)  # claimed: the Mount is not over yet
    leases.release("db")  # e.g. a push of the volume ending meanwhile
    leases.report("db", "mounted", force=True)
    wait_for(lambda: bucket.writes >= 2, 5, "the thread to write")
    assert stored(bucket)["state"] == "mounted" and leases.holds("db")
    leases.unclaim("db")
    leases.release("db")
    wait_for(lambda: stored(bucket)["state"] == "free", 5, "the lease to be freed")


def test_a_mount_calls_off_a_release_that_was_waiting(leases: Leases,
                                                      bucket: FakeBucket) -> None:
    leases.acquire("db", POLICY)
    leases.unclaim("db")
    leases.stop()  # the thread is not running: the release waits
    leases.release("db")
    assert leases.acquire("db", POLICY) is False
    assert leases.holds("db") and stored(bucket)["state"] == "mounted"
    leases.unclaim("db")
    leases._tend("db", leases._held["db"])  # what the thread would do next: nothing to free
    assert stored(bucket)["state"] == "mounted" and leases.holds("db")


def test_a_lease_broken_by_another_host_shows_as_lost_and_is_never_written_again(
        leases: Leases, bucket: FakeBucket) -> None:
    leases.acquire("db", POLICY)
    Lease(bucket, Layout("db"), B, volume="db", ttl=30).break_()
    leases.report("db", "pushing", "10%", force=True)
    wait_for(lambda: (leases.status("db") or {}).get("state") == "lost", 5,
             "the tenure to be lost")
    assert "lost" in (leases.status("db") or {})
    writes = bucket.writes
    leases.report("db", "pushing", "20%", force=True)
    leases.release("db")
    assert stored(bucket)["state"] == "free" and bucket.writes == writes
    # The next Mount here takes it afresh: a new generation.
    assert leases.acquire("db", POLICY) is True
    assert stored(bucket)["generation"] == 3


def test_describe_shows_a_lease_for_the_cli(bucket: FakeBucket) -> None:
    lease = Lease(bucket, Layout("db"), A, volume="db", ttl=30)
    assert describe(lease.show()) == {"state": "none"}
    lease.take("mounted", "")
    shown = describe(lease.show())
    assert shown["state"] == "mounted" and shown["holder"] == {"id": A.id, "name": "host-a"}
    assert shown["generation"] == 1 and shown["ttl"] == 30
    bucket.advance(31)
    assert describe(lease.show())["state"] == "expired"
