"""Micro-benchmark: sealing and unsealing next to zstd, and the cost of a passphrase.

Not a test.  Run from the repository root::

    python bench/crypto_micro.py            # 8 MiB objects, 15 rounds
    python bench/crypto_micro.py --rounds 5

Prints MB/s (median of the rounds) for zstd compress (level 3, as packs use it), seal and
unseal of an 8 MiB object, for random and for compressible content; per-object cost of
sealing a small (4 KiB) blob; and the seconds one Argon2id run at the default cost takes
(what each key tried costs when a store is opened).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s3sync import blobs, crypto, keys

MiB = 1 << 20


def text_like(size: int) -> bytes:
    """Log-like lines from a small vocabulary and random numbers (zstd -3 gets about 3.7:1)."""
    rng = random.Random(1)
    vocab = [f"{w}".encode() for w in ("volume", "mount", "snapshot", "push", "restore", "pack",
                                       "blob", "error", "ok", "GET", "PUT", "bytes", "ms")]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(vocab) for _ in range(8)) + b" %d\n" % rng.getrandbits(24)
    return bytes(out[:size])


def median_seconds(op: Callable[[], object], rounds: int) -> float:
    op()  # warm up: first touches of fresh buffers fault pages in
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size-mib", type=int, default=8)
    args = parser.parse_args()
    size = args.size_mib * MiB
    master = crypto.new_master()
    contents = {
        "random": os.urandom(size),
        "text-like": text_like(size),
    }
    print(f"{args.size_mib} MiB objects, median of {args.rounds} rounds, MB/s (10^6 B/s)")
    for label, data in contents.items():
        sealed = crypto.seal(master, "blob", "b", data)
        ops: dict[str, Callable[[], object]] = {
            "zstd compress": partial(blobs.compress, data),
            "seal": partial(crypto.seal, master, "blob", "b", data),
            "unseal": partial(crypto.unseal, master, "blob", "b", sealed),
            "content id": partial(crypto.content_id, master, data),
        }
        for name, op in ops.items():
            seconds = median_seconds(op, args.rounds)
            print(f"  {label:10} {name:14} {size / seconds / 1e6:9.0f}")

    small = os.urandom(4096)
    seconds = median_seconds(lambda: [crypto.seal(master, "blob", "b", small)
                                      for _ in range(1000)], 5)
    print(f"4 KiB blob: seal {seconds / 1000 * 1e6:.1f} us each "
          f"(overhead {crypto.HEADER + crypto.TAG} bytes)")

    cost = keys.DEFAULT_COST
    start = time.perf_counter()
    key_id, blob = keys.wrap(master, "bench passphrase")
    wrap_s = time.perf_counter() - start
    runs = [0.0] * 5
    for i in range(len(runs)):
        start = time.perf_counter()
        keys.unwrap(blob, "bench passphrase", key_id)
        runs[i] = time.perf_counter() - start
    print(f"Argon2id {cost.memory_kib >> 10} MiB, {cost.iterations} passes, "
          f"{cost.lanes} lanes: wrap {wrap_s:.2f} s, unwrap median "
          f"{statistics.median(runs):.2f} s (min {min(runs):.2f}, max {max(runs):.2f})")


if __name__ == "__main__":
    main()
