"""The payment watcher's metrics (docs/design.md, metrics), on the daemon's registry."""

from __future__ import annotations

from collections.abc import Iterator

from nproxyd.core.messages import PaymentWatcherReport
from nproxyd.core.payments import (
    AWAITING_STATUSES,
    CHECK_OUTCOMES,
    KNOWN_STATUSES,
    AwaitingSummary,
    IpnOutcome,
)
from nproxyd.runtime.prometheus import Counter, Family, Registry, gauge_family

IPN_OUTCOMES = ("ok", "unknown_payment", "rejected", "invalid", "too_large", "error")
SOURCES = ("poll", "ipn")


def status_label(status: str) -> str:
    """A provider status as a label value: unknown ones share one label (bounded cardinality)."""
    return status if status in KNOWN_STATUSES else "unknown"


class AwaitingGauges:
    """Invoices awaiting activation as last read from the database; absent when unknown."""

    def __init__(self) -> None:
        self.summary: AwaitingSummary | None = None

    def collect(self) -> Iterator[Family]:
        summary = self.summary
        if summary is None:
            return
        yield gauge_family(
            "nproxyd_invoices_awaiting_activation",
            "Invoices the provider reports finished or partially paid that are not paid yet.",
            summary.count,
        )
        yield gauge_family(
            "nproxyd_invoice_activation_oldest_wait_seconds",
            "How long the invoice waiting longest for activation has waited.",
            summary.oldest_seconds,
        )


class PaymentMetrics:
    def __init__(self, registry: Registry) -> None:
        r = registry
        self.awaiting = AwaitingGauges()
        r.register(self.awaiting)
        self.checks = Counter(
            "nproxyd_payment_checks", "Payment status checks by outcome.", ["outcome"], registry=r
        )
        self.status_changes = Counter(
            "nproxyd_payment_status_changes",
            "Provider payment status changes recorded, by new status and source.",
            ["status", "source"],
            registry=r,
        )
        self.ipn_requests = Counter(
            "nproxyd_ipn_requests",
            "Instant payment notifications received, by outcome.",
            ["outcome"],
            registry=r,
        )
        for outcome in CHECK_OUTCOMES:
            self.checks.labels(outcome=outcome)
        for status in AWAITING_STATUSES:
            for source in SOURCES:
                self.status_changes.labels(status=status, source=source)
        for ipn_outcome in IPN_OUTCOMES:
            self.ipn_requests.labels(outcome=ipn_outcome)

    def count_report(self, report: PaymentWatcherReport) -> None:
        for outcome, count in report.checks.items():
            self.checks.labels(outcome=outcome).inc(count)
        for status, count in report.status_changes.items():
            self.status_changes.labels(status=status_label(status), source="poll").inc(count)
        self.set_awaiting(
            AwaitingSummary(
                count=report.awaiting_count, oldest_seconds=report.awaiting_oldest_seconds
            )
        )

    def count_ipn(self, outcome: IpnOutcome | str) -> None:
        if isinstance(outcome, str):
            self.ipn_requests.labels(outcome=outcome).inc()
            return
        self.ipn_requests.labels(outcome=outcome.outcome).inc()
        if outcome.change is not None:
            label = status_label(outcome.change.to_status)
            self.status_changes.labels(status=label, source="ipn").inc()

    def set_awaiting(self, summary: AwaitingSummary) -> None:
        self.awaiting.summary = summary

    def forget_awaiting(self) -> None:
        """The database could not be read: leave the awaiting gauges out, never stale."""
        self.awaiting.summary = None
