"""Volume name validation: dockerd checks nothing for plugin volumes, so we do."""

from __future__ import annotations

import re

from plugin.errors import InvalidName

VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


def validate_volume_name(name: object) -> str:
    """Return ``name`` if it is an acceptable volume name, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or not name:
        raise InvalidName(
            "the request has no volume name: pass one, e.g. `docker volume create -d pyvol NAME`"
        )
    if VOLUME_NAME.fullmatch(name) is None:
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise InvalidName(
            f"invalid volume name {shown!r}: use 1-255 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return name
