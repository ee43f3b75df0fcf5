"""JSON as JavaScript's ``JSON.stringify`` writes it, object keys sorted at every level (pure).

NOWPayments signs IPNs with ``JSON.stringify`` over the body with its keys sorted: raw UTF-8
text and JavaScript's number formatting (``0.00005``, ``1e-7``, ``10000000000000000``), which
Python's ``json.dumps`` writes differently (``5e-05``, ``1e-07``, ``1e+16``, non-ASCII
escaped). Its documentation's examples (Node, PHP, Python) sort the keys at every level,
nested objects such as ``fee`` too; this does the same. (The documentation's prose names
``JSON.stringify(params, Object.keys(params).sort())``, which would keep only top-level names
in nested objects and leave their values unsigned: not accepted, docs/reliability.md.) This
renders a document parsed by :func:`json.loads` the JavaScript way, so a signature made there
can be checked here.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

# Number::toString writes decimal exponents in [-6, 21) in fixed notation, others as d.ddde±N.
# In its terms the value is 0.DIGITS times 10**n, n being the decimal exponent plus one.
_FIXED_FROM = -6  # n > -6: 1e-6 is written 0.000001, 1e-7 is written 1e-7
_FIXED_UPTO = 21  # n <= 21: 1e20 is written with all its digits, 1e21 is written 1e+21
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads pairs the others up


def js_stringify_sorted(value: Any) -> str:
    """``value`` (from :func:`json.loads`) as compact JavaScript JSON, keys sorted recursively."""
    if isinstance(value, dict):
        keys = sorted(value, key=_utf16_order)
        items = (f"{_js_string(key)}:{js_stringify_sorted(value[key])}" for key in keys)
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(js_stringify_sorted(item) for item in value) + "]"
    if isinstance(value, str):
        return _js_string(value)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return js_number(value)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def js_number(value: int | float) -> str:
    """JavaScript's ``Number.prototype.toString`` of ``value`` as a double; ``null`` if infinite.

    JavaScript reads every JSON number as a double, so a large integer is rounded as there.
    """
    try:
        number = float(value)
    except OverflowError:
        return "null"
    if not math.isfinite(number):
        return "null"  # JSON.stringify writes Infinity and NaN as null
    if number == 0:
        return "0"  # also -0
    sign = "-" if number < 0 else ""
    digits, exponent = _shortest(abs(number))
    return sign + _layout(digits, len(digits) + exponent)


def _shortest(number: float) -> tuple[str, int]:
    """The shortest digits that read back as ``number`` (no trailing zero), and their exponent."""
    decimal = Decimal(repr(number))  # repr is the shortest round-trip form
    sign_digits = decimal.as_tuple()
    digits = "".join(str(d) for d in sign_digits.digits).rstrip("0") or "0"
    exponent = int(sign_digits.exponent) + len(sign_digits.digits) - len(digits)
    return digits, exponent


def _layout(digits: str, n: int) -> str:
    """Number::toString step 5-10: the value is 0.DIGITS times 10**n."""
    k = len(digits)
    if k <= n <= _FIXED_UPTO:
        return digits + "0" * (n - k)
    if 0 < n <= _FIXED_UPTO:
        return digits[:n] + "." + digits[n:]
    if _FIXED_FROM < n <= 0:
        return "0." + "0" * -n + digits
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    power = n - 1
    return f"{mantissa}e{'+' if power >= 0 else '-'}{abs(power)}"


def _js_string(text: str) -> str:
    # JSON.stringify escapes exactly what json.dumps escapes without ensure_ascii: the quote,
    # the backslash and controls below U+0020 (\b \f \n \r \t, else \u00xx in lower case);
    # a lone surrogate it writes as an escape (well-formed JSON.stringify).
    written = json.dumps(text, ensure_ascii=False)
    return _LONE_SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", written)


def _utf16_order(key: str) -> bytes:
    """Array.prototype.sort compares strings by UTF-16 code units, not code points."""
    return key.encode("utf-16-be", "surrogatepass")
