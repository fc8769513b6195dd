"""The contract every storage backend meets (backends/base.py), run on each entry of REGISTRY.

A new backend registered in ``backends.REGISTRY`` gets this whole suite for free (plus one
line in :data:`STORED`).  Crashes are simulated by killing the operation at its N-th
filesystem mutation, for every N, then building a fresh backend over the same root (a
restart) and calling ``recover()``.  A volume's data is read and written between mount and
unmount or inside a view, never through ``path()`` alone: not every backend keeps a plain
directory there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loop_support import HAS_LOOP

from backends import REGISTRY, Backend
from backends.base import DirSpec, Populate
from backends.errors import BackendError, UnsafePath
from backends.sizes import MiB
from tests.support.mounts import clear_under

Factory = Callable[[Path], Backend]
VOLUME = "crashvol"
MUTATORS = ("mkdir", "rename", "replace", "chmod", "chown", "rmdir", "unlink", "fsync",
            "symlink", "link")


SIZE = 64 * MiB
"""The size given to every volume of a backend that enforces sizes."""

STORED: dict[str, Callable[[Any, str], Path]] = {
    "local": lambda b, volume: b.path(volume),
    "image": lambda b, volume: b.image(volume),
}
"""Where each backend keeps a volume's data at rest: what must vanish for "missing"."""


class Sized:
    """A backend whose creates get ``size`` when the spec has none, as the options parser
    gives it to backends with ``size_limit``."""

    def __init__(self, inner: Backend) -> None:
        self._inner = inner

    def create(self, volume: str, spec: DirSpec, populate: Populate | None = None) -> None:
        if "size" not in spec.params:
            spec = dataclasses.replace(spec, params={**spec.params, "size": SIZE})
        self._inner.create(volume, spec, populate)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture(params=sorted(REGISTRY))
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    make = REGISTRY[request.param]
    if make.capabilities.size_limit:  # type: ignore[attr-defined]
        if not HAS_LOOP:
            pytest.skip("/dev/loop-control is absent: image volumes need loop devices")
        yield lambda root: Sized(make(root))  # type: ignore[return-value]
    else:
        yield make
    mounts, loops = clear_under(tmp_path)
    assert (mounts, loops) == ([], []), "mounts or loop devices left behind"


def stored(backend: Backend, volume: str) -> Path:
    return STORED[backend.name](backend, volume)


def vanish(backend: Backend, volume: str) -> None:
    """Delete a volume's data behind the backend's back."""
    path = stored(backend, volume)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def mounted(backend: Backend, volume: str) -> Iterator[Path]:
    path = backend.mount(volume)
    try:
        yield path
    finally:
        backend.unmount(volume)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def backend(factory: Factory, root: Path) -> Backend:
    return factory(root)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the backend's root that nothing may touch."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious").write_text("keep me")
    return d


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.lstat().st_mode, p.lstat().st_size)
            for p in [path, *path.rglob("*")]}


def populate(path: Path) -> None:
    (path / "a.txt").write_text("a")
    (path / "sub").mkdir()
    (path / "sub" / "b.txt").write_text("b" * 5000)
    (path / "sub" / "deeper").mkdir()
    (path / "sub" / "deeper" / "c.txt").write_text("c")


def is_populated(path: Path) -> bool:
    return ((path / "a.txt").read_text() == "a"
            and (path / "sub" / "b.txt").read_text() == "b" * 5000
            and (path / "sub" / "deeper" / "c.txt").read_text() == "c")


# the basic verbs


def test_create_exists_path_names(backend: Backend) -> None:
    assert not backend.exists("v")
    assert backend.names() == set()
    backend.create("v", DirSpec())
    assert backend.exists("v")
    path = backend.path("v")
    assert path.is_absolute()
    assert backend.path("v") == path  # stable
    with mounted(backend, "v") as data:
        assert data == path
        assert path.is_dir()
        assert list(path.iterdir()) == []  # a new volume is empty: no lost+found either
    backend.create("w", DirSpec())
    assert backend.names() == {"v", "w"}  # no bookkeeping entries leak into names()


def test_path_of_an_unknown_volume_creates_nothing(backend: Backend) -> None:
    path = backend.path("nope")
    assert not path.exists()
    assert not backend.exists("nope")
    assert backend.names() == set()


def test_create_twice_errors_and_keeps_the_data(backend: Backend) -> None:
    backend.create("v", DirSpec(mode=0o750))
    with mounted(backend, "v") as path:
        (path / "data").write_text("x")
    with pytest.raises(BackendError) as excinfo:
        backend.create("v", DirSpec(mode=0o700))
    assert "v" in str(excinfo.value)
    with backend.view("v") as path:
        assert (path / "data").read_text() == "x"
        assert stat.S_IMODE(path.stat().st_mode) == 0o750


def test_remove_is_idempotent(backend: Backend) -> None:
    backend.remove("never-created")
    backend.create("v", DirSpec())
    with mounted(backend, "v") as path:
        populate(path)
    backend.remove("v")
    assert not backend.exists("v")
    assert not backend.path("v").exists()
    assert backend.names() == set()
    backend.remove("v")
    backend.create("v", DirSpec())  # the name is free again, and the new volume is empty
    with backend.view("v") as path:
        assert list(path.iterdir()) == []


def test_remove_takes_the_volume_away_at_once_and_purge_deletes_it(
        backend: Backend, root: Path) -> None:
    plain = backend.capabilities.plain_directory  # else the staged data is not browsable
    for round_ in range(2):  # the same name again: the staged copies never collide
        backend.create("v", DirSpec())
        with mounted(backend, "v") as path:
            populate(path)
            (path / "round").write_text(str(round_))
        backend.remove("v")
        assert not backend.exists("v") and backend.names() == set()
    if plain:
        staged = [p for p in root.rglob("round")]
        assert sorted(p.read_text() for p in staged) == ["0", "1"]  # kept for purge
    backend.create("v", DirSpec())
    with backend.view("v") as path:
        assert list(path.iterdir()) == []
    assert backend.recover() == {"v"}  # a restart reports them; the driver keeps volume v
    backend.purge()
    if plain:
        assert [p for p in root.rglob("round")] == []
    assert backend.names() == {"v"} and backend.recover() == set()


def test_longest_name_round_trip(backend: Backend) -> None:
    longest = "n" * 255  # names may use all of NAME_MAX: no suffixes on the bare name
    backend.create(longest, DirSpec())
    populate(backend.mount(longest))
    backend.unmount(longest)
    assert backend.names() == {longest}
    backend.remove(longest)
    assert not backend.exists(longest)
    assert backend.names() == set()
    backend.purge()
    assert backend.recover() == set()


def test_remove_does_not_follow_links_out(backend: Backend, outside: Path) -> None:
    before = snapshot(outside)
    backend.create("v", DirSpec())
    with mounted(backend, "v") as path:
        (path / "link").symlink_to(outside, target_is_directory=True)
        (path / "file-link").symlink_to(outside / "precious")
    backend.remove("v")
    backend.purge()
    assert snapshot(outside) == before


@pytest.mark.parametrize("spec", [
    DirSpec(),
    DirSpec(mode=0o700),
    DirSpec(mode=0o777),  # exact, not cut by the umask
    DirSpec(mode=0o2770),  # setgid directory
    DirSpec(uid=1234, gid=5678, mode=0o750),
    DirSpec(gid=4321),
    DirSpec(uid=4321),
], ids=repr)
def test_uid_gid_mode_applied(backend: Backend, spec: DirSpec) -> None:
    if (spec.uid is not None or spec.gid is not None) and os.geteuid() != 0:
        pytest.skip("chown to another uid/gid needs root")
    old_umask = os.umask(0o022)
    try:
        backend.create("v", spec)
    finally:
        os.umask(old_umask)
    with backend.view("v") as path:
        st = path.stat()
    assert stat.S_IMODE(st.st_mode) == spec.mode
    assert st.st_uid == (os.geteuid() if spec.uid is None else spec.uid)
    assert st.st_gid == (os.getegid() if spec.gid is None else spec.gid)


def test_mount_and_unmount(backend: Backend) -> None:
    backend.create("v", DirSpec())
    data = backend.mount("v")
    assert data.is_dir()
    (data / "f").write_text("hello")
    backend.unmount("v")
    with backend.view("v") as path:
        assert (path / "f").read_text() == "hello"


def test_mount_of_a_vanished_volume_errors(backend: Backend) -> None:
    backend.create("v", DirSpec())
    vanish(backend, "v")
    with pytest.raises(BackendError) as excinfo:
        backend.mount("v")
    assert "'v'" in str(excinfo.value)
    with pytest.raises(BackendError) as excinfo, backend.view("v"):
        pass
    assert "'v'" in str(excinfo.value)


def test_status_of_existing_volume(backend: Backend) -> None:
    backend.create("v", DirSpec())
    with mounted(backend, "v") as path:
        populate(path)
        json.dumps(backend.status("v"))  # mounted too
    status = backend.status("v")
    assert isinstance(status, dict)
    json.dumps(status)  # goes on the wire as is
    assert status.get("state") != "missing"


@pytest.mark.parametrize("how", ["deleted out of band", "never created"])
def test_status_of_missing_volume(backend: Backend, how: str) -> None:
    if how == "deleted out of band":
        backend.create("v", DirSpec())
        vanish(backend, "v")
    status = backend.status("v")
    json.dumps(status)
    assert status["state"] == "missing"


def test_recover_on_a_clean_root_changes_nothing(factory: Factory, root: Path) -> None:
    backend = factory(root)
    backend.create("v", DirSpec())
    with mounted(backend, "v") as path:
        populate(path)
    before = snapshot(root)
    assert factory(root).recover() == set()
    assert snapshot(root) == before


# confinement


@pytest.mark.parametrize("name", ["..", ".", "", "../x", "a/b", "/etc", "x\0y", "../../tmp"])
def test_traversal_refused(backend: Backend, root: Path, tmp_path: Path, name: str) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(UnsafePath):
        backend.path(name)
    with pytest.raises(UnsafePath):
        backend.create(name, DirSpec())
    with pytest.raises(UnsafePath):
        backend.remove(name)
    assert snapshot(tmp_path) == before


def test_symlink_escape_refused(backend: Backend, outside: Path) -> None:
    # Plant a link where a volume named "evil" would live, pointing out of the root.
    planted = backend.path("probe").parent / "evil"
    planted.symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with pytest.raises(UnsafePath):
        backend.path("evil")
    with pytest.raises(BackendError):
        backend.create("evil", DirSpec(mode=0o777))
    with pytest.raises(BackendError):
        backend.remove("evil")
    with pytest.raises(BackendError):
        backend.mount("evil")
    assert "evil" not in backend.names()
    backend.recover()
    assert snapshot(outside) == before


# crashes


class SimulatedKill(BaseException):
    """kill -9 at this instant: no except clause catches it, no cleanup runs."""


class KillSwitch:
    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0
        self.fired = False


@contextlib.contextmanager
def kill_at(n: int) -> Iterator[KillSwitch]:
    """Let the first n-1 filesystem mutations happen, then die instead of doing the n-th.

    A dead process changes nothing more: cleanup code that catches the kill cannot touch the
    disk either.
    """
    switch = KillSwitch(n)
    originals = {name: getattr(os, name) for name in MUTATORS}

    def wrap(name: str) -> Callable[..., object]:
        def mutation(*args: object, **kwargs: object) -> object:
            switch.calls += 1
            if switch.fired or switch.calls == switch.at:
                switch.fired = True
                raise SimulatedKill(f"killed at os.{name}{args}")
            return originals[name](*args, **kwargs)
        return mutation

    for name in MUTATORS:
        setattr(os, name, wrap(name))
    try:
        yield switch
    finally:
        for name, fn in originals.items():
            setattr(os, name, fn)


def leftovers(root: Path, backend: Backend) -> list[Path]:
    """Paths anywhere under root that carry the volume's name but are not the volume."""
    volume = stored(backend, VOLUME)
    return [p for p in root.rglob(f"*{VOLUME}*")
            if p != volume and volume not in p.parents]


def crash_points(op: Callable[[Backend], None], factory: Factory, base: Path,
                 prepare: Callable[[Backend], None]) -> Iterator[tuple[Path, bool]]:
    """Run op in a fresh root killed at mutation 1, 2, ... until it completes uncut."""
    for n in range(1, 1000):
        root = base / f"kill-at-{n}"
        backend = factory(root)
        prepare(backend)
        with kill_at(n) as switch, contextlib.suppress(SimulatedKill):
            op(backend)
        if not switch.fired:
            return
        yield root, bool(leftovers(root, backend))
    raise AssertionError("the operation never completed")


def test_crashed_create_is_complete_or_absent_after_recover(
    factory: Factory, tmp_path: Path
) -> None:
    spec = DirSpec(uid=1234 if os.geteuid() == 0 else None, mode=0o750)
    had_leftovers = False
    points = 0
    for root, dirty in crash_points(lambda b: b.create(VOLUME, spec), factory, tmp_path,
                                    prepare=lambda b: None):
        points += 1
        had_leftovers |= dirty
        restarted = factory(root)
        restarted.recover()
        assert leftovers(root, restarted) == [], f"{root.name}: create leftovers not cleared"
        if restarted.exists(VOLUME):
            with restarted.view(VOLUME) as path:
                st = path.stat()
            assert stat.S_IMODE(st.st_mode) == spec.mode, f"{root.name}: half-made volume"
            if spec.uid is not None:
                assert st.st_uid == spec.uid, f"{root.name}: half-made volume"
            assert restarted.names() == {VOLUME}
        else:
            assert restarted.names() == set()
            restarted.create(VOLUME, spec)  # the name is usable again
    assert points > 0
    assert had_leftovers, "no crash point left anything for recover() to clear"


def test_crashed_remove_is_finished_and_reported_by_recover(
    factory: Factory, tmp_path: Path
) -> None:
    def prepare(b: Backend) -> None:
        b.create(VOLUME, DirSpec())
        with mounted(b, VOLUME) as path:
            populate(path)

    reported_any = False
    for root, _ in crash_points(lambda b: b.remove(VOLUME), factory, tmp_path, prepare):
        restarted = factory(root)
        reported = restarted.recover()
        restarted.purge()  # the driver runs it in the background after recover()
        assert leftovers(root, restarted) == [], f"{root.name}: removal not finished"
        if restarted.exists(VOLUME):
            with restarted.view(VOLUME) as path:
                assert is_populated(path), f"{root.name}: half-deleted volume"
        else:
            # The driver drops a record only for names reported here.
            assert VOLUME in reported, f"{root.name}: interrupted removal not reported"
            reported_any = True
            assert restarted.names() == set()
    assert reported_any, "no crash point interrupted a removal"


# other host users


def private_ancestor(path: Path, root: Path) -> Path | None:
    """The first directory between ``path`` and ``root`` that other users cannot search."""
    for parent in [*path.parents]:
        if not stat.S_IMODE(parent.stat().st_mode) & 0o077:
            return parent
        if parent == root:
            break
    return None


def test_volume_data_is_unreachable_for_other_host_users_even_after_widening(
        factory: Factory, root: Path) -> None:
    """A setuid file in a volume must not run for another host user: some directory
    between the root and the data is 0700, and start-up narrows one found wider."""
    backend = factory(root)
    backend.create("v", DirSpec())
    path = backend.path("v")
    guard = private_ancestor(path, root)
    assert guard is not None, f"every directory above {path} lets other users through"
    for parent in path.parents:
        os.chmod(parent, 0o755)  # noqa: S103 -- the widening start-up must undo
        if parent == root:
            break
    factory(root)
    assert private_ancestor(path, root) is not None


# views, sizes, content swaps


def test_view_reads_the_content_and_outlives_the_last_unmount(backend: Backend) -> None:
    backend.create("v", DirSpec())
    with mounted(backend, "v") as path:
        populate(path)
    with backend.view("v") as seen:
        assert is_populated(seen)
    backend.mount("v")
    with backend.view("v") as seen:
        backend.unmount("v")  # the last mount goes; the view still holds the data
        assert is_populated(seen)
        with backend.view("v") as nested:
            assert is_populated(nested)
        assert is_populated(seen)
    backend.mount("v")  # and it mounts again afterwards
    assert is_populated(backend.path("v"))
    backend.unmount("v")


def test_size_and_resize(backend: Backend) -> None:
    backend.create("v", DirSpec())
    with mounted(backend, "v") as path:
        populate(path)
    if not backend.capabilities.size_limit:
        assert backend.size("v") is None
        with pytest.raises(BackendError, match="'v'"):
            backend.resize("v", 2 * SIZE)
        return
    assert backend.size("v") == SIZE
    backend.resize("v", SIZE)  # the same size: nothing to do
    assert backend.size("v") == SIZE
    with pytest.raises(BackendError, match=r"'v'.*cannot shrink"):
        backend.resize("v", SIZE // 2)
    assert backend.size("v") == SIZE
    backend.resize("v", 2 * SIZE)
    assert backend.size("v") == 2 * SIZE
    with backend.view("v") as path:
        assert is_populated(path)
        vfs = os.statvfs(path)
        assert vfs.f_blocks * vfs.f_frsize > 1.8 * SIZE  # the filesystem grew, not just a file


def test_replace_swaps_the_content(backend: Backend) -> None:
    backend.create("v", DirSpec())
    with mounted(backend, "v") as path:
        (path / "old").write_text("old")
    backend.replace("v", populate)
    with backend.view("v") as path:
        assert is_populated(path)
        assert not (path / "old").exists()
    assert backend.size("v") == (SIZE if backend.capabilities.size_limit else None)


def test_failed_replace_keeps_the_content(backend: Backend) -> None:
    backend.create("v", DirSpec())
    with mounted(backend, "v") as path:
        populate(path)

    def broken(path: Path) -> None:
        (path / "half").write_text("x")
        raise OSError("restore failed midway")

    with pytest.raises((OSError, BackendError), match="midway"):
        backend.replace("v", broken)
    with backend.view("v") as path:
        assert is_populated(path) and not (path / "half").exists()
    assert backend.recover() == set()


def test_crashed_replace_is_old_or_new_after_recover(factory: Factory, tmp_path: Path) -> None:
    def prepare(b: Backend) -> None:
        b.create(VOLUME, DirSpec())
        with mounted(b, VOLUME) as path:
            (path / "old").write_text("old")

    outcomes = set()
    for root, _ in crash_points(lambda b: b.replace(VOLUME, populate), factory, tmp_path,
                                prepare):
        restarted = factory(root)
        restarted.recover()
        assert leftovers(root, restarted) == [], f"{root.name}: replace leftovers not cleared"
        with restarted.view(VOLUME) as path:
            names = sorted(p.name for p in path.iterdir())
            assert names in (["old"], ["a.txt", "sub"]), f"{root.name}: mixed content {names}"
            if names != ["old"]:
                assert is_populated(path), f"{root.name}: half-made content"
        outcomes.add(names[0])
    assert outcomes == {"old", "a.txt"}, "the crashes never hit both sides of the swap"
