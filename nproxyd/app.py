"""The composition root: config -> pool -> stores -> adapters -> queues -> actors.

Nothing else imports everything. ``open_components`` is shared by ``nproxyd run`` and the
one-shot commands, so a one-shot tick runs exactly the code the daemon runs.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio._backends._asyncio  # anyio.run would import it after the server is up
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from nproxyd.actors.invoice_expirer import ExpirerPorts, ExpirerSettings, InvoiceExpirer
from nproxyd.actors.key_pool_recoverer import KeyPoolPorts, KeyPoolRecoverer, KeyPoolSettings
from nproxyd.actors.mail_sender import MailPorts, MailSender, MailSettings
from nproxyd.actors.payment_watcher import (
    PaymentWatcher,
    PaymentWatcherPorts,
    PaymentWatcherSettings,
)
from nproxyd.actors.renewal_scheduler import RenewalPorts, RenewalScheduler, RenewalSettings
from nproxyd.adapters.balance_simulated import SimulatedBalanceProbe
from nproxyd.adapters.dry_run import DryRunProvider, DryRunTransport
from nproxyd.core.budget import RequestBudget
from nproxyd.core.channels import Outbox
from nproxyd.core.clock import Clock, SystemClock
from nproxyd.core.config import Config, secrets_of, state_directory
from nproxyd.core.errors import ConfigError
from nproxyd.core.messages import OutboxReady
from nproxyd.core.ports import (
    IpnVerifier,
    MailTransport,
    NotifySessions,
    PaymentProvider,
    PaymentStatusSource,
)
from nproxyd.runtime.actor import Actor, ActorLoop, TickObserver
from nproxyd.runtime.daemon import Daemon, DaemonParts
from nproxyd.runtime.http import OpsServer
from nproxyd.runtime.ipn import IpnServer
from nproxyd.runtime.listener import MailDueListener
from nproxyd.runtime.memory import HeapTrimming, malloc_trim
from nproxyd.runtime.metrics import Metrics
from nproxyd.runtime.ops import Monitor, OpsQueries
from nproxyd.runtime.sdnotify import Notifier
from nproxyd.runtime.supervisor import Supervisor
from nproxyd.store.database import Database, RolledBackDatabase, create_pool, driver_dsn_problem
from nproxyd.store.embedded import start_embedded
from nproxyd.store.listener import mail_due_sessions
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
    return state_directory(config)


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
                dsn=dsn,
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


# The adapters are imported when built, only the configured ones: a process using the
# simulated provider and the maildir never loads the HTTP client's retry layer or the SMTP
# client (docs/benchmarks.md "Start-up").


def payment_provider(config: Config, clock: Clock) -> PaymentProvider:
    if config.billing.payment_provider == "nowpayments":  # its API key: core.config.validate
        from nproxyd.adapters.payment_nowpayments import NowPaymentsProvider  # noqa: PLC0415

        return NowPaymentsProvider(
            config.payment.nowpayments, budget=nowpayments_budget(config, clock)
        )
    from nproxyd.adapters.payment_simulated import SimulatedPaymentProvider  # noqa: PLC0415

    return SimulatedPaymentProvider(config.payment.simulated, clock.sleep)


def mail_transport(config: Config) -> MailTransport:
    if config.email.transport == "smtp":
        from nproxyd.adapters.mail_smtp import SmtpTransport  # noqa: PLC0415

        return SmtpTransport(config.email.smtp)
    from nproxyd.adapters.mail_maildir import MaildirTransport  # noqa: PLC0415

    path = config.email.maildir.path or str(state_dir(config) / "maildir")
    return MaildirTransport(Path(path))


def mail_concurrency(config: Config) -> int:
    """Mail sends in flight: three per SMTP connection (one whose envelope is on the wire, one
    whose body is, one waiting with the next envelope), so that when the server offers
    PIPELINING every message's body shares a write with the next message's envelope (with two,
    about a third of the bodies went out alone: 1.36 writes per message instead of 1.0)."""
    return 3 * config.email.smtp.max_connections if config.email.transport == "smtp" else 4


class Wiring(msgspec.Struct, frozen=True, kw_only=True):
    """What the actors are built from."""

    config: Config
    clock: Clock
    instance: str
    stores: Stores
    outbox: Outbox
    provider: PaymentProvider
    transport: MailTransport


class ActorEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One actor of the daemon: the one place that names it, its configuration section
    (``[actors.<section>]``, with its ``enabled`` flag), how it is built, and whether the
    in-process ``OutboxReady`` channel wakes it."""

    name: str
    section: str
    build: Callable[[Wiring], Actor]
    woken_by_outbox_ready: bool = False

    def enabled(self, config: Config) -> bool:
        return bool(getattr(config.actors, self.section).enabled)


S = TypeVar("S", bound=msgspec.Struct)


def settings_from(kind: type[S], *sections: msgspec.Struct, **values: Any) -> S:
    """An actor's settings, each field taken by its name from ``values`` or from the first
    section having that key: settings use the configuration's own key names and defaults."""
    fields: dict[str, Any] = {}
    for name in kind.__struct_fields__:
        if name in values:
            fields[name] = values[name]
            continue
        section = next((s for s in sections if name in s.__struct_fields__), None)
        if section is None:
            raise TypeError(f"{kind.__name__}.{name} names no key of the given sections")
        fields[name] = getattr(section, name)
    return kind(**fields)


def renewal_settings(config: Config, instance: str) -> RenewalSettings:
    return settings_from(
        RenewalSettings,
        config.actors.renewal_scheduler,
        config.billing,
        config.urls,
        config.email,
        instance_id=instance,
    )


def mail_settings(config: Config, instance: str) -> MailSettings:
    return settings_from(
        MailSettings,
        config.actors.mail_sender,
        config.email,
        instance_id=instance,
        concurrency=mail_concurrency(config),
    )


def _invoice_expirer(w: Wiring) -> Actor:
    settings = settings_from(ExpirerSettings, w.config.actors.invoice_expirer)
    return InvoiceExpirer(settings, ExpirerPorts(store=w.stores.invoices), w.clock)


def _renewal_scheduler(w: Wiring) -> Actor:
    ports = RenewalPorts(store=w.stores.renewals, provider=w.provider, outbox=w.outbox)
    return RenewalScheduler(renewal_settings(w.config, w.instance), ports, w.clock)


def _mail_sender(w: Wiring) -> Actor:
    ports = MailPorts(store=w.stores.outbox, transport=w.transport)
    return MailSender(mail_settings(w.config, w.instance), ports, w.clock)


def _key_pool_recoverer(w: Wiring) -> Actor:
    settings = settings_from(KeyPoolSettings, w.config.actors.key_pool_recoverer, w.config.key_pool)
    ports = KeyPoolPorts(store=w.stores.keys, probe=SimulatedBalanceProbe())
    return KeyPoolRecoverer(settings, ports, w.clock)


def _payment_watcher(w: Wiring) -> Actor:
    return build_payment_watcher(w.config, w.clock, w.stores, w.outbox, w.provider)


# The actor registry: ``run``, ``once``, the command line's choices and /status use it.
REGISTRY: tuple[ActorEntry, ...] = (
    ActorEntry(name=InvoiceExpirer.name, section="invoice_expirer", build=_invoice_expirer),
    ActorEntry(name=RenewalScheduler.name, section="renewal_scheduler", build=_renewal_scheduler),
    ActorEntry(
        name=MailSender.name,
        section="mail_sender",
        build=_mail_sender,
        woken_by_outbox_ready=True,
    ),
    ActorEntry(name=KeyPoolRecoverer.name, section="key_pool_recoverer", build=_key_pool_recoverer),
    ActorEntry(name=PaymentWatcher.name, section="payment_watcher", build=_payment_watcher),
)
ACTOR_NAMES: tuple[str, ...] = tuple(entry.name for entry in REGISTRY)


def build_actors(wiring: Wiring) -> dict[str, Actor]:
    """Every actor of :data:`REGISTRY`, built from ``wiring``."""
    return {entry.name: entry.build(wiring) for entry in REGISTRY}


def enabled(config: Config, name: str) -> bool:
    return next(entry for entry in REGISTRY if entry.name == name).enabled(config)


@asynccontextmanager
async def open_components(
    config: Config, clock: Clock, *, auto_migrate: bool | None = None, dry_run: bool = False
) -> AsyncIterator[Components]:
    """Build every component, closing what it opened on exit. ``dry_run``: no migration, every
    statement rolled back, no provider call, no mail sent."""
    migrate_now = config.database.auto_migrate if auto_migrate is None else auto_migrate
    async with AsyncExitStack() as stack:
        dsn = await resolve_dsn(config)
        db, applied = await _database(stack, config, dsn, migrate=migrate_now, dry_run=dry_run)
        stores = Stores.for_database(db)
        provider, transport = _adapters(config, clock, dry_run=dry_run)
        stack.push_async_callback(provider.aclose)
        stack.push_async_callback(transport.aclose)
        outbox, mail_due, receiver = _outbox_ready_channels(stack)
        wiring = Wiring(
            config=config,
            clock=clock,
            instance=instance_id(config),
            stores=stores,
            outbox=outbox,
            provider=provider,
            transport=transport,
        )
        yield Components(
            config=config,
            clock=clock,
            instance_id=wiring.instance,
            db=db,
            stores=stores,
            outbox_ready=outbox,
            outbox_ready_receiver=receiver,
            actors=build_actors(wiring),
            provider=provider,
            transport=transport,
            dry_run=dry_run,
            migrations_applied=applied,
            session_dsn=session_dsn(config, dsn),
            mail_due=mail_due,
        )


async def _database(
    stack: AsyncExitStack, config: Config, dsn: str, *, migrate: bool, dry_run: bool
) -> tuple[Database, list[int] | None]:
    """The pool (closed with ``stack``) and the migrations this start applied (None: not run)."""
    applied: list[list[int]] = []
    db = await open_database(
        config, auto_migrate=migrate and not dry_run, dsn=dsn, on_migrated=applied.append
    )
    db = await _rolled_back(db) if dry_run else db
    stack.push_async_callback(db.close)
    return db, applied[0] if applied else None


def _outbox_ready_channels(
    stack: AsyncExitStack,
) -> tuple[Outbox, Outbox, MemoryObjectReceiveStream[OutboxReady]]:
    """The in-process ``OutboxReady`` channel: the actors' sender, the NOTIFY listener's
    sender, and the mail sender's receiver (closed with ``stack``)."""
    sender: MemoryObjectSendStream[OutboxReady]
    sender, receiver = anyio.create_memory_object_stream[OutboxReady](OUTBOX_READY_BUFFER)
    stack.enter_context(sender)
    stack.enter_context(receiver)
    mail_due = Outbox(stack.enter_context(sender.clone()))
    return Outbox(sender), mail_due, receiver


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
        return await build_daemon(components).run()


def build_daemon(
    components: Components,
    *,
    replace: Mapping[str, Actor] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Daemon:
    """The daemon of ``nproxyd run``: the enabled actors (some swapped for ``replace``, a test
    seam) in supervised loops, the listener, the HTTP surfaces, sd_notify."""
    config, clock = components.config, components.clock
    actors = {**components.actors, **(replace or {})}
    enabled_actors = {e.name: actors[e.name] for e in REGISTRY if e.enabled(config)}
    metrics = Metrics(list(enabled_actors))
    for channel in (components.outbox_ready, components.mail_due):
        if channel is not None:
            channel.on_drop = metrics.messages_dropped.inc
    monitor = Monitor(clock, metrics)
    loops = _loops(components, enabled_actors, HeapTrimming(monitor, malloc_trim()))
    supervisor = _supervisor(config, clock, metrics)
    for name, loop in loops.items():
        supervisor.add(name, loop.run)
    listener = _listener(components, metrics, loops)
    if listener is not None:
        supervisor.add(listener.name, listener.run)
    else:
        metrics.without_listener()
    queries = _queries(components, loops, supervisor, monitor, listener)
    parts = DaemonParts(
        instance_id=components.instance_id,
        metrics=metrics,
        loops=loops,
        supervisor=supervisor,
        queries=queries,
        server=OpsServer(queries, config.http.listen),
        notifier=Notifier.from_environ(os.environ if environ is None else environ),
        ipn_server=_ipn_server(config, components.actors, metrics),
        shutdown_grace_seconds=config.daemon.shutdown_grace_seconds,
        environ=os.environ if environ is None else environ,
        startup=startup_facts(config, components),
    )
    return Daemon(parts, clock=clock)


def _loops(
    components: Components, actors: Mapping[str, Actor], monitor: TickObserver
) -> dict[str, ActorLoop]:
    woken = {entry.name for entry in REGISTRY if entry.woken_by_outbox_ready}
    return {
        name: ActorLoop(
            actor,
            components.clock,
            monitor,
            wake=components.outbox_ready_receiver if name in woken else None,
        )
        for name, actor in actors.items()
    }


def _supervisor(config: Config, clock: Clock, metrics: Metrics) -> Supervisor:
    return Supervisor(
        clock,
        max_restarts=config.daemon.max_restarts,
        restart_window_seconds=config.daemon.restart_window_seconds,
        on_restart=lambda name: metrics.restarts.labels(actor=name).inc(),
    )


def _listener(
    components: Components, metrics: Metrics, loops: Mapping[str, ActorLoop]
) -> MailDueListener | None:
    """The NOTIFY listener waking the mail sender, when it runs here and can have a session."""
    config = components.config
    if MailSender.name not in loops or components.mail_due is None:
        return None
    sessions = notify_sessions(config, components)
    if sessions is None:
        return None
    return MailDueListener(
        sessions,
        wake=_waker(components.mail_due),
        clock=components.clock,
        metrics=metrics,
        connect_timeout_seconds=config.database.connect_timeout_seconds,
    )


def _queries(
    components: Components,
    loops: dict[str, ActorLoop],
    supervisor: Supervisor,
    monitor: Monitor,
    listener: MailDueListener | None,
) -> OpsQueries:
    config = components.config
    return OpsQueries(
        clock=components.clock,
        instance_id=components.instance_id,
        loops=loops,
        supervisor=supervisor,
        monitor=monitor,
        health=components.stores.health,
        keys=components.stores.keys,
        channel=components.outbox_ready,
        settings=config.health,
        retry_windows=retry_windows(config),
        listener=listener,
        payments=components.stores.payments,
    )


def _ipn_server(config: Config, actors: Mapping[str, Actor], metrics: Metrics) -> IpnServer | None:
    sink = ipn_sink(config, dict(actors))
    return IpnServer(sink, config.ipn.listen, metrics.payments) if sink is not None else None


def retry_windows(config: Config) -> dict[str, float]:
    """How long a failing work item of each retrying actor can wait for its next attempt."""
    actors = config.actors
    return {
        RenewalScheduler.name: config.billing.retry_max_seconds
        + actors.renewal_scheduler.interval_seconds,
        MailSender.name: actors.mail_sender.retry_max_seconds + actors.mail_sender.interval_seconds,
        # A failing check is retried within max_check_seconds (doubling from min_check_seconds).
        PaymentWatcher.name: actors.payment_watcher.max_check_seconds
        + actors.payment_watcher.interval_seconds,
    }


def notify_sessions(config: Config, components: Components) -> NotifySessions | None:
    """The NOTIFY listener's sessions; None (with one warning) when it cannot have one."""
    if components.session_dsn is None and enabled(config, MailSender.name):
        structlog.get_logger().warning(
            "listener_disabled",
            reason="database.pooler = pgbouncer without database.direct_dsn",
            fallback="mail-sender sweep",
        )
    if components.session_dsn is None:
        return None
    return mail_due_sessions(
        components.session_dsn, timeout_seconds=config.database.connect_timeout_seconds
    )


def _waker(channel: Outbox) -> Callable[[], object]:
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
    nowpayments = sys.modules.get("nproxyd.adapters.payment_nowpayments")  # built it: loaded
    if nowpayments is not None and isinstance(provider, nowpayments.NowPaymentsProvider):
        from nproxyd.adapters.nowpayments_status import NowPaymentsStatus  # noqa: PLC0415

        return NowPaymentsStatus(
            config.payment.nowpayments, session=provider.session, budget=provider.budget
        )
    from nproxyd.adapters.status_simulated import SimulatedPaymentStatus  # noqa: PLC0415

    return SimulatedPaymentStatus(config.payment.simulated)


def ipn_verifier(config: Config) -> IpnVerifier | None:
    secret = config.payment.nowpayments.ipn_secret
    if not secret:
        return None
    from nproxyd.adapters.nowpayments_status import NowPaymentsIpnVerifier  # noqa: PLC0415

    return NowPaymentsIpnVerifier(secret)


def payment_watcher_settings(config: Config) -> PaymentWatcherSettings:
    return settings_from(
        PaymentWatcherSettings,
        config.actors.payment_watcher,
        config.billing,
        config.email,
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
