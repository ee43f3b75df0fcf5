"""Seed rows for tests and benchmarks, with only the shared columns of docs/design.md §4."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import asyncpg


async def plan(
    connection: asyncpg.Connection | asyncpg.Pool,
    *,
    plan_id: str = "plan_1",
    price: Decimal | None = Decimal("29"),
    currency: str = "USDT",
) -> str:
    await connection.execute(
        "INSERT INTO subscription_plans (id, code, display_name, monthly_request_limit,"
        " monthly_price_usd, billing_currency) VALUES ($1, $1, 'Monthly', 100, $2, $3)",
        plan_id,
        price,
        currency,
    )
    return plan_id


async def user(
    connection: asyncpg.Connection | asyncpg.Pool, user_id: str, email: str | None = None
) -> str:
    await connection.execute(
        "INSERT INTO users (id, email) VALUES ($1, $2)",
        user_id,
        email if email is not None else f"{user_id}@example.com",
    )
    return user_id


async def subscription(
    connection: asyncpg.Connection | asyncpg.Pool,
    sub_id: str,
    *,
    period_start: datetime | None,
    period_end: datetime | None,
    plan_id: str = "plan_1",
    status: str = "active",
    renews_manually: bool = True,
    email: str | None = None,
    created_at: datetime | None = None,
) -> str:
    user_id = await user(connection, f"user_{sub_id}", email)
    await connection.execute(
        "INSERT INTO subscriptions (id, user_id, plan_id, status, renews_manually,"
        " activated_at, current_period_start, current_period_end, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $6, $7, coalesce($8, now()))",
        sub_id,
        user_id,
        plan_id,
        status,
        renews_manually,
        period_start,
        period_end,
        created_at,
    )
    return sub_id


async def invoice(
    connection: asyncpg.Connection | asyncpg.Pool,
    invoice_id: str,
    *,
    user_id: str,
    status: str = "pending",
    expires_at: datetime | None = None,
    subscription_id: str | None = None,
    created_at: datetime | None = None,
) -> str:
    await connection.execute(
        "INSERT INTO payment_invoices (id, user_id, subscription_id, provider,"
        " provider_invoice_id, status, currency, amount_crypto, amount_usd, expires_at,"
        " created_at) VALUES ($1, $2, $3, 'nowpayments', $1, $4, 'USDT', 29, 29, $5,"
        " coalesce($6, now()))",
        invoice_id,
        user_id,
        subscription_id,
        status,
        expires_at,
        created_at,
    )
    return invoice_id


async def key(
    connection: asyncpg.Connection | asyncpg.Pool,
    key_id: str,
    *,
    status: str = "active",
    failures: int = 0,
    cooldown_until: datetime | None = None,
) -> str:
    await connection.execute(
        "INSERT INTO provider_keys (id, provider, label, status, consecutive_failures,"
        " cooldown_until) VALUES ($1, 'nano-banana', $1, $2, $3, $4)",
        key_id,
        status,
        failures,
        cooldown_until,
    )
    return key_id
