"""Filesystem helpers: path confinement and mount detection."""

from __future__ import annotations

import os
import resource
import stat
from pathlib import Path

import pytest

from backends.errors import UnsafePath
from backends.fs import (
    bind_mount,
    confined,
    is_mountpoint,
    make_private,
    raise_fd_limit,
    remove_tree,
    tree_usage,
    unmount,
)
from tests.support.mounts import mounts_at


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


# walks relative to directory descriptors


def deep(root: Path, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("level-directory", dir_fd=fd)
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
        nxt = os.open("level-directory", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)


def test_usage_and_removal_of_a_tree_deeper_than_path_max(tmp_path: Path) -> None:
    root = tmp_path / "deep"
    root.mkdir()
    deep(root, 2000)  # 32,000 bytes of path; Python's recursion limit is 1,000
    size, entries = tree_usage(root)
    assert entries == 4000
    assert size > 0
    remove_tree(root)
    assert not root.exists()


def test_removal_never_follows_a_link_out(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (outside / "keep").write_bytes(b"x")
    (root / "d" / "out").symlink_to(outside)
    (root / "link").symlink_to(outside)
    remove_tree(root)
    assert not root.exists()
    assert (outside / "keep").read_bytes() == b"x"
    remove_tree(root)  # missing is fine


def test_make_private_creates_0700_and_narrows_a_wider_mode(tmp_path: Path) -> None:
    made = tmp_path / "a" / "made"
    make_private(made)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    wide = tmp_path / "wide"
    wide.mkdir(mode=0o755)
    os.chmod(wide, 0o711)  # noqa: S103 -- the wide mode start-up must narrow
    make_private(wide)
    assert stat.S_IMODE(wide.stat().st_mode) == 0o700


def test_start_up_raises_the_descriptor_limit_for_deep_walks() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(512, hard), hard))
    try:
        raise_fd_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
