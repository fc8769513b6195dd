"""The ``pyvol`` command.

``pyvol serve`` runs the plugin server (legacy mode, or inside the managed plugin).  The other
commands talk to a running plugin over its socket.  Every error prints one line on stderr and
exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_SOCKET = Path("/run/docker/plugins/pyvol.sock")
DEFAULT_ROOT = Path("/var/lib/pyvol")


def _serve(args: argparse.Namespace) -> int:
    from plugin.server import serve
    from plugin.settings import Settings

    serve(Settings.from_env(os.environ, root=args.root, socket=args.socket,
                            mount_root=args.mount_root))
    return 0


class ClientFailure(Exception):
    """A CLI usage or outcome error: one line on stderr, exit 1."""


def _call(args: argparse.Namespace, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    from plugin.client import call, find_socket

    return call(args.socket or find_socket(), endpoint, body)


def _split(ref: str) -> tuple[str, str]:
    volume, at, name = ref.partition("@")
    if not at or not volume or not name:
        raise SystemExit(f"pyvol: expected VOLUME@SNAPSHOT, got {ref!r}")
    return volume, name


def _snapshot_create(args: argparse.Namespace) -> int:
    body = {"Volume": args.volume, **({"Name": args.name} if args.name else {})}
    snap = _call(args, "pyvol/snapshot/create", body)["Snapshot"]
    print(f"{snap['volume']}@{snap['name']}")
    return 0


def _snapshot_ls(args: argparse.Namespace) -> int:
    snaps = _call(args, "pyvol/snapshot/list", {"Volume": args.volume})["Snapshots"]
    if args.json:
        print(json.dumps(snaps, indent=2))
    else:
        for snap in snaps:
            print(snap["name"])
    return 0


def _snapshot_rm(args: argparse.Namespace) -> int:
    if args.all:
        if "@" in args.ref:
            raise SystemExit("pyvol: with --all, give the VOLUME only")
        answer = _call(args, "pyvol/snapshot/remove", {"Volume": args.ref, "All": True})
        for name in answer.get("Kept") or []:
            print(f"kept {args.ref}@{name}: S3 sync still needs it (a pending push, or the base "
                  "of the next one)")
        return 0
    volume, name = _split(args.ref)
    _call(args, "pyvol/snapshot/remove", {"Volume": volume, "Name": name})
    return 0


def _snapshot_restore(args: argparse.Namespace) -> int:
    volume, name = _split(args.ref)
    safety = _call(args, "pyvol/snapshot/restore", {"Volume": volume, "Name": name})["Safety"]
    print(f"restored {volume} from {name}; previous content kept as {volume}@{safety['name']}")
    return 0


def _progress_bar(done: int, total: int) -> None:
    width = 40
    filled = width * done // total if total else 0
    percent = 100 * done // total if total else 0
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {percent:3d}% "
                     f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB")
    sys.stderr.flush()


def _sync_push(args: argparse.Namespace, volume: str) -> int:
    before = (_call(args, "pyvol/sync/status", {"Volume": volume})["Status"] or {})
    started = (before.get("last_push") or {}).get("at")
    _call(args, "pyvol/sync/push", {"Volume": volume})
    if not args.wait:
        print(f"push of {volume} queued; follow it with `docker volume inspect {volume}`")
        return 0
    tty = sys.stderr.isatty()
    seen_error = (before.get("last_error") or {}).get("at")
    while True:
        time.sleep(0.3)
        status = _call(args, "pyvol/sync/status", {"Volume": volume})["Status"] or {}
        if tty and status.get("state") == "syncing":
            _progress_bar(int(status.get("bytes_done", 0)), int(status.get("bytes_total", 0)))
        last = status.get("last_push") or {}
        if status.get("state") == "idle" and last.get("at") != started:
            if tty:
                sys.stderr.write("\n")
            print(f"pushed {volume} as remote snapshot {last.get('remote_snapshot')}")
            return 0
        error = status.get("last_error") or {}
        if error.get("at") and error.get("at") != seen_error:
            if tty:
                sys.stderr.write("\n")
            raise ClientFailure(f"push of {volume} failed: {error.get('message')} "
                                "(it is retried in the background)")


def _sync_check(args: argparse.Namespace, volume: str) -> int:
    """Exit 0 when every remote snapshot is restorable, 1 (problems listed) when not."""
    report = _call(args, "pyvol/sync/check", {"Volume": volume, "ReadData": args.read_data})
    report = report["Check"]
    if args.json:
        print(json.dumps(report, indent=2))
    for warning in report["warnings"]:
        print(f"warning: skipped {warning}", file=sys.stderr)
    what = "structure and data" if report["read_data"] else "structure (add --read-data " \
        "to verify every blob)"
    if report["ok"]:
        if not args.json:
            print(f"{volume}: {report['snapshots']} remote snapshot(s), {report['blobs']} "
                  f"blob(s) in {report['packs']} pack(s): {what} ok")
        return 0
    for problem in report["first_problems"]:
        print(f"problem: {problem}", file=sys.stderr)
    raise ClientFailure(f"{volume}: {report['problems']} problem(s) in its remote copy "
                        f"({what}); the next push uploads again what the volume still has")


def _new_passphrase(volume: str) -> str:
    """The new passphrase: typed twice at a terminal, else the first line of stdin; never an
    argument, where `ps` and shell history would show it."""
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass(f"new passphrase for {volume}: ")
        if first and getpass.getpass("again: ") != first:
            raise ClientFailure("the two passphrases differ; nothing was changed")
    else:
        first = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not first:
        raise ClientFailure("the new passphrase is empty; nothing was changed")
    return first


def _sync_key(args: argparse.Namespace, words: list[str]) -> int:
    """``pyvol sync key add VOLUME | ls VOLUME | rm VOLUME ID``."""
    if words[0] == "add" and len(words) == 2:
        key = _call(args, "pyvol/sync/key/add",
                    {"Volume": words[1], "Passphrase": _new_passphrase(words[1])})["Key"]
        print(f"added key {key['id']} to {words[1]}")
        return 0
    if words[0] == "ls" and len(words) == 2:
        answer = _call(args, "pyvol/sync/key/list", {"Volume": words[1]})
        if args.json:
            print(json.dumps(answer, indent=2))
            return 0
        for key in answer["Keys"]:
            mark = "\topened by S3_PASSPHRASE" if key.get("current") else ""
            print(f"{key['id']}\t{key['created']}{mark}")
        if answer["Keys"] and not any(key.get("current") for key in answer["Keys"]):
            print(f"warning: the plugin's S3_PASSPHRASE opens none of {words[1]}'s keys: "
                  "set it to one of their passphrases (docker plugin set) before the plugin "
                  "restarts", file=sys.stderr)
        for key_id, why in (answer.get("Damaged") or {}).items():
            print(f"warning: key {key_id} is damaged: {why}", file=sys.stderr)
        return 0
    if words[0] == "rm" and len(words) == 3:
        _call(args, "pyvol/sync/key/remove", {"Volume": words[1], "Id": words[2]})
        print(f"removed key {words[2]} from {words[1]}")
        return 0
    raise ClientFailure("usage: pyvol sync key add VOLUME | sync key ls VOLUME | "
                        "sync key rm VOLUME ID (a new passphrase is read from the terminal, "
                        "or from stdin)")


def _sync(args: argparse.Namespace) -> int:
    words = args.words
    if words[0] == "key" and len(words) > 1:
        return _sync_key(args, words[1:])
    if words[0] == "ls" and len(words) == 2:
        snaps = _call(args, "pyvol/sync/list", {"Volume": words[1]})["Snapshots"]
        if args.json:
            print(json.dumps(snaps, indent=2))
        for snap in snaps if not args.json else []:
            mark = "\tdiverged" if snap.get("diverged") else ""
            print(f"{snap['id']}\t{snap['created']}\t{snap['size']}\t{snap['files']}{mark}")
        return 0
    if words[0] == "restore" and len(words) == 3:
        answer = _call(args, "pyvol/sync/restore", {"Volume": words[1], "Snapshot": words[2]})
        safety = answer.get("Safety")
        print(f"restored {words[1]} from remote snapshot {words[2]}"
              + (f"; previous content kept as {words[1]}@{safety['name']}" if safety else ""))
        return 0
    if words[0] == "delete-remote" and len(words) == 2:
        if not args.yes:
            raise ClientFailure(f"this deletes every remote snapshot of {words[1]}: "
                                "add --yes to confirm")
        _call(args, "pyvol/sync/delete-remote", {"Volume": words[1], "Confirm": words[1]})
        print(f"deleted the remote copy of {words[1]}")
        return 0
    if words[0] == "check" and len(words) == 2:
        return _sync_check(args, words[1])
    if len(words) == 1 and words[0] not in ("ls", "restore", "delete-remote", "check", "key"):
        return _sync_push(args, words[0])
    raise ClientFailure("usage: pyvol sync VOLUME [--wait] | sync ls VOLUME | "
                        "sync restore VOLUME ID | sync delete-remote VOLUME --yes | "
                        "sync check VOLUME [--read-data] | sync key add|ls|rm VOLUME [ID]")


def _lease(args: argparse.Namespace) -> int:
    if args.action == "show":
        lease = _call(args, "pyvol/lease/show", {"Volume": args.volume})["Lease"]
        if args.json:
            print(json.dumps(lease, indent=2))
            return 0
        print(_lease_text(args.volume, lease))
        return 0
    if not args.yes:
        raise ClientFailure(f"breaking the lease of {args.volume} lets another host mount it "
                            "while its holder may still write: only when that host is gone or "
                            "cut off; add --yes to confirm")
    was = _call(args, "pyvol/lease/break", {"Volume": args.volume, "Confirm": args.volume})
    print(f"freed the lease of {args.volume} (it was {_lease_text(args.volume, was['Was'])})")
    return 0


def _lease_text(volume: str, lease: dict[str, Any]) -> str:
    state = lease["state"]
    if state == "none":
        return f"{volume}: no lease yet (never mounted with -o s3_lease=true)"
    if "holder" not in lease:
        return f"{volume}: free (generation {lease['generation']})"
    holder = lease["holder"]
    doing = state + (f" {lease['progress']}" if lease.get("progress") else "")
    return (f"{volume}: {doing}, held by {holder['name']} ({holder['id']}) since "
            f"{lease['since']}, expires {lease['expires']} (generation {lease['generation']})")


def _mounts_reset(args: argparse.Namespace) -> int:
    cleared = _call(args, "pyvol/mounts/reset", {"Volume": args.volume})["Cleared"]
    print(f"cleared {cleared} mount reference(s) of {args.volume}")
    return 0


def _resize(args: argparse.Namespace) -> int:
    done = _call(args, "pyvol/resize", {"Volume": args.volume, "Size": args.size})
    print(f"{args.volume}: resized to {done['Size']} ({done['How']})")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line on stderr, like every other error (subparsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="pyvol", description="pyvol Docker volume plugin")
    top.add_argument("--socket", type=Path, default=None,
                     help="the plugin's socket (default: found through `docker plugin inspect`)")
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the volume plugin server on a unix socket")
    serve.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                       help=f"unix socket to listen on (default {DEFAULT_SOCKET})")
    serve.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                       help=f"directory for volume data and state (default {DEFAULT_ROOT})")
    serve.add_argument("--mount-root", type=Path, default=None,
                       help="managed plugins: the propagatedMount to bind volumes under")
    serve.set_defaults(func=_serve)

    snapshot = sub.add_parser("snapshot", help="point-in-time copies of volumes")
    snap = snapshot.add_subparsers(dest="action", required=True)
    create = snap.add_parser("create", help="snapshot VOLUME now (NAME: a UTC timestamp)")
    create.add_argument("volume")
    create.add_argument("name", nargs="?")
    create.set_defaults(func=_snapshot_create)
    ls = snap.add_parser("ls", help="list VOLUME's snapshots, oldest first")
    ls.add_argument("volume")
    ls.add_argument("--json", action="store_true", help="details as JSON")
    ls.set_defaults(func=_snapshot_ls)
    rm = snap.add_parser("rm", help="remove VOLUME@NAME (or --all VOLUME)")
    rm.add_argument("ref")
    rm.add_argument("--all", action="store_true", help="remove every snapshot of VOLUME")
    rm.set_defaults(func=_snapshot_rm)
    restore = snap.add_parser(
        "restore", help="replace VOLUME's content with VOLUME@NAME (volume must be unmounted)")
    restore.add_argument("ref")
    restore.set_defaults(func=_snapshot_restore)

    lease = sub.add_parser(
        "lease", help="the lease of a volume used from several hosts (-o s3_lease=true)",
        description="`show VOLUME`: which host holds the volume's lease, since when, until "
        "when and what it does.  `break VOLUME --yes`: free it whoever holds it, when that "
        "host is gone for good (its later pushes are kept aside, never the volume's latest).")
    lease.add_argument("action", choices=("show", "break"))
    lease.add_argument("volume")
    lease.add_argument("--json", action="store_true", help="show: as JSON")
    lease.add_argument("--yes", action="store_true", help="break: confirm")
    lease.set_defaults(func=_lease)

    mounts = sub.add_parser("mounts", help="mount references")
    mounts_sub = mounts.add_subparsers(dest="action", required=True)
    reset = mounts_sub.add_parser(
        "reset", help="forget VOLUME's mount references (only when no container uses it)")
    reset.add_argument("volume")
    reset.set_defaults(func=_mounts_reset)

    resize = sub.add_parser(
        "resize", help="grow a sized volume to SIZE (e.g. 20G); shrinking is refused",
        description="Grows the volume's size limit and its filesystem, online when it is in "
        "use.  Shrinking is refused: copy into a smaller volume with "
        "`docker volume create -d pyvol -o size=SIZE -o from=VOLUME NEW` instead.")
    resize.add_argument("volume")
    resize.add_argument("size")
    resize.set_defaults(func=_resize)

    sync = sub.add_parser(
        "sync", help="S3 sync: VOLUME (push now), ls VOLUME, restore VOLUME ID, "
        "delete-remote VOLUME, check VOLUME [--read-data], key add|ls|rm VOLUME [ID]",
        description="Removing a volume with `docker volume rm` keeps its remote copy; "
        "`pyvol sync delete-remote VOLUME --yes` deletes it.  An encrypted volume's "
        "passphrases: `key add VOLUME` (the new one is read from the terminal, or one line "
        "of stdin), `key ls VOLUME`, `key rm VOLUME ID`.")
    sync.add_argument("words", nargs="+", metavar="ARG")
    sync.add_argument("--wait", action="store_true", help="push: wait and show progress")
    sync.add_argument("--json", action="store_true", help="ls, key ls: details as JSON")
    sync.add_argument("--yes", action="store_true", help="delete-remote: confirm")
    sync.add_argument("--read-data", action="store_true",
                      help="check: download and verify every blob")
    sync.set_defaults(func=_sync)
    return top


def main(argv: list[str] | None = None) -> int:
    from plugin.errors import PyvolError

    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (PyvolError, ClientFailure) as exc:
        print(f"pyvol: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
