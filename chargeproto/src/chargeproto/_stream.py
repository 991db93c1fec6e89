"""A stream decoder that detects the protocol from a connection's first bytes."""

from __future__ import annotations

import re

from ._base import Direction
from ._errors import ProtocolDetectionError
from ._events import Event
from ._preamble import skip, take_or_skip
from .ap3000._frame import DEFAULT_MAX_FRAME as AP3000_MAX_FRAME
from .ap3000._frame import HEADER as AP3000_HEADER
from .ap3000._stream import Ap3000StreamDecoder
from .bkv import BkvStreamDecoder
from .bkv._frame import DEFAULT_MAX_FRAME as BKV_MAX_FRAME

#: bytes that may start something: DNY, fc fe / fc ff, link, an ICCID
_CANDIDATE = re.compile(rb"[D\xfcl8]")


def _undetected(raw: bytes) -> ProtocolDetectionError:
    return ProtocolDetectionError(
        f"{len(raw)} bytes match no supported protocol", offset=0, actual=raw[:8]
    )


class StreamDecoder:
    """One connection's bytes -> events, for a connection whose protocol is unknown.

    Until a frame header is seen, the decoder watches the first bytes: ``DNY`` means
    AP3000, ``fc fe``/``fc ff`` means BKV; an ICCID preamble or a ``link`` keepalive
    is reported (:class:`IccidReceived`, :class:`KeepaliveReceived`) and detection goes
    on; anything else is reported as a :class:`StreamError` carrying a
    ``ProtocolDetectionError`` and skipped. From the first header on, every byte goes
    to the protocol's own stream decoder (:class:`~chargeproto.ap3000.Ap3000StreamDecoder`
    or :class:`~chargeproto.bkv.BkvStreamDecoder`), with the same guarantees: any
    chunking, resynchronisation after garbage, bad checksums reported as events, a
    bounded buffer (``buffered``).

    ``direction`` says who sends on this stream; it matters for AP3000 only (BKV
    frames carry their direction).
    """

    # one decoder per connection: no instance dict
    __slots__ = ("_buf", "_delegate", "ap3000_max_frame", "bkv_max_frame", "direction")

    def __init__(
        self,
        direction: Direction | str = Direction.UP,
        *,
        ap3000_max_frame: int = AP3000_MAX_FRAME,
        bkv_max_frame: int = BKV_MAX_FRAME,
    ) -> None:
        self.direction = Direction(direction)
        self.ap3000_max_frame = ap3000_max_frame
        self.bkv_max_frame = bkv_max_frame
        #: bytes before the protocol is known (dropped then: the delegate buffers)
        self._buf: bytearray | None = bytearray()
        self._delegate: Ap3000StreamDecoder | BkvStreamDecoder | None = None

    @property
    def protocol(self) -> str | None:
        """``"ap3000"`` or ``"bkv"`` once detected, else None."""
        if isinstance(self._delegate, Ap3000StreamDecoder):
            return "ap3000"
        if isinstance(self._delegate, BkvStreamDecoder):
            return "bkv"
        return None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete item."""
        if self._delegate is not None:
            return self._delegate.buffered
        return len(self._buf) if self._buf is not None else 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Add received bytes; return the events they complete, in stream order."""
        if self._delegate is not None:
            return self._delegate.feed(data)
        events: list[Event] = []
        buf = self._buf
        assert buf is not None  # dropped only once a delegate exists
        buf += data
        self._detect(buf, events)
        if self._delegate is not None:
            self._buf = None  # a connection's life long, its delegate buffers
            if buf:
                events.extend(self._delegate.feed(bytes(buf)))
        return events

    def _detect(self, buf: bytearray, events: list[Event]) -> None:
        while buf and self._delegate is None:
            first = buf[0]
            if first == 0x44:  # D
                if len(buf) < len(AP3000_HEADER):
                    if AP3000_HEADER.startswith(buf):
                        return
                    skip(buf, events, _CANDIDATE, _undetected)
                elif buf[:3] == AP3000_HEADER:
                    self._delegate = Ap3000StreamDecoder(
                        self.direction, max_frame=self.ap3000_max_frame
                    )
                else:
                    skip(buf, events, _CANDIDATE, _undetected)
            elif first == 0xFC:
                if len(buf) < 2:
                    return
                if buf[1] in (0xFE, 0xFF):
                    self._delegate = BkvStreamDecoder(max_frame=self.bkv_max_frame)
                else:
                    skip(buf, events, _CANDIDATE, _undetected)
            elif not take_or_skip(buf, events, _CANDIDATE, _undetected):
                return
