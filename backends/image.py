"""The ``image`` backend: each volume is a filesystem in a sparse image file, so its size
limit is enforced by the kernel (a write past it fails with ENOSPC).  ``-o fs=`` picks the
filesystem: ext4 (the default, :mod:`backends.ext4`) or XFS (:mod:`backends.xfs`, which
grows while mounted without CAP_SYS_RESOURCE).  Which one an image holds is read from its
superblock, so a restart, a replace or a restore needs no record of it.

Layout under ``<root>/images``: ``NAME`` is the image (no suffix: names may use all of
NAME_MAX), ``.mnt/NAME`` is where it is mounted while in use.  Create and replace build a
new image in ``.creating/NAME/`` or ``.replacing/NAME/`` and rename it into place; remove
renames it into a ``.removing/.<random>/`` bin that :meth:`ImageBackend.purge` empties.  A
rename is atomic, so after a crash an image is complete or absent, and
:meth:`ImageBackend.recover` unmounts and clears what a crash left staged.

Where the host filesystem can reflink (XFS with reflink=1, btrfs; probed at start), a volume
snapshots in O(1): :meth:`ImageBackend.clone_image` freezes its filesystem (FIFREEZE: flushed
and consistent), clones the image file (FICLONE: extents shared, no data copied) and thaws
it; :meth:`ImageBackend.open_image` mounts such a clone read-only at ``.clones/<random>``
to read it.  A freeze left by a crash would hang every writer: :meth:`ImageBackend.recover`
thaws every mounted volume.

Mounts are counted per volume: :meth:`mount` and :meth:`view` take a reference, and the
filesystem is unmounted when the last one is dropped (its autoclear loop device then frees
itself).  An image is never bound to two loop devices (``backends.loop``), and a mount at
``.mnt/NAME`` left by an earlier process is adopted, not mounted over.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from backends import ext4, loop, xfs
from backends.base import BackendOption, Capabilities, DirSpec, Populate, Resized
from backends.errors import BackendError
from backends.filesystems import Filesystem, ToolError, read_head, unmount
from backends.filesystems import mount as mount_fs
from backends.fs import (
    confined,
    fsync_dir,
    is_mountpoint,
    libc,
    make_private,
    move_to_bin,
    remove_tree,
    syncfs,
)
from backends.sizes import format_size, parse_size

log = logging.getLogger(__name__)

SIZE_HELP = ("size limit of the volume, such as 512M, 10G or 1.5T (binary units; at least "
             "32M, 300M with -o fs=xfs); writes past it fail with 'No space left on device'")
FS_HELP = ("filesystem of the volume: ext4 (default; at least 32M, about 4M on the host when "
           "empty, grows while in use only if the plugin has CAP_SYS_RESOURCE) or xfs (at "
           "least 300M, about 64M on the host when empty, always grows while in use)")
FILESYSTEMS: dict[str, Filesystem] = {"ext4": ext4, "xfs": xfs}
DEFAULT_FS = "ext4"
IMAGE_REFLINK = "image-reflink"
"""The snapshot method this backend offers where its host filesystem can reflink."""
FICLONE = 0x40049409
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
MS_RDONLY = 1
CLONE_OPTIONS = {"ext4": b"noload", "xfs": b"norecovery,nouuid"}
"""Mount options of a read-only clone: replay no journal (a frozen image needs none, and
the device is read-only); XFS also refuses a second filesystem with the UUID of a mounted
one unless told ``nouuid``."""


def parse_fs(text: str) -> str:
    name = text.strip().lower()
    if name not in FILESYSTEMS:
        raise ValueError(f"{text!r} must be ext4 or xfs")
    return name


def filesystem_of(image: Path) -> Filesystem | None:
    """The filesystem ``image`` holds, read from its superblock; None if none we know."""
    for fs in FILESYSTEMS.values():
        if fs.holds(image):
            return fs
    return None


def _short(size: int) -> str:
    """A size as -o size= takes it: ``300M``."""
    return format_size(size).replace(" ", "").removesuffix("iB")


class VolumeInUse(BackendError):
    """The volume is mounted; the operation needs it idle."""


class SizeShrink(BackendError):
    """A resize asked for a smaller size; neither ext4 (mounted) nor XFS can shrink."""


class MissingImage(BackendError):
    """A volume's image file is gone."""


class ImageBackend:
    name: ClassVar[str] = "image"
    capabilities: Capabilities = Capabilities(
        size_limit=True, online_resize=True, plain_directory=False, snapshot_methods=("copy",))
    """The class's: what every host allows (the options parser reads it).  An instance's
    adds ``image-reflink`` first where its images directory can reflink."""
    options: ClassVar[tuple[BackendOption, ...]] = (
        BackendOption("size", parse_size, SIZE_HELP, show=format_size),
        BackendOption("fs", parse_fs, FS_HELP))

    def __init__(self, root: Path) -> None:
        self.root = root / "images"
        self._mnt = self.root / ".mnt"
        self._creating = self.root / ".creating"
        self._replacing = self.root / ".replacing"
        self._removing = self.root / ".removing"
        self._clones = self.root / ".clones"
        for d in (root, self.root, self._mnt, self._creating, self._replacing, self._removing,
                  self._clones):
            make_private(d)
        if _can_reflink(self.root):
            self.capabilities = replace(
                self.capabilities,
                snapshot_methods=(IMAGE_REFLINK, *self.capabilities.snapshot_methods))
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._refs: dict[str, int] = {}
        self._busy: dict[str, str] = {}
        """Volumes an offline operation holds; they cannot be mounted meanwhile."""

    # where things are

    def image(self, volume: str) -> Path:
        """The volume's image file."""
        return confined(self.root, volume)

    def path(self, volume: str) -> Path:
        return confined(self._mnt, volume)

    def exists(self, volume: str) -> bool:
        return _is_file(self.image(volume))

    def names(self) -> set[str]:
        return {entry.name for entry in os.scandir(self.root)
                if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)}

    def _lock(self, volume: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(volume, threading.Lock())

    def _existing(self, volume: str) -> Path:
        self.path(volume)  # confines the mountpoint too
        image = self.image(volume)
        if not _is_file(image):
            raise MissingImage(
                f"the image {image} of volume {volume!r} is missing: restore it from a backup "
                "or remove the volume with `docker volume rm`")
        return image

    def _filesystem(self, volume: str, image: Path) -> Filesystem:
        fs = filesystem_of(image)
        if fs is None:
            raise BackendError(f"the image {image} of volume {volume!r} holds no ext4 or XFS "
                               "filesystem: restore it from a backup or remove the volume")
        return fs

    # mounts, counted

    def mount(self, volume: str) -> Path:
        return self._acquire(volume)

    def unmount(self, volume: str) -> None:
        self._release(volume)

    @contextmanager
    def view(self, volume: str) -> Iterator[Path]:
        path = self._acquire(volume)
        try:
            yield path
        finally:
            self._release(volume)

    def _acquire(self, volume: str) -> Path:
        image = self._existing(volume)
        target = self.path(volume)
        with self._lock(volume):
            if volume in self._busy:
                raise VolumeInUse(f"volume {volume!r} is being {self._busy[volume]}; try "
                                  "again in a moment")
            refs = self._refs.get(volume, 0)
            if refs == 0 and not self._adopt(image, target):
                target.mkdir(mode=0o700, exist_ok=True)
                try:
                    _mount_image(image, target)
                except (OSError, ToolError) as exc:
                    with contextlib.suppress(OSError):
                        target.rmdir()
                    raise BackendError(f"cannot mount volume {volume!r}: {exc}") from exc
            self._refs[volume] = refs + 1
        return target

    def _adopt(self, image: Path, target: Path) -> bool:
        """Whether ``target`` already holds ``image``'s filesystem (mounted by an earlier
        process); a stale mount of something else there is detached."""
        if not is_mountpoint(target):
            return False
        found = loop.find(image)
        if found is not None and os.stat(target).st_dev == os.makedev(loop.LOOP_MAJOR,
                                                                       found.number):
            log.info("adopting the existing mount of %s on %s", image, target)
            return True
        log.warning("%s holds a mount that is not %s: detaching it", target, image)
        unmount(target)
        return False

    def _release(self, volume: str) -> None:
        target = self.path(volume)
        with self._lock(volume):
            refs = self._refs.pop(volume, 0)
            if refs > 1:
                self._refs[volume] = refs - 1
                return
            try:
                _unmount_dir(target)
            except OSError as exc:
                raise BackendError(f"cannot unmount volume {volume!r}: {exc}") from exc

    def _idle(self, volume: str, verb: str) -> None:
        """Refuse ``verb`` while the volume is referenced; detach a mount left unreferenced
        by an earlier process.  Call with the volume's lock held."""
        if volume in self._busy:
            raise VolumeInUse(f"volume {volume!r} is being {self._busy[volume]}; try again "
                              "in a moment")
        if self._refs.get(volume, 0):
            raise VolumeInUse(f"volume {volume!r} is in use (mounted or being read); "
                              f"stop the containers using it, then {verb} it")
        _unmount_dir(self.path(volume))

    # create, replace, remove

    def create(self, volume: str, spec: DirSpec, populate: Populate | None = None) -> None:
        self.path(volume)
        final = self.image(volume)
        size = spec.params.get("size")
        if not isinstance(size, int):
            raise BackendError(f"volume {volume!r} needs a size on backend image: create it "
                               "with -o size=SIZE, such as -o size=10G")
        try:
            fs = FILESYSTEMS[parse_fs(str(spec.params.get("fs", DEFAULT_FS)))]
        except ValueError as exc:
            raise BackendError(f"volume {volume!r}: -o fs={exc}") from None
        if size < fs.MIN_SIZE and fs is ext4:
            raise BackendError(f"volume {volume!r}: a size of {format_size(size)} is too "
                               f"small; ext4 needs at least {format_size(fs.MIN_SIZE)}")
        if size < fs.MIN_SIZE:
            raise BackendError(f"volume {volume!r}: -o fs={fs.NAME} needs -o size of at least "
                               f"{_short(fs.MIN_SIZE)} (not {_short(size)}); use -o "
                               f"fs={DEFAULT_FS} for a smaller volume")
        if os.path.lexists(final):
            raise BackendError(f"volume {volume!r} already exists ({final}); remove it or "
                               "pick another name")
        work = confined(self._creating, volume)
        _discard(work)
        work.mkdir(mode=0o700)
        try:
            self._build(volume, work, size, fs, spec, populate)
            os.rename(work / "image", final)
            fsync_dir(self.root)
            _discard(work)
        except BaseException as exc:
            _discard(work)
            if isinstance(exc, OSError | ToolError):
                raise BackendError(f"cannot create volume {volume!r}: {exc}") from exc
            raise

    def _build(self, volume: str, work: Path, size: int, fs: Filesystem,
               spec: DirSpec | None, populate: Populate | None) -> None:
        """Make ``work/image`` (``fs``, filled) using ``work/mnt`` to mount it."""
        image, mnt = work / "image", work / "mnt"
        fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                if exc.errno == errno.EFBIG:
                    raise BackendError(
                        f"the host filesystem of {self.root} cannot hold an image of "
                        f"{format_size(size)} for volume {volume!r}: choose a smaller size"
                    ) from exc
                raise
        finally:
            os.close(fd)
        fs.make(image)
        mnt.mkdir(mode=0o700)
        _mount_image(image, mnt, fs)
        try:
            with contextlib.suppress(FileNotFoundError):  # ext4's; XFS has none
                os.rmdir(mnt / "lost+found")  # initdb and others refuse a non-empty directory
            if populate is not None:
                populate(mnt)
            if spec is not None:
                if spec.uid is not None or spec.gid is not None:
                    os.chown(mnt, -1 if spec.uid is None else spec.uid,
                             -1 if spec.gid is None else spec.gid)
                if populate is None or spec.mode != DirSpec.mode:
                    os.chmod(mnt, spec.mode)
            syncfs(mnt)
        finally:
            unmount(mnt)
        fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, volume: str, populate: Populate) -> None:
        """Build a new image of the same size and filesystem in ``.replacing/NAME/partial``,
        rename it to ``ready``, then over the volume's.  Raises :class:`VolumeInUse` if the
        volume is mounted or viewed when the swap comes.  After a crash, :meth:`recover`
        drops a partial build and completes a ready one."""
        image = self._existing(volume)
        size = os.stat(image).st_size
        fs = self._filesystem(volume, image)
        work = confined(self._replacing, volume)
        _discard(work)
        work.mkdir(mode=0o700)
        try:
            with self._lock(volume):
                self._idle(volume, "restore")
            self._build(volume, work, size, fs, None, populate)
            os.rename(work / "image", work / "ready")
            fsync_dir(work)
            with self._lock(volume):
                self._idle(volume, "restore")
                self._swap_in(volume, work)
        except BaseException as exc:
            _discard(work)
            if isinstance(exc, OSError | ToolError):
                raise BackendError(f"cannot replace the content of volume {volume!r}: "
                                   f"{exc}") from exc
            raise

    def _swap_in(self, volume: str, work: Path) -> None:
        os.rename(work / "ready", self.image(volume))
        fsync_dir(self.root)
        _discard(work)

    def remove(self, volume: str) -> None:
        """Move the image into a bin of its own at once; :meth:`purge` deletes it.  Raises
        :class:`VolumeInUse` while it is mounted or viewed."""
        self.path(volume)
        final = self.image(volume)
        if not os.path.lexists(final):
            return
        with self._lock(volume):
            self._idle(volume, "remove")
            try:
                move_to_bin(final, self._removing, volume)
            except OSError as exc:
                raise BackendError(f"cannot remove volume {volume!r}: {exc}") from exc

    def purge(self) -> None:
        for entry in os.scandir(self._removing):
            if entry.name.startswith("."):
                remove_tree(Path(entry.path))

    def recover(self) -> set[str]:
        for entry in os.scandir(self._mnt):
            # A crash between FIFREEZE and FITHAW leaves the filesystem frozen, and every
            # write to it hangs until someone thaws it.
            try:
                if is_mountpoint(Path(entry.path)) and _thaw(Path(entry.path)):
                    log.warning("volume %s was left frozen by an interrupted snapshot: "
                                "thawed", entry.name)
            except OSError as exc:
                log.error("cannot thaw volume %s (%s): if a snapshot left it frozen, its "
                          "writers hang; run `fsfreeze -u %s`", entry.name, exc, entry.path)
        for entry in os.scandir(self._clones):
            log.info("unmounting %s: a snapshot reader left it", entry.path)
            _unmount_dir(Path(entry.path))
        for entry in os.scandir(self._replacing):
            work = Path(entry.path)
            _unmount_staging(work)
            if (work / "ready").is_file() and self.exists(entry.name):
                log.info("completing the interrupted content swap of volume %s", entry.name)
                self._swap_in(entry.name, work)
            else:
                log.info("discarding %s: its build did not complete", work)
                _discard(work)
        for entry in os.scandir(self._creating):
            log.info("discarding %s: its create did not complete", entry.path)
            _discard(Path(entry.path))
        interrupted: set[str] = set()
        for entry in os.scandir(self._removing):
            if entry.name.startswith("."):
                interrupted.update(e.name for e in os.scandir(entry.path))
            else:
                remove_tree(Path(entry.path))
                interrupted.add(entry.name)
        return interrupted

    # O(1) snapshots

    def clone_image(self, volume: str, target: Path) -> None:
        """Make the new file ``target`` (same host filesystem) a clone of the volume's image
        as of one instant, sharing its extents: O(1) in the data.  The volume is mounted for
        it (a view, so an image at rest gets its journal replayed, and a volume being
        resized offline raises :class:`VolumeInUse`); its filesystem is synced, then frozen
        only around the FICLONE.  ``target`` is removed on failure.  Raises
        :class:`BackendError` where the host cannot reflink."""
        if IMAGE_REFLINK not in self.capabilities.snapshot_methods:
            raise BackendError(f"cannot clone the image of volume {volume!r}: the host "
                               f"filesystem of {self.root} cannot reflink")
        try:
            with self.view(volume) as mountpoint:
                _clone_frozen(self.image(volume), mountpoint, target, self._lock(volume),
                              volume)
        except OSError as exc:
            raise BackendError(f"cannot clone the image of volume {volume!r}: {exc}") from exc

    @contextmanager
    def open_image(self, path: Path) -> Iterator[Path]:
        """Mount the image clone ``path`` read-only (read-only loop device too) at a private
        mountpoint under ``.clones/``; unmounted, and its device freed, on exit.  Callers
        open one clone once at a time (a clone is never attached twice)."""
        target = confined(self._clones, f".{secrets.token_hex(8)}")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BackendError(f"{path} is not an image file")
            fs = filesystem_of(path)
            if fs is None:
                raise BackendError(f"{path} holds no ext4 or XFS filesystem")
            target.mkdir(mode=0o700)
            try:
                with _attaching(path):
                    info, lfd = loop.attach(path, fd, read_only=True,
                                            block_size=_sector_size(fs, path))
                    try:
                        _mount_read_only(fs, info.device, target)
                    finally:
                        os.close(lfd)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    target.rmdir()
                if isinstance(exc, OSError):
                    raise BackendError(f"cannot mount the image clone {path}: {exc}") from exc
                raise
        finally:
            os.close(fd)
        try:
            yield target
        finally:
            _unmount_dir(target)

    # sizes

    def size(self, volume: str) -> int | None:
        return os.stat(self._existing(volume)).st_size

    def resize(self, volume: str, size: int) -> Resized:
        """Grow the image, then the filesystem in it.  Online (through a view, so while
        containers use it) if the filesystem can grow mounted here (XFS always; ext4 only
        with CAP_SYS_RESOURCE); otherwise offline, which needs the volume idle (else
        :class:`VolumeInUse`) and keeps it from being mounted meanwhile.  Raises
        :class:`SizeShrink` for a smaller size.  Equal: nothing to do, unless a crash cut an
        earlier grow short (the filesystem is smaller than its image)."""
        image = self._existing(volume)
        fs = self._filesystem(volume, image)
        current = os.stat(image).st_size
        if size < current:
            why = ("XFS cannot shrink" if fs is xfs else
                   "ext4 cannot shrink while mounted")
            raise SizeShrink(
                f"volume {volume!r} is {format_size(current)}; it cannot shrink to "
                f"{format_size(size)} ({why}): create a smaller volume with "
                f"-o size={format_size(size).replace(' ', '')} and -o from={volume} to copy "
                "it, then remove this one")
        if size == current and not _grow_unfinished(image, fs):
            return "online"
        try:
            if fs.can_grow_online():
                with self.view(volume) as mountpoint:
                    _truncate(image, size)
                    found = loop.find(image)
                    if found is None:
                        raise BackendError(f"volume {volume!r} is mounted but its loop device "
                                           "is gone")
                    lfd = os.open(found.device, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        loop.set_capacity(lfd)
                        fs.grow_online(found.device, mountpoint)
                    finally:
                        os.close(lfd)
                return "online"
            with self._lock(volume):
                if self._refs.get(volume) or is_mountpoint(self.path(volume)):
                    raise VolumeInUse(
                        f"volume {volume!r} is in use, and growing a mounted {fs.NAME} volume "
                        "needs CAP_SYS_RESOURCE, which the plugin lacks: stop the containers "
                        "using it and resize again (it then grows offline); volumes created "
                        "with -o fs=xfs grow online")
                self._busy[volume] = "resized"
            try:
                if not loop.wait_unbound(image):
                    raise VolumeInUse(f"volume {volume!r} is still held by a loop device; "
                                      "stop what uses it and resize again")
                _truncate(image, size)
                fs.grow_offline(image)
            finally:
                with self._lock(volume):
                    self._busy.pop(volume, None)
            return "offline"
        except (OSError, ToolError) as exc:
            raise BackendError(f"cannot grow volume {volume!r} to {format_size(size)}: "
                               f"{exc}") from exc

    def status(self, volume: str) -> dict[str, Any]:
        """``size_limit`` (text), ``size_limit_bytes``, ``used_bytes`` (the limit minus
        ``free_bytes``), ``free_bytes`` (statvfs while mounted, else the superblock) and
        ``host_bytes`` (what the sparse image really takes on the host) and ``filesystem``
        (``ext4`` or ``xfs``; None if the image holds neither)."""
        image = self.image(volume)
        try:
            st = os.lstat(image)
        except OSError:
            return {"state": "missing", "path": str(image)}
        if not stat.S_ISREG(st.st_mode):
            return {"state": "missing", "path": str(image)}
        free = None
        fs = None
        try:
            fs = filesystem_of(image)
            target = self.path(volume)
            if self._refs.get(volume) or is_mountpoint(target):
                vfs = os.statvfs(target)
                free = vfs.f_bfree * vfs.f_frsize
            else:
                found = None if fs is None else fs.usage(image)
                free = None if found is None else found[1]
        except OSError as exc:
            log.warning("cannot read the usage of volume %s: %s", volume, exc)
        return {
            "size_limit": format_size(st.st_size),
            "size_limit_bytes": st.st_size,
            # What the limit leaves unwritable: data and the filesystem's own metadata (ext4:
            # the journal and inode tables, about 2.5% of the size; XFS: its 64 MiB log and
            # reserves).
            "used_bytes": None if free is None else st.st_size - free,
            "free_bytes": free,
            "host_bytes": st.st_blocks * 512,
            "filesystem": None if fs is None else fs.NAME,
        }


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _grow_unfinished(image: Path, fs: Filesystem) -> bool:
    with contextlib.suppress(OSError):
        found = fs.usage(image)
        return found is not None and found[0] + 4096 <= os.stat(image).st_size
    return False


def _truncate(image: Path, size: int) -> None:
    fd = os.open(image, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


@contextmanager
def _attaching(image: Path) -> Iterator[None]:
    """One attach of ``image`` at a time, across processes: an exclusive flock on a
    descriptor of its own.  Never on the descriptor handed to the loop device: the device
    keeps that open file (and a lock on it) for as long as it is bound, which would block
    every later attach, such as a restarted plugin's, while a container uses the volume."""
    fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _mount_image(image: Path, target: Path, fs: Filesystem | None = None) -> None:
    """Mount the filesystem in ``image`` (``fs``, else read from its superblock) on
    ``target`` through the image's one loop device."""
    fd = os.open(image, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{image} is not a regular file")
        if fs is None:
            fs = filesystem_of(image)
            if fs is None:
                raise OSError(errno.EINVAL, f"{image} holds no ext4 or XFS filesystem")
        with _attaching(image):
            info, lfd = loop.attach(image, fd, block_size=_sector_size(fs, image))
            try:
                mount_fs(fs, info.device, target)
            finally:
                os.close(lfd)
    finally:
        os.close(fd)


XFS_SECTSIZE_OFFSET = 102
"""sb_sectsize (big-endian u16) in XFS's primary superblock."""


def _sector_size(fs: Filesystem, image: Path) -> int:
    """The loop device block size ``image``'s filesystem needs (``backends.loop``): XFS's
    sector size (mkfs.xfs makes 512 bytes on an image file), which a reflinked image would
    otherwise exceed; 0 (the kernel's choice) for ext4, whose 4 KiB blocks fit any."""
    if fs is not xfs:
        return 0
    raw = read_head(image, 2, XFS_SECTSIZE_OFFSET)
    return int.from_bytes(raw, "big") if len(raw) == 2 else 0


def _can_reflink(directory: Path) -> bool:
    """Whether files in ``directory`` can be cloned (FICLONE of a small temp file)."""
    probe = directory / f".reflink-probe-{secrets.token_hex(4)}"
    try:
        src = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
    except OSError as exc:
        log.warning("cannot probe %s for reflinks (%s): image snapshots will copy", directory,
                    exc)
        return False
    try:
        os.unlink(probe)  # a nameless file can still be cloned from
        os.write(src, b"\0" * 4096)
        dst = os.open(directory, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY,
                                 errno.EPERM):
                raise
            return False
        finally:
            os.close(dst)
    except OSError as exc:
        log.warning("cannot probe %s for reflinks (%s): image snapshots will copy", directory,
                    exc)
        return False
    finally:
        os.close(src)


def _clone_frozen(image: Path, mountpoint: Path, target: Path, lock: threading.Lock,
                  volume: str) -> None:
    """FICLONE ``image``, whose filesystem is mounted at ``mountpoint``, into the new file
    ``target`` while that filesystem is frozen; ``target`` is removed on failure.

    Dirty data is flushed first with writers still running (syncfs), so the freeze, which
    blocks them, only waits for what they wrote meanwhile.  ``lock`` (the volume's) keeps
    two clones from freezing and thawing under each other."""
    src = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o400)
        try:
            mfd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                syncfs(mountpoint)
                with lock:
                    began = time.monotonic()
                    fcntl.ioctl(mfd, FIFREEZE, 0)
                    try:
                        frozen = time.monotonic()
                        fcntl.ioctl(dst, FICLONE, src)
                    finally:
                        fcntl.ioctl(mfd, FITHAW, 0)
                        thawed = time.monotonic()
                log.info("volume %s: image cloned; writers waited %.1f ms (freeze %.1f ms, "
                         "clone %.1f ms)", volume, (thawed - began) * 1e3,
                         (frozen - began) * 1e3, (thawed - frozen) * 1e3)
            finally:
                os.close(mfd)
            os.fsync(dst)
        except BaseException:
            os.close(dst)
            with contextlib.suppress(OSError):
                os.unlink(target)
            raise
        os.close(dst)
    finally:
        os.close(src)


def _thaw(mountpoint: Path) -> bool:
    """Thaw the filesystem mounted at ``mountpoint``; whether it was frozen."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not frozen
            return False
        raise
    finally:
        os.close(fd)


def _mount_read_only(fs: Filesystem, device: Path, target: Path) -> None:
    if libc().mount(os.fsencode(device), os.fsencode(target), fs.NAME.encode(), MS_RDONLY,
                    CLONE_OPTIONS[fs.NAME]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount {device} ({fs.NAME}, read-only) on {target}: "
                           f"{os.strerror(err)}")


def _unmount_dir(target: Path) -> None:
    """Unmount ``target`` if mounted and remove the empty mountpoint; absent is fine."""
    if is_mountpoint(target):
        unmount(target)
    with contextlib.suppress(FileNotFoundError):
        target.rmdir()


def _unmount_staging(work: Path) -> None:
    mnt = work / "mnt"
    if is_mountpoint(mnt):
        unmount(mnt)
        if is_mountpoint(mnt):
            raise BackendError(f"cannot clear {work}: {mnt} is still mounted")


def _discard(work: Path) -> None:
    """Remove a staging directory, unmounting its ``mnt`` first: deleting through a live
    mount would empty the filesystem instead."""
    _unmount_staging(work)
    remove_tree(work)
