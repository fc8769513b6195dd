"""The one parser of volume options (``docker volume create -o key=value``).

It normalises keys, types and range-checks values, rejects unknown keys with the list of
valid ones, and never mutates its input.  The raw options are what the state store keeps;
they are parsed again through :func:`parse_options` whenever a volume is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from backends.base import Backend, DirSpec
from plugin.errors import InvalidOption
from plugin.names import VOLUME_NAME

MAX_ID = 2**32 - 2
_ABILITY = {"size": "enforce a size limit", "fs": "choose a filesystem"}
CREDENTIAL_HINTS = ("secret", "password", "passwd", "passphrase", "token", "access_key",
                    "credential")


SNAPSHOT_MAX = 200
"""Every on-disk name derived from a snapshot name (``.NAME.json.tmp`` and the like) must fit
NAME_MAX (255 bytes), with room to spare."""
SNAPSHOT_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.:-]{{0,{SNAPSHOT_MAX - 1}}}")
S3_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=/-]{0,511}")
DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


@dataclass(frozen=True)
class SnapshotPolicy:
    on_unmount: bool = False
    every: int | None = None
    """Seconds between periodic snapshots, or None."""
    keep: int = 10
    """Automatic snapshots kept; manual ones are never pruned automatically."""
    on_remove: Literal["keep", "delete"] = "keep"


@dataclass(frozen=True)
class S3Policy:
    bucket: str
    prefix: str
    sync: Literal["on-unmount", "manual", "periodic"] = "on-unmount"
    every: int | None = None
    restore: str = "latest"
    """``latest``, ``never`` or a remote snapshot id."""
    keep: int = 30
    encrypt: bool = False
    """Seal everything uploaded under the plugin's ``S3_PASSPHRASE`` (``s3sync.crypto``)."""
    lease: bool = False
    """Used from several hosts: Mount holds the lease in the bucket (``s3sync.lease``)."""
    lease_ttl: int = 60
    """Seconds a lease outlives its holder's last renewal (a dead host's hold)."""
    copy_of: str | None = None
    """At create, restore from this prefix of the bucket (another volume's copy) instead of
    the volume's own: an independent copy, which pushes to its own prefix only and takes no
    lease on the original."""


@dataclass(frozen=True)
class VolumeOptions:
    backend: str = "local"
    uid: int | None = None
    gid: int | None = None
    mode: int = 0o755
    source: str | None = None
    """``from=VOLUME`` or ``from=VOLUME@SNAPSHOT``: the volume starts as a copy of it."""
    snapshot: SnapshotPolicy = field(default_factory=SnapshotPolicy)
    s3: S3Policy | None = None
    params: tuple[tuple[str, Any, str], ...] = ()
    """The selected backend's own options: (key, parsed value, value as text)."""

    def param(self, key: str) -> Any:
        return next((value for name, value, _ in self.params if name == key), None)

    def dir_spec(self) -> DirSpec:
        return DirSpec(uid=self.uid, gid=self.gid, mode=self.mode,
                       params={name: value for name, value, _ in self.params})

    def describe(self) -> dict[str, str]:
        """The effective options as strings, for ``docker volume inspect`` and messages."""
        shown: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("snapshot", "s3", "params"):
                continue
            shown[f.name] = f"{value:04o}" if f.name == "mode" else str(value)
        shown.update((name, text) for name, _, text in self.params)
        return shown


def _id(key: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise InvalidOption(f"option {key}={value!r} must be a number from 0 to {MAX_ID}")
    number = int(value, 10)
    if not 0 <= number <= MAX_ID:
        raise InvalidOption(f"option {key}={value} is out of range: use 0 to {MAX_ID}")
    return number


def _mode(key: str, value: str) -> int:
    digits = value[2:] if value.lower().startswith("0o") else value
    try:
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(digits)
        number = int(digits, 8)
    except ValueError:
        raise InvalidOption(
            f"option {key}={value!r} must be octal permission bits, e.g. {key}=0750"
        ) from None
    if not 0 <= number <= 0o7777:
        raise InvalidOption(f"option {key}={value} is out of range: use 0000 to 7777")
    return number


def _bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise InvalidOption(f"option {key}={value!r} must be true or false")


def _positive(key: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise InvalidOption(
            f"option {key}={value!r} must be a positive whole number, e.g. {key}=10"
        )
    return int(value)


def parse_duration(key: str, value: str) -> int:
    """``30s``, ``15m``, ``6h``, ``1d`` or combinations (``1h30m``) to seconds."""
    match = DURATION.fullmatch(value.lower())
    if not value or match is None or not any(match.groups()):
        raise InvalidOption(
            f"option {key}={value!r} is not a duration: use a number with s, m, h or d, "
            f"e.g. {key}=15m"
        )
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total < 1:
        raise InvalidOption(f"option {key}={value!r} must be at least 1s")
    return total


def _within(key: str, seconds: int, least: int, most: int) -> int:
    if not least <= seconds <= most:
        raise InvalidOption(f"option {key} must be from {least}s to {most}s, not {seconds}s")
    return seconds


def _source(key: str, value: str) -> str:
    volume, _, snapshot = value.partition("@")
    if VOLUME_NAME.fullmatch(volume) is None or (
        "@" in value and SNAPSHOT_NAME.fullmatch(snapshot) is None
    ):
        raise InvalidOption(
            f"option {key}={value!r} must name a pyvol volume, VOLUME or VOLUME@SNAPSHOT"
        )
    return value


def _on_remove(key: str, value: str) -> str:
    if value not in ("keep", "delete"):
        raise InvalidOption(f"option {key}={value!r} must be keep or delete")
    return value


def _s3_sync(key: str, value: str) -> tuple[str, int | None]:
    if value in ("on-unmount", "manual"):
        return value, None
    try:
        return "periodic", parse_duration(key, value)
    except InvalidOption:
        raise InvalidOption(
            f"option {key}={value!r} must be on-unmount, manual or a duration such as 5m"
        ) from None


def _s3_prefix(key: str, value: str) -> str:
    value = value.strip("/")
    if S3_PREFIX.fullmatch(value) is None or ".." in value.split("/") or "//" in value:
        raise InvalidOption(
            f"option {key}={value!r} must be a relative key prefix from A-Z a-z 0-9 _ . = / -"
        )
    return value


def _s3_restore(key: str, value: str) -> str:
    if value in ("latest", "never") or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", value):
        return value
    raise InvalidOption(f"option {key}={value!r} must be latest, never or a remote snapshot id")


def _copy_of(key: str, value: str) -> tuple[str, str]:
    prefix, _, snapshot = value.partition("@")
    return _s3_prefix(key, prefix), _s3_restore(key, snapshot) if snapshot else "latest"


def _text(key: str, value: str) -> str:
    if not value:
        raise InvalidOption(f"option {key} needs a value")
    return value


PARSERS: dict[str, Callable[[str, str], Any]] = {
    "uid": _id,
    "gid": _id,
    "mode": _mode,
    "from": _source,
    "snapshot_on_unmount": _bool,
    "snapshot_every": parse_duration,
    "snapshot_keep": _positive,
    "snapshot_on_remove": _on_remove,
    "s3_bucket": _text,
    "s3_prefix": _s3_prefix,
    "s3_sync": _s3_sync,
    "s3_restore": _s3_restore,
    "s3_keep": _positive,
    "s3_encrypt": _bool,
    "s3_lease": _bool,
    "s3_copy_of": _copy_of,
    "s3_lease_ttl": lambda key, value: _within(key, parse_duration(key, value), 5, 3600),
}
VALID_KEYS = ("backend", *PARSERS)
"""The keys every backend takes; a backend adds its own (``Backend.options``)."""


def _choose_backend(opts: Mapping[str, str], default: str,
                    backends: Mapping[str, Backend]) -> str:
    """The named backend, else the default if it takes every backend key given, else the
    first registered backend that does (``-o size=`` alone picks one that can limit)."""
    named = opts.get("backend")
    if named:
        if named not in backends:
            raise InvalidOption(f"option backend={named!r} names no backend; available: "
                                f"{', '.join(sorted(backends))}")
        return named
    wanted = {key for key in opts if key not in VALID_KEYS}
    if not wanted:
        return default
    candidates = [default, *(name for name in backends if name != default)]
    for name in candidates:
        backend = backends.get(name)
        if backend is not None and wanted <= {o.name for o in backend.options}:
            return name
    return default


def normalise(raw: Mapping[str, object] | None) -> dict[str, str]:
    """Lower-case and trim keys, trim values; reject non-strings and duplicate keys."""
    result: dict[str, str] = {}
    for key, value in (raw or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidOption(f"option {key!r} must map to a string value, got {value!r}")
        norm = key.strip().lower().replace("-", "_")
        if norm in result:
            raise InvalidOption(f"option {norm!r} is given twice")
        result[norm] = value.strip()
    return result


def with_default_size(raw: Mapping[str, object] | None, *, default_backend: str,
                      backends: Mapping[str, Backend], default_size: str) -> Mapping[str, object]:
    """``raw`` plus ``size=default_size`` if the backend it selects limits sizes and it has no
    size.  Create stores the result, so a later change of the setting moves no volume."""
    opts = normalise(raw)
    if not default_size or "size" in opts:
        return raw or {}
    backend = backends.get(_choose_backend(opts, default_backend, backends))
    if backend is None or not backend.capabilities.size_limit:
        return raw or {}
    return {**(raw or {}), "size": default_size}


def with_default_encrypt(raw: Mapping[str, object] | None, *,
                         passphrase_set: bool) -> Mapping[str, object]:
    """``raw`` plus ``s3_encrypt=true`` if it syncs to S3, does not say ``s3_encrypt`` and
    ``S3_PASSPHRASE`` is set.  Create stores the result, so setting or unsetting the passphrase
    later never switches an existing volume between encrypted and plain (and a prefix someone
    filled with plain snapshots cannot talk a new volume out of encrypting: that is refused)."""
    opts = normalise(raw)
    if not passphrase_set or "s3_encrypt" in opts or not any(k.startswith("s3_") for k in opts):
        return raw or {}
    return {**(raw or {}), "s3_encrypt": "true"}


def parse_options(
    raw: Mapping[str, object] | None,
    *,
    default_backend: str,
    backends: Mapping[str, Backend],
    volume: str = "",
    default_bucket: str = "",
    passphrase_set: bool | None = None,
) -> VolumeOptions:
    """Parse driver options into :class:`VolumeOptions`.

    Raises :class:`InvalidOption` naming the offending key for unknown keys, credentials,
    bad values and unknown backends.  ``passphrase_set`` (Create passes it; a stored record
    parsed again does not, so unsetting ``S3_PASSPHRASE`` never hides a volume) refuses
    ``s3_encrypt=true`` without ``S3_PASSPHRASE``.
    """
    opts = normalise(raw)
    for key in opts:
        if any(hint in key for hint in CREDENTIAL_HINTS):
            raise InvalidOption(
                f"option {key!r} looks like a credential; credentials are never volume options: "
                "set them once with `docker plugin set pyvol AWS_ACCESS_KEY_ID=... "
                "AWS_SECRET_ACCESS_KEY=...` (and S3_PASSPHRASE=... for -o s3_encrypt=true)"
            )
    backend = _choose_backend(opts, default_backend, backends)
    if backend not in backends:
        raise InvalidOption(
            f"option backend={backend!r} names no backend; available: {', '.join(sorted(backends))}"
        )
    own = {o.name: o for o in backends[backend].options}
    for key in opts:
        if key in VALID_KEYS or key in own:
            continue
        others = sorted(name for name, b in backends.items()
                        if any(o.name == key for o in b.options))
        if others:
            how = ("omit -o backend" if opts.get("backend") else
                   f"add -o backend={others[0]}")
            raise InvalidOption(
                f"option {key!r} is not supported by backend {backend} (it cannot "
                f"{_ABILITY.get(key, 'take it')}); backend {', '.join(others)} takes it: "
                f"{how}")
        raise InvalidOption(
            f"unknown option {key!r}; valid options for backend {backend} are: "
            f"{', '.join(sorted([*VALID_KEYS, *own]))}")
    params: list[tuple[str, Any, str]] = []
    for key, option in own.items():
        if key in opts:
            try:
                value = option.parse(opts[key])
            except ValueError as exc:
                raise InvalidOption(f"option {key}={opts[key]!r}: {exc}") from None
            params.append((key, value, option.show(value)))
    p = {key: PARSERS[key](key, value) for key, value in opts.items() if key in PARSERS}
    snapshot = SnapshotPolicy(
        on_unmount=p.get("snapshot_on_unmount", False),
        every=p.get("snapshot_every"),
        keep=p.get("snapshot_keep", SnapshotPolicy.keep),
        on_remove=p.get("snapshot_on_remove", "keep"),
    )
    s3 = None
    if any(key.startswith("s3_") for key in p):
        bucket = p.get("s3_bucket") or default_bucket
        if not bucket:
            raise InvalidOption(
                "S3 sync needs a bucket: add -o s3_bucket=NAME, or set a default with "
                "`docker plugin set pyvol S3_BUCKET=NAME`"
            )
        encrypt = p.get("s3_encrypt", False)
        if encrypt and passphrase_set is False:
            raise InvalidOption(
                "option s3_encrypt=true needs a passphrase: set it once with "
                "`docker plugin set pyvol S3_PASSPHRASE=...` (keep a copy: without it the "
                "volume's S3 snapshots can never be read)")
        sync, every = p.get("s3_sync", ("on-unmount", None))
        copy_of, restore = p.get("s3_copy_of", (None, p.get("s3_restore", "latest")))
        if copy_of is not None and ("s3_restore" in p or p.get("s3_lease")):
            raise InvalidOption(
                "option s3_copy_of=PREFIX[@SNAPSHOT] already says what to restore, and makes "
                "an independent copy: drop s3_restore and s3_lease (the copy can be leased "
                "once it exists: copy it again with -o from=COPY -o s3_lease=true)")
        if copy_of is not None and copy_of == (p.get("s3_prefix") or volume):
            raise InvalidOption(f"option s3_copy_of={copy_of!r} names this volume's own "
                                "prefix: a copy pushes to a prefix of its own")
        s3 = S3Policy(bucket=bucket, prefix=p.get("s3_prefix") or volume, sync=sync,
                      every=every, restore=restore, copy_of=copy_of,
                      keep=p.get("s3_keep", S3Policy.keep), encrypt=encrypt,
                      lease=p.get("s3_lease", False),
                      lease_ttl=p.get("s3_lease_ttl", S3Policy.lease_ttl))
    return VolumeOptions(
        backend=backend, uid=p.get("uid"), gid=p.get("gid"), mode=p.get("mode", 0o755),
        source=p.get("from"), snapshot=snapshot, s3=s3, params=tuple(params),
    )
