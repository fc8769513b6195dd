"""pyvol's tests.  A package only so that ``tests.support`` is importable from every tier."""
