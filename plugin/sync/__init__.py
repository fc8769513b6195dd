"""S3 sync, one job per module; the driver sees only the facade, :class:`Syncer`.

A package rather than ``sync_*.py`` modules: its parts make sense only together, and the
one entry point (``from plugin.sync import Syncer``) keeps them out of the driver's sight.

- ``queue``: the durable push queue, each volume's record in the state database, changed
  only by named transitions (idle -> requested -> captured -> idle).
- ``push``: the capture and upload jobs that move a push through those states.
- ``scheduler``: periodic pushes while mounted and retry timers with backoff (one thread).
- ``restore``: the restore a new volume asks for (resumed after a restart) and in place.
- ``remotes``: the S3 stores per (bucket, prefix) and each volume's transfer progress.
- ``syncer``: the facade: the driver's hooks, the CLI's actions, Status.s3.
"""

from plugin.sync.restore import RestoreInProgress, SyncFailed
from plugin.sync.syncer import Syncer

__all__ = ["RestoreInProgress", "SyncFailed", "Syncer"]
