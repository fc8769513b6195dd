"""Size-limited volumes (``-o size=``) through a real ``pyvol serve`` on a unix socket.

Each volume of the ``image`` backend is an ext4 filesystem in a sparse image file on a loop
device, so these tests need root and loop devices; under CI=true their absence is a failure.
The server runs in legacy mode: Mount returns the directory the volume's filesystem is
mounted on, and the test writes there as a container would.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sync_support import SyncServer, mount, unmount, wait_for

from tests.support.mounts import loops_under
from tests.support.processes import CAP_SYS_RESOURCE, has_capability

if TYPE_CHECKING:
    from s3_fixtures import MotoServer

pytest_plugins = ["s3_fixtures"]

MiB = 1 << 20
Start = Callable[..., SyncServer]


def _loops_available() -> str | None:
    if os.geteuid() != 0:
        return "sized volumes need root"
    if not Path("/dev/loop-control").exists():
        return "sized volumes need /dev/loop-control"
    return None


if (_why := _loops_available()) is not None and os.environ.get("CI") == "true":
    raise RuntimeError(f"{_why}; CI=true requires the sized-volume tests to run")
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")



@pytest.fixture
def server(start: Start, tmp_path: Path) -> SyncServer:
    return start(tmp_path / "root", {})


def create(server: SyncServer, name: str, **opts: str) -> None:
    server.client.ok("VolumeDriver.Create", {"Name": name, "Opts": opts})


def status(server: SyncServer, name: str) -> dict[str, Any]:
    result: dict[str, Any] = server.client.volume(name)["Status"]
    return result


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fill(path: Path, limit: int) -> int:
    """Write to ``path`` until the filesystem is full; returns the bytes written."""
    written = 0
    chunk = os.urandom(MiB)
    with path.open("wb") as out:
        try:
            while written < limit:
                out.write(chunk)
                out.flush()
                written += len(chunk)
            os.fsync(out.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return written
    raise AssertionError(f"wrote {written} bytes into a volume limited below that")



def test_size_alone_picks_the_image_backend_and_inspect_shows_the_limit(
        server: SyncServer) -> None:
    create(server, "db", size="64M")
    s = status(server, "db")
    assert s["backend"] == "image"
    assert s["options"]["size"] == "64 MiB"
    assert s["size_limit"] == "64 MiB"
    assert s["size_limit_bytes"] == 64 * MiB
    assert 0 < s["free_bytes"] <= 64 * MiB
    assert s["free_bytes"] >= 52 * MiB  # ext4's journal and tables take the rest
    assert s["used_bytes"] + s["free_bytes"] <= 64 * MiB
    assert s["host_bytes"] < 16 * MiB  # sparse: the host spends what is written


def test_writing_past_the_limit_fails_with_enospc_and_keeps_what_was_written(
        server: SyncServer) -> None:
    create(server, "full", size="64M")
    data = mount(server.client, "full", "m1")
    vfs = os.statvfs(data)
    assert 54 * MiB <= vfs.f_blocks * vfs.f_frsize <= 64 * MiB  # df in the volume
    assert sorted(os.listdir(data)) == []  # no lost+found: initdb and others want it empty
    (data / "keep.bin").write_bytes(os.urandom(MiB))
    kept = digest(data / "keep.bin")
    written = fill(data / "big.bin", 200 * MiB)
    assert 40 * MiB < written < 64 * MiB
    assert digest(data / "keep.bin") == kept
    unmount(server.client, "full", "m1")
    data = mount(server.client, "full", "m2")
    assert digest(data / "keep.bin") == kept
    used = status(server, "full")["used_bytes"]
    assert used >= written
    unmount(server.client, "full", "m2")



def test_resize_grows_a_mounted_xfs_volume_online_and_refuses_to_shrink(
        server: SyncServer) -> None:
    create(server, "grow", size="320M", fs="xfs")
    create(server, "plain")
    data = mount(server.client, "grow", "m1")
    (data / "a").write_bytes(b"before")
    before = os.statvfs(data)
    done = server.cli("resize", "grow", "512M")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "grow: resized to 512 MiB (online)\n"
    after = os.statvfs(data)
    assert (after.f_blocks - before.f_blocks) * after.f_frsize >= 190 * MiB
    assert (data / "a").read_bytes() == b"before"
    s = status(server, "grow")
    assert (s["size_limit"], s["options"]["size"], s["filesystem"]) == (
        "512 MiB", "512 MiB", "xfs")

    shrink = server.cli("resize", "grow", "320M")
    assert shrink.returncode == 1
    assert "shrink" in shrink.stderr and "from=grow" in shrink.stderr
    assert status(server, "grow")["size_limit"] == "512 MiB"
    unmount(server.client, "grow", "m1")

    plain = server.cli("resize", "plain", "1G")
    assert plain.returncode == 1
    assert plain.stderr == (
        "pyvol: volume 'plain' (backend local) has no size limit to change: create a sized "
        "copy with `docker volume create -d pyvol -o size=SIZE -o from=plain NEW`\n")


def test_an_ext4_volume_grows_while_mounted_only_with_cap_sys_resource(
        server: SyncServer) -> None:
    create(server, "grow4", size="64M")
    data = mount(server.client, "grow4", "m1")
    (data / "a").write_bytes(b"before")
    done = server.cli("resize", "grow4", "96M")
    if has_capability(CAP_SYS_RESOURCE):
        assert done.stdout == "grow4: resized to 96 MiB (online)\n", done.stderr
    else:
        assert done.returncode == 1
        assert "CAP_SYS_RESOURCE" in done.stderr and "fs=xfs" in done.stderr
        assert status(server, "grow4")["size_limit"] == "64 MiB"
    unmount(server.client, "grow4", "m1")
    done = server.cli("resize", "grow4", "128M")
    assert done.returncode == 0, done.stderr
    how = "online" if has_capability(CAP_SYS_RESOURCE) else "offline"
    assert done.stdout == f"grow4: resized to 128 MiB ({how})\n"
    data = mount(server.client, "grow4", "m2")
    vfs = os.statvfs(data)
    assert vfs.f_blocks * vfs.f_frsize > 112 * MiB
    assert (data / "a").read_bytes() == b"before"
    assert fill(data / "big.bin", 300 * MiB) > 64 * MiB
    unmount(server.client, "grow4", "m2")
    assert status(server, "grow4")["options"]["size"] == "128 MiB"


def test_bad_sizes_and_backends_that_cannot_limit_are_refused_naming_the_option(
        server: SyncServer) -> None:
    for value in ("10", "ten", "1M", "-5G"):
        err = server.client.fails("VolumeDriver.Create",
                                  {"Name": "bad", "Opts": {"size": value}})
        assert err.startswith(f"option size={value!r}: "), err
    err = server.client.fails("VolumeDriver.Create",
                              {"Name": "bad", "Opts": {"size": "1G", "backend": "local"}})
    assert err == ("option 'size' is not supported by backend local (it cannot enforce a size "
                   "limit); backend image takes it: omit -o backend")
    assert "bad" not in {v["Name"] for v in server.client.ok("VolumeDriver.List")["Volumes"]}


def test_a_clone_keeps_its_sources_size_unless_told_otherwise(server: SyncServer) -> None:
    create(server, "src", size="64M")
    data = mount(server.client, "src", "m1")
    (data / "f").write_bytes(b"x" * 5000)
    unmount(server.client, "src", "m1")
    create(server, "same", **{"from": "src"})
    create(server, "bigger", **{"from": "src", "size": "128M"})
    create(server, "dir", **{"from": "src", "backend": "local"})
    assert status(server, "same")["size_limit"] == "64 MiB"
    assert status(server, "bigger")["size_limit"] == "128 MiB"
    assert status(server, "dir")["backend"] == "local"
    for name in ("same", "bigger", "dir"):
        assert (mount(server.client, name, "c") / "f").read_bytes() == b"x" * 5000
        unmount(server.client, name, "c")
    create(server, "same", **{"from": "src"})  # idempotent: the same create again


def test_snapshots_of_a_sized_volume_restore_and_the_on_unmount_one_reads_after_release(
        server: SyncServer) -> None:
    create(server, "snap", size="64M", snapshot_on_unmount="true")
    data = mount(server.client, "snap", "m1")
    (data / "v").write_text("one")
    unmount(server.client, "snap", "m1")
    # The on-unmount snapshot runs after the unmount released the volume's filesystem: its
    # view keeps the data available until it has read it.
    snaps = wait_for(lambda: [s for s in status(server, "snap")["snapshots"]] or None, 20,
                     "the on-unmount snapshot")
    assert snaps[0]["kind"] == "automatic" and snaps[0]["files"] == 1
    made = server.cli("snapshot", "create", "snap", "manual-1")
    assert made.returncode == 0, made.stderr
    data = mount(server.client, "snap", "m2")
    (data / "v").write_text("two")
    unmount(server.client, "snap", "m2")
    wait_for(lambda: status(server, "snap").get("snapshot_state") is None, 20, "snapshots")
    restored = server.cli("snapshot", "restore", "snap@manual-1")
    assert restored.returncode == 0, restored.stderr
    data = mount(server.client, "snap", "m3")
    assert (data / "v").read_text() == "one"
    assert status(server, "snap")["size_limit"] == "64 MiB"
    unmount(server.client, "snap", "m3")


def test_a_sized_volume_survives_a_restart_and_a_kill_without_a_second_loop_device(
        start: Start, tmp_path: Path) -> None:
    server = start(tmp_path / "root", {})
    create(server, "keep", size="64M")
    data = mount(server.client, "keep", "m1")
    (data / "f").write_text("kept")
    images = tmp_path / "root" / "images"
    assert len(loops_under(images)) == 1
    server.kill9()
    again = start(tmp_path / "root", {})
    assert status(again, "keep")["mounts"] == 1
    data = Path(again.client.ok("VolumeDriver.Path", {"Name": "keep"})["Mountpoint"])
    assert (data / "f").read_text() == "kept"
    assert len(loops_under(images)) == 1  # the image's device was found and reused
    unmount(again.client, "keep", "m1")
    wait_for(lambda: not loops_under(images), 10, "the loop device to be released")
    again.stop()
    third = start(tmp_path / "root", {})
    assert status(third, "keep")["size_limit"] == "64 MiB"
    assert (mount(third.client, "keep", "m2") / "f").read_text() == "kept"
    unmount(third.client, "keep", "m2")


def test_default_size_applies_to_new_volumes_only(start: Start, tmp_path: Path) -> None:
    server = start(tmp_path / "root", {"DEFAULT_BACKEND": "image", "DEFAULT_SIZE": "64M"})
    create(server, "auto")
    assert status(server, "auto")["size_limit"] == "64 MiB"
    server.stop()
    server = start(tmp_path / "root", {"DEFAULT_BACKEND": "image", "DEFAULT_SIZE": "128M"})
    assert status(server, "auto")["size_limit"] == "64 MiB"
    create(server, "later")
    assert status(server, "later")["size_limit"] == "128 MiB"


def test_a_sized_volume_synced_to_s3_restores_by_name_on_another_host(
        start: Start, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    from s3_fixtures import ACCESS_KEY, SECRET_KEY

    env = {"S3_ENDPOINT_URL": moto.url, "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    first = start(tmp_path / "host-a", env)
    create(first, "web", size="64M", s3_bucket=bucket)
    data = mount(first.client, "web", "m1")
    (data / "index.html").write_text("hello")
    (data / "big").write_bytes(os.urandom(3 * MiB))
    expected = digest(data / "big")
    unmount(first.client, "web", "m1")
    wait_for(lambda: (status(first, "web")["s3"].get("last_push") or None), 60, "the push")

    second = start(tmp_path / "host-b", env)
    create(second, "web", size="64M", s3_bucket=bucket)
    restored = mount(second.client, "web", "m1")
    assert (restored / "index.html").read_text() == "hello"
    assert digest(restored / "big") == expected
    assert status(second, "web")["size_limit"] == "64 MiB"
    unmount(second.client, "web", "m1")


def test_a_sized_volume_whose_record_was_lost_is_adopted_with_its_size(
        start: Start, tmp_path: Path) -> None:
    server = start(tmp_path / "root", {})
    create(server, "orphan", size="64M")
    data = mount(server.client, "orphan", "m1")
    (data / "f").write_text("mine")
    unmount(server.client, "orphan", "m1")
    create(server, "empty", size="64M")
    server.stop()
    for state in (tmp_path / "root").glob("state.db*"):
        state.unlink()
    again = start(tmp_path / "root", {})
    assert status(again, "orphan")["size_limit"] == "64 MiB"
    assert status(again, "empty")["backend"] == "image"  # empty, but complete: kept
    assert (mount(again.client, "orphan", "m2") / "f").read_text() == "mine"
    unmount(again.client, "orphan", "m2")


def test_a_resize_runs_outside_the_volume_lock_and_remove_meanwhile_fails_at_once(
        start: Start, tmp_path: Path) -> None:
    release = tmp_path / "release-resize"
    server = start(tmp_path / "root", {"PYVOL_TEST_HOLD_AT": f"resize={release}"})
    create(server, "slow", size="64M")
    done: list[subprocess.CompletedProcess[str]] = []
    worker = threading.Thread(target=lambda: done.append(server.cli("resize", "slow", "96M")))
    worker.start()
    try:
        wait_for(Path(f"{release}.held").exists, 10, "the resize to reach its hold point")
        err = server.client.fails("VolumeDriver.Remove", {"Name": "slow"})
        assert err.startswith("volume 'slow' cannot be removed now: the resize of volume "
                              "'slow' is in progress"), err
        assert status(server, "slow")["size_limit"] == "64 MiB"  # Get answers meanwhile
    finally:
        release.touch()
        worker.join(60)
    assert done[0].returncode == 0, done[0].stderr
    assert status(server, "slow")["size_limit"] == "96 MiB"


def test_default_size_follows_the_backend_the_options_select(
        start: Start, tmp_path: Path) -> None:
    """With DEFAULT_BACKEND=local, ``-o fs=xfs`` alone selects the image backend, which then
    gets DEFAULT_SIZE; a volume that stays local gets no size."""
    server = start(tmp_path / "root", {"DEFAULT_SIZE": "320M"})
    create(server, "x", fs="xfs")
    create(server, "plain")
    s = status(server, "x")
    assert (s["backend"], s["size_limit"], s["filesystem"]) == ("image", "320 MiB", "xfs")
    assert status(server, "plain")["backend"] == "local"
    assert "size" not in status(server, "plain")["options"]
