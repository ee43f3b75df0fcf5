"""Making text from outside storable: the one boundary cleaner (pure).

Everything that enters SQL from outside nproxyd — SMTP replies, provider answers and error
bodies, exception texts — passes through :func:`storable` first. PostgreSQL ``text`` refuses a
NUL and anything that is not valid UTF-8, and one such value in a set-based statement fails the
whole batch; so the cleaning happens once, here, before a value can reach a statement.
"""

from __future__ import annotations

DEFAULT_LIMIT = 1000
REPLACEMENT = "\ufffd"  # what an undecodable byte, a NUL or a lone surrogate becomes
TRUNCATED = "…[truncated]"
_BAD_MARK = " [invalid text replaced]"


def storable(value: str | bytes | bytearray | None, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as text PostgreSQL will store: valid UTF-8, no NUL, at most ``limit`` characters.

    Undecodable bytes, NULs and lone surrogates become U+FFFD and the text is marked
    ``[invalid text replaced]``, so a reader knows the original differed; a longer text is cut
    and marked ``…[truncated]``. ``None`` becomes the empty string.
    """
    if value is None:
        return ""
    text, replaced = _decoded(value)
    if "\x00" in text:
        text, replaced = text.replace("\x00", REPLACEMENT), True
    if replaced:
        text += _BAD_MARK
    if len(text) > limit:
        keep = max(limit - len(TRUNCATED), 0)
        text = text[:keep] + TRUNCATED[: limit - keep]
    return text


def is_storable(value: str) -> bool:
    """True when ``value`` would be stored as it is (no NUL, no lone surrogate)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decoded(value: str | bytes | bytearray) -> tuple[str, bool]:
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
        try:
            return raw.decode("utf-8"), False
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace"), True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates, e.g. from surrogateescape-decoded bytes.
        raw = value.encode("utf-8", errors="surrogatepass")
        return raw.decode("utf-8", errors="replace"), True
    return value, False
