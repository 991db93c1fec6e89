"""Per-connection BKV stream decoder: bytes in any chunking -> events (bkv.md 12)."""

from __future__ import annotations

import re

from .._errors import DecodeError, GarbageError, LengthError, TailError
from .._events import Event, IccidReceived, KeepaliveReceived, MessageReceived, StreamError
from .._preamble import ICCID, ICCID_LENGTH, KEEPALIVE, is_iccid_prefix
from ._codec import decode_checked
from ._frame import DEFAULT_MAX_FRAME, MIN_FRAME, MIN_LENGTH, TAIL, check_frame

#: bytes that may start something: a header (fc), link, an ICCID
_CANDIDATE = re.compile(rb"[\xfcl8]")


class BkvStreamDecoder:
    """Split one connection's bytes into BKV frames (either direction).

    ``feed(data)`` takes bytes in any chunking and returns the events completed so
    far. Split and sticky frames are reassembled; garbage is skipped and reported; a
    length below 17 or above ``max_frame`` or a wrong tail drops one header and
    resynchronises; a bad checksum (or direction byte) with a correct tail drops the
    frame and reports it; the stream goes on in every case. An ICCID or ``link`` from
    the modem is tolerated and reported. Unparsed data never exceeds ``max_frame``.
    """

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < MIN_FRAME:
            raise ValueError(f"max_frame must admit at least an empty frame ({MIN_FRAME} bytes)")
        self.max_frame = max_frame
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete item."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Add received bytes; return the events they complete, in stream order."""
        events: list[Event] = []
        view = memoryview(data)
        step = self.max_frame
        for start in range(0, len(view), step):
            self._buf += view[start : start + step]
            self._drain(events)
        return events

    def _drain(self, events: list[Event]) -> None:
        buf = self._buf
        while buf:
            first = buf[0]
            if first == 0xFC:
                if not self._frame(buf, events):
                    return
            elif first == 0x6C:  # l
                if len(buf) < len(KEEPALIVE):
                    if KEEPALIVE.startswith(buf):
                        return
                    self._skip(buf, events)
                elif buf[:4] == KEEPALIVE:
                    del buf[:4]
                    events.append(KeepaliveReceived())
                else:
                    self._skip(buf, events)
            elif first == 0x38:  # 8
                if len(buf) < ICCID_LENGTH:
                    if is_iccid_prefix(buf):
                        return
                    self._skip(buf, events)
                elif ICCID.match(buf):
                    raw = bytes(buf[:ICCID_LENGTH])
                    del buf[:ICCID_LENGTH]
                    events.append(IccidReceived(raw.decode("ascii"), raw))
                else:
                    self._skip(buf, events)
            else:
                self._skip(buf, events)

    def _frame(self, buf: bytearray, events: list[Event]) -> bool:
        """Handle a buffer starting with ``fc``; False when more bytes are needed."""
        size = len(buf)
        if size < 2:
            return False
        if buf[1] not in (0xFE, 0xFF):
            self._skip(buf, events)
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

    def _skip(self, buf: bytearray, events: list[Event]) -> None:
        """Drop bytes up to the next candidate start and report them as garbage."""
        match = _CANDIDATE.search(buf, 1)
        cut = match.start() if match else len(buf)
        raw = bytes(buf[:cut])
        del buf[:cut]
        last = events[-1] if events else None
        if isinstance(last, StreamError) and isinstance(last.error, GarbageError):
            raw = last.raw + raw  # one event per run of garbage
            events.pop()
        events.append(
            StreamError(GarbageError(f"skipped {len(raw)} bytes of garbage", offset=0), raw)
        )
