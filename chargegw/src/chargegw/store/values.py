"""Device-provided text made storable.

chargeproto decodes text fields with ``surrogateescape``: a byte above 0x7F that is not
ASCII becomes a lone surrogate (``\\udc80``-``\\udcff``), so hostile text re-encodes to the
same bytes. PostgreSQL refuses such strings (and NUL characters) in ``text`` and ``jsonb``.
Here they become a readable escape instead: byte 0xB5 is stored as the four characters
``\\xb5``, NUL as ``\\x00``; everything else is kept as it is.
"""

from __future__ import annotations

import json
import re
from typing import Any

_UNSTORABLE = re.compile("[\x00\udc80-\udcff]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = 0 if char == "\x00" else ord(char) - 0xDC00
    return f"\\x{code:02x}"


def safe_text(text: str) -> str:
    """``text`` with lone surrogates and NUL written as ``\\xNN`` (PostgreSQL takes it)."""
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub(_escape, text)


def safe_value(value: Any) -> Any:
    """``value`` with every string inside it made storable (dicts, lists, tuples)."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe_text(str(k)): safe_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [safe_value(v) for v in value]
    return value


def safe_json(value: Any) -> str:
    """JSON text PostgreSQL's ``jsonb`` accepts, whatever the strings inside hold."""
    text = json.dumps(value, default=str)
    # json.dumps writes lone surrogates and NUL as \udcXX / \u0000 escapes: rare, so
    # the walk over the value happens only when the cheap test finds one
    if "\\udc" in text or "\\u0000" in text:
        text = json.dumps(safe_value(value), default=str)
    return text
