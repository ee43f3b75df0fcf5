"""The ``nproxyd`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import anyio
import msgspec
import structlog

from nproxyd import __version__, app
from nproxyd.core.clock import Clock, SystemClock, parse_instant
from nproxyd.core.config import Config, load, redact_text, redacted, secrets_of
from nproxyd.core.errors import (
    ConfigError,
    DatabaseUnavailable,
    NproxydError,
    SupervisorGaveUp,
)
from nproxyd.runtime import logs

EXIT_OK = 0
EXIT_USAGE = 64
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70
EXIT_CONFIG = 78
# The first matching class decides the exit code and the prefix of the one stderr line.
_EXITS: tuple[tuple[type[NproxydError], int, str], ...] = (
    (ConfigError, EXIT_CONFIG, "config error: "),
    (SupervisorGaveUp, EXIT_SOFTWARE, ""),
    (DatabaseUnavailable, EXIT_UNAVAILABLE, ""),
    (NproxydError, EXIT_SOFTWARE, ""),
)
ACTORS = (
    "invoice-expirer",
    "renewal-scheduler",
    "mail-sender",
    "key-pool-recoverer",
    "payment-watcher",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nproxyd", description="The background daemon of nproxy.")
    parser.add_argument("-c", "--config", help="TOML config file (else $NPROXYD_CONFIG)")
    parser.add_argument("--version", action="version", version=f"nproxyd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("run", help="run the daemon in the foreground")
    commands.add_parser("migrate", help="apply schema migrations")
    commands.add_parser("check-config", help="validate and print the effective config")
    once = commands.add_parser("once", help="run one tick of one actor")
    once.add_argument("actor", choices=ACTORS)
    once.add_argument("--now", type=_instant, help="ISO-8601 time of the tick")
    mail = commands.add_parser("mail", help="operate on the mail outbox")
    mail_commands = mail.add_subparsers(dest="mail_command", required=True, parser_class=_Parser)
    dead = mail_commands.add_parser("dead", help="list dead mail")
    dead.add_argument("--limit", type=_positive, default=50)
    retry = mail_commands.add_parser("retry", help="put dead mail back to pending")
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all-dead", action="store_true")
    status = commands.add_parser("status", help="show /status of a running daemon")
    status.add_argument("--url", help="base URL (default: from http.listen)")
    _add_payments_parser(commands)
    return parser


def _instant(text: str) -> Any:
    try:
        return parse_instant(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "mail" and args.mail_command == "retry" and bool(args.ids) == args.all_dead:
        print("nproxyd: error: give mail ids or --all-dead (not both)", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load(args.config or os.environ.get("NPROXYD_CONFIG"), os.environ)
    except ConfigError as exc:
        print(f"nproxyd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return _dispatch(args, config)


def _dispatch(args: argparse.Namespace, config: Config) -> int:
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
    except NproxydError as exc:
        code, prefix = next((c, p) for kind, c, p in _EXITS if isinstance(exc, kind))
        print(f"nproxyd: {prefix}{redact_text(str(exc), secrets)}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return EXIT_OK


def _print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    sys.stdout.flush()


async def cmd_check_config(_: argparse.Namespace, config: Config) -> int:
    _print_json(redacted(config))
    return EXIT_OK


async def cmd_migrate(_: argparse.Namespace, config: Config) -> int:
    db = await app.open_database(config, auto_migrate=True)
    await db.close()
    structlog.get_logger().info("migrations_applied")
    return EXIT_OK


async def cmd_once(args: argparse.Namespace, config: Config) -> int:
    clock: Clock = SystemClock()
    async with app.open_components(config, clock) as components:
        actor = components.actors[args.actor]
        report = await actor.tick(args.now or clock.now())
    _print_json({"actor": args.actor, **msgspec.to_builtins(report)})
    return EXIT_OK


async def cmd_mail_dead(args: argparse.Namespace, config: Config) -> int:
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
    return await app.run_daemon(config)


async def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from nproxyd.runtime.status import fetch_and_render  # noqa: PLC0415

    url = args.url or f"http://{config.http.listen}"
    text = await fetch_and_render(url)
    sys.stdout.write(text)
    return EXIT_OK


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
