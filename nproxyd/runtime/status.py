"""``nproxyd status``: fetch /status of a running daemon and print it as a table."""

from __future__ import annotations

from typing import Any

import aiohttp

from nproxyd.core.errors import DaemonUnreachable
from nproxyd.core.text import printable

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
_SUMMARY_FIRST = ("instance", "ready", "uptime_seconds", "database", "supervisor_healthy")


def status_url(url: str) -> str:
    """The /status URL of a daemon given its base URL or the /status URL itself."""
    base = url.strip().rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    return base if base.endswith("/status") else f"{base}/status"


async def fetch_status(url: str) -> dict[str, Any]:
    """GET the /status document; any HTTP answer with nproxyd's JSON counts (200 or 503)."""
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url) as response,
        ):
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise DaemonUnreachable(f"cannot reach {url}: {type(exc).__name__}") from None
    except ValueError:
        raise DaemonUnreachable(f"{url} did not answer with nproxyd's /status JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("actors"), dict):
        raise DaemonUnreachable(f"{url} did not answer with nproxyd's /status JSON")
    return body


def render(status: dict[str, Any]) -> str:
    """A readable table of a /status document: a summary, then one row per actor."""
    keys = [key for key in _SUMMARY_FIRST if key in status]
    keys += sorted(key for key in status if key not in keys and key != "actors")
    width = max((len(key) for key in keys), default=0)
    lines = [f"{key.ljust(width)}  {_value(status[key])}" for key in keys]
    lines.append("")
    rows = [[label for _, label in _COLUMNS]]
    for name, actor in sorted(status["actors"].items()):
        rows.append([name] + [_value(actor.get(key)) for key, _ in _COLUMNS[1:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    errors = [
        f"{name}: {printable(str(actor['last_error']))}"
        for name, actor in sorted(status["actors"].items())
        if actor.get("last_error")
    ]
    if errors:
        lines += ["", "last errors:", *(f"  {line}" for line in errors)]
    return "\n".join(line.rstrip() for line in lines).rstrip() + "\n"


def _value(value: Any) -> str:
    """One cell: ``-`` for nothing, yes/no, ``a=1 b=2`` for a mapping, never a Python repr."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return " ".join(f"{key}={_value(item)}" for key, item in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(_value(item) for item in value) or "-"
    return printable(str(value))  # errors may quote a provider or a server: no raw controls
