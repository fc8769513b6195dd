"""Tests that make loop devices skip where the machine has none (finding and clearing
devices and mounts: ``tests.support.mounts``)."""

from __future__ import annotations

from pathlib import Path

import pytest

HAS_LOOP = Path("/dev/loop-control").exists()
needs_loop = pytest.mark.skipif(
    not HAS_LOOP, reason="/dev/loop-control is absent: image volumes need loop devices")
