"""What a test tier that needs a real engine does when it cannot run here."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def cannot_run(tier: str, problem: str) -> NoReturn:
    """Skip, saying why; with ``PYVOL_E2E=required`` (CI) fail instead: there they must run."""
    if os.environ.get("PYVOL_E2E") == "required":
        pytest.fail(f"PYVOL_E2E=required, but the {tier} tests cannot run: {problem}",
                    pytrace=False)
    pytest.skip(f"{tier} tests cannot run here: {problem} "
                "(with PYVOL_E2E=required this is a failure)")
