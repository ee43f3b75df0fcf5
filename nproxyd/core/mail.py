"""Composing an outbox row into an RFC 5322 message (pure).

Built on ``email.message.Message`` with the compat32 policy: an order of magnitude cheaper
than ``EmailMessage``'s header registry, which dominated the cost of sending a mail. Header
values are checked here instead: a line break in any of them is refused (no header
injection), and non-ASCII values are RFC 2047 encoded. In an address, a non-ASCII domain
becomes IDNA; a non-ASCII local part has no ASCII form and stays UTF-8 (RFC 6532), which only
an SMTPUTF8 transport carries (the SMTP transport checks that).
"""

from __future__ import annotations

import email.policy
from datetime import datetime
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.utils import format_datetime, formataddr, parseaddr
from typing import Any

from nproxyd.core.rules import ascii_domain

_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
_MAX_PLAIN_HEADER = 900  # below RFC 5322's 998-octet line limit, with room for the name


class _ComposedMessage(Message):
    """A compat32 message whose header values were checked when it was composed.

    Every value is single-line, and ASCII or already RFC 2047 encoded, so rendering needs none
    of the generic folding machinery (which builds a ``Header`` per header and re-encodes it).
    """

    def as_bytes(self, unixfrom: bool = False, policy: Any = None) -> bytes:
        items = self.items()
        plain = all(
            isinstance(value, str) and len(value) <= _MAX_PLAIN_HEADER for _, value in items
        )
        if unixfrom or policy is not None or not plain:
            return super().as_bytes(unixfrom=unixfrom, policy=policy)
        head = "".join(f"{name}: {value}\n" for name, value in items)
        # UTF-8 only where an address has a non-ASCII local part (RFC 6532); else ASCII.
        return (head + "\n" + str(self.get_payload())).encode("utf-8")


def compose_message(
    *,
    from_address: str,
    to_address: str,
    subject: str,
    body: str,
    message_id: str,
    date: datetime,
) -> Message:
    """Build the message; raises ValueError when a header value cannot be used."""
    message = _ComposedMessage(policy=email.policy.compat32)
    message["From"] = _address(from_address)
    message["To"] = _address(to_address)
    message["Subject"] = _text(subject)
    message["Date"] = format_datetime(date)
    message["Message-ID"] = _checked(message_id)
    message["MIME-Version"] = "1.0"
    # Like EmailMessage.set_content, the body ends with a line break.
    message.set_payload(body if body.endswith("\n") else body + "\n", _UTF8_QP)
    return message


def _checked(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"header value contains a line break: {value[:80]!r}")
    return value


def _text(value: str) -> str:
    value = _checked(value)
    return value if value.isascii() else Header(value, "utf-8").encode()


def _address(value: str) -> str:
    value = _checked(value)
    if value.isascii():
        return value
    name, address = parseaddr(value)
    local, at, domain = address.rpartition("@")
    if not (local and at and domain):
        raise ValueError(f"not an address: {value[:80]!r}")
    wire = f"{local}@{ascii_domain(domain) or domain}"
    if not name:
        return wire
    if wire.isascii():
        return formataddr((name, wire), charset="utf-8")
    return f"{Header(name, 'utf-8').encode()} <{wire}>"
