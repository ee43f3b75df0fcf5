"""Running the real ``nproxyd`` process in system tests.

``nproxyd_env`` builds the environment (configuration through ``NPROXYD__SECTION__KEY``
variables only, nothing inherited from the caller's ``NPROXYD*`` settings), ``run_nproxyd``
runs a command to completion with a timeout, and :class:`Processes` starts long-running ones
and kills whatever is still alive when the test ends (use it from a fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

NPROXYD = (sys.executable, "-m", "nproxyd")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT_SECONDS = 30.0


def nproxyd_env(
    *, dsn: str, state_dir: Path | str, settings: Mapping[str, object] | None = None
) -> dict[str, str]:
    """The environment of an nproxyd process using ``dsn`` and ``state_dir``.

    ``settings`` maps dotted keys (``"email.smtp.port"``) or ready variable names
    (``"NPROXYD__EMAIL__SMTP__PORT"``) to values.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("NPROXYD_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    env["NPROXYD__DATABASE__DSN"] = dsn
    env["NPROXYD__DAEMON__STATE_DIR"] = str(state_dir)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (settings or {}).items():
        env[env_name(key)] = _env_value(value)
    return env


def env_name(key: str) -> str:
    """The variable of a dotted key: ``"email.smtp.port"`` -> ``NPROXYD__EMAIL__SMTP__PORT``."""
    if key.startswith("NPROXYD__"):
        return key
    return "NPROXYD__" + "__".join(part.upper() for part in key.split("."))


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def run_nproxyd(
    args: Sequence[str], env: Mapping[str, str], *, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> subprocess.CompletedProcess[str]:
    """Run ``nproxyd ARGS`` to completion; raises ``subprocess.TimeoutExpired`` (after a kill)."""
    return subprocess.run(
        [*NPROXYD, *args],
        env=dict(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line of ``text`` parsed as one JSON object."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_until(
    condition: Callable[[], bool], *, timeout: float, interval: float = 0.05, what: str = ""
) -> None:
    """Poll ``condition`` until it holds; raises ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


class Processes:
    """Started ``nproxyd`` processes; :meth:`kill_all` ends the ones still running.

    Output goes to files under ``log_dir`` rather than pipes, so a chatty process never blocks
    on a full pipe while the test is busy elsewhere.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []
        self._outputs: dict[int, tuple[Path, Path]] = {}

    def start(self, args: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start ``nproxyd ARGS`` in its own session, stdout and stderr into files."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        number = len(self.started)
        stdout_path = self.log_dir / f"nproxyd-{number}.stdout"
        stderr_path = self.log_dir / f"nproxyd-{number}.stderr"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [*NPROXYD, *args],
                env=dict(env),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        self.started.append(process)
        self._outputs[process.pid] = (stdout_path, stderr_path)
        return process

    def output(self, process: subprocess.Popen[bytes]) -> tuple[str, str]:
        """What ``process`` wrote so far: (stdout, stderr)."""
        stdout_path, stderr_path = self._outputs[process.pid]
        return (
            stdout_path.read_text(errors="replace"),
            stderr_path.read_text(errors="replace"),
        )

    def finish(
        self, process: subprocess.Popen[bytes], *, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> tuple[int, str, str]:
        """Wait for ``process``; returns (exit code, stdout, stderr). Kills it on timeout."""
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(process)
            process.wait()
            stderr = self.output(process)[1]
            raise AssertionError(
                f"nproxyd {process.args!r} did not finish within {timeout} s\n{stderr[-4000:]}"
            ) from None
        return (code, *self.output(process))

    @staticmethod
    def kill(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process's group if the process is still running."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)

    def kill_all(self) -> None:
        """Kill every started process still running and reap it."""
        for process in self.started:
            self.kill(process)
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def http_get(url: str, *, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``url``: (status, body text) for any HTTP answer; raises ``OSError`` without one."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def http_status(url: str, *, timeout: float = 5.0) -> int | None:
    """The status ``url`` answers with, or None when nothing answers."""
    try:
        return http_get(url, timeout=timeout)[0]
    except OSError:
        return None


def wait_ready(
    processes: Processes,
    process: subprocess.Popen[bytes],
    base_url: str,
    *,
    timeout: float = 15.0,
) -> None:
    """Wait until ``base_url``/readyz answers 200; fails early if ``process`` exits."""

    def ready() -> bool:
        if process.poll() is not None:
            stdout, stderr = processes.output(process)
            raise AssertionError(
                f"nproxyd exited {process.returncode} before ready\n"
                f"{stderr[-3000:]}\n{stdout[-3000:]}"
            )
        return http_status(base_url + "/readyz", timeout=2.0) == 200

    wait_until(ready, timeout=timeout, what=f"{base_url}/readyz to answer 200")


class ThrowawayPostgres:
    """A PostgreSQL server of its own on 127.0.0.1, from pgserver's binaries, stoppable at will.

    PostgreSQL refuses to run as root; then it runs as pgserver's ``pgserver`` system user, as
    pgserver itself does. Use :meth:`cleanup` in a ``finally``.
    """

    def __init__(self) -> None:
        # A short path under /tmp: the socket path must fit in sun_path, and the server's user
        # must be able to traverse every parent (pytest's tmp_path root is 0700).
        self.root = Path(tempfile.mkdtemp(prefix="nproxyd-pg-"))
        self.pgdata = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.user: str | None = "pgserver" if os.geteuid() == 0 else None
        self.running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _commands(self) -> Any:
        import pgserver._commands  # noqa: PLC0415 - only tests with a server of their own

        return pgserver._commands

    def init(self) -> None:
        """Create the cluster (trust authentication, superuser ``postgres``)."""
        commands = self._commands()
        self.root.chmod(0o755)
        if self.user is not None:
            import pwd  # noqa: PLC0415

            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists  # noqa: PLC0415

            ensure_user_exists(self.user)
            ensure_prefix_permissions(self.root)
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        commands.initdb(
            ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
            pgdata=self.pgdata,
            user=self.user,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-k {self.root} -h 127.0.0.1 -p {self.port}"
        self._commands().pg_ctl(
            ["-w", "-o", options, "-l", str(self.log), "start"],
            pgdata=self.pgdata,
            user=self.user,
            timeout=30,
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self._commands().pg_ctl(
            ["-w", "-m", mode, "stop"], pgdata=self.pgdata, user=self.user, timeout=30
        )
        self.running = False

    def cleanup(self) -> None:
        """Stop the server if it runs (immediately) and remove its files."""
        if self.running:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def sql(dsn: str, query: str, *args: Any) -> list[Any]:
    """Run one statement on its own connection (from synchronous test code); returns its rows."""
    import asyncio  # noqa: PLC0415

    import asyncpg  # noqa: PLC0415

    async def fetch() -> list[Any]:
        connection = await asyncpg.connect(dsn)
        try:
            return list(await connection.fetch(query, *args))
        finally:
            await connection.close()

    return asyncio.run(fetch())


def quiet(dsn: str, due: int) -> bool:
    """Every one of ``due`` subscriptions has its invoice and no mail is pending."""
    invoices: int = sql(dsn, "SELECT count(*) AS n FROM payment_invoices")[0]["n"]
    pending: int = sql(dsn, "SELECT count(*) AS n FROM mail_outbox WHERE status = 'pending'")[0][
        "n"
    ]
    return invoices >= due and pending == 0
