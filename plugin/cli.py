"""The ``pyvol`` command: ``pyvol serve`` runs the plugin server."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_SOCKET = Path("/run/docker/plugins/pyvol.sock")
DEFAULT_ROOT = Path("/var/lib/pyvol")


def _serve(args: argparse.Namespace) -> int:
    from plugin.server import serve
    from plugin.settings import Settings

    serve(Settings.from_env(os.environ, root=args.root, socket=args.socket,
                            mount_root=args.mount_root))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pyvol", description="pyvol Docker volume plugin")
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the volume plugin server on a unix socket")
    serve.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                       help=f"unix socket to listen on (default {DEFAULT_SOCKET})")
    serve.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                       help=f"directory for volume data and state (default {DEFAULT_ROOT})")
    serve.add_argument("--mount-root", type=Path, default=None,
                       help="managed plugins: the propagatedMount to bind volumes under")
    serve.set_defaults(func=_serve)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
