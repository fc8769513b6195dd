"""The durable push queue: its states, its transitions, and the ones it refuses."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from plugin.options import S3Policy
from plugin.state import StateStore
from plugin.sync.queue import IllegalTransition, PushQueue, push_state

POLICY = S3Policy(bucket="b", prefix="v", keep=3)


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[PushQueue]:
    state = StateStore(tmp_path / "state.db")
    yield PushQueue(state)
    state.close()


def test_a_push_goes_idle_requested_captured_idle(queue: PushQueue) -> None:
    assert push_state(queue.get("v")) == "idle"
    queue.request("v", POLICY)
    assert push_state(queue.get("v")) == "requested"
    queue.captured("v", "sync-1")
    assert push_state(queue.get("v")) == "captured"
    done = queue.pushed("v", "sync-1", "r1")
    assert done is not None and push_state(done) == "idle"
    assert (done.last_id, done.snapshot, done.keep) == ("r1", "sync-1", 3)


def test_a_failure_keeps_the_state_and_says_why(queue: PushQueue) -> None:
    queue.request("v", POLICY)
    failed = queue.failed("v", "bucket unreachable")
    assert push_state(failed) == "requested" and failed.last_error == "bucket unreachable"
    queue.captured("v", "sync-1")
    assert push_state(queue.failed("v", "again")) == "captured"
    pushed = queue.pushed("v", "sync-1", "r1")
    assert pushed is not None and pushed.last_error is None


def test_a_request_during_an_upload_stays_pending_after_it(queue: PushQueue) -> None:
    queue.request("v", POLICY)
    queue.captured("v", "sync-1")
    queue.request("v", POLICY)  # while sync-1 uploads
    after = queue.pushed("v", "sync-1", "r1")
    assert after is not None and push_state(after) == "requested"


def test_a_lost_snapshot_ends_the_push_with_an_error(queue: PushQueue) -> None:
    queue.request("v", POLICY)
    queue.captured("v", "sync-1")
    lost = queue.lost("v", "snapshot gone")
    assert push_state(lost) == "idle" and lost.last_error == "snapshot gone"


def test_illegal_transitions_raise(queue: PushQueue) -> None:
    with pytest.raises(IllegalTransition, match="no record"):
        queue.captured("v", "sync-1")
    queue.attach("v", POLICY)
    for transition in (lambda: queue.captured("v", "s"), lambda: queue.failed("v", "x"),
                       lambda: queue.lost("v", "x")):
        with pytest.raises(IllegalTransition, match="from idle"):
            transition()
    queue.request("v", POLICY)
    with pytest.raises(IllegalTransition, match="lost from requested"):
        queue.lost("v", "x")
    queue.captured("v", "sync-1")
    with pytest.raises(IllegalTransition, match="captured from captured"):
        queue.captured("v", "sync-2")


def test_a_forgotten_record_makes_a_finished_upload_a_no_op(queue: PushQueue) -> None:
    queue.request("v", POLICY)
    queue.captured("v", "sync-1")
    queue.forget("v")
    assert queue.pushed("v", "sync-1", "r1") is None
    assert queue.get("v") is None


def test_a_removed_volumes_push_ending_during_a_create_of_its_name_keeps_the_restore(
        queue: PushQueue) -> None:
    """The CI failure of 2026-12-02: `docker volume rm` then `create` of the same name while
    the removed volume's last push still uploaded.  The upload ended inside the create (its
    record committed, flagged creating), took the volume for removed, and dropped the sync
    record with the restore the create had asked for: the new volume mounted empty."""
    from plugin.state import VolumeRecord

    queue.request("v", POLICY)
    queue.captured("v", "sync-1")  # the removed volume's last push, uploading
    restore = S3Policy(bucket="b", prefix="v", keep=3, restore="latest")
    queue.state.add_volume(VolumeRecord(name="v", backend="local"), creating=True,
                           sync=queue.for_create("v", restore))
    done = queue.pushed("v", "sync-1", "r1")  # the upload ends
    assert done is not None and done.restoring == "latest"
    assert not queue.forget_if_removed("v")
    after = queue.get("v")
    assert after is not None and after.restoring == "latest" and push_state(after) == "idle"


def test_a_removed_volumes_finished_push_forgets_its_record(queue: PushQueue) -> None:
    queue.request("v", POLICY)
    queue.captured("v", "sync-1")
    queue.pushed("v", "sync-1", "r1")
    assert queue.forget_if_removed("v")
    assert queue.get("v") is None


def test_record_changes_from_many_threads_are_never_lost(queue: PushQueue) -> None:
    """Each transition reads and writes the record in one transaction: a push ending on
    one thread cannot write back a record read before another thread's change."""
    import threading

    queue.attach("v", POLICY)
    requests = 0
    lost: list[str] = []

    def pushes() -> None:
        nonlocal requests
        for i in range(200):
            queue.request("v", POLICY)
            queue.captured("v", f"sync-{i}")
            queue.pushed("v", f"sync-{i}", f"r{i}")
            requests += 1

    def restores() -> None:
        for _ in range(200):
            queue.state.update_sync("v", lambda r: replace(r, restoring="latest"))
            record = queue.get("v")
            if record is None or record.restoring != "latest":
                lost.append("a push wrote back a record read before the restore marker")
            queue.restored("v", at_create=False, remote_id=None)

    threads = [threading.Thread(target=pushes), threading.Thread(target=restores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert requests == 200 and lost == []
    final = queue.get("v")
    assert final is not None and final.last_id == "r199" and final.restoring is None


def test_a_finished_push_keeps_a_newer_sync_snapshot_not_yet_recorded(tmp_path: Path) -> None:
    """Push A finishes while push B's capture has committed its snapshot but not yet told
    the queue (an image volume's view is still being released): B's snapshot must stay, or B
    finds it gone and uploads nothing."""
    from plugin.sync.push import drop_sync_snapshots
    from snapshots.store import SnapshotStore

    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    store = SnapshotStore(tmp_path / "root")
    for name in ("sync-1-older", "sync-2-pushed", "sync-3-newer"):
        store.create("v", data, name, kind="sync")
    store.create("v", data, "manual", kind="manual")
    drop_sync_snapshots(store, "v", pushed="sync-2-pushed", keep={"sync-2-pushed", None})
    assert [s.name for s in store.list_snapshots("v")] == [
        "sync-2-pushed", "sync-3-newer", "manual"]
