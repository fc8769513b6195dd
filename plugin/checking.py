"""`pyvol sync check` and what Status shows of the bucket's health.

The check itself lives in ``backends/s3/check.py``; this module runs it for a volume and
keeps, per volume, the last result (``Status.s3.last_check``) and the objects the last listing
skipped as invalid snapshots (``Status.s3.warnings``).  Results live in memory: a restart
forgets them until the next check or listing.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backends.s3 import CheckReport, RemoteStore

SHOWN = 5
"""Problems and warnings shown in Status (the full list is in the CLI's answer)."""


class Checks:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, dict[str, Any]] = {}

    def run(self, volume: str, remote: RemoteStore, read_data: bool) -> CheckReport:
        report = remote.verify(read_data)
        summary: dict[str, Any] = {"at": datetime.now(UTC).isoformat(), **report.to_json()}
        summary["first_problems"] = report.problems[:SHOWN]
        summary.pop("warnings", None)
        with self._lock:
            self._last[volume] = summary
        return report

    def forget(self, volume: str) -> None:
        with self._lock:
            self._last.pop(volume, None)

    def status(self, volume: str, remote: RemoteStore | None) -> dict[str, Any]:
        """Keys for ``Status.s3``: ``last_check`` once a check ran, ``warnings`` while the
        last listing skipped objects under ``snapshots/``."""
        out: dict[str, Any] = {}
        with self._lock:
            last = self._last.get(volume)
        if last is not None:
            out["last_check"] = last
        warnings = remote.warnings if remote is not None else []
        if warnings:
            out["warnings"] = [f"skipped {w}" for w in warnings[:SHOWN]] + (
                [f"... and {len(warnings) - SHOWN} more"] if len(warnings) > SHOWN else [])
        return out
