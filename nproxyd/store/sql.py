"""Named SQL blocks, procrastinate style.

A ``.sql`` file holds blocks like::

    -- expire_pending_invoices --
    -- Expire one keyset batch of due invoices; $1 now, $2 batch size, ...
    UPDATE ...;

They are parsed once at import into a dict of name -> statement.
"""

from __future__ import annotations

import re
from importlib import resources

_HEADER = re.compile(r"^-- ([a-z0-9_]+) --$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a ``.sql`` file into its named statements; the description line is dropped."""
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip().splitlines()
        if lines and lines[0].startswith("--"):
            lines = lines[1:]
        if name in queries:
            raise ValueError(f"duplicate query name {name}")
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


def load_queries() -> dict[str, str]:
    """Every named statement of every file in ``nproxyd/store/sql``."""
    queries: dict[str, str] = {}
    for entry in sorted(
        resources.files("nproxyd.store").joinpath("sql").iterdir(), key=lambda item: item.name
    ):
        if entry.name.endswith(".sql"):
            for name, statement in parse(entry.read_text(encoding="utf-8")).items():
                if name in queries:
                    raise ValueError(f"duplicate query name {name}")
                queries[name] = statement
    return queries


QUERIES = load_queries()
