"""The contract every storage backend meets, checked by tests/unit/test_backend_contract.py.

A backend stores volumes by name under its own root.  Its operations are crash-safe: after
a kill -9 at any instant, a volume's directory is either complete or absent once
:meth:`Backend.recover` has run.  Names given to a backend are already validated by the
plugin; backends still confine every path they build (``backends.fs.confined``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

Populate = Callable[[Path], None]
"""Fills a new, empty directory with a volume's initial content (clone, restore)."""

Resized = Literal["online", "offline"]
"""How a resize was done: while the volume was mounted, or with its filesystem detached."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; features and the options parser ask, never guess."""

    size_limit: bool = False
    """Enforces ``-o size=``: writes past it fail with ENOSPC."""
    online_resize: bool = False
    """Grows a volume while containers use it."""
    plain_directory: bool = True
    """A volume's data is a plain directory even when not mounted (else only inside a
    :meth:`Backend.view` or between :meth:`Backend.mount` and :meth:`Backend.unmount`)."""
    snapshot_methods: tuple[str, ...] = ("copy",)
    """How snapshots of its volumes can be taken, preferred first."""


@dataclass(frozen=True)
class BackendOption:
    """A ``-o`` option that only one backend understands (``size`` for ``image``)."""

    name: str
    parse: Callable[[str], Any]
    """Value to typed value; raises ValueError whose message says what is expected."""
    help: str
    show: Callable[[Any], str] = str
    """Typed value back to text, for ``docker volume inspect`` and messages."""


@dataclass(frozen=True)
class DirSpec:
    """Ownership and permissions of a volume's root directory."""

    uid: int | None = None
    gid: int | None = None
    mode: int = 0o755
    params: Mapping[str, Any] = field(default_factory=dict)
    """The backend's own options, parsed (e.g. ``{"size": 10737418240}``)."""


class Backend(Protocol):
    """One volume store.  Every method names the volume it acts on.

    Features (snapshots, clones, S3 push and restore, usage) never assume a volume is a
    directory: they read it inside :meth:`view` and replace it with :meth:`replace`.
    """

    name: ClassVar[str]
    options: ClassVar[tuple[BackendOption, ...]]

    @property
    def capabilities(self) -> Capabilities:
        """An instance's: the class attribute (read by the options parser) holds what every
        host allows, and an instance may add what its host offers (``image-reflink``)."""

    def create(self, volume: str, spec: DirSpec, populate: Populate | None = None) -> None:
        """Create a volume, empty or filled by ``populate``; all or nothing.

        Raises ``BackendError`` if it already exists.
        """

    def view(self, volume: str) -> AbstractContextManager[Path]:
        """A readable directory of the volume's current content, valid until the context
        exits, whatever mounts and unmounts meanwhile (a view holds the data available).

        Raises ``BackendError`` if the volume's data is missing."""

    def size(self, volume: str) -> int | None:
        """The volume's size limit in bytes, or None if it has none."""

    def resize(self, volume: str, size: int) -> Resized:
        """Grow the volume to ``size`` bytes.  Raises ``BackendError`` for a shrink, or if the
        backend has no size limits."""

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
        """Where :meth:`mount` makes the volume's data visible (it may not exist)."""

    def exists(self, volume: str) -> bool:
        """Whether the volume's data directory exists."""

    def mount(self, volume: str) -> Path:
        """Make the volume usable (first mount) and return its data directory."""

    def unmount(self, volume: str) -> None:
        """Release what ``mount`` set up (last unmount); open views keep the data available."""

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


@dataclass(frozen=True)
class VolumeContent:
    """One volume's content as a feature sees it: read in a view, replaced by staging.

    Snapshots, clones and S3 sync get one of these, never a path or a backend."""

    backend: Backend
    volume: str

    def view(self) -> AbstractContextManager[Path]:
        return self.backend.view(self.volume)

    def replace(self, populate: Populate) -> None:
        self.backend.replace(self.volume, populate)

    def exists(self) -> bool:
        return self.backend.exists(self.volume)
