"""`pyvol sync key ...` through the real server and a real S3 API (moto): a passphrase is
rotated while a push runs, another host restores with the new one, and the old one is refused
by name; the CLI shows ids and times, never a passphrase."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sync_support import (
    create,
    mount,
    s3_settings,
    s3_status,
    unmount,
    wait_pushed,
    write_tree,
)

from tests.support.trees import files_containing, picture
from tests.support.waiting import wait_for

if TYPE_CHECKING:
    from s3_fixtures import MakeStore, MotoServer
    from sync_support import StartSync

pytest_plugins = ["s3_fixtures"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown of test trees needs root")

M1 = "a" * 64
OLD = "old plugin passphrase 2f9c do not show"
NEW = "new plugin passphrase 7d41 do not show"
KEY_LINE = re.compile(r"^([0-9a-f]{32})\t(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)(\topened by "
                      r"S3_PASSPHRASE)?$")


def key_lines(stdout: str) -> list[tuple[str, bool]]:
    """``pyvol sync key ls`` output as (id, opened by S3_PASSPHRASE); every line must parse."""
    found = []
    for line in stdout.splitlines():
        match = KEY_LINE.match(line)
        assert match, f"unexpected line {line!r}"
        found.append((match[1], bool(match[3])))
    return found


def test_a_passphrase_rotates_while_a_push_runs(
        start: StartSync, moto: MotoServer, bucket: str, tmp_path: Path,
        make_store: MakeStore) -> None:
    release = tmp_path / "release-upload"
    env = s3_settings(moto.url, S3_BUCKET=bucket, S3_PASSPHRASE=OLD, LOG_LEVEL="DEBUG")
    first = start(tmp_path / "host-a", {**env, "PYVOL_TEST_HOLD_AT": f"s3:upload={release}"})
    create(first, "vault", s3_encrypt="true")
    wait_for(lambda: s3_status(first.client, "vault")["state"] == "idle", 10,
             "the restore check at create")
    expected = write_tree(first.client, "vault", M1, "v1", big=1_000_000)
    wait_for(Path(f"{release}.held").exists, 30, "the push to be held mid-upload")

    # While it is held: a new passphrase through the CLI, the old one removed by a host
    # that already uses the new one (here, the store itself with NEW).
    added = first.cli("sync", "key", "add", "vault", stdin=NEW + "\n")
    assert added.returncode == 0, added.stderr
    new_id = re.fullmatch(r"added key ([0-9a-f]{32}) to vault\n", added.stdout)
    assert new_id, added.stdout
    listed = first.cli("sync", "key", "ls", "vault")
    assert listed.returncode == 0, listed.stderr
    keys = key_lines(listed.stdout)
    old_id = next(k for k, current in keys if current)
    assert sorted(k for k, _ in keys) == sorted([old_id, new_id[1]])
    refused = first.cli("sync", "key", "rm", "vault", old_id)
    assert refused.returncode == 1
    assert f"key {old_id} of volume 'vault' is the one the plugin's S3_PASSPHRASE opens" \
        in refused.stderr
    assert "docker plugin disable -f pyvol && docker plugin set pyvol S3_PASSPHRASE=NEW" \
        in refused.stderr
    rotated = make_store(moto.url, bucket, tmp_path / "rotator", prefix="vault", passphrase=NEW)
    rotated.remove_key(old_id)
    after = first.cli("sync", "key", "ls", "vault")
    assert key_lines(after.stdout) == [(new_id[1], False)]
    assert after.stderr == ("warning: the plugin's S3_PASSPHRASE opens none of vault's keys: "
                            "set it to one of their passphrases (docker plugin set) before the "
                            "plugin restarts\n")

    release.touch()
    assert "last_error" not in wait_pushed(first.client, "vault")

    # A second host with the new passphrase restores the volume by name.
    second = start(tmp_path / "host-b", {**env, "S3_PASSPHRASE": NEW})
    create(second, "vault", s3_encrypt="true")
    assert picture(mount(second.client, "vault", M1)) == expected

    # One with the old passphrase is refused, and says which volume and what to set.
    third = start(tmp_path / "host-c", env)
    create(third, "copy", s3_encrypt="true", s3_prefix="vault")
    err = third.client.fails("VolumeDriver.Mount", {"Name": "copy", "ID": M1})
    assert "volume 'copy'" in err and "opens none of its 1 keys" in err
    assert "set S3_PASSPHRASE" in err

    unmount(second.client, "vault", M1)
    for server in (first, second, third):
        server.stop()
        text = server.log_text()
        assert OLD not in text and NEW not in text
    for root in ("host-a", "host-b", "host-c"):
        assert files_containing(tmp_path / root, OLD.encode()) == []
        assert files_containing(tmp_path / root, NEW.encode()) == []


def test_key_commands_through_the_cli(start: StartSync, moto: MotoServer, bucket: str,
                                      tmp_path: Path) -> None:
    env = s3_settings(moto.url, S3_BUCKET=bucket, S3_PASSPHRASE=OLD)
    server = start(tmp_path / "root", env)
    create(server, "plain", s3_bucket=bucket, s3_encrypt="false")
    plain = server.cli("sync", "key", "ls", "plain")
    assert plain.returncode == 1
    assert plain.stderr == ("pyvol: volume 'plain' is not encrypted (it was created "
                            "with s3_encrypt=false): its S3 copy has no passphrases to manage\n")

    create(server, "vault", s3_encrypt="true")
    early = server.cli("sync", "key", "add", "vault", stdin=NEW + "\n")
    assert early.returncode == 1 and "push first" in early.stderr
    data = mount(server.client, "vault", M1)
    (data / "file").write_text("content")
    unmount(server.client, "vault", M1)
    wait_pushed(server.client, "vault")

    empty = server.cli("sync", "key", "add", "vault", stdin="\n")
    assert (empty.returncode, empty.stderr) == (
        1, "pyvol: the new passphrase is empty; nothing was changed\n")
    added = server.cli("sync", "key", "add", "vault", stdin=NEW + "\n")
    assert added.returncode == 0, added.stderr
    keys = key_lines(server.cli("sync", "key", "ls", "vault").stdout)
    assert len(keys) == 2 and sum(current for _, current in keys) == 1
    current = next(k for k, c in keys if c)
    other = next(k for k, c in keys if not c)
    assert added.stdout == f"added key {other} to vault\n"

    removed = server.cli("sync", "key", "rm", "vault", other)
    assert (removed.returncode, removed.stdout) == (0, f"removed key {other} from vault\n")
    last = server.cli("sync", "key", "rm", "vault", current)
    assert last.returncode == 1 and "S3_PASSPHRASE opens" in last.stderr
    unknown = server.cli("sync", "key", "rm", "vault", "0" * 32)
    assert unknown.returncode == 1 and f"no key {'0' * 32}; keys: {current}" in unknown.stderr
    assert key_lines(server.cli("sync", "key", "ls", "vault").stdout) == [(current, True)]
    server.stop()
    assert NEW not in server.log_text()
