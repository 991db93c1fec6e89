"""AP3000 ``DNY`` framing: header, length, physical id, message id, command, checksum."""

from __future__ import annotations

import struct
from typing import Final

from .._errors import ChecksumError, EncodeError, HeaderError, LengthError, TruncatedError

HEADER: Final = b"DNY"
#: bytes before the payload: header 3, length 2, phy id 4, msg id 2, command 1
PAYLOAD_OFFSET: Final = 12
#: the smallest ``length`` (empty payload)
MIN_LENGTH: Final = 9
#: default bound on a whole frame (ap3000.md 13.2); 0xF8/0xF9 need 274 bytes
DEFAULT_MAX_FRAME: Final = 512
#: the largest frame the 16-bit length field can describe
ABSOLUTE_MAX_FRAME: Final = 0xFFFF + 5

_HEAD = struct.Struct("<3sHIHB")
_U16 = struct.Struct("<H")


def checksum(data: bytes | bytearray | memoryview) -> int:
    """Low 16 bits of the sum of ``data`` (every byte before the checksum field)."""
    return sum(data) & 0xFFFF


def check_frame(
    data: bytes | bytearray | memoryview, max_frame: int = ABSOLUTE_MAX_FRAME
) -> tuple[int, int, int]:
    """Validate one complete frame; return ``(phy_id, msg_id, command)``.

    Raises ``HeaderError``, ``TruncatedError``, ``LengthError`` or ``ChecksumError``.
    """
    size = len(data)
    if size < 5 or data[:3] != HEADER:
        if size >= 3 and data[:3] != HEADER:
            raise HeaderError(
                "frame does not start with DNY", offset=0, expected=HEADER, actual=bytes(data[:3])
            )
        raise TruncatedError("frame shorter than its header", offset=size, expected=14, actual=size)
    _, length, phy_id, msg_id, command = _HEAD.unpack_from(data) if size >= 12 else (0, 0, 0, 0, 0)
    if size < 12:
        length = _U16.unpack_from(data, 3)[0]
    if length < MIN_LENGTH or length + 5 > max_frame:
        raise LengthError(
            f"length field {length} outside {MIN_LENGTH}..{max_frame - 5}",
            offset=3,
            expected=max_frame - 5,
            actual=length,
        )
    if length + 5 != size:
        raise LengthError(
            f"length field says {length + 5} bytes, frame has {size}",
            offset=3,
            expected=length + 5,
            actual=size,
        )
    want = sum(data[: size - 2]) & 0xFFFF
    got = data[size - 2] | data[size - 1] << 8
    if want != got:
        raise ChecksumError(
            f"checksum 0x{got:04X}, expected 0x{want:04X}",
            offset=size - 2,
            expected=want,
            actual=got,
        )
    return phy_id, msg_id, command


def build_frame(phy_id: int, msg_id: int, command: int, payload: bytes) -> bytes:
    """A complete frame around ``payload``, with length and checksum filled in."""
    if not 0 <= phy_id <= 0xFFFFFFFF:
        raise EncodeError(f"phy_id {phy_id:#x} is not a u32", field="phy_id")
    if not 0 <= msg_id <= 0xFFFF:
        raise EncodeError(f"msg_id {msg_id} is not a u16", field="msg_id")
    if not 0 <= command <= 0xFF:
        raise EncodeError(f"command {command} is not a byte", field="command")
    length = len(payload) + MIN_LENGTH
    if length > 0xFFFF:
        raise EncodeError(f"payload of {len(payload)} bytes is too long", field="payload")
    body = _HEAD.pack(HEADER, length, phy_id, msg_id, command) + payload
    return body + _U16.pack(sum(body) & 0xFFFF)
