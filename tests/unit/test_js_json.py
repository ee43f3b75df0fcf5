"""JSON written as JavaScript's JSON.stringify writes it, for IPN signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nproxyd.adapters.js_json import js_number, js_stringify_documented, js_stringify_sorted
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


# An IPN as NOWPayments sends it (with the nested "fee" object), and what node prints for
# JSON.stringify(params, Object.keys(params).sort()), the recipe NOWPayments documents, and for
# the HMAC-SHA512 of that text with the secret "ipn-secret".
FEE_IPN = (
    b'{"payment_id":5077125051,"parent_payment_id":null,"invoice_id":null,'
    b'"payment_status":"finished","pay_address":"TQx1","price_amount":29,'
    b'"price_currency":"usd","pay_amount":29.05,"actually_paid":29.05,'
    b'"actually_paid_at_fiat":0,"pay_currency":"usdttrc20",'
    b'"order_id":"renewal-sub_1-1772366400000000","order_description":"nproxy pro renewal",'
    b'"purchase_id":"6084744717","outcome_amount":28.9,"outcome_currency":"usdttrc20",'
    b'"payment_extra_ids":null,"fee":{"currency":"usdttrc20","depositFee":0.05,'
    b'"withdrawalFee":0,"serviceFee":0.1455},"created_at":"2026-03-09T12:00:00.000Z",'
    b'"updated_at":"2026-03-09T12:30:00.000Z"}'
)
FEE_IPN_NODE_SIGNATURE = (
    "caa8aa39d952e625ce25a8e8851f901628e6ca2c95c4bffb9b2aa34f51c4dfe0"
    "ff97e51cc5d306b9d68b75bead08aace377908716e670945956a7e17edbb8af8"
)


class TestDocumentedForm:
    def test_the_top_level_names_filter_and_order_objects_at_every_level(self) -> None:
        """As node writes it: nested objects keep only top-level names, in the sorted order."""
        document = json.loads(
            '{"b":[{"b":1,"z":2,"a":3},4],"a":{"a":{"b":1,"c":2},"q":1},"c":null}'
        )
        assert (
            js_stringify_documented(document)
            == '{"a":{"a":{"b":1,"c":2}},"b":[{"a":3,"b":1},4],"c":null}'
        )

    def test_a_nested_object_without_top_level_names_is_written_empty(self) -> None:
        """NOWPayments' "fee" object has no top-level name: the documented recipe signs {}."""
        written = js_stringify_documented(json.loads(FEE_IPN))
        assert '"fee":{}' in written
        digest = hmac.new(b"ipn-secret", written.encode(), hashlib.sha512).hexdigest()
        assert digest == FEE_IPN_NODE_SIGNATURE


class TestVerifier:
    def test_an_ipn_signed_the_documented_way_with_a_nested_object_is_accepted(self) -> None:
        """A body with the nested "fee", signed as NOWPayments documents it (node), is accepted."""
        payment = NowPaymentsIpnVerifier("ipn-secret").verify(FEE_IPN, FEE_IPN_NODE_SIGNATURE)
        assert payment.payment_id == "5077125051"
        assert payment.status == "finished"

    def test_a_body_nested_too_deep_to_write_again_is_rejected(self) -> None:
        """A body json.loads can parse but that is too deep to re-serialise: rejected, no crash."""
        body = ('{"a":' * 900 + "1" + "}" * 900).encode()
        signature = hmac.new(b"s", body, hashlib.sha512).hexdigest()
        with pytest.raises(IpnRejected, match="nested too deep"):
            NowPaymentsIpnVerifier("s").verify(body, signature)
