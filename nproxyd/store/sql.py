"""Named SQL blocks, procrastinate style.

A ``.sql`` file holds blocks like::

    -- expire_pending_invoices --
    -- Expire one keyset batch of due invoices; $1 now, $2 batch size, ...
    UPDATE ...;

The header names the statement; the comment line under it describes it. Parameters are
written one of two ways, never both in one block:

- positional, ``$1``, ``$2``…, listed by the description line; callers pass them in order:
  ``db.fetch("expire_pending_invoices", now, after, after_id, size)``.
- by name, ``:name`` (``[a-z_][a-z0-9_]*``); callers pass keywords:
  ``db.fetch("commit_renewal_invoices", subscription_ids=..., now=...)``. Each name becomes
  one ``$n`` (numbered in order of first use, so a name may occur many times), and the
  description line need not repeat them. Statements with more than a few parameters use names,
  so no caller depends on the order of a Struct's fields.

A ``:`` in a string literal, a quoted identifier, a comment, a dollar-quoted string or a
``::type`` cast is not a parameter. Each file is parsed once at import into
:class:`Statement` objects; :meth:`Statement.bind` turns a call's arguments into the driver's
positional list and raises :class:`ParameterMismatch` naming the statement when they disagree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

_HEADER = re.compile(r"^-- ([a-z0-9_]+) --$", re.MULTILINE)


class ParameterMismatch(TypeError):
    """A statement was called with parameters it does not take (a programming error)."""


@dataclass(frozen=True)
class Statement:
    """One named block: its text for the driver (``$n`` only) and how it takes parameters."""

    name: str
    description: str
    text: str
    count: int  # how many parameters the driver receives ($1..$count)
    names: tuple[str, ...] = ()  # the name of each $n, in order; empty for positional blocks

    def bind(self, args: tuple[Any, ...], params: Mapping[str, Any]) -> tuple[Any, ...]:
        """The driver's arguments for a call with ``args`` or ``params`` (never both)."""
        if self.names:
            if args:
                raise ParameterMismatch(
                    f"statement {self.name} takes its parameters by name: {', '.join(self.names)}"
                )
            missing = [name for name in self.names if name not in params]
            extra = sorted(set(params) - set(self.names))
            if missing or extra:
                raise ParameterMismatch(
                    f"statement {self.name}: missing parameters {missing}, unknown {extra}"
                )
            return tuple(params[name] for name in self.names)
        if params:
            raise ParameterMismatch(
                f"statement {self.name} takes positional parameters, not {sorted(params)}"
            )
        if len(args) != self.count:
            raise ParameterMismatch(
                f"statement {self.name} takes {self.count} parameters, got {len(args)}"
            )
        return args


# One token of a block: what ``:name``/``$n`` scanning must step over whole (string literals,
# E'…' strings with backslash escapes, quoted identifiers, comments, dollar-quoted strings,
# ``::`` casts), a parameter, or the opener of an unterminated one. ``finditer`` tries it at
# each offset in turn, like a character loop but in C (the blocks are parsed at import).
# A quote right after a lone E (not the end of a word) opens an E'…' string; possessive
# repeats never give back a doubled quote, so an unterminated literal is never split in two.
# Every token begins with one of - ' " / $ :, and the lookahead in front rejects any other
# offset at once instead of trying each alternative there (half the parse, start-up).
_LONE_E = r"(?<=[eE])(?<![\w$][eE])"
_TOKEN = re.compile(
    rf"""
    (?=[-'"/$:])
    (?:
      {_LONE_E}'(?:[^'\\]|\\.|'')*+'
    | (?P<open_e>{_LONE_E}')
    | '(?:[^']|'')*+'
    | "(?:[^"]|"")*+"
    | --[^\n]*
    | /\*.*?\*/
    | \$(?P<tag>(?:[A-Za-z_][A-Za-z0-9_]*)?)\$.*?\$(?P=tag)\$
    | ::
    | :(?P<name>[a-z_][a-z0-9_]*)
    | \$(?P<number>[0-9]+)
    | (?P<open>['"]|/\*|\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$)
    )
    """,
    re.VERBOSE | re.DOTALL,
)
_UNTERMINATED = {"/*": "comment", "'": "'", '"': '"'}


def number_parameters(sql: str) -> tuple[str, tuple[str, ...], int]:
    """``sql`` with each ``:name`` replaced by its ``$n``; the names in ``$n`` order, and the
    highest ``$n`` written directly. Raises ValueError when a block mixes both styles."""
    out: list[str] = []
    names: list[str] = []
    highest = 0
    index = 0
    for token in _TOKEN.finditer(sql):
        out.append(sql[index : token.start()])
        index = token.end()
        name, number, opener = token.group("name", "number", "open")
        opener = opener or token.group("open_e")
        if name is not None:
            if name not in names:
                names.append(name)
            out.append(f"${names.index(name) + 1}")
        elif number is not None:
            highest = max(highest, int(number))
            out.append(token.group(0))
        elif opener is not None:
            kind = _UNTERMINATED.get(opener, "dollar quote")
            raise ValueError(f"unterminated {kind} at offset {token.start()}")
        else:
            out.append(token.group(0))
    out.append(sql[index:])
    if names and highest:
        raise ValueError("both :name and $n parameters")
    return "".join(out), tuple(names), highest


def parse_statements(text: str) -> dict[str, Statement]:
    """Split a ``.sql`` file into its named statements."""
    parts = _HEADER.split(text)
    statements: dict[str, Statement] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip().splitlines()
        description = ""
        if lines and lines[0].startswith("--"):
            description = lines[0].removeprefix("--").strip()
            lines = lines[1:]
        if name in statements:
            raise ValueError(f"duplicate query name {name}")
        try:
            sql, names, highest = number_parameters("\n".join(lines).strip().rstrip(";"))
        except ValueError as exc:
            raise ValueError(f"statement {name}: {exc}") from None
        count = len(names) or highest
        statements[name] = Statement(name, description, sql, count, names)
    return statements


def parse(text: str) -> dict[str, str]:
    """Split a ``.sql`` file into its named statements' texts (``$n`` only)."""
    return {name: statement.text for name, statement in parse_statements(text).items()}


def load_statements() -> dict[str, Statement]:
    """Every named statement of every file in ``nproxyd/store/sql``."""
    statements: dict[str, Statement] = {}
    for entry in sorted(
        resources.files("nproxyd.store").joinpath("sql").iterdir(), key=lambda item: item.name
    ):
        if entry.name.endswith(".sql"):
            for name, statement in parse_statements(entry.read_text(encoding="utf-8")).items():
                if name in statements:
                    raise ValueError(f"duplicate query name {name}")
                statements[name] = statement
    return statements


def load_queries() -> dict[str, str]:
    """Every named statement's text (``$n`` only), by name."""
    return {name: statement.text for name, statement in load_statements().items()}


STATEMENTS = load_statements()
QUERIES = {name: statement.text for name, statement in STATEMENTS.items()}


def bind(name: str, args: tuple[Any, ...], params: Mapping[str, Any]) -> tuple[Any, ...]:
    """The text of statement ``name`` followed by the driver's arguments for this call."""
    statement = STATEMENTS[name]
    return (statement.text, *statement.bind(args, params))
