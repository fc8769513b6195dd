"""The hostile-input tier: the real server on a real socket (and a real S3 server) attacked as a
hostile container or bucket writer would.  It reuses the functional tier's support modules."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "functional"))

from server_fixtures import plugin, server, shared, shared_server, start, start_server

__all__ = ["plugin", "server", "shared", "shared_server", "start", "start_server"]
