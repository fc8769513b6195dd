"""Plugin-wide settings: command-line paths plus ``docker plugin set`` environment values."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Settings:
    root: Path
    """Where volume data and the state database live."""
    socket: Path
    mount_root: Path | None = None
    """Managed plugins: the propagatedMount under which volumes are bind-mounted."""
    log_level: str = "INFO"
    default_backend: str = "local"
    default_size: str = ""
    """``-o size`` for volumes of a sized backend created without one (e.g. ``10G``)."""
    s3_bucket: str = ""
    """Default bucket for volumes created with ``-o s3_sync`` but no ``s3_bucket``."""
    host_name: str = ""
    """How this host is named to others in lease messages (empty: its host name)."""
    s3_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    """S3 endpoint, credentials and ``S3_PASSPHRASE`` (``S3_*``, ``AWS_*``); never logged or
    shown."""

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        *,
        root: Path,
        socket: Path,
        mount_root: Path | None = None,
    ) -> Settings:
        level = (env.get("LOG_LEVEL") or "INFO").strip().upper()
        if level not in LOG_LEVELS:
            logging.getLogger(__name__).warning(
                "LOG_LEVEL=%r is not one of %s; using INFO", level, ", ".join(LOG_LEVELS)
            )
            level = "INFO"
        return cls(
            root=root,
            socket=socket,
            mount_root=mount_root,
            log_level=level,
            default_backend=(env.get("DEFAULT_BACKEND") or "local").strip(),
            default_size=(env.get("DEFAULT_SIZE") or "").strip(),
            s3_bucket=(env.get("S3_BUCKET") or "").strip(),
            host_name=(env.get("HOST_NAME") or "").strip(),
            s3_env={k: v for k, v in env.items() if k.startswith(("S3_", "AWS_"))},
        )
