"""snapshots.store.SnapshotStore, and the snapshot verbs of the driver.

What a user relies on: a snapshot is complete, read-only and independent of later writes;
unchanged files cost nothing; retention drops automatic snapshots only; removing a snapshot
frees only what no other one uses; a restart sees the same snapshots; and a kill at any
instant leaves each snapshot complete or absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import snapshots.store as snapshots_module
from backends.errors import BackendError
from backends.tree import Entry, clone_or_copy, scan
from plugin.driver import Driver
from plugin.errors import InvalidName, InvalidOption, PyvolError, VolumeInUse, VolumeNotFound
from snapshots.store import SnapshotExists, SnapshotNotFound, SnapshotStore
from tests.support.trees import describe, inodes

VOL = "vol"


# helpers: what a user sees of a tree, and of the store on disk


def settle() -> None:
    """Let ctime move past the store's racy window (snapshots.store.RACY_NS): files changed
    within it are stored again by the next snapshot rather than trusted to be unchanged."""
    time.sleep(snapshots_module.RACY_NS / 1e9 + 0.05)


def fill(data: Path) -> None:
    data.mkdir(parents=True, exist_ok=True)
    (data / "a.txt").write_bytes(b"a" * 1000)
    (data / "b.txt").write_bytes(b"b" * 2000)
    (data / "sub").mkdir()
    (data / "sub" / "c.bin").write_bytes(os.urandom(50_000))
    os.link(data / "sub" / "c.bin", data / "sub" / "d-link.bin")
    (data / "shadow").symlink_to("/etc/shadow")
    os.mkfifo(data / "fifo")
    os.chmod(data / "sub", 0o2750)  # noqa: S103 -- a setgid directory, the metadata under test


def objects_dir(store: SnapshotStore, volume: str = VOL) -> Path:
    return store.root / volume / "objects"


def object_files(store: SnapshotStore, volume: str = VOL) -> dict[str, Path]:
    objects = objects_dir(store, volume)
    return {p.name: p for p in objects.rglob("*") if p.is_file()} if objects.is_dir() else {}


def refs(store: SnapshotStore, name: str, volume: str = VOL) -> dict[str, str]:
    return {e.path: e.ref for e in store.entries(volume, name) if e.ref}


def referenced(store: SnapshotStore, volume: str = VOL) -> set[str]:
    return {ref for info in store.list_snapshots(volume)
            for ref in refs(store, info.name, volume).values()}


def restore(store: SnapshotStore, name: str, dst: Path, volume: str = VOL) -> Path:
    dst.mkdir()
    store.populate_from(volume, name)(dst)
    return dst


def names(store: SnapshotStore, volume: str = VOL) -> list[str]:
    return [i.name for i in store.list_snapshots(volume)]


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "root")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    fill(tmp_path / "data")
    settle()
    return tmp_path / "data"


# capture, content and independence


def test_snapshot_restores_the_tree_exactly(store: SnapshotStore, data: Path,
                                            tmp_path: Path) -> None:
    before = describe(data)
    info = store.create(VOL, data, "s1")
    assert (info.volume, info.name, info.kind) == (VOL, "s1", "manual")
    assert (info.files, info.size) == (3, 1000 + 2000 + 50_000)  # the hard link counted once
    assert info.copied_bytes == info.size
    assert info.method in ("copy", "reflink")
    assert store.list_snapshots(VOL) == [info]
    assert describe(restore(store, "s1", tmp_path / "r")) == before
    assert len(object_files(store)) == 3  # one object per inode, none for links or fifos


def test_unchanged_files_reuse_objects_changed_files_get_new_ones(
        store: SnapshotStore, data: Path) -> None:
    store.create(VOL, data, "s1")
    (data / "b.txt").write_bytes(b"B" * 2000)  # same size, new content
    (data / "new.txt").write_bytes(b"new")
    (data / "a.txt").chmod(0o600)  # metadata only: still a new ctime, so stored anew
    s2 = store.create(VOL, data, "s2")
    r1, r2 = refs(store, "s1"), refs(store, "s2")
    assert r2["sub/c.bin"] == r1["sub/c.bin"]
    assert r2["b.txt"] != r1["b.txt"]
    assert "new.txt" in r2
    assert s2.copied_bytes == 1000 + 2000 + 3
    assert len(object_files(store)) == 3 + 3


def test_a_snapshot_of_an_unchanged_volume_stores_nothing(store: SnapshotStore,
                                                          data: Path) -> None:
    store.create(VOL, data, "s1")
    before = set(object_files(store))
    s2 = store.create(VOL, data, "s2")
    assert (s2.copied_bytes, s2.method) == (0, "none")
    assert refs(store, "s2") == refs(store, "s1")
    assert set(object_files(store)) == before


def test_no_inode_is_shared_between_the_volume_and_its_snapshots(
        store: SnapshotStore, data: Path, tmp_path: Path) -> None:
    store.create(VOL, data, "s1")
    (data / "a.txt").write_bytes(b"changed")
    store.create(VOL, data, "s2")
    objects = {(p.stat().st_dev, p.stat().st_ino) for p in object_files(store).values()}
    assert objects.isdisjoint(inodes(data))
    assert all(p.stat().st_nlink == 1 for p in object_files(store).values())
    restored = restore(store, "s1", tmp_path / "r")
    assert inodes(restored).isdisjoint(objects | inodes(data))


def test_snapshot_objects_are_read_only(store: SnapshotStore, data: Path) -> None:
    store.create(VOL, data, "s1")
    for path in object_files(store).values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o400


def test_in_place_writes_after_a_snapshot_never_reach_it(store: SnapshotStore, data: Path,
                                                         tmp_path: Path) -> None:
    original = (data / "sub" / "c.bin").read_bytes()
    expected = describe(data)
    store.create(VOL, data, "s1")
    st = (data / "sub" / "c.bin").stat()
    with open(data / "sub" / "c.bin", "r+b") as f:  # overwrite in place, same size
        f.write(b"X" * len(original))
    os.utime(data / "sub" / "c.bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # hide the mtime
    with open(data / "a.txt", "r+b") as f:
        f.truncate(10)
    assert describe(restore(store, "s1", tmp_path / "r1")) == expected
    view = store.view(VOL, "s1")
    entry = next(e for e in view.entries() if e.path == "sub/c.bin")
    with view.open(entry) as f:
        assert f.read() == original
    # and the next snapshot does see the write, although size and mtime are unchanged
    store.create(VOL, data, "s2")
    assert (restore(store, "s2", tmp_path / "r2") / "sub" / "c.bin").read_bytes() == \
        b"X" * len(original)


def test_a_rewrite_within_the_timestamp_granularity_still_reaches_the_next_snapshot(
        store: SnapshotStore, data: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Racy files: on a filesystem (or kernel before 6.13) whose ctime ticks coarsely, a file
    changed again within the tick of the previous snapshot keeps (ino, size, mtime, ctime).
    The store must not trust the change key of a file that changed that recently."""
    frozen_ctime = time.time_ns()
    real_scan = scan

    def coarse_scan(root: Path) -> Iterator[Entry]:
        for entry in real_scan(root):
            yield Entry(**{**entry.__dict__, "ctime_ns": frozen_ctime})

    monkeypatch.setattr(snapshots_module, "scan", coarse_scan)
    target = data / "b.txt"
    st = target.stat()
    store.create(VOL, data, "s1")
    with open(target, "r+b") as f:
        f.write(b"Z" * 2000)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    store.create(VOL, data, "s2")
    assert (restore(store, "s2", tmp_path / "r2") / "b.txt").read_bytes() == b"Z" * 2000
    assert (restore(store, "s1", tmp_path / "r1") / "b.txt").read_bytes() == b"b" * 2000


def test_a_file_changed_just_before_a_snapshot_is_stored_again_once(
        store: SnapshotStore, data: Path) -> None:
    (data / "a.txt").write_bytes(b"fresh")  # within the racy window of s1
    store.create(VOL, data, "s1")
    settle()
    s2 = store.create(VOL, data, "s2")
    assert (s2.copied_bytes, refs(store, "s2")["sub/c.bin"]) == (5, refs(store, "s1")["sub/c.bin"])
    assert refs(store, "s2")["a.txt"] != refs(store, "s1")["a.txt"]
    s3 = store.create(VOL, data, "s3")
    assert (s3.copied_bytes, s3.method) == (0, "none")


def test_symlinks_are_stored_as_links_never_followed(store: SnapshotStore, data: Path,
                                                     tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret outside the volume")
    (data / "escape").symlink_to(outside)
    store.create(VOL, data, "s1")
    entries = {e.path: e for e in store.entries(VOL, "s1")}
    assert (entries["shadow"].kind, entries["shadow"].target) == ("symlink", "/etc/shadow")
    assert entries["escape"].kind == "symlink"
    assert not any(p.startswith("escape/") for p in entries)
    for obj in object_files(store).values():
        assert obj.read_bytes() != b"secret outside the volume"
    restored = restore(store, "s1", tmp_path / "r")
    assert os.readlink(restored / "shadow") == "/etc/shadow"
    assert os.readlink(restored / "escape") == str(outside)


# names and errors


def test_names_are_unique_and_errors_change_nothing(store: SnapshotStore, data: Path) -> None:
    store.create(VOL, data, "s1")
    before = (names(store), set(object_files(store)))
    (data / "a.txt").write_bytes(b"other")
    with pytest.raises(SnapshotExists, match=f"{VOL}@s1 already exists"):
        store.create(VOL, data, "s1")
    with pytest.raises(SnapshotNotFound, match=f"{VOL}@nope not found"):
        store.get(VOL, "nope")
    with pytest.raises(SnapshotNotFound):
        store.remove(VOL, "nope")
    with pytest.raises(SnapshotNotFound):
        store.populate_from(VOL, "nope")
    with pytest.raises(SnapshotNotFound):
        store.entries("other-volume", "s1")
    assert (names(store), set(object_files(store))) == before


def test_default_names_sort_chronologically(store: SnapshotStore, data: Path) -> None:
    made = [store.create(VOL, data).name for _ in range(5)]
    assert made == sorted(made)
    assert names(store) == made


# retention and removal


def test_prune_keeps_the_newest_automatic_and_never_manual_ones(store: SnapshotStore,
                                                                data: Path) -> None:
    kinds = ["automatic", "manual", "automatic", "safety", "automatic", "automatic", "manual",
             "automatic"]
    for i, kind in enumerate(kinds):
        (data / "a.txt").write_bytes(b"%d" % i)
        store.create(VOL, data, f"s{i}", kind=kind)  # type: ignore[arg-type]
    dropped = store.prune(VOL, 2)
    assert dropped == ["s0", "s2", "s4"]
    assert names(store) == ["s1", "s3", "s5", "s6", "s7"]
    assert store.prune(VOL, 2) == []
    assert store.prune(VOL, 1) == ["s5"]
    assert [i.kind for i in store.list_snapshots(VOL)] == [
        "manual", "safety", "manual", "automatic"]
    assert set(object_files(store)) == referenced(store)


def test_remove_frees_only_objects_no_other_snapshot_uses(store: SnapshotStore, data: Path,
                                                          tmp_path: Path) -> None:
    store.create(VOL, data, "s1")
    (data / "b.txt").write_bytes(b"second")
    expected2 = describe(data)
    store.create(VOL, data, "s2")
    r1, r2 = refs(store, "s1"), refs(store, "s2")
    store.remove(VOL, "s1")
    assert names(store) == ["s2"]
    assert set(object_files(store)) == set(r2.values())
    assert r1["b.txt"] not in object_files(store)
    assert not (store.root / VOL / "entries" / "s1.json").exists()
    assert describe(restore(store, "s2", tmp_path / "r")) == expected2
    store.remove(VOL, "s2")
    assert names(store) == []
    assert object_files(store) == {}


def test_discard_takes_snapshots_away_at_once_and_purge_deletes_them(
        store: SnapshotStore, data: Path, tmp_path: Path) -> None:
    store.create(VOL, data, "s1")
    store.create("other", data, "s1")
    before = set(object_files(store).values())
    store.discard(VOL)
    assert names(store) == [] and store.volumes() == {"other"}
    assert all(not p.exists() for p in before)  # renamed away whole, not deleted yet
    assert list((store.root / ".removing").rglob("*/objects/*/*")) != []
    store.create(VOL, data, "s1")  # a new volume of the same name starts afresh
    assert names(store) == ["s1"]
    store.purge()
    assert list((store.root / ".removing").iterdir()) == []
    assert names(store) == ["s1"] and names(store, "other") == ["s1"]
    assert describe(restore(store, "s1", tmp_path / "back")) == describe(data)


def test_discard_keeps_the_kinds_asked_and_purge_sweeps_only_the_others(
        store: SnapshotStore, data: Path, tmp_path: Path) -> None:
    store.create(VOL, data, "pushed", kind="sync")
    (data / "only-in-manual").write_text("m")
    store.create(VOL, data, "m1")
    store.discard(VOL, keep_kinds=frozenset({"sync"}))
    assert names(store) == ["pushed"]
    assert len(object_files(store)) == 4  # the manual one's own object: swept later
    store.purge()
    assert len(object_files(store)) == 3
    back = describe(restore(store, "pushed", tmp_path / "back"))
    now = describe(data)
    del now["only-in-manual"], now["."], back["."]  # the root's mtime moved with the file
    assert back == now


def test_remove_all_removes_every_snapshot(store: SnapshotStore, data: Path) -> None:
    store.create(VOL, data, "s1")
    store.create("other", data, "s1")
    store.remove_all(VOL)
    assert names(store) == []
    assert store.volumes() == {"other"}
    assert names(store, "other") == ["s1"]
    assert len(object_files(store, "other")) == 3


# restart and crashes


def test_a_new_store_over_the_same_root_sees_the_same_snapshots(
        store: SnapshotStore, data: Path, tmp_path: Path) -> None:
    expected = describe(data)
    s1 = store.create(VOL, data, "s1", kind="automatic")
    (data / "a.txt").write_bytes(b"x")
    settle()
    s2 = store.create(VOL, data, "s2")
    again = SnapshotStore(store.root.parent)
    assert again.list_snapshots(VOL) == [s1, s2]
    assert again.entries(VOL, "s1") == store.entries(VOL, "s1")
    assert describe(restore(again, "s1", tmp_path / "r")) == expected
    (data / "b.txt").write_bytes(b"y")
    s3 = again.create(VOL, data, "s3")  # incremental across the restart
    assert s3.copied_bytes == 1


def test_leftovers_of_an_interrupted_snapshot_never_list_and_are_swept(
        store: SnapshotStore, data: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    expected = describe(data)
    store.create(VOL, data, "s1")
    kept = set(object_files(store))
    (data / "big.bin").write_bytes(os.urandom(100_000))

    class Killed(BaseException):
        pass

    def die(*args: object, **kwargs: object) -> None:
        raise Killed

    monkeypatch.setattr(snapshots_module, "write_atomic", die)  # dies at the commit point
    with pytest.raises(Killed):
        store.create(VOL, data, "s2")
    monkeypatch.undo()
    catalog = store.root / VOL / "catalog"
    (catalog / ".s3.json.tmp").write_bytes(b'{"half": ')  # a catalog write cut short
    assert (store.root / VOL / "entries" / "s2.json").exists()
    assert len(object_files(store)) > len(kept)

    restarted = SnapshotStore(store.root.parent)
    assert names(restarted) == ["s1"]
    with pytest.raises(SnapshotNotFound):
        restarted.populate_from(VOL, "s2")
    restarted.recover()
    assert set(object_files(restarted)) == kept
    assert sorted(p.name for p in (store.root / VOL / "entries").iterdir()) == ["s1.json"]
    assert sorted(p.name for p in catalog.iterdir()) == ["s1.json"]
    assert describe(restore(restarted, "s1", tmp_path / "r")) == expected
    restarted.create(VOL, data, "s2")  # the name is free again
    assert names(restarted) == ["s1", "s2"]


class SimulatedKill(BaseException):
    """kill -9 at this instant: no except clause catches it, no cleanup runs."""


MUTATORS = ("mkdir", "rename", "replace", "unlink", "rmdir", "fsync", "copy_file_range",
            "write", "chmod", "ftruncate")


@contextlib.contextmanager
def kill_at(n: int) -> Iterator[list[int]]:
    """Let n-1 filesystem mutations happen, then die at the n-th (and at any later one)."""
    calls = [0]
    originals = {name: getattr(os, name) for name in MUTATORS}
    real_open = os.open

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def mutation(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] >= n:
                raise SimulatedKill(f"killed at os.{name}{args[:2]}")
            return fn(*args, **kwargs)
        return mutation

    def opener(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            return int(wrap("open", real_open)(path, flags, *args, **kwargs))
        return real_open(path, flags, *args, **kwargs)

    for name, fn in originals.items():
        setattr(os, name, wrap(name, fn))
    os.open = opener
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(os, name, fn)
        os.open = real_open


def crash_everywhere(tmp_path: Path, prepare: Callable[[SnapshotStore, Path], None],
                     op: Callable[[SnapshotStore, Path], object]) -> Iterator[SnapshotStore]:
    """Run ``op`` killed at mutation 1, 2, ... until it completes; yield each restarted,
    recovered store."""
    for n in range(1, 5000):
        base = tmp_path / f"kill-{n}"
        data = base / "data"
        fill(data)
        store = SnapshotStore(base)
        prepare(store, data)
        with kill_at(n) as calls, contextlib.suppress(SimulatedKill):
            op(store, data)
        if calls[0] < n:
            return
        restarted = SnapshotStore(base)
        restarted.recover()
        yield restarted
    raise AssertionError("the operation never completed")


def check_consistent(store: SnapshotStore, expected: dict[str, dict[str, tuple[Any, ...]]],
                     where: Path) -> list[str]:
    """Every listed snapshot restores exactly; nothing unreferenced is left on disk."""
    listed = names(store)
    for name in listed:
        dst = where / f"check-{name}"
        assert describe(restore(store, name, dst)) == expected[name], f"{where}: {name} is damaged"
    assert set(object_files(store)) == referenced(store), f"{where}: orphan objects"
    vol = store.root / VOL
    for sub in ("entries", "catalog"):
        if (vol / sub).is_dir():
            assert sorted(p.name for p in (vol / sub).iterdir()) == sorted(
                f"{n}.json" for n in listed), f"{where}: leftovers in {sub}"
    return listed


def change(data: Path) -> None:
    (data / "b.txt").write_bytes(b"changed")
    (data / "more.bin").write_bytes(os.urandom(20_000))


def test_a_snapshot_killed_at_any_instant_is_complete_or_absent(tmp_path: Path) -> None:
    expected: dict[str, dict[str, tuple[Any, ...]]] = {}

    def prepare(store: SnapshotStore, data: Path) -> None:
        expected["s1"] = describe(data)
        store.create(VOL, data, "s1")
        change(data)
        expected["s2"] = describe(data)

    outcomes = set()
    for store in crash_everywhere(tmp_path, prepare,
                                  lambda s, d: s.create(VOL, d, "s2", kind="automatic")):
        outcomes.add(tuple(check_consistent(store, expected, store.root.parent)))
    assert outcomes == {("s1",), ("s1", "s2")}


class Listing:
    """What ``os.scandir`` returns, in an order of our choosing."""

    def __init__(self, entries: list[os.DirEntry[str]]) -> None:
        self.entries = entries

    def __enter__(self) -> Listing:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __iter__(self) -> Iterator[os.DirEntry[str]]:
        return iter(self.entries)

    def close(self) -> None:
        return None


@pytest.mark.parametrize("listing", ["sorted", "reversed"])
@pytest.mark.parametrize("op", ["remove", "prune", "remove_all"])
def test_a_removal_killed_at_any_instant_leaves_complete_snapshots(
        tmp_path: Path, op: str, listing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Directories are deleted in the order the filesystem lists them (hash order on ext4,
    creation order on XFS and btrfs): both orders are tried."""
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Listing:
        with real_scandir(path) as it:
            return Listing(sorted(it, key=lambda e: e.name, reverse=listing == "reversed"))

    monkeypatch.setattr(os, "scandir", scandir)
    expected: dict[str, dict[str, tuple[Any, ...]]] = {}

    def prepare(store: SnapshotStore, data: Path) -> None:
        expected["s1"] = describe(data)
        store.create(VOL, data, "s1", kind="automatic")
        change(data)
        expected["s2"] = describe(data)
        store.create(VOL, data, "s2", kind="automatic")

    ops: dict[str, Callable[[SnapshotStore, Path], object]] = {
        "remove": lambda s, d: s.remove(VOL, "s1"),
        "prune": lambda s, d: s.prune(VOL, 1),
        "remove_all": lambda s, d: s.remove_all(VOL),
    }
    allowed = {"remove": {("s1", "s2"), ("s2",)}, "prune": {("s1", "s2"), ("s2",)},
               "remove_all": {("s1", "s2"), ("s1",), ("s2",), ()}}[op]
    outcomes = set()
    for store in crash_everywhere(tmp_path, prepare, ops[op]):
        outcomes.add(tuple(check_consistent(store, expected, store.root.parent)))
    assert outcomes <= allowed
    assert len(outcomes) >= 2


# the driver's snapshot verbs


def tree_of(root: Path) -> dict[str, tuple[Any, ...]]:
    """The whole plugin root, so a refused call provably changed nothing on disk."""
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_size,
                                       p.lstat().st_mtime_ns)
            for p in root.rglob("*") if p.name not in ("state.db-wal", "state.db-shm")}


@pytest.fixture
def vol(driver: Driver) -> Path:
    driver.create(VOL, {"snapshot_keep": "2"})
    data = driver.path(VOL)
    fill(data)
    return data


def test_clones_from_a_volume_and_from_a_snapshot_are_independent(driver: Driver,
                                                                  vol: Path) -> None:
    expected = describe(vol)
    driver.management.snapshot_create(VOL, "s1")
    driver.create("from-vol", {"from": VOL})
    driver.create("from-snap", {"from": f"{VOL}@s1"})
    for clone in ("from-vol", "from-snap"):
        path = driver.path(clone)
        assert describe(path) == expected
        assert inodes(path).isdisjoint(inodes(vol))
    with open(driver.path("from-vol") / "sub" / "c.bin", "r+b") as f:
        f.write(b"clone write")
    with open(vol / "b.txt", "r+b") as f:
        f.write(b"source write")
    assert describe(driver.path("from-snap")) == expected
    assert (driver.path("from-vol") / "b.txt").read_bytes() == b"b" * 2000
    assert not (vol / "sub" / "c.bin").read_bytes().startswith(b"clone write")


def test_restore_takes_a_safety_snapshot_first(driver: Driver, vol: Path) -> None:
    expected = describe(vol)
    driver.management.snapshot_create(VOL, "s1")
    change(vol)
    changed = describe(vol)
    safety = driver.management.snapshot_restore(VOL, "s1")
    assert safety.kind == "safety"
    assert describe(vol) == expected
    driver.management.snapshot_restore(VOL, safety.name)
    assert describe(vol) == changed
    assert [s.kind for s in driver.management.snapshot_list(VOL)] == ["manual", "safety", "safety"]


def test_bad_requests_are_refused_and_change_nothing(driver: Driver, vol: Path,
                                                     settings: Any) -> None:
    driver.management.snapshot_create(VOL, "s1")
    driver.create("plain", None)
    driver.mount("plain", "m1")
    root = settings.root
    before = (tree_of(root), [v.name for v in driver.list_volumes()],
              driver.management.snapshot_list(VOL))
    refused: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: driver.management.snapshot_create("nosuch", None), VolumeNotFound, "nosuch"),
        (lambda: driver.management.snapshot_create(VOL, "s1"), SnapshotExists, "already exists"),
        (lambda: driver.management.snapshot_list("nosuch"), VolumeNotFound, "nosuch"),
        (lambda: driver.management.snapshot_remove(VOL, "nope"), SnapshotNotFound, "vol@nope"),
        (lambda: driver.management.snapshot_remove("nosuch", None), VolumeNotFound, "nosuch"),
        (lambda: driver.management.snapshot_restore(VOL, "nope"), SnapshotNotFound, "vol@nope"),
        (lambda: driver.management.snapshot_restore("nosuch", "s1"), VolumeNotFound, "nosuch"),
        (lambda: driver.management.snapshot_restore("plain", "s1"), VolumeInUse, "in use"),
        (lambda: driver.create("c", {"from": "nosuch"}), InvalidOption, "no pyvol volume"),
        (lambda: driver.create("c", {"from": f"{VOL}@nope"}), SnapshotNotFound, "vol@nope"),
        (lambda: driver.create("c", {"from": "c"}), InvalidOption, "being created"),
    ]
    for bad in ["-x", "a/b", "a b", "", "x" * 256, "é", "a@b", "..", ".hidden"]:
        refused.append((lambda bad=bad: driver.management.snapshot_create(VOL, bad),  # type: ignore[misc]
                        InvalidName, "invalid snapshot name"))
        refused.append((lambda bad=bad: driver.management.snapshot_restore(VOL, bad),  # type: ignore[misc]
                        InvalidName, "invalid snapshot name"))
    for key, value in [("snapshot_keep", "0"), ("snapshot_keep", "-1"), ("snapshot_keep", "x"),
                       ("snapshot_keep", "1.5"), ("snapshot_keep", ""),
                       ("snapshot_every", "10x"), ("snapshot_every", ""),
                       ("snapshot_every", "0s"), ("snapshot_every", "5"),
                       ("snapshot_every", "-5m"), ("snapshot_on_unmount", "maybe"),
                       ("snapshot_on_remove", "later"), ("from", "a@-b"), ("from", "@s")]:
        refused.append((lambda k=key, v=value: driver.create("c", {k: v}),  # type: ignore[misc]
                        InvalidOption, key))
    for call, error, message in refused:
        with pytest.raises(error) as raised:
            call()
        assert message in str(raised.value)
        assert isinstance(raised.value, PyvolError | BackendError)
        assert (tree_of(root), [v.name for v in driver.list_volumes()],
                driver.management.snapshot_list(VOL)) == before, f"{call} changed something"


def test_on_unmount_snapshots_keep_the_newest_n(driver: Driver, vol: Path,
                                                tmp_path: Path) -> None:
    driver.create("auto", {"snapshot_on_unmount": "true", "snapshot_keep": "2"})
    data = driver.path("auto")
    driver.management.snapshot_create("auto", "manual-0")
    states = []
    for i in range(4):
        driver.mount("auto", f"m{i}")
        (data / "counter").write_text(str(i))
        states.append(describe(data))
        driver.unmount("auto", f"m{i}")
        assert driver.jobs.wait("auto", 30)
    snaps = driver.management.snapshot_list("auto")
    assert [s.kind for s in snaps] == ["manual", "automatic", "automatic"]
    for snap, expected in zip(snaps[1:], states[2:], strict=True):
        dst = tmp_path / snap.name
        dst.mkdir()
        driver.snapshots.store.populate_from("auto", snap.name)(dst)
        assert describe(dst)["counter"] == expected["counter"]
    status = driver.get("auto").status or {}
    assert [s["name"] for s in status["snapshots"]] == [s.name for s in reversed(snaps)]
    assert status["snapshot_policy"]["keep"] == 2


def test_periodic_snapshots_run_on_their_own(driver: Driver) -> None:
    driver.create("timed", {"snapshot_every": "1s", "snapshot_keep": "2"})
    (driver.path("timed") / "f").write_text("x")
    driver.start()
    try:
        deadline = time.monotonic() + 20
        while len(driver.management.snapshot_list("timed")) < 2:
            assert time.monotonic() < deadline, "no periodic snapshots within 20 s"
            time.sleep(0.1)
        time.sleep(2.5)
        snaps = driver.management.snapshot_list("timed")
        assert {s.kind for s in snaps} == {"automatic"}
        assert 1 <= len(snaps) <= 2
    finally:
        driver.snapshots.stop()
        driver.jobs.wait("timed", 30)


def test_removing_a_volume_keeps_its_snapshots_unless_asked(driver: Driver, vol: Path,
                                                            tmp_path: Path) -> None:
    expected = describe(vol)
    driver.management.snapshot_create(VOL, "s1")
    driver.remove(VOL)
    assert [s.name for s in driver.management.snapshot_list(VOL)] == ["s1"]
    driver.create("reborn", {"from": f"{VOL}@s1"})
    assert describe(driver.path("reborn")) == expected

    driver.create("doomed", {"snapshot_on_remove": "delete"})
    driver.management.snapshot_create("doomed", "s1")
    driver.remove("doomed")
    with pytest.raises(VolumeNotFound):
        driver.management.snapshot_list("doomed")
    assert "doomed" not in driver.snapshots.store.volumes()


def test_a_running_snapshot_delays_no_call_on_other_volumes(
        driver: Driver, vol: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The volume being snapshotted answers Get at once; others Get, List and Mount too."""
    driver.create("busy", {"snapshot_on_unmount": "true"})
    fill(driver.path("busy"))
    release = threading.Event()
    entered = threading.Event()
    real = clone_or_copy

    def slow(src: int, dst: str | Path, mode: int = 0o600) -> str:
        if "busy" in Path(dst).parts:  # snapshots/busy/objects/xx/ID (src is a descriptor)
            entered.set()
            release.wait(30)
        return real(src, dst, mode)

    monkeypatch.setattr(snapshots_module, "clone_or_copy", slow)
    driver.mount("busy", "m")
    driver.unmount("busy", "m")  # the on-unmount snapshot starts in the background
    manual = threading.Thread(target=lambda: driver.management.snapshot_create("busy", "manual"))
    try:
        assert entered.wait(10)
        manual.start()
        started = time.monotonic()
        assert (driver.get("busy").status or {})["snapshot_state"] == "running"
        assert {v.name for v in driver.list_volumes()} >= {"busy", VOL}
        driver.get(VOL)
        driver.mount(VOL, "m2")
        driver.unmount(VOL, "m2")
        driver.management.snapshot_create(VOL, "meanwhile")
        assert time.monotonic() - started < 2.0
    finally:
        release.set()
        manual.join(30)
    assert driver.jobs.wait("busy", 30)
    assert [s.kind for s in driver.management.snapshot_list("busy")] == ["automatic", "manual"]


def test_snapshot_catalog_json_is_what_ls_shows(store: SnapshotStore, data: Path) -> None:
    info = store.create(VOL, data, "s1")
    on_disk = json.loads((store.root / VOL / "catalog" / "s1.json").read_text())
    assert on_disk == info.to_json()
    assert {"name", "created", "size", "files", "kind"} <= on_disk.keys()


def test_long_snapshots_of_other_volumes_never_hold_up_a_mount(
        driver: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mount waits for the volume's own on-unmount snapshot, never for other volumes' ones:
    a queue of long snapshots elsewhere must not keep this volume's short one from running."""
    slow_volumes = ["slow-a", "slow-b", "slow-c"]
    for name in [*slow_volumes, "quick"]:
        driver.create(name, {"snapshot_on_unmount": "true"})
        (driver.path(name) / "f").write_text(name)
    release = threading.Event()
    real = clone_or_copy

    def slow(src: int, dst: str | Path, mode: int = 0o600) -> str:
        if Path(dst).parts[-4] in slow_volumes:  # snapshots/VOLUME/objects/xx/ID
            release.wait(60)
        return real(src, dst, mode)

    monkeypatch.setattr(snapshots_module, "clone_or_copy", slow)
    try:
        for name in [*slow_volumes, "quick"]:
            driver.mount(name, "m")
            driver.unmount(name, "m")
        mounted = threading.Event()

        def mount_quick() -> None:
            driver.mount("quick", "again")
            mounted.set()

        mounter = threading.Thread(target=mount_quick)
        mounter.start()
        try:
            assert mounted.wait(5), "Mount of 'quick' waited for other volumes' snapshots"
            assert [s.kind for s in driver.management.snapshot_list("quick")] == ["automatic"]
        finally:
            release.set()
            mounter.join(60)
    finally:
        release.set()
    for name in slow_volumes:
        assert driver.jobs.wait(name, 30)


# the store keeps nothing for names it is only asked about


def test_listing_names_without_snapshots_caches_nothing(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    for i in range(1000):
        assert store.list_snapshots(f"nobody-{i}") == []
        with pytest.raises(SnapshotNotFound):
            store.remove(f"nobody-{i}", "s1")
    assert store._catalog == {} and store._locks == {}


def test_a_volume_with_snapshots_is_cached_and_its_lock_dropped_when_idle(
        tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    store.create(VOL, data, "s1")
    assert [i.name for i in store.list_snapshots(VOL)] == ["s1"]
    assert list(store._catalog) == [VOL] and store._locks == {}
    again = SnapshotStore(tmp_path)  # a restart reads the catalog from disk
    assert [i.name for i in again.list_snapshots(VOL)] == ["s1"]


# progress and cancellation


def test_a_snapshot_reports_its_progress_up_to_all_files_stored(
        store: SnapshotStore, data: Path) -> None:
    seen: list[snapshots_module.Progress] = []
    settle()  # so that s2 trusts what s1 stored
    info = store.create(VOL, data, "s1", progress=seen.append)
    last = seen[-1]
    assert (last.files_done, last.files_total, last.bytes_done, last.bytes_total) == \
        (info.files, info.files, info.size, info.size)
    assert seen[0].files_total is None  # scanning first
    assert [p.files_done for p in seen if p.files_total is not None] == \
        list(range(info.files + 1))
    unchanged: list[snapshots_module.Progress] = []
    store.create(VOL, data, "s2", progress=unchanged.append)  # nothing to store anew
    assert (unchanged[-1].files_total, unchanged[-1].bytes_total) == (0, 0)


@pytest.mark.parametrize("after", [0, 1, 2])
def test_a_cancelled_snapshot_leaves_nothing(store: SnapshotStore, data: Path,
                                             after: int) -> None:
    store.create(VOL, data, "s0")
    (data / "new1").write_text("1")
    (data / "new2").write_text("2")
    objects = set(object_files(store))
    stored: list[int] = []

    def progress(p: snapshots_module.Progress) -> None:
        stored.append(p.files_done)

    with pytest.raises(snapshots_module.SnapshotCancelled):
        store.create(VOL, data, "s1", progress=progress,
                     cancelled=lambda: max(stored, default=0) >= after)
    assert names(store) == ["s0"]
    assert set(object_files(store)) == objects
    store.create(VOL, data, "s1")  # the name was never taken
