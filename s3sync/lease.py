"""Which host may have a volume mounted: one lease object in the bucket, moved by conditional
writes.

``<prefix>/lease`` is a small JSON object (:data:`SCHEMA`)::

    {"pyvol_lease": 1, "generation": 7, "state": "pushing", "progress": "62%",
     "holder": {"id": "<32 hex>", "name": "host-a"}, "since": "2026-12-02T04:00:00+00:00",
     "ttl": 60, "nonce": "<32 hex>"}

Every change is a PUT conditioned on the version read or written last (If-Match on its
ETag; If-None-Match: * when there is none), so of two hosts that race, the store lets exactly
one write and the other sees 412 and looks again.  No host ever overwrites a lease it did not
read.  Every write carries a fresh random ``nonce``: an ETag then names one write, never a body
that could recur, and a write whose reply was lost is recognised as ours on the next read.

Time.  A lease is live until its object's LastModified plus ``ttl``, both on the *store's*
clock, compared with the store's ``Date`` of the read that judges it: hosts' clocks may
disagree, the store has one.  Both have whole seconds, so :data:`GRANULARITY` is subtracted
from what the holder counts on.  The holder itself only measures elapsed time since it sent
its last successful write (a monotonic clock): :meth:`Tenure.remaining`.

Generations.  Each take starts a new tenure with ``generation`` one above the last one the
object held (and above ``floor``, the highest generation any snapshot carries, so a deleted
lease object cannot bring an old generation back).  Renewals, state updates and release keep
it; a release leaves the object in place, free, so that the next take counts on from it.
Breaking by hand frees the lease and spends a generation, so the broken holder's generation is
never current again.  A snapshot written under generation ``g`` is the work of that tenure
only: fencing compares it with the lease's current generation.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, get_args

from s3sync.client import ObjectTooBig, Versioned
from s3sync.errors import BadLeaseObject, LeaseHeld, LeaseLost, StoreBusy
from s3sync.hostid import HOST_ID, Host
from s3sync.layout import Layout

SCHEMA = 1
State = Literal["free", "mounted", "pushing", "pulling"]
STATES: tuple[str, ...] = get_args(State)
MIN_TTL = 3.0
MAX_TTL = 3600.0
DEFAULT_TTL = 60.0
GRANULARITY = 1.0
"""Seconds: LastModified and Date carry whole seconds."""
MAX_GENERATION = 2 ** 53
MAX_NAME = 64
MAX_PROGRESS = 120
MAX_OBJECT = 4096
RACE_ROUNDS = 8
"""How often a take or break looks again after losing a conditional write to a racer."""
NONCE = re.compile(r"[0-9a-f]{32}")
FIELDS = frozenset({"pyvol_lease", "generation", "state", "progress", "holder", "since", "ttl",
                    "nonce"})


class LeaseBucket(Protocol):
    """What a lease needs of :class:`s3sync.client.Bucket`."""

    where: str

    def get_with_etag(self, key: str, limit: int = ...) -> Versioned | None: ...
    def put_new(self, key: str, body: bytes) -> str | None: ...
    def put_if_match(self, key: str, body: bytes, etag: str) -> str | None: ...
    def server_time(self) -> datetime: ...


@dataclass(frozen=True)
class Record:
    """The lease object's content."""

    generation: int
    state: State
    holder: Host | None
    """None exactly when ``state`` is "free"."""
    since: datetime | None
    """When the holder took it (store's clock)."""
    ttl: float
    progress: str = ""
    nonce: str = ""


@dataclass(frozen=True)
class LeaseInfo:
    """One read of the lease: its record, the version read, and the store's clock."""

    record: Record
    etag: str
    renewed: datetime
    """The object's LastModified: its holder's last write, on the store's clock."""
    now: datetime
    """The store's clock when it answered this read."""

    @property
    def generation(self) -> int:
        return self.record.generation

    @property
    def holder(self) -> Host | None:
        return self.record.holder

    @property
    def expires(self) -> datetime:
        return self.renewed + timedelta(seconds=self.record.ttl)

    @property
    def live(self) -> bool:
        """Held and not expired, by the store's clock at this read."""
        return self.record.holder is not None and self.now < self.expires

    def describe(self) -> str:
        """E.g. "held by host-a (host id 1f..) since 2026-12-02 04:00:00Z, pushing, 62%,
        until 2026-12-02 04:01:00Z unless renewed"."""
        r = self.record
        if r.holder is None:
            return f"free (generation {r.generation})"
        doing = r.state + (f", {r.progress}" if r.progress else "")
        since = _stamp(r.since) if r.since else "an unknown time"
        if self.live:
            until = f"until {_stamp(self.expires)} unless renewed"
        else:
            until = f"expired at {_stamp(self.expires)}"
        return (f"held by {r.holder.name} (host id {r.holder.id}) since {since}, {doing}, "
                f"{until} (generation {r.generation})")


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%SZ")


# -- the object's format -------------------------------------------------------------------

def encode(record: Record) -> bytes:
    holder = None if record.holder is None else {"id": record.holder.id,
                                                  "name": record.holder.name}
    return json.dumps({
        "pyvol_lease": SCHEMA, "generation": record.generation, "state": record.state,
        "progress": record.progress, "holder": holder,
        "since": record.since.isoformat() if record.since else None,
        "ttl": record.ttl, "nonce": record.nonce,
    }, sort_keys=True).encode()


def decode(data: bytes, key: str) -> Record:
    """The record in a lease object; raises :class:`BadLeaseObject` naming ``key``."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise _bad(key, "is not JSON") from None
    if not isinstance(doc, dict):
        raise _bad(key, "is not a JSON object")
    if doc.get("pyvol_lease") != SCHEMA:
        raise _bad(key, f"has lease format {str(doc.get('pyvol_lease'))[:20]!r}, "
                        f"this pyvol reads {SCHEMA}: upgrade pyvol or break the lease")
    if set(doc) != FIELDS:
        raise _bad(key, f"has fields {sorted(doc)[:12]}, expected {sorted(FIELDS)}")
    generation = doc["generation"]
    if type(generation) is not int or not 0 <= generation <= MAX_GENERATION:
        raise _bad(key, "has a generation that is not a whole number 0..2**53")
    state = doc["state"]
    if state not in STATES:
        raise _bad(key, f"has state {str(state)[:20]!r}, not one of {', '.join(STATES)}")
    ttl = doc["ttl"]
    if type(ttl) not in (int, float) or not MIN_TTL <= ttl <= MAX_TTL:
        raise _bad(key, f"has a ttl that is not {MIN_TTL:g}..{MAX_TTL:g} seconds")
    progress = _text(doc["progress"], MAX_PROGRESS, key, "progress")
    nonce = doc["nonce"]
    if not isinstance(nonce, str) or NONCE.fullmatch(nonce) is None:
        raise _bad(key, "has a nonce that is not 32 hex digits")
    holder = _holder(doc["holder"], key)
    since = _since(doc["since"], key)
    if (holder is None) != (state == "free") or (holder is None) != (since is None):
        raise _bad(key, "has a holder and a since time that do not match its state (both "
                        "must be set exactly when it is not free)")
    return Record(generation, state, holder, since, float(ttl), progress, nonce)


def _holder(value: Any, key: str) -> Host | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"id", "name"}:
        raise _bad(key, "has a holder that is not {id, name}")
    if not isinstance(value["id"], str) or HOST_ID.fullmatch(value["id"]) is None:
        raise _bad(key, "has a holder id that is not 32 hex digits")
    name = _text(value["name"], MAX_NAME, key, "holder name")
    if not name:
        raise _bad(key, "has an empty holder name")
    return Host(value["id"], name)


def _since(value: Any, key: str) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) and len(value) < 40 \
            else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise _bad(key, "has a since time that is not an ISO 8601 time with a zone")
    return when


def _text(value: Any, limit: int, key: str, what: str) -> str:
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise _bad(key, f"has a {what} that is not printable text of at most {limit} "
                        "characters")
    return value


def _bad(key: str, what: str) -> BadLeaseObject:
    return BadLeaseObject(f"lease object {key} {what}; it was not written by pyvol: if no "
                          "host has the volume mounted, `pyvol lease break VOLUME --yes` "
                          "replaces it with a free lease")


def printable(text: str, limit: int) -> str:
    """``text`` cut to what a lease object may hold."""
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


# -- the operations ------------------------------------------------------------------------

class Lease:
    """The lease of one volume (one prefix of one bucket), seen from one host."""

    def __init__(self, bucket: LeaseBucket, layout: Layout, host: Host, *, volume: str,
                 ttl: float = DEFAULT_TTL) -> None:
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"lease ttl {ttl} is not {MIN_TTL:g}..{MAX_TTL:g} seconds")
        self.bucket = bucket
        self.key = layout.lease
        self.host = host
        self.volume = volume
        self.ttl = ttl

    def show(self) -> LeaseInfo | None:
        """The lease as the bucket has it now, or None if there is none yet.

        Raises :class:`BadLeaseObject` if the object is malformed.
        """
        try:
            raw = self.bucket.get_with_etag(self.key, MAX_OBJECT)
        except ObjectTooBig:
            raise _bad(self.key, f"is over {MAX_OBJECT} bytes") from None
        return self._parse(raw)

    def take(self, state: State = "mounted", progress: str = "", *, floor: int = 0) -> Tenure:
        """Hold the lease, as a new tenure (a new generation).

        Free, expired or held by this host (e.g. before a restart): taken.  Held by another
        host and live: :class:`LeaseHeld`, naming it.  Malformed: :class:`BadLeaseObject`.
        ``floor``: the highest generation any snapshot of the volume carries.
        """
        if state == "free":
            raise ValueError("a lease is taken to be mounted, pushing or pulling, not free")
        for _ in range(RACE_ROUNDS):
            current = self.show()
            if (current is not None and current.live and current.holder is not None
                    and current.holder.id != self.host.id):
                raise self._held(current)
            last = current.generation if current is not None else 0
            since = current.now if current is not None else self.bucket.server_time()
            record = Record(max(last, floor) + 1, state, self.host, since, self.ttl,
                            printable(progress, MAX_PROGRESS), secrets.token_hex(16))
            sent = time.monotonic()
            etag = self._put(record, current.etag if current is not None else None)
            if etag is not None:
                return Tenure(self, record, etag, sent, previous=last)
        raise StoreBusy(f"the lease of {self.volume} ({self.bucket.where}, {self.key}) kept "
                        f"changing under {RACE_ROUNDS} attempts to take it: try again")

    def break_(self, *, floor: int = 0) -> LeaseInfo | None:
        """Free the lease whoever holds it, spending a generation so its holder is fenced.

        By hand only: the holder, if still running, loses its lease at its next write.  A
        malformed lease object is replaced too (its generation is unknown: ``floor`` must be
        the highest generation any snapshot carries).  Returns the lease as it was, or None if
        there was none (then nothing is written).
        """
        for _ in range(RACE_ROUNDS):
            before: LeaseInfo | None = None
            try:
                raw = self.bucket.get_with_etag(self.key, MAX_OBJECT)
                if raw is None:
                    return None
                etag = raw.etag
                before = self._parse(raw)
            except ObjectTooBig as exc:
                etag = exc.etag
            except BadLeaseObject:
                pass
            last = before.generation if before is not None else 0
            ttl = before.record.ttl if before is not None else self.ttl
            record = Record(max(last, floor) + 1, "free", None, None, ttl, "",
                            secrets.token_hex(16))
            if self._put(record, etag) is not None:
                return before
        raise StoreBusy(f"the lease of {self.volume} ({self.bucket.where}, {self.key}) kept "
                        f"changing under {RACE_ROUNDS} attempts to break it: try again")

    def _put(self, record: Record, etag: str | None) -> str | None:
        """The new ETag, or None if the lease changed since ``etag`` (and not by this write)."""
        body = encode(record)
        if etag is None:
            new = self.bucket.put_new(self.key, body)
        else:
            new = self.bucket.put_if_match(self.key, body, etag)
        if new is not None:
            return new
        # A 412 may answer a retry of our own write whose first reply was lost.
        again = self.bucket.get_with_etag(self.key, MAX_OBJECT)
        if again is not None and _nonce(again.data) == record.nonce:
            return again.etag
        return None

    def _parse(self, raw: Versioned | None) -> LeaseInfo | None:
        if raw is None:
            return None
        return LeaseInfo(decode(raw.data, self.key), raw.etag, raw.modified, raw.now)

    def _held(self, current: LeaseInfo) -> LeaseHeld:
        return LeaseHeld(
            f"{self.volume} is in use on another host: its lease is {current.describe()} "
            "(store's clock): unmount it there first; if that host is gone, wait for the "
            f"lease to expire or free it with `pyvol lease break {self.volume} --yes`")


def _nonce(data: bytes) -> str | None:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    value = doc.get("nonce") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


class Tenure:
    """A lease this host holds: one generation, from a take to a release or a loss.

    Thread-safe: a renewal thread and the code reporting progress may share it.  Every method
    that writes raises :class:`LeaseLost` (and writes nothing) once another write came in
    between, and from then on: a lost tenure is never taken back by overwriting.
    """

    def __init__(self, lease: Lease, record: Record, etag: str, sent: float, *,
                 previous: int = 0) -> None:
        self.previous = previous
        """The lease's generation when this tenure took it: the last tenure before this one
        (0: none).  A host whose own last tenure it is not was taken over meanwhile."""
        self._lease = lease
        self._record = record
        self._etag = etag
        self._sent = sent
        self._lost: str | None = None
        self._pending: Record | None = None
        """A write that failed without an answer: it may have landed."""
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        return self._record.generation

    @property
    def record(self) -> Record:
        return self._record

    def remaining(self) -> float:
        """Seconds (this host's monotonic clock) until another host may judge it expired.

        Counted from when the last successful write was *sent*, less :data:`GRANULARITY`:
        another host can never see it expired earlier.  At 0 or below, stop writing.
        """
        return self._sent + self._record.ttl - GRANULARITY - time.monotonic()

    def renew(self) -> None:
        """Push the expiry out by ``ttl``; call every ttl/3 or so."""
        self._write(lambda r: r)

    def update(self, state: State, progress: str = "") -> None:
        """Say what this host is doing with the volume (shown to a host that is refused)."""
        if state == "free":
            raise ValueError("release() frees a lease, update() does not")
        self._write(lambda r: replace(r, state=state,
                                      progress=printable(progress, MAX_PROGRESS)))

    def release(self) -> None:
        """Free the lease, keeping its generation; the tenure is over."""
        self._write(lambda r: replace(r, state="free", holder=None, since=None, progress=""))
        with self._lock:
            self._lost = "it was released"

    def confirm(self) -> LeaseInfo:
        """Read the lease and prove this tenure still holds it; raises :class:`LeaseLost`.

        For the last step before making data the volume's latest (with the generation check
        that fencing does on top: a confirm is a look, not a lock).
        """
        with self._lock:
            self._check()
            current = self._lease.show()
            if current is None or current.etag != self._etag:
                raise self._loss(current)
            return current

    def _write(self, change: Callable[[Record], Record]) -> None:
        with self._lock:
            self._check()
            if self._pending is not None:
                self._adopt(self._pending)
            record = replace(change(self._record), nonce=secrets.token_hex(16))
            sent = time.monotonic()
            try:
                etag = self._lease._put(record, self._etag)
            except Exception:
                self._pending = record
                raise
            if etag is None:
                try:
                    current = self._lease.show()
                except BadLeaseObject:
                    current = None
                raise self._loss(current)
            self._record, self._etag, self._sent = record, etag, sent

    def _adopt(self, pending: Record) -> None:
        """If the write that failed last did land, carry on from it (its send time unknown,
        :meth:`remaining` keeps counting from the write before)."""
        raw = self._lease.bucket.get_with_etag(self._lease.key, MAX_OBJECT)
        if raw is not None and _nonce(raw.data) == pending.nonce:
            self._record, self._etag = pending, raw.etag
        self._pending = None

    def _check(self) -> None:
        if self._lost is not None:
            raise LeaseLost(f"{self._lease.volume}: this host's lease (generation "
                            f"{self.generation}) is over: {self._lost}; take it again")

    def _loss(self, current: LeaseInfo | None) -> LeaseLost:
        if current is None:
            now = "the lease object is gone or unreadable"
        elif current.holder is None:
            now = f"it was freed (broken by hand?) and is now {current.describe()}"
        else:
            now = f"it is now {current.describe()}"
        self._lost = now
        return LeaseLost(
            f"{self._lease.volume}: this host lost its lease (generation {self.generation}): "
            f"{now}; stop writing to the volume here: what this host writes from now on "
            "will not become the volume's latest snapshot; unmount and mount again to take "
            "the lease back once it is free")
