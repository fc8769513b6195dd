"""Fixtures of the multi-host tier: two Docker engines ("hosts" a and b), each in a network
namespace of its own with the plugin enabled as ``pyvol``, and one S3 server (moto) that both
reach over a bridge.  See multihost_support.py for the layout.

The session sets everything up once (the plugin is built with ``make plugin`` unless build/
already holds this worktree's sources) and removes it all at the end; it also removes what an
earlier session that was killed left behind.  Without what it needs it skips, saying why; with
``PYVOL_E2E=required`` (CI) it fails instead.  The setup time is printed in the summary.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
from multihost_support import (
    Hosts,
    Names,
    SetupError,
    destroy,
    environment_problem,
    leftover_tokens,
)

from tests.support.tiers import cannot_run

_report: list[str] = []
_tests = itertools.count(1)


@pytest.fixture(scope="session")
def hosts() -> Iterator[Hosts]:
    problem = environment_problem()
    if problem is not None:
        cannot_run("multi-host", problem)
    for token in leftover_tokens():
        left = destroy(token)
        _report.append(f"removed the leftovers of session {token}"
                       + (f"; could not remove: {left}" if left else ""))
    try:
        session = Hosts.start(("a", "b"))
    except SetupError as exc:
        cannot_run("multi-host", str(exc))
    _report.append(f"setup {session.setup_seconds:.1f} s ({session.build_note}; "
                   f"{session.timings})")
    try:
        yield session
    finally:
        started = time.monotonic()
        left = session.close()
        _report.append(f"teardown {time.monotonic() - started:.1f} s")
        if left:
            pytest.fail(f"the multi-host teardown left: {left}", pytrace=False)


@pytest.fixture
def names(hosts: Hosts) -> Iterator[Names]:
    """Names for the test; after it, every host is healed, running and empty again."""
    yield Names(f"mh-{hosts.token}-{next(_tests):02d}")
    hosts.reset()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _report:
        terminalreporter.write_line(f"multihost: {line}")
