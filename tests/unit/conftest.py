"""Shared fixtures of the unit tier: settings and drivers over a fresh tmp_path, bind mounts."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from unit_support import MNT_DETACH, MS_BIND, MakeDriver, libc

from plugin.driver import Driver
from plugin.settings import Settings
from tests.support.mounts import mounts_under


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Legacy mode (no mount_root): the Mountpoint is the data directory itself."""
    return Settings(root=tmp_path / "root", socket=tmp_path / "pyvol.sock")


@pytest.fixture
def make_driver(settings: Settings) -> Iterator[MakeDriver]:
    """Build drivers over the same root (a "restart"); they are shut down at teardown."""
    made: list[Driver] = []

    def make(s: Settings | None = None, **kwargs: object) -> Driver:
        driver = Driver(s or settings, **kwargs)  # type: ignore[arg-type]
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.jobs.shutdown()
        driver.state.close()


@pytest.fixture
def driver(make_driver: MakeDriver) -> Driver:
    return make_driver()


@pytest.fixture
def can_mount(tmp_path: Path) -> Iterator[None]:
    """Skip unless mount(2) is permitted; at teardown, detach any bind a test left behind."""
    c = libc()
    src, dst = tmp_path / "probe-src", tmp_path / "probe-dst"
    src.mkdir()
    dst.mkdir()
    if c.mount(str(src).encode(), str(dst).encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES):
            pytest.skip(f"mount(2) is not permitted here ({os.strerror(err)}): bind mounts need "
                        "root with CAP_SYS_ADMIN")
        pytest.fail(f"probe bind mount failed: {os.strerror(err)}")
    c.umount2(str(dst).encode(), MNT_DETACH)
    yield
    leaked = mounts_under(tmp_path)
    for point in reversed(leaked):
        c.umount2(point.encode(), MNT_DETACH)
    assert leaked == [], f"bind mounts left behind: {leaked}"
