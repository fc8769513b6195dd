"""Errors raised by storage backends.

Every message names the volume or path involved and says what the user can do.  The HTTP layer
turns any :class:`BackendError` into ``{"Err": message}``.
"""

from __future__ import annotations


class BackendError(Exception):
    """A storage operation failed in a way the user can act on."""


class UnsafePath(BackendError):
    """A path built from user input would leave its root."""


class UnknownBackend(BackendError):
    """``-o backend=NAME`` names no registered backend."""
