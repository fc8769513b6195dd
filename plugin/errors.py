"""Named errors of the plugin layer.

Each carries a message meant for the person at the ``docker`` CLI: it names the volume, option
or path and says what to do.  ``plugin.app`` turns every :class:`PyvolError` (and every
``backends.errors.BackendError``) into a ``{"Err": message}`` answer.
"""

from __future__ import annotations


class PyvolError(Exception):
    """Base class: an error whose message is shown to the user as is."""


class InvalidRequest(PyvolError):
    """The request body lacks a field the endpoint needs."""


class InvalidName(PyvolError):
    """A volume or snapshot name is not acceptable."""


class InvalidOption(PyvolError):
    """A ``-o key=value`` driver option is unknown or has a bad value."""


class VolumeNotFound(PyvolError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"volume {name!r} not found: list volumes with "
            "`docker volume ls -f driver=pyvol:latest`"
        )
        self.name = name


class VolumeExists(PyvolError):
    """Create was asked again for a name that exists with other options."""


class VolumeInUse(PyvolError):
    def __init__(self, name: str, mounts: int) -> None:
        super().__init__(
            f"volume {name!r} is in use by {mounts} mount(s): stop the containers using it "
            "and try again (if none uses it, e.g. after the Docker daemon crashed, clear the "
            f"stale count with `pyvol mounts reset {name}`)"
        )
        self.name = name
        self.mounts = mounts


class VolumeBroken(PyvolError):
    """The volume's record exists but its data directory is missing."""


class StateError(PyvolError):
    """The plugin's state database could not be read or written."""


class VolumeBusy(PyvolError):
    """Something runs on the volume that this call cannot wait for; the message says what,
    how far along it is, and to retry."""


class SnapshotNeeded(PyvolError):
    """A snapshot removal would delete what a pending S3 push still needs."""


class CreateFailed(PyvolError):
    """The data of a new volume could not be put in place (the create was rolled back)."""


class SnapshotFailed(PyvolError):
    """A snapshot could not read the volume (its content changed under it, or a disk error)."""
