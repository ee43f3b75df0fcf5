"""The boundary cleaner: whatever comes in, what goes out can be stored."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nproxyd.core.text import REPLACEMENT, TRUNCATED, is_storable, storable


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
