"""pyvol: a Docker volume plugin that keeps volumes as plain local directories."""

__version__ = "0.1.0"
