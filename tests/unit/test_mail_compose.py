"""Composing outbox rows into RFC 5322 messages."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.charset import QP, Charset
from email.header import decode_header, make_header
from email.message import Message

import pytest

from nproxyd.core.mail import compose_message

DATE = datetime(2026, 3, 9, 12, 0, tzinfo=UTC)


def compose(**overrides: str) -> bytes:
    values = {
        "from_address": "nproxy billing <billing@nproxy.example>",
        "to_address": "user@example.com",
        "subject": "Your nproxy subscription renewal invoice",
        "body": "Line one.\nOpen billing: https://app.example/billing",
        "message_id": "<abc@nproxy.example>",
    }
    values.update(overrides)
    return compose_message(date=DATE, **values).as_bytes()


class TestCompose:
    def test_headers_and_body_parse_back(self) -> None:
        """A standard parser reads back every header and the body, with a final line break."""
        parsed = message_from_bytes(compose(), policy=policy.default)
        assert parsed["From"] == "nproxy billing <billing@nproxy.example>"
        assert parsed["To"] == "user@example.com"
        assert parsed["Subject"] == "Your nproxy subscription renewal invoice"
        assert parsed["Message-ID"] == "<abc@nproxy.example>"
        assert parsed["Date"] == "Mon, 09 Mar 2026 12:00:00 +0000"
        assert parsed.get_content() == "Line one.\nOpen billing: https://app.example/billing\n"

    def test_non_ascii_subject_and_body_survive(self) -> None:
        """Non-ASCII text is encoded (RFC 2047, quoted-printable) and decodes unchanged."""
        raw = compose(subject="Verlängerung, Rechnung", body="Ärger = 29 USDT")
        assert raw.isascii()
        parsed = message_from_bytes(raw)
        assert str(make_header(decode_header(parsed["Subject"]))) == "Verlängerung, Rechnung"
        payload = parsed.get_payload(decode=True)
        assert isinstance(payload, bytes)
        assert payload.decode("utf-8") == "Ärger = 29 USDT\n"

    @pytest.mark.parametrize("field", ["subject", "to_address", "message_id", "from_address"])
    def test_line_breaks_in_headers_are_refused(self, field: str) -> None:
        """A header value with a line break is refused (no header injection)."""
        with pytest.raises(ValueError, match="line break"):
            compose(**{field: "x\r\nBcc: victim@example.com"})

    def test_an_overlong_header_is_folded_by_the_generic_renderer(self) -> None:
        """A header longer than a line may be is rendered by the folding generator instead."""
        raw = compose(subject="word " * 300)
        assert max(len(line) for line in raw.split(b"\n")) < 998

    @pytest.mark.parametrize(
        "body",
        [
            "plain line\nand another",
            "x" * 76 + "\n" + "y" * 77,
            "trailing space \nand tab\t\nend",
            "a = b\n.leading dot\n\nFrom here",
            "Ärger € 29\r\nmixed\rends\x0bvertical",
            "",
        ],
    )
    def test_body_is_encoded_as_the_generic_charset_encodes_it(self, body: str) -> None:
        """The composed message renders as the generic ``set_payload(body, utf-8 QP)`` would."""
        generic = Message(policy=policy.compat32)
        for name, value in [
            ("From", "nproxy billing <billing@nproxy.example>"),
            ("To", "user@example.com"),
            ("Subject", "Your nproxy subscription renewal invoice"),
            ("Date", "Mon, 09 Mar 2026 12:00:00 +0000"),
            ("Message-ID", "<abc@nproxy.example>"),
            ("MIME-Version", "1.0"),
        ]:
            generic[name] = value
        charset = Charset("utf-8")
        charset.body_encoding = QP
        generic.set_payload(body if body.endswith("\n") else body + "\n", charset)

        assert compose(body=body) == generic.as_bytes()
