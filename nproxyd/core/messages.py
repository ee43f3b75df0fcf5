"""Messages between actors and the reports their ticks return: frozen msgspec Structs."""

from __future__ import annotations

import msgspec


class OutboxReady(msgspec.Struct, frozen=True, kw_only=True):
    """Outbox rows were committed and are due now (a fast path; the rows are the truth)."""

    count: int


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """The result of one actor tick."""

    def degraded(self) -> str | None:
        """Why this tick did not do its job although it did not raise; ``None`` when it did."""
        return None

    def idle(self) -> bool:
        """True when the tick had no work item at all (so it proves neither health nor failure)."""
        return False


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

    def degraded(self) -> str | None:
        """Degraded when slots were claimed, every one failed and no invoice was created."""
        failures = self.transient_failures + self.permanent_failures
        if self.claimed > 0 and self.created_count == 0 and failures > 0:
            return (
                f"all {self.claimed} claimed renewals failed, none created "
                f"({self.transient_failures} transient, {self.permanent_failures} permanent)"
            )
        return None

    def idle(self) -> bool:
        return self.claimed == 0


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

    def degraded(self) -> str | None:
        """Degraded when mail was claimed, every delivery failed and none was sent."""
        failures = sum(self.failures.values())
        if self.claimed > 0 and self.sent_count == 0 and failures > 0:
            kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.failures.items()))
            return f"all {self.claimed} claimed mails failed, none sent ({kinds})"
        return None

    def idle(self) -> bool:
        return self.claimed == 0


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

    def degraded(self) -> str | None:
        """Degraded when checks were made, none was answered, and one failed provider-wide.

        Provider-wide: transient (5xx, timeout, network), rate limited, or the API key refused.
        A refusal or an invalid answer about one payment fails only that invoice: alone it never
        makes a tick degraded.
        """
        wide = sum(self.checks.get(outcome, 0) for outcome in PROVIDER_WIDE_CHECK_FAILURES)
        if self.checked > 0 and self.checks.get("ok", 0) == 0 and wide > 0:
            kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.checks.items()))
            return f"all {self.checked} payment status checks failed, none answered ({kinds})"
        return None

    def idle(self) -> bool:
        return self.checked == 0


# Check outcomes that say the provider (or nproxyd's key) fails, not one payment.
PROVIDER_WIDE_CHECK_FAILURES = ("transient", "rate_limited", "unauthorized")
