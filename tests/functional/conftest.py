"""Fixtures of the functional tier (defined in server_fixtures, shared with tests/hostile)."""

from server_fixtures import (
    plugin,
    server,
    shared,
    shared_server,
    start,
    start_each_backend,
    start_server,
)

__all__ = ["plugin", "server", "shared", "shared_server", "start", "start_each_backend",
           "start_server"]
