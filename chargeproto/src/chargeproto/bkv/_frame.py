"""BKV framing (bkv.md section 2): ``fc fe``/``fc ff`` header, length, command, seq,
direction byte, 7-byte gateway id, payload, 8-bit checksum, ``fc ee`` tail.

All integers are big-endian. ``length`` counts the bytes after itself up to and
including the tail; the checksum is the low byte of the sum from the length field
through the last payload byte.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Final

from .._base import Direction
from .._errors import (
    ChecksumError,
    DirectionError,
    EncodeError,
    HeaderError,
    LengthError,
    TailError,
    TruncatedError,
)
from .._texts import shared_text

HEADER_UP: Final = b"\xfc\xfe"
HEADER_DOWN: Final = b"\xfc\xff"
TAIL: Final = b"\xfc\xee"
#: bytes before the payload: header 2, length 2, command 2, seq 4, direction 1, gateway 7
PAYLOAD_OFFSET: Final = 18
#: the smallest ``length`` (empty payload): 14 header bytes after it + checksum + tail
MIN_LENGTH: Final = 17
#: the smallest frame
MIN_FRAME: Final = MIN_LENGTH + 4
#: default bound on a whole frame for stream decoders (bkv.md 12: 4 KiB, examples <= 149)
DEFAULT_MAX_FRAME: Final = 4096
#: the largest frame the 16-bit length field can describe
ABSOLUTE_MAX_FRAME: Final = 0xFFFF + 4
GATEWAY_ID_DIGITS: Final = 14

_HEAD = struct.Struct(">2sHHIB7s")
_DIRECTION_BYTE: Final = {Direction.UP: 0x01, Direction.DOWN: 0x00}


@dataclasses.dataclass(frozen=True, slots=True)
class FrameHeader:
    """The frame-level fields of a checked frame (rule 13 of the naming contract)."""

    length: int
    command: int
    seq: int
    direction: Direction
    gateway_id: str
    checksum: int


def checksum(data: bytes | bytearray | memoryview) -> int:
    """Low byte of the sum of ``data`` (from the length field to the last payload byte)."""
    return sum(data) & 0xFF


def header_direction(data: bytes | bytearray | memoryview) -> Direction:
    """The direction the two header bytes announce; ``HeaderError`` for anything else."""
    head = bytes(data[:2])
    if head == HEADER_UP:
        return Direction.UP
    if head == HEADER_DOWN:
        return Direction.DOWN
    raise HeaderError(
        "frame does not start with fc fe or fc ff", offset=0, expected=HEADER_UP, actual=head
    )


def check_frame(
    data: bytes | bytearray | memoryview, max_frame: int = ABSOLUTE_MAX_FRAME
) -> FrameHeader:
    """Validate one complete frame and return its header fields.

    Checks, in order: header, size, length field, tail, checksum, direction byte.
    Raises ``HeaderError``, ``TruncatedError``, ``LengthError``, ``TailError``,
    ``ChecksumError`` or ``DirectionError``.
    """
    size = len(data)
    if size < 2:
        raise TruncatedError("frame shorter than its header", offset=size, expected=2, actual=size)
    direction = header_direction(data)
    if size < MIN_FRAME:
        raise TruncatedError(
            f"frame of {size} bytes is shorter than the {MIN_FRAME}-byte minimum",
            offset=size,
            expected=MIN_FRAME,
            actual=size,
        )
    _, length, command, seq, dir_byte, gateway = _HEAD.unpack_from(data)
    if length < MIN_LENGTH or length + 4 > max_frame:
        raise LengthError(
            f"length field {length} outside {MIN_LENGTH}..{max_frame - 4}",
            offset=2,
            expected=max_frame - 4,
            actual=length,
        )
    if length + 4 != size:
        raise LengthError(
            f"length field says {length + 4} bytes, frame has {size}",
            offset=2,
            expected=length + 4,
            actual=size,
        )
    if bytes(data[size - 2 :]) != TAIL:
        raise TailError(
            "frame does not end with fc ee",
            offset=size - 2,
            expected=TAIL,
            actual=bytes(data[size - 2 :]),
        )
    want = checksum(data[2 : size - 3])
    got = data[size - 3]
    if want != got:
        raise ChecksumError(
            f"checksum 0x{got:02X}, expected 0x{want:02X}",
            offset=size - 3,
            expected=want,
            actual=got,
        )
    if dir_byte != _DIRECTION_BYTE[direction]:
        raise DirectionError(
            f"direction byte 0x{dir_byte:02X} contradicts the {direction} header",
            offset=10,
            expected=_DIRECTION_BYTE[direction],
            actual=dir_byte,
        )
    # shared: a gateway's id is kept by many tables of a long-running receiver, and
    # every frame would otherwise bring a copy of its own
    gateway_id = shared_text(gateway.hex().upper())
    return FrameHeader(length, command, seq, direction, gateway_id, got)


def gateway_id_bytes(gateway_id: str) -> bytes:
    """The 7 wire bytes of a canonical gateway id (14 hex digits); ``EncodeError`` if not one."""
    if not isinstance(gateway_id, str) or len(gateway_id) != GATEWAY_ID_DIGITS:
        raise EncodeError(
            f"gateway_id must be {GATEWAY_ID_DIGITS} hex digits, got {gateway_id!r}",
            field="gateway_id",
        )
    try:
        return bytes.fromhex(gateway_id)
    except ValueError:
        raise EncodeError(f"gateway_id is not hex: {gateway_id!r}", field="gateway_id") from None


def build_frame(
    direction: Direction | str, command: int, seq: int, gateway_id: str, payload: bytes
) -> bytes:
    """A complete frame around ``payload``, with length, checksum and tail filled in."""
    direction = Direction(direction)
    if not 0 <= command <= 0xFFFF:
        raise EncodeError(f"command {command} is not a u16", field="command")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= 0xFFFFFFFF:
        raise EncodeError(f"seq {seq!r} is not a u32", field="seq")
    length = len(payload) + MIN_LENGTH
    if length > 0xFFFF:
        raise EncodeError(f"payload of {len(payload)} bytes is too long", field="payload")
    head = HEADER_UP if direction is Direction.UP else HEADER_DOWN
    body = (
        _HEAD.pack(
            head, length, command, seq, _DIRECTION_BYTE[direction], gateway_id_bytes(gateway_id)
        )
        + payload
    )
    return body + bytes((checksum(body[2:]),)) + TAIL
