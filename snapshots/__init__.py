"""The snapshot engine: point-in-time copies of any backend's volumes (``snapshots.store``).

Snapshots are a feature layered over storage backends, not a backend: the store reads a volume
through ``backends.base.VolumeContent`` (a view, or a clone of its image where the backend
offers one) and writes under ``<root>/snapshots``.
"""
