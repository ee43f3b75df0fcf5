"""Making text from outside storable: the one boundary cleaner (pure).

Everything that enters SQL from outside nproxyd — SMTP replies, provider answers and error
bodies, exception texts — passes through :func:`storable` first. PostgreSQL ``text`` refuses a
NUL and anything that is not valid UTF-8, and one such value in a set-based statement fails the
whole batch; so the cleaning happens once, here, before a value can reach a statement.
"""

from __future__ import annotations

from collections.abc import Callable

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


def has_unprintable(value: str) -> bool:
    """True when ``value`` holds a character that is not printable: the one definition.

    Not printable (``str.isprintable``): C0 and C1 controls (ESC, BEL, CSI U+009B …), tab and
    line breaks, format characters (bidi overrides), separators other than the space, and
    unassigned or private-use code points. Creation answers holding one are refused
    (``nproxyd.core.answers``); text shown on a terminal has them escaped (:func:`printable`).
    """
    return not value.isprintable()


def printable(value: str) -> str:
    """``value`` safe to print on a terminal: every unprintable character escaped.

    Escapes are Python's: ``\\x1b`` up to U+00FF, ``\\u202e`` up to U+FFFF, ``\\U000e0001``
    beyond. The stored data is unchanged; only what is printed is.
    """
    return _escape_unprintable(value, _escaped)


def json_printable(encoded: str) -> str:
    """A JSON text with every unprintable character as a ``\\uXXXX`` escape: the same JSON value.

    JSON's own structure is printable ASCII, so such characters occur only inside strings,
    where the escape (a surrogate pair beyond U+FFFF) denotes the same character.
    """
    return _escape_unprintable(encoded, _json_escaped)


def _escape_unprintable(value: str, escape: Callable[[str], str]) -> str:
    if not has_unprintable(value):
        return value
    return "".join(char if char.isprintable() else escape(char) for char in value)


def _escaped(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _json_escaped(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


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
