"""Per-connection AP3000 stream decoder: bytes in any chunking -> events."""

from __future__ import annotations

import re

from .._base import Direction
from .._errors import ChecksumError, DecodeError, LengthError
from .._events import Event, MessageReceived, StreamError
from .._preamble import FramedStreamDecoder, skip
from ._codec import decode_checked
from ._frame import DEFAULT_MAX_FRAME, HEADER, MIN_LENGTH

#: bytes that may start something: DNY, link, an ICCID
_CANDIDATE = re.compile(rb"[Dl8]")
#: what certainly starts an item
_START = re.compile(rb"DNY|link|89[0-9A-Fa-f]{18}")


class Ap3000StreamDecoder(FramedStreamDecoder):
    """Split one connection's bytes into AP3000 frames, ICCIDs and keepalives.

    ``feed(data)`` takes bytes in any chunking and returns the events completed so
    far. Split and sticky frames are reassembled; garbage before a header is skipped
    and reported; a bad checksum or an impossible length is reported and the stream
    goes on. Unparsed data never exceeds ``max_frame`` bytes.

    ``direction`` is who sends on this stream: ``up`` (a device, the default for a
    server) or ``down`` (a server, for a simulator or a capture of the other side).
    """

    __slots__ = ("direction",)

    header_byte = 0x44  # D
    candidate = _CANDIDATE

    def __init__(
        self, direction: Direction | str = Direction.UP, *, max_frame: int = DEFAULT_MAX_FRAME
    ) -> None:
        super().__init__(max_frame, MIN_LENGTH + 5)
        self.direction = Direction(direction)

    def _frame(self, buf: bytearray, events: list[Event]) -> bool:
        """Handle a buffer starting with ``D``; False when more bytes are needed."""
        size = len(buf)
        if size < 3:
            if HEADER.startswith(buf):
                return False
            skip(buf, events, _CANDIDATE)
            return True
        if buf[:3] != HEADER:
            skip(buf, events, _CANDIDATE)
            return True
        if size < 5:
            return False
        length = buf[3] | buf[4] << 8
        total = length + 5
        if length < MIN_LENGTH or total > self.max_frame:
            # drop only the header: the length bytes may start the next item
            raw = bytes(buf[:3])
            del buf[:3]
            events.append(
                StreamError(
                    LengthError(
                        f"length field {length} outside {MIN_LENGTH}..{self.max_frame - 5}",
                        offset=3,
                        expected=self.max_frame - 5,
                        actual=length,
                    ),
                    raw,
                )
            )
            return True
        if size < total:
            return False
        want = sum(buf[: total - 2]) & 0xFFFF
        got = buf[total - 2] | buf[total - 1] << 8
        if want != got:
            # the length may itself be corrupt: do not swallow a candidate inside
            inner = _START.search(buf, 3, total)
            cut = inner.start() if inner else total
            raw = bytes(buf[:cut])
            del buf[:cut]
            events.append(
                StreamError(
                    ChecksumError(
                        f"checksum 0x{got:04X}, expected 0x{want:04X}",
                        offset=total - 2,
                        expected=want,
                        actual=got,
                    ),
                    raw,
                )
            )
            return True
        frame = bytes(buf[:total])
        del buf[:total]
        phy = frame[5] | frame[6] << 8 | frame[7] << 16 | frame[8] << 24
        try:
            message = decode_checked(
                frame, phy, frame[9] | frame[10] << 8, frame[11], self.direction
            )
        except DecodeError as exc:
            events.append(StreamError(exc, frame))
        else:
            events.append(MessageReceived("ap3000", message, frame))
        return True
