"""Incremental pushes: only new content travels, measured by a relay in front of the store."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from backends.tree import DirectoryView

if TYPE_CHECKING:
    from s3_fixtures import MakeStore, Relay

pytest_plugins = ["s3_fixtures"]



@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    """2,000 files of about 4 KiB in 20 directories, random content."""
    root = tmp_path / "src"
    rng = random.Random(7)  # noqa: S311 -- reproducible sizes
    for d in range(20):
        (root / f"d{d:02d}").mkdir(parents=True)
    for i in range(2000):
        (root / f"d{i % 20:02d}" / f"f{i:04d}").write_bytes(os.urandom(rng.randint(2048, 6144)))
    return root


def test_push_with_no_change_uploads_nothing_and_reads_no_file(make_store: MakeStore,
        relay: Relay, bucket: str, tmp_path: Path, small_tree: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    remote = make_store(relay.url, bucket, tmp_path / "cache")
    first = remote.push(DirectoryView(small_tree))
    relay.reset()
    opened: list[str] = []
    real_open = DirectoryView.open
    monkeypatch.setattr(DirectoryView, "open",
                        lambda self, e: opened.append(e.path) or real_open(self, e))
    again = remote.push(DirectoryView(small_tree))
    counters = relay.reset()
    assert again == first  # nothing changed: no new snapshot either
    assert remote.list() == [first]
    assert counters.uploaded == 0
    assert opened == []
    assert sum(counters.requests.values()) <= 8


def test_one_percent_change_uploads_about_one_percent(make_store: MakeStore, relay: Relay,
        bucket: str, tmp_path: Path, small_tree: Path) -> None:
    remote = make_store(relay.url, bucket, tmp_path / "cache")
    full = remote.push(DirectoryView(small_tree))
    files = sorted(p for p in small_tree.rglob("f*"))
    changed = 0
    for path in random.Random(1).sample(files, 20):  # noqa: S311
        data = os.urandom(path.stat().st_size)
        path.write_bytes(data)
        changed += len(data)
    relay.reset()
    snap = remote.push(DirectoryView(small_tree))
    uploaded = relay.reset().uploaded
    assert snap.uploaded_bytes <= uploaded
    assert changed <= uploaded <= changed * 1.5 + 16_384, (changed, uploaded)
    assert uploaded < full.uploaded_bytes * 0.03


def test_edit_inside_a_big_file_uploads_that_region(make_store: MakeStore, relay: Relay,
        bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    big = src / "disk.img"
    big.write_bytes(os.urandom(48 << 20))
    remote = make_store(relay.url, bucket, tmp_path / "cache")
    remote.push(DirectoryView(src))
    with open(big, "r+b") as f:
        f.seek(20 << 20)
        f.write(os.urandom(100_000))
    relay.reset()
    remote.push(DirectoryView(src))
    uploaded = relay.reset().uploaded
    assert 100_000 <= uploaded <= 5 << 20, uploaded


def test_same_content_in_many_files_is_stored_once(make_store: MakeStore, relay: Relay,
        bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    blob = os.urandom(300_000)
    for i in range(10):
        (src / f"copy{i}").write_bytes(blob)
    remote = make_store(relay.url, bucket, tmp_path / "cache")
    remote.push(DirectoryView(src))
    assert len(blob) <= relay.counters.uploaded < 2 * len(blob)


def test_progress_reports_bytes_of_content(make_store: MakeStore, relay: Relay, bucket: str,
        tmp_path: Path, small_tree: Path) -> None:
    seen: list[tuple[int, int]] = []
    remote = make_store(relay.url, bucket, tmp_path / "cache")
    snap = remote.push(DirectoryView(small_tree), lambda done, total: seen.append((done, total)))
    assert seen[-1] == (snap.size, snap.size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    seen.clear()
    dst = tmp_path / "dst"
    dst.mkdir()
    remote.restore("latest", dst, lambda done, total: seen.append((done, total)))
    assert seen[-1] == (snap.size, snap.size)


def test_patched_and_rebased_snapshots_all_restore(make_store: MakeStore, relay: Relay,
                                                   bucket: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Small changes are written as patches; once they pile up, fresh tree parts are."""
    from s3sync import push as push_mod
    monkeypatch.setattr(push_mod, "PATCH_MIN", 6)
    monkeypatch.setattr(push_mod, "PATCH_SHARE", 1000)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(30):
        (src / "sub" / f"f{i}").write_bytes(os.urandom(1000))
    remote = make_store(relay.url, bucket, tmp_path / "cache")
    versions = []
    for step in range(6):
        (src / "sub" / f"f{step}").write_bytes(os.urandom(2000))
        (src / f"new{step}").write_text(str(step))
        if step:
            (src / "sub" / f"f{29 - step}").unlink()
        relay.reset()
        snap = remote.push(DirectoryView(src))
        versions.append((snap, relay.reset().uploaded, tree_of(src)))
    assert versions[1][1] < 4000 + 3000  # a patch: the changed file and a few records
    for snap, _, expected in versions:
        dst = tmp_path / f"dst-{snap.id}"
        dst.mkdir()
        make_store(relay.url, bucket, tmp_path / "fresh-cache").restore(snap.id, dst)
        assert tree_of(dst) == expected
    other = make_store(relay.url, bucket, tmp_path / "other-host")
    (src / "late").write_text("from another host")
    late = other.push(DirectoryView(src))
    dst = tmp_path / "dst-late"
    dst.mkdir()
    remote.restore(late.id, dst)
    assert tree_of(dst) == tree_of(src)


def tree_of(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_mtime_ns,
                                       p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def test_a_restore_over_a_copy_of_the_volume_downloads_only_what_it_lacks(
        make_store: MakeStore, relay: Relay, bucket: str, tmp_path: Path) -> None:
    """Host A pushed; host B pushed a change; A restores B's snapshot taking what its own
    copy still has (whole files hard-linked, neither read nor written): only the changed
    file travels, and a local file rewritten behind the cache's back (same size, mtime put
    back; its ctime still moves) is downloaded, not trusted."""
    from tests.support.trees import picture

    a_copy = tmp_path / "a"
    a_copy.mkdir()
    for i in range(4):
        (a_copy / f"big{i}").write_bytes(os.urandom(2_000_000))
    (a_copy / "tag").write_text("a")
    on_a = make_store(relay.url, bucket, tmp_path / "cache-a")
    on_a.push(DirectoryView(a_copy))

    b_copy = tmp_path / "b"
    on_b = make_store(relay.url, bucket, tmp_path / "cache-b")
    b_copy.mkdir()
    on_b.restore("latest", b_copy)
    (b_copy / "tag").write_text("b")
    wanted = picture(b_copy)
    on_b.push(DirectoryView(b_copy))

    # Behind the cache's back: same size, same mtime, other bytes.
    forged = a_copy / "big3"
    stat = forged.stat()
    forged.write_bytes(os.urandom(2_000_000))
    os.utime(forged, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    dst = tmp_path / "pulled"
    dst.mkdir()
    relay.reset()
    local = on_a.restore("latest", dst, local=DirectoryView(a_copy))
    downloaded = relay.reset().downloaded
    assert local is not None and local.linked_bytes == 3 * 2_000_000
    assert (dst / "big0").stat().st_ino == (a_copy / "big0").stat().st_ino
    shutil.rmtree(a_copy)  # as the volume's replaced content is
    assert picture(dst) == wanted
    assert 2_000_000 < downloaded < 2_600_000  # big3 again, the tree, the changed tag
