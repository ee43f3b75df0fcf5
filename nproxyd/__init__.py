"""nproxyd: the background daemon of nproxy."""

from typing import Any

# ``__version__`` is looked up when first read (``importlib.metadata`` costs ~15 ms of every
# start; docs/benchmarks.md "Start-up"), then kept.


def __getattr__(name: str) -> Any:
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        found = version("nproxyd")  # the installed distribution's version (pyproject.toml)
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0+unknown"
    globals()["__version__"] = found
    return found
