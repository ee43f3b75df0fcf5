"""Pipelined SMTP under failure: every message in flight ends, none recorded sent unanswered.

A connection that fails with a full pipeline (``PIPELINE_DEPTH`` messages in flight) must let
every send behind it end: retried on a fresh connection once the failed one frees its slot.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from nproxyd.adapters.mail_smtp import PIPELINE_DEPTH, SmtpTransport
from nproxyd.core.config import SmtpConfig
from nproxyd.core.errors import MailTransientError
from tests.fakes.raw_smtp import RawSmtpServer
from tests.integration.test_mail_pipelining import GOOD, REFUSED, send_all

pytestmark = pytest.mark.anyio


@pytest.fixture
def pipelining_server() -> Iterator[RawSmtpServer]:
    with RawSmtpServer(pipelining=True) as running:
        yield running


class TestInFlight:
    async def test_every_retry_after_a_timeout_with_a_full_pipeline_ends(
        self, pipelining_server: RawSmtpServer
    ) -> None:
        """A reply timeout with a full pipeline: the messages behind are all retried and sent."""
        pipelining_server.stall_at("data_end")
        transport = SmtpTransport(
            SmtpConfig(
                host=pipelining_server.host,
                port=pipelining_server.port,
                max_connections=1,
                timeout_seconds=0.5,
            )
        )
        mails = [(GOOD, number) for number in range(PIPELINE_DEPTH)]

        with anyio.move_on_after(10) as scope:
            outcomes = await send_all(transport, mails, senders=PIPELINE_DEPTH)
        await transport.aclose()

        assert not scope.cancelled_caught, "a send retried on a fresh connection never ended"
        assert isinstance(outcomes[0], MailTransientError)
        assert [outcomes[number] for number in range(1, PIPELINE_DEPTH)] == [None, None]
        ids = pipelining_server.message_ids()
        assert all(ids[f"<pipe-{number}@nproxy.localhost>"] == 1 for number in (1, 2))

    @pytest.mark.parametrize(
        "script",
        [
            ("drop", "data_end"),
            ("end", b"421 4.3.2 closing"),
            ("end", b"not SMTP"),
            ("rcpt", b"421 4.3.2 closing"),
            ("rset", b"500 5.5.1 no"),
            ("data", b"354 go ahead anyway"),
        ],
        ids=repr,
    )
    async def test_every_send_ends_when_a_full_pipeline_fails(
        self, pipelining_server: RawSmtpServer, script: tuple[str, object]
    ) -> None:
        """A connection failing with a full pipeline: every send ends, and none that succeeded
        was left undelivered."""
        kind, what = script
        if kind == "drop":
            pipelining_server.drop_at("data_end")
        elif kind == "end":
            pipelining_server.answer_data_end(REFUSED, what)  # type: ignore[arg-type]
        elif kind == "rcpt":
            pipelining_server.answer_rcpt(REFUSED, what)  # type: ignore[arg-type]
        else:
            pipelining_server.answer_rcpt(REFUSED, b"550 5.1.1 no such user")
            if kind == "rset":
                pipelining_server.answer_rset(what)  # type: ignore[arg-type]
            else:
                pipelining_server.answer_data_without_recipient(what)  # type: ignore[arg-type]
        transport = SmtpTransport(
            SmtpConfig(
                host=pipelining_server.host,
                port=pipelining_server.port,
                max_connections=1,
                timeout_seconds=5,
            )
        )
        mails = [(REFUSED if number == 1 else GOOD, number) for number in range(9)]

        with anyio.move_on_after(10) as scope:
            outcomes = await send_all(transport, mails, senders=PIPELINE_DEPTH)
        await transport.aclose()

        assert not scope.cancelled_caught, "a send retried on a fresh connection never ended"
        delivered = pipelining_server.message_ids()
        assert all(
            delivered[f"<pipe-{number}@nproxy.localhost>"] >= 1
            for number, outcome in outcomes.items()
            if outcome is None
        )
        failed = [number for number, outcome in sorted(outcomes.items()) if outcome is not None]
        assert failed == ([0] if kind == "drop" else [1])  # a drop: at the first end of data
