"""Loaded before every tier's conftest.  Because ``tests`` is a package, pytest imports this
file as ``tests.conftest`` and puts the repository root on ``sys.path`` first, which makes
``tests.support`` importable from each tier's modules.  The tiers themselves stay rootless
(no ``__init__.py``): their support modules are still imported by their bare names."""
