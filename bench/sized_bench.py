#!/usr/bin/env python3
"""Sized-volume benchmark: a plain directory next to an ext4 filesystem in a sparse image on a
loop device, on this host's disk, side by side in one run.

Not a test: it prints a table.  Needs root (loop devices, mount, drop_caches) and mkfs.ext4.

    python3 bench/sized_bench.py [--quick] [--rounds 3] [--own-attach | --direct-io] [--dir D]

``plain`` is a volume of ``backends.local.LocalBackend``.  ``sized`` is a volume of
``backends.image.ImageBackend`` when that module exists; otherwise (or with ``--own-attach``)
the minimal attach code below: a sparse image made with the same mkfs.ext4 flags, bound to a
free loop device (LOOP_CTL_GET_FREE, LOOP_CONFIGURE with autoclear) and mounted; unmounting
frees the device; ``--direct-io`` adds LO_FLAGS_DIRECT_IO to it, so the loop device does
O_DIRECT I/O on the image instead of caching every page twice (in the volume's filesystem
and in the image file's).  The header says which one ran.  Both live under one temporary
root on the same host filesystem (``--dir``), and every round measures plain then sized, so
drifts in the virtual disk's speed hit both alike; the table shows the fastest round of each.

- ``seq write``: one file of ``--mib`` MiB in 1 MiB writes, then fsync (in the time);
- ``seq read``: the same file after ``sync`` and ``echo 3 > /proc/sys/vm/drop_caches``,
  which drops the loop device's and the image file's cached pages alike;
- ``small files``: ``--files`` files of 1 KiB in 100 directories, timed when written and
  after syncfs.  syncfs flushes the whole filesystem: for plain that is the host's, with
  whatever else is dirty on it, for sized only the volume's own, so the synced ratio
  flatters sized on a busy host;
- ``cycle``: create + mount + unmount + remove of a volume (``--cycle-size`` for sized),
  the part of ``docker volume create`` / ``run`` / ``rm`` a backend owns; the median of
  ``--cycles``.  Deleting the removed data (``purge``, run in the background by the plugin)
  is not timed.

Ratios are sized / plain, times over times: above 1 means the sized volume is slower.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import importlib
import os
import shutil
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
try:  # the installed package (make .venv/.installed), or PYTHONPATH=<a worktree>
    import backends  # noqa: F401
except ImportError:
    sys.path.append(str(REPO))

from backends.base import DirSpec  # noqa: E402
from backends.fs import syncfs  # noqa: E402
from backends.local import LocalBackend  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


class Volumes(Protocol):
    def create(self, volume: str, spec: DirSpec) -> None: ...
    def mount(self, volume: str) -> Path: ...
    def unmount(self, volume: str) -> None: ...
    def remove(self, volume: str) -> None: ...
    def purge(self) -> None: ...


# -- the minimal attach code, when backends.image is not there --------------------------

LOOP_SET_FD, LOOP_CLR_FD, LOOP_SET_STATUS64, LOOP_CONFIGURE = 0x4C00, 0x4C01, 0x4C04, 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO = 4, 16
INFO64 = struct.Struct("<QQQQQIIII64s64s32sQQ")
MKFS = ("mkfs.ext4", "-F", "-q", "-m", "0", "-b", "4096",
        "-E", "lazy_itable_init=1,lazy_journal_init=1")
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _node(path: str, kind: int, major: int, minor: int) -> str:
    """The device node, made if missing (a managed plugin's /dev is a tmpfs)."""
    with contextlib.suppress(FileExistsError):
        os.mknod(path, 0o600 | kind, os.makedev(major, minor))
    return path


def _attach(image: Path, direct_io: bool) -> tuple[str, int]:
    """Bind ``image`` to a free loop device with autoclear; return it and an open fd of it,
    to keep until mounted (the device frees itself when its last user goes)."""
    control = os.open(_node("/dev/loop-control", stat.S_IFCHR, 10, 237), os.O_RDWR)
    image_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(8):
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            dev = _node(f"/dev/loop{number}", stat.S_IFBLK, 7, number)
            fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_DIRECT_IO if direct_io else 0)
            info = INFO64.pack(0, 0, 0, 0, 0, number, 0, 0, flags, b"", b"", b"", 0, 0)
            try:
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, struct.pack("<II", image_fd, 0)
                                + info + bytes(64))
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOTTY):  # before Linux 5.8
                        raise
                    fcntl.ioctl(fd, LOOP_SET_FD, image_fd)
                    fcntl.ioctl(fd, LOOP_SET_STATUS64, info)
                return dev, fd
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EBUSY:  # EBUSY: someone took it first
                    raise
        raise OSError(errno.EBUSY, "no free loop device")
    finally:
        os.close(image_fd)
        os.close(control)


class OwnImages:
    """Sized volumes the simplest way: ``<root>/images/NAME`` mounted on ``.mnt/NAME``."""

    def __init__(self, root: Path, size: int, direct_io: bool) -> None:
        self.root = root / "images"
        (self.root / ".mnt").mkdir(parents=True, mode=0o700)
        self.size = size
        self.direct_io = direct_io

    def create(self, volume: str, spec: DirSpec) -> None:
        image = self.root / volume
        with open(image, "xb") as f:
            f.truncate(spec.params.get("size", self.size))
        subprocess.run([*MKFS, str(image)], check=True)
        with contextlib.suppress(FileNotFoundError):  # as ImageBackend: an empty root
            os.rmdir(self.mount(volume) / "lost+found")
        self.unmount(volume)
        with open(image, "rb") as f:
            os.fsync(f.fileno())

    def mount(self, volume: str) -> Path:
        target = self.root / ".mnt" / volume
        target.mkdir(mode=0o700, exist_ok=True)
        dev, fd = _attach(self.root / volume, self.direct_io)
        try:
            _check(_libc.mount(dev.encode(), str(target).encode(), b"ext4", 0, None),
                   f"mount {dev}")
        finally:
            os.close(fd)
        return target

    def unmount(self, volume: str) -> None:
        target = self.root / ".mnt" / volume
        _check(_libc.umount2(str(target).encode(), 0), f"umount {target}")
        target.rmdir()

    def remove(self, volume: str) -> None:
        os.unlink(self.root / volume)

    def purge(self) -> None:
        pass


def sized_backend(root: Path, size: int, own: bool, direct_io: bool) -> tuple[Volumes, str]:
    if not own and not direct_io:
        try:  # by name: the image backend may not be on this branch yet
            image = importlib.import_module("backends.image")
        except ImportError:
            pass
        else:
            return image.ImageBackend(root), "backends.image.ImageBackend"
    how = "the bench's own attach code" + (", loop direct I/O" if direct_io else "")
    return OwnImages(root, size, direct_io), how + ("" if own or direct_io else
                                                    " (no backends.image)")


# -- measurements ------------------------------------------------------------------------


@dataclass
class Sample:
    write: float
    read: float
    files: float
    files_synced: float
    cycle: float


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def seq_write(path: Path, mib: int) -> None:
    block = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)


def seq_read(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, MiB):
            pass
    finally:
        os.close(fd)


def small_files(root: Path, count: int) -> float:
    """Seconds until the files are written (page cache); the caller times the syncfs too."""
    started = time.perf_counter()
    payload = b"x" * 1024
    for i in range(count):
        d = root / f"d{i % 100:02d}"
        if i < 100:
            d.mkdir()
        fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    written = time.perf_counter() - started
    syncfs(root)
    return written


def measure(volumes: Volumes, spec: DirSpec, cycle_spec: DirSpec, args: argparse.Namespace,
            tag: str) -> Sample:
    volumes.create(f"{tag}-data", spec)
    path = volumes.mount(f"{tag}-data")
    try:
        drop_caches()
        write = timed(lambda: seq_write(path / "big", args.mib))
        drop_caches()
        read = timed(lambda: seq_read(path / "big"))
        os.mkdir(path / "small")
        drop_caches()
        started = time.perf_counter()
        files = small_files(path / "small", args.files)
        files_synced = time.perf_counter() - started
    finally:
        volumes.unmount(f"{tag}-data")
    volumes.remove(f"{tag}-data")
    volumes.purge()
    cycles = []
    for i in range(args.cycles):
        name = f"{tag}-cycle{i}"
        drop_caches()

        def cycle(name: str = name) -> None:
            volumes.create(name, cycle_spec)
            volumes.mount(name)
            volumes.unmount(name)
            volumes.remove(name)
        cycles.append(timed(cycle))
        volumes.purge()
    return Sample(write, read, files, files_synced, statistics.median(cycles))


def best(samples: list[Sample]) -> Sample:
    return Sample(*(min(getattr(s, f) for s in samples)
                    for f in ("write", "read", "files", "files_synced", "cycle")))


def report(plain: Sample, sized: Sample, args: argparse.Namespace, how: str,
           seconds: float) -> None:
    print(f"pyvol sized-volume benchmark ({seconds:.0f} s, best of {args.rounds} rounds); "
          f"sized = {how}")
    print(f"host filesystem of both: {args.fs}; kernel {os.uname().release}")
    print()
    rows = [
        (f"seq write {args.mib} MiB + fsync", "write", args.mib),
        (f"seq read {args.mib} MiB (cold)", "read", args.mib),
        (f"{args.files:,} files of 1 KiB, written", "files", None),
        (f"{args.files:,} files of 1 KiB + syncfs", "files_synced", None),
        (f"cycle: create+mount+unmount+remove (median of {args.cycles}, sized "
         f"{args.cycle_size // GiB} GiB)", "cycle", None),
    ]
    width = max(len(r[0]) for r in rows)
    header = f"{'':{width}} {'plain s':>9} {'sized s':>9} {'plain MiB/s':>12} " \
             f"{'sized MiB/s':>12} {'sized/plain':>12}"
    print(header)
    print("-" * len(header))
    for label, field_, mib in rows:
        p, s = getattr(plain, field_), getattr(sized, field_)
        rate = (f"{mib / p:12.0f} {mib / s:12.0f}" if mib else f"{'-':>12} {'-':>12}")
        print(f"{label:{width}} {p:9.3f} {s:9.3f} {rate} {s / p:12.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="256 MiB, 2,000 files, 3 cycles, 1 round (about 30 s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat everything; the table shows the fastest round")
    parser.add_argument("--mib", type=int, default=1024, help="size of the sequential file")
    parser.add_argument("--files", type=int, default=10_000, help="small files to create")
    parser.add_argument("--cycles", type=int, default=10, help="create..remove cycles per round")
    parser.add_argument("--cycle-size", type=int, default=10, metavar="GIB",
                        help="size of the sized volumes of the cycles, GiB")
    parser.add_argument("--own-attach", action="store_true",
                        help="the bench's own loop code even if backends.image exists")
    parser.add_argument("--direct-io", action="store_true",
                        help="own attach code with LO_FLAGS_DIRECT_IO: the loop device reads "
                        "and writes the image with O_DIRECT, not through the page cache")
    parser.add_argument("--dir", default="/var/tmp", help="where the temporary root goes")
    args = parser.parse_args()
    if args.quick:
        args.mib, args.files, args.cycles, args.rounds = 256, 2000, 3, 1
    args.cycle_size *= GiB
    if os.geteuid() != 0:
        print("sized_bench: needs root (loop devices, mount, drop_caches)", file=sys.stderr)
        return 2
    if shutil.which("mkfs.ext4") is None:
        print("sized_bench: mkfs.ext4 is missing (apt-get install e2fsprogs)", file=sys.stderr)
        return 2
    data_size = max(2 * args.mib * MiB + args.files * 8192, GiB)
    spec, cycle_spec = DirSpec(params={"size": data_size}), DirSpec(params={"size":
                                                                            args.cycle_size})
    args.fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", args.dir], capture_output=True,
                             text=True, check=False).stdout.strip()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pyvol-sized-bench-", dir=args.dir) as work:
        plain_volumes = LocalBackend(Path(work) / "plain")
        sized_volumes, how = sized_backend(Path(work) / "sized", data_size, args.own_attach,
                                            args.direct_io)
        plains: list[Sample] = []
        sizeds: list[Sample] = []
        for r in range(args.rounds):
            print(f"... round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            plains.append(measure(plain_volumes, DirSpec(), DirSpec(), args, f"p{r}"))
            sizeds.append(measure(sized_volumes, spec, cycle_spec, args, f"s{r}"))
    report(best(plains), best(sizeds), args, how, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
