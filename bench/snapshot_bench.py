"""Snapshot benchmark: pyvol next to ``cp -a`` and ``rsync -a --link-dest``, on ext4, XFS, btrfs.

Not a test: it prints a table.  Needs root (loop mounts), mkfs.ext4/xfs/btrfs and rsync.

    python bench/snapshot_bench.py [--fs ext4,xfs,btrfs] [--trees files,large] [--profile]

For each filesystem and tree, a fresh sparse loop image is made and mounted, the tree is
written into a pyvol volume (the driver runs in-process, its root on the loop filesystem),
and the same steps are timed for each tool, on the same tree, on the same filesystem:

- ``first``: the first copy (pyvol: the first snapshot);
- ``1% changed``: after 4 KiB were overwritten in place in 1% of the files (at least one);
- ``no change``: again, with nothing changed;
- ``restore``: pyvol builds a new volume from the first snapshot (``-o from=VOL@SNAP``);
  its reference column is the first ``cp -a``.

Every step runs ``--rounds`` times (default 3), each round from scratch (no snapshot, no
earlier copy); the table shows the fastest round of each column, the one least disturbed by
the virtual disk's background writeback.

``cp -a`` has no incremental mode, so it copies everything each time (coreutils >= 9 clones
on XFS and btrfs).  ``rsync -a --link-dest=PREVIOUS`` hard-links unchanged files to the
previous copy.  Before each timed step the page cache is flushed to disk (``sync``) and
nothing is dropped from it: every tool reads a hot tree.  pyvol's times include its
``syncfs`` (a snapshot is durable when it returns); the baselines are shown both as they
return and once ``syncfs`` has written their data.  The tree is written, and changed, a moment
(0.3 s) before the next snapshot, as in real use: a file changed within 100 ms of a snapshot
is stored again by the next one (``snapshots.store.RACY_NS``).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "functional"))

from loopfs import FSTYPES, LoopUnavailable, loop_filesystem  # noqa: E402

from backends.fs import syncfs  # noqa: E402
from plugin.driver import Driver  # noqa: E402
from plugin.settings import Settings  # noqa: E402

MiB = 1 << 20
IMAGE_SIZE = 6 << 30
TREES = {
    "files": "10,000 files, ~1 GiB",
    "large": "4 files x 256 MiB",
}
STEPS = ("first", "1% changed", "no change", "restore")
SETTLE = 0.3


Timing = tuple[float, float]
"""Seconds until the command returned, and until its data was on disk (``syncfs`` after)."""


@dataclass
class Result:
    fs: str
    tree: str
    step: str
    pyvol: float
    cp: Timing
    rsync: Timing | None
    stored: int
    method: str


@dataclass
class Profiles:
    enabled: bool
    stats: dict[str, pstats.Stats] = field(default_factory=dict)

    @contextmanager
    def run(self, label: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()
            self.stats[label] = pstats.Stats(profiler)


def timed(fn: Callable[[], object], fs: Path) -> Timing:
    os.sync()
    started = time.perf_counter()
    fn()
    returned = time.perf_counter() - started
    syncfs(fs)
    return returned, time.perf_counter() - started


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def write_tree(root: Path, tree: str) -> list[Path]:
    """Write the tree; return its files in a fixed order."""
    block = os.urandom(MiB)
    files: list[Path] = []
    if tree == "files":
        for i in range(10_000):
            d = root / f"dir{i // 100:03d}"
            if i % 100 == 0:
                d.mkdir(parents=True)
            size = (8 + (i * 7919) % 192) * 1024  # 8 KiB to 200 KiB, ~104 KiB on average
            path = d / f"file{i:05d}.dat"
            path.write_bytes(i.to_bytes(8, "little") + block[8:size])
            files.append(path)
    else:
        for i in range(4):
            path = root / f"large{i}.bin"
            with open(path, "wb") as f:
                for j in range(256):
                    f.write(((i << 16) + j).to_bytes(8, "little") + block[8:])
            files.append(path)
    return files


def change_one_percent(files: list[Path], round_: int) -> None:
    """Overwrite 4 KiB in place in 1% of the files (other ones each round), at least one."""
    step = 100
    chosen = files[round_ % step::step] if len(files) >= step else files[round_ % len(files):][:1]
    for path in chosen:
        with open(path, "r+b") as f:
            f.write(os.urandom(4096))


def best(results: list[Result]) -> Result:
    """The fastest of each column over the rounds (the least disturbed by other I/O)."""
    def fastest(timings: list[Timing]) -> Timing:
        return min(t[0] for t in timings), min(t[1] for t in timings)

    first = results[0]
    rsyncs = [r.rsync for r in results if r.rsync is not None]
    return Result(first.fs, first.tree, first.step, min(r.pyvol for r in results),
                  fastest([r.cp for r in results]), fastest(rsyncs) if rsyncs else None,
                  max(r.stored for r in results), first.method)


def bench_one(fstype: str, tree: str, work: Path, profiles: Profiles,
              rounds: int) -> list[Result]:
    per_step: dict[str, list[Result]] = {step: [] for step in STEPS}
    with loop_filesystem(fstype, work / f"{fstype}-{tree}", size=IMAGE_SIZE) as mnt:
        driver = Driver(Settings(root=mnt / "pyvol", socket=mnt / "unused.sock"))
        try:
            driver.create("bench", None)
            data = driver.path("bench")
            files = write_tree(data, tree)
            base = mnt / "baseline"
            base.mkdir()

            def pyvol_snapshot(name: str) -> tuple[float, int, str]:
                info = None

                def snap() -> None:
                    nonlocal info
                    with profiles.run(f"{fstype} {tree} snapshot {name}"):
                        info = driver.snapshot_create("bench", name)
                seconds, _ = timed(snap, mnt)  # durable when it returns: it ran syncfs
                assert info is not None
                return seconds, info.copied_bytes, info.method

            def cp() -> Timing:
                seconds = timed(lambda: sh("cp", "-a", str(data), str(base / "cp")), mnt)
                sh("rm", "-rf", str(base / "cp"))
                return seconds

            def rsync(dst: str, previous: str | None) -> Timing:
                link = [f"--link-dest={base / previous}"] if previous else []
                return timed(lambda: sh("rsync", "-a", *link, f"{data}/", f"{base / dst}/"), mnt)

            for r in range(rounds):
                if r:  # start over: no snapshot, no earlier copy
                    driver.snapshot_remove("bench", None)
                    driver.remove("restored")
                    sh("rm", "-rf", *(str(p) for p in base.iterdir()))
                time.sleep(SETTLE)
                first = pyvol_snapshot(f"first-{r}")
                cp_first = cp()
                per_step["first"].append(Result(fstype, tree, "first", first[0], cp_first,
                                                rsync("r1", None), first[1], first[2]))

                change_one_percent(files, r)
                time.sleep(SETTLE)
                changed = pyvol_snapshot(f"changed-{r}")
                per_step["1% changed"].append(Result(
                    fstype, tree, "1% changed", changed[0], cp(), rsync("r2", "r1"),
                    changed[1], changed[2]))

                same = pyvol_snapshot(f"same-{r}")
                per_step["no change"].append(Result(fstype, tree, "no change", same[0], cp(),
                                                    rsync("r3", "r2"), same[1], same[2]))

                def restore(r: int = r) -> None:
                    with profiles.run(f"{fstype} {tree} restore"):
                        driver.create("restored", {"from": f"bench@first-{r}"})
                per_step["restore"].append(Result(fstype, tree, "restore",
                                                  timed(restore, mnt)[0], cp_first, None, 0,
                                                  "-"))
        finally:
            driver.jobs.shutdown()
            driver.state.close()
    return [best(per_step[step]) for step in STEPS]


def ratios(pyvol: float, base: Timing | None) -> str:
    """pyvol's time over the baseline's, as the command returns / once synced to disk."""
    return "-" if base is None else f"{pyvol / base[0]:.2f}/{pyvol / base[1]:.2f}"


def seconds(base: Timing | None) -> str:
    return "-" if base is None else f"{base[0]:.3f}/{base[1]:.3f}"


def report(results: list[Result]) -> list[str]:
    print("seconds; baselines as 'returned/synced' (syncfs after the command); pyvol is "
          "durable when it returns.")
    print("ratios: pyvol time / baseline time, against 'returned' and against 'synced'.")
    print()
    header = (f"{'fs':6} {'tree':6} {'step':11} {'pyvol':>7} {'cp -a':>13} {'rsync':>13} "
              f"{'x cp -a':>11} {'x rsync':>11} {'stored MiB':>10} {'method':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.fs:6} {r.tree:6} {r.step:11} {r.pyvol:7.3f} {seconds(r.cp):>13} "
              f"{seconds(r.rsync):>13} {ratios(r.pyvol, r.cp):>11} "
              f"{ratios(r.pyvol, r.rsync):>11} "
              f"{'-' if r.step == 'restore' else f'{r.stored / MiB:.1f}':>10} {r.method:>8}")
    misses = []
    for r in results:
        label = f"{r.fs} {r.tree} {r.step}"
        if r.tree == "files" and r.step == "no change" and r.pyvol >= 0.5:
            misses.append(f"{label}: {r.pyvol:.3f} s, target < 0.5 s")
        if r.step == "1% changed":
            for i, how in enumerate(("returned", "synced")):
                if r.pyvol > 0.1 * r.cp[i]:
                    misses.append(f"{label}: {r.pyvol / r.cp[i]:.2f}x cp -a ({how}), "
                                  "target <= 0.1x")
                if r.rsync is not None and r.pyvol > r.rsync[i]:
                    misses.append(f"{label}: {r.pyvol / r.rsync[i]:.2f}x rsync --link-dest "
                                  f"({how}), target <= 1x")
        if r.fs in ("xfs", "btrfs") and r.step == "first" and r.pyvol >= 1.0:
            misses.append(f"{label}: {r.pyvol:.3f} s, target < 1 s")
    print()
    print("targets: " + ("all met" if not misses else f"{len(misses)} missed"))
    for miss in misses:
        print(f"  MISSED {miss}")
    return misses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fs", default=",".join(FSTYPES), help="comma-separated filesystems")
    parser.add_argument("--trees", default=",".join(TREES), help="comma-separated trees")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat every step; the table shows the fastest round")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile pyvol's steps and print where the time goes")
    args = parser.parse_args()
    for tool in ("cp", "rsync"):
        if shutil.which(tool) is None:
            print(f"snapshot_bench: {tool} is missing (apt-get install {tool})", file=sys.stderr)
            return 2
    profiles = Profiles(args.profile)
    results: list[Result] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pyvol-bench-", dir="/var/tmp") as work:
        for fstype in args.fs.split(","):
            for tree in args.trees.split(","):
                print(f"... {fstype}, {TREES[tree]}", file=sys.stderr, flush=True)
                try:
                    results += bench_one(fstype, tree, Path(work), profiles, args.rounds)
                except LoopUnavailable as exc:
                    print(f"snapshot_bench: {exc}", file=sys.stderr)
                    return 2
    print(f"pyvol snapshot benchmark ({time.monotonic() - started:.0f} s, best of "
          f"{args.rounds} rounds); trees: "
          + "; ".join(f"{k} = {v}" for k, v in TREES.items()))
    print()
    report(results)
    for label, stats in profiles.stats.items():
        print(f"\n=== profile: {label}")
        stats.sort_stats("cumulative").print_stats(18)
    return 0


if __name__ == "__main__":
    sys.exit(main())
