"""``-o s3_encrypt=true`` through the real server and a real S3 API (moto): the volume's S3
copy is sealed under ``S3_PASSPHRASE``, another host with the passphrase restores it, and the
passphrase reaches neither the bucket, nor Get/List, nor the log, nor the state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sync_support import (
    create,
    mount,
    s3_settings,
    s3_status,
    wait_pushed,
    write_tree,
)

from tests.support.trees import files_containing, picture
from tests.support.waiting import wait_for

if TYPE_CHECKING:
    from s3_fixtures import MotoServer
    from sync_support import StartSync

pytest_plugins = ["s3_fixtures"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown of test trees needs root")

M1 = "a" * 64
PASSPHRASE = "plugin passphrase 93e1 do not show"


def test_s3_encrypt_needs_s3_passphrase_at_create(start: StartSync, moto: MotoServer,
                                                  bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", s3_settings(moto.url, S3_BUCKET=bucket))
    err = server.client.fails("VolumeDriver.Create", {
        "Name": "v", "Opts": {"s3_encrypt": "true"}})
    assert "S3_PASSPHRASE" in err and "docker plugin set pyvol" in err
    assert "not found" in server.client.fails("VolumeDriver.Get", {"Name": "v"})


def test_an_encrypted_volume_round_trips_and_keeps_its_passphrase_to_itself(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    env = s3_settings(moto.url, S3_BUCKET=bucket, S3_PASSPHRASE=PASSPHRASE, LOG_LEVEL="DEBUG")
    first = start(tmp_path / "host-a", env)
    create(first, "vault", s3_encrypt="true")
    wait_for(lambda: s3_status(first.client, "vault")["state"] == "idle", 10,
             "the restore check at create")
    expected = write_tree(first.client, "vault", M1, "v1", big=1_000_000)
    assert "last_error" not in wait_pushed(first.client, "vault")

    client: Any = moto.client()
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert any(o["Key"].startswith("vault/keys/") for o in listed)
    for o in listed:
        try:
            body = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        except client.exceptions.NoSuchKey:
            continue  # a lock marker removed since the listing
        assert PASSPHRASE.encode() not in body and PASSPHRASE not in o["Key"]

    # Another host: with the passphrase it restores; a plain volume there is refused.
    second = start(tmp_path / "host-b", env)
    create(second, "vault", s3_encrypt="true")
    assert picture(mount(second.client, "vault", M1)) == expected
    third = start(tmp_path / "host-c", s3_settings(moto.url, S3_BUCKET=bucket))
    create(third, "vault", s3_prefix="vault")
    status = wait_for(lambda: (s := s3_status(third.client, "vault"))["state"] == "error" and s,
                      15, "the restore into a plain volume to be refused")
    assert "S3_PASSPHRASE" in str(status)

    shown = [first.client.send("VolumeDriver.Get", {"Name": "vault"}).raw.decode(),
             first.client.send("VolumeDriver.List", {}).raw.decode()]
    first.stop()
    assert all(PASSPHRASE not in text for text in shown)
    assert PASSPHRASE not in first.log_text()
    assert files_containing(tmp_path / "host-a", PASSPHRASE.encode()) == []


def test_with_a_passphrase_set_synced_volumes_encrypt_unless_told_not_to(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    plain_host = start(tmp_path / "old", s3_settings(moto.url, S3_BUCKET=bucket))
    create(plain_host, "old", s3_prefix="old")
    write_tree(plain_host.client, "old", M1, "old")
    assert "last_error" not in wait_pushed(plain_host.client, "old")
    plain_host.stop()

    server = start(tmp_path / "root", s3_settings(moto.url, S3_BUCKET=bucket,
                                                  S3_PASSPHRASE=PASSPHRASE))
    create(server, "secret", s3_keep="3")
    create(server, "clear", s3_encrypt="false")
    assert s3_status(server.client, "secret")["encrypted"] is True
    assert s3_status(server.client, "clear")["encrypted"] is False
    for name in ("secret", "clear"):
        write_tree(server.client, name, M1, name)
        assert "last_error" not in wait_pushed(server.client, name)
    keys = {o["Key"].split("/")[0] for o in moto.client().list_objects_v2(
        Bucket=bucket).get("Contents", []) if "/keys/" in o["Key"]}
    assert keys == {"secret"}

    # A plain prefix from before is never read as encrypted, nor a new volume made plain
    # by it: restoring it by name needs the user to say s3_encrypt=false.
    create(server, "old", s3_prefix="old")
    status = wait_for(lambda: (s := s3_status(server.client, "old"))["state"] == "error" and s,
                      15, "the restore of a plain prefix into an encrypted volume to fail")
    assert "unencrypted" in status["last_error"]["message"]
    assert "s3_encrypt=false" in status["last_error"]["message"]
    server.client.ok("VolumeDriver.Remove", {"Name": "old"})
    create(server, "old", s3_prefix="old", s3_encrypt="false")
    wait_for(lambda: s3_status(server.client, "old")["state"] == "idle", 15, "the restore")
    assert (mount(server.client, "old", M1) / "docs").is_dir()


def test_creating_an_encrypted_volume_on_an_empty_prefix_makes_its_key_before_any_push(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    server = start(tmp_path / "root", s3_settings(moto.url, S3_BUCKET=bucket,
                                                  S3_PASSPHRASE=PASSPHRASE))
    create(server, "fresh", s3_prefix="fresh")
    wait_for(lambda: s3_status(server.client, "fresh")["state"] == "idle", 15,
             "the restore check at create")
    listed = [o["Key"] for o in moto.client().list_objects_v2(
        Bucket=bucket).get("Contents", [])]
    assert any(k.startswith("fresh/keys/") for k in listed), listed
    assert not any(k.startswith("fresh/snapshots/") for k in listed)  # nothing pushed yet

    # From then on the prefix is encrypted: a plain volume on it is refused at once.
    plain = start(tmp_path / "plain", s3_settings(moto.url, S3_BUCKET=bucket))
    create(plain, "fresh", s3_prefix="fresh")
    status = wait_for(lambda: (s := s3_status(plain.client, "fresh"))["state"] == "error" and s,
                      15, "a plain volume on the encrypted prefix to be refused")
    assert "S3_PASSPHRASE" in str(status)

    # The key made at create is the one pushes and another host use.
    expected = write_tree(server.client, "fresh", M1, "fresh")
    assert "last_error" not in wait_pushed(server.client, "fresh")
    assert len([k for k in (o["Key"] for o in moto.client().list_objects_v2(
        Bucket=bucket).get("Contents", [])) if k.startswith("fresh/keys/")]) == 1
    other = start(tmp_path / "other", s3_settings(moto.url, S3_BUCKET=bucket,
                                                  S3_PASSPHRASE=PASSPHRASE))
    create(other, "fresh", s3_prefix="fresh")
    assert picture(mount(other.client, "fresh", M1)) == expected
