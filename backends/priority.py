"""Background work runs at idle CPU and I/O priority, so Docker's calls do not queue behind it.

Linux keeps the nice value and the I/O priority per thread, and a new thread inherits both
from the thread that starts it: a pool whose threads were started by a lowered thread is
lowered too.  Pools of background work pass :func:`lower_priority` as their initializer; a
request thread that runs a long management operation itself wraps it in :func:`lowered`,
which puts its priorities back afterwards (that needs root, which the plugin has: without
it nothing is lowered, so a request thread is never left slow).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_IDLE = 3
IOPRIO_CLASS_SHIFT = 13
SYS_IOPRIO = {"x86_64": (251, 252), "aarch64": (30, 31)}
"""(ioprio_set, ioprio_get) system call numbers."""
NICE_IDLE = 19


_NUMBERS = SYS_IOPRIO.get(os.uname().machine)
_LIBC = ctypes.CDLL(None, use_errno=True)


def _syscall(which: int, *args: int) -> int:
    if _NUMBERS is None:
        return -1
    result: int = _LIBC.syscall(_NUMBERS[which], *args)
    return result


def _set(tid: int, nice: int, ioprio: int) -> None:
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    _syscall(0, IOPRIO_WHO_PROCESS, tid, ioprio)


def lower_priority() -> None:
    """Idle CPU (nice 19) and I/O (class idle) priority for the calling thread, for good."""
    _set(threading.get_native_id(), NICE_IDLE, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT)


def _get(tid: int) -> tuple[int, int]:
    return os.getpriority(os.PRIO_PROCESS, tid), max(_syscall(1, IOPRIO_WHO_PROCESS, tid), 0)


def current() -> tuple[int, int]:
    """The calling thread's nice value and I/O priority class."""
    nice, ioprio = _get(threading.get_native_id())
    return nice, ioprio >> IOPRIO_CLASS_SHIFT


@contextlib.contextmanager
def lowered() -> Iterator[None]:
    """Run the block at idle priority, then restore the calling thread's priorities.

    Only where they can be restored (raising a nice value back needs CAP_SYS_NICE): as
    another user the block runs at the thread's own priority.
    """
    if os.geteuid() != 0:
        yield
        return
    tid = threading.get_native_id()
    nice, ioprio = _get(tid)
    lower_priority()
    try:
        yield
    finally:
        _set(tid, nice, ioprio)


@contextlib.contextmanager
def normal() -> Iterator[None]:
    """Run the block at normal priority even on a lowered thread, then lower it again.

    For work under a lock that Docker's calls need (a state database commit): a lowered
    holder, whose fsync would queue behind every other write on the disk, would make them
    wait as long.  Costs two system calls on a thread that is not lowered.
    """
    tid = threading.get_native_id()
    nice, ioprio = _get(tid)
    if nice <= 0 and ioprio >> IOPRIO_CLASS_SHIFT != IOPRIO_CLASS_IDLE:
        yield
        return
    _set(tid, 0, 0)  # raising the nice value back needs root; the I/O class never does
    try:
        yield
    finally:
        _set(tid, nice, ioprio)
