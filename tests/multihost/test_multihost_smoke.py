"""Two hosts, one bucket: what pyvol already does across engines, and proof that the harness's
hosts, partitions and power cuts are what they claim to be.

Every step goes through a host's docker CLI, as a user on that host would type it.
"""

from __future__ import annotations

from typing import Any

import pytest
from multihost_support import ALIAS, BUSYBOX, CutMode, Host, Hosts, Names

from tests.support.trees import picture

pytestmark = pytest.mark.e2e

WRITE = """set -e
cd /data
mkdir docs
head -c 3000000 /dev/urandom > random.bin
echo "$1" > tag
echo "note of $1" > docs/note.txt
ln -s docs/note.txt relative-link
ln tag tag-hardlink
chmod 0640 docs/note.txt
chmod 0750 docs
chown 1234:5678 random.bin
touch -d '2020-01-02 03:04:05' docs/note.txt random.bin
"""
SEE = """cd /data
find . -mindepth 1 | sort | xargs stat -c '%n %F %a %u:%g %s %Y %h %N'
find . -type f | sort | xargs sha256sum
"""
"""What a user sees of a volume: every entry's type, mode, owner, size, mtime, link count and
link target, then every file's checksum."""


def _create(host: Host, volume: str, *options: str) -> None:
    assert host.docker("volume", "create", "-d", ALIAS, *options, volume).strip() == volume


def _sh(host: Host, volume: str, script: str, *args: str) -> str:
    """Run ``script`` in a busybox container with ``volume`` on /data; its stdout."""
    return host.docker("run", "--rm", "--network", "none", "-v", f"{volume}:/data", BUSYBOX,
                       "sh", "-c", script, "sh", *args)


def _idle(s3: dict[str, Any]) -> bool:
    return bool(s3["state"] == "idle")


def _pushed(s3: dict[str, Any]) -> bool:
    return s3["state"] == "idle" and s3.get("last_push") is not None


def _write_and_push(host: Host, volume: str, tag: str) -> tuple[str, dict[str, Any]]:
    """A new synced volume on ``host``, filled by one container; returns what that container
    saw of it and the Status.s3 after the push that its exit started."""
    _create(host, volume, "-o", "s3_sync=on-unmount")
    assert host.wait_s3(volume, _idle, "the new volume to settle")["last_push"] is None
    seen = _sh(host, volume, WRITE + SEE, tag)
    pushed = host.wait_s3(volume, _pushed, "the push after the container exited")
    assert "last_error" not in pushed, pushed
    return seen, pushed


def test_each_host_is_an_engine_of_its_own(hosts: Hosts, names: Names) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.docker("info", "--format", "{{.DockerRootDir}}").strip() == str(a.data_root)
    assert b.docker("info", "--format", "{{.DockerRootDir}}").strip() == str(b.data_root)
    ids = {h.docker("plugin", "inspect", "--format", "{{.Id}}", ALIAS).strip() for h in hosts}
    assert len(ids) == 2, ids
    vol = names.volume("local")
    _create(a, vol)
    assert vol in a.docker("volume", "ls", "-q").split()
    assert vol not in b.docker("volume", "ls", "-q").split()
    assert a.volume_dir(vol).is_dir() and not b.volume_dir(vol).exists()


@pytest.mark.parametrize("how", ["reject", "down", "drop"])
def test_cut_takes_one_host_off_the_network_and_heal_brings_it_back(
        hosts: Hosts, names: Names, how: CutMode) -> None:
    a, b = hosts["a"], hosts["b"]
    s3 = (hosts.s3.ip, hosts.s3.port)
    assert a.reaches(*s3) and b.reaches(*s3)
    hosts.cut(a, how)
    try:
        assert not a.reaches(*s3)
        assert b.reaches(*s3)
    finally:
        hosts.heal(a)
    assert a.reaches(*s3) and b.reaches(*s3)


def test_a_volume_written_on_a_is_restored_by_name_on_b(hosts: Hosts, names: Names) -> None:
    a, b = hosts["a"], hosts["b"]
    vol = names.volume("follow")
    seen_on_a, pushed = _write_and_push(a, vol, "written-on-a")
    snapshot = pushed["last_push"]["remote_snapshot"]
    assert any(key.startswith(f"{vol}/") for key in hosts.s3.objects()), "nothing in the bucket"

    assert vol not in b.docker("volume", "ls", "-q").split()
    _create(b, vol, "-o", "s3_sync=on-unmount")
    assert _sh(b, vol, SEE) == seen_on_a
    assert _sh(b, vol, "cat /data/tag") == "written-on-a\n"
    assert picture(b.volume_dir(vol)) == picture(a.volume_dir(vol))
    # B restored A's push: the first remote snapshot B's plugin lists is the one A made.
    assert b.pyvol("sync", "ls", vol).splitlines()[0].split("\t")[0] == snapshot


def test_the_data_outlives_a_host_killed_after_its_push(hosts: Hosts, names: Names) -> None:
    a, b = hosts["a"], hosts["b"]
    vol = names.volume("dead")
    seen_on_a, _ = _write_and_push(a, vol, "before-the-power-cut")

    killed = a.kill9()
    assert a.pid() is None and a.processes() == []
    assert len(killed) >= 4, killed  # dockerd, containerd, a shim, the plugin at least
    assert a.try_docker("version", timeout=10).returncode != 0

    _create(b, vol, "-o", "s3_sync=on-unmount")
    assert _sh(b, vol, SEE) == seen_on_a

    a.boot()
    assert vol in a.docker("volume", "ls", "-q").split()
    assert _sh(a, vol, "cat /data/tag") == "before-the-power-cut\n"


def test_a_push_from_a_cut_host_fails_and_succeeds_after_heal(
        hosts: Hosts, names: Names) -> None:
    a, b = hosts["a"], hosts["b"]
    vol = names.volume("cut")
    _create(a, vol, "-o", "s3_sync=on-unmount")
    a.wait_s3(vol, _idle, "the new volume to settle")

    hosts.cut(a)
    try:
        seen_on_a = _sh(a, vol, WRITE + SEE, "written-while-cut")
        failed = a.wait_s3(vol, lambda s: s["state"] == "error", "the push to fail", 90)
        assert "cannot reach the S3 endpoint" in failed["last_error"]["message"], failed
        assert failed["last_push"] is None
        assert hosts.s3.objects(f"{vol}/snapshots/") == []
        # Only A is cut: B pushes meanwhile.
        other = names.volume("uncut")
        _write_and_push(b, other, "b-while-a-is-cut")
    finally:
        hosts.heal(a)

    healed = a.wait_s3(vol, _pushed, "the retried push after heal", 120)
    assert "last_error" not in healed, healed
    assert hosts.s3.objects(f"{vol}/snapshots/") != []
    _create(b, vol, "-o", "s3_sync=on-unmount")
    assert _sh(b, vol, SEE) == seen_on_a


def test_the_hosts_form_a_two_node_swarm(hosts: Hosts, names: Names) -> None:
    a, b = hosts["a"], hosts["b"]
    with hosts.swarm("a") as manager:
        assert manager is a
        ids = manager.docker("node", "ls", "-q").split()
        nodes = {manager.docker("node", "inspect", "--format",
                                "{{.Status.Addr}} {{.Status.State}} {{.Spec.Role}}", node).strip()
                 for node in ids}
        assert nodes == {f"{a.ip} ready manager", f"{b.ip} ready worker"}
        assert b.docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip() == "active"
    for host in hosts:
        assert host.docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip() == "inactive"
