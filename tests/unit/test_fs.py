"""Filesystem helpers: path confinement and mount detection."""

from __future__ import annotations

from pathlib import Path

import pytest
from unit_support import mounts_at

from backends.errors import UnsafePath
from backends.fs import bind_mount, confined, is_mountpoint, unmount


@pytest.mark.parametrize("part", ["", ".", "..", "../x", "a/b", "/abs", "x\0y", "/"])
def test_confined_refuses_bad_components(tmp_path: Path, part: str) -> None:
    with pytest.raises(UnsafePath):
        confined(tmp_path, part)
    with pytest.raises(UnsafePath):
        confined(tmp_path, "ok", part)


def test_confined_accepts_plain_names(tmp_path: Path) -> None:
    assert confined(tmp_path, "a", "b..c") == tmp_path / "a" / "b..c"
    assert confined(tmp_path, "missing-yet") == tmp_path / "missing-yet"


def test_confined_refuses_symlink_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "out").symlink_to(tmp_path / "outside")
    (root / "up").symlink_to("..")
    (root / "in").symlink_to(root / "inner")
    for parts in (("out",), ("out", "x"), ("up",), ("up", "outside")):
        with pytest.raises(UnsafePath):
            confined(root, *parts)
    assert confined(root, "in", "x") == root / "in" / "x"  # a link that stays inside is fine


@pytest.mark.usefixtures("can_mount")
def test_is_mountpoint_sees_bind_mounts_within_one_filesystem(tmp_path: Path) -> None:
    # os.path.ismount compares st_dev with the parent's, which a same-filesystem bind shares.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    assert not is_mountpoint(dst)
    bind_mount(src, dst)
    try:
        assert mounts_at(dst) == 1
        assert is_mountpoint(dst)
        assert not is_mountpoint(src)
    finally:
        unmount(dst)
    assert mounts_at(dst) == 0
    assert not is_mountpoint(dst)
    assert not dst.exists()  # the empty mount point is removed too
    assert src.is_dir()


def test_is_mountpoint_of_plain_paths(tmp_path: Path) -> None:
    assert is_mountpoint(Path("/"))
    assert not is_mountpoint(tmp_path)
    assert not is_mountpoint(tmp_path / "missing")
