"""structlog set-up: one JSON object per line on stdout, or a console renderer for humans."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from nproxyd.core.clock import SystemClock, format_instant
from nproxyd.core.config import redact_text

_clock = SystemClock()


class _Redactor:
    """Replaces every known secret in every string value of an event."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = [secret for secret in secrets if secret]

    def __call__(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if self.secrets:
            for key, value in event.items():
                if isinstance(value, str):
                    event[key] = redact_text(value, self.secrets)
        return event


def _timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["ts"] = format_instant(_clock.now())
    return event


def _order(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    head = {
        key: event.pop(key)
        for key in ("ts", "level", "event", "service", "instance")
        if key in event
    }
    if "actor" in event:
        head["actor"] = event.pop("actor")
    head.update(event)
    return head


def configure(
    *,
    level: str = "info",
    fmt: str = "json",
    instance: str = "",
    secrets: list[str] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for the whole process."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.format_exc_info,
            _Redactor(secrets or []),
            _order,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service="nproxyd", instance=instance)
