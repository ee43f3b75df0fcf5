"""The metrics registry follows the catalogue and counts what tick reports say."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client.parser import text_string_to_metric_families

from nproxyd import __version__
from nproxyd.core.messages import MailReport, PaymentWatcherReport, RenewalReport, Report
from nproxyd.core.payments import AwaitingSummary
from nproxyd.runtime.actor import TickOutcome
from nproxyd.runtime.catalogue import BY_NAME, CATALOGUE, database_metrics, series_names
from nproxyd.runtime.metrics import DatabaseSnapshot, Metrics

SNAPSHOT = DatabaseSnapshot(
    outbox_pending=4,
    mail_dead=2,
    oldest_pending_age_seconds=61.5,
    renewal_claims={"claimed": 1, "retry": 3, "failed": 0},
    provider_keys={"active": 5},
)


def exposed(metrics: Metrics) -> dict[str, tuple[str, set[str]]]:
    """Family name as exposed (a counter with ``_total``) -> (type, label names)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {label for item in family.samples for label in item.labels} - {"le"}
        found[name] = (family.type, labels)
    return found


def outcome(report: Report, *, degraded: str | None = None) -> TickOutcome:
    return TickOutcome(
        actor="renewal-scheduler",
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        duration_seconds=0.5,
        ok=True,
        report=report,
        degraded=degraded,
    )


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.sample(name, labels)


class TestCatalogue:
    def test_the_registry_exposes_exactly_the_catalogue(self) -> None:
        """With a database read, /metrics has every catalogue family with its type and labels."""
        metrics = Metrics(["renewal-scheduler"])
        metrics.database_read(SNAPSHOT)
        metrics.payments.set_awaiting(AwaitingSummary(count=1, oldest_seconds=30.0))
        metrics.tick_finished(outcome(RenewalReport(skipped_bad=1)), 1.0)
        found = exposed(metrics)
        assert set(found) == set(BY_NAME)
        for spec in CATALOGUE:
            assert found[spec.name] == (spec.kind, set(spec.labels)), spec.name

    def test_series_names_include_histogram_series(self) -> None:
        """A histogram is selected by its _bucket, _sum and _count series in PromQL."""
        names = series_names()
        assert "nproxyd_actor_tick_duration_seconds_bucket" in names
        assert "nproxyd_actor_tick_duration_seconds" not in names
        assert "nproxyd_mail_dead" in names
        assert "nproxyd_mail_dead_total" in names


class TestDatabaseGauges:
    def test_a_failed_read_removes_every_database_gauge(self) -> None:
        """After a failed read no database gauge keeps its last value; scrape_error is 1."""
        metrics = Metrics([])
        metrics.database_read(SNAPSHOT)
        assert value(metrics, "nproxyd_mail_dead") == 2
        assert value(metrics, "nproxyd_database_scrape_error") == 0
        metrics.database_read(None)
        found = exposed(metrics)
        for spec in database_metrics():
            assert spec.name not in found, spec.name
        assert value(metrics, "nproxyd_database_scrape_error") == 1
        metrics.database_read(SNAPSHOT)
        assert value(metrics, "nproxyd_outbox_oldest_pending_age_seconds") == 61.5
        assert value(metrics, "nproxyd_renewal_claims", state="retry") == 3
        assert value(metrics, "nproxyd_provider_keys", status="cooldown") == 0

    def test_awaiting_gauges_are_absent_while_unknown(self) -> None:
        """The awaiting-activation gauges show the last read, and nothing once a read failed."""
        metrics = Metrics([])
        metrics.payments.set_awaiting(AwaitingSummary(count=2, oldest_seconds=90.0))
        assert value(metrics, "nproxyd_invoices_awaiting_activation") == 2
        assert value(metrics, "nproxyd_invoice_activation_oldest_wait_seconds") == 90
        metrics.payments.forget_awaiting()
        found = exposed(metrics)
        assert "nproxyd_invoices_awaiting_activation" not in found
        assert "nproxyd_invoice_activation_oldest_wait_seconds" not in found

    def test_build_info_names_the_version(self) -> None:
        """nproxyd_build_info{version} is 1 for the running version."""
        assert value(Metrics([]), "nproxyd_build_info", version=__version__) == 1


class TestTickCounting:
    def test_payment_watcher_checks_and_status_changes_are_counted(self) -> None:
        """A payment-watcher tick feeds the check and status-change counters and the gauges."""
        metrics = Metrics(["payment-watcher"])
        report = PaymentWatcherReport(
            checked=3,
            checks={"ok": 2, "transient": 1},
            status_changes={"finished": 1},
            awaiting_count=1,
            awaiting_oldest_seconds=12.0,
        )
        metrics.tick_finished(outcome(report), 1.0)
        assert value(metrics, "nproxyd_payment_checks_total", outcome="ok") == 2
        assert value(metrics, "nproxyd_payment_checks_total", outcome="transient") == 1
        changes = "nproxyd_payment_status_changes_total"
        assert value(metrics, changes, status="finished", source="poll") == 1

    def test_renewal_failures_and_skips_are_counted_by_kind_and_reason(self) -> None:
        """Transient/permanent failures and skipped candidates (named or not) are counted."""
        metrics = Metrics(["renewal-scheduler"])
        report = RenewalReport(
            claimed=5,
            created_count=2,
            transient_failures=2,
            permanent_failures=1,
            skipped_bad=3,
            skipped_reasons={"plan price is missing": 2},
        )
        metrics.tick_finished(outcome(report), 1.0)
        assert value(metrics, "nproxyd_renewal_failures_total", kind="transient") == 2
        assert value(metrics, "nproxyd_renewal_failures_total", kind="permanent") == 1
        skipped = "nproxyd_renewal_candidates_skipped_total"
        assert value(metrics, skipped, reason="plan price is missing") == 2
        assert value(metrics, skipped, reason="other") == 1

    def test_skip_reasons_are_bounded(self) -> None:
        """Past 32 distinct reasons, further ones are counted as other."""
        metrics = Metrics([])
        reasons = {f"reason {index}": 1 for index in range(40)}
        metrics.tick_finished(outcome(RenewalReport(skipped_bad=40, skipped_reasons=reasons)), 1)
        assert value(metrics, "nproxyd_renewal_candidates_skipped_total", reason="other") == 8

    def test_a_degraded_tick_is_counted_as_degraded_not_as_success(self) -> None:
        """A degraded tick counts under outcome=degraded and leaves the last-success time."""
        metrics = Metrics(["renewal-scheduler"])
        report = RenewalReport(claimed=2, transient_failures=2)
        metrics.tick_finished(outcome(report, degraded=report.degraded()), 1234.0)
        ticks = "nproxyd_actor_ticks_total"
        assert value(metrics, ticks, actor="renewal-scheduler", outcome="degraded") == 1
        assert value(metrics, ticks, actor="renewal-scheduler", outcome="ok") == 0
        last = "nproxyd_actor_last_success_timestamp_seconds"
        assert value(metrics, last, actor="renewal-scheduler") == 0
        mail = MailReport(claimed=1, dead_count=1, failures={"permanent": 1})
        assert mail.degraded() is not None
