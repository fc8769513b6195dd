"""Profile one pyvol push or restore against moto, in this process (not a test, not a bench).

    python bench/s3_profile.py --tree a --enc            # 10k small files, encrypted
    python bench/s3_profile.py --tree b --op push        # 8 x 64 MiB, plain
    python bench/s3_profile.py --tree b --enc --spy /tmp/pyspy/bin/py-spy

Builds the tree and the store first (untimed), then runs the operation under cProfile (the
calling thread only) and, with ``--spy``, py-spy sampling every thread of this process;
prints the cProfile top and py-spy's busiest leaf and inclusive frames.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "functional"))
sys.path.insert(0, str(REPO / "bench"))

from s3_bench import PASSWORD, make_large, make_small  # noqa: E402
from s3_fixtures import ACCESS_KEY, SECRET_KEY, workspace  # noqa: E402


def summarise(raw: Path, top: int = 25) -> None:
    leaf: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] += n
        for f in set(frames[1:]):
            incl[f] += n
    print(f"\npy-spy: {total} samples; leaf frames:")
    for f, n in leaf.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {f}")
    print("inclusive:")
    for f, n in incl.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", default="a")
    parser.add_argument("--op", default="restore", choices=("push", "restore"))
    parser.add_argument("--enc", action="store_true")
    parser.add_argument("--spy", default="")
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=1, help="time only, this many runs")
    parser.add_argument("--dir", default=None, help="where the trees go (e.g. /dev/shm)")
    args = parser.parse_args()
    from backends.tree import DirectoryView
    from s3sync import RemoteStore, S3Config

    with workspace("pyvol-prof-", args.dir) as (work, moto, relay):
        moto.client().create_bucket(Bucket="prof")  # type: ignore[attr-defined]
        src = work / "src"
        if args.tree == "a":
            make_small(src, args.small, random.Random(1))
        else:
            make_large(src, 8, 64 << 20)
        os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                          AWS_REGION="us-east-1", S3_ENDPOINT_URL=relay.url)
        store = RemoteStore(S3Config.from_env(), "prof", "v", work / "cache",
                            passphrase=PASSWORD if args.enc else None)
        dst = work / "dst"
        dst.mkdir()
        if args.op == "restore":
            store.push(DirectoryView(src))
            store.list()  # unlocked before the timed part, as in the daemon
            def op() -> None:
                store.restore("latest", dst)
        else:
            store.list()
            def op() -> None:
                store.push(DirectoryView(src))
        if args.repeat > 1 and args.op == "restore":
            times = []
            for i in range(args.repeat):
                target = work / f"dst{i}"
                target.mkdir()
                os.sync()
                started = time.perf_counter()
                store.restore("latest", target)
                times.append(time.perf_counter() - started)
                subprocess.run(["rm", "-rf", str(target)], check=False)
            print(f"{args.op} {args.tree} enc={args.enc}: " +
                  " ".join(f"{t:.2f}" for t in sorted(times)))
            return
        os.sync()
        spy = None
        raw = work / "spy.txt"
        if args.spy:
            spy = subprocess.Popen([args.spy, "record", "-p", str(os.getpid()), "-r", "250",
                                    "-f", "raw", "-o", str(raw), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        prof = cProfile.Profile()
        started = time.perf_counter()
        prof.enable()
        op()
        prof.disable()
        print(f"{args.op} {args.tree} enc={args.enc}: {time.perf_counter() - started:.2f} s")
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            summarise(raw)
        print()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
