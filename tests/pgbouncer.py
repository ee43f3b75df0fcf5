"""A real PgBouncer (transaction pooling) in front of the test PostgreSQL.

Debian's ``pgbouncer`` package provides the binary (``/usr/sbin/pgbouncer``, or ``$PATH``).
PgBouncer refuses to run as root; then it runs as pgserver's ``pgserver`` system user (the
owner of the test server's socket directory), with its files in a temporary directory that
user owns. Every database of the server is reachable through it under its own name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

BINARY_CANDIDATES = ("/usr/sbin/pgbouncer", "pgbouncer")
SKIP_REASON = (
    "PgBouncer is not installed (Debian/Ubuntu: apt-get install pgbouncer); "
    "the PgBouncer tests need the real binary"
)
DEFAULT_POOL_SIZE = 6
_START_TIMEOUT_SECONDS = 15.0


def binary() -> str | None:
    """The pgbouncer executable, or None when it is not installed."""
    for candidate in BINARY_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def server_address(dsn: str) -> tuple[str, int, str]:
    """(host or socket directory, port, user) of a ``postgresql://`` DSN."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = unquote(parts.hostname or "") or query.get("host", ["127.0.0.1"])[0]
    port = parts.port or int(query.get("port", ["5432"])[0])
    return host, port, unquote(parts.username or "postgres")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _unprivileged_user() -> str:
    """pgserver's system user (it owns the test server's socket directory), else nobody."""
    import pwd  # noqa: PLC0415 - only as root

    try:
        pwd.getpwnam("pgserver")
    except KeyError:
        return "nobody"
    return "pgserver"


class PgBouncer:
    """One PgBouncer process for a test session; :meth:`stop` ends it and removes its files."""

    def __init__(self, server_dsn: str, *, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.server_dsn = server_dsn
        self.pool_size = pool_size
        self.root = Path(tempfile.mkdtemp(prefix="nproxyd-pgb-"))
        self.port = _free_port()
        self.user: str | None = _unprivileged_user() if os.geteuid() == 0 else None
        self.process: subprocess.Popen[bytes] | None = None

    def dsn(self, database: str) -> str:
        """The DSN of ``database`` through PgBouncer."""
        _, _, user = server_address(self.server_dsn)
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    @property
    def log(self) -> str:
        """What PgBouncer logged so far."""
        path = self.root / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _config(self) -> str:
        host, port, user = server_address(self.server_dsn)
        return "\n".join(
            [
                "[databases]",
                f"* = host={host} port={port} user={user}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {self.port}",
                f"unix_socket_dir = {self.root}",
                f"logfile = {self.root / 'pgbouncer.log'}",
                f"pidfile = {self.root / 'pgbouncer.pid'}",
                "auth_type = trust",
                f"auth_file = {self.root / 'userlist.txt'}",
                "pool_mode = transaction",
                f"default_pool_size = {self.pool_size}",
                "max_client_conn = 1000",
                "max_db_connections = 0",
                "server_reset_query =",
                "",
            ]
        )

    def start(self, executable: str) -> PgBouncer:
        _, _, user = server_address(self.server_dsn)
        config = self.root / "pgbouncer.ini"
        config.write_text(self._config())
        (self.root / "userlist.txt").write_text(f'"{user}" ""\n')
        command = [executable, str(config)]
        if self.user is not None:
            import pwd  # noqa: PLC0415 - only as root

            entry = pwd.getpwnam(self.user)
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            command = [executable, "-u", self.user, str(config)]
        # A file, not a pipe: PgBouncer also logs to stderr, and a full pipe would stall it.
        with (self.root / "stderr.log").open("wb") as stderr:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                stderr = (self.root / "stderr.log").read_text(errors="replace")
                raise RuntimeError(f"pgbouncer exited at start: {stderr[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not listen within {_START_TIMEOUT_SECONDS} s")

    def errors(self) -> list[str]:
        """Log lines PgBouncer wrote at ERROR or WARNING level."""
        return [line for line in self.log.splitlines() if re.search(r" (ERROR|WARNING) ", line)]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
