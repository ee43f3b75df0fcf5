"""The boundary cleaner: whatever comes in, what goes out can be stored."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from nproxyd.core.text import (
    REPLACEMENT,
    TRUNCATED,
    is_storable,
    json_printable,
    printable,
    storable,
)
from nproxyd.runtime.status import render


class TestStorable:
    @given(st.binary(max_size=3000), st.integers(min_value=1, max_value=2000))
    def test_any_bytes_become_storable_text_within_the_limit(self, raw: bytes, limit: int) -> None:
        """Arbitrary bytes always come out valid UTF-8, without NUL, and no longer than asked."""
        text = storable(raw, limit)
        assert is_storable(text)
        assert len(text) <= limit

    @given(st.text(max_size=3000))
    def test_any_text_becomes_storable(self, value: str) -> None:
        """Arbitrary str (lone surrogates and NULs included) comes out storable."""
        text = storable(value)
        assert is_storable(text)
        assert len(text) <= 1000

    @given(
        st.text(
            alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
            max_size=500,
        )
    )
    def test_clean_text_is_kept_as_is(self, value: str) -> None:
        """Text that is already storable and short enough is returned unchanged."""
        assert storable(value) == value

    def test_latin1_reply_is_decoded_with_replacement_and_marked(self) -> None:
        """A non-UTF-8 SMTP reply keeps its readable part and says it was altered."""
        text = storable(b"451 4.7.1 Zur\xfcckgewiesen")
        assert text.startswith(f"451 4.7.1 Zur{REPLACEMENT}ckgewiesen")
        assert text.endswith("[invalid text replaced]")

    def test_nul_is_replaced_and_marked(self) -> None:
        """A NUL in a provider answer becomes U+FFFD and the text is marked."""
        assert storable("addr\x00ess") == f"addr{REPLACEMENT}ess [invalid text replaced]"

    def test_long_text_is_cut_and_marked(self) -> None:
        """A text over the limit is cut to the limit and ends with the truncation mark."""
        text = storable("x" * 5000, 100)
        assert len(text) == 100
        assert text.endswith(TRUNCATED)

    def test_none_is_empty(self) -> None:
        """A missing value is stored as the empty string."""
        assert storable(None) == ""

    def test_is_storable_refuses_nul_and_surrogates(self) -> None:
        """is_storable names exactly the two things PostgreSQL text refuses."""
        assert not is_storable("a\x00b")
        assert not is_storable("a\udcfcb")
        assert is_storable("Grüße")


class TestPrintable:
    @given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=300))
    def test_printed_text_holds_no_unprintable_character(self, value: str) -> None:
        """Whatever the text, what is printed is printable (ESC, C1, bidi: escaped)."""
        assert printable(value).isprintable()

    @given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=300))
    def test_json_lines_stay_the_same_value_and_printable(self, value: str) -> None:
        """json_printable keeps the JSON value while leaving no unprintable character."""
        encoded = json_printable(json.dumps({"text": value}, ensure_ascii=False))
        assert encoded.isprintable()
        assert json.loads(encoded) == {"text": value}

    def test_escapes_are_python_style(self) -> None:
        """ESC as \\x1b, CSI as \\x9b, a bidi override as \\u202e; printable text unchanged."""
        assert printable("a\x1b[31m\x9bb\u202e") == "a\\x1b[31m\\x9bb\\u202e"
        assert printable("plain text ü €") == "plain text ü €"


class TestStatusTable:
    def test_status_table_prints_errors_escaped(self) -> None:
        """`nproxyd status` prints an error quoting a provider without its raw controls."""
        status = {
            "ready": False,
            "actors": {"payment-watcher": {"last_error": "HTTP 500: \x1b]0;owned\x07"}},
        }
        text = render(status)
        assert "\x1b" not in text and "\x07" not in text
        assert "\\x1b]0;owned\\x07" in text
