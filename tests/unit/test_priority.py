"""Background work runs lowered; a lowered thread commits state at normal priority."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backends.priority import IOPRIO_CLASS_IDLE, current, lower_priority, lowered, normal
from plugin.jobs import Jobs
from plugin.state import StateStore, VolumeRecord

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="raising priority back needs root")


def in_thread(work: object) -> object:
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result()  # type: ignore[arg-type]


def test_lowered_restores_the_threads_priorities() -> None:
    def work() -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        before = current()
        with lowered():
            inside = current()
        return before, inside, current()

    before, inside, after = in_thread(work)  # type: ignore[misc]
    assert inside == (19, IOPRIO_CLASS_IDLE)
    assert after == before != inside


def test_normal_raises_a_lowered_thread_for_the_block_only() -> None:
    def work() -> tuple[tuple[int, int], tuple[int, int]]:
        lower_priority()
        with normal():
            inside = current()
        return inside, current()

    inside, after = in_thread(work)  # type: ignore[misc]
    assert inside[0] == 0 and inside[1] != IOPRIO_CLASS_IDLE
    assert after == (19, IOPRIO_CLASS_IDLE)


def test_job_threads_run_lowered() -> None:
    jobs = Jobs(workers=1)
    seen: list[tuple[int, int]] = []
    jobs.submit("v", "probe", lambda: seen.append(current())).result(10)
    jobs.shutdown()
    assert seen == [(19, IOPRIO_CLASS_IDLE)]


def test_state_commit_from_a_lowered_thread_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.add_volume(VolumeRecord(name="a", backend="local"))

    def work() -> int:
        lower_priority()
        return store.add_mount("a", "m1")

    assert in_thread(work) == 1
    store.close()
    again = StateStore(path)
    assert again.mount_count("a") == 1
    again.close()
