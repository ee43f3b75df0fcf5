"""What is private to the stores: the keyset start, row conversion, paging rows.

The records the actors and the runtime read live in :mod:`nproxyd.core.records`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

from nproxyd.core.records import RenewalCandidate, UnreadableCandidate

T = TypeVar("T")

# The cursor before every key of a (timestamp, id) keyset.
KEYSET_START: tuple[datetime, str] = (datetime.min.replace(tzinfo=UTC), "")


def convert_rows(rows: Iterable[Any], row_type: type[T]) -> list[T]:
    """Convert asyncpg records (or any mappings) into Structs."""
    return [msgspec.convert(dict(row.items()), row_type) for row in rows]


class ExpirySurvey(msgspec.Struct, frozen=True, kw_only=True):
    pages: int
    tuples: int
    due: int


class ExpiryBatch(msgspec.Struct, frozen=True, kw_only=True):
    scanned: int
    expired: int
    last_expires_at: str | None = None  # as text: the keyset never decodes a timestamp
    last_id: str | None = None


def convert_candidates(rows: Iterable[Any]) -> list[RenewalCandidate | UnreadableCandidate]:
    """Candidate rows as Structs; a row flagged ``unreadable`` becomes an UnreadableCandidate."""
    result: list[RenewalCandidate | UnreadableCandidate] = []
    for row in rows:
        values = dict(row.items())
        column = values.pop("unreadable", None)
        if column is None:
            result.append(msgspec.convert(values, RenewalCandidate))
        else:
            result.append(
                UnreadableCandidate(
                    subscription_id=values["subscription_id"],
                    current_period_end=values["current_period_end"],
                    column=column,
                )
            )
    return result
