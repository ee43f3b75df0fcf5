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
    unreleasable: int = 0  # claims that could not even be released on a data error


class MailReport(Report, frozen=True, kw_only=True):
    claimed: int = 0
    sent_count: int = 0
    retried_count: int = 0
    dead_count: int = 0
    failures: dict[str, int] = {}
    # Put back without using up an attempt because the server was unavailable.
    deferred_count: int = 0
    # Dead as "unstorable …": the database refused the row's outcome (also in dead_count).
    quarantined_count: int = 0
    # Rows whose outcome could not be recorded at all (not even as dead); logged with their id.
    unrecorded_count: int = 0
