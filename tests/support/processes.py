"""Processes seen through /proc (alive or not, memory), and kill -9 as an OOM killer or a power
cut delivers it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Collection
from pathlib import Path

from tests.support.waiting import wait_for


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie (exited, not reaped yet) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill9(master: subprocess.Popen[bytes], workers: Collection[int],
          timeout: float = 10) -> None:
    """SIGKILL ``master``, then its ``workers`` by PID: nothing runs its cleanup.  The master
    goes first, else it would start a new worker.  Returns once none of them is alive."""
    master.kill()
    master.wait(timeout)
    for pid in sorted(workers):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout,
             "the killed workers to exit")


def peak_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes: its resident memory now, and the peak of it."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


def rss(pid: int) -> int:
    """The resident memory of ``pid`` in bytes (VmRSS)."""
    return peak_rss(pid)[0]


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


CAP_SYS_RESOURCE = 24
"""What growing a mounted ext4 needs (EXT4_IOC_RESIZE_FS)."""


def has_capability(bit: int) -> bool:
    """Whether capability ``bit`` is in this process's effective set."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    raise AssertionError("no CapEff in /proc/self/status")
