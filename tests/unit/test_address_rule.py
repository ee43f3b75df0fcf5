"""The one address rule (``nproxyd.core.rules.address_problem``), by properties.

Every part of nproxyd that decides whether it can deliver to an address asks this rule: the
mail sender, the SMTP and Maildir transports and the renewal scheduler. These properties tie
the rule to what the transports can actually carry.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import Message

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nproxyd.adapters.mail_maildir import _render
from nproxyd.core.errors import MailPermanentError
from nproxyd.core.mail import compose_message
from nproxyd.core.rules import (
    MAX_ADDRESS_LENGTH,
    address_problem,
    ascii_domain,
    is_plausible_address,
    needs_smtputf8,
)

_ATOM = st.text(
    alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd")), min_size=1, max_size=12
)
_ASCII_ATOM = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
_DOMAIN = st.lists(_ASCII_ATOM, min_size=2, max_size=4).map(".".join)
_PLAIN = st.builds(lambda local, domain: f"{local}@{domain}", _ASCII_ATOM, _DOMAIN)
_ANY_TEXT = st.one_of(st.none(), st.text(max_size=300), _PLAIN)


class TestAddressRule:
    @given(_ANY_TEXT)
    def test_rule_answers_every_text_without_raising(self, address: str | None) -> None:
        """Any text (or None) gets an answer: a reason, or None; never an exception."""
        problem = address_problem(address)
        assert problem is None or (isinstance(problem, str) and problem)
        assert is_plausible_address(address) is (problem is None)

    @given(_PLAIN)
    def test_plain_ascii_addresses_are_accepted(self, address: str) -> None:
        """local@domain in letters and digits is deliverable and needs no SMTPUTF8."""
        assert address_problem(address) is None
        assert not needs_smtputf8(address)

    @given(st.text(max_size=300))
    def test_accepted_addresses_are_bounded_plain_and_idna_encodable(self, address: str) -> None:
        """Whatever the rule accepts is ≤ 254 characters, one @, no spaces, an IDNA domain."""
        if address_problem(address) is not None:
            return
        local, _, domain = address.rpartition("@")
        assert len(address) <= MAX_ADDRESS_LENGTH
        assert local and domain and "@" not in domain
        assert not any(char.isspace() for char in address)
        wire_domain = ascii_domain(domain)
        assert wire_domain is not None and wire_domain.isascii()
        assert needs_smtputf8(address) is (not local.isascii())

    @given(_ATOM, _ATOM, _DOMAIN)
    def test_every_accepted_address_can_be_composed_and_rendered(
        self, name: str, local: str, domain: str
    ) -> None:
        """An address the rule accepts always makes a message the transports can render."""
        address = f"{local}@{domain}"
        if address_problem(address) is not None:
            return
        message = compose_message(
            from_address=f"{name} <billing@nproxy.localhost>",
            to_address=address,
            subject=name,
            body=name,
            message_id="<m@nproxy.localhost>",
            date=datetime(2026, 3, 12, tzinfo=UTC),
        )
        rendered = message.as_bytes()
        assert b"\nTo: " in rendered
        if not needs_smtputf8(address):
            assert rendered.isascii()

    @given(_PLAIN, st.sampled_from([" ", "\r\n", "\x00", "\t", "<", ",", "\u2028"]), st.data())
    def test_separators_and_controls_anywhere_are_refused(
        self, address: str, bad: str, data: st.DataObject
    ) -> None:
        """A space, line break, NUL, bracket or comma anywhere makes the address undeliverable."""
        at = data.draw(st.integers(min_value=0, max_value=len(address)))
        assert address_problem(address[:at] + bad + address[at:]) is not None

    @given(st.integers(min_value=MAX_ADDRESS_LENGTH + 1, max_value=600))
    def test_longer_than_254_is_refused(self, length: int) -> None:
        """An address over 254 characters is refused, however plain."""
        domain = "example.test"
        local = "a" * 60
        labels = "b" * (length - len(local) - 1 - len(domain) - 1)
        address = f"{local}@{labels}.{domain}"
        assert len(address) == length
        assert address_problem(address) is not None


class TestTransportsAskTheRule:
    @given(_ANY_TEXT.filter(lambda value: value is not None))
    def test_maildir_refuses_exactly_what_the_rule_refuses(self, recipient: str) -> None:
        """The Maildir transport refuses a recipient if and only if the rule does."""
        message = Message()
        message["Subject"] = "s"
        message.set_payload("body\n")
        problem = address_problem(recipient)
        if problem is None:
            assert _render(message, recipient).startswith(b"Delivered-To: ")
        else:
            with pytest.raises(MailPermanentError, match="invalid recipient address"):
                _render(message, recipient)
