"""Benchmark: a leased volume moving between hosts, on one moto server (not a test).

Run from the repository root::

    python bench/lease_bench.py              # 10,000 files / 1 GiB
    python bench/lease_bench.py --quick      # 1,000 files / 100 MiB, to try it out
    python bench/lease_bench.py --move-rounds 5   # the move's medians of 5 rounds (default 3)

Two measurements, side by side in one run, with ratios:

1. **Move.** Host A pushes a volume; host B, which never had it, restores it (a full
   restore); B changes 1% of it (rewrites 100 files, adds 5, removes 5) and pushes; the
   volume moves back to A, which still has its older copy: A's pull reads what it still has
   and downloads the rest.  Both are timed and their downloaded bytes counted by the relay
   in front of the store.  Target: the 1% move at most 0.2x the full restore's time.
   Hosts are two :class:`~s3sync.RemoteStore` objects with caches of their own, as the
   plugin keeps them (no interpreter start in the timings).
2. **Lease latency.** Mount and Unmount of an idle volume through the real server's socket,
   leased (``-o s3_lease=true``) and not, against the local store: p50 and p90 of each.
   Target: the lease adds under 50 ms to a Mount's p50.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "functional"))

from s3_fixtures import ACCESS_KEY, SECRET_KEY, MotoServer, Relay, workspace  # noqa: E402

MiB = 1 << 20


def make_tree(root: Path, files: int, total: int, rng: random.Random) -> None:
    dirs = max(1, files // 100)
    for d in range(dirs):
        (root / f"dir{d:03d}").mkdir(parents=True)
    for i in range(files):
        size = rng.randint(total // files // 2, total // files * 3 // 2)
        (root / f"dir{i % dirs:03d}" / f"file{i:05d}.bin").write_bytes(os.urandom(size))


def change_one_percent(root: Path, rng: random.Random) -> None:
    files = sorted(root.rglob("*.bin"))
    count = max(1, len(files) // 100)
    for path in rng.sample(files, count):
        path.write_bytes(os.urandom(path.stat().st_size))
    for path in rng.sample(files, max(1, count // 20)):
        path.unlink()
    for i in range(max(1, count // 20)):
        (root / "dir000" / f"new{i}.bin").write_bytes(os.urandom(10_000))


def move(moto: MotoServer, relay: Relay, work: Path, files: int, total: int,
         rounds: int) -> list[str]:
    from backends.tree import DirectoryView
    from s3sync import RemoteStore, S3Config

    moto.client().create_bucket(Bucket="bench-move")  # type: ignore[attr-defined]
    config = S3Config(endpoint_url=relay.url, region="us-east-1", access_key_id=ACCESS_KEY,
                      secret_access_key=SECRET_KEY)
    fulls: list[float] = []
    moves: list[float] = []
    for i in range(rounds):  # each round from scratch: a pull changes the copy it reads
        here = work / f"round{i}"
        on_a = RemoteStore(config, "bench-move", f"vol{i}", here / "cache-a")
        on_b = RemoteStore(config, "bench-move", f"vol{i}", here / "cache-b")
        a_copy, b_copy = here / "a", here / "b"
        make_tree(a_copy, files, total, random.Random(1))
        on_a.push(DirectoryView(a_copy))

        b_copy.mkdir()
        os.sync()
        relay.reset()
        started = time.perf_counter()
        on_b.restore("latest", b_copy)
        fulls.append(time.perf_counter() - started)
        full_b = relay.reset().downloaded
        change_one_percent(b_copy, random.Random(2))
        on_b.push(DirectoryView(b_copy))

        pulled = here / "a-pulled"
        pulled.mkdir()
        os.sync()
        relay.reset()
        started = time.perf_counter()
        local = on_a.restore("latest", pulled, local=DirectoryView(a_copy))
        moves.append(time.perf_counter() - started)
        move_b = relay.reset().downloaded
        reused = local.read_bytes + local.linked_bytes if local is not None else 0
        shutil.rmtree(here)
    full_s, move_s = statistics.median(fulls), statistics.median(moves)
    print(f"rounds: full restore {', '.join(f'{t:.2f}' for t in fulls)} s; "
          f"move {', '.join(f'{t:.2f}' for t in moves)} s (medians below)", flush=True)
    return [
        "| move to a host | time | downloaded | taken from its own copy |",
        "|---|---|---|---|",
        f"| that never had it (full restore) | {full_s:.2f} s | {full_b / MiB:.1f} MiB | 0 |",
        f"| that has a copy 1% older | {move_s:.2f} s | {move_b / MiB:.1f} MiB | "
        f"{reused / MiB:.1f} MiB |",
        f"| ratio (target <= 0.2) | {move_s / full_s:.2f}x | {move_b / max(full_b, 1):.2f}x | |",
    ]


def latency(relay: Relay, work: Path, rounds: int) -> list[str]:
    from sync_support import create, s3_settings, sync_servers

    rows = ["| volume | Mount p50 | Mount p90 | Unmount p50 | Unmount p90 |",
            "|---|---|---|---|---|"]
    p50s: dict[str, float] = {}
    (work / "servers").mkdir()
    with sync_servers(work / "servers") as start:
        server = start(work / "host", s3_settings(relay.url, HOST_NAME="bench"))
        for label, opts in (("plain sync", {}), ("leased", {"s3_lease": "true"})):
            name = "leased" if opts else "plain"
            create(server, name, s3_bucket="bench-move", s3_prefix=f"lat-{name}",
                   s3_sync="manual", **opts)
            mounts, unmounts = [], []
            for i in range(rounds):
                mount_id = f"{i:064d}"
                started = time.perf_counter()
                server.client.ok("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
                mounts.append(time.perf_counter() - started)
                started = time.perf_counter()
                server.client.ok("VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
                unmounts.append(time.perf_counter() - started)
                time.sleep(0.3 if opts else 0)  # the leased one's push and release
            p50s[label] = statistics.median(mounts)
            rows.append(f"| {label} | {_ms(statistics.median(mounts))} | {_ms(_p90(mounts))} | "
                        f"{_ms(statistics.median(unmounts))} | {_ms(_p90(unmounts))} |")
    rows.append(f"| lease adds to Mount p50 (target < 50 ms) | "
                f"{_ms(p50s['leased'] - p50s['plain sync'])} | | | |")
    return rows


def _p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9) - 1]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 files / 100 MiB")
    parser.add_argument("--rounds", type=int, default=50, help="Mount/Unmount pairs timed")
    parser.add_argument("--move-rounds", type=int, default=3,
                        help="rounds of the move, each from scratch (the table shows medians)")
    args = parser.parse_args()
    with workspace("pyvol-lease-bench-") as (work, moto, relay):
        files, total = (1_000, 100 * MiB) if args.quick else (10_000, 1024 * MiB)
        print(f"move: {files} files, {total // MiB} MiB", flush=True)
        print("\n".join(move(moto, relay, work, files, total, args.move_rounds)), flush=True)
        print()
        print("\n".join(latency(relay, work, args.rounds)))


if __name__ == "__main__":
    main()
