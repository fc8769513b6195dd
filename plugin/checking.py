"""`pyvol sync check` and what Status shows of the bucket's health.

The check itself lives in ``s3sync/check.py``; this module runs it for a volume and
keeps, per volume, the last result (``Status.s3.last_check``, in the state database: it
survives a restart, and goes with ``pyvol sync delete-remote``), and the objects the last
listing skipped as invalid snapshots (``Status.s3.warnings``, in memory until the next listing).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from plugin.state import StateStore

if TYPE_CHECKING:
    from s3sync import CheckReport, RemoteStore

SHOWN = 5
"""Problems and warnings shown in Status (the full list is in the CLI's answer)."""


class Checks:
    def __init__(self, state: StateStore) -> None:
        self._state = state

    def run(self, volume: str, where: tuple[str, str], remote: RemoteStore,
            read_data: bool) -> CheckReport:
        """Check the copy at ``where`` (bucket, prefix); a failure to keep the result fails
        the call."""
        report = remote.verify(read_data)
        summary: dict[str, Any] = {"at": datetime.now(UTC).isoformat(), **report.to_json()}
        summary["first_problems"] = report.problems[:SHOWN]
        summary.pop("warnings", None)
        self._state.put_check(volume, where, summary)
        return report

    def forget(self, volume: str) -> None:
        self._state.put_check(volume, ("", ""), None)

    def status(self, volume: str, where: tuple[str, str],
               remote: RemoteStore | None) -> dict[str, Any]:
        """Keys for ``Status.s3``: ``last_check`` once a check of this copy ran,
        ``warnings`` while the last listing skipped objects under ``snapshots/``."""
        out: dict[str, Any] = {}
        last = self._state.get_check(volume, where)
        if last is not None:
            out["last_check"] = last
        warnings = remote.warnings if remote is not None else []
        if warnings:
            out["warnings"] = [f"skipped {w}" for w in warnings[:SHOWN]] + (
                [f"... and {len(warnings) - SHOWN} more"] if len(warnings) > SHOWN else [])
        return out
