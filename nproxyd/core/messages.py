"""Messages between actors and the reports their ticks return: frozen msgspec Structs."""

from __future__ import annotations

import msgspec


class OutboxReady(msgspec.Struct, frozen=True, kw_only=True):
    """Outbox rows were committed and are due now (a fast path; the rows are the truth)."""

    count: int


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """The result of one actor tick."""


class ExpirerReport(Report, frozen=True, kw_only=True):
    expired_count: int = 0
    batches: int = 0


class KeyPoolReport(Report, frozen=True, kw_only=True):
    recovered_count: int = 0
    balance_checked_count: int = 0
    balance_failed_count: int = 0


class RenewalReport(Report, frozen=True, kw_only=True):
    candidates: int = 0
    claimed: int = 0
    created_count: int = 0
    superseded: int = 0
    skipped_bad: int = 0
    skipped_reasons: dict[str, int] = {}  # reason -> candidates skipped for it this tick
    transient_failures: int = 0
    permanent_failures: int = 0


class MailReport(Report, frozen=True, kw_only=True):
    claimed: int = 0
    sent_count: int = 0
    retried_count: int = 0
    dead_count: int = 0
    failures: dict[str, int] = {}


class PaymentWatcherReport(Report, frozen=True, kw_only=True):
    discovered: int = 0  # invoices newly followed
    checked: int = 0  # provider status checks made
    retired: int = 0  # invoices no longer followed (paid, or grace passed)
    settled: int = 0  # awaiting invoices the admin has set paid since the last tick
    checks: dict[str, int] = {}  # check outcome -> count
    status_changes: dict[str, int] = {}  # new provider status -> count
    operator_mails: int = 0
    awaiting_count: int = 0
    awaiting_oldest_seconds: float = 0.0
