"""Helpers that more than one test tier uses, one module a concern:

- ``trees``: what a user sees of a directory tree (fingerprints, content, searches).
- ``unix_http``: HTTP over a unix socket, as dockerd talks to a plugin.
- ``net``: free TCP ports on the loopback.
- ``processes``: whether a process is alive, its memory, and kill -9 of a server and its workers.
- ``waiting``: bounded polling.
- ``mounts``: the mount table (``/proc/self/mountinfo``).

Tier-specific fixtures stay in each tier's own support modules, which import from here.
"""
