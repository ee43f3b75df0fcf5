"""The composition root: config -> pool -> stores -> adapters -> queues -> actors.

Nothing else imports everything. ``open_components`` is shared by ``nproxyd run`` and the
one-shot commands, so a one-shot tick runs exactly the code the daemon runs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import msgspec
import platformdirs
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from nproxyd.actors.invoice_expirer import InvoiceExpirer
from nproxyd.actors.key_pool_recoverer import KeyPoolRecoverer, KeyPoolSettings
from nproxyd.actors.mail_sender import MailSender, MailSettings
from nproxyd.actors.payment_watcher import (
    PaymentWatcher,
    PaymentWatcherPorts,
    PaymentWatcherSettings,
)
from nproxyd.actors.renewal_scheduler import RenewalScheduler, RenewalSettings
from nproxyd.adapters.balance_simulated import SimulatedBalanceProbe
from nproxyd.adapters.dry_run import DryRunProvider, DryRunTransport
from nproxyd.adapters.mail_maildir import MaildirTransport
from nproxyd.adapters.mail_smtp import SmtpTransport
from nproxyd.adapters.nowpayments_status import NowPaymentsIpnVerifier, NowPaymentsStatus
from nproxyd.adapters.payment_nowpayments import NowPaymentsProvider
from nproxyd.adapters.payment_simulated import SimulatedPaymentProvider
from nproxyd.adapters.status_simulated import SimulatedPaymentStatus
from nproxyd.core.budget import RequestBudget
from nproxyd.core.channels import Outbox
from nproxyd.core.clock import Clock, SystemClock
from nproxyd.core.config import Config, secrets_of
from nproxyd.core.errors import ConfigError
from nproxyd.core.messages import OutboxReady
from nproxyd.core.ports import IpnVerifier, MailTransport, PaymentProvider, PaymentStatusSource
from nproxyd.runtime.actor import Actor
from nproxyd.runtime.daemon import Daemon
from nproxyd.store.database import Database, RolledBackDatabase, create_pool, driver_dsn_problem
from nproxyd.store.embedded import start_embedded
from nproxyd.store.migrate import migrate_pool
from nproxyd.store.payments import PaymentStore
from nproxyd.store.stores import HealthStore, InvoiceStore, KeyStore, OutboxStore, RenewalStore

OUTBOX_READY_BUFFER = 64


class Stores(msgspec.Struct, frozen=True, kw_only=True):
    invoices: InvoiceStore
    keys: KeyStore
    renewals: RenewalStore
    outbox: OutboxStore
    health: HealthStore
    payments: PaymentStore

    @classmethod
    def for_database(cls, db: Database) -> Stores:
        return cls(
            invoices=InvoiceStore(db),
            keys=KeyStore(db),
            renewals=RenewalStore(db),
            outbox=OutboxStore(db),
            health=HealthStore(db),
            payments=PaymentStore(db),
        )


class Components(msgspec.Struct, frozen=True, kw_only=True):
    config: Config
    clock: Clock
    instance_id: str
    db: Database
    stores: Stores
    outbox_ready: Outbox
    outbox_ready_receiver: MemoryObjectReceiveStream[OutboxReady]
    actors: dict[str, Actor]
    provider: PaymentProvider
    transport: MailTransport
    dry_run: bool = False
    # None: migrations were not run at start-up; else the versions this start applied.
    migrations_applied: list[int] | None = None
    session_dsn: str | None = None
    mail_due: Outbox | None = None


def state_dir(config: Config) -> Path:
    return Path(config.daemon.state_dir or platformdirs.user_state_dir("nproxyd"))


def instance_id(config: Config) -> str:
    return config.daemon.instance_id or f"{socket.gethostname()}-{os.getpid()}"


async def resolve_dsn(config: Config) -> str:
    """The configured DSN, or the embedded server's when none is configured."""
    if config.database.dsn:
        return config.database.dsn
    return await start_embedded(state_dir(config))


async def open_database(
    config: Config,
    *,
    auto_migrate: bool,
    dsn: str | None = None,
    on_migrated: Callable[[list[int]], None] | None = None,
) -> Database:
    dsn = dsn or await resolve_dsn(config)
    pool = await create_pool(
        dsn,
        max_size=config.database.pool_max_size,
        timeout_seconds=config.database.connect_timeout_seconds,
        pooler=config.database.pooler,
    )
    if auto_migrate:
        try:
            applied = await migrate_pool(
                pool,
                direct_dsn=config.database.direct_dsn,
                sessions=config.database.pooler == "none",
                connect_timeout_seconds=config.database.connect_timeout_seconds,
            )
        except Exception:
            await pool.close()
            raise
        if on_migrated is not None:
            on_migrated(applied)
    return Database(pool)


def session_dsn(config: Config, dsn: str) -> str | None:
    """Where a session of its own (migration lock, LISTEN) is possible: None behind a pooler
    without ``database.direct_dsn``."""
    if config.database.direct_dsn:
        return config.database.direct_dsn
    return dsn if config.database.pooler == "none" else None


def payment_provider(config: Config, clock: Clock) -> PaymentProvider:
    if config.billing.payment_provider == "nowpayments":  # its API key: core.config.validate
        return NowPaymentsProvider(
            config.payment.nowpayments, budget=nowpayments_budget(config, clock)
        )
    return SimulatedPaymentProvider(config.payment.simulated, clock.sleep)


def mail_transport(config: Config) -> MailTransport:
    if config.email.transport == "smtp":
        return SmtpTransport(config.email.smtp)
    path = config.email.maildir.path or str(state_dir(config) / "maildir")
    return MaildirTransport(Path(path))


def mail_concurrency(config: Config) -> int:
    """Mail sends in flight: two per SMTP connection, so that one message's body and the next
    message's envelope share a write when the server offers PIPELINING."""
    return 2 * config.email.smtp.max_connections if config.email.transport == "smtp" else 4


def build_actors(
    config: Config,
    *,
    clock: Clock,
    stores: Stores,
    instance: str,
    outbox: Outbox,
    provider: PaymentProvider,
    transport: MailTransport,
) -> dict[str, Actor]:
    actors_config = config.actors
    expirer = InvoiceExpirer(
        stores.invoices,
        interval_seconds=actors_config.invoice_expirer.interval_seconds,
        batch_size=actors_config.invoice_expirer.batch_size,
    )
    renewal = RenewalScheduler(
        stores.renewals,
        provider,
        RenewalSettings.from_config(config, instance),
        clock=clock,
        outbox=outbox,
    )
    mail = MailSender(
        stores.outbox,
        transport,
        MailSettings.from_config(config, instance, mail_concurrency(config)),
        clock=clock,
    )
    keys = KeyPoolRecoverer(
        stores.keys,
        SimulatedBalanceProbe(),
        KeyPoolSettings(
            interval_seconds=actors_config.key_pool_recoverer.interval_seconds,
            cooldown_minutes=config.key_pool.cooldown_minutes,
            failures_before_manual_review=config.key_pool.failures_before_manual_review,
            balance_poll_seconds=config.key_pool.balance_poll_seconds,
            probe_concurrency=config.key_pool.balance_probe_concurrency,
        ),
    )
    watcher = build_payment_watcher(config, clock, stores, outbox, provider)
    return {actor.name: actor for actor in (expirer, renewal, mail, keys, watcher)}


def enabled(config: Config, name: str) -> bool:
    section = getattr(config.actors, name.replace("-", "_"))
    return bool(section.enabled)


@asynccontextmanager
async def open_components(
    config: Config, clock: Clock, *, auto_migrate: bool | None = None, dry_run: bool = False
) -> AsyncIterator[Components]:
    """Build every component; closes what it opened on exit.

    ``dry_run``: no migration, every statement rolled back, no provider call, no mail sent.
    """
    migrate_now = config.database.auto_migrate if auto_migrate is None else auto_migrate
    async with AsyncExitStack() as stack:
        applied: list[list[int]] = []
        dsn = await resolve_dsn(config)
        db = await open_database(
            config, auto_migrate=migrate_now and not dry_run, dsn=dsn, on_migrated=applied.append
        )
        if dry_run:
            db = await _rolled_back(db)
        stack.push_async_callback(db.close)
        stores = Stores.for_database(db)
        provider, transport = _adapters(config, clock, dry_run=dry_run)
        stack.push_async_callback(provider.aclose)
        stack.push_async_callback(transport.aclose)
        sender: MemoryObjectSendStream[OutboxReady]
        sender, receiver = anyio.create_memory_object_stream[OutboxReady](OUTBOX_READY_BUFFER)
        stack.enter_context(sender)
        stack.enter_context(receiver)
        instance = instance_id(config)
        outbox = Outbox(sender)
        mail_due = Outbox(stack.enter_context(sender.clone()))
        actors = build_actors(
            config,
            clock=clock,
            stores=stores,
            instance=instance,
            outbox=outbox,
            provider=provider,
            transport=transport,
        )
        yield Components(
            config=config,
            clock=clock,
            instance_id=instance,
            db=db,
            stores=stores,
            outbox_ready=outbox,
            outbox_ready_receiver=receiver,
            actors=actors,
            provider=provider,
            transport=transport,
            dry_run=dry_run,
            migrations_applied=applied[0] if applied else None,
            session_dsn=session_dsn(config, dsn),
            mail_due=mail_due,
        )


def dsn_host(dsn: str) -> str:
    """The host part of a DSN (URL or ``key=value`` form), never its credentials."""
    if "://" in dsn:
        try:
            return urlsplit(dsn).hostname or "localhost"
        except ValueError:
            return "unparsable"
    for part in dsn.split():
        key, _, value = part.partition("=")
        if key == "host":
            return value
    return "localhost"


def startup_facts(config: Config, components: Components) -> dict[str, Any]:
    """What ``daemon_started`` says about this start (no secret: the database host only)."""
    applied = components.migrations_applied
    return {
        "state_dir": str(state_dir(config)),
        "database": "external" if config.database.dsn else "embedded",
        "database_host": dsn_host(config.database.dsn) if config.database.dsn else None,
        "payment_provider": config.billing.payment_provider,
        "mail_transport": config.email.transport,
        "migrations": "not run (database.auto_migrate = false)"
        if applied is None
        else (f"applied {applied}" if applied else "up to date"),
    }


async def _rolled_back(db: Database) -> Database:
    try:
        return await RolledBackDatabase.open(db.pool)
    except BaseException:
        await db.close()
        raise


def _adapters(
    config: Config, clock: Clock, *, dry_run: bool
) -> tuple[PaymentProvider, MailTransport]:
    if dry_run:
        return DryRunProvider(config.billing.payment_provider), DryRunTransport()
    return payment_provider(config, clock), mail_transport(config)


def preflight(config: Config) -> None:
    """The checks of ``load`` that need the driver: the DSN parsed by asyncpg itself.

    Run by every command right after loading the configuration (``run`` and ``check-config``
    alike); raises :class:`ConfigError` naming ``database.dsn``, never quoting it.
    """
    if config.database.dsn:
        problem = driver_dsn_problem(config.database.dsn, secrets_of(config))
        if problem:
            raise ConfigError("database.dsn", problem)


def effective(config: Config) -> Config:
    """The configuration with the paths nproxyd derives filled in (state dir, maildir)."""
    state = state_dir(config)
    maildir = config.email.maildir.path or str(state / "maildir")
    return msgspec.structs.replace(
        config,
        daemon=msgspec.structs.replace(config.daemon, state_dir=str(state)),
        email=msgspec.structs.replace(
            config.email, maildir=msgspec.structs.replace(config.email.maildir, path=maildir)
        ),
    )


async def run_daemon(config: Config) -> int:
    """``nproxyd run``: build everything, supervise the actors, serve HTTP until a signal."""
    clock = SystemClock()
    async with open_components(config, clock) as components:
        names = [name for name in components.actors if enabled(config, name)]
        daemon = Daemon(
            config=config,
            clock=clock,
            instance_id=components.instance_id,
            actors={name: components.actors[name] for name in names},
            wake={"mail-sender": components.outbox_ready_receiver},
            payments=components.stores.payments,
            ipn=ipn_sink(config, components.actors),
            health=components.stores.health,
            outbox=components.stores.outbox,
            keys=components.stores.keys,
            channel=components.outbox_ready,
            startup=startup_facts(config, components),
            listen_dsn=listen_dsn(config, components),
            notify_wake=_waker(components.mail_due),
        )
        return await daemon.run()


def listen_dsn(config: Config, components: Components) -> str | None:
    """The DSN of the NOTIFY listener; None (with one warning) when it cannot have one."""
    if components.session_dsn is None and enabled(config, "mail-sender"):
        structlog.get_logger().warning(
            "listener_disabled",
            reason="database.pooler = pgbouncer without database.direct_dsn",
            fallback="mail-sender sweep",
        )
    return components.session_dsn


def _waker(channel: Outbox | None) -> Callable[[], object] | None:
    if channel is None:
        return None
    return lambda: channel.offer(OutboxReady(count=0))


# The payment watcher (docs/design.md: the fifth actor).
PAYMENT_CHECK_BATCH = 200  # checks leased per batch
PAYMENT_CHECK_LEASE_SECONDS = 300.0  # a batch's checks are not taken by another instance


def nowpayments_budget(config: Config, clock: Clock) -> RequestBudget:
    """One request budget for every call to the NOWPayments account."""
    return RequestBudget(config.payment.nowpayments.max_requests_per_second, clock)


def payment_status_source(config: Config, provider: PaymentProvider) -> PaymentStatusSource:
    if isinstance(provider, DryRunProvider):
        return provider
    if isinstance(provider, NowPaymentsProvider):
        return NowPaymentsStatus(
            config.payment.nowpayments, session=provider.session, budget=provider.budget
        )
    return SimulatedPaymentStatus(config.payment.simulated)


def ipn_verifier(config: Config) -> IpnVerifier | None:
    secret = config.payment.nowpayments.ipn_secret
    return NowPaymentsIpnVerifier(secret) if secret else None


def payment_watcher_settings(config: Config) -> PaymentWatcherSettings:
    section = config.actors.payment_watcher
    return PaymentWatcherSettings(
        interval_seconds=section.interval_seconds,
        min_check_seconds=section.min_check_seconds,
        max_check_seconds=section.max_check_seconds,
        grace_hours=section.grace_hours,
        payment_provider=config.billing.payment_provider,
        provider_concurrency=config.billing.provider_concurrency,
        operator_email=config.billing.operator_email,
        from_address=config.email.from_address,
        batch_size=PAYMENT_CHECK_BATCH,
        lease_seconds=PAYMENT_CHECK_LEASE_SECONDS,
    )


def build_payment_watcher(
    config: Config, clock: Clock, stores: Stores, outbox: Outbox, provider: PaymentProvider
) -> PaymentWatcher:
    ports = PaymentWatcherPorts(
        store=stores.payments,
        source=payment_status_source(config, provider),
        verifier=ipn_verifier(config),
        outbox=outbox,
    )
    return PaymentWatcher(payment_watcher_settings(config), ports, clock)


def ipn_sink(config: Config, actors: dict[str, Actor]) -> PaymentWatcher | None:
    """The payment watcher when the IPN listener is on (even if it does not poll here)."""
    watcher = actors.get(PaymentWatcher.name)
    if not config.ipn.listen or not isinstance(watcher, PaymentWatcher):
        return None
    return watcher
