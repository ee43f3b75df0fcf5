"""The ``nproxyd`` command line."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, overload

import msgspec

from nproxyd.core.clock import Clock, SystemClock, parse_instant
from nproxyd.core.config import (
    Config,
    load,
    redact_text,
    redacted,
    secrets_of,
    state_directory,
)
from nproxyd.core.errors import (
    ConfigError,
    NproxydError,
    OperatorMustFix,
    SupervisorGaveUp,
    TemporaryFailure,
    Unavailable,
    UsageError,
)
from nproxyd.core.text import is_storable, json_printable
from nproxyd.runtime.signals import ignore_noted_signals
from nproxyd.store.embedded_process import start_early

if TYPE_CHECKING:
    from nproxyd import app

# Start-up (docs/benchmarks.md "Start-up"): this module imports only the configuration's
# modules; the daemon (``nproxyd.app`` and the drivers under it) is imported once the
# configuration is read, after ``nproxyd run`` began starting the embedded server.

EXIT_OK = 0
EXIT_FAILURE = 1  # anything else that went wrong (a database error, a bug): one line on stderr
EXIT_NOT_READY = 1  # `status`: the daemon answered but is not ready
EXIT_USAGE = 64
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78
# The one table from error classes to exit codes (docs/operations.md "Exit codes"): the first
# matching base class decides the code and the prefix of the one stderr line.
EXIT_CODES: tuple[tuple[type[NproxydError], int, str], ...] = (
    (OperatorMustFix, EXIT_CONFIG, "config error: "),
    (UsageError, EXIT_USAGE, "error: "),
    (TemporaryFailure, EXIT_TEMPFAIL, ""),
    (Unavailable, EXIT_UNAVAILABLE, ""),
    (SupervisorGaveUp, EXIT_SOFTWARE, ""),
    (NproxydError, EXIT_FAILURE, ""),
)
# The commands that always open the database: with the embedded server, its start begins in
# a thread as soon as the configuration is read, while the rest of nproxyd is imported.
OPENS_DATABASE = frozenset({"run", "migrate", "once", "mail", "payments"})
MAX_FUTURE = timedelta(minutes=5)
MAX_DISTANCE = timedelta(days=100 * 366)  # any --now: within a century of the real clock
MAX_LIMIT = 100_000
MAX_ID_LENGTH = 200
ONCE_HELP = """\
Run one tick of one actor against the configured database, exactly as the daemon would, and
print its report as one JSON line. This WRITES: it expires invoices, creates renewal invoices
at the payment provider, sends mail. Use --dry-run to see what a tick would do without any of
that. --now more than 5 minutes ahead of the real clock is refused unless --allow-future is
given (rows would be stamped in the future)."""


def __getattr__(name: str) -> Any:
    if name == "ACTORS":  # the actor names, from the registry
        from nproxyd import app  # noqa: PLC0415

        return app.ACTOR_NAMES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _ActorNames(Sequence[str]):
    """The choices of ``once ACTOR``: the registry's names, read when the parser uses them."""

    @staticmethod
    def _names() -> tuple[str, ...]:
        from nproxyd import app  # noqa: PLC0415

        return app.ACTOR_NAMES

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()


class _Version(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **_: Any) -> None:
        help_text = "show program's version number and exit"
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help_text)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        from nproxyd import __version__  # noqa: PLC0415

        sys.stdout.write(f"nproxyd {__version__}\n")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nproxyd", description="The background daemon of nproxy.")
    parser.add_argument("-c", "--config", help="TOML config file (else $NPROXYD_CONFIG)")
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("run", help="run the daemon in the foreground")
    commands.add_parser("migrate", help="apply schema migrations")
    commands.add_parser("check-config", help="validate and print the effective config")
    once = commands.add_parser(
        "once", help="run one tick of one actor (writes; see --dry-run)", description=ONCE_HELP
    )
    # The choices are set after add_argument, which would otherwise read them at once.
    once.add_argument("actor").choices = _ActorNames()
    once.add_argument("--now", type=_instant, help="ISO-8601 time of the tick")
    once.add_argument(
        "--dry-run",
        action="store_true",
        help="report what the tick would do: roll back every write, call no provider, send no mail",
    )
    once.add_argument(
        "--allow-future",
        action="store_true",
        help="accept --now more than 5 minutes ahead of the real clock",
    )
    mail = commands.add_parser("mail", help="operate on the mail outbox")
    mail_commands = mail.add_subparsers(dest="mail_command", required=True, parser_class=_Parser)
    dead = mail_commands.add_parser("dead", help="list dead mail")
    dead.add_argument("--limit", type=_positive, default=50)
    retry = mail_commands.add_parser("retry", help="put dead mail back to pending")
    retry.add_argument("ids", nargs="*", metavar="ID", type=_mail_id)
    retry.add_argument("--all-dead", action="store_true")
    status = commands.add_parser(
        "status",
        help="show /status of a running daemon (exit 0 ready, 1 not ready, 69 unreachable)",
    )
    status.add_argument(
        "--url", help="base URL or the full /status URL (default: from http.listen)"
    )
    status.add_argument("--json", action="store_true", help="print the /status JSON as it is")
    _add_payments_parser(commands)
    return parser


def _instant(text: str) -> datetime:
    try:
        value = parse_instant(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    try:
        distance = abs(value - SystemClock().now())
    except OverflowError:
        distance = MAX_DISTANCE + MAX_DISTANCE
    if distance > MAX_DISTANCE:
        raise argparse.ArgumentTypeError(f"not within 100 years of now: {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"not a number from 1 to {MAX_LIMIT}: {text!r}")
    return int(text)


def _mail_id(text: str) -> str:
    if not text or len(text) > MAX_ID_LENGTH or not is_storable(text):
        raise argparse.ArgumentTypeError(f"not a mail id: {text!r}")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    collecting = gc.isenabled()
    gc.disable()  # none while the daemon is imported (see nproxyd/__main__.py)
    prepared: int | tuple[argparse.Namespace, Config] = EXIT_USAGE
    try:
        prepared = _prepare(argv)
    finally:
        daemon = isinstance(prepared, tuple) and prepared[0].command == "run"
        resume_collection(collecting, keep=daemon)
    if isinstance(prepared, int):
        return prepared
    return _dispatch(*prepared)


def _prepare(argv: Sequence[str] | None) -> int | tuple[argparse.Namespace, Config]:
    """The command and its configuration, with the daemon imported; or an exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        ignore_noted_signals()  # SIGHUP/SIGUSR1/SIGUSR2 never stop the daemon, also while starting
    if args.command == "mail" and args.mail_command == "retry" and bool(args.ids) == args.all_dead:
        print("nproxyd: error: give mail ids or --all-dead (not both)", file=sys.stderr)
        return EXIT_USAGE
    usage = _usage_problem(args)
    if usage:
        print(f"nproxyd: error: {usage}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load(args.config or os.environ.get("NPROXYD_CONFIG"), os.environ)
        if args.command in OPENS_DATABASE and not config.database.dsn:
            start_early(state_directory(config))
        import_structlog_plainly()
        from nproxyd import app  # noqa: PLC0415

        app.preflight(config)
    except ConfigError as exc:
        print(f"nproxyd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return args, config


def resume_collection(collecting: bool, *, keep: bool) -> None:
    """Collect cycles again after the imports, if the caller did.

    With ``keep`` (the daemon) what start-up allocated is frozen first: it lives as long as
    the process, and the first collection would otherwise scan all of it at once (~10 ms,
    docs/benchmarks.md "Start-up"). Later collections never look at it again.
    """
    if not collecting:
        return
    if keep:
        gc.freeze()
    gc.enable()


# structlog imports rich, colorama and better_exceptions at its own import when they are
# installed, for the colours and tracebacks of its development console renderer. nproxyd uses
# none of them (its console renderer is colourless with plain tracebacks, runtime/logs.py), and
# rich alone cost ~30-50 ms of every start where a development tool had installed it
# (docs/benchmarks.md "Start-up").
STRUCTLOG_EXTRAS = ("rich", "colorama", "better_exceptions")


def import_structlog_plainly() -> None:
    """Import structlog as if its optional extras were not installed; they stay importable
    for anything else. Nothing when structlog is already imported."""
    if "structlog" in sys.modules:
        return
    hidden = [name for name in STRUCTLOG_EXTRAS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import structlog  # noqa: F401, PLC0415
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What the parser cannot check alone: ``--now`` too far in the future."""
    if args.command == "once" and args.now is not None and not args.allow_future:
        ahead = args.now - SystemClock().now()
        if ahead > MAX_FUTURE:
            return (
                f"--now is {ahead} ahead of the real clock; rows would be stamped in the "
                "future (give --allow-future if that is what you want)"
            )
    return None


def exit_code(error: NproxydError) -> tuple[int, str]:
    """The exit code and stderr prefix of ``error`` (the first matching row of EXIT_CODES)."""
    return next((code, prefix) for kind, code, prefix in EXIT_CODES if isinstance(error, kind))


def project_error(exc: BaseException) -> NproxydError | None:
    """``exc`` itself, or the first project error inside a (nested) exception group."""
    if isinstance(exc, NproxydError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = project_error(inner)
            if found is not None:
                return found
    return None


def _dispatch(args: argparse.Namespace, config: Config) -> int:
    import anyio  # noqa: PLC0415

    from nproxyd import app  # noqa: PLC0415
    from nproxyd.runtime import logs  # noqa: PLC0415

    secrets = secrets_of(config)
    one_shot = args.command != "run"
    logs.configure(
        level=config.log.level,
        fmt=config.log.format,
        instance=app.instance_id(config),
        secrets=secrets,
        stream=sys.stderr if one_shot else sys.stdout,
    )
    command = COMMANDS[args.command]
    try:
        return anyio.run(command, args, config)
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        error = project_error(exc)
        if error is None:
            raise
        code, prefix = exit_code(error)
        print(f"nproxyd: {prefix}{redact_text(str(error), secrets)}", file=sys.stderr)
        return code


def _print_json(value: Any) -> None:
    # Unprintable characters (a C1 control such as CSI U+009B) as \u escapes: the same JSON.
    sys.stdout.write(json_printable(msgspec.json.encode(value).decode()) + "\n")
    sys.stdout.flush()


async def cmd_check_config(_: argparse.Namespace, config: Config) -> int:
    from nproxyd import app  # noqa: PLC0415

    _print_json(redacted(app.effective(config)))
    return EXIT_OK


async def cmd_migrate(_: argparse.Namespace, config: Config) -> int:
    import structlog  # noqa: PLC0415

    from nproxyd import app  # noqa: PLC0415

    db = await app.open_database(config, auto_migrate=True)
    await db.close()
    structlog.get_logger().info("migrations_applied")
    return EXIT_OK


async def cmd_once(args: argparse.Namespace, config: Config) -> int:
    from nproxyd import app  # noqa: PLC0415

    clock: Clock = SystemClock()
    async with app.open_components(config, clock, dry_run=args.dry_run) as components:
        actor = components.actors[args.actor]
        report = await actor.tick(args.now or clock.now())
        line = {"actor": args.actor, **msgspec.to_builtins(report)}
        if components.dry_run:
            line.update(dry_run_summary(components))
    _print_json(line)
    return EXIT_OK


def dry_run_summary(components: app.Components) -> dict[str, Any]:
    """What a dry run would have done outside the database."""
    provider = components.provider
    transport = components.transport
    return {
        "dry_run": True,
        "provider_calls_skipped": len(getattr(provider, "calls", ())),
        "mail_not_sent": len(getattr(transport, "recipients", ())),
    }


async def cmd_mail_dead(args: argparse.Namespace, config: Config) -> int:
    from nproxyd import app  # noqa: PLC0415

    db = await app.open_database(config, auto_migrate=config.database.auto_migrate)
    try:
        rows = await app.Stores.for_database(db).outbox.dead(args.limit)
    finally:
        await db.close()
    for row in rows:
        _print_json(msgspec.to_builtins(row))
    if not rows:
        print("no dead mail", file=sys.stderr)
    return EXIT_OK


async def cmd_mail_retry(args: argparse.Namespace, config: Config) -> int:
    import structlog  # noqa: PLC0415

    from nproxyd import app  # noqa: PLC0415

    db = await app.open_database(config, auto_migrate=config.database.auto_migrate)
    try:
        ids = None if args.all_dead else list(args.ids)
        retried = await app.Stores.for_database(db).outbox.retry(ids, SystemClock().now())
    finally:
        await db.close()
    structlog.get_logger().info(
        "dead_mail_retried",
        retried_count=len(retried),
        mail_ids=retried,
        requested_by=os.environ.get("SUDO_USER") or os.environ.get("USER", "unknown"),
    )
    _print_json({"retried": retried})
    missing = sorted(set(args.ids) - set(retried))
    if missing:
        print(f"nproxyd: not dead (left alone): {' '.join(missing)}", file=sys.stderr)
    return EXIT_OK


async def cmd_mail(args: argparse.Namespace, config: Config) -> int:
    if args.mail_command == "dead":
        return await cmd_mail_dead(args, config)
    return await cmd_mail_retry(args, config)


async def cmd_run(_: argparse.Namespace, config: Config) -> int:
    from nproxyd import app  # noqa: PLC0415

    return await app.run_daemon(config)


async def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from nproxyd.runtime.status import fetch_status, render, status_url  # noqa: PLC0415

    status = await fetch_status(status_url(args.url or f"http://{config.http.listen}"))
    if args.json:
        _print_json(status)
    else:
        sys.stdout.write(render(status))
    return EXIT_OK if status.get("ready") is True else EXIT_NOT_READY


def _add_payments_parser(commands: Any) -> None:
    payments = commands.add_parser("payments", help="what the payment provider reports")
    payment_commands = payments.add_subparsers(
        dest="payments_command", required=True, parser_class=_Parser
    )
    awaiting = payment_commands.add_parser(
        "awaiting", help="invoices paid at the provider that wait for activation"
    )
    awaiting.add_argument("--json", action="store_true", help="one JSON object per line")
    show = payment_commands.add_parser("show", help="one invoice's payment status history")
    show.add_argument("invoice_id", metavar="INVOICE_ID")


async def cmd_payments(args: argparse.Namespace, config: Config) -> int:
    from nproxyd import app  # noqa: PLC0415
    from nproxyd.runtime.payments_view import render_awaiting, render_show  # noqa: PLC0415

    db = await app.open_database(config, auto_migrate=config.database.auto_migrate)
    try:
        store = app.Stores.for_database(db).payments
        if args.payments_command == "awaiting":
            rows = await store.awaiting()
            sys.stdout.write(render_awaiting(rows, as_json=args.json, now=SystemClock().now()))
            return EXIT_OK
        state = await store.state(args.invoice_id)
        history = await store.history(args.invoice_id) if state is not None else []
    finally:
        await db.close()
    if state is None:
        print(f"nproxyd: no invoice {args.invoice_id}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(render_show(state, history))
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Config], Awaitable[int]]] = {
    "run": cmd_run,
    "migrate": cmd_migrate,
    "check-config": cmd_check_config,
    "once": cmd_once,
    "mail": cmd_mail,
    "status": cmd_status,
    "payments": cmd_payments,
}
