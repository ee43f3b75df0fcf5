"""Composing an outbox row into an RFC 5322 message (pure)."""

from __future__ import annotations

from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime


def compose_message(
    *,
    from_address: str,
    to_address: str,
    subject: str,
    body: str,
    message_id: str,
    date: datetime,
) -> EmailMessage:
    """Build the message; raises ValueError when a header cannot be encoded."""
    message = EmailMessage()
    message["From"] = from_address
    message["To"] = to_address
    message["Subject"] = subject
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    message.set_content(body, charset="utf-8")
    return message
