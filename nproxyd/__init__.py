"""nproxyd: the background daemon of nproxy."""

__version__ = "0.1.0"
