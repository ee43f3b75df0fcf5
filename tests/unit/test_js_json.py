"""JSON written as JavaScript's JSON.stringify writes it, for IPN signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nproxyd.adapters.js_json import js_number, js_stringify_sorted
from nproxyd.adapters.nowpayments_status import NowPaymentsIpnVerifier
from nproxyd.core.errors import IpnRejected

# What node prints for String(x) (Number.prototype.toString).
NODE = [
    (5e-05, "0.00005"),
    (1e-06, "0.000001"),
    (1e-07, "1e-7"),
    (-2.5e-08, "-2.5e-8"),
    (0.1, "0.1"),
    (123.0, "123"),
    (1e16, "10000000000000000"),
    (1e20, "100000000000000000000"),
    (1e21, "1e+21"),
    (1.5e300, "1.5e+300"),
    (123456789.123, "123456789.123"),
    (-0.0, "0"),
    (2**53 + 1, "9007199254740992"),
    (10**400, "null"),
]


class TestJsNumber:
    @pytest.mark.parametrize(("value", "expected"), NODE, ids=[t for _, t in NODE])
    def test_numbers_are_written_as_node_writes_them(self, value: float, expected: str) -> None:
        """Shortest digits; fixed notation for decimal exponents in [-6, 21), else 1e-7."""
        assert js_number(value) == expected

    @given(st.floats(allow_nan=False, allow_infinity=False))
    def test_every_finite_double_reads_back_the_same(self, value: float) -> None:
        """What is written is a JSON number that reads back as the same double."""
        written = js_number(value)
        assert float(json.loads(written)) == value or (value == 0 and written == "0")
        fixed = value == 0 or -6 <= Decimal(repr(abs(value))).adjusted() < 21
        assert ("e" in written) is not fixed


class TestStringify:
    def test_keys_sort_by_utf16_at_every_level_and_text_stays_raw(self) -> None:
        """Nested keys sorted by UTF-16 code units; non-ASCII raw; controls escaped as JS does."""
        document = json.loads(
            '{"b":{"z":1,"a":2},"\\ud83d\\ude00":1,"\\uffff":2,"a":"ü\\n\\u0001"}'
        )
        assert js_stringify_sorted(document) == (
            '{"a":"ü\\n\\u0001","b":{"a":2,"z":1},"\U0001f600":1,"\uffff":2}'
        )


class TestVerifier:
    def test_a_body_nested_too_deep_to_write_again_is_rejected(self) -> None:
        """A body json.loads can parse but that is too deep to re-serialise: rejected, no crash."""
        body = ('{"a":' * 900 + "1" + "}" * 900).encode()
        signature = hmac.new(b"s", body, hashlib.sha512).hexdigest()
        with pytest.raises(IpnRejected, match="nested too deep"):
            NowPaymentsIpnVerifier("s").verify(body, signature)
