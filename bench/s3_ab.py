"""A/B: the price of encryption, pyvol encrypted against pyvol plain, in one process.

Not a test.  Run from the repository root::

    python bench/s3_ab.py --tree a --op restore            # 10k small files
    python bench/s3_ab.py --tree b --op push --runs 5      # 8 x 64 MiB
    python bench/s3_ab.py --dir /dev/shm                   # restores into tmpfs
    python bench/s3_ab.py --tree b --op change             # the push after a 1% change

``s3_bench.py`` runs each tool once per round in a fixed order, plain pyvol before encrypted
pyvol, and keeps every restored tree until the end; on a disk whose metadata operations slow
down as it fills (seen here: a 10k-file restore from 0.6 s to 1.8 s), that order alone moved
the encrypted/plain ratio by more than encryption's own cost.  Here the two run alternately
(plain first in even runs, encrypted first in odd ones) against one moto server behind the
same relay, restored trees are deleted after each run, and each push goes to a fresh prefix
(the encrypted store's key is made before the clock starts: a key is made once per volume).
``change`` times the push after s3_bench's 1% change, over a full push made untimed just
before into the same fresh prefix.
Prints every run, the medians and their ratio (target <= 1.1).
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
sys.path.insert(0, str(REPO / "bench"))

from s3_bench import (  # noqa: E402
    PASSWORD,
    change_large,
    change_small,
    make_large,
    make_small,
)
from s3_fixtures import ACCESS_KEY, SECRET_KEY, workspace  # noqa: E402

MODES = ("plain", "enc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", choices=("a", "b"), default="a")
    parser.add_argument("--op", choices=("push", "change", "restore"), default="restore")
    parser.add_argument("--runs", type=int, default=6, help="runs of each mode")
    parser.add_argument("--dir", default=None, help="where the trees go (default: $TMPDIR)")
    parser.add_argument("--switch-interval", type=float, default=0.001,
                        help="sys.setswitchinterval, as the plugin server sets it")
    args = parser.parse_args()
    sys.setswitchinterval(args.switch_interval)

    from backends.tree import DirectoryView
    from s3sync import RemoteStore, S3Config

    with workspace("pyvol-ab-", args.dir) as (work, moto, relay):
        os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                          AWS_REGION="us-east-1", S3_ENDPOINT_URL=relay.url)
        src = work / "src"
        if args.tree == "a":
            make_small(src, 10_000, random.Random(1))
        else:
            make_large(src, 8, 64 << 20)

        def changed() -> Path:
            """A fresh copy of the tree (pushed whole, then changed by 1%: the same change
            for both modes of one run)."""
            copy = work / "changed"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(src, copy)
            return copy
        config = S3Config.from_env()

        def store(mode: str, prefix: str) -> RemoteStore:
            made = RemoteStore(config, f"ab-{mode}", prefix, work / f"cache-{mode}-{prefix}",
                               passphrase=PASSWORD if mode == "enc" else None)
            if mode == "enc":
                made._open(push=True)  # make (or unlock) the key: not what is timed
            return made

        stores = {}
        for mode in MODES:
            moto.client().create_bucket(Bucket=f"ab-{mode}")  # type: ignore[attr-defined]
            if args.op == "restore":
                stores[mode] = store(mode, "v")
                stores[mode].push(DirectoryView(src))
                stores[mode].list()
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for run in range(args.runs):
            for mode in MODES if run % 2 == 0 else reversed(MODES):
                if args.op == "restore":
                    dst = work / f"dst-{mode}-{run}"
                    dst.mkdir()
                    os.sync()
                    started = time.perf_counter()
                    stores[mode].restore("latest", dst)
                    times[mode].append(time.perf_counter() - started)
                    shutil.rmtree(dst)
                else:
                    fresh = store(mode, f"p{run}")
                    tree = src
                    if args.op == "change":
                        tree = changed()
                        fresh.push(DirectoryView(tree))
                        (change_small if args.tree == "a" else change_large)(
                            tree, random.Random(run))
                    os.sync()
                    started = time.perf_counter()
                    fresh.push(DirectoryView(tree))
                    times[mode].append(time.perf_counter() - started)
        medians = {mode: statistics.median(times[mode]) for mode in MODES}
        print(f"{args.op}, tree {args.tree}, {args.runs} runs each, alternating")
        for mode in MODES:
            print(f"  {mode:5} median {medians[mode]:.3f} s   runs: "
                  + " ".join(f"{t:.3f}" for t in times[mode]))
        print(f"  enc/plain {medians['enc'] / medians['plain']:.2f}x (target <= 1.1)")


if __name__ == "__main__":
    main()
