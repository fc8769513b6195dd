#!/usr/bin/env python3
"""The multi-host test harness by hand: bring up the hosts of tests/multihost and keep them
until Ctrl-C, or remove what killed sessions left behind.

Usage (as root, with the worktree's venv, from the repository root):
  .venv/bin/python scripts/multihost.py up [NAME...]   # default hosts: a b; Ctrl-C tears down
  .venv/bin/python scripts/multihost.py clean          # leftovers of sessions that were killed

``up`` prints, per host, the DOCKER_HOST to export to drive its engine, and the S3 endpoint.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "multihost")]

from multihost_support import (  # noqa: E402
    Hosts,
    SetupError,
    destroy,
    environment_problem,
    leftover_tokens,
)


def clean() -> int:
    status = 0
    for token in leftover_tokens():
        left = destroy(token)
        print(f"removed session {token}" + (f"; could not remove: {left}" if left else ""))
        status |= bool(left)
    return status


def up(names: list[str]) -> int:
    problem = environment_problem()
    if problem is not None:
        print(f"multihost: cannot start: {problem}", file=sys.stderr)
        return 1
    clean()
    try:
        hosts = Hosts.start(names)
    except SetupError as exc:
        print(f"multihost: setup failed: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(f"session {hosts.token} up in {hosts.setup_seconds:.1f} s "
              f"({hosts.build_note}; {hosts.timings})")
        print(f"S3: {hosts.s3.url} bucket {hosts.s3.bucket} (log {hosts.s3.log})")
        for host in hosts:
            print(f"host {host.name}: export DOCKER_HOST=unix://{host.socket}   "
                  f"# ip {host.ip}, netns {host.netns}, data {host.data_dir}, log {host.log}")
        print("Ctrl-C tears everything down")
        stop.wait()
    finally:
        left = hosts.close()
        print("torn down" + (f"; could not remove: {left}" if left else ""))
    return 1 if left else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start hosts and keep them until Ctrl-C")
    start.add_argument("names", nargs="*", default=["a", "b"])
    sub.add_parser("clean", help="remove what killed sessions left behind")
    args = parser.parse_args()
    return up(args.names) if args.command == "up" else clean()


if __name__ == "__main__":
    sys.exit(main())
