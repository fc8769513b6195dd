"""The contract every storage backend meets, checked by tests/unit/test_backend_contract.py.

A backend stores volumes by name under its own root.  Its operations are crash-safe: after
a kill -9 at any instant, a volume's directory is either complete or absent once
:meth:`Backend.recover` has run.  Names given to a backend are already validated by the
plugin; backends still confine every path they build (``backends.fs.confined``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Populate = Callable[[Path], None]
"""Fills a new, empty directory with a volume's initial content (clone, restore)."""


@dataclass(frozen=True)
class DirSpec:
    """Ownership and permissions of a volume's root directory."""

    uid: int | None = None
    gid: int | None = None
    mode: int = 0o755


class Backend(Protocol):
    """One volume store.  Every method names the volume it acts on."""

    def create(self, volume: str, spec: DirSpec, populate: Populate | None = None) -> None:
        """Create a volume, empty or filled by ``populate``; all or nothing.

        Raises ``BackendError`` if it already exists.
        """

    def replace(self, volume: str, populate: Populate) -> None:
        """Swap the volume's content for what ``populate`` builds; all or nothing."""

    def remove(self, volume: str) -> None:
        """Take the volume away at once, whatever its size (its data goes to a staging area
        that :meth:`purge` empties).  The name is free again on return.  Idempotent: a
        missing volume is fine."""

    def purge(self) -> None:
        """Delete the data of removed volumes; slow, so run in the background.  What a
        crash interrupts, the next call finishes."""

    def path(self, volume: str) -> Path:
        """The directory holding the volume's data (it may not exist)."""

    def exists(self, volume: str) -> bool:
        """Whether the volume's data directory exists."""

    def mount(self, volume: str) -> Path:
        """Make the volume usable (first mount) and return its data directory."""

    def unmount(self, volume: str) -> None:
        """Release what ``mount`` set up (last unmount)."""

    def status(self, volume: str) -> dict[str, Any]:
        """Cheap facts for ``docker volume inspect``; never raises for an existing volume."""

    def names(self) -> set[str]:
        """Names of all volumes whose data directory exists."""

    def recover(self) -> set[str]:
        """Finish or roll back operations a crash interrupted.

        Returns the names whose removal was under way or whose data still waits for
        :meth:`purge`: the caller drops their records if no volume of that name exists.
        Never slow: the deletion of removed data is left to :meth:`purge`.
        """
