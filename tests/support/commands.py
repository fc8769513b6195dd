"""How the engine tiers show a command that did not do what they expected."""

from __future__ import annotations

import shlex
import subprocess


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """The command, its exit code and the ends of its stdout and stderr."""
    return (f"`{shlex.join(str(a) for a in result.args)}` exited {result.returncode}\n"
            f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
