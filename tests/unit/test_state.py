"""The state store, and restarts: a second store or driver over the same root sees the same."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from unit_support import MakeDriver

from backends.local import LocalBackend
from plugin.errors import StateError, VolumeExists, VolumeInUse
from plugin.options import parse_options
from plugin.settings import Settings
from plugin.state import StateStore, VolumeRecord


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[StateStore]:
    s = StateStore(db_path)
    yield s
    s.close()


def record(name: str, **options: str) -> VolumeRecord:
    return VolumeRecord(name=name, backend="local", options=options)


def test_add_get_list_delete(store: StateStore) -> None:
    assert store.get_volume("a") is None
    assert store.list_volumes() == []
    created = datetime(2024, 5, 1, 12, 34, 56, 123456, tzinfo=UTC)
    store.add_volume(VolumeRecord(name="b", backend="local", options={"uid": "7"},
                                  created_at=created))
    store.add_volume(record("a"))
    got = store.get_volume("b")
    assert got == VolumeRecord(name="b", backend="local", options={"uid": "7"},
                               created_at=created)
    assert [r.name for r in store.list_volumes()] == ["a", "b"]
    store.delete_volume("b")
    assert store.get_volume("b") is None
    assert [r.name for r in store.list_volumes()] == ["a"]
    store.delete_volume("b")  # deleting what is gone is fine


def test_created_at_is_timezone_aware(store: StateStore) -> None:
    store.add_volume(record("a"))
    got = store.get_volume("a")
    assert got is not None
    assert got.created_at.tzinfo is not None
    assert got.created_at.utcoffset() is not None


def test_adding_a_name_twice_fails(store: StateStore) -> None:
    store.add_volume(record("a", uid="1"))
    with pytest.raises(StateError, match="state database"):
        store.add_volume(record("a", uid="2"))
    assert store.get_volume("a") == VolumeRecord(
        name="a", backend="local", options={"uid": "1"},
        created_at=store.get_volume("a").created_at,  # type: ignore[union-attr]
    )


def test_mounts_counted_per_volume_and_id(store: StateStore) -> None:
    store.add_volume(record("a"))
    store.add_volume(record("b"))
    assert store.mount_count("a") == 0
    assert store.add_mount("a", "id1") == 1
    assert store.add_mount("a", "id2") == 2
    assert store.add_mount("a", "id1") == 3  # the same ID twice (docker cp on a running ctr)
    assert store.add_mount("b", "id1") == 1  # the same ID on another volume is separate
    assert store.mount_count("a") == 3
    assert store.mounted_volumes() == {"a": 3, "b": 1}

    assert store.drop_mount("a", "id1") == (True, 2)
    assert store.drop_mount("a", "id1") == (True, 1)
    assert store.drop_mount("a", "id1") == (False, 1)  # id1 is used up
    assert store.mount_count("a") == 1
    assert store.drop_mount("a", "id2") == (True, 0)
    assert store.mounted_volumes() == {"b": 1}


def test_drop_unknown_id_changes_nothing(store: StateStore) -> None:
    store.add_volume(record("a"))
    store.add_mount("a", "id1")
    assert store.drop_mount("a", "never-seen") == (False, 1)
    assert store.drop_mount("no-such-volume", "id1") == (False, 0)
    assert store.mount_count("a") == 1


def test_mount_of_unknown_volume_is_refused(store: StateStore) -> None:
    with pytest.raises(StateError):
        store.add_mount("ghost", "id1")
    assert store.mounted_volumes() == {}


def test_delete_cascades_to_mounts(store: StateStore) -> None:
    store.add_volume(record("a"))
    store.add_mount("a", "id1")
    store.add_mount("a", "id1")
    store.delete_volume("a")
    assert store.mount_count("a") == 0
    assert store.mounted_volumes() == {}
    store.add_volume(record("a"))  # a new volume of the same name starts unmounted
    assert store.mount_count("a") == 0


def test_clear_mounts_and_meta(store: StateStore) -> None:
    store.add_volume(record("a"))
    store.add_mount("a", "id1")
    store.add_mount("a", "id2")
    assert store.clear_mounts() == 2
    assert store.mounted_volumes() == {}
    assert store.get_meta("boot_id") is None
    store.set_meta("boot_id", "one")
    store.set_meta("boot_id", "two")
    assert store.get_meta("boot_id") == "two"


def test_database_files_are_private(store: StateStore, db_path: Path) -> None:
    store.add_volume(record("a", uid="1"))
    files = [db_path, *db_path.parent.glob(db_path.name + "-*")]  # -wal, -shm
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_unreadable_database_is_a_named_error(tmp_path: Path) -> None:
    bad = tmp_path / "state.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match=str(bad)):
        StateStore(bad)


def test_raw_options_round_trip_through_a_second_store(db_path: Path) -> None:
    raw = {" Mode ": "0o750", "UID": " 1000 ", "gid": "20"}
    first = StateStore(db_path)
    first.add_volume(VolumeRecord(name="v", backend="local", options=raw))
    first.add_mount("v", "id1")
    first.add_mount("v", "id1")
    first.add_mount("v", "id2")
    first.close()

    second = StateStore(db_path)
    try:
        got = second.get_volume("v")
        assert got is not None
        assert dict(got.options) == raw  # stored raw, exactly as Docker sent them
        def reparse(opts: object) -> object:
            return parse_options(opts, default_backend="local",  # type: ignore[arg-type]
                                 backends={"local": LocalBackend})
        assert reparse(got.options) == reparse(raw)
        assert second.mount_count("v") == 3
        assert second.drop_mount("v", "id1") == (True, 2)
    finally:
        second.close()


# restart of the whole driver on the same root


def test_second_driver_sees_same_volumes_options_and_mounts(
    make_driver: MakeDriver, settings: Settings
) -> None:
    first = make_driver()
    raw_a = {"Mode": " 0o750", "UID": "1000", "gid": "1000"}
    first.create("a", raw_a)
    first.create("b", None)
    first.mount("a", "id1")
    first.mount("a", "id1")
    first.mount("a", "id2")
    before = {v.name: first.get(v.name) for v in first.list_volumes()}
    parsed_at_create = parse_options(raw_a, default_backend="local",
                                     backends={"local": LocalBackend})

    second = make_driver()
    second.recover()
    after = {v.name: second.get(v.name) for v in second.list_volumes()}

    assert after.keys() == before.keys() == {"a", "b"}
    for name in before:
        old, new = before[name], after[name]
        assert new.created_at == old.created_at
        assert new.mountpoint == old.mountpoint
        assert new.status is not None and old.status is not None
        assert new.status["options"] == old.status["options"]
        assert new.status["mounts"] == old.status["mounts"]
    record_a = second.state.get_volume("a")
    assert record_a is not None
    assert second.options_of(record_a) == parsed_at_create
    assert after["a"].status is not None
    assert after["a"].status["mounts"] == 3
    assert after["a"].status["options"]["mode"] == "0750"

    # Create's idempotence compares against the re-parsed options.
    second.create("a", {"uid": "1000", "GID": "1000", "mode": "750"})
    with pytest.raises(VolumeExists):
        second.create("a", {"uid": "1001"})

    # The counts carry on from where the first driver left them.
    with pytest.raises(VolumeInUse, match="in use by 3 mount"):
        second.remove("a")
    second.unmount("a", "id1")
    second.unmount("a", "id1")
    second.unmount("a", "id1")  # id1 is used up: ignored
    with pytest.raises(VolumeInUse, match="in use by 1 mount"):
        second.remove("a")
    second.unmount("a", "id2")
    second.remove("a")
    assert not (settings.root / "volumes" / "a").exists()


def test_restart_with_another_default_backend_keeps_each_volumes_backend(
    make_driver: MakeDriver, settings: Settings, tmp_path: Path
) -> None:
    # rclone lost options after restarts because it rebuilt them differently from Create.
    backends = {"local": LocalBackend(settings.root),
                "other": LocalBackend(tmp_path / "other-root")}
    first = make_driver(backends=backends)
    first.create("v", {"uid": "5"})
    changed = Settings(root=settings.root, socket=settings.socket, default_backend="other")
    second = make_driver(changed, backends=backends)
    second.recover()
    record_v = second.state.get_volume("v")
    assert record_v is not None
    assert second.options_of(record_v).backend == "local"
    assert second.options_of(record_v).uid == 5
    assert backends["local"].exists("v")
    assert not backends["other"].exists("v")


def test_a_record_being_created_is_invisible_until_finished_and_survives_a_restart(
        db_path: Path) -> None:
    from plugin.state import SyncRecord

    first = StateStore(db_path)
    sync = SyncRecord(volume="new", bucket="b", prefix="new", keep=3, restoring="latest")
    first.add_volume(record("new", s3_bucket="b"), creating=True, sync=lambda _: sync)
    assert first.get_volume("new") is None and first.list_volumes() == []
    assert first.get_sync("new") == sync  # committed with the record, in one transaction
    first.close()

    second = StateStore(db_path)  # a crash before the data was in place
    assert [r.name for r in second.creating_volumes()] == ["new"]
    assert second.creating_volumes()[0].options == {"s3_bucket": "b"}
    second.finish_create("new")
    assert second.get_volume("new") is not None and second.creating_volumes() == []
    second.close()
    third = StateStore(db_path)
    assert [r.name for r in third.list_volumes()] == ["new"]
    third.close()


def test_an_aborted_create_puts_back_the_sync_record_it_found(store: StateStore) -> None:
    from plugin.state import SyncRecord

    pending = SyncRecord(volume="v", bucket="b", prefix="v", keep=3, pending=True,
                         snapshot="sync-1")
    store.put_sync(pending)
    store.add_volume(record("v"), creating=True,
                     sync=lambda _: SyncRecord(volume="v", bucket="b", prefix="v", keep=3,
                                               restoring="latest", pending=True,
                                               snapshot="sync-1"))
    store.abort_create("v", pending)
    assert store.get_sync("v") == pending
    assert store.creating_volumes() == [] and store.get_volume("v") is None
    # Without a record to put back, only the restore the create asked for is dropped.
    store.add_volume(record("w"), creating=True,
                     sync=lambda _: SyncRecord(volume="w", bucket="b", prefix="w", keep=3,
                                               restoring="latest"))
    store.abort_create("w")
    assert store.get_sync("w") is None


def test_a_database_of_an_older_pyvol_gains_the_creating_flag(db_path: Path) -> None:
    import sqlite3

    db_path.parent.mkdir(parents=True)
    old = sqlite3.connect(db_path)
    old.execute("CREATE TABLE volumes (name TEXT PRIMARY KEY, backend TEXT NOT NULL, "
                "options TEXT NOT NULL, created_at TEXT NOT NULL)")
    old.execute("INSERT INTO volumes VALUES ('legacy', 'local', '{\"mode\": \"0700\"}', "
                "'2024-05-01T12:00:00+00:00')")
    old.commit()
    old.close()
    store = StateStore(db_path)
    assert [(r.name, dict(r.options)) for r in store.list_volumes()] == \
        [("legacy", {"mode": "0700"})]
    store.close()


def test_a_sync_table_of_an_older_pyvol_gains_the_encrypt_flag(db_path: Path) -> None:
    import sqlite3

    from plugin.state import SyncRecord

    db_path.parent.mkdir(parents=True)
    old = sqlite3.connect(db_path)
    old.execute("CREATE TABLE sync (volume TEXT PRIMARY KEY, bucket TEXT NOT NULL, "
                "prefix TEXT NOT NULL, keep INTEGER NOT NULL, pending INTEGER NOT NULL "
                "DEFAULT 0, snapshot TEXT, restoring TEXT, last_ok_at TEXT, last_id TEXT, "
                "last_error TEXT, last_error_at TEXT)")
    old.execute("INSERT INTO sync (volume, bucket, prefix, keep, pending) "
                "VALUES ('v', 'b', 'v', 3, 1)")
    old.commit()
    old.close()
    store = StateStore(db_path)
    assert store.get_sync("v") == SyncRecord(volume="v", bucket="b", prefix="v", keep=3,
                                             pending=True)
    sealed = SyncRecord(volume="w", bucket="b", prefix="w", keep=3, encrypt=True)
    store.put_sync(sealed)
    store.close()
    again = StateStore(db_path)
    assert again.get_sync("w") == sealed
    again.close()


def test_the_last_check_is_kept_per_volume_and_location_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.put_check("db", ("b", "db"), {"ok": False, "problems": 2, "first_problems": ["x"]})
    store.put_check("db", ("b", "db"), {"ok": True, "problems": 0, "first_problems": []})
    store.close()
    store = StateStore(path)
    assert store.get_check("db", ("b", "db")) == {"ok": True, "problems": 0,
                                                  "first_problems": []}
    assert store.get_check("db", ("b", "other")) is None  # a check of another copy
    assert store.get_check("nobody", ("b", "db")) is None
    store.put_check("db", ("", ""), None)
    assert store.get_check("db", ("b", "db")) is None
    store.close()


def test_mount_references_commit_without_fsync_and_other_changes_stay_durable(
        store: StateStore, tmp_path: Path) -> None:
    """Mount references matter for one boot only (a reboot drops them), so their commits skip
    the fsync; they are still committed (another connection sees them, as a restarted plugin
    would after kill -9) and every other change is back to synchronous=FULL."""
    import sqlite3

    store.add_volume(VolumeRecord(name="v", backend="local", options={}))
    store.add_mount("v", "m1")
    other = sqlite3.connect(store.path)
    try:
        assert other.execute("SELECT count FROM mounts WHERE name = 'v'").fetchone() == (1,)
    finally:
        other.close()
    assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    store.drop_mount("v", "m1")
    assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)
