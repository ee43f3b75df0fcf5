"""Prometheus metrics (docs/design.md §4), fed by tick outcomes and refreshed gauges.

Every family is in :data:`nproxyd.runtime.catalogue.CATALOGUE`. The gauges read from the
database are exposed only while the last read succeeded: a failed read removes them (and sets
``nproxyd_database_scrape_error`` to 1) instead of leaving the last value behind.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import msgspec

from nproxyd import __version__
from nproxyd.core.messages import (
    ExpirerReport,
    KeyPoolReport,
    MailReport,
    PaymentWatcherReport,
    RenewalReport,
    Report,
)
from nproxyd.runtime.actor import TickOutcome
from nproxyd.runtime.catalogue import BY_NAME
from nproxyd.runtime.payment_metrics import PaymentMetrics
from nproxyd.runtime.prometheus import Counter, Family, Gauge, Histogram, Registry, gauge_family

KEY_STATUSES = ("active", "cooldown", "manual_review", "disabled")
WAKEUP_SOURCES = ("notify", "local", "sweep")
MAIL_FAILURE_KINDS = ("transient", "permanent", "unavailable")
RENEWAL_FAILURE_KINDS = ("transient", "permanent")
CLAIM_STATES = ("claimed", "retry", "failed")
TICK_OUTCOMES = ("ok", "degraded", "error")
# Skipped candidates the report counts without naming a reason, or past the label bound.
UNNAMED_SKIP_REASON = "other"
MAX_SKIP_REASONS = 32

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _help(name: str) -> str:
    return BY_NAME[name].help


class DatabaseSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The database-backed gauges as read at one moment."""

    outbox_pending: int
    mail_dead: int
    oldest_pending_age_seconds: float
    renewal_claims: dict[str, int]
    provider_keys: dict[str, int]


class DatabaseGauges:
    """Exposes the last database read, or nothing at all when the last read failed."""

    def __init__(self) -> None:
        self.snapshot: DatabaseSnapshot | None = None

    def collect(self) -> Iterator[Family]:
        snapshot = self.snapshot
        if snapshot is None:
            return
        yield _single("nproxyd_outbox_pending", snapshot.outbox_pending)
        yield _single("nproxyd_mail_dead", snapshot.mail_dead)
        yield _single(
            "nproxyd_outbox_oldest_pending_age_seconds", snapshot.oldest_pending_age_seconds
        )
        yield _labelled("nproxyd_renewal_claims", "state", CLAIM_STATES, snapshot.renewal_claims)
        yield _labelled("nproxyd_provider_keys", "status", KEY_STATUSES, snapshot.provider_keys)


def _single(name: str, value: float) -> Family:
    return gauge_family(name, _help(name), value)


def _labelled(name: str, label: str, values: tuple[str, ...], counts: Mapping[str, int]) -> Family:
    family = gauge_family(name, _help(name))
    for value in (*values, *sorted(set(counts) - set(values))):
        family.add(counts.get(value, 0), {label: value})
    return family


class Metrics:
    """Every contract metric, on a registry of its own."""

    def __init__(self, actors: list[str]) -> None:
        self.registry = Registry()
        r = self.registry
        self._add_actor_metrics(r)
        self._add_work_metrics(r)
        self._skip_reasons: set[str] = set()
        self._add_failure_metrics(r)
        self._prime(actors)
        self._add_wakeup_metrics()
        self.payments = PaymentMetrics(r)

    def _add_actor_metrics(self, r: Registry) -> None:
        self.ticks = Counter(
            "nproxyd_actor_ticks",
            _help("nproxyd_actor_ticks_total"),
            ["actor", "outcome"],
            registry=r,
        )
        self.tick_duration = Histogram(
            "nproxyd_actor_tick_duration_seconds",
            "Duration of actor ticks.",
            ["actor"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.last_success = Gauge(
            "nproxyd_actor_last_success_timestamp_seconds",
            _help("nproxyd_actor_last_success_timestamp_seconds"),
            ["actor"],
            registry=r,
        )
        self.restarts = Counter(
            "nproxyd_actor_restarts",
            "Actor loops restarted by the supervisor.",
            ["actor"],
            registry=r,
        )

    def _add_work_metrics(self, r: Registry) -> None:
        self.invoices_expired = Counter(
            "nproxyd_invoices_expired", "Pending invoices marked expired.", registry=r
        )
        self.renewals_created = Counter(
            "nproxyd_renewal_invoices_created", "Automatic renewal invoices created.", registry=r
        )
        self.mail_sent = Counter("nproxyd_mail_sent", "Mail delivered.", registry=r)
        self.mail_failures = Counter(
            "nproxyd_mail_failures", "Failed delivery attempts by kind.", ["kind"], registry=r
        )
        self.mail_dead = Counter("nproxyd_mail_dead", "Mail given up as dead.", registry=r)
        self.queue_depth = Gauge(
            "nproxyd_mail_queue_depth",
            "OutboxReady messages waiting for the mail sender.",
            registry=r,
        )
        self.keys_recovered = Counter(
            "nproxyd_provider_keys_recovered",
            "Provider keys returned from cooldown.",
            registry=r,
        )
        self.ready = Gauge("nproxyd_ready", _help("nproxyd_ready"), registry=r)
        self.messages_dropped = Counter(
            "nproxyd_messages_dropped", "Actor messages dropped on a full channel.", registry=r
        )

    def _add_failure_metrics(self, r: Registry) -> None:
        self.renewal_failures = Counter(
            "nproxyd_renewal_failures",
            _help("nproxyd_renewal_failures_total"),
            ["kind"],
            registry=r,
        )
        self.renewal_skipped = Counter(
            "nproxyd_renewal_candidates_skipped",
            _help("nproxyd_renewal_candidates_skipped_total"),
            ["reason"],
            registry=r,
        )
        self.database_scrape_error = Gauge(
            "nproxyd_database_scrape_error", _help("nproxyd_database_scrape_error"), registry=r
        )
        self.build_info = Gauge(
            "nproxyd_build_info", _help("nproxyd_build_info"), ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        self.database = DatabaseGauges()
        r.register(self.database)

    def _prime(self, actors: list[str]) -> None:
        """Create every labelled series at zero so dashboards and alerts see them at once."""
        for actor in actors:
            for outcome in TICK_OUTCOMES:
                self.ticks.labels(actor=actor, outcome=outcome)
            self.tick_duration.labels(actor=actor)
            self.restarts.labels(actor=actor)
            self.last_success.labels(actor=actor)
        for kind in MAIL_FAILURE_KINDS:
            self.mail_failures.labels(kind=kind)
        for kind in RENEWAL_FAILURE_KINDS:
            self.renewal_failures.labels(kind=kind)

    def tick_finished(self, outcome: TickOutcome, finished_unix: float) -> None:
        self.ticks.labels(actor=outcome.actor, outcome=outcome.outcome).inc()
        self.tick_duration.labels(actor=outcome.actor).observe(outcome.duration_seconds)
        if outcome.outcome == "ok":
            self.last_success.labels(actor=outcome.actor).set(finished_unix)
        if outcome.report is not None:
            self._count_report(outcome.report)

    def _count_report(self, report: Report) -> None:
        if isinstance(report, ExpirerReport):
            self.invoices_expired.inc(report.expired_count)
        elif isinstance(report, RenewalReport):
            self._count_renewal(report)
        elif isinstance(report, MailReport):
            self.mail_sent.inc(report.sent_count)
            self.mail_dead.inc(report.dead_count)
            for kind, count in report.failures.items():
                self.mail_failures.labels(kind=kind).inc(count)
        elif isinstance(report, KeyPoolReport):
            self.keys_recovered.inc(report.recovered_count)
        elif isinstance(report, PaymentWatcherReport):
            self.payments.count_report(report)

    def _count_renewal(self, report: RenewalReport) -> None:
        self.renewals_created.inc(report.created_count)
        self.renewal_failures.labels(kind="transient").inc(report.transient_failures)
        self.renewal_failures.labels(kind="permanent").inc(report.permanent_failures)
        named = 0
        for reason, count in report.skipped_reasons.items():
            self.renewal_skipped.labels(reason=self._skip_label(reason)).inc(count)
            named += count
        if report.skipped_bad > named:
            self.renewal_skipped.labels(reason=UNNAMED_SKIP_REASON).inc(report.skipped_bad - named)

    def _skip_label(self, reason: str) -> str:
        """The reason itself, unless MAX_SKIP_REASONS others are already series."""
        if reason in self._skip_reasons or len(self._skip_reasons) < MAX_SKIP_REASONS:
            self._skip_reasons.add(reason)
            return reason
        return UNNAMED_SKIP_REASON

    def database_read(self, snapshot: DatabaseSnapshot | None) -> None:
        """Expose *snapshot*; ``None`` (the read failed) removes every database gauge."""
        self.database.snapshot = snapshot
        self.database_scrape_error.set(0 if snapshot is not None else 1)

    def render(self) -> bytes:
        return self.registry.render()

    def without_listener(self) -> None:
        """No NOTIFY listener runs in this process (no mail sender here, or behind a pooler
        without ``direct_dsn``): ``nproxyd_listener_connected`` is left out rather than read as
        a session that is down (docs/operations.md, NproxydListenerDown)."""
        self.registry.unregister(self.listener_connected)

    def _add_wakeup_metrics(self) -> None:
        self.listener_connected = Gauge(
            "nproxyd_listener_connected",
            _help("nproxyd_listener_connected"),
            registry=self.registry,
        )
        self.wakeups = Counter(
            "nproxyd_wakeups",
            _help("nproxyd_wakeups_total"),
            ["source"],
            registry=self.registry,
        )
        self._wakeups_seen: dict[str, int] = {}
        for source in WAKEUP_SOURCES:
            self.wakeups.labels(source=source)

    def count_wakeups(self, source: str, total: int) -> None:
        """Bring ``wakeups_total{source}`` up to ``total``, a count kept elsewhere."""
        seen = self._wakeups_seen.get(source, 0)
        if total > seen:
            self.wakeups.labels(source=source).inc(total - seen)
            self._wakeups_seen[source] = total
