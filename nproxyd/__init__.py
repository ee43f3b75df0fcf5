"""nproxyd: the background daemon of nproxy."""

# The one place of the version: the package's metadata takes it from here (pyproject.toml,
# ``[tool.setuptools.dynamic]``), so nothing looks it up at start (docs/benchmarks.md
# "Start-up": ``importlib.metadata`` cost ~8 ms of every start).
__version__ = "0.1.0"
