"""Pure rules: backoff, money and the renewal email. No I/O, no clock."""

from __future__ import annotations

import os
import random
import re
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parseaddr

from nproxyd.core.clock import format_instant
from nproxyd.core.text import is_storable

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
    """The renewal email's body, one line each (docs/design.md §2 step 5)."""
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


def message_id_domain(from_address: str) -> str:
    """The domain of the Message-IDs nproxyd makes: the sender's."""
    _, address = parseaddr(from_address)
    return address.rpartition("@")[2] or "nproxyd.invalid"


def message_id(unique_hex: str, domain: str) -> str:
    """An RFC 5322 Message-ID made of a unique uuid's hex digits in ``domain``."""
    return f"<{unique_hex}@{domain}>"


def new_message_id(from_address: str) -> str:
    """A unique RFC 5322 Message-ID in the sender's domain."""
    return message_id(random_uuid()[1], message_id_domain(from_address))


def random_uuid() -> tuple[str, str]:
    """A random (version 4) UUID as ``str(uuid.uuid4())`` and ``.hex`` would give it.

    A third of the cost of building a ``uuid.UUID``: the renewal scheduler makes one per
    invoice.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    digits = raw.hex()
    text = f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
    return text, digits


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
MAX_ADDRESS_LENGTH = 254  # RFC 5321's path limit less the angle brackets
MAX_LOCAL_PART_LENGTH = 64


def address_problem(address: str | None) -> str | None:
    """Why nproxyd can never deliver to ``address``, or None when it can.

    The one address rule of the project: a single bare ``local@domain`` with no spaces, line
    breaks or controls, at most 254 characters (64 in the local part), and a domain that is
    ASCII or can be IDNA-encoded. A non-ASCII local part is deliverable only over SMTPUTF8,
    which the transport decides when it knows the server (:func:`needs_smtputf8`).
    """
    if not address:
        return "address is missing"
    if not is_storable(address) or not address.isprintable():
        return "address contains control characters or invalid text"
    if len(address) > MAX_ADDRESS_LENGTH:
        return f"address is longer than {MAX_ADDRESS_LENGTH} characters"
    if not _PLAIN_ADDRESS.fullmatch(address):
        return "address is not a plain local@domain"
    local, _, domain = address.rpartition("@")
    if len(local) > MAX_LOCAL_PART_LENGTH:
        return f"local part is longer than {MAX_LOCAL_PART_LENGTH} characters"
    if ascii_domain(domain) is None:
        return "domain cannot be encoded as IDNA"
    return None


def is_plausible_address(address: str | None) -> bool:
    """True when :func:`address_problem` finds nothing wrong with ``address``."""
    return address_problem(address) is None


def ascii_domain(domain: str) -> str | None:
    """The domain as ASCII (IDNA for a non-ASCII one), or None when it cannot be encoded."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def needs_smtputf8(address: str) -> bool:
    """True when the address's local part is not ASCII (only SMTPUTF8 can carry it)."""
    return not address.rpartition("@")[0].isascii()


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
    address = address_problem(email)
    if address is not None:
        # address_problem's reasons are a fixed set: fit for a metric label.
        return f"user email: {address}"
    return None
