"""Pure rules: backoff, money and the renewal email. No I/O, no clock."""

from __future__ import annotations

import random
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parseaddr

from nproxyd.core.clock import format_instant

RENEWAL_SUBJECT = "Your nproxy subscription renewal invoice"


def backoff_seconds(
    failures: int, *, base_seconds: float, cap_seconds: float, rng: random.Random | None = None
) -> float:
    """Capped exponential backoff after ``failures`` consecutive failures (>= 1).

    With ``rng`` the delay gets jitter in [50 %, 100 %] of the capped value, so instances that
    failed together do not retry together.
    """
    exponent = min(max(failures - 1, 0), 32)
    delay: float = min(cap_seconds, base_seconds * float(2**exponent))
    if rng is not None:
        delay *= rng.uniform(0.5, 1.0)
    return delay


def format_amount(amount: Decimal) -> str:
    """An amount without trailing zeros or exponent: ``29``, ``12.5``."""
    return format(amount.normalize(), "f")


def billing_url(app_base_url: str) -> str:
    return app_base_url.rstrip("/") + "/billing"


def render_renewal_body(
    *,
    period_end: datetime,
    amount: Decimal,
    currency: str,
    payment_address: str | None,
    expires_at: datetime | None,
    app_base_url: str,
) -> str:
    """The renewal email's body, one line each (DESIGN.md §2 step 5)."""
    lines = [
        "Your current subscription period is ending soon.",
        f"Current access ends at {format_instant(period_end)}.",
        f"Invoice amount: {format_amount(amount)} {currency}.",
    ]
    if payment_address:
        lines.append(f"Payment address: {payment_address}.")
    if expires_at is not None:
        lines.append(f"Invoice expires at {format_instant(expires_at)}.")
    lines.append(f"Open billing: {billing_url(app_base_url)}")
    return "\n".join(lines)


def new_message_id(from_address: str) -> str:
    """A unique RFC 5322 Message-ID in the sender's domain."""
    _, address = parseaddr(from_address)
    domain = address.rpartition("@")[2] or "nproxyd.invalid"
    return f"<{uuid.uuid4().hex}@{domain}>"


def order_id(subscription_id: str, cycle_start: datetime) -> str:
    """The provider idempotency reference of a (subscription, cycle) slot.

    The cycle start is kept to the microsecond (PostgreSQL's resolution), so two cycles of one
    subscription never share a reference.
    """
    epoch = cycle_start - datetime(1970, 1, 1, tzinfo=UTC)
    micros = (epoch.days * 86_400 + epoch.seconds) * 1_000_000 + epoch.microseconds
    return f"renewal-{subscription_id}-{micros}"


# A bare local@domain: no display name, brackets, separators, quotes, spaces or controls.
_PLAIN_ADDRESS = re.compile(r'[^\s@<>,;:"()\[\]\\]+@[^\s@<>,;:"()\[\]\\]+')


def is_plausible_address(address: str | None) -> bool:
    """A single bare ``local@domain`` address with no spaces or line breaks."""
    return bool(address and _PLAIN_ADDRESS.fullmatch(address) and address.isprintable())


def candidate_problem(
    *, email: str | None, price: Decimal | None, currency: str | None
) -> str | None:
    """Why a renewal candidate cannot be invoiced, or None when it can."""
    if price is None:
        return "plan price is missing"
    if not price.is_finite():
        return "plan price is not a number"
    if price < 0:
        return "plan price is negative"
    if price != price.quantize(Decimal("0.01")):
        return "plan price has more than 2 decimals"
    if not currency or not currency.strip():
        return "plan billing currency is empty"
    if not is_plausible_address(email):
        return "user email is missing or malformed"
    return None
