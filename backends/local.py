"""The ``local`` backend: each volume is a plain directory ``<root>/volumes/<name>``.

Create builds the directory under ``.creating/`` and renames it into place; remove renames
it into ``.removing/.<random>/NAME`` (its own bin: a volume created again under the same name
and removed again never collides), and :meth:`LocalBackend.purge` deletes it later, in the
background.  A rename is atomic, so after a crash a volume directory is complete or absent,
and :meth:`LocalBackend.recover` clears the leftovers (staged removals are left to ``purge``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from backends import btrfs
from backends.base import BackendOption, Capabilities, DirSpec, Populate, Resized
from backends.errors import BackendError
from backends.fs import (
    confined,
    fsync_dir,
    make_private,
    move_to_bin,
    raise_fd_limit,
    remove_tree,
)
from backends.usage import UsageCache

log = logging.getLogger(__name__)


class LocalBackend:
    name: ClassVar[str] = "local"
    capabilities: ClassVar[Capabilities] = Capabilities(
        size_limit=False, online_resize=False, plain_directory=True,
        snapshot_methods=("reflink-or-copy", "btrfs-snapshot"))
    options: ClassVar[tuple[BackendOption, ...]] = ()

    def __init__(self, root: Path, usage: UsageCache | None = None) -> None:
        self.root = root / "volumes"
        self._creating = root / "volumes" / ".creating"
        self._removing = root / "volumes" / ".removing"
        self._replacing = root / "volumes" / ".replacing"
        # Private (0700), and narrowed if found wider: no host user but root may reach
        # volume data (a setuid file in a volume would run for them).  Containers reach a
        # volume through its bind mount, which the parents' mode does not limit.
        for d in (root, self.root, self._creating, self._removing, self._replacing):
            make_private(d)
        raise_fd_limit()  # walks hold one descriptor per level of a volume's tree
        self._usage = usage or UsageCache()
        self._in_use: set[str] = set()
        self.subvolumes = btrfs.is_btrfs(self.root)
        """On btrfs every volume is a subvolume, so snapshots of it are atomic and O(1)."""

    def _new_dir(self, path: Path) -> None:
        if self.subvolumes:
            btrfs.create_subvolume(path)
            os.chmod(path, 0o700)
        else:
            path.mkdir(mode=0o700)

    def path(self, volume: str) -> Path:
        return confined(self.root, volume)

    def exists(self, volume: str) -> bool:
        return self.path(volume).is_dir()

    @contextmanager
    def view(self, volume: str) -> Iterator[Path]:
        path = self.path(volume)
        if not path.is_dir():
            raise BackendError(f"the data directory {path} of volume {volume!r} is missing")
        yield path

    def size(self, volume: str) -> int | None:
        return None

    def resize(self, volume: str, size: int) -> Resized:
        raise BackendError(
            f"volume {volume!r} has no size limit (backend {self.name}) and cannot be resized: "
            "create a sized volume with -o size=SIZE and from={volume} to copy it")

    def create(self, volume: str, spec: DirSpec, populate: Populate | None = None) -> None:
        final = self.path(volume)
        if final.exists():
            raise BackendError(f"directory {final} already exists; remove it or pick another name")
        staging = confined(self._creating, volume)
        remove_tree(staging)
        self._new_dir(staging)
        try:
            if populate is not None:
                populate(staging)
            if spec.uid is not None or spec.gid is not None:
                os.chown(staging, -1 if spec.uid is None else spec.uid,
                         -1 if spec.gid is None else spec.gid)
            if populate is None or spec.mode != DirSpec.mode:
                os.chmod(staging, spec.mode)
            os.rename(staging, final)
            fsync_dir(self.root)
        except BaseException as exc:
            remove_tree(staging)
            if isinstance(exc, OSError):
                raise BackendError(
                    f"cannot create the directory of volume {volume!r}: {exc}") from exc
            raise

    def replace(self, volume: str, populate: Populate) -> None:
        """Build the new content in ``.replacing/NAME/partial``, mark it ready, then swap.

        After a crash, :meth:`recover` drops a partial build and completes a ready one.
        """
        final = self.path(volume)
        work = confined(self._replacing, volume)
        partial, ready = work / "partial", work / "ready"
        remove_tree(work)
        work.mkdir(mode=0o700)
        self._new_dir(partial)
        try:
            populate(partial)
            os.rename(partial, ready)
            fsync_dir(work)
        except BaseException:
            remove_tree(work)
            raise
        self._swap_in(volume, ready, final)

    def _swap_in(self, volume: str, ready: Path, final: Path) -> None:
        doomed = confined(self._removing, volume)
        remove_tree(doomed)
        if final.exists():
            os.rename(final, doomed)
        os.rename(ready, final)
        fsync_dir(self.root)
        remove_tree(doomed)
        remove_tree(ready.parent)
        self._usage.forget(final)

    def remove(self, volume: str) -> None:
        """Take the volume away in one rename, whatever its size; :meth:`purge` deletes it."""
        final = self.path(volume)
        if not final.exists():
            return
        try:
            move_to_bin(final, self._removing, volume)
        except OSError as exc:
            raise BackendError(f"cannot remove the data of volume {volume!r}: {exc}") from exc
        self._usage.forget(final)

    def purge(self) -> None:
        """Delete the data of removed volumes (slow: run it in the background)."""
        for entry in os.scandir(self._removing):
            if entry.name.startswith("."):
                remove_tree(Path(entry.path))

    def mount(self, volume: str) -> Path:
        path = self.path(volume)
        if not path.is_dir():
            raise BackendError(
                f"the data directory {path} of volume {volume!r} is missing: restore it from a "
                "backup or remove the volume with `docker volume rm`"
            )
        self._in_use.add(volume)
        self._usage.cancel(path)  # a walk competes with the container for the directories
        return path

    def unmount(self, volume: str) -> None:
        # Data likely changed while mounted: measure again on the next Get.
        self._in_use.discard(volume)
        self._usage.invalidate(self.path(volume))

    def status(self, volume: str) -> dict[str, Any]:
        path = self.path(volume)
        if not path.is_dir():
            return {"state": "missing", "path": str(path)}
        # While containers use the volume its size is not re-measured (a walk competes with
        # them for the directories, whatever its priority): Status shows the measurement of
        # when it was last at rest, with its time.  At rest it is refreshed after 30 s.
        usage = self._usage.get(path, float("inf") if volume in self._in_use else None)
        return {
            "size_bytes": None if usage is None else usage.size_bytes,
            "entries": None if usage is None else usage.entries,
            "size_measured_at": None if usage is None else usage.measured_at.isoformat(),
        }

    def names(self) -> set[str]:
        return {
            entry.name
            for entry in os.scandir(self.root)
            if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False)
        }

    def recover(self) -> set[str]:
        for entry in os.scandir(self._replacing):
            ready = Path(entry.path) / "ready"
            if ready.is_dir():
                log.info("completing the interrupted content swap of volume %s", entry.name)
                self._swap_in(entry.name, ready, self.path(entry.name))
            else:
                log.info("discarding %s: its build did not complete", entry.path)
                remove_tree(Path(entry.path))
        for entry in os.scandir(self._creating):
            log.info("discarding %s: its create did not complete", entry.path)
            remove_tree(Path(entry.path))
        interrupted: set[str] = set()
        for entry in os.scandir(self._removing):
            if entry.name.startswith("."):  # a bin: its deletion is left to purge()
                interrupted.update(e.name for e in os.scandir(entry.path))
                continue
            log.info("finishing the interrupted removal of %s", entry.path)
            remove_tree(Path(entry.path))
            interrupted.add(entry.name.split("@", 1)[0])
        return interrupted
