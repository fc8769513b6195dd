"""The one parser of volume options (``docker volume create -o key=value``).

It normalises keys, types and range-checks values, rejects unknown keys with the list of
valid ones, and never mutates its input.  The raw options are what the state store keeps;
they are parsed again through :func:`parse_options` whenever a volume is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields
from typing import Any

from backends.base import DirSpec
from plugin.errors import InvalidOption

MAX_ID = 2**32 - 2
CREDENTIAL_HINTS = ("secret", "password", "passwd", "token", "access_key", "credential")


@dataclass(frozen=True)
class VolumeOptions:
    backend: str = "local"
    uid: int | None = None
    gid: int | None = None
    mode: int = 0o755

    def dir_spec(self) -> DirSpec:
        return DirSpec(uid=self.uid, gid=self.gid, mode=self.mode)

    def describe(self) -> dict[str, str]:
        """The effective options as strings, for ``docker volume inspect`` and messages."""
        shown: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            shown[f.name] = f"{value:04o}" if f.name == "mode" else str(value)
        return shown


def _id(key: str, value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise InvalidOption(f"option {key}={value!r} must be a number from 0 to {MAX_ID}") from None
    if not 0 <= number <= MAX_ID:
        raise InvalidOption(f"option {key}={value} is out of range: use 0 to {MAX_ID}")
    return number


def _mode(key: str, value: str) -> int:
    digits = value[2:] if value.lower().startswith("0o") else value
    try:
        number = int(digits, 8)
    except ValueError:
        raise InvalidOption(
            f"option {key}={value!r} must be octal permission bits, e.g. {key}=0750"
        ) from None
    if not 0 <= number <= 0o7777:
        raise InvalidOption(f"option {key}={value} is out of range: use 0000 to 7777")
    return number


PARSERS: dict[str, Callable[[str, str], Any]] = {
    "uid": _id,
    "gid": _id,
    "mode": _mode,
}
VALID_KEYS = ("backend", *PARSERS)


def normalise(raw: Mapping[str, object] | None) -> dict[str, str]:
    """Lower-case and trim keys and values; reject non-strings and duplicates."""
    result: dict[str, str] = {}
    for key, value in (raw or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidOption(f"option {key!r} must map to a string value, got {value!r}")
        norm = key.strip().lower().replace("-", "_")
        if norm in result:
            raise InvalidOption(f"option {norm!r} is given twice")
        result[norm] = value.strip()
    return result


def parse_options(
    raw: Mapping[str, object] | None,
    *,
    default_backend: str,
    backends: Collection[str],
) -> VolumeOptions:
    """Parse driver options into :class:`VolumeOptions`.

    Raises :class:`InvalidOption` naming the offending key for unknown keys, credentials,
    bad values and unknown backends.
    """
    opts = normalise(raw)
    for key in opts:
        if any(hint in key for hint in CREDENTIAL_HINTS):
            raise InvalidOption(
                f"option {key!r} looks like a credential; credentials are never volume options: "
                "set them once with `docker plugin set pyvol AWS_ACCESS_KEY_ID=... "
                "AWS_SECRET_ACCESS_KEY=...`"
            )
        if key not in VALID_KEYS:
            raise InvalidOption(
                f"unknown option {key!r}; valid options are: {', '.join(sorted(VALID_KEYS))}"
            )
    backend = opts.get("backend") or default_backend
    if backend not in backends:
        raise InvalidOption(
            f"option backend={backend!r} names no backend; available: {', '.join(sorted(backends))}"
        )
    parsed = {key: PARSERS[key](key, value) for key, value in opts.items() if key in PARSERS}
    return VolumeOptions(backend=backend, **parsed)
