"""structlog set-up: one JSON object per line on stdout, or a console renderer for humans.

The standard library's ``logging`` (asyncpg, aiohttp, asyncio, anyio, ``warnings``) is routed
through the same processors: the same JSON shape, the same secret redaction, tracebacks as an
``exception`` string field. Such a line has ``event`` = ``library_log`` and the library's
``logger`` and ``message``.
"""

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


def _library_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A stdlib record's message becomes ``message``; ``event`` is the stable ``library_log``."""
    record = event.get("_record")
    event["message"] = event.get("event")
    event["event"] = "library_log"
    if record is not None:
        event["logger"] = record.name
    return event


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to *stream*; for the process's stdout or stderr, to whatever it is when writing.

    Libraries log at interpreter exit too (atexit hooks); by then a test runner may have put
    back and closed the stream that was ``sys.stdout`` when logging was configured.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._std = next(
            (name for name in ("stdout", "stderr") if getattr(sys, name) is stream), None
        )

    def emit(self, record: logging.LogRecord) -> None:
        if self._std is not None:
            self.stream = getattr(sys, self._std)
        super().emit(record)


def _route_stdlib(level: int, shared: list[Any], renderer: Any, stream: TextIO) -> None:
    """Send every stdlib log record through *shared* and *renderer* to *stream*."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            _library_event,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *shared,
            renderer,
        ],
    )
    handler = _Handler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


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
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Any] = [
        _timestamp,
        structlog.processors.format_exc_info,
        _Redactor(secrets or []),
        _order,
    ]
    output = stream or sys.stdout
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *shared,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(output),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(numeric_level, shared, renderer, output)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service="nproxyd", instance=instance)
