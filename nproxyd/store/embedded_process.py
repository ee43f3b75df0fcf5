"""Starting the embedded server's process: the part of :mod:`nproxyd.store.embedded` that needs
only the standard library and pgserver, so ``nproxyd run`` can begin it in a thread before the
rest of the daemon is imported (docs/benchmarks.md "Start-up").

pgserver keeps one server per data directory and counts the processes using it, so a second
nproxyd process with the same state directory reuses the running server, and the last one to
exit stops it. Processes sharing a state directory serialise on a lock file while one of them
starts the server and creates the database.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import logging

# Start-up (docs/benchmarks.md "Start-up"): this module is imported before the configuration
# is read, so it imports only what starting the thread needs; the rest (logging, json, fcntl,
# pgserver) is imported by the thread itself, while the main thread imports the daemon.

# pgserver's list of the processes using the server; the last one to exit stops it.
HANDLE_PIDS = ".handle_pids.json"
LOCK_FILE = "postgres.lock"
DATA_DIRECTORY = "postgres"
IMPORT_WAIT_SECONDS = 5.0  # start_early waits at most this long for pgserver's import


class Started(NamedTuple):
    """A started (or reused) server, with the state directory's lock still held."""

    admin_uri: str
    lock: int  # the lock file's descriptor: released once the database exists
    dropped_handles: list[int]


class StartFailed(Exception):
    """pgserver could not start the server (the lock was released); the cause is chained."""


def forget_dead_handles(pgdata: Path) -> list[int]:
    """Drop processes that no longer exist from pgserver's handle list; returns the dropped.

    A process killed without running its exit handlers (``kill -9``) stays in the list, and
    then no later process is ever the last one, so the server would never be stopped again.
    Called under the state directory's lock, before this process adds itself.
    """
    import json  # noqa: PLC0415 - see the start-up note at the top

    path = pgdata / HANDLE_PIDS
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(pids, list):
        return []
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    dropped = [pid for pid in pids if pid not in alive]
    if dropped:
        path.write_text(json.dumps(alive))
    return dropped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def import_pgserver() -> Any:
    """Import pgserver (quietly) with its server starts going through :class:`QuickStart`."""
    import logging  # noqa: PLC0415 - see the start-up note at the top
    import warnings  # noqa: PLC0415

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pgserver  # noqa: PLC0415 - heavy import, only when embedded
        from pgserver import postgres_server  # noqa: PLC0415
    namespace = vars(postgres_server)  # where PostgresServer finds its pg_ctl command
    command = namespace.get("pg_ctl")
    if callable(command) and not isinstance(command, QuickStart):
        namespace["pg_ctl"] = QuickStart(command)  # absent in another pgserver: its own wait
    return pgserver


class QuickStart:
    """pgserver's ``pg_ctl`` command, except that ``pg_ctl -w start`` returns as soon as the
    server's ``postmaster.pid`` says it is ready (docs/benchmarks.md "Start-up").

    ``pg_ctl -w`` looks at the server only every 100 ms, so it notices a server that is ready
    after ~10-20 ms up to ~90 ms late. Here the same ``pg_ctl`` still runs (same arguments,
    user and timeout) and still decides failure: its exit before the server is seen ready is
    its answer, as before. Only its wait is cut short, by :func:`run_until_ready`. pgserver
    then reads the same file, registers this process in its handle list and releases its own
    lock exactly as before.
    """

    def __init__(self, command: Any) -> None:
        self.command = command

    def __call__(self, args: list[str], pgdata: Path | None = None, **kwargs: Any) -> str:
        if pgdata is None or "start" not in args or "-w" not in args:
            result: str = self.command(args, pgdata=pgdata, **kwargs)
            return result
        from pgserver._commands import POSTGRES_BIN_PATH  # noqa: PLC0415

        command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), *args]
        return run_until_ready(command, Path(pgdata), **kwargs)


QUICK_POLL_SECONDS = 0.002  # how often run_until_ready reads postmaster.pid
PG_CTL_TIMEOUT_SECONDS = 60.0  # pg_ctl's own default wait, when the caller gives none
STALE_TOLERANCE_SECONDS = 2  # as pg_ctl: a postmaster started this much before it still counts


def run_until_ready(
    command: list[str], pgdata: Path, *, timeout: float | None = None, **kwargs: Any
) -> str:
    """Run ``command`` (a ``pg_ctl -w start``) until it exits or ``pgdata``'s server is ready.

    Ready: ``postmaster.pid`` names a live postmaster started since the command began (so a
    file left by an earlier server is never taken; pg_ctl's own test) whose status line says
    ``ready``. Then the command is left to notice it too and is reaped in the background. An
    exit first is the command's answer: its output, or :class:`subprocess.CalledProcessError`.
    After ``timeout`` it is killed and :class:`subprocess.TimeoutExpired` raised, as
    :func:`subprocess.run` does.
    """
    import subprocess  # noqa: PLC0415 - see the start-up note at the top
    import tempfile  # noqa: PLC0415
    import time  # noqa: PLC0415

    seconds = PG_CTL_TIMEOUT_SECONDS if timeout is None else timeout
    began = int(time.time()) - STALE_TOLERANCE_SECONDS
    deadline = time.monotonic() + seconds
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(  # noqa: S603 - pgserver's own pg_ctl, its arguments
            command, stdout=output, stderr=output, text=True, **kwargs
        )
        while (code := process.poll()) is None:
            if server_ready(pgdata, began):
                threading.Thread(target=process.wait, name="pg_ctl-reaper", daemon=True).start()
                return ""
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise subprocess.TimeoutExpired(command, seconds)
            time.sleep(QUICK_POLL_SECONDS)
        output.seek(0)
        text = output.read()
    if code != 0:
        raise subprocess.CalledProcessError(code, command, output=text)
    return text


def server_ready(pgdata: Path, started_since: int) -> bool:
    """Whether ``postmaster.pid`` names a live postmaster, started at or after
    ``started_since`` (seconds since the epoch), that is ready for connections."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    if len(lines) < 8 or lines[7].strip() != "ready":
        return False
    pid, started = lines[0].strip(), lines[2].strip()
    if not (pid.isdigit() and started.isdigit()) or int(started) < started_since:
        return False
    return _alive(int(pid))


def _start(pgdata: Path) -> tuple[str, list[int]]:
    import warnings  # noqa: PLC0415

    pgserver = import_pgserver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        dropped = forget_dead_handles(pgdata)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        uri: str = server.get_uri()
    return uri, dropped


def lock(path: Path) -> int:
    import fcntl  # noqa: PLC0415 - see the start-up note at the top

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    return descriptor


def unlock(descriptor: int) -> None:
    import fcntl  # noqa: PLC0415 - see the start-up note at the top

    fcntl.flock(descriptor, fcntl.LOCK_UN)
    os.close(descriptor)


def start(state_dir: Path) -> Started:
    """Take the state directory's lock and start (or reuse) its server; blocks."""
    descriptor = lock(state_dir / LOCK_FILE)
    try:
        uri, dropped = _start(state_dir / DATA_DIRECTORY)
    except Exception as exc:
        unlock(descriptor)
        raise StartFailed(str(exc)) from exc
    except BaseException:
        unlock(descriptor)
        raise
    return Started(admin_uri=uri, lock=descriptor, dropped_handles=dropped)


class Early:
    """The outcome of a start begun in a thread: :meth:`result` waits for it."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._started: Started | None = None
        self._error: BaseException | None = None

    def set(self, started: Started | None, error: BaseException | None) -> None:
        self._started, self._error = started, error
        self._done.set()

    def result(self) -> Started:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._started is not None
        return self._started


_early: dict[Path, Early] = {}
_held: list[logging.LogRecord] = []  # pgserver's records of an early start
_holding: list[logging.Handler] = []  # the handler holding them, while it does


def _hold_pgserver_logs() -> None:
    """Keep pgserver's log records until :func:`release_held_logs` (logging is not configured
    yet)."""
    import logging  # noqa: PLC0415 - see the start-up note at the top

    class Held(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _held.append(record)

    logger = logging.getLogger("pgserver")
    handler = Held()
    _holding.append(handler)
    logger.addHandler(handler)
    logger.propagate = False


def release_held_logs() -> None:
    """Log what pgserver logged during an early start, now that logging is configured; its
    later records go the usual way."""
    import logging  # noqa: PLC0415

    logger = logging.getLogger("pgserver")
    if not _holding:
        return
    logger.removeHandler(_holding.pop())
    logger.propagate = True
    records = list(_held)
    _held.clear()
    for record in records:
        logger.handle(record)


def start_early(state_dir: Path) -> None:
    """Begin :func:`start` in a thread now; :func:`take_early` hands its outcome over.

    The commands that open the database call it right after reading the configuration, so
    the server's start (mostly waiting for ``pg_ctl``) overlaps the import of the rest of
    nproxyd. pgserver's log records wait for :func:`release_held_logs` (logging is not
    configured yet).
    """
    if state_dir in _early:
        return
    early = Early()
    _early[state_dir] = early
    # Only pgserver logs to its logger. With logging not imported yet, nothing can log before
    # the thread holds the records (first thing, before it imports pgserver); importing
    # logging here would only delay the thread.
    hold_here = "logging" in sys.modules
    if hold_here:
        _hold_pgserver_logs()

    imported = threading.Event()

    def run() -> None:
        try:
            if not hold_here:
                _hold_pgserver_logs()
            import_pgserver()
        except Exception:  # noqa: S110 - start() imports it again and reports the error
            pass
        finally:
            imported.set()
        try:
            early.set(start(state_dir), None)
        except BaseException as exc:  # handed to whoever takes the outcome
            early.set(None, exc)

    threading.Thread(target=run, name="embedded-postgres-start", daemon=True).start()
    # Let the thread import pgserver alone (both threads would take turns on the interpreter
    # otherwise, doubling it): then pg_ctl starts sooner, and the daemon's imports run while
    # it waits for the server.
    imported.wait(IMPORT_WAIT_SECONDS)


def take_early(state_dir: Path) -> Early | None:
    """The start begun by :func:`start_early` for ``state_dir``, once; None without one."""
    return _early.pop(state_dir, None)
