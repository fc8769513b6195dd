"""The lease (s3sync/lease.py) against a real S3 API (moto's server): the conditional-write
probe, take, renew, hand over, expiry on the store's clock, break, generation fencing,
malformed objects, and two OS processes racing for one lease, round after round."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

from s3sync import RetryPolicy, S3Config
from s3sync.client import Bucket
from s3sync.errors import BadLeaseObject, LeaseHeld, LeaseLost
from s3sync.hostid import Host
from s3sync.layout import Layout
from s3sync.lease import Lease

if TYPE_CHECKING:
    from s3_fixtures import MotoServer

pytest_plugins = ["s3_fixtures"]

REPO = Path(__file__).resolve().parents[2]
A = Host("a" * 32, "host-a")
B = Host("b" * 32, "host-b")
KEY = "vol/lease"


def s3(moto: MotoServer, bucket: str) -> Bucket:
    from s3_fixtures import ACCESS_KEY, SECRET_KEY
    config = S3Config(endpoint_url=moto.url, region="us-east-1", access_key_id=ACCESS_KEY,
                      secret_access_key=SECRET_KEY)
    return Bucket(config, bucket, RetryPolicy(base_delay=0.01, max_delay=0.1))


def lease(moto: MotoServer, bucket: str, host: Host, ttl: float = 60) -> Lease:
    return Lease(s3(moto, bucket), Layout("vol"), host, volume="db", ttl=ttl)


def test_moto_enforces_conditional_writes(moto: MotoServer, bucket: str) -> None:
    b = s3(moto, bucket)
    b.probe_conditional_writes(Layout("vol").lease_probe)
    assert b.get_with_etag("vol/none") is None
    first = b.put_new("vol/x", b"one")
    assert first is not None
    assert b.put_new("vol/x", b"two") is None
    read = b.get_with_etag("vol/x")
    assert read is not None and (read.data, read.etag) == (b"one", first)
    assert abs((read.now - read.modified).total_seconds()) < 5
    second = b.put_if_match("vol/x", b"three", first)
    assert second is not None and second != first
    assert b.put_if_match("vol/x", b"four", first) is None
    assert b.put_if_match("vol/none", b"five", first) is None
    assert b.get("vol/x") == b"three"


def test_take_renew_update_release_and_hand_over(moto: MotoServer, bucket: str) -> None:
    a = lease(moto, bucket, A).take(floor=4)
    assert a.generation == 5
    a.update("pushing", "62%")
    with pytest.raises(LeaseHeld) as caught:
        lease(moto, bucket, B).take()
    message = str(caught.value)
    assert f"held by host-a (host id {A.id}) since " in message
    assert ", pushing, 62%, until " in message and "`pyvol lease break db --yes`" in message
    a.renew()
    shown = lease(moto, bucket, B).show()
    assert shown is not None and shown.live and shown.holder == A
    assert (shown.expires - shown.renewed).total_seconds() == 60
    assert abs((shown.now - shown.renewed).total_seconds()) <= 2  # the store's clock, twice
    a.confirm()
    a.release()
    b = lease(moto, bucket, B).take("pulling")
    assert b.generation == 6
    with pytest.raises(LeaseLost, match="it was released"):
        a.renew()
    info = lease(moto, bucket, A).show()
    assert info is not None and info.holder == B and info.record.state == "pulling"


def test_an_expired_lease_is_taken_over_and_its_old_holder_is_fenced(
        moto: MotoServer, bucket: str) -> None:
    a = lease(moto, bucket, A, ttl=3).take()
    taker = lease(moto, bucket, B, ttl=3)
    started = time.monotonic()
    while True:  # judged by the store's clock: LastModified + ttl against its Date
        try:
            b = taker.take()
            break
        except LeaseHeld:
            assert time.monotonic() - started < 10, "the lease never expired"
            time.sleep(0.2)
    waited = time.monotonic() - started
    assert 3 - 1 <= waited <= 3 + 2.5  # ttl, give or take the stores' whole seconds
    assert a.remaining() <= 0  # the old holder counted itself out no later than that
    assert b.generation == a.generation + 1
    body = s3(moto, bucket).get(KEY)
    with pytest.raises(LeaseLost, match="held by host-b"):
        a.renew()
    assert s3(moto, bucket).get(KEY) == body  # the fenced holder wrote nothing
    b.renew()


def test_break_frees_a_live_lease_and_fences_its_holder(moto: MotoServer, bucket: str) -> None:
    a = lease(moto, bucket, A).take()
    a.update("pushing", "3%")
    broken = lease(moto, bucket, B).break_()
    assert broken is not None and broken.holder == A and broken.generation == 1
    with pytest.raises(LeaseLost, match=r"freed \(broken by hand\?\)"):
        a.update("pushing", "4%")
    assert lease(moto, bucket, B).take().generation == 3


def test_a_malformed_lease_object_is_refused_by_name_and_can_be_broken(
        moto: MotoServer, bucket: str) -> None:
    client: Any = moto.client()
    forged = {"pyvol_lease": 1, "generation": 1, "state": "mounted", "progress": "",
              "holder": {"id": "x" * 32, "name": "evil"}, "since": None, "ttl": 60,
              "nonce": "0" * 32}
    client.put_object(Bucket=bucket, Key=KEY, Body=json.dumps(forged).encode())
    with pytest.raises(BadLeaseObject, match="lease object vol/lease has a holder id"):
        lease(moto, bucket, A).take()
    assert json.loads(client.get_object(Bucket=bucket, Key=KEY)["Body"].read()) == forged
    assert lease(moto, bucket, A).break_(floor=7) is None
    assert lease(moto, bucket, A).take().generation == 9


def test_an_oversized_lease_object_is_refused_unread_and_can_be_broken(
        moto: MotoServer, bucket: str) -> None:
    client: Any = moto.client()
    client.put_object(Bucket=bucket, Key=KEY, Body=b"{" * 10_000_000)
    with pytest.raises(BadLeaseObject, match="lease object vol/lease is over 4096 bytes"):
        lease(moto, bucket, A).show()
    assert lease(moto, bucket, B).break_(floor=1) is None
    assert lease(moto, bucket, A).take().generation == 3


class Racer:
    """One lease_racer process: a host of its own, driven over its stdin and stdout."""

    def __init__(self, moto: MotoServer, bucket: str, host: Host, log: Path) -> None:
        self._log = open(log, "wb")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.lease_racer", moto.url, bucket, host.id,
             host.name],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[str] = self.proc.stdin
        self.stdout: IO[str] = self.proc.stdout
        self.log = log
        assert self.read() == "started"

    def send(self, line: str) -> None:
        self.stdin.write(line + "\n")
        self.stdin.flush()

    def read(self, timeout: float = 30) -> str:
        ready, _, _ = select.select([self.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"racer said nothing for {timeout} s; see {self.log}")
        line = self.stdout.readline()
        if not line:
            raise AssertionError(f"racer exited ({self.proc.poll()}); see {self.log}")
        return line.rstrip("\n")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.send("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stdin.close()
        self.stdout.close()
        self._log.close()


@pytest.fixture
def racers(moto: MotoServer, bucket: str, tmp_path: Path) -> Iterator[list[Racer]]:
    made: list[Racer] = []
    try:
        for host in (A, B):
            made.append(Racer(moto, bucket, host, tmp_path / f"{host.name}.log"))
        yield made
    finally:
        for racer in made:
            racer.stop()


ROUNDS = 30


def test_two_processes_racing_for_one_lease_have_exactly_one_winner_each_round(
        racers: list[Racer], moto: MotoServer, bucket: str) -> None:
    """Each round both processes read the free lease, then both conditional writes are let
    go together: the store must let exactly one through, and the other must name it."""
    names = {A.name: racers[0], B.name: racers[1]}
    winners: list[str] = []
    for r in range(ROUNDS):
        for racer in racers:
            racer.send(f"take {r}")
        for racer in racers:  # both have read the same version and wait at their write
            assert racer.read() == f"ready {r}"
        for racer in racers:
            racer.send("go")
        answers = {name: racer.read() for name, racer in names.items()}
        won = [name for name, answer in answers.items() if answer.startswith("won ")]
        assert len(won) == 1, f"round {r}: {answers}"
        winner, = won
        loser, = set(names) - {winner}
        assert answers[winner] == f"won {r} {r + 1}"  # a new generation every round
        assert answers[loser].startswith(f"held {r} ")
        assert f"held by {winner} (host id " in answers[loser]
        info = lease(moto, bucket, A).show()
        assert info is not None and info.holder is not None and info.holder.name == winner
        names[winner].send("release")
        assert names[winner].read() == "released"
        winners.append(winner)
    print("winners:", "".join(w[-1] for w in winners))
