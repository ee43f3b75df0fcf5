"""Prometheus metrics (DESIGN.md §4), fed by tick outcomes and refreshed gauges."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest

from nproxyd.core.messages import (
    ExpirerReport,
    KeyPoolReport,
    MailReport,
    PaymentWatcherReport,
    RenewalReport,
    Report,
)
from nproxyd.runtime.actor import TickOutcome
from nproxyd.runtime.payment_metrics import PaymentMetrics

KEY_STATUSES = ("active", "cooldown", "manual_review", "disabled")
MAIL_FAILURE_KINDS = ("transient", "permanent")
# The `_created` series double the output and no dashboard or alert reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Every contract metric, on a registry of its own."""

    def __init__(self, actors: list[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ticks = Counter(
            "nproxyd_actor_ticks", "Actor ticks by outcome.", ["actor", "outcome"], registry=r
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
            "Unix time of the last successful tick.",
            ["actor"],
            registry=r,
        )
        self.restarts = Counter(
            "nproxyd_actor_restarts",
            "Actor loops restarted by the supervisor.",
            ["actor"],
            registry=r,
        )
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
        self.outbox_pending = Gauge(
            "nproxyd_outbox_pending", "Mail rows waiting in the outbox.", registry=r
        )
        self.provider_keys = Gauge(
            "nproxyd_provider_keys", "Provider keys by status.", ["status"], registry=r
        )
        self.keys_recovered = Counter(
            "nproxyd_provider_keys_recovered",
            "Provider keys returned from cooldown.",
            registry=r,
        )
        self.ready = Gauge("nproxyd_ready", "1 when /readyz answers 200.", registry=r)
        self.messages_dropped = Counter(
            "nproxyd_messages_dropped", "Actor messages dropped on a full channel.", registry=r
        )
        self._prime(actors)
        self.payments = PaymentMetrics(r)

    def _prime(self, actors: list[str]) -> None:
        """Create every labelled series at zero so dashboards and alerts see them at once."""
        for actor in actors:
            for outcome in ("ok", "error"):
                self.ticks.labels(actor=actor, outcome=outcome)
            self.tick_duration.labels(actor=actor)
            self.restarts.labels(actor=actor)
            self.last_success.labels(actor=actor)
        for kind in MAIL_FAILURE_KINDS:
            self.mail_failures.labels(kind=kind)
        for status in KEY_STATUSES:
            self.provider_keys.labels(status=status)

    def tick_finished(self, outcome: TickOutcome, finished_unix: float) -> None:
        self.ticks.labels(actor=outcome.actor, outcome="ok" if outcome.ok else "error").inc()
        self.tick_duration.labels(actor=outcome.actor).observe(outcome.duration_seconds)
        if outcome.ok:
            self.last_success.labels(actor=outcome.actor).set(finished_unix)
        if outcome.report is not None:
            self._count_report(outcome.report)

    def _count_report(self, report: Report) -> None:
        if isinstance(report, ExpirerReport):
            self.invoices_expired.inc(report.expired_count)
        elif isinstance(report, RenewalReport):
            self.renewals_created.inc(report.created_count)
        elif isinstance(report, MailReport):
            self.mail_sent.inc(report.sent_count)
            self.mail_dead.inc(report.dead_count)
            for kind, count in report.failures.items():
                self.mail_failures.labels(kind=kind).inc(count)
        elif isinstance(report, KeyPoolReport):
            self.keys_recovered.inc(report.recovered_count)
        elif isinstance(report, PaymentWatcherReport):
            self.payments.count_report(report)

    def set_key_counts(self, counts: Mapping[str, int]) -> None:
        for status in KEY_STATUSES:
            self.provider_keys.labels(status=status).set(counts.get(status, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
