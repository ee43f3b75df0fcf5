"""The metric catalogue: every family ``/metrics`` exposes, its type, labels and meaning.

One list, read by :mod:`nproxyd.runtime.metrics` (which registers exactly these), by the
tests of the HTTP surface and by the tests of the shipped alert rules and dashboard.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Kind = Literal["counter", "gauge", "histogram"]
Source = Literal["tick", "database", "process"]


class MetricSpec(NamedTuple):
    """One metric family as exposed (a counter's name ends in ``_total``)."""

    name: str
    kind: Kind
    labels: frozenset[str]
    help: str
    # tick: fed by tick reports; database: read from PostgreSQL at each refresh and absent
    # while it cannot be read; process: kept by the daemon itself.
    source: Source


def _spec(name: str, kind: Kind, labels: tuple[str, ...], text: str, source: Source) -> MetricSpec:
    return MetricSpec(name, kind, frozenset(labels), text, source)


CATALOGUE: tuple[MetricSpec, ...] = (
    _spec("nproxyd_actor_ticks_total", "counter", ("actor", "outcome"),
          "Actor ticks by outcome (ok, degraded, error).", "tick"),
    _spec("nproxyd_actor_tick_duration_seconds", "histogram", ("actor",),
          "Duration of actor ticks.", "tick"),
    _spec("nproxyd_actor_last_success_timestamp_seconds", "gauge", ("actor",),
          "Unix time of the last tick with outcome ok.", "tick"),
    _spec("nproxyd_actor_restarts_total", "counter", ("actor",),
          "Actor loops restarted by the supervisor.", "process"),
    _spec("nproxyd_invoices_expired_total", "counter", (),
          "Pending invoices marked expired.", "tick"),
    _spec("nproxyd_renewal_invoices_created_total", "counter", (),
          "Automatic renewal invoices created.", "tick"),
    _spec("nproxyd_renewal_failures_total", "counter", ("kind",),
          "Renewal invoice creations that failed, by kind (transient, permanent).", "tick"),
    _spec("nproxyd_renewal_candidates_skipped_total", "counter", ("reason",),
          "Renewal candidates skipped because their row is unusable, by reason.", "tick"),
    _spec("nproxyd_renewal_claims", "gauge", ("state",),
          "Open renewal claims by state (claimed, retry, failed).", "database"),
    _spec("nproxyd_mail_sent_total", "counter", (), "Mail delivered.", "tick"),
    _spec("nproxyd_mail_failures_total", "counter", ("kind",),
          "Failed delivery attempts by kind.", "tick"),
    _spec("nproxyd_mail_dead_total", "counter", (), "Mail given up as dead.", "tick"),
    _spec("nproxyd_mail_dead", "gauge", (),
          "Dead mail rows in the outbox now.", "database"),
    _spec("nproxyd_mail_queue_depth", "gauge", (),
          "OutboxReady messages waiting for the mail sender.", "process"),
    _spec("nproxyd_outbox_pending", "gauge", (), "Mail rows waiting in the outbox.", "database"),
    _spec("nproxyd_outbox_oldest_pending_age_seconds", "gauge", (),
          "Seconds the oldest due pending mail has been due (0 when none is due).", "database"),
    _spec("nproxyd_provider_keys", "gauge", ("status",),
          "Provider keys by status.", "database"),
    _spec("nproxyd_provider_keys_recovered_total", "counter", (),
          "Provider keys returned from cooldown.", "tick"),
    _spec("nproxyd_database_scrape_error", "gauge", (),
          "1 when the database-backed gauges could not be read (they are then absent).",
          "process"),
    _spec("nproxyd_ready", "gauge", (),
          "1 when the daemon's last readiness check passed (what /readyz answers).", "process"),
    _spec("nproxyd_messages_dropped_total", "counter", (),
          "Actor messages dropped on a full channel.", "process"),
    _spec("nproxyd_listener_connected", "gauge", (),
          "1 while the LISTEN session for mail wake-ups is open.", "process"),
    _spec("nproxyd_wakeups_total", "counter", ("source",),
          "Mail-sender wake-ups by source: a NOTIFY, an in-process message, the sweep.",
          "process"),
    _spec("nproxyd_invoices_awaiting_activation", "gauge", (),
          "Invoices the provider reports finished or partially paid that are not paid yet.",
          "database"),
    _spec("nproxyd_invoice_activation_oldest_wait_seconds", "gauge", (),
          "How long the invoice waiting longest for activation has waited.", "database"),
    _spec("nproxyd_payment_checks_total", "counter", ("outcome",),
          "Payment status checks by outcome.", "tick"),
    _spec("nproxyd_payment_status_changes_total", "counter", ("status", "source"),
          "Provider payment status changes recorded, by new status and source.", "tick"),
    _spec("nproxyd_ipn_requests_total", "counter", ("outcome",),
          "Instant payment notifications received, by outcome.", "process"),
    _spec("nproxyd_build_info", "gauge", ("version",),
          "Always 1; the version label is the running nproxyd version.", "process"),
)  # fmt: skip

BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in CATALOGUE}

_SERIES_SUFFIXES: dict[str, tuple[str, ...]] = {"histogram": ("_bucket", "_sum", "_count")}


def series_names() -> frozenset[str]:
    """Every series name a PromQL query may select (a histogram's three series)."""
    names: set[str] = set()
    for spec in CATALOGUE:
        suffixes = _SERIES_SUFFIXES.get(spec.kind, ("",))
        names.update(spec.name + suffix for suffix in suffixes)
    return frozenset(names)


def database_metrics() -> tuple[MetricSpec, ...]:
    """The gauges read from PostgreSQL, absent from /metrics while it cannot be read."""
    return tuple(spec for spec in CATALOGUE if spec.source == "database")
