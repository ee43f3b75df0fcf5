"""``nproxyd payments awaiting`` and ``payments show``: what the operator reads (pure).

Texts come from the provider and the web API, so every unprintable character (ESC and the
other controls a terminal obeys) is printed escaped (``nproxyd.core.text.printable``); the
JSON lines carry the same texts with those characters as ``\\u`` escapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec

from nproxyd.core.clock import format_instant
from nproxyd.core.payments import AwaitingInvoice, PaymentState, StatusHistoryEntry
from nproxyd.core.rules import format_amount
from nproxyd.core.text import json_printable, printable

_AWAITING_COLUMNS = (
    "invoice",
    "invoice status",
    "user",
    "plan",
    "due",
    "paid",
    "provider status",
    "since",
)


def render_awaiting(rows: Sequence[AwaitingInvoice], *, as_json: bool, now: datetime) -> str:
    """Finished invoices first as a table (or JSON lines); partially paid ones marked."""
    if as_json:
        return "".join(
            json_printable(
                msgspec.json.encode(
                    {**msgspec.to_builtins(row), "partial": row.provider_status != "finished"}
                ).decode()
            )
            + "\n"
            for row in rows
        )
    if not rows:
        return "no invoice awaits activation\n"
    ordered = sorted(rows, key=lambda row: row.provider_status != "finished")
    table = [list(_AWAITING_COLUMNS)] + [_awaiting_cells(row, now) for row in ordered]
    return _table(table)


def _awaiting_cells(row: AwaitingInvoice, now: datetime) -> list[str]:
    marked = (
        row.provider_status
        if row.provider_status == "finished"
        else "PARTIAL " + (row.provider_status)
    )
    waited = int((now - row.since).total_seconds() // 60)
    return [
        row.invoice_id,
        row.invoice_status,
        row.user_email or "-",
        row.plan_code or "-",
        f"{format_amount(row.amount_crypto)} {row.currency}",
        f"{_amount(row.actually_paid)} {row.pay_currency or ''}".rstrip(),
        marked,
        f"{format_instant(row.since)} ({waited} min)",
    ]


def render_show(state: PaymentState, history: Sequence[StatusHistoryEntry]) -> str:
    """One invoice: what nproxyd knows now, then every status change."""
    fields: dict[str, Any] = msgspec.to_builtins(state)
    lines = [f"{name:20} {printable(_value(value))}" for name, value in fields.items()]
    lines.append("")
    table = [["at", "from", "to", "source", "provider updated at"]]
    for entry in history:
        table.append(
            [
                format_instant(entry.at),
                entry.from_status or "-",
                entry.to_status,
                entry.source,
                format_instant(entry.provider_updated_at) if entry.provider_updated_at else "-",
            ]
        )
    body = _table(table) if history else "no status change recorded\n"
    return "\n".join(lines) + "\n" + body


def _value(value: Any) -> str:
    return "-" if value is None else str(value)


def _amount(value: Decimal | None) -> str:
    return "-" if value is None else format_amount(value)


def _table(cells: list[list[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in cells]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"
