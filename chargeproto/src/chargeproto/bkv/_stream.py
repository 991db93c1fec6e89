"""Per-connection BKV stream decoder: bytes in any chunking -> events (bkv.md 12)."""

from __future__ import annotations

import re

from .._errors import DecodeError, LengthError, TailError
from .._events import Event, MessageReceived, StreamError
from .._preamble import FramedStreamDecoder, skip
from ._codec import decode_checked
from ._frame import DEFAULT_MAX_FRAME, MIN_FRAME, MIN_LENGTH, TAIL, check_frame

#: bytes that may start something: a header (fc), link, an ICCID
_CANDIDATE = re.compile(rb"[\xfcl8]")


class BkvStreamDecoder(FramedStreamDecoder):
    """Split one connection's bytes into BKV frames (either direction).

    ``feed(data)`` takes bytes in any chunking and returns the events completed so
    far. Split and sticky frames are reassembled; garbage is skipped and reported; a
    length below 17 or above ``max_frame`` or a wrong tail drops one header and
    resynchronises; a bad checksum (or direction byte) with a correct tail drops the
    frame and reports it; the stream goes on in every case. An ICCID or ``link`` from
    the modem is tolerated and reported. Unparsed data never exceeds ``max_frame``.
    """

    __slots__ = ()

    header_byte = 0xFC
    candidate = _CANDIDATE

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        super().__init__(max_frame, MIN_FRAME)

    def _frame(self, buf: bytearray, events: list[Event]) -> bool:
        """Handle a buffer starting with ``fc``; False when more bytes are needed."""
        size = len(buf)
        if size < 2:
            return False
        if buf[1] not in (0xFE, 0xFF):
            skip(buf, events, _CANDIDATE)
            return True
        if size < 4:
            return False
        length = buf[2] << 8 | buf[3]
        total = length + 4
        if length < MIN_LENGTH or total > self.max_frame:
            raw = bytes(buf[:2])
            del buf[:2]
            events.append(
                StreamError(
                    LengthError(
                        f"length field {length} outside {MIN_LENGTH}..{self.max_frame - 4}",
                        offset=2,
                        expected=self.max_frame - 4,
                        actual=length,
                    ),
                    raw,
                )
            )
            return True
        if size < total:
            return False
        if buf[total - 2 : total] != TAIL:
            # the length was wrong: drop the header, look for the next candidate
            match = _CANDIDATE.search(buf, 1)
            cut = match.start() if match else len(buf)
            raw = bytes(buf[:cut])
            del buf[:cut]
            events.append(
                StreamError(
                    TailError(
                        f"no fc ee tail where the length field ({length}) puts it",
                        offset=total - 2,
                        expected=TAIL,
                        actual=raw[total - 2 : total] if len(raw) >= total else None,
                    ),
                    raw,
                )
            )
            return True
        frame = bytes(buf[:total])
        del buf[:total]
        try:
            header = check_frame(frame)
            message = decode_checked(frame, header)
        except DecodeError as exc:
            events.append(StreamError(exc, frame))
        else:
            events.append(MessageReceived("bkv", message, frame))
        return True
