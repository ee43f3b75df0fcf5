"""nproxyd: the background daemon of nproxy."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nproxyd")  # the installed distribution's version (pyproject.toml)
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
