"""Start-up: what each stage imports, and the embedded server's start begun early.

Each import check runs in a fresh interpreter, since this one has imported everything.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from nproxyd import app
from nproxyd.adapters.nowpayments_status import NowPaymentsStatus
from nproxyd.adapters.payment_nowpayments import NowPaymentsProvider
from nproxyd.adapters.status_simulated import SimulatedPaymentStatus
from nproxyd.core.clock import SystemClock
from nproxyd.core.config import load
from nproxyd.core.errors import DatabaseUnavailable
from nproxyd.store.embedded import start_embedded
from nproxyd.store.embedded_process import (
    LOCK_FILE,
    QuickStart,
    import_pgserver,
    run_until_ready,
    start_early,
    take_early,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DRIVERS = ("asyncpg", "aiohttp", "aiosmtplib", "structlog", "tenacity")
UNUSED_ADAPTERS = (
    "nproxyd.adapters.payment_nowpayments",
    "nproxyd.adapters.nowpayments_status",
    "nproxyd.adapters.mail_smtp",
    "aiosmtplib",
    "tenacity",
)


def loaded_after(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (modules) a fresh interpreter has loaded after running ``code``."""
    report = f"print(json.dumps([n for n in {names!r} if n in sys.modules]))"
    probe = f"{code}\nimport json, sys\n{report}"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=os.environ
    )
    loaded: list[str] = json.loads(result.stdout)
    return loaded


class TestImports:
    def test_the_command_line_imports_no_driver_before_reading_its_configuration(self) -> None:
        """``import nproxyd.cli`` loads neither the daemon nor any driver (they follow the
        configuration, after ``run`` began starting the embedded server)."""
        assert loaded_after("import nproxyd.cli", ("nproxyd.app", "pgserver", *DRIVERS)) == []

    def test_the_composition_root_imports_no_adapter(self) -> None:
        """``import nproxyd.app`` loads no payment or mail adapter and no SMTP client."""
        assert loaded_after("import nproxyd.app", UNUSED_ADAPTERS) == []

    def test_the_simulated_provider_and_the_maildir_load_only_their_own_adapters(self) -> None:
        """Building the default adapters loads neither NOWPayments nor the SMTP client."""
        code = (
            "from nproxyd import app\n"
            "from nproxyd.core.clock import SystemClock\n"
            "from nproxyd.core.config import load\n"
            "config = load(None, {'NPROXYD__DAEMON__STATE_DIR': '/nonexistent'})\n"
            "provider = app.payment_provider(config, SystemClock())\n"
            "app.mail_transport(config)\n"
            "app.payment_status_source(config, provider)\n"
        )
        assert loaded_after(code, UNUSED_ADAPTERS) == []

    def test_version_and_help_print_without_loading_the_daemon(self) -> None:
        """``--version`` prints the version on stdout; neither it nor the parser loads the
        daemon until the ``once`` choices are needed."""
        code = (
            "import contextlib, io\n"
            "from nproxyd import cli\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "    cli.build_parser().parse_args(['--version'])\n"
            "assert out.getvalue().startswith('nproxyd '), out.getvalue()\n"
        )
        assert loaded_after(code, ("nproxyd.app", *DRIVERS)) == []

    def test_the_composition_root_imports_no_http_framework(self) -> None:
        """``import nproxyd.app`` loads no aiohttp: the HTTP surfaces run on the standard
        library; only the NOWPayments adapters (built when configured) use aiohttp."""
        assert loaded_after("import nproxyd.app", ("aiohttp",)) == []

    def test_the_version_needs_no_metadata_look_up(self) -> None:
        """The command line and the daemon's modules do not load ``importlib.metadata``;
        ``__version__`` is the installed distribution's version and pyproject.toml's source."""
        daemon = "from nproxyd import cli\ncli.import_structlog_plainly()\nimport nproxyd.app"
        assert loaded_after(daemon, ("importlib.metadata",)) == []
        code = (
            "import importlib.metadata, nproxyd\n"
            "assert nproxyd.__version__ == importlib.metadata.version('nproxyd')\n"
        )
        assert loaded_after(code, ()) == []
        pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
        assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
            "attr": "nproxyd.__version__"
        }

    def test_a_command_loads_structlog_without_its_optional_extras(self) -> None:
        """A command (here ``check-config``) imports structlog without rich or colorama, which
        stay importable; console tracebacks are plain either way."""
        pytest.importorskip("rich")
        code = (
            "import contextlib, io\n"
            "from nproxyd import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert cli.main(['check-config']) == cli.EXIT_OK\n"
            "import importlib.util, structlog.dev\n"
            "assert structlog.dev.rich is None\n"
            "assert importlib.util.find_spec('rich') is not None\n"
        )
        assert loaded_after(code, ("rich", "colorama", "aiohttp")) == []


class TestPaymentStatusSource:
    def test_a_nowpayments_provider_is_asked_through_its_own_session(self) -> None:
        """A NOWPayments provider gets the NOWPayments status source, any other the simulated."""
        config = load(
            None,
            {
                "NPROXYD__BILLING__PAYMENT_PROVIDER": "nowpayments",
                "NPROXYD__PAYMENT__NOWPAYMENTS__API_KEY": "key",
            },
        )
        provider = NowPaymentsProvider(config.payment.nowpayments)
        assert isinstance(app.payment_status_source(config, provider), NowPaymentsStatus)
        simulated = app.payment_provider(load(None, {}), SystemClock())
        assert isinstance(app.payment_status_source(config, simulated), SimulatedPaymentStatus)


class TestEarlyStart:
    @pytest.mark.anyio
    async def test_an_early_start_that_fails_is_reported_once_and_frees_the_lock(
        self, tmp_path: Path
    ) -> None:
        """A start begun early and failing raises the same DatabaseUnavailable as a start
        begun late, is taken once, and leaves the state directory's lock free."""
        (tmp_path / "postgres").write_text("not a data directory")
        start_early(tmp_path)
        with pytest.raises(DatabaseUnavailable, match="embedded PostgreSQL failed to start"):
            await start_embedded(tmp_path)
        assert take_early(tmp_path) is None
        descriptor = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held
        finally:
            os.close(descriptor)

    @pytest.mark.anyio
    async def test_pgserver_records_of_an_early_start_wait_for_configured_logging(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """What pgserver logs while an early start runs (before logging is configured) is
        logged when the start is taken, through the configured handlers, not before."""
        (tmp_path / "postgres").write_text("not a data directory")
        start_early(tmp_path)
        logging.getLogger("pgserver").error("server log follows")
        assert "server log follows" not in caplog.text
        with pytest.raises(DatabaseUnavailable):
            await start_embedded(tmp_path)
        assert "server log follows" in caplog.text
        assert logging.getLogger("pgserver").propagate is True


def write_postmaster_pid(pgdata: Path, *, pid: int, started: int, status: str) -> None:
    """A ``postmaster.pid`` as PostgreSQL writes it (eight lines, the last its status)."""
    lines = [str(pid), str(pgdata), str(started), "5432", str(pgdata), "", "1 2", status]
    (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")


def _reaped_child_pid() -> int:
    """The id of a process that has exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


WAITS = [sys.executable, "-c", "import time; time.sleep(20)"]


class TestQuickStart:
    def test_the_start_returns_once_postmaster_pid_says_ready_while_pg_ctl_still_waits(
        self, tmp_path: Path
    ) -> None:
        """A ``pg_ctl -w start`` is left waiting once a live postmaster started since it began
        says "ready" in ``postmaster.pid``: the start returns instead of waiting for pg_ctl
        (which would only notice at its next 100 ms look)."""
        write_postmaster_pid(tmp_path, pid=os.getpid(), started=int(time.time()), status="ready")
        assert run_until_ready(WAITS, tmp_path, timeout=15) == ""

    @pytest.mark.parametrize("status", ["starting", "stopping", ""])
    def test_a_server_not_ready_is_waited_for_until_the_timeout(
        self, tmp_path: Path, status: str
    ) -> None:
        """A postmaster that does not say "ready" is waited for; past the timeout pg_ctl is
        killed and the timeout raised, as ``subprocess.run`` does."""
        write_postmaster_pid(tmp_path, pid=os.getpid(), started=int(time.time()), status=status)
        with pytest.raises(subprocess.TimeoutExpired):
            run_until_ready(WAITS, tmp_path, timeout=0.3)

    @pytest.mark.parametrize("left_by", ["an earlier start", "a dead postmaster"])
    def test_a_file_left_by_an_earlier_server_is_not_taken(
        self, tmp_path: Path, left_by: str
    ) -> None:
        """A "ready" ``postmaster.pid`` of a postmaster started long before pg_ctl began, or
        of one no longer alive, is not this start's server: pg_ctl's own answer is waited for."""
        if left_by == "an earlier start":
            pid, started = os.getpid(), int(time.time()) - 3600
        else:
            pid, started = _reaped_child_pid(), int(time.time())
        write_postmaster_pid(tmp_path, pid=pid, started=started, status="ready")
        answer = [sys.executable, "-c", "import time; time.sleep(0.3); print('pg_ctl done')"]
        assert run_until_ready(answer, tmp_path, timeout=15) == "pg_ctl done\n"

    def test_pg_ctl_failing_before_the_server_is_ready_is_its_answer(self, tmp_path: Path) -> None:
        """pg_ctl exiting with an error before the server is seen ready raises
        ``CalledProcessError`` with its output, as pgserver's command did (pgserver then logs
        the server's log)."""
        fails = [sys.executable, "-c", "import sys; print('no server'); sys.exit(1)"]
        with pytest.raises(subprocess.CalledProcessError) as raised:
            run_until_ready(fails, tmp_path, timeout=15)
        assert raised.value.returncode == 1
        assert raised.value.output == "no server\n"

    def test_pgserver_starts_its_server_through_the_quick_start_and_nothing_else(
        self, tmp_path: Path
    ) -> None:
        """Once nproxyd imported pgserver, its server starts go through :class:`QuickStart`
        (once, however often imported); every other pg_ctl command is pgserver's, unchanged."""
        import_pgserver()
        import_pgserver()
        from pgserver import postgres_server  # noqa: PLC0415

        command = vars(postgres_server)["pg_ctl"]
        assert isinstance(command, QuickStart)
        assert not isinstance(command.command, QuickStart)
        calls: list[tuple[list[str], Path | None]] = []

        def recorded(args: list[str], pgdata: Path | None = None, **_: object) -> str:
            calls.append((args, pgdata))
            return "recorded"

        quick = QuickStart(recorded)
        assert quick(["-w", "stop"], pgdata=tmp_path) == "recorded"
        assert quick(["-W", "start"], pgdata=tmp_path) == "recorded"
        assert calls == [(["-w", "stop"], tmp_path), (["-W", "start"], tmp_path)]


class TestCollection:
    def test_no_cyclic_collection_runs_while_the_command_and_the_daemon_are_imported(
        self,
    ) -> None:
        """``python -m nproxyd`` runs no cyclic garbage collection from its first import until
        the daemon is imported, and collects again afterwards."""
        probe = (
            "import gc, json, runpy, sys\n"
            "seen = []\n"
            "gc.callbacks.append(lambda phase, info: phase == 'start'"
            " and seen.append('nproxyd.app' in sys.modules))\n"
            "sys.argv = ['nproxyd', 'check-config']\n"
            "try:\n"
            "    runpy.run_module('nproxyd', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(json.dumps({'before_app': seen.count(False), 'enabled': gc.isenabled()}))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "NPROXYD_CONFIG": ""},
        )
        assert json.loads(result.stdout.splitlines()[-1]) == {"before_app": 0, "enabled": True}

    @pytest.mark.parametrize(
        ("collecting", "keep", "expected"),
        [(True, True, [True, True]), (True, False, [True, False]), (False, True, [False, False])],
    )
    def test_collection_resumes_as_it_was_with_the_daemon_s_start_up_frozen(
        self, collecting: bool, keep: bool, expected: list[bool]
    ) -> None:
        """After the imports collection is on again only if it was before; for the daemon
        (``keep``) what start-up allocated is frozen first, so no collection scans it again."""
        probe = (
            "import gc, json\n"
            "from nproxyd.cli import resume_collection\n"
            "gc.disable()\n"
            f"resume_collection({collecting}, keep={keep})\n"
            "print(json.dumps([gc.isenabled(), gc.get_freeze_count() > 0]))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        )
        assert json.loads(result.stdout) == expected


class TestSignals:
    def test_run_ignores_the_noted_signals_before_reading_its_configuration(self) -> None:
        """``nproxyd run`` ignores SIGHUP/SIGUSR1/SIGUSR2 from the moment the command is known,
        so none of them can stop it while it starts (here: even when the configuration then
        turns out to be wrong)."""
        code = (
            "import os, signal\n"
            "from nproxyd import cli\n"
            "os.environ['NPROXYD__DAEMON__MAX_RESTARTS'] = 'many'\n"
            "assert cli.main(['run']) == cli.EXIT_CONFIG\n"
            "ignored = [signal.getsignal(s) == signal.SIG_IGN for s in "
            "(signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)]\n"
            "assert all(ignored), ignored\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, env=os.environ)
