"""The lease state machine (s3sync/lease.py) over a fake bucket that honours ETags like S3
and keeps its own clock, far from this host's: take, renew, hand over, expire, break,
release, generations, lost replies, malformed objects; and the host id (s3sync/hostid.py)."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import botocore.exceptions as bx
import pytest

from s3sync import RetryPolicy, S3Config
from s3sync.client import Bucket
from s3sync.errors import (
    BadHostId,
    BadLeaseObject,
    ConditionalWriteUnsupported,
    LeaseHeld,
    LeaseLost,
    TransientFailure,
)
from s3sync.hostid import Host, load_host
from s3sync.layout import Layout
from s3sync.lease import MAX_OBJECT, Lease, Record, decode, encode
from tests.support.lease_bucket import EPOCH, FakeBucket

KEY = "vol/lease"
A = Host("a" * 32, "host-a")
B = Host("b" * 32, "host-b")
@pytest.fixture
def bucket() -> FakeBucket:
    return FakeBucket()


def lease(bucket: FakeBucket, host: Host, ttl: float = 30) -> Lease:
    return Lease(bucket, Layout("vol"), host, volume="db", ttl=ttl)


def stored(bucket: FakeBucket) -> Record:
    return decode(bucket.objects[KEY][0], KEY)


def test_a_free_volume_is_taken_as_generation_one_on_the_stores_clock(
        bucket: FakeBucket) -> None:
    assert lease(bucket, A).show() is None
    tenure = lease(bucket, A).take()
    assert tenure.generation == 1
    info = lease(bucket, B).show()
    assert info is not None and info.live
    assert (info.holder, info.record.state, info.record.since) == (A, "mounted", EPOCH)
    assert info.expires == EPOCH + timedelta(seconds=30)


def test_a_missing_lease_object_starts_above_the_floor(bucket: FakeBucket) -> None:
    """A deleted lease object must not bring back generations that snapshots carry."""
    assert lease(bucket, A).take(floor=41).generation == 42


def test_a_live_lease_refuses_another_host_naming_holder_since_state_and_expiry(
        bucket: FakeBucket) -> None:
    tenure = lease(bucket, A).take()
    bucket.advance(5)
    tenure.update("pushing", "62%")
    bucket.advance(3)
    writes = bucket.writes
    with pytest.raises(LeaseHeld) as caught:
        lease(bucket, B).take()
    assert str(caught.value) == (
        "db is in use on another host: its lease is held by host-a (host id "
        f"{'a' * 32}) since 2031-05-01 12:00:00Z, pushing, 62%, until 2031-05-01 12:00:35Z "
        "unless renewed (generation 1) (store's clock): unmount it there first; if that "
        "host is gone, wait for the lease to expire or free it with "
        "`pyvol lease break db --yes`")
    assert bucket.writes == writes


def test_renewals_keep_it_and_expiry_hands_it_over_with_a_new_generation(
        bucket: FakeBucket) -> None:
    a = lease(bucket, A).take()
    for _ in range(5):  # renewed in time, for longer than one ttl in all
        bucket.advance(20)
        a.renew()
        with pytest.raises(LeaseHeld):
            lease(bucket, B).take()
    assert a.generation == stored(bucket).generation == 1
    bucket.advance(29)
    with pytest.raises(LeaseHeld):
        lease(bucket, B).take()
    bucket.advance(1)  # renewed + ttl reached on the store's clock: expired
    b = lease(bucket, B).take()
    assert b.generation == 2
    assert stored(bucket).holder == B

    before = bucket.objects[KEY]
    with pytest.raises(LeaseLost, match=r"lost its lease \(generation 1\): it is now held by "
                       r"host-b .* stop writing to the volume here"):
        a.renew()
    with pytest.raises(LeaseLost, match="generation 1"):
        a.update("pushing", "1%")
    with pytest.raises(LeaseLost):
        a.release()
    with pytest.raises(LeaseLost):
        a.confirm()
    assert bucket.objects[KEY] == before  # the lost holder never overwrote the new one
    assert b.confirm().holder == B


def test_release_frees_it_keeping_the_generation_and_the_next_take_counts_on(
        bucket: FakeBucket) -> None:
    a = lease(bucket, A).take()
    a.release()
    record = stored(bucket)
    assert (record.state, record.holder, record.since, record.generation) == ("free", None,
                                                                              None, 1)
    info = lease(bucket, B).show()
    assert info is not None and not info.live
    with pytest.raises(LeaseLost, match="it was released"):
        a.renew()
    assert lease(bucket, B).take().generation == 2
    assert stored(bucket).holder == B


def test_taking_its_own_live_lease_again_is_a_new_tenure_that_fences_the_old_one(
        bucket: FakeBucket) -> None:
    """A restarted plugin on the same host: the lease names its host id, so it may take it
    back at once, and whatever the previous process still holds is fenced."""
    old = lease(bucket, A).take()
    new = lease(bucket, Host(A.id, "renamed")).take("pulling")
    assert new.generation == old.generation + 1
    with pytest.raises(LeaseLost, match="held by renamed"):
        old.renew()
    new.renew()


def test_break_frees_it_whoever_holds_it_and_spends_a_generation(bucket: FakeBucket) -> None:
    assert lease(bucket, B).break_() is None
    assert KEY not in bucket.objects  # nothing to break, nothing written
    a = lease(bucket, A).take()
    a.update("pushing", "10%")
    broken = lease(bucket, B).break_()
    assert broken is not None and broken.holder == A and broken.record.progress == "10%"
    record = stored(bucket)
    assert (record.state, record.holder, record.generation) == ("free", None, 2)
    with pytest.raises(LeaseLost, match=r"freed \(broken by hand\?\)"):
        a.update("pushing", "11%")
    assert lease(bucket, B).take().generation == 3  # generation 2 never had a holder


@pytest.mark.parametrize("body", [
    b"not json",
    b"[1, 2]",
    b'{"pyvol_lease": 2}',
    b'{"pyvol_lease": 1, "generation": 1}',
])
def test_unparseable_lease_objects_are_refused_by_name(body: bytes, bucket: FakeBucket) -> None:
    bucket.put(KEY, body)
    with pytest.raises(BadLeaseObject, match=r"lease object vol/lease .*pyvol lease break"):
        lease(bucket, A).show()
    with pytest.raises(BadLeaseObject, match="vol/lease"):
        lease(bucket, A).take()
    assert bucket.writes == 0


def valid() -> dict[str, object]:
    doc: dict[str, object] = json.loads(encode(Record(3, "mounted", A, EPOCH, 30.0, "", "0" * 32)))
    return doc


@pytest.mark.parametrize(("field", "value", "complaint"), [
    ("generation", True, "generation"),
    ("generation", -1, "generation"),
    ("generation", 2 ** 60, "generation"),
    ("generation", "3", "generation"),
    ("state", "stolen", "state"),
    ("ttl", 10 ** 9, "ttl"),
    ("ttl", 0, "ttl"),
    ("progress", "\x1b[2J" + "x", "progress"),
    ("progress", "p" * 500, "progress"),
    ("holder", {"id": "../../etc", "name": "x"}, "holder id"),
    ("holder", {"id": "a" * 32, "name": "evil\nname"}, "holder name"),
    ("holder", {"id": "a" * 32}, "holder"),
    ("holder", None, "holder and a since time that do not match"),
    ("since", "yesterday", "since"),
    ("since", "2031-05-01T12:00:00", "since"),
    ("nonce", 5, "nonce"),
    ("extra", 1, "fields"),
])
def test_malformed_lease_fields_are_refused_by_name(field: str, value: object, complaint: str,
                                                    bucket: FakeBucket) -> None:
    doc = valid()
    doc[field] = value
    bucket.put(KEY, json.dumps(doc).encode())
    with pytest.raises(BadLeaseObject, match=f"lease object vol/lease has .*{complaint}"):
        lease(bucket, B).take()
    assert bucket.writes == 0


def test_an_oversized_lease_object_is_refused_and_can_be_broken(bucket: FakeBucket) -> None:
    bucket.put(KEY, b" " * (MAX_OBJECT + 1))
    with pytest.raises(BadLeaseObject, match=f"lease object vol/lease is over {MAX_OBJECT}"):
        lease(bucket, A).take()
    assert lease(bucket, A).break_(floor=2) is None
    assert stored(bucket).generation == 3


def test_break_replaces_a_malformed_lease_above_the_floor(bucket: FakeBucket) -> None:
    bucket.put(KEY, b"garbage")
    assert lease(bucket, A).break_(floor=9) is None
    assert stored(bucket).generation == 10
    assert lease(bucket, A).take().generation == 11


def test_the_round_trip_of_a_record() -> None:
    record = Record(7, "pushing", B, EPOCH, 45.0, "62%", "f" * 32)
    assert decode(encode(record), KEY) == record


def test_of_two_takes_racing_from_the_same_read_one_wins_and_the_other_is_told_who(
        bucket: FakeBucket) -> None:
    """B's write lands between A's read and A's conditional write: A's write fails, A looks
    again and is refused with B's name; the lease is B's only."""
    bucket.before_put = lambda: lease(bucket, B).take()
    with pytest.raises(LeaseHeld, match="held by host-b"):
        lease(bucket, A).take()
    assert stored(bucket).holder == B and stored(bucket).generation == 1


def test_racing_takes_of_a_released_lease_also_have_one_winner(bucket: FakeBucket) -> None:
    lease(bucket, A).take().release()
    bucket.before_put = lambda: lease(bucket, B).take()
    with pytest.raises(LeaseHeld, match="held by host-b"):
        lease(bucket, A).take()
    assert stored(bucket).generation == 2


def test_a_racing_renewal_of_an_expired_lease_beats_the_takeover(bucket: FakeBucket) -> None:
    """A is late to renew but nobody has written yet: whichever write lands first wins."""
    a = lease(bucket, A).take()
    bucket.advance(31)
    bucket.before_put = a.renew
    with pytest.raises(LeaseHeld, match="held by host-a"):
        lease(bucket, B).take()
    a.renew()


def test_a_write_whose_reply_was_lost_is_recognised_as_ours(bucket: FakeBucket) -> None:
    bucket.lose_reply = True
    a = lease(bucket, A).take()
    assert a.generation == 1 and bucket.writes == 1
    bucket.lose_reply = True
    a.update("pushing", "5%")
    a.renew()
    assert stored(bucket).progress == "5%"


def test_a_write_that_failed_but_landed_is_adopted_by_the_next_one(bucket: FakeBucket) -> None:
    a = lease(bucket, A).take()
    bucket.fail_after_write = True
    with pytest.raises(TransientFailure):
        a.update("pushing", "50%")
    a.renew()  # If-Match on the version that did land, not on the one before
    assert stored(bucket).progress == "50%"
    a.confirm()


def test_a_write_that_failed_and_did_not_land_leaves_the_tenure_intact(
        bucket: FakeBucket, monkeypatch: pytest.MonkeyPatch) -> None:
    a = lease(bucket, A).take()

    def down(key: str, body: bytes, etag: str) -> str | None:
        raise TransientFailure("the store is down")
    with monkeypatch.context() as m:
        m.setattr(bucket, "put_if_match", down)
        with pytest.raises(TransientFailure):
            a.renew()
    a.renew()
    a.confirm()


def test_remaining_counts_from_the_send_of_the_last_write_less_the_clock_granularity(
        bucket: FakeBucket, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("s3sync.lease.time.monotonic", lambda: clock[0])
    a = lease(bucket, A, ttl=10).take()
    assert a.remaining() == 9.0
    clock[0] += 4
    assert a.remaining() == 5.0
    a.renew()
    assert a.remaining() == 9.0


def test_out_of_range_ttls_and_free_states_are_programming_errors(bucket: FakeBucket) -> None:
    with pytest.raises(ValueError, match="ttl"):
        lease(bucket, A, ttl=1)
    with pytest.raises(ValueError, match="not free"):
        lease(bucket, A).take("free")
    with pytest.raises(ValueError, match="release"):
        lease(bucket, A).take().update("free")


def test_progress_text_is_cut_to_printable_text(bucket: FakeBucket) -> None:
    lease(bucket, A).take("pushing", "\x1b[31m" + "9" * 500)
    assert stored(bucket).progress == "?[31m" + "9" * 115


# -- the client's conditional writes -------------------------------------------------------

class StubClient:
    """put_object answering as told: "ignore" conditions, "412", or "501"."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.calls: list[dict[str, object]] = []

    def put_object(self, **kw: object) -> dict[str, object]:
        self.calls.append(kw)
        conditional = "IfNoneMatch" in kw or "IfMatch" in kw
        if conditional and self.answer != "ignore":
            code, status = (("PreconditionFailed", 412) if self.answer == "412"
                            else ("NotImplemented", 501))
            raise bx.ClientError(
                {"Error": {"Code": code, "Message": "m"},
                 "ResponseMetadata": {"HTTPStatusCode": status}},  # type: ignore[typeddict-item]
                "PutObject")
        return {"ETag": '"e"'}


def stub_bucket(answer: str) -> tuple[Bucket, StubClient]:
    config = S3Config(endpoint_url="http://127.0.0.1:9", region="us-east-1",
                      access_key_id="AKIAEXAMPLEKEY000000", secret_access_key="s")
    b = Bucket(config, "bkt", RetryPolicy(base_delay=0.001, max_delay=0.01))
    stub = StubClient(answer)
    b._client = stub  # type: ignore[assignment]
    return b, stub


def test_the_probe_passes_when_both_conditions_are_enforced() -> None:
    b, stub = stub_bucket("412")
    b.probe_conditional_writes("vol/lease-probe")
    assert [sorted(k for k in c if k.startswith("If")) for c in stub.calls] == [
        [], ["IfNoneMatch"], ["IfMatch"]]


def test_an_endpoint_that_ignores_conditions_is_refused_by_the_probe() -> None:
    b, _ = stub_bucket("ignore")
    with pytest.raises(ConditionalWriteUnsupported,
                       match=r"ignored If-None-Match: \* .*multi-host volumes need an S3 "
                             "endpoint that enforces conditional writes"):
        b.probe_conditional_writes("vol/lease-probe")


def test_an_endpoint_without_conditional_puts_is_refused_at_once() -> None:
    b, stub = stub_bucket("501")
    with pytest.raises(ConditionalWriteUnsupported, match="does not implement If-None-Match"):
        b.put_new("vol/lease", b"{}")
    assert len(stub.calls) == 1  # not retried as if the store were down


# -- host id ---------------------------------------------------------------------------------

def test_the_host_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = load_host(tmp_path, "one")
    assert len(first.id) == 32 and first.name == "one"
    assert (tmp_path / "host-id").read_text() == first.id + "\n"
    assert load_host(tmp_path).id == first.id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host-id"]  # no temp file left


def test_concurrent_first_uses_agree_on_one_host_id(tmp_path: Path) -> None:
    for round_ in range(20):
        root = tmp_path / str(round_)
        root.mkdir()
        ids: list[str] = []
        barrier = threading.Barrier(4)

        def make(root: Path = root, barrier: threading.Barrier = barrier,
                 ids: list[str] = ids) -> None:
            barrier.wait()
            ids.append(load_host(root).id)
        threads = [threading.Thread(target=make) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(ids)) == 1 and ids[0] == (root / "host-id").read_text().strip()


def test_a_malformed_host_id_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "host-id").write_text("not-an-id\n")
    with pytest.raises(BadHostId, match=r"host-id does not hold 32 hex digits: remove it"):
        load_host(tmp_path)


def test_a_missing_data_directory_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(BadHostId, match="data directory exists"):
        load_host(tmp_path / "nowhere")
