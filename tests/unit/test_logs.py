"""Log set-up: library (stdlib logging) records become redacted JSON lines like our own."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from nproxyd.runtime import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


class TestLibraryLogs:
    @pytest.mark.usefixtures("restore_logging")
    def test_a_library_traceback_is_one_redacted_json_line(self) -> None:
        """asyncpg's warning with a traceback is one JSON line, its secret replaced by ***."""
        buffer = io.StringIO()
        logs.configure(instance="i-1", secrets=["s3cret"], stream=buffer)
        error = ConnectionError("postgresql://nproxyd:s3cret@db/nproxy refused")
        logging.getLogger("asyncpg.pool").warning(
            "Failed to restore the pool connection floor", exc_info=error
        )
        (line,) = lines(buffer)
        assert line["event"] == "library_log"
        assert line["level"] == "warning"
        assert line["logger"] == "asyncpg.pool"
        assert line["message"] == "Failed to restore the pool connection floor"
        assert line["service"] == "nproxyd"
        assert line["instance"] == "i-1"
        assert "ConnectionError" in str(line["exception"])
        assert "s3cret" not in buffer.getvalue()
        assert "***" in str(line["exception"])

    @pytest.mark.usefixtures("restore_logging")
    def test_the_configured_level_filters_library_and_own_events(self) -> None:
        """At info, debug events of both kinds are dropped; at debug, both are written."""
        quiet, verbose = io.StringIO(), io.StringIO()
        logs.configure(level="info", stream=quiet)
        structlog.get_logger().debug("own_debug")
        logging.getLogger("aiohttp.server").debug("library debug")
        logs.configure(level="debug", stream=verbose)
        structlog.get_logger().debug("own_debug")
        logging.getLogger("aiohttp.server").debug("library debug")
        assert quiet.getvalue() == ""
        assert [line["event"] for line in lines(verbose)] == ["own_debug", "library_log"]
