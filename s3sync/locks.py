"""Keeping prune's sweep away from running pushes.

In this process, one :class:`threading.Lock` per (endpoint, bucket, prefix) serialises push,
prune and delete_all.  Across processes and hosts, each push and prune writes an empty marker
object ``locks/<kind>-<uuid>``, lists the markers, and only then starts; each keeps its
marker fresh while it runs.  Both write before they look, so of a push and a prune that
overlap at least one sees the other: prune then skips its sweep, and a push waits for the
prune to finish.  A marker not refreshed for :data:`STALE` seconds is a crashed run's leftover.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from s3sync.client import Bucket, ObjectInfo
from s3sync.errors import StoreBusy
from s3sync.layout import Layout

REFRESH = 120.0
STALE = timedelta(minutes=15)
PRUNE_STALE = timedelta(seconds=2 * REFRESH + 30)
"""A push stops waiting for a prune marker not refreshed for two refresh periods: a prune
that crashed, or whose marker delete failed, must not block pushes for :data:`STALE`."""
PRUNE_WAIT = 60.0

_registry: dict[tuple[str, str, str, str], threading.Lock] = {}
_registry_lock = threading.Lock()


def local_lock(endpoint: str, bucket: str, prefix: str, kind: str = "data") -> threading.Lock:
    """The lock of one store in this process: ``data`` (push, prune, delete_all) or ``keys``
    (adding and removing passphrases, which must not wait for a push)."""
    key = (endpoint, bucket, prefix.strip("/"), kind)
    with _registry_lock:
        return _registry.setdefault(key, threading.Lock())


@dataclass(frozen=True)
class Held:
    key: str
    started: datetime
    """The marker's LastModified: when this run began, on the store's clock."""
    others: tuple[ObjectInfo, ...]
    """Live markers of other runs seen right after ours was written."""

    def running(self, kind: str, within: timedelta = STALE) -> list[ObjectInfo]:
        return [o for o in self.others if o.key.rsplit("/", 1)[-1].startswith(kind + "-")
                and self.started - o.modified < within]


def _look(bucket: Bucket, layout: Layout, own: str) -> tuple[datetime, tuple[ObjectInfo, ...]]:
    markers = [m for m in bucket.list(layout.locks) if layout.own_lock(m.key)]
    mine = next((m for m in markers if m.key == own), None)
    if mine is None:
        raise StoreBusy(f"lock marker {own} vanished right after it was written; "
                        "another client may be deleting this prefix: try again later")
    others = tuple(m for m in markers if m.key != own and mine.modified - m.modified < STALE)
    return mine.modified, others


@contextmanager
def remote_lock(bucket: Bucket, layout: Layout, kind: Literal["push", "prune"]) -> Iterator[Held]:
    key = layout.lock(f"{kind}-{uuid.uuid4().hex}")
    bucket.put(key, b"")
    stop = threading.Event()
    try:  # from here on the marker exists and must go
        started, others = _look(bucket, layout, key)
        held = Held(key, started, others)
        if kind == "push":
            deadline = time.monotonic() + PRUNE_WAIT
            while held.running("prune", PRUNE_STALE):
                if time.monotonic() > deadline:
                    raise StoreBusy(
                        f"a prune of {bucket.where}/{layout.root} is still running "
                        f"({held.running('prune', PRUNE_STALE)[0].key}); push again in a minute")
                time.sleep(1.0)
                latest, others = _look(bucket, layout, key)
                held = Held(key, latest, others)
            held = Held(key, started, held.others)
        refresher = threading.Thread(target=_refresh, args=(bucket, key, stop), daemon=True,
                                     name=f"s3-lock-{kind}")
        refresher.start()
        yield held
    finally:
        stop.set()
        # Retried like any write; a marker still left behind only delays sweeps until it is
        # STALE, and pushes until PRUNE_STALE.
        with contextlib.suppress(Exception):
            bucket.delete([key])


def _refresh(bucket: Bucket, key: str, stop: threading.Event) -> None:
    while not stop.wait(REFRESH):
        try:
            bucket.put(key, b"")
        except Exception:  # noqa: S112 -- retried at the next tick; STALE is 7 ticks away
            continue
