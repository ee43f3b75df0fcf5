"""Start-up benchmark: ``nproxyd run`` to ``/readyz`` 200, warm, against pgserver's own start.

"Warm" here means: the state directory's embedded PostgreSQL cluster is initialised (initdb
done, the ``nproxyd`` database created, every migration applied by an earlier
``nproxyd migrate``), the server itself is stopped (the previous process using it exited
cleanly, so pgserver's ``cleanup_mode="stop"`` stopped it), and the operating system's page
cache holds the Python packages and the cluster's files (one untimed start of each side first).
So both sides pay for starting the postgres server; neither pays for initdb. Warm also means
compiled: both sides run with a bytecode cache of their own (``PYTHONPYCACHEPREFIX`` in the
temporary directory, written by the untimed first start), as an installed package has its
``.pyc`` files; without it, a source tree run with ``PYTHONDONTWRITEBYTECODE`` (as in this
project's development environment) compiles every nproxyd module on every start while
pgserver's own are precompiled in site-packages. ``BYTECODE=0`` in the environment measures
without the cache.

A: ``python -m nproxyd run`` with an empty ``database.dsn`` (the embedded server), from the
``exec`` until ``/readyz`` answers 200 (polled every 5 ms). B: a fresh Python process calling
``pgserver.get_server`` on the same data directory, from the ``exec`` until it prints that the
server is up. The two are interleaved (A, B, A, B, ...) ``REPETITIONS`` times; the figure is
the ratio of the medians, with each side's spread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.common import Figure, duration, median, note, significant, spread
from tests.pg import TestServer
from tests.system.proc import REPO_ROOT, free_port, http_status

REPETITIONS = 3
TARGET_RATIO = 1.5
POLL_SECONDS = 0.005
TIMEOUT_SECONDS = 60.0
# Side B: what pgserver itself takes to start the server of a data directory.
PGSERVER_START = """\
import sys
import pgserver
pgserver.get_server(sys.argv[1], cleanup_mode="stop")
print("up", flush=True)
sys.stdin.read()
"""


def _python_environment(state_dir: Path) -> dict[str, str]:
    """The environment of either side: the caller's, with the bench's bytecode cache."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("NPROXYD")}
    if os.environ.get("BYTECODE", "1") != "0":
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(state_dir / "pycache")
    return env


def _environment(state_dir: Path, port: int) -> dict[str, str]:
    env = _python_environment(state_dir)
    env.update(
        NPROXYD__DAEMON__STATE_DIR=str(state_dir),
        NPROXYD__HTTP__LISTEN=f"127.0.0.1:{port}",
        NPROXYD__LOG__LEVEL="warning",
    )
    return env


def _prepare(state_dir: Path) -> None:
    """Initialise the cluster and apply the migrations; the server stops when this exits."""
    env = _environment(state_dir, free_port())
    subprocess.run(
        [sys.executable, "-m", "nproxyd", "migrate"],
        env=env,
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=TIMEOUT_SECONDS * 2,
    )


def _daemon_start(state_dir: Path) -> float:
    """Seconds from the exec of ``nproxyd run`` to ``/readyz`` 200; then stop it cleanly."""
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "nproxyd", "run"],
        env=_environment(state_dir, port),
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/readyz"
        while http_status(url, timeout=1.0) != 200:
            if process.poll() is not None:
                raise RuntimeError(f"nproxyd run exited with {process.returncode}")
            if time.perf_counter() - started > TIMEOUT_SECONDS:
                raise TimeoutError("nproxyd run did not become ready")
            time.sleep(POLL_SECONDS)
        return time.perf_counter() - started
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=TIMEOUT_SECONDS)


def _pgserver_start(state_dir: Path) -> float:
    """Seconds from the exec of a Python process to pgserver's server being up; then stop it."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", PGSERVER_START, str(state_dir / "postgres")],
        env=_python_environment(state_dir),
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None and process.stdin is not None
    try:
        line = process.stdout.readline()
        seconds = time.perf_counter() - started
        if line.strip() != "up":
            raise RuntimeError(f"pgserver did not start (exit {process.wait()})")
        return seconds
    finally:
        process.stdin.close()
        process.wait(timeout=TIMEOUT_SECONDS)


async def run(_: TestServer) -> list[Figure]:
    bench = "startup"
    with tempfile.TemporaryDirectory(prefix="nproxyd-bench-startup-") as directory:
        state_dir = Path(directory)
        cached = os.environ.get("BYTECODE", "1") != "0"
        note(bench, f"bytecode cache {'on' if cached else 'off (BYTECODE=0)'}")
        note(bench, "initialising the embedded cluster (nproxyd migrate)")
        _prepare(state_dir)
        _daemon_start(state_dir)  # untimed: page cache
        _pgserver_start(state_dir)
        daemon: list[float] = []
        pgserver: list[float] = []
        for repetition in range(REPETITIONS):
            daemon.append(_daemon_start(state_dir))
            pgserver.append(_pgserver_start(state_dir))
            note(
                bench,
                f"repetition {repetition + 1}: nproxyd run {duration(daemon[-1])}, "
                f"pgserver {duration(pgserver[-1])}",
            )
    ratio = median(daemon) / median(pgserver)
    return [
        Figure(
            name="startup_warm_to_readyz",
            measured=f"{duration(median(daemon))} {spread(daemon)}",
            reference=f"pgserver start {duration(median(pgserver))} {spread(pgserver)}",
            ratio=ratio,
            target=f"<={significant(TARGET_RATIO)}x",
            passed=ratio <= TARGET_RATIO,
        )
    ]
