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
import functools
import re
from datetime import datetime
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.utils import format_datetime, formataddr, parseaddr
from typing import Any

from nproxyd.core.rules import ascii_domain

_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
_CONTENT_TYPE = 'text/plain; charset="utf-8"'
# Text that quoted-printable leaves as it is (see _quoted_printable).
_QP_ITSELF = re.compile(r"[\t\n -<>-~]*")
_QP_LINE = 76
_MAX_PLAIN_HEADER = 900  # below RFC 5322's 998-octet line limit, with room for the name


class _ComposedMessage(Message):
    """A compat32 message whose header values were checked when it was composed.

    Every value is single-line, and ASCII or already RFC 2047 encoded, so rendering needs none
    of the generic folding machinery (which builds a ``Header`` per header and re-encodes it).
    """

    def __init__(self, headers: list[tuple[str, str]], payload: str) -> None:
        super().__init__(policy=email.policy.compat32)
        # What one ``message[name] = value`` per header stores under compat32, in one step.
        self._headers = headers
        self.set_payload(payload)

    def as_bytes(self, unixfrom: bool = False, policy: Any = None) -> bytes:
        # The stored pairs, as items() would return them: compat32 stores and fetches a str
        # value unchanged (its surrogate check never applies to a value composed here).
        items: list[tuple[str, Any]] = self._headers
        payload = getattr(self, "_payload", None)  # get_payload() without its checks
        plain = all(
            isinstance(value, str) and len(value) <= _MAX_PLAIN_HEADER for _, value in items
        )
        if unixfrom or policy is not None or not plain or not isinstance(payload, str):
            return super().as_bytes(unixfrom=unixfrom, policy=policy)
        head = "".join([f"{name}: {value}\n" for name, value in items])
        # UTF-8 only where an address has a non-ASCII local part (RFC 6532); else ASCII.
        return (head + "\n" + payload).encode("utf-8")


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
    headers = [
        ("From", _address(from_address)),
        ("To", _address(to_address)),
        ("Subject", _text(subject)),
        ("Date", _date_header(date)),
        ("Message-ID", _checked(message_id)),
        ("MIME-Version", "1.0"),
        # What set_payload(body, charset) adds, without the generic charset machinery (it
        # re-reads and rewrites these headers: most of the cost of composing a message).
        ("Content-Type", _CONTENT_TYPE),
        ("Content-Transfer-Encoding", "quoted-printable"),
    ]
    # Like EmailMessage.set_content, the body ends with a line break.
    return _ComposedMessage(
        headers, _quoted_printable(body if body.endswith("\n") else body + "\n")
    )


def _quoted_printable(body: str) -> str:
    """The body quoted-printable encoded, as ``email.quoprimime`` encodes it.

    Printable ASCII without ``=``, in lines of at most 76 characters that do not end in a
    space or a tab, encodes as itself: such a body is returned as it is.
    """
    if (
        _QP_ITSELF.fullmatch(body)
        and " \n" not in body
        and "\t\n" not in body
        and max(map(len, body.split("\n"))) <= _QP_LINE
    ):
        return body
    return _UTF8_QP.body_encode(body)


@functools.lru_cache(maxsize=8)
def _date_header(date: datetime) -> str:
    """The Date header: one tick stamps every message with the same ``now``."""
    return format_datetime(date)


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
