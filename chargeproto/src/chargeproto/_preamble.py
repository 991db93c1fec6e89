"""What modems send outside frames: the ICCID after a (re)connect and ``link``."""

from __future__ import annotations

import re
from typing import Final

KEEPALIVE: Final = b"link"
ICCID_LENGTH: Final = 20
ICCID: Final = re.compile(rb"89[0-9A-Fa-f]{18}")
_ICCID_PREFIX: Final = re.compile(rb"8(9[0-9A-Fa-f]{0,18})?\Z")


def is_iccid_prefix(data: bytes | bytearray) -> bool:
    """Whether ``data`` (shorter than 20 bytes) may still grow into an ICCID."""
    return _ICCID_PREFIX.match(data) is not None
