"""Storage backends, registered by name.

Adding a backend is one module that meets ``backends.base.Backend`` plus one line in
:data:`REGISTRY`; ``tests/unit/test_backend_contract.py`` then runs the shared suite on it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from backends.base import Backend, DirSpec
from backends.image import ImageBackend
from backends.local import LocalBackend

REGISTRY: dict[str, Callable[[Path], Backend]] = {
    "image": ImageBackend,
    "local": LocalBackend,
}

__all__ = ["REGISTRY", "Backend", "DirSpec"]
