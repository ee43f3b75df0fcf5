"""The named-block parser and parameter binding of ``nproxyd/store/sql.py``."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from nproxyd.store.sql import (
    QUERIES,
    STATEMENTS,
    ParameterMismatch,
    Statement,
    number_parameters,
    parse_statements,
)

TWO_BLOCKS = """\
-- first_one --
-- Positional; $1 now, $2 size.
SELECT $1::timestamptz, $2 LIMIT $2;

-- second_one --
-- By name: :ids may repeat.
UPDATE t SET at = :now
WHERE id = ANY(:ids::text[]) AND at < :now;
"""


class TestBlocks:
    def test_blocks_get_their_names_descriptions_and_text(self) -> None:
        """Each header names a block; the comment under it is its description, not its text."""
        statements = parse_statements(TWO_BLOCKS)
        assert list(statements) == ["first_one", "second_one"]
        first, second = statements["first_one"], statements["second_one"]
        assert first.description == "Positional; $1 now, $2 size."
        assert first.text == "SELECT $1::timestamptz, $2 LIMIT $2"
        assert second.description == "By name: :ids may repeat."
        assert second.text == "UPDATE t SET at = $1\nWHERE id = ANY($2::text[]) AND at < $1"

    def test_positional_block_counts_its_highest_parameter(self) -> None:
        """A ``$n`` block takes as many parameters as its highest ``$n``, and no names."""
        first = parse_statements(TWO_BLOCKS)["first_one"]
        assert (first.count, first.names) == (2, ())

    def test_names_are_numbered_in_order_of_first_use(self) -> None:
        """A repeated name is one parameter; names are numbered as they first appear."""
        second = parse_statements(TWO_BLOCKS)["second_one"]
        assert (second.count, second.names) == (2, ("now", "ids"))

    def test_duplicate_block_names_are_refused(self) -> None:
        """Two blocks of one name in a file are an error naming the block."""
        with pytest.raises(ValueError, match="duplicate query name first_one"):
            parse_statements(TWO_BLOCKS + "\n-- first_one --\n-- Again.\nSELECT 1;\n")

    def test_mixing_both_styles_in_one_block_is_refused(self) -> None:
        """A block with both ``:name`` and ``$n`` is an error naming the block."""
        with pytest.raises(ValueError, match=r"statement mixed: both :name and \$n"):
            parse_statements("-- mixed --\n-- Bad.\nSELECT :a, $2;\n")

    def test_shipped_files_parse_and_queries_hold_driver_text(self) -> None:
        """Every shipped statement parses, and what the driver receives has no ``:name`` left."""
        assert set(QUERIES) == set(STATEMENTS)
        for name, statement in STATEMENTS.items():
            assert statement.description, name
            assert QUERIES[name] == statement.text
            assert number_parameters(statement.text)[1] == (), name


class TestNotParameters:
    @pytest.mark.parametrize(
        "sql",
        [
            "SELECT 'a:b', 'it''s :x'",
            "SELECT E'\\':x'",
            'SELECT 1 AS ":x"',
            "SELECT $$ :x $$, $tag$ :y $1 $tag$",
            "SELECT 1 -- :x and $1 in a comment\n",
            "SELECT /* :x $1 */ 1",
            "SELECT '2026-01-01'::timestamptz, x::text[]",
            "SELECT a[1:2] FROM t",
        ],
    )
    def test_colons_in_literals_comments_and_casts_are_kept(self, sql: str) -> None:
        """No ``:`` or ``$`` inside a literal, identifier, comment or cast becomes a parameter."""
        assert number_parameters(sql) == (sql, (), 0)

    def test_a_name_after_a_cast_is_still_a_parameter(self) -> None:
        """``:x::int`` is parameter ``x`` cast to int."""
        assert number_parameters("SELECT :x::int, ':y'") == ("SELECT $1::int, ':y'", ("x",), 0)

    def test_a_backslash_escapes_a_quote_only_in_an_e_string(self) -> None:
        """In ``E'…'`` a backslash escapes the quote; after a word ending in e it does not."""
        assert number_parameters("SELECT E'\\':x', :y")[1] == ("y",)
        assert number_parameters("SELECT type'a\\', :x")[1] == ("x",)

    def test_unterminated_literal_is_an_error(self) -> None:
        """A string literal that never ends is refused rather than silently swallowed."""
        with pytest.raises(ValueError, match="unterminated"):
            number_parameters("SELECT ':x")

    @pytest.mark.parametrize(
        ("sql", "message"),
        [
            ("SELECT ''', :x", "unterminated ' at offset 7"),
            ("SELECT E'a\\', :x", "unterminated ' at offset 8"),
            ('SELECT "a""', 'unterminated " at offset 7'),
            ("SELECT 1 /* :x", "unterminated comment at offset 9"),
            ("SELECT $q$ :x $$", "unterminated dollar quote at offset 7"),
        ],
    )
    def test_an_unterminated_token_is_named_at_its_opening(self, sql: str, message: str) -> None:
        """A doubled or escaped quote never ends a literal: the error names where it began."""
        with pytest.raises(ValueError, match=message):
            number_parameters(sql)


NAMED = Statement("named", "By name.", "SELECT $1, $2", 2, ("now", "ids"))
POSITIONAL = Statement("positional", "$1 now.", "SELECT $1", 1)
NOW = datetime(2026, 3, 10, tzinfo=UTC)


class TestBinding:
    def test_names_are_bound_in_statement_order(self) -> None:
        """Keywords in any order come out in the statement's ``$n`` order."""
        assert NAMED.bind((), {"ids": ["a"], "now": NOW}) == (NOW, ["a"])

    @pytest.mark.parametrize(
        ("args", "params", "message"),
        [
            ((), {"now": NOW}, r"named: missing parameters \['ids'\], unknown \[\]"),
            ((), {"now": NOW, "ids": [], "id": 1}, r"missing parameters \[\], unknown \['id'\]"),
            ((NOW, []), {}, "named takes its parameters by name: now, ids"),
        ],
    )
    def test_a_named_statement_refuses_wrong_parameters(
        self, args: tuple[object, ...], params: dict[str, object], message: str
    ) -> None:
        """A missing, an unknown or a positional parameter is an error naming the statement."""
        with pytest.raises(ParameterMismatch, match=message):
            NAMED.bind(args, params)

    def test_a_positional_statement_refuses_keywords_and_wrong_counts(self) -> None:
        """A ``$n`` statement takes exactly its count of positional arguments."""
        assert POSITIONAL.bind((NOW,), {}) == (NOW,)
        with pytest.raises(ParameterMismatch, match="positional takes 1 parameters, got 2"):
            POSITIONAL.bind((NOW, NOW), {})
        refused = re.escape("positional takes positional parameters, not ['now']")
        with pytest.raises(ParameterMismatch, match=refused):
            POSITIONAL.bind((), {"now": NOW})

    def test_a_mismatch_is_a_programming_error(self) -> None:
        """A mismatch is a TypeError, never a data error the store would isolate."""
        assert issubclass(ParameterMismatch, TypeError)
        assert not issubclass(ParameterMismatch, ValueError)
