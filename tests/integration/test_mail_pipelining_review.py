"""Pipelined SMTP under failure: every message in flight ends, none recorded sent unanswered.

Each test pins a defect found by an adversarial review of the pipelined SMTP client.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from nproxyd.adapters.mail_smtp import PIPELINE_DEPTH, SmtpTransport
from nproxyd.core.config import SmtpConfig
from nproxyd.core.errors import MailTransientError
from tests.fakes.raw_smtp import RawSmtpServer
from tests.integration.test_mail_pipelining import GOOD, send_all

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
