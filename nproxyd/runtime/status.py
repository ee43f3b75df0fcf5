"""``nproxyd status``: fetch /status of a running daemon and print it as a table."""

from __future__ import annotations

from typing import Any

import aiohttp

from nproxyd.core.errors import DatabaseUnavailable, NproxydError

_COLUMNS = (
    ("actor", "actor"),
    ("ready", "ready"),
    ("last_outcome", "outcome"),
    ("last_tick_at", "last tick"),
    ("last_duration_seconds", "duration s"),
    ("next_due_at", "next due"),
    ("consecutive_failures", "failures"),
    ("restarts", "restarts"),
)


class DaemonUnreachable(DatabaseUnavailable):
    """The daemon's HTTP endpoint cannot be reached."""


async def fetch_status(url: str) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url.rstrip("/") + "/status") as response,
        ):
            body: dict[str, Any] = await response.json()
            return body
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DaemonUnreachable(f"cannot reach {url}: {type(exc).__name__}") from None
    except ValueError:
        raise NproxydError(f"{url}/status did not answer JSON") from None


def render(status: dict[str, Any]) -> str:
    """A readable table of a /status document."""
    lines = [
        f"instance  {status.get('instance')}",
        f"uptime    {status.get('uptime_seconds')} s",
        f"ready     {status.get('ready')}   database {status.get('database')}",
        f"queue     {status.get('queue_depth')}   outbox {status.get('outbox')}",
        f"keys      {status.get('provider_keys')}",
        f"payments  {status.get('payments')}",
        "",
    ]
    rows = [[label for _, label in _COLUMNS]]
    for name, actor in sorted(status.get("actors", {}).items()):
        rows.append([name] + [_cell(actor.get(key)) for key, _ in _COLUMNS[1:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return "\n".join(lines).rstrip() + "\n"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


async def fetch_and_render(url: str) -> str:
    return render(await fetch_status(url))
