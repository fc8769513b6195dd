"""Benchmark: pyvol's S3 sync next to aws s3 sync, rclone sync and restic, on one moto server.

Not a test.  Run from the repository root::

    python bench/s3_bench.py              # both trees, every tool found on PATH
    python bench/s3_bench.py --quick      # smaller trees, to try the script out

Two trees of random (incompressible) content: (a) 10,000 files, ~80 MiB in 100 directories;
(b) 8 files of 64 MiB.  For each: a full push, a push with no change, a push after changing
1% (a: rewrite 100 files, add 5, remove 5; b: overwrite a 1% region of one file, add one
1 MiB file, remove one file), and a full restore into an empty directory.  Every tool runs as
its own process against the same moto server, through one HTTP relay that counts request
body bytes: "uploaded" is the sum of PUT and POST bodies, measured the same way for all.
Restores are checked byte for byte against the source.  Each step starts after sync(2), so
one step's dirty pages do not slow the next; restored trees are deleted only at the end.

pyvol runs three ways: "pyvol" (plain) and "pyvol-enc" (encrypted, passphrase set) as the
plugin runs them -- one long-lived daemon process per row, one RemoteStore per bucket, sent
each command over a pipe -- and "pyvol-cli", plain, one process per command.  What each
timing includes:

* pyvol, pyvol-enc: only the operation in an already running process (no interpreter start,
  no imports), with the plugin server's GIL switch interval.  pyvol-enc's key is made in
  each bucket's untimed set-up, as the plugin makes it when an encrypted volume is created
  on an empty prefix (and as restic's ``init`` is set-up); it is unlocked once per store
  object, as in the plugin, which keeps each volume's store.  Every blob is still sealed,
  unsealed and checked on every command.
* pyvol-cli: a whole process (interpreter start, imports, store set-up).
* aws s3 sync, rclone sync: a whole process; neither encrypts.
* restic: a whole process, which always encrypts and derives its key from the password with
  scrypt on every command (restic 0.14 calibrates it to about 0.5 s at init).

The tools run in a different order each round (the list rotated by one), so that no tool
always runs first on a fresh disk or last on one filling with restored trees.

The ratio columns compare pyvol-enc with pyvol (the price of encryption; target <= 1.1x) and
with the fastest peer that restored correctly (target <= 1.0x).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "functional"))

from s3_fixtures import ACCESS_KEY, SECRET_KEY, MotoServer, Relay, workspace  # noqa: E402

SWITCH_INTERVAL = 0.001
"""plugin.server.SWITCH_INTERVAL (not imported: that would load flask into every run)."""
MiB = 1 << 20
PASSWORD = "pyvol-bench-password"  # noqa: S105 -- restic repository password, bench only
SCENARIOS = ("full push", "no-change push", "1% change push", "full restore")


# -- the trees ----------------------------------------------------------------------------

def make_small(root: Path, files: int, rng: random.Random) -> None:
    dirs = max(1, files // 100)
    for d in range(dirs):
        (root / f"dir{d:03d}").mkdir(parents=True)
    for i in range(files):
        size = rng.randint(1024, 15 * 1024)
        (root / f"dir{i % dirs:03d}" / f"file{i:05d}.bin").write_bytes(os.urandom(size))


def change_small(root: Path, rng: random.Random) -> None:
    paths = sorted(root.rglob("*.bin"))
    count = max(1, len(paths) // 100)
    picked = rng.sample(paths, count + 5)
    for path in picked[:count]:
        path.write_bytes(os.urandom(path.stat().st_size))
    for path in picked[count:]:
        path.unlink()
    for i in range(5):
        (root / "dir000" / f"new{i}.bin").write_bytes(os.urandom(8192))


def make_large(root: Path, files: int, size: int) -> None:
    root.mkdir(parents=True)
    for i in range(files):
        with open(root / f"big{i}.bin", "wb") as f:
            for _ in range(size // (4 * MiB)):
                f.write(os.urandom(4 * MiB))


def change_large(root: Path, rng: random.Random) -> None:
    paths = sorted(root.glob("big*.bin"))
    total = sum(p.stat().st_size for p in paths)
    region = total // 100
    target = paths[0]
    offset = rng.randrange(0, target.stat().st_size - region)
    with open(target, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(region))
    paths[-1].unlink()
    (root / "added.bin").write_bytes(os.urandom(MiB))


def digest_tree(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.blake2b(path.read_bytes()).hexdigest()
    return out


# -- the tools ----------------------------------------------------------------------------

@dataclass
class Tool:
    name: str
    env: dict[str, str]
    push: Callable[[Path, str], list[str]]
    restore: Callable[[Path, str], list[str]]
    setup: Callable[[str], list[str]] | None = None
    cwd_is_src: bool = False
    daemon: Daemon | None = None


ENC = "pyvol-enc"


class Daemon:
    """pyvol as the plugin runs it: one long-lived process, one RemoteStore per volume."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def call(self, cmd: list[str]) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(cmd[-5:]) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if reply != "ok":
            raise RuntimeError(f"pyvol daemon: {reply or 'died'}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def tools(url: str, work: Path) -> list[Tool]:
    base = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
            "PATH": os.environ["PATH"], "HOME": str(work / "home")}
    penv = {**base, "S3_ENDPOINT_URL": url}

    eenv = {**penv, "S3_PASSPHRASE": PASSWORD}

    def pyvol(op: str, cache: str, mode: str = "plain") -> Callable[[Path, str], list[str]]:
        return lambda path, b: [sys.executable, __file__, "--pyvol", mode, op, str(path), b,
                                str(work / cache / b)]
    found = [Tool("pyvol", penv, pyvol("push", "daemon-cache"),
                  pyvol("restore", "daemon-cache"), daemon=Daemon(penv)),
             Tool(ENC, eenv, pyvol("push", "enc-cache", "enc"),
                  pyvol("restore", "enc-cache", "enc"), daemon=Daemon(eenv),
                  setup=lambda b: pyvol("prepare", "enc-cache", "enc")(work, b)),
             Tool("pyvol-cli", penv, pyvol("push", "cli-cache"), pyvol("restore", "cli-cache"))]
    if shutil.which("aws"):
        found.append(Tool(
            "aws s3 sync", base,
            push=lambda src, b: ["aws", "--endpoint-url", url, "s3", "sync", "--delete",
                                 "--only-show-errors", str(src), f"s3://{b}/v"],
            restore=lambda dst, b: ["aws", "--endpoint-url", url, "s3", "sync",
                                    "--only-show-errors", f"s3://{b}/v", str(dst)]))
    if shutil.which("rclone"):
        renv = {**base, "RCLONE_CONFIG": "/dev/null", "RCLONE_S3_PROVIDER": "Other",
                "RCLONE_S3_ENDPOINT": url, "RCLONE_S3_ACCESS_KEY_ID": ACCESS_KEY,
                "RCLONE_S3_SECRET_ACCESS_KEY": SECRET_KEY, "RCLONE_S3_REGION": "us-east-1"}
        flags = ["--fast-list", "--checksum", "--transfers", "8", "--checkers", "16", "-q"]
        found.append(Tool(
            "rclone sync", renv,
            push=lambda src, b: ["rclone", "sync", *flags, str(src), f":s3:{b}/v"],
            restore=lambda dst, b: ["rclone", "copy", *flags, f":s3:{b}/v", str(dst)]))
    if shutil.which("restic"):
        renv = {**base, "RESTIC_PASSWORD": PASSWORD,
                "RESTIC_CACHE_DIR": str(work / "restic-cache")}

        def repo(b: str) -> str:
            return f"s3:{url}/{b}/v"
        opts = ["-o", "s3.connections=8"]
        found.append(Tool(
            "restic", renv,
            setup=lambda b: ["restic", "-r", repo(b), "init", "-q", "--repository-version",
                             "2"],
            push=lambda src, b: ["restic", "-r", repo(b), "backup", "-q", *opts, "."],
            restore=lambda dst, b: ["restic", "-r", repo(b), "restore", "-q", "-o",
                                    "s3.connections=8", "latest", "--target", str(dst)],
            cwd_is_src=True))
    return found


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None,
        daemon: Daemon | None = None) -> float:
    os.sync()  # dirty pages of the previous step must not slow this one down
    started = time.perf_counter()
    if daemon is not None:
        daemon.call(cmd)
        return time.perf_counter() - started
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


@dataclass
class Cell:
    seconds: float
    uploaded: int
    ok: bool = True


@dataclass
class Results:
    """Every round's cell; the table shows, per cell, the round with the median time."""

    rounds: dict[tuple[str, str, str], list[Cell]] = field(default_factory=dict)

    def add(self, key: tuple[str, str, str], cell: Cell) -> None:
        self.rounds.setdefault(key, []).append(cell)

    @property
    def cells(self) -> dict[tuple[str, str, str], Cell]:
        out = {}
        for key, cells in self.rounds.items():
            ordered = sorted(cells, key=lambda c: c.seconds)
            middle = ordered[(len(ordered) - 1) // 2]
            out[key] = Cell(middle.seconds, middle.uploaded, all(c.ok for c in cells))
        return out


def bench_tree(label: str, src: Path, change: Callable[[], None], tool_list: list[Tool],
               moto: MotoServer, relay: Relay, work: Path, results: Results,
               round_no: int = 0) -> None:
    s3 = moto.client()
    buckets = {}
    for tool in tool_list:
        bucket = f"bench-{label[0]}{round_no}-{tool.name.split()[0].lower()}"
        s3.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        buckets[tool.name] = bucket
        if tool.setup is not None:
            run(tool.setup(bucket), tool.env, daemon=tool.daemon)

    def push_all(scenario: str) -> None:
        for tool in tool_list:
            relay.reset()
            seconds = run(tool.push(src, buckets[tool.name]), tool.env,
                          cwd=src if tool.cwd_is_src else None, daemon=tool.daemon)
            uploaded = relay.reset().uploaded
            results.add((label, scenario, tool.name), Cell(seconds, uploaded))
            print(f"  {label:10} {scenario:16} {tool.name:12} {seconds:7.2f}s "
                  f"{uploaded / MiB:9.2f} MiB", flush=True)

    push_all("full push")
    push_all("no-change push")
    change()
    push_all("1% change push")
    expected = digest_tree(src)
    for tool in tool_list:
        dst = work / f"restore-{label[0]}{round_no}-{tool.name.split()[0]}"
        dst.mkdir()
        relay.reset()
        seconds = run(tool.restore(dst, buckets[tool.name]), tool.env, daemon=tool.daemon)
        relay.reset()
        ok = digest_tree(dst) == expected
        results.add((label, "full restore", tool.name), Cell(seconds, 0, ok))
        print(f"  {label:10} {'full restore':16} {tool.name:12} {seconds:7.2f}s "
              f"{'ok' if ok else 'MISMATCH'}", flush=True)


def table(results: Results, tool_list: list[Tool], labels: list[str]) -> str:
    names = [t.name for t in tool_list]
    peers = [n for n in names if not n.startswith("pyvol")]
    head = (f"| tree | scenario | {' | '.join(names)} | enc/plain (<= 1.1) "
            "| enc/best peer (<= 1.0) | plain/best peer |")
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for label in labels:
        for scenario in SCENARIOS:
            cells = {n: results.cells.get((label, scenario, n)) for n in names}
            row = []
            for n in names:
                c = cells[n]
                if c is None:
                    row.append("-")
                elif scenario == "full restore":
                    row.append(f"{c.seconds:.2f} s" + ("" if c.ok else " (WRONG)"))
                else:
                    row.append(f"{c.seconds:.2f} s, {c.uploaded / MiB:.2f} MiB")
            peer_cells = [c for p in peers if (c := cells[p]) is not None and c.ok]
            enc, plain = cells.get(ENC), cells.get("pyvol")
            versus = _ratio(enc, [plain] if plain is not None else [], scenario)
            ratios = [versus] + [_ratio(cells.get(n), peer_cells, scenario)
                                 for n in (ENC, "pyvol")]
            lines.append(f"| {label} | {scenario} | {' | '.join(row)} | {' | '.join(ratios)} |")
    if any(key[1:] == ("1% change push", "restic") for key in results.cells):
        lines.append("")
        for label in labels:
            r = results.cells.get((label, "1% change push", "restic"))
            for n in ("pyvol", ENC):
                p = results.cells.get((label, "1% change push", n))
                if r and p and r.uploaded:
                    lines.append(f"1% change, {label}: {n} uploaded "
                                 f"{p.uploaded / r.uploaded:.2f}x restic's bytes")
    return "\n".join(lines)


def _ratio(mine: Cell | None, peers: list[Cell], scenario: str) -> str:
    if mine is None or not peers or not mine.ok:
        return "-"
    best_t = min(c.seconds for c in peers)
    text = f"time {mine.seconds / best_t:.2f}x"
    if scenario != "full restore":
        best_b = min(c.uploaded for c in peers)
        if best_b:
            text += f", bytes {mine.uploaded / best_b:.2f}x"
        else:
            text += f", bytes {mine.uploaded} B vs 0 B"
    return text


def _argon2_seconds() -> float:
    from s3sync import crypto, keys
    started = time.perf_counter()
    keys.wrap(crypto.new_master(), PASSWORD)
    return time.perf_counter() - started


# -- pyvol as its own process ---------------------------------------------------------------

def _passphrase(mode: str) -> str | None:
    return os.environ["S3_PASSPHRASE"] if mode == "enc" else None


def pyvol_main(mode: str, op: str, path: str, bucket: str, cache: str) -> None:
    from backends.tree import DirectoryView
    from s3sync import RemoteStore, S3Config
    store = RemoteStore(S3Config.from_env(), bucket, "v", Path(cache),
                        passphrase=_passphrase(mode))
    if op == "push":
        store.push(DirectoryView(Path(path)))
    elif op == "prepare":
        store.prepare()
    else:
        store.restore("latest", Path(path))


def serve() -> None:
    """The daemon side: one line per command (MODE OP PATH BUCKET CACHE), answers "ok"."""
    from backends.tree import DirectoryView
    from s3sync import RemoteStore, S3Config
    sys.setswitchinterval(SWITCH_INTERVAL)
    config = S3Config.from_env()
    stores: dict[str, RemoteStore] = {}
    for line in sys.stdin:
        mode, op, path, bucket, cache = line.split()
        try:
            store = stores.get(bucket) or stores.setdefault(bucket, RemoteStore(
                config, bucket, "v", Path(cache), passphrase=_passphrase(mode)))
            if op == "push":
                store.push(DirectoryView(Path(path)))
            elif op == "prepare":
                store.prepare()
            else:
                store.restore("latest", Path(path))
            print("ok", flush=True)
        except Exception as exc:
            print(f"error {exc}".replace("\n", " "), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small trees, for a dry run")
    parser.add_argument("--only", default="", help="comma-separated tool names to run")
    parser.add_argument("--trees", default="ab", help="which trees: a, b or ab")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each tree this many times (fresh trees and buckets) and show "
                             "each cell's median: one run on a shared machine moves cells by "
                             "up to 3x")
    parser.add_argument("--pyvol", nargs=5, metavar=("MODE", "OP", "PATH", "BUCKET", "CACHE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if args.pyvol:
        pyvol_main(*args.pyvol)
        return
    with workspace("pyvol-bench-") as (work, moto, relay):
        bench(args, work, moto, relay)


def bench(args: argparse.Namespace, work: Path, moto: MotoServer, relay: Relay) -> None:
    rng = random.Random(20240601)
    (work / "home").mkdir()
    results = Results()
    started = time.perf_counter()
    tool_list: list[Tool] = []
    try:
        tool_list = tools(relay.url, work)
        if args.only:
            wanted = set(args.only.split(","))
            tool_list = [t for t in tool_list
                         if t.name.split()[0] in wanted or t.name.startswith("pyvol")]
        print("tools:", ", ".join(t.name for t in tool_list), flush=True)
        labels = []
        if "a" in args.trees:
            labels.append("a: 10k files")
        if "b" in args.trees:
            labels.append("b: 8x64MiB")
        for round_no in range(args.rounds):
            if args.rounds > 1:
                print(f"round {round_no + 1} of {args.rounds}", flush=True)
            shift = round_no % len(tool_list)
            order = tool_list[shift:] + tool_list[:shift]
            for label in labels:
                src = work / "tree"
                shutil.rmtree(src, ignore_errors=True)
                if label.startswith("a"):
                    make_small(src, 1000 if args.quick else 10_000, rng)
                    bench_tree(label, src, partial(change_small, src, rng), order, moto,
                               relay, work, results, round_no)
                else:
                    make_large(src, 8, (8 if args.quick else 64) * MiB)
                    bench_tree(label, src, partial(change_large, src, rng), order, moto,
                               relay, work, results, round_no)
        print()
        if args.rounds > 1:
            print(f"each cell: the median of {args.rounds} rounds")
        print(table(results, tool_list, labels))
        if any(t.name == ENC for t in tool_list):
            print(f"\n{ENC}'s key is made in set-up, as at volume create (one Argon2id, "
                  f"{_argon2_seconds():.2f} s here); restic's init is set-up too")
        print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    finally:
        for tool in tool_list:
            if tool.daemon is not None:
                tool.daemon.close()


if __name__ == "__main__":
    main()
