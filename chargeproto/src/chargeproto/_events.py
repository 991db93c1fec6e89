"""Events produced by the stream decoders, shared by both protocols."""

from __future__ import annotations

import dataclasses

from ._base import Message
from ._errors import DecodeError


@dataclasses.dataclass(frozen=True, slots=True)
class MessageReceived:
    """A complete, valid frame and its decoded message."""

    protocol: str
    message: Message
    raw: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class IccidReceived:
    """The SIM's ICCID, sent unframed by the modem after each (re)connect."""

    iccid: str
    raw: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class KeepaliveReceived:
    """The modem's unframed ``link`` keepalive (AP3000 modems, after 30 s idle)."""

    raw: bytes = b"link"


@dataclasses.dataclass(frozen=True, slots=True)
class StreamError:
    """Bytes that did not make a valid frame: skipped garbage, a bad checksum, a bad
    length, or a payload that does not fit its command. ``raw`` is what was dropped;
    the stream continues after it."""

    error: DecodeError
    raw: bytes


Event = MessageReceived | IccidReceived | KeepaliveReceived | StreamError
