"""Hex text -> bytes, for helpers, tests and the CLI."""

from __future__ import annotations

import re

from ._errors import HexSyntaxError

_SEPARATORS = re.compile(r"[\s:_-]+")
_NOT_HEX = re.compile(r"[^0-9A-Fa-f]")


def parse_hex(text: str) -> bytes:
    """Bytes from hex text; spaces, ``:``, ``-`` and ``_`` between digits are ignored.

    Raises ``HexSyntaxError`` (a ``DecodeError``) naming the offset of the first
    non-hex character, or when the digit count is odd.
    """
    digits = _SEPARATORS.sub("", text)
    bad = _NOT_HEX.search(digits)
    if bad is not None:
        raise HexSyntaxError(
            f"non-hex character {bad.group()!r} at digit {bad.start()}",
            offset=bad.start() // 2,
            actual=bad.group(),
        )
    if len(digits) % 2:
        raise HexSyntaxError(f"odd number of hex digits ({len(digits)})", offset=len(digits) // 2)
    return bytes.fromhex(digits)
