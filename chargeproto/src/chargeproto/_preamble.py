"""What modems send outside frames: the ICCID after a (re)connect and ``link``.

Shared by the stream decoders (AP3000, BKV and the protocol-detecting one): reading
a preamble item and skipping garbage up to the next candidate start. The decoders
call these only off the per-frame path (a buffer that starts with a header never
comes here).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable
from typing import Final

from ._errors import DecodeError, GarbageError
from ._events import Event, IccidReceived, KeepaliveReceived, StreamError

KEEPALIVE: Final = b"link"
ICCID_LENGTH: Final = 20
ICCID: Final = re.compile(rb"89[0-9A-Fa-f]{18}")
_ICCID_PREFIX: Final = re.compile(rb"8(9[0-9A-Fa-f]{0,18})?\Z")


def is_iccid_prefix(data: bytes | bytearray) -> bool:
    """Whether ``data`` (shorter than 20 bytes) may still grow into an ICCID."""
    return _ICCID_PREFIX.match(data) is not None


def take_preamble(buf: bytearray, events: list[Event]) -> bool | None:
    """Read a ``link`` keepalive or an ICCID from a buffer starting with ``l`` or ``8``.

    True: the item was removed from ``buf`` and its event appended. False: ``buf`` is
    a prefix of the item, more bytes are needed. None: not a preamble (the caller
    skips it as garbage).
    """
    if buf[0] == 0x6C:  # l
        if len(buf) < 4:
            return False if KEEPALIVE.startswith(buf) else None
        if buf[:4] != KEEPALIVE:
            return None
        del buf[:4]
        events.append(KeepaliveReceived())
        return True
    if len(buf) < ICCID_LENGTH:
        return False if is_iccid_prefix(buf) else None
    if not ICCID.match(buf):
        return None
    raw = bytes(buf[:ICCID_LENGTH])
    del buf[:ICCID_LENGTH]
    events.append(IccidReceived(raw.decode("ascii"), raw))
    return True


def garbage_error(raw: bytes) -> GarbageError:
    """The error reported for skipped bytes inside a stream of a known protocol."""
    return GarbageError(f"skipped {len(raw)} bytes of garbage", offset=0)


def skip(
    buf: bytearray,
    events: list[Event],
    candidate: re.Pattern[bytes],
    make_error: Callable[[bytes], DecodeError] = garbage_error,
) -> None:
    """Drop bytes up to the next ``candidate`` start (after the first byte) and report
    them as ``StreamError(make_error(raw), raw)``: one event per run of garbage, so a
    run that continues the last event (same error class) is merged into it."""
    match = candidate.search(buf, 1)
    cut = match.start() if match else len(buf)
    raw = bytes(buf[:cut])
    del buf[:cut]
    error = make_error(raw)
    last = events[-1] if events else None
    if isinstance(last, StreamError) and isinstance(last.error, type(error)):
        raw = last.raw + raw
        error = make_error(raw)
        events.pop()
    events.append(StreamError(error, raw))


def take_or_skip(
    buf: bytearray,
    events: list[Event],
    candidate: re.Pattern[bytes],
    make_error: Callable[[bytes], DecodeError] = garbage_error,
) -> bool:
    """Handle a non-empty buffer that does not start with a frame header: read the
    keepalive or ICCID it starts with, else :func:`skip` up to the next ``candidate``.
    False when more bytes are needed (``buf`` is a prefix of a preamble item)."""
    if buf[0] in b"l8":  # link, an ICCID
        taken = take_preamble(buf, events)
        if taken is not None:
            return taken
    skip(buf, events, candidate, make_error)
    return True


class FramedStreamDecoder(abc.ABC):
    """The part of a protocol's stream decoder that does not know its frames.

    Received bytes are taken in slices of at most ``max_frame`` so unparsed data stays
    bounded; a buffer starting with ``header_byte`` goes to the subclass's ``_frame``,
    anything else is a preamble (ICCID, ``link``) or garbage up to a ``candidate``.
    """

    # one decoder per connection: no instance dict
    __slots__ = ("_buf", "max_frame")

    header_byte: int
    candidate: re.Pattern[bytes]

    def __init__(self, max_frame: int, min_frame: int) -> None:
        if max_frame < min_frame:
            raise ValueError(f"max_frame must admit at least an empty frame ({min_frame} bytes)")
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
        header = self.header_byte
        while buf:
            if buf[0] == header:
                if not self._frame(buf, events):
                    return
            elif not take_or_skip(buf, events, self.candidate):
                return

    @abc.abstractmethod
    def _frame(self, buf: bytearray, events: list[Event]) -> bool:
        """Handle a buffer starting with the header byte; False when more bytes are needed."""
