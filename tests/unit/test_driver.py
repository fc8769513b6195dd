"""The driver: one method per VolumeDriver verb, reference-counted mounts, crash recovery."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from unit_support import MakeDriver, detach

from backends.errors import BackendError
from plugin.driver import Driver
from plugin.errors import (
    InvalidName,
    InvalidOption,
    StateError,
    VolumeExists,
    VolumeInUse,
    VolumeNotFound,
)
from plugin.settings import Settings
from plugin.state import VolumeRecord
from tests.support.mounts import mounts_at


def data_dir(settings: Settings, name: str) -> Path:
    return settings.root / "volumes" / name


def mounts(driver: Driver, name: str) -> int:
    status = driver.get(name).status
    assert status is not None
    count = status["mounts"]
    assert isinstance(count, int)
    assert count == driver.state.mount_count(name)
    return count


# Create


def test_create_makes_an_empty_directory_with_the_options(
    driver: Driver, settings: Settings
) -> None:
    driver.create("v", {"mode": "0750", "uid": "1234", "gid": "4321"})
    st = data_dir(settings, "v").stat()
    assert stat.S_IMODE(st.st_mode) == 0o750
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    info = driver.get("v")
    assert info.name == "v"
    assert info.mountpoint == data_dir(settings, "v")
    assert info.created_at.tzinfo is not None
    assert info.status is not None
    assert info.status["options"]["mode"] == "0750"
    assert info.status["options"]["uid"] == "1234"
    assert info.status["mounts"] == 0
    assert "size_bytes" in info.status


@pytest.mark.parametrize(("first", "again"), [
    (None, None),
    (None, {}),
    ({"mode": "755"}, {"mode": "0755"}),
    ({"mode": "755"}, {"Mode": " 0o755 "}),
    ({"mode": "0755"}, None),  # 0755 is the default
    ({"uid": "1000", "gid": "10"}, {"GID": "10", "UID": "1000"}),
    ({"backend": "local"}, {}),
])
def test_create_again_with_the_same_options_is_a_no_op(
    driver: Driver, settings: Settings,
    first: dict[str, str] | None, again: dict[str, str] | None,
) -> None:
    driver.create("v", first)
    (data_dir(settings, "v") / "data").write_text("kept")
    created_at = driver.get("v").created_at
    driver.create("v", again)
    assert (data_dir(settings, "v") / "data").read_text() == "kept"
    assert driver.get("v").created_at == created_at
    assert [v.name for v in driver.list_volumes()] == ["v"]


def test_create_again_with_other_options_errors(driver: Driver) -> None:
    driver.create("v", {"uid": "1000"})
    with pytest.raises(VolumeExists) as excinfo:
        driver.create("v", {"uid": "1001"})
    message = str(excinfo.value)
    assert "'v'" in message
    assert "1000" in message and "1001" in message
    status = driver.get("v").status
    assert status is not None
    assert status["options"]["uid"] == "1000"  # the first options stay


@pytest.mark.parametrize(("name", "options", "error"), [
    ("../x", None, InvalidName),
    ("v", {"colour": "red"}, InvalidOption),
    ("v", {"password": "x"}, InvalidOption),
    ("v", {"mode": "999"}, InvalidOption),
    ("v", {"backend": "nope"}, InvalidOption),
])
def test_refused_create_leaves_nothing(
    driver: Driver, settings: Settings, name: str, options: dict[str, str] | None,
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        driver.create(name, options)
    assert driver.list_volumes() == []
    assert [p.name for p in (settings.root / "volumes").iterdir()
            if not p.name.startswith(".")] == []


def test_failed_state_write_fails_create_and_leaves_no_directory(
    driver: Driver, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(record: VolumeRecord, **_: object) -> None:
        raise StateError("disk full")

    monkeypatch.setattr(driver.state, "add_volume", broken)
    with pytest.raises(StateError):
        driver.create("v", None)
    assert not data_dir(settings, "v").exists()


def test_default_backend_from_settings_is_used(make_driver: MakeDriver,
                                               settings: Settings) -> None:
    misconfigured = Settings(root=settings.root, socket=settings.socket, default_backend="s3x")
    driver = make_driver(misconfigured)
    with pytest.raises(InvalidOption, match=r"'s3x'.*available: .*local"):
        driver.create("v", None)
    driver.create("v", {"backend": "local"})  # an explicit backend still works


# Remove


def test_remove_deletes_record_and_data(driver: Driver, settings: Settings) -> None:
    driver.create("v", None)
    (data_dir(settings, "v") / "f").write_text("x")
    driver.remove("v")
    assert not data_dir(settings, "v").exists()
    with pytest.raises(VolumeNotFound):
        driver.get("v")
    with pytest.raises(VolumeNotFound):
        driver.remove("v")


def test_remove_in_use_errors_with_the_count(driver: Driver, settings: Settings) -> None:
    driver.create("v", None)
    driver.mount("v", "a" * 64)
    driver.mount("v", "b" * 64)
    with pytest.raises(VolumeInUse) as excinfo:
        driver.remove("v")
    assert "volume 'v' is in use by 2 mount(s)" in str(excinfo.value)
    assert data_dir(settings, "v").is_dir()
    driver.unmount("v", "a" * 64)
    with pytest.raises(VolumeInUse, match="in use by 1 mount"):
        driver.remove("v")
    driver.unmount("v", "b" * 64)
    driver.remove("v")
    assert not data_dir(settings, "v").exists()


# Mount / Unmount


def test_mount_counts_per_id_including_the_same_id_twice(
    driver: Driver, settings: Settings
) -> None:
    driver.create("v", None)
    assert driver.mount("v", "id1") == data_dir(settings, "v")
    assert driver.mount("v", "id1") == data_dir(settings, "v")  # docker cp on a running ctr
    driver.mount("v", "id2")
    assert mounts(driver, "v") == 3
    driver.unmount("v", "id1")
    assert mounts(driver, "v") == 2
    driver.unmount("v", "id1")
    driver.unmount("v", "id1")  # used up: ignored, not counted twice
    assert mounts(driver, "v") == 1
    driver.unmount("v", "id2")
    assert mounts(driver, "v") == 0


def test_unmount_of_unknown_id_or_volume_succeeds(driver: Driver,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    driver.create("v", None)
    driver.mount("v", "id1")
    with caplog.at_level(logging.WARNING, logger="plugin.driver"):
        driver.unmount("v", "never-mounted")
        driver.unmount("ghost", "id1")
    assert mounts(driver, "v") == 1
    assert "never-mounted" in caplog.text
    assert "ghost" in caplog.text


def test_failed_mount_leaves_no_reference(driver: Driver, settings: Settings) -> None:
    driver.create("v", None)
    shutil.rmtree(data_dir(settings, "v"))  # deleted out of band
    with pytest.raises(BackendError, match="'v'"):
        driver.mount("v", "id1")
    assert mounts(driver, "v") == 0
    driver.remove("v")  # no phantom reference blocks it


def test_failed_state_write_on_mount_leaves_no_reference(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver.create("v", None)

    def broken(name: str, mount_id: str) -> int:
        raise StateError("disk full")

    monkeypatch.setattr(driver.state, "add_mount", broken)
    with pytest.raises(StateError):
        driver.mount("v", "id1")
    monkeypatch.undo()
    assert mounts(driver, "v") == 0


def test_mount_of_unknown_volume_errors(driver: Driver) -> None:
    with pytest.raises(VolumeNotFound, match="'ghost'"):
        driver.mount("ghost", "id1")
    with pytest.raises(InvalidName):
        driver.mount("../etc", "id1")


def test_parallel_mounts_and_unmounts_are_exact(driver: Driver) -> None:
    driver.create("v", None)
    ids = [f"id{i % 20}" for i in range(50)]  # 20 distinct IDs, most used several times
    barrier = threading.Barrier(50)

    def run(fn: str, mount_id: str) -> None:
        barrier.wait()
        getattr(driver, fn)("v", mount_id)

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(lambda i: run("mount", i), ids))
    assert mounts(driver, "v") == 50
    with ThreadPoolExecutor(50) as pool:
        list(pool.map(lambda i: run("unmount", i), ids))
    assert mounts(driver, "v") == 0
    driver.remove("v")


# Get / List / Path


def test_get_of_unknown_volume_errors(driver: Driver) -> None:
    with pytest.raises(VolumeNotFound, match="'ghost'"):
        driver.get("ghost")
    with pytest.raises(InvalidName):
        driver.get("a/b")


def test_get_never_raises_when_the_directory_vanished(driver: Driver,
                                                      settings: Settings) -> None:
    driver.create("v", {"uid": "7"})
    driver.mount("v", "id1")
    shutil.rmtree(data_dir(settings, "v"))
    info = driver.get("v")
    assert info.name == "v"
    assert info.status is not None
    assert info.status["state"] == "missing"
    assert info.status["mounts"] == 1
    assert info.status["options"]["uid"] == "7"
    assert [v.name for v in driver.list_volumes()] == ["v"]
    assert driver.path("v") == data_dir(settings, "v")


def test_get_never_raises_when_stored_options_no_longer_parse(
    driver: Driver, settings: Settings
) -> None:
    # e.g. a downgrade to a version without an option the record was created with
    driver.state.add_volume(VolumeRecord(name="v", backend="local", options={"colour": "x"}))
    data_dir(settings, "v").mkdir()
    info = driver.get("v")
    assert info.status is not None
    assert "colour" in info.status["status_error"]


def test_list_and_path(driver: Driver, settings: Settings) -> None:
    driver.create("b", None)
    driver.create("a", None)
    listed = driver.list_volumes()
    assert [(v.name, v.mountpoint) for v in listed] == [
        ("a", data_dir(settings, "a")), ("b", data_dir(settings, "b"))]
    assert all(v.created_at.tzinfo is not None for v in listed)
    assert driver.path("a") == data_dir(settings, "a")
    with pytest.raises(VolumeNotFound):
        driver.path("c")


# recover() after a restart or a kill -9


def restart(make_driver: MakeDriver) -> Driver:
    driver = make_driver()
    driver.recover()
    return driver


def test_recover_removes_an_empty_orphan_directory(make_driver: MakeDriver,
                                                   settings: Settings) -> None:
    make_driver()  # lays out the root
    data_dir(settings, "half").mkdir()  # killed between the mkdir and the record
    driver = restart(make_driver)
    assert not data_dir(settings, "half").exists()
    assert driver.list_volumes() == []
    driver.create("half", None)  # the name is free


def test_recover_adopts_an_orphan_directory_with_data(
    make_driver: MakeDriver, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    make_driver()
    data_dir(settings, "orphan").mkdir()
    (data_dir(settings, "orphan") / "precious").write_text("data")
    with caplog.at_level(logging.WARNING, logger="plugin.driver"):
        driver = restart(make_driver)
    assert (data_dir(settings, "orphan") / "precious").read_text() == "data"
    assert [v.name for v in driver.list_volumes()] == ["orphan"]
    info = driver.get("orphan")
    assert info.status is not None
    assert info.status["options"] == {"backend": "local", "mode": "0755"}
    assert "adopted" in caplog.text and "orphan" in caplog.text


def test_recover_leaves_an_invalid_directory_name_alone(
    make_driver: MakeDriver, settings: Settings
) -> None:
    make_driver()
    odd = data_dir(settings, "not a volume")
    odd.mkdir()
    (odd / "f").write_text("x")
    driver = restart(make_driver)
    assert (odd / "f").read_text() == "x"
    assert driver.list_volumes() == []


def test_recover_keeps_a_record_without_directory_and_logs_it(
    make_driver: MakeDriver, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_driver()
    first.create("lost", {"uid": "3"})
    shutil.rmtree(data_dir(settings, "lost"))
    with caplog.at_level(logging.ERROR, logger="plugin.driver"):
        driver = restart(make_driver)
    assert [v.name for v in driver.list_volumes()] == ["lost"]
    assert "lost" in caplog.text
    assert str(data_dir(settings, "lost")) in caplog.text  # says what to restore
    info = driver.get("lost")
    assert info.status is not None
    assert info.status["state"] == "missing"
    driver.remove("lost")  # and the user can clean it up


def test_recover_finishes_an_interrupted_removal(make_driver: MakeDriver,
                                                 settings: Settings) -> None:
    first = make_driver()
    first.create("gone", None)
    (data_dir(settings, "gone") / "f").write_text("x")
    # killed after the backend moved the directory aside, before the record was deleted
    os.rename(data_dir(settings, "gone"), settings.root / "volumes" / ".removing" / "gone@dead")
    driver = restart(make_driver)
    assert driver.list_volumes() == []
    assert list((settings.root / "volumes" / ".removing").iterdir()) == []
    with pytest.raises(VolumeNotFound):
        driver.get("gone")


def test_recover_after_kill_9_in_the_middle_of_everything(
    make_driver: MakeDriver, settings: Settings
) -> None:
    first = make_driver()
    for name in ("healthy", "lost", "gone"):
        first.create(name, {"mode": "0700"})
    first.mount("healthy", "id1")
    first.mount("healthy", "id1")
    first.mount("healthy", "id2")
    volumes = settings.root / "volumes"
    shutil.rmtree(volumes / "lost")
    os.rename(volumes / "gone", volumes / ".removing" / "gone@0123abcd")
    (volumes / ".creating" / "half").mkdir()
    (volumes / ".creating" / "half" / "partial").write_text("x")
    (volumes / "empty").mkdir()
    (volumes / "orphan").mkdir()
    (volumes / "orphan" / "f").write_text("x")
    first.jobs.shutdown()
    first.state.close()  # the process is gone; a new one starts on the same root

    driver = restart(make_driver)
    assert [v.name for v in driver.list_volumes()] == ["healthy", "lost", "orphan"]
    assert mounts(driver, "healthy") == 3
    status = driver.get("healthy").status
    assert status is not None
    assert status["options"]["mode"] == "0700"
    lost = driver.get("lost").status
    assert lost is not None
    assert lost["state"] == "missing"
    assert sorted(p.name for p in volumes.iterdir() if not p.name.startswith(".")) == [
        "healthy", "orphan"]
    assert list((volumes / ".creating").iterdir()) == []
    driver._purge()  # start() queues it in the background
    assert list((volumes / ".removing").iterdir()) == []
    driver.unmount("healthy", "id2")
    assert mounts(driver, "healthy") == 2


def test_recover_drops_mount_references_after_a_reboot(
    make_driver: MakeDriver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = make_driver()
    first.create("v", None)
    first.mount("v", "id1")
    first.recover()  # records this boot
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("another-boot\n")
    monkeypatch.setattr("plugin.driver.BOOT_ID", boot_id)
    driver = restart(make_driver)
    assert mounts(driver, "v") == 0
    driver.remove("v")


def test_recover_keeps_mount_references_on_the_same_boot(make_driver: MakeDriver) -> None:
    first = make_driver()
    first.create("v", None)
    first.recover()
    first.mount("v", "id1")
    driver = restart(make_driver)
    assert mounts(driver, "v") == 1


# managed plugin: real bind mounts under the propagated mount


@pytest.fixture
def bind_settings(tmp_path: Path) -> Settings:
    return Settings(root=tmp_path / "root", socket=tmp_path / "pyvol.sock",
                    mount_root=tmp_path / "mnt")


@pytest.mark.usefixtures("can_mount")
def test_bind_appears_on_first_mount_and_goes_on_last_unmount(
    make_driver: MakeDriver, bind_settings: Settings
) -> None:
    driver = make_driver(bind_settings)
    assert bind_settings.mount_root is not None
    target = bind_settings.mount_root / "v"
    driver.create("v", None)
    assert mounts_at(target) == 0
    assert driver.mount("v", "id1") == target
    assert mounts_at(target) == 1
    (target / "written-in-container").write_text("hi")
    assert (data_dir(bind_settings, "v") / "written-in-container").read_text() == "hi"
    assert driver.mount("v", "id2") == target
    assert driver.mount("v", "id1") == target
    assert mounts_at(target) == 1  # counted, not stacked
    assert driver.get("v").mountpoint == target
    driver.unmount("v", "id1")
    driver.unmount("v", "id2")
    assert mounts_at(target) == 1
    driver.unmount("v", "id1")
    assert mounts_at(target) == 0
    assert not target.exists()
    assert (data_dir(bind_settings, "v") / "written-in-container").read_text() == "hi"


@pytest.mark.usefixtures("can_mount")
@pytest.mark.parametrize("bind_survived", [False, True],
                         ids=["new mount namespace", "bind still in place"])
def test_recover_reestablishes_binds_for_mounted_volumes(
    make_driver: MakeDriver, bind_settings: Settings, bind_survived: bool
) -> None:
    assert bind_settings.mount_root is not None
    first = make_driver(bind_settings)
    first.create("used", None)
    first.create("idle", None)
    first.mount("used", "id1")
    first.mount("used", "id1")
    target = bind_settings.mount_root / "used"
    if not bind_survived:
        detach(target)
        assert mounts_at(target) == 0

    driver = make_driver(bind_settings)
    driver.recover()
    assert mounts_at(target) == 1  # back, and never stacked twice
    assert mounts_at(bind_settings.mount_root / "idle") == 0
    (data_dir(bind_settings, "used") / "f").write_text("x")
    assert (target / "f").read_text() == "x"
    driver.unmount("used", "id1")
    assert mounts_at(target) == 1
    driver.unmount("used", "id1")
    assert mounts_at(target) == 0


@pytest.mark.usefixtures("can_mount")
def test_recover_releases_binds_without_references(
    make_driver: MakeDriver, bind_settings: Settings
) -> None:
    assert bind_settings.mount_root is not None
    first = make_driver(bind_settings)
    first.create("v", None)
    first.mount("v", "id1")
    first.state.drop_mount("v", "id1")  # the reference went, the bind stayed (a crash)
    target = bind_settings.mount_root / "v"
    assert mounts_at(target) == 1
    make_driver(bind_settings).recover()
    assert mounts_at(target) == 0


@pytest.mark.usefixtures("can_mount")
def test_failed_mount_leaves_no_bind(
    make_driver: MakeDriver, bind_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert bind_settings.mount_root is not None
    driver = make_driver(bind_settings)
    driver.create("v", None)

    def broken(name: str, mount_id: str) -> int:
        raise StateError("disk full")

    monkeypatch.setattr(driver.state, "add_mount", broken)
    with pytest.raises(StateError):
        driver.mount("v", "id1")
    monkeypatch.undo()
    assert mounts_at(bind_settings.mount_root / "v") == 0
    assert mounts(driver, "v") == 0


# Bounded waits and per-feature jobs

def test_no_lock_is_kept_for_junk_names_or_removed_volumes(driver: Driver) -> None:
    from plugin.errors import InvalidName

    driver.create("v", None)
    driver.remove("v")
    for junk in ("x" * 100_000, "../x", ""):
        with pytest.raises(InvalidName):
            driver.remove(junk)
    with pytest.raises(VolumeNotFound):
        driver.mount("gone", "id")
    assert len(driver.guard.locks) == 0


def test_jobs_cancel_only_queued_cancellable_work_and_say_what_runs() -> None:
    from plugin.jobs import Jobs

    jobs = Jobs(name="test")
    release = threading.Event()
    ran: list[str] = []
    try:
        jobs.submit("v", "slow job", lambda: release.wait(10) and None)
        jobs.submit("v", "dropped", lambda: ran.append("dropped"), cancellable=True)
        jobs.submit("v", "kept", lambda: ran.append("kept"))
        assert not jobs.wait("v", 0.1)
        assert jobs.describe("v") is not None
        assert jobs.describe("v").startswith("slow job (running for 0 s), then 2 more")  # type: ignore[union-attr]
        assert jobs.cancel("v") == ["dropped"]
        release.set()
        assert jobs.wait("v", 10)
        assert ran == ["kept"] and not jobs.busy("v")
    finally:
        release.set()
        jobs.shutdown()


def test_an_error_is_cleared_only_by_a_success_of_the_same_feature(driver: Driver) -> None:
    def fail() -> None:
        raise OSError("disk on fire")

    driver.sync.jobs.submit("v", "S3 restore", fail)
    assert driver.sync.jobs.wait("v", 10)
    driver.jobs.submit("v", "snapshot on unmount", lambda: None)
    assert driver.jobs.wait("v", 10)
    assert driver.sync.jobs.errors == {"v": "S3 restore failed: disk on fire"}
    assert driver.jobs.errors == {}


def test_remote_copies_may_not_nest_with_those_of_volumes_or_pending_removed_ones(
        driver: Driver) -> None:
    from plugin.state import SyncRecord

    def s3(prefix: str) -> dict[str, str]:
        return {"s3_bucket": "b", "s3_prefix": prefix, "s3_restore": "never"}

    driver.create("a", s3("team"))
    driver.state.put_sync(SyncRecord(volume="gone", bucket="b", prefix="ops", keep=3,
                                     pending=True, snapshot="sync-1"))
    with pytest.raises(InvalidOption, match=r"^volume 'x': its remote copy s3://b/ops/db lies "
                       r"inside the remote copy s3://b/ops of removed volume 'gone' \(its last "
                       r"push is pending\)"):
        driver.create("x", s3("ops/db"))
    with pytest.raises(InvalidOption, match=r"s3://b/team/db lies inside the remote copy "
                       r"s3://b/team of volume 'a'"):
        driver.create("y", s3("team/db"))
    driver.create("gone", s3("ops"))  # the same name again takes over its own remote copy
    driver.create("z", s3("teamdb"))
    driver.create("w", {**s3("team"), "s3_bucket": "other"})
    assert [v.name for v in driver.list_volumes()] == ["a", "gone", "w", "z"]


def test_a_lock_wait_ends_at_the_deadline_with_what_holds_the_volume() -> None:
    from plugin.errors import VolumeBusy
    from plugin.locks import Deadline, VolumeLocks

    locks = VolumeLocks()
    with locks.hold("v", Deadline(), lambda: "never asked"):
        with pytest.raises(VolumeBusy, match=r"^v is busy$"), \
                locks.hold("v", Deadline(0.05), lambda: "v is busy"):
            pass
        assert len(locks) == 1
    assert len(locks) == 0
    assert Deadline(None).remaining() is None and Deadline(None).remaining(3.0) == 3.0


def test_remove_drops_a_queued_on_unmount_snapshot_and_waits_for_the_running_job(
        driver: Driver) -> None:
    driver.create("v", {"snapshot_on_unmount": "true"})
    data = driver.mount("v", "id1")
    (data / "f").write_text("x")
    release = threading.Event()
    driver.jobs.submit("v", "slow job", lambda: release.wait(10) and None)
    driver.unmount("v", "id1")  # queues the on-unmount snapshot behind the slow job
    threading.Timer(0.3, release.set).start()
    driver.remove("v")
    assert driver.jobs.wait("v", 10)
    assert driver.snapshots.store.list_snapshots("v") == []


def test_start_up_makes_every_data_directory_0700_and_narrows_wider_ones(
        make_driver: MakeDriver, settings: Settings) -> None:
    root = settings.root
    (root / "volumes").mkdir(parents=True)
    os.chmod(root, 0o755)  # noqa: S103 -- the wide mode start-up must narrow
    os.chmod(root / "volumes", 0o711)  # noqa: S103
    make_driver()
    for sub in ("", "volumes", "volumes/.creating", "volumes/.removing",
                "volumes/.replacing", "snapshots", "s3cache"):
        assert stat.S_IMODE((root / sub).stat().st_mode) == 0o700, sub
