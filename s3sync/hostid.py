"""A stable id for this host, kept in the data directory, and its name for messages.

The id is random, made once and never changed: a lease in the bucket names its holder by it,
so a host that restarts recognises its own lease, and two hosts with the same host name stay
apart.  It is written atomically and exclusively: a temp file in the same directory is
written and fsynced, then hard-linked to ``host-id`` (which fails if another process got
there first: that one's id wins and both use it), and the directory is fsynced.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from backends.fs import fsync_dir
from s3sync.errors import BadHostId

HOST_ID = re.compile(r"[0-9a-f]{32}")
FILE = "host-id"
NAME_MAX = 64


@dataclass(frozen=True)
class Host:
    id: str
    """32 lowercase hex digits, stable across restarts."""
    name: str
    """A printable name for messages (the host name); never used to tell hosts apart."""


def host_name() -> str:
    name = "".join(c for c in socket.gethostname() if c.isprintable() and not c.isspace())
    return name[:NAME_MAX] or "unnamed-host"


def load_host(data_dir: Path, name: str | None = None) -> Host:
    """This host's id from ``data_dir/host-id``, created on first use; raises :class:`BadHostId`."""
    path = data_dir / FILE
    host_id = _read(path)
    if host_id is None:
        host_id = _create(path)
    return Host(host_id, name if name is not None else host_name())


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(128)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadHostId(f"cannot read the host id {path} ({exc.strerror}): fix its "
                        "permissions; do not delete it while this host holds volume leases") \
            from None
    text = raw.decode("ascii", "replace").strip()
    if HOST_ID.fullmatch(text) is None:
        raise BadHostId(
            f"host id file {path} does not hold 32 hex digits: remove it to make a new id "
            "(this host then no longer owns leases taken under the old one; free those with "
            "`pyvol lease break VOLUME --yes`)")
    return text


def _create(path: Path) -> str:
    host_id = secrets.token_hex(16)
    tmp = path.with_name(f".{FILE}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, f"{host_id}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another process's id came first: use it
            os.link(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise BadHostId(f"cannot create the host id {path} ({exc.strerror}): check that the "
                        "data directory exists and is writable") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    found = _read(path)
    if found is None:
        raise BadHostId(f"the host id {path} vanished right after it was created: something "
                        "else is deleting files in the data directory")
    return found
