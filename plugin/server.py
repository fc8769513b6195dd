"""Run the app under gunicorn on a unix socket.

One worker process with threads: mount counts live in one SQLite database, and one process
keeps per-volume locks exact.  The master binds the socket before the worker loads the app, so
dockerd's dial check passes within a second and early requests wait in the backlog while the
worker reconciles state.  Timeouts follow dockerd: calls may take up to 120 s; dockerd
SIGKILLs a plugin 10 s after SIGTERM.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from plugin.settings import Settings

SWITCH_INTERVAL = 0.001
SHM = Path("/dev/shm")  # noqa: S108 -- gunicorn mkstemps its heartbeat file there, unlinked
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_app(settings: Settings) -> Flask:
    """Open the state, reconcile it with the disk, and return the WSGI app."""
    from plugin.app import create_app
    from plugin.driver import Driver

    # Background threads (snapshot copies, S3 hashing and uploads) share the GIL with request
    # threads; a shorter switch interval (default 5 ms) bounds each wait for it.
    sys.setswitchinterval(SWITCH_INTERVAL)
    driver = Driver(settings)
    driver.recover()
    driver.start()
    return create_app(driver)


class PluginServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, threads: int = 16) -> None:
        self.settings = settings
        self.threads = threads
        super().__init__()

    def load_config(self) -> None:
        options: dict[str, Any] = {
            "bind": f"unix:{self.settings.socket}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": self.threads,
            "timeout": 150,
            "graceful_timeout": 8,
            "keepalive": 5,
            "umask": 0o077,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": self.settings.log_level.lower(),
            "proc_name": "pyvol",
            # gunicorn >= 24 opens a control socket under $HOME; a plugin needs none.
            "control_socket_disable": True,
        }
        if SHM.is_dir():
            # The worker's heartbeat touches a file before each wait for requests; on a busy
            # disk-backed /tmp that inode update can stall the loop for tens of ms.
            options["worker_tmp_dir"] = str(SHM)
        for key, value in options.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Flask:
        return build_app(self.settings)


def serve(settings: Settings) -> None:
    logging.basicConfig(stream=sys.stderr, level=settings.log_level, format=LOG_FORMAT)
    settings.socket.parent.mkdir(parents=True, exist_ok=True)
    os.umask(0o077)
    logging.getLogger("pyvol").info(
        "pyvol listening on %s, data in %s%s", settings.socket, settings.root,
        f", mounts under {settings.mount_root}" if settings.mount_root else "",
    )
    PluginServer(settings).run()
