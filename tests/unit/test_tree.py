"""backends.tree: scan and materialize round-trip every file kind and its metadata.

The expected state of a tree is read with plain ``os.lstat``/``os.listxattr`` (``describe``),
independently of the code under test, and compared before and after a round trip.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from backends import tree as tree_module
from backends.fs import remove_tree
from backends.tree import (
    SPARSE_BLOCK,
    Changed,
    DirectoryView,
    Entry,
    all_zero,
    clone_fd,
    clone_or_copy,
    copy_fd,
    copy_tree,
    materialize,
    open_file,
    scan,
    write_sparse,
)
from tests.support.trees import describe

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="chown to other users and mknod need root")
SECRET = b"outside the volume: must never be read into a snapshot"
T0 = 1_600_000_000_123_456_789  # mtimes with a non-zero nanosecond part


def inodes(root: Path) -> set[tuple[int, int]]:
    """(device, inode) of ``root`` and everything below, symlinks included (a copy makes new
    ones of each; ``tests.support.trees.inodes`` leaves both out)."""
    return {(st.st_dev, st.st_ino) for st in (p.lstat() for p in [root, *root.rglob("*")])}


def xattrs_supported(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return False
        raise
    finally:
        probe.unlink()
    return True


def build_sample(root: Path, outside: Path) -> None:
    """Every kind of entry a volume can hold, with unusual metadata on each."""
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    root.mkdir()
    uid, gid = (1001, 1002) if ROOT else (os.getuid(), os.getgid())
    xattrs = xattrs_supported(root)

    plain = root / "plain.txt"
    plain.write_bytes(b"hello\n")
    os.chown(plain, uid, gid)
    os.chmod(plain, 0o640)
    (root / "empty").write_bytes(b"")
    os.chmod(root / "empty", 0o600)
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)  # noqa: S103 -- the metadata under test
    if xattrs:
        os.setxattr(plain, "user.comment", b"a \x00 binary\xff value")

    shared = root / "shared"
    shared.mkdir()
    os.chown(shared, uid, gid)
    os.chmod(shared, 0o2775)  # noqa: S103 -- a setgid directory
    if xattrs:
        os.setxattr(shared, "user.dir", b"on a directory")
    (shared / "a.bin").write_bytes(os.urandom(100_000))
    os.link(shared / "a.bin", shared / "b.bin")
    other = root / "other"
    (other / "nested" / "deep").mkdir(parents=True)
    os.chmod(other, 0o750)  # noqa: S103 -- the metadata under test
    os.link(shared / "a.bin", other / "c.bin")  # a hard link across directories
    (other / "nested" / "deep" / "f").write_bytes(b"deep")

    (root / "link-rel").symlink_to("plain.txt")
    (root / "link-dangling").symlink_to("does/not/exist")
    (root / "shadow").symlink_to("/etc/shadow")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (other / "up").symlink_to("../../outside/secret")
    os.mkfifo(root / "fifo", 0o620)
    if ROOT:
        os.mknod(root / "null", 0o644 | stat.S_IFCHR, os.makedev(1, 3))

    # mtimes last, deepest first, so creating entries does not bump them again
    for i, p in enumerate(sorted([root, *root.rglob("*")], key=lambda p: -len(p.parts))):
        os.utime(p, ns=(T0 + i * 1_000_001, T0 + i * 1_000_001), follow_symlinks=False)


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    build_sample(tmp_path / "src", tmp_path / "outside")
    return tmp_path / "src"


def copy_from(src: Path) -> Any:
    def write(entry: Entry, fd: int) -> None:
        sfd = os.open(src / entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            clone_fd(sfd, fd)
        finally:
            os.close(sfd)
    return write


# scan


def test_scan_is_preorder_and_sorted(sample: Path) -> None:
    paths = [e.path for e in scan(sample)]
    assert paths[0] == "."
    assert len(paths) == len(set(paths))
    seen: set[str] = {"."}
    for path in paths[1:]:
        parent = path.rpartition("/")[0] or "."
        assert parent in seen, f"{path} listed before its directory"
        seen.add(path)
    assert set(paths[1:]) == {str(p.relative_to(sample)) for p in sample.rglob("*")}


def test_scan_reports_symlinks_and_never_follows_them(sample: Path) -> None:
    entries = {e.path: e for e in scan(sample)}
    assert not any(p.startswith("escape/") for p in entries), "followed a directory link out"
    for name, target in [("shadow", "/etc/shadow"), ("escape", str(sample.parent / "outside")),
                         ("link-rel", "plain.txt"), ("link-dangling", "does/not/exist"),
                         ("other/up", "../../outside/secret")]:
        assert entries[name].kind == "symlink"
        assert entries[name].target == target
        assert entries[name].size == 0
    # Reading a link's content through the view fails instead of reading the target.
    view = DirectoryView(sample)
    with pytest.raises(OSError) as raised:
        view.open(entries["shadow"])
    assert raised.value.errno == errno.ELOOP


def test_scan_marks_later_links_of_an_inode_as_hardlinks(sample: Path) -> None:
    entries = {e.path: e for e in scan(sample)}
    assert entries["other/c.bin"].kind == "file"  # "other" sorts before "shared"
    assert (entries["shared/a.bin"].kind, entries["shared/a.bin"].target) == (
        "hardlink", "other/c.bin")
    assert (entries["shared/b.bin"].kind, entries["shared/b.bin"].target) == (
        "hardlink", "other/c.bin")
    assert entries["other/c.bin"].size == 100_000
    assert entries["shared/b.bin"].size == 0  # content is counted once


def test_scan_records_metadata(sample: Path) -> None:
    entries = {e.path: e for e in scan(sample)}
    plain = entries["plain.txt"]
    st = (sample / "plain.txt").lstat()
    assert (plain.mode, plain.uid, plain.gid, plain.mtime_ns, plain.size) == (
        0o640, st.st_uid, st.st_gid, st.st_mtime_ns, 6)
    assert entries["shared"].mode == 0o2775
    assert entries["setuid"].mode == 0o4755
    assert entries["fifo"].kind == "fifo"
    if ROOT:
        assert (entries["null"].kind, entries["null"].rdev) == ("chardev", os.makedev(1, 3))


def test_entry_json_round_trip(sample: Path) -> None:
    for entry in scan(sample):
        assert Entry.from_json(entry.to_json()) == entry


# materialize


def test_round_trip_keeps_every_kind_and_all_metadata(sample: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    materialize(list(scan(sample)), dst, copy_from(sample))
    expected = describe(sample)
    assert describe(dst) == expected
    # the sample is as rich as it claims, so the comparison above means something
    assert expected["shared"][1] == 0o2775
    assert expected["setuid"][1] == 0o4755
    assert expected["shared/a.bin"][9] == ("other/c.bin", "shared/a.bin", "shared/b.bin")
    assert expected["."][4] != expected["other"][4]
    if ROOT:
        assert expected["plain.txt"][2:4] == (1001, 1002)
    if xattrs_supported(tmp_path):
        assert expected["plain.txt"][8] == {"user.comment": b"a \x00 binary\xff value"}
        assert expected["shared"][8] == {"user.dir": b"on a directory"}


def test_round_trip_shares_no_inode_with_the_source(sample: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    copy_tree(sample, dst)
    assert describe(dst) == describe(sample)
    assert inodes(dst).isdisjoint(inodes(sample))
    # writing to the copy leaves the source alone, hard-link group included
    with open(dst / "shared" / "b.bin", "r+b") as f:
        f.write(b"changed")
    assert (dst / "other" / "c.bin").read_bytes().startswith(b"changed")
    assert not (sample / "other" / "c.bin").read_bytes().startswith(b"changed")


def test_round_trip_never_reads_through_symlinks(sample: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    copy_tree(sample, dst)
    assert os.readlink(dst / "shadow") == "/etc/shadow"
    assert (dst / "escape").is_symlink()
    for p in dst.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert SECRET not in p.read_bytes(), f"{p} holds data from outside the tree"
    assert not any(p.name == "secret" for p in dst.rglob("*"))


@pytest.mark.parametrize("path", ["../evil", "a/../../evil", "/abs/evil"])
def test_materialize_refuses_entries_that_leave_the_tree(tmp_path: Path, path: str) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    entries = [Entry(path=".", kind="dir", mode=0o755, uid=os.getuid(), gid=os.getgid(),
                     mtime_ns=T0),
               Entry(path="a", kind="dir", mode=0o755, uid=os.getuid(), gid=os.getgid(),
                     mtime_ns=T0),
               Entry(path=path, kind="fifo", mode=0o644, uid=os.getuid(), gid=os.getgid(),
                     mtime_ns=T0)]
    with pytest.raises(ValueError, match="leaves the tree"):
        materialize(entries, dst, lambda e, p: None)
    assert not (tmp_path / "evil").exists()
    assert not Path("/abs/evil").exists()


def test_materialize_refuses_to_write_through_a_symlink_it_made(tmp_path: Path) -> None:
    dst, outside = tmp_path / "dst", tmp_path / "outside"
    dst.mkdir()
    outside.mkdir()
    entries = [Entry(path=".", kind="dir", mode=0o755, uid=os.getuid(), gid=os.getgid(),
                     mtime_ns=T0),
               Entry(path="l", kind="symlink", mode=0o777, uid=os.getuid(), gid=os.getgid(),
                     mtime_ns=T0, target=str(outside)),
               Entry(path="l/x", kind="fifo", mode=0o644, uid=os.getuid(), gid=os.getgid(),
                     mtime_ns=T0)]
    with pytest.raises(ValueError, match="leaves the tree"):
        materialize(entries, dst, lambda e, p: None)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("target", ["../../outside/secret", "/etc/passwd", "later", "d"])
def test_materialize_refuses_hard_links_to_anything_but_an_earlier_file(
        tmp_path: Path, target: str) -> None:
    dst, outside = tmp_path / "dst", tmp_path / "outside"
    dst.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    me = (os.getuid(), os.getgid())
    entries = [Entry(path=".", kind="dir", mode=0o755, uid=me[0], gid=me[1], mtime_ns=T0),
               Entry(path="d", kind="dir", mode=0o755, uid=me[0], gid=me[1], mtime_ns=T0),
               Entry(path="link", kind="hardlink", mode=0, uid=0, gid=0, mtime_ns=0,
                     target=target),
               Entry(path="later", kind="file", mode=0o644, uid=me[0], gid=me[1], mtime_ns=T0)]
    with pytest.raises(ValueError, match="leaves the tree"):
        materialize(entries, dst, lambda e, p: None)
    assert not (dst / "link").exists()
    assert (outside / "secret").stat().st_nlink == 1


# clone_or_copy


def test_clone_or_copy_makes_a_new_inode_with_the_content(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    method = clone_or_copy(src, dst, mode=0o400)
    assert method in ("reflink", "copy")
    assert dst.read_bytes() == data
    assert dst.stat().st_ino != src.stat().st_ino
    assert stat.S_IMODE(dst.stat().st_mode) == 0o400
    with open(src, "r+b") as f:  # in-place write to the source
        f.write(b"X" * 4096)
    assert dst.read_bytes() == data


def test_clone_or_copy_never_overwrites_and_never_follows_links(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        clone_or_copy(src, dst)
    assert dst.read_bytes() == b"old"
    (tmp_path / "target").write_bytes(b"target")
    (tmp_path / "dst-link").symlink_to(tmp_path / "target")
    with pytest.raises(FileExistsError):
        clone_or_copy(src, tmp_path / "dst-link")
    assert (tmp_path / "target").read_bytes() == b"target"
    (tmp_path / "src-link").symlink_to(src)
    with pytest.raises(OSError) as raised:
        clone_or_copy(tmp_path / "src-link", tmp_path / "out")
    assert raised.value.errno == errno.ELOOP
    assert not (tmp_path / "out").exists()


@needs_root
def test_round_trip_of_a_tree_owned_by_others(tmp_path: Path) -> None:
    """chown clears setuid/setgid bits: metadata must be applied owner first, mode second."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "tool").write_bytes(b"x")
    os.chown(src / "tool", 4242, 4343)
    os.chmod(src / "tool", 0o6711)  # noqa: S103 -- the metadata under test
    os.chown(src, 4242, 4343)
    os.chmod(src, 0o3770)  # noqa: S103 -- the metadata under test
    dst = tmp_path / "dst"
    dst.mkdir()
    copy_tree(src, dst)
    assert describe(dst) == describe(src)
    assert stat.S_IMODE((dst / "tool").stat().st_mode) == 0o6711


def test_scan_of_a_big_flat_directory_is_complete(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(2000):
        (root / f"f{i:05d}").write_bytes(b"%d" % i)
    assert [e.path for e in scan(root)][1:] == sorted(p.name for p in root.iterdir())


# resolving beneath a directory descriptor


@pytest.fixture(params=["openat2", "components"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of resolving: openat2, and one O_NOFOLLOW component at a time."""
    if request.param == "components":
        monkeypatch.setattr(tree_module, "_openat2_ok", False)
    return str(request.param)


def test_open_file_refuses_a_symlink_at_any_depth(tmp_path: Path, resolver: str) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"inside")
    (outside / "b").mkdir(parents=True)
    (outside / "b" / "f").write_bytes(SECRET)
    (outside / "f").write_bytes(SECRET)
    (root / "link-a").symlink_to(outside)
    (root / "a" / "link-b").symlink_to(outside / "b")
    (root / "a" / "link-f").symlink_to(outside / "f")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sfd, st = open_file(fd, "a/b/f")
        with open(sfd, "rb") as f:
            assert f.read() == b"inside"
        assert st.st_ino == (root / "a" / "b" / "f").stat().st_ino
        for path in ("link-a/b/f", "a/link-b/f", "a/link-f"):
            with pytest.raises(OSError) as raised:
                open_file(fd, path)
            # openat2 says ELOOP; O_DIRECTORY|O_NOFOLLOW on a link says ENOTDIR
            assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR), path
        for path in ("../outside/f", "a/../../outside/f"):
            with pytest.raises(OSError):
                open_file(fd, path)
    finally:
        os.close(fd)


def test_open_file_never_opens_a_fifo_or_device(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(Changed):
            open_file(fd, "fifo")  # would block forever if it were opened for reading
    finally:
        os.close(fd)


def test_open_beneath_resolves_paths_longer_than_path_max(tmp_path: Path,
                                                         resolver: str) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    parts = []
    try:
        cur = os.dup(fd)
        for i in range(300):
            name = f"level-{i:04d}-" + "x" * 20
            os.mkdir(name, dir_fd=cur)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            os.close(cur)
            cur = nxt
            parts.append(name)
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=cur))
        os.close(cur)
        path = "/".join([*parts, "f"])
        assert len(path) > 8000
        sfd, st = open_file(fd, path)
        os.close(sfd)
        assert stat.S_ISREG(st.st_mode)
    finally:
        os.close(fd)
    remove_tree(tmp_path / parts[0])


# holes


def test_copies_keep_holes_and_content(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.write(b"a" * 65536)
        f.seek(16 << 20)
        f.write(b"b" * 65536)
        f.truncate(1 << 30)
    for name in ("copy", "clone"):
        dst = tmp_path / name
        if name == "copy":
            sfd = os.open(src, os.O_RDONLY)
            dfd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600)
            copy_fd(sfd, dfd)
            os.close(sfd)
            os.close(dfd)
        else:
            clone_or_copy(src, dst)
        assert dst.stat().st_size == 1 << 30
        assert dst.stat().st_blocks * 512 < 4 << 20
        with open(dst, "rb") as f:
            assert f.read(65536) == b"a" * 65536
            f.seek((16 << 20) - 4096)
            assert f.read(4096 + 65536 + 4096) == bytes(4096) + b"b" * 65536 + bytes(4096)


def test_materialize_extends_a_file_that_ends_in_a_hole(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    me = (os.getuid(), os.getgid())
    entries = [Entry(path=".", kind="dir", mode=0o755, uid=me[0], gid=me[1], mtime_ns=T0),
               Entry(path="f", kind="file", mode=0o644, uid=me[0], gid=me[1], mtime_ns=T0,
                     size=4096 + (8 << 20))]
    materialize(entries, dst,
                lambda e, fd: write_sparse(fd, b"z" * 4096 + bytes(8 << 20)))
    st = (dst / "f").stat()
    assert st.st_size == 4096 + (8 << 20)
    assert st.st_blocks * 512 < 1 << 20


# depth and descriptors


def test_a_deep_tree_round_trips_with_few_descriptors(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Deeper than PATH_MAX, with the descriptor cache smaller than the tree is deep."""
    monkeypatch.setattr(tree_module, "FD_CACHE", 4)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):
        for side in ("a", "b"):  # two subdirectories per level: parents get evicted
            os.mkdir(f"{side}-dir-level", dir_fd=fd)
        os.close(os.open("file", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd))
        nxt = os.open("a-dir-level", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    before = len(os.listdir("/proc/self/fd"))
    copy_tree(src, dst)
    assert len(os.listdir("/proc/self/fd")) == before
    assert [e.path for e in scan(dst)] == [e.path for e in scan(src)]
    assert [(e.kind, e.mode, e.mtime_ns) for e in scan(dst)][1:] == \
        [(e.kind, e.mode, e.mtime_ns) for e in scan(src)][1:]
    remove_tree(src)
    remove_tree(dst)
    assert not src.exists() and not dst.exists()


def test_a_symlink_replaced_by_a_directory_before_its_target_is_read_is_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listing saw a symlink; by the time its target is read it is a directory (a
    container swapping them in a loop): the entry is skipped, the scan goes on."""
    (tmp_path / "link").symlink_to("elsewhere")
    (tmp_path / "z").write_text("kept")
    real = os.readlink

    def swapped_first(path: Any, *args: Any, **kwargs: Any) -> str:
        monkeypatch.setattr(os, "readlink", real)
        (tmp_path / "link").unlink()
        (tmp_path / "link").mkdir()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "readlink", swapped_first)
    paths = [e.path for e in scan(tmp_path)]
    assert paths == [".", "z"]


@pytest.mark.parametrize("buffer", [bytes, bytearray])
def test_all_zero_says_whether_a_block_is_all_zero_bytes(buffer: type) -> None:
    block = SPARSE_BLOCK
    data = buffer(bytes(block) + b"\x01" + bytes(block - 1) + bytes(block // 2))
    assert all_zero(data, 0, block)
    assert not all_zero(data, block, 2 * block)  # a nonzero first byte
    assert all_zero(data, 2 * block, len(data))  # a short last block
    assert all_zero(data, 5, 5)
    last = buffer(bytes(block - 1) + b"\x80")
    assert not all_zero(last, 0, block)  # a nonzero last byte
    assert all_zero(last, 0, block - 1)
