"""A volume used from two hosts (``-o s3_lease=true``), end to end through two Docker engines
that share one bucket: it follows its containers from host to host with its data, one host
at a time; a dead or cut-off host neither keeps it hostage nor overwrites newer data; and a
Swarm service keeps its data when its node is drained.

Every step goes through a host's docker CLI (or the ``pyvol`` CLI against its plugin), as a
user or Swarm on that host would.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from multihost_support import ALIAS, BUSYBOX, DockerError, Host, Hosts, Names

from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

TTL = "5s"
LEASED = ("-o", "s3_sync=on-unmount", "-o", "s3_lease=true", "-o", f"s3_lease_ttl={TTL}")
BIG = 8_000_000
WRITE = f"""set -e
cd /data
mkdir -p docs
head -c {BIG} /dev/urandom > big.bin
echo "$1" > tag
echo "note of $1" > docs/note.txt
ln -s docs/note.txt link
"""
SEE = """cd /data
find . -mindepth 1 | sort | xargs stat -c '%n %F %a %u:%g %s %Y %N'
find . -type f | sort | xargs sha256sum
"""
"""What a user sees of the volume: every entry's type, mode, owner, size, mtime and link
target, then every file's checksum."""


def _create(host: Host, volume: str) -> None:
    assert host.docker("volume", "create", "-d", ALIAS, *LEASED, volume).strip() == volume


def _sh(host: Host, volume: str, script: str, *args: str) -> str:
    """Run ``script`` in a busybox container with ``volume`` on /data; its stdout."""
    return host.docker("run", "--rm", "--network", "none", "-v", f"{volume}:/data", BUSYBOX,
                       "sh", "-c", script, "sh", *args)


def _start(host: Host, volume: str, script: str = "sleep 100000") -> str:
    """A detached container holding ``volume`` mounted on /data; its id."""
    return host.docker("run", "-d", "--network", "none", "-v", f"{volume}:/data", BUSYBOX,
                       "sh", "-c", script).strip()


def _mounted_and_pushed(host: Host, volume: str, tag: str) -> str:
    """A new leased volume on ``host``, held mounted by a detached container (its id) that
    wrote ``tag`` in /data/tag, and pushed by hand: the volume's last push."""
    _create(host, volume)
    cid = _start(host, volume)
    host.docker("exec", cid, "sh", "-c", f"echo {tag} > /data/tag")
    host.pyvol("sync", volume, "--wait")
    return cid


def _refused(host: Host, volume: str) -> str:
    """A container run with ``volume`` on ``host`` must fail; what docker said."""
    started = time.monotonic()
    try:
        out = _sh(host, volume, "true")
    except DockerError as exc:
        took = time.monotonic() - started
        # dockerd gives a plugin 30 s; a refusal must come well within that (a hung Mount
        # would surface as dockerd's timeout, not as the holder's name).
        assert took < 30, f"the refusal took {took:.1f} s"
        return str(exc)
    raise AssertionError(f"a container on host {host.name} mounted {volume}: {out!r}")


def _lease(host: Host, volume: str) -> dict[str, Any]:
    shown: dict[str, Any] = host.s3_status(volume)["lease"]
    return shown


def _pushed_and_free(host: Host, volume: str) -> dict[str, Any]:
    """Wait until ``host``'s push after an unmount is done and its lease given back."""
    status = host.wait_s3(volume, lambda s: s["state"] == "idle" and s.get("last_push")
                          is not None and s["lease"] == {"held": False},
                          "the push after the container exited and the lease's release", 90)
    assert "last_error" not in status, status
    return status


def _mounts_eventually(host: Host, volume: str, script: str, timeout: float = 60) -> str:
    """What Swarm does: retry a refused container until the volume is free (its stdout)."""
    seen: list[str] = []

    def attempt() -> str | None:
        try:
            return _sh(host, volume, script)
        except DockerError as exc:
            seen.append(str(exc))
            return None
    out: str = wait_for(attempt, timeout, f"{volume} to mount on host {host.name}", pause=1)
    return out


def test_move_a_to_b_and_back_pulls_only_what_changed(hosts: Hosts, names: Names) -> None:
    a, b = hosts["a"], hosts["b"]
    vol = names.volume("move")
    _create(a, vol)
    on_a = _sh(a, vol, WRITE + SEE, "written-on-a")
    first = _pushed_and_free(a, vol)["last_push"]["remote_snapshot"]

    # B never had the volume: created by name, its first container sees A's data.
    _create(b, vol)
    before = b.received()
    assert _sh(b, vol, SEE) == on_a
    full = b.received() - before
    assert full > BIG, f"host b restored {BIG} bytes of data but received only {full}"
    assert b.pyvol("sync", "ls", vol).splitlines()[0].split("\t")[0] == first

    on_b = _sh(b, vol, "echo changed-on-b > /data/tag\n" + SEE)
    assert on_b != on_a and "big.bin" in on_b
    _pushed_and_free(b, vol)

    # Back to A, which has all but the change: it downloads the change, not the volume.
    before = a.received()
    assert _sh(a, vol, SEE) == on_b
    moved = a.received() - before
    assert moved < full / 10, f"the move back received {moved} bytes; the full restore {full}"
    assert _sh(a, vol, "cat /data/tag") == "changed-on-b\n"


def test_a_volume_mounted_on_a_is_refused_on_b_naming_a_until_a_lets_go(
        hosts: Hosts, names: Names) -> None:
    a, b = hosts["a"], hosts["b"]
    vol = names.volume("excl")
    _create(a, vol)
    holder = _start(a, vol, "echo held-by-a > /data/tag; sleep 100000")
    wait_for(lambda: _lease(a, vol).get("state") == "mounted", 30, "a to hold the lease")
    shown = _lease(a, vol)
    assert shown["holder"]["name"] == "host-a" and shown["expires"], shown

    _create(b, vol)
    err = _refused(b, vol)
    assert "host-a" in err and "mounted" in err and "since" in err, err
    # inspect on B shows who has it; B does not.
    assert _lease(b, vol) == {"held": False}
    assert "mounted, held by host-a" in b.pyvol("lease", "show", vol)

    a.docker("rm", "-f", holder)
    assert _mounts_eventually(b, vol, "cat /data/tag") == "held-by-a\n"


def test_a_dead_hosts_volume_is_taken_over_after_the_ttl_with_its_last_push(
        hosts: Hosts, names: Names) -> None:
    a, b = hosts["a"], hosts["b"]
    vol = names.volume("dead")
    cid = _mounted_and_pushed(a, vol, "pushed")
    a.docker("exec", cid, "sh", "-c", "echo after-the-last-push > /data/tag")
    a.kill9()

    _create(b, vol)
    assert "host-a" in _refused(b, vol)
    # Nobody renews A's lease any more: once it expires, B takes over A's last push; the
    # write after it is lost (the README says so, and how to bound it).
    assert _mounts_eventually(b, vol, "cat /data/tag", timeout=45) == "pushed\n"

    # A comes back.  Its engine never unmounts what the dead container had mounted, but the
    # stale mount does not let A serve its copy, which B went on without: refused, saying
    # how.  After the reset, A pushes the write B never saw: kept aside as diverged, never
    # the latest; A's next Mount brings its copy to the volume's line.
    a.boot()
    err = _refused(a, vol)
    assert "taken over by another host" in err and f"pyvol mounts reset {vol}" in err, err
    a.pyvol("mounts", "reset", vol)
    diverged = a.wait_s3(vol, lambda s: bool(s.get("diverged")), "a's push to be kept aside",
                         90)["diverged"]
    assert len(diverged["snapshots"]) == 1, diverged
    assert _mounts_eventually(a, vol, "cat /data/tag") == "pushed\n"


def test_a_cut_off_hosts_later_push_is_kept_aside_and_never_latest(
        hosts: Hosts, names: Names) -> None:
    a, b = hosts["a"], hosts["b"]
    vol = names.volume("split")
    cid = _mounted_and_pushed(a, vol, "before-the-cut")
    _create(b, vol)

    hosts.cut(a, "drop")  # a partition A cannot see: its packets vanish
    try:
        a.docker("exec", cid, "sh", "-c", "echo a-while-cut-off > /data/tag")
        # B takes over after the time to live, from A's last push, and goes on from there.
        assert _mounts_eventually(b, vol, "cat /data/tag; echo b-after-the-takeover > "
                                  "/data/tag", timeout=45) == "before-the-cut\n"
        latest = _pushed_and_free(b, vol)["last_push"]["remote_snapshot"]
        # A learns it lost the lease at its next renewal... once it reaches S3 again.
    finally:
        hosts.heal(a)
    wait_for(lambda: _lease(a, vol).get("state") == "lost", 60,
             "a to notice that its lease is lost")
    a.docker("rm", "-f", cid)  # unmount: A pushes what it wrote while cut off

    diverged = a.wait_s3(vol, lambda s: bool(s.get("diverged")), "a's push to be kept aside",
                         90)["diverged"]
    assert len(diverged["snapshots"]) == 1, diverged
    kept = diverged["snapshots"][0]
    rows = [line.split("\t") for line in b.pyvol("sync", "ls", vol).splitlines()]
    assert [r[0] for r in rows if r[-1] == "diverged"] == [kept]
    current = [r[0] for r in rows if r[-1] != "diverged"]
    assert current[-1] == latest, rows

    # The volume's line is B's: the next Mount anywhere, A included, sees B's data.
    assert _mounts_eventually(a, vol, "cat /data/tag") == "b-after-the-takeover\n"
    # A's kept-aside data is restorable by id, as an independent copy.
    copy = names.volume("kept")
    b.docker("volume", "create", "-d", ALIAS, "-o", f"s3_copy_of={vol}@{kept}", copy)
    assert _sh(b, copy, "cat /data/tag") == "a-while-cut-off\n"


def _container_of(host: Host, service: str) -> str | None:
    ids = host.docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}")
    return ids.split()[0] if ids.split() else None


def test_a_swarm_service_keeps_its_data_when_its_node_is_drained(
        hosts: Hosts, names: Names) -> None:
    a, b = hosts["a"], hosts["b"]
    vol = names.volume("swarm")
    service = f"{vol}-svc"
    mount = ",".join([f"type=volume,source={vol},target=/data,volume-driver={ALIAS}",
                      "volume-opt=s3_sync=on-unmount", "volume-opt=s3_lease=true",
                      f"volume-opt=s3_lease_ttl={TTL}"])
    script = ("set -e; [ -f /data/first ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' ' "
              "> /data/first; echo started >> /data/runs; exec sleep 100000")
    with hosts.swarm("a") as manager:
        ids = {h.name: h.docker("info", "--format", "{{.Swarm.NodeID}}").strip() for h in hosts}
        # Start on A: B is drained while the service is created, then made active again.
        manager.docker("node", "update", "--availability", "drain", ids["b"])
        manager.docker("service", "create", "--detach", "--no-resolve-image", "--name", service,
                       "--replicas", "1", "--restart-delay", "2s", "--mount", mount,
                       BUSYBOX, "sh", "-c", script, timeout=120)
        on_a = wait_for(lambda: _container_of(a, service), 60, "the task to run on a")
        wait_for(lambda: a.docker("exec", on_a, "cat", "/data/runs") == "started\n", 30,
                 "the task on a to write")
        first = a.docker("exec", on_a, "cat", "/data/first")
        manager.docker("node", "update", "--availability", "active", ids["b"])

        manager.docker("node", "update", "--availability", "drain", ids["a"])
        on_b = wait_for(lambda: _container_of(b, service), 120,
                        "Swarm to run the task on b (after a's push frees the lease)")
        runs = wait_for(lambda: b.docker("exec", on_b, "cat", "/data/runs") or None, 30,
                        "the task on b to start")
        assert b.docker("exec", on_b, "cat", "/data/first") == first
        assert runs == "started\nstarted\n"
        assert _container_of(a, service) is None
        assert _lease(b, vol)["holder"]["name"] == "host-b"
        manager.docker("service", "rm", service)
        wait_for(lambda: _container_of(b, service) is None, 60, "the service's task to go")
