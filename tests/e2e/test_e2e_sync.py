"""S3 sync through dockerd: the plugin installed from the registry, configured with
`docker plugin set`, pushing to a real S3 API (moto on 127.0.0.1, reached over the plugin's
host network) and restoring from it, driven by the docker and pyvol CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from e2e_support import (
    ALIAS,
    BUSYBOX,
    DRIVER,
    POLL,
    Installed,
    Scenario,
    docker,
    dockerd_pid,
    fails,
    inspect_volume,
    ok,
    plugin_field,
    pyvol,
    pyvol_command,
)

from tests.support.trees import files_containing, picture
from tests.support.waiting import wait_for

# The moto server of the functional tier.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "functional"))

if TYPE_CHECKING:
    from s3_fixtures import MotoServer

pytest_plugins = ["s3_fixtures"]

pytestmark = pytest.mark.e2e

WRITE_TREE = """set -e
cd /data
mkdir docs
head -c 3000000 /dev/urandom > random.bin
echo "$1" > tag
echo "note of $1" > docs/note.txt
ln -s docs/note.txt relative-link
ln -s /etc/passwd absolute-link
ln tag tag-hardlink
chmod 0640 docs/note.txt
chmod 0750 docs
chown 1234:5678 random.bin
touch -d '2020-01-02 03:04:05' docs/note.txt random.bin
"""
CHECKSUMS = "cd /data && find . -type f | sort | xargs sha256sum"
PASSPHRASE = "e2e passphrase 5d1c, never shown"


@dataclass(frozen=True)
class S3Setup:
    bucket: str
    secret: str
    passphrase: str
    moto: MotoServer
    dockerd_log: Path
    log_offset: int


def _configure(env: dict[str, str]) -> None:
    """`docker plugin set` needs the plugin disabled; -f because volumes of it exist."""
    ok(docker("plugin", "disable", "-f", ALIAS, timeout=120))
    try:
        ok(docker("plugin", "set", ALIAS, *(f"{k}={v}" for k, v in env.items())))
    finally:
        ok(docker("plugin", "enable", ALIAS, timeout=120))


@pytest.fixture(scope="module")
def s3(pyvol_plugin: Installed, moto: MotoServer) -> Iterator[S3Setup]:
    """The plugin's S3 settings pointed at moto (default bucket included); put back after."""
    from s3_fixtures import ACCESS_KEY, SECRET_KEY

    bucket = f"pyvol-e2e-{pyvol_plugin.token}"
    moto.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    before = dict(item.split("=", 1)
                  for item in json.loads(plugin_field("{{json .Settings.Env}}")))
    wanted = {"S3_ENDPOINT_URL": moto.url, "AWS_REGION": "us-east-1",
              "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
              "S3_BUCKET": bucket, "S3_PASSPHRASE": PASSPHRASE}
    log = Path(os.readlink(f"/proc/{dockerd_pid()}/fd/2"))
    offset = log.stat().st_size if log.is_file() else 0
    _configure(wanted)
    try:
        yield S3Setup(bucket, SECRET_KEY, PASSPHRASE, moto, log, offset)
    finally:
        pyvol_plugin.ensure_enabled()
        _configure({key: before.get(key, "") for key in wanted})


def _s3(vol: str) -> dict[str, Any]:
    status: dict[str, Any] = inspect_volume(vol)["Status"]
    assert "s3" in status, status
    s3: dict[str, Any] = status["s3"]
    return s3


def _wait_idle(vol: str, previous: str | None = None) -> dict[str, Any]:
    holder: dict[str, Any] = {}

    def check() -> bool:
        s3 = _s3(vol)
        assert s3["state"] in ("restoring", "pending", "syncing", "idle"), s3
        last = s3.get("last_push") or {}
        if s3["state"] == "idle" and (previous == "" or last.get("at") not in (None, previous)):
            holder.update(s3)
            return True
        return False
    wait_for(check, 30, f"the S3 sync of {vol} to settle", pause=0.1)
    return holder


def _remote_ids(vol: str) -> list[str]:
    return [row.split("\t")[0] for row in ok(pyvol("sync", "ls", vol)).splitlines()]


def test_push_on_unmount_then_remove_and_create_again_restores_the_data(
        scenario: Scenario, s3: S3Setup) -> None:
    # -o s3_sync alone: the bucket is the plugin's S3_BUCKET setting.
    vol = scenario.create("sync", "-o", "s3_sync=on-unmount")
    status = _wait_idle(vol, previous="")
    # S3_PASSPHRASE is set, so the volume encrypts without being told to.
    assert status == {"state": "idle", "bucket": s3.bucket, "prefix": vol,
                      "mode": "on-unmount", "keep": 30, "encrypted": True, "last_push": None}

    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", WRITE_TREE, "sh", "first"))
    status = _wait_idle(vol)
    assert "last_error" not in status
    pushed = status["last_push"]["remote_snapshot"]
    rows = [row.split("\t") for row in ok(pyvol("sync", "ls", vol)).splitlines()]
    assert [row[0] for row in rows] == [pushed]
    assert int(rows[0][2]) >= 3_000_000 and int(rows[0][3]) == 3  # size, files
    data = scenario.plugin.volume_dir(vol)
    expected = picture(data)
    sums = ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", CHECKSUMS))

    assert ok(docker("volume", "rm", vol)).strip() == vol
    assert not data.exists()
    # The remote copy stayed: the same name on a fresh volume gets the data back.
    assert ok(docker("volume", "create", "-d", ALIAS, "-o", "s3_sync=on-unmount", vol)).strip() \
        == vol
    assert ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", CHECKSUMS)) == sums
    assert picture(data) == expected
    assert _s3(vol)["state"] in ("idle", "pending", "syncing")


def test_restore_an_older_remote_snapshot_in_place(scenario: Scenario, s3: S3Setup) -> None:
    vol = scenario.create("older", "-o", f"s3_bucket={s3.bucket}", "-o", "s3_keep=5",
                          "-o", "s3_encrypt=false")
    assert _s3(vol)["encrypted"] is False
    last = _wait_idle(vol, previous="")["last_push"]
    ids = []
    for tag in ("one", "two"):
        ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", f"echo {tag} > /data/tag"))
        last = _wait_idle(vol, (last or {}).get("at"))["last_push"]
        ids.append(last["remote_snapshot"])
    assert _remote_ids(vol) == ids

    user = scenario.start("-v", f"{vol}:/data")
    refused = pyvol("sync", "restore", vol, ids[0])
    assert refused.returncode != 0
    assert f"volume '{vol}' is in use by 1 mount(s)" in refused.stderr
    ok(docker("rm", "-f", user))

    out = ok(pyvol("sync", "restore", vol, ids[0]))
    assert out.startswith(f"restored {vol} from remote snapshot {ids[0]}; previous content kept "
                          f"as {vol}@pre-restore-")
    assert ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "cat", "/data/tag")) == "one\n"
    safety = out.rsplit("@", 1)[1].strip()
    assert safety in ok(pyvol("snapshot", "ls", vol)).split()


def test_errors_reach_the_user_and_secrets_stay_hidden(scenario: Scenario, s3: S3Setup) -> None:
    missing = f"{s3.bucket}-missing"
    vol = scenario.create("nobucket", "-o", f"s3_bucket={missing}")
    wait_for(lambda: _s3(vol)["state"] == "error", 30,
             "the restore from a missing bucket to fail", pause=POLL)
    status = _s3(vol)
    assert f"bucket '{missing}' does not exist" in status["last_error"]["message"]
    assert status["last_error"]["at"]
    stderr = fails(scenario.run("-v", f"{vol}:/data", BUSYBOX, "true"))
    assert "has not completed" in stderr and f"pyvol sync restore {vol} latest" in stderr, stderr

    name = scenario.name("cred")
    stderr = fails(docker("volume", "create", "-d", ALIAS, "-o", f"s3_bucket={s3.bucket}",
                          "-o", "aws_secret_access_key=whatever-1234", name))
    assert "credentials are never volume options" in stderr
    assert "docker plugin set pyvol AWS_ACCESS_KEY_ID=" in stderr

    # A push, so the log has S3 lines to look through.
    synced = scenario.create("hidden", "-o", "s3_sync=on-unmount")
    ok(scenario.run("-v", f"{synced}:/data", BUSYBOX, "sh", "-c", "echo x > /data/f"))
    _wait_idle(synced)

    names = ok(docker("volume", "ls", "-q", "--filter", f"driver={DRIVER}")).split()
    assert vol in names and synced in names
    shown = ok(docker("volume", "inspect", *names))
    assert s3.secret not in shown and s3.passphrase not in shown
    plugin_id = plugin_field("{{.Id}}")
    with s3.dockerd_log.open("rb") as f:
        f.seek(s3.log_offset)
        lines = [line for line in f.read().decode(errors="replace").splitlines()
                 if f"plugin={plugin_id}" in line]
    assert any("pushed remote snapshot" in line for line in lines), \
        "no plugin log lines found: the check would prove nothing"
    assert not [line for line in lines if s3.secret in line or s3.passphrase in line]
    assert files_containing(scenario.plugin.data, s3.secret.encode()) == []
    assert files_containing(scenario.plugin.data, s3.passphrase.encode()) == []


def test_an_encrypted_volume_is_synced_removed_and_restored_by_name(
        scenario: Scenario, s3: S3Setup) -> None:
    vol = scenario.create("sealed", "-o", "s3_sync=on-unmount", "-o", "s3_encrypt=true")
    assert _wait_idle(vol, previous="")["encrypted"] is True
    client: Any = s3.moto.client()
    made = client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{vol}/").get("Contents", [])
    tops = {o["Key"].split("/")[1] for o in made}
    assert "keys" in tops and tops <= {"keys", "config"}, \
        f"the create makes the prefix's key, and no data, before any push: {made}"
    marker = f"plain text that must not reach the bucket {scenario.plugin.token}"
    ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c",
                    WRITE_TREE + f'echo "{marker}" > /data/docs/secret.txt', "sh", "first"))
    pushed = _wait_idle(vol)
    assert "last_error" not in pushed
    sums = ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", CHECKSUMS))

    listed = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{vol}/")
              .get("Contents", [])]
    assert any(key.startswith(f"{vol}/keys/") for key in listed), listed
    assert any(key.startswith(f"{vol}/data/") for key in listed), listed
    for key in listed:
        try:
            body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            continue  # a lock marker removed since the listing
        assert marker.encode() not in body and b"note.txt" not in body, key
        assert s3.passphrase.encode() not in body, key
    checked = ok(pyvol("sync", "check", vol, "--read-data"))
    assert "structure and data ok" in checked

    # A second passphrase, from stdin; the plugin's own key cannot be removed, the new one can.
    [current] = ok(pyvol("sync", "key", "ls", vol)).splitlines()
    current_id, _, mark = current.split("\t")
    assert mark == "opened by S3_PASSPHRASE"
    added = ok(subprocess.run([*pyvol_command(), "sync", "key", "add", vol],
                              input="second one\n", capture_output=True, text=True, timeout=60,
                              check=False))
    new_id = added.split()[2]
    rows = ok(pyvol("sync", "key", "ls", vol)).splitlines()
    assert sorted(row.split("\t")[0] for row in rows) == sorted([current_id, new_id])
    refused = fails(pyvol("sync", "key", "rm", vol, current_id))
    assert "S3_PASSPHRASE" in refused and "docker plugin set" in refused, refused
    assert ok(pyvol("sync", "key", "rm", vol, new_id)).strip() == \
        f"removed key {new_id} from {vol}"
    assert "second one" not in ok(docker("volume", "inspect", vol))

    ok(docker("volume", "rm", vol))
    assert ok(docker("volume", "create", "-d", ALIAS, "-o", "s3_sync=on-unmount", vol)).strip() \
        == vol
    assert ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "sh", "-c", CHECKSUMS)) == sums
    assert ok(scenario.run("-v", f"{vol}:/data", BUSYBOX, "cat", "/data/docs/secret.txt")) \
        == marker + "\n"
    assert _s3(vol)["encrypted"] is True

    # Asked to read it unencrypted, the same name is refused and the volume stays empty.
    ok(docker("volume", "rm", vol))
    ok(docker("volume", "create", "-d", ALIAS, "-o", "s3_encrypt=false", vol))
    wait_for(lambda: _s3(vol)["state"] == "error", 30, "the plain restore to be refused",
             pause=POLL)
    assert "S3_PASSPHRASE" in _s3(vol)["last_error"]["message"]
    stderr = fails(scenario.run("-v", f"{vol}:/data", BUSYBOX, "true"))
    assert "has not completed" in stderr, stderr
    assert list(scenario.plugin.volume_dir(vol).iterdir()) == []
