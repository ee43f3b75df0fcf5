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
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_POSITIONAL = re.compile(r"\$([0-9]+)")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


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


def _escape_prefix(sql: str, quote: int) -> bool:
    """Whether the quote at ``quote`` opens an ``E'…'`` string (a lone E, not a word's end)."""
    before = sql[quote - 2] if quote >= 2 else " "
    return sql[quote - 1 : quote] in ("e", "E") and not (before.isalnum() or before in "_$")


def _skip_quoted(sql: str, start: int) -> int:
    """The index after the literal, identifier, comment or dollar-quoted string at ``start``,
    or ``start`` when none begins there."""
    char = sql[start]
    if char in "'\"":
        # A doubled quote is an escaped quote; E'…' strings may also escape with a backslash.
        escapes = char == "'" and _escape_prefix(sql, start)
        index = start + 1
        while index < len(sql):
            if escapes and sql[index] == "\\":
                index += 2
                continue
            if sql[index] == char:
                if sql.startswith(char, index + 1):
                    index += 2
                    continue
                return index + 1
            index += 1
        raise ValueError(f"unterminated {char} at offset {start}")
    if sql.startswith("--", start):
        end = sql.find("\n", start)
        return len(sql) if end < 0 else end
    if sql.startswith("/*", start):
        end = sql.find("*/", start + 2)
        if end < 0:
            raise ValueError(f"unterminated comment at offset {start}")
        return end + 2
    tag = _DOLLAR_TAG.match(sql, start)
    if char == "$" and tag:
        end = sql.find(tag.group(0), tag.end())
        if end < 0:
            raise ValueError(f"unterminated dollar quote at offset {start}")
        return end + len(tag.group(0))
    return start


def number_parameters(sql: str) -> tuple[str, tuple[str, ...], int]:
    """``sql`` with each ``:name`` replaced by its ``$n``; the names in ``$n`` order, and the
    highest ``$n`` written directly. Raises ValueError when a block mixes both styles."""
    out: list[str] = []
    names: list[str] = []
    highest = 0
    index = 0
    while index < len(sql):
        after = _skip_quoted(sql, index)
        if after > index:
            out.append(sql[index:after])
            index = after
            continue
        if sql.startswith("::", index):
            out.append("::")
            index += 2
            continue
        named = _NAME.match(sql, index + 1) if sql[index] == ":" else None
        positional = _POSITIONAL.match(sql, index)
        if named:
            if named.group(0) not in names:
                names.append(named.group(0))
            out.append(f"${names.index(named.group(0)) + 1}")
            index = named.end()
        elif positional:
            highest = max(highest, int(positional.group(1)))
            out.append(positional.group(0))
            index = positional.end()
        else:
            out.append(sql[index])
            index += 1
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
