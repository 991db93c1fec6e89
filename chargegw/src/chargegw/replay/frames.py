"""A capture's frames as bytes a gateway accepts, decoded, and keyed for pairing.

The audit log masks personal data (ICCIDs, card numbers) as ``**`` pairs. Replay fills
the masked bytes with a deterministic stand-in, ASCII digits drawn from a hash of a
seed (the device a connection belongs to): a device always gets the same stand-in and
two devices different ones (two piles with one ICCID would look like a SIM that moved).
It then recomputes the frame's checksum with chargeproto so the gateway accepts the
frame. Recorded replies are filled the same way before they are decoded, and a new reply
is masked like the audit log masks it before it is compared: masked bytes are never
compared, whatever they held.

A reply is paired with a recorded one by its key: protocol, message class and the id
that ties it to the device's frame (AP3000 ``msg_id``, BKV frame ``seq``), which the
server echoes and never chooses.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import chargeproto
from chargegw.audit import mask_frame
from chargegw.capture import MASK
from chargeproto import ChargeProtoError, DecodeError, Message, ap3000, bkv

#: (protocol, message class name, msg id or seq)
ReplyKey = tuple[str, str, int]

_DIGIT = 0x30
_BKV_HEADERS = (bkv.HEADER_UP, bkv.HEADER_DOWN)
#: the shortest BKV frame (bkv.md 2): header 2, length 2, 14 header bytes, checksum, tail 2
_BKV_MIN_FRAME = 21


def stand_in(seed: str, count: int) -> bytes:
    """``count`` ASCII digits, always the same for the same ``seed``."""
    digits = bytearray()
    block = 0
    while len(digits) < count:
        digest = hashlib.sha256(f"{seed}/{block}".encode()).digest()
        digits.extend(_DIGIT + byte % 10 for byte in digest)
        block += 1
    return bytes(digits[:count])


def fill_masked(text: str, seed: str = "") -> bytes:
    """The bytes of a capture's hex, the masked bytes replaced by :func:`stand_in`
    digits (the i-th masked byte of the frame by the i-th digit)."""
    if MASK not in text:
        return bytes.fromhex(text)
    digits = stand_in(seed, text.count(MASK))
    out = bytearray()
    masked = 0
    for i in range(0, len(text), 2):
        pair = text[i : i + 2]
        if pair == MASK:
            out.append(digits[masked])
            masked += 1
        else:
            out.append(int(pair, 16))
    return bytes(out)


def fix_checksum(raw: bytes) -> bytes:
    """``raw`` with its checksum recomputed (AP3000 or BKV framing; anything else, such
    as an ICCID preamble, is returned unchanged)."""
    if raw[:3] == ap3000.HEADER and len(raw) >= ap3000.PAYLOAD_OFFSET + 2:
        total = ap3000.checksum(raw[:-2])
        return raw[:-2] + bytes((total & 0xFF, total >> 8))
    if raw[:2] in _BKV_HEADERS and len(raw) >= _BKV_MIN_FRAME:
        return raw[:-3] + bytes((bkv.checksum(raw[2:-3]),)) + raw[-2:]
    return raw


def usable_bytes(text: str, seed: str = "") -> bytes:
    """A recorded frame as bytes to feed or decode: masked bytes filled, and then (only
    then: a frame recorded with a bad checksum keeps it) the checksum fixed."""
    raw = fill_masked(text, seed)
    return fix_checksum(raw) if MASK in text else raw


def frame_protocol(raw: bytes) -> str | None:
    """``"ap3000"`` or ``"bkv"`` from a frame's header; None for anything else."""
    if raw[:3] == ap3000.HEADER:
        return "ap3000"
    if raw[:2] in _BKV_HEADERS:
        return "bkv"
    return None


def check(raw: bytes) -> None:
    """Raise ``DecodeError`` unless ``raw`` is one complete, well-framed frame of either
    protocol (header, length, checksum); an unframed preamble (ICCID, ``link``) passes."""
    protocol = frame_protocol(raw)
    if protocol == "ap3000":
        ap3000.check_frame(raw)
    elif protocol == "bkv":
        bkv.check_frame(raw)


def decode(raw: bytes, direction: str) -> Message:
    """The message of a frame (``direction`` ``"up"`` or ``"down"``, for AP3000);
    ``DecodeError`` for anything that is not a valid frame."""
    protocol = frame_protocol(raw)
    if protocol == "ap3000":
        return ap3000.decode(raw, direction)
    if protocol == "bkv":
        return bkv.decode(raw)
    raise DecodeError("not an AP3000 or BKV frame", offset=0, expected=b"DNY", actual=raw[:3])


def _link_id(message: Message) -> int:
    return int(getattr(message, "msg_id", None) or getattr(message, "seq", 0) or 0)


def reply_key(message: Message) -> ReplyKey:
    """The key that pairs a server's reply with a recorded one."""
    return (message.protocol, type(message).__name__, _link_id(message))


def is_server_reply(message: Message) -> bool:
    """Whether the server sends ``message`` only as an answer to a device's frame
    (chargeproto's reply tables); anything else the server sends is a command."""
    if message.protocol == "bkv":
        return bkv.is_server_reply(message)
    return ap3000.is_server_reply(message)


def expected_reply_key(message: Message) -> ReplyKey | None:
    """The key of the reply the protocol expects for a device's ``message``, if any."""
    replies = bkv.reply_for if message.protocol == "bkv" else ap3000.reply_for
    cls = replies(message)
    if cls is None:
        return None
    return (message.protocol, cls.__name__, _link_id(message))


def describe_key(key: ReplyKey) -> str:
    """``ap3000 TimeReply msg 2`` / ``bkv HeartbeatReply seq 0``."""
    protocol, name, link = key
    return f"{protocol} {name} {'seq' if protocol == 'bkv' else 'msg'} {link}"


def masked_hex(raw: bytes, message: Message | None) -> str:
    """``raw`` as the audit log would store it (personal data masked)."""
    return mask_frame(message, raw)


def flat_fields(message: Message) -> dict[str, Any]:
    """The message's chargeproto record as ``path -> value`` leaves (``msg_id``,
    ``fields.result``, ``fields.ports[0].status`` ...), for a field-level comparison."""
    record = chargeproto.to_record(message)
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(f"{prefix}[{index}]", item)
        else:
            out[prefix] = value

    for key, value in record.items():
        if key not in ("protocol", "direction"):
            walk(key, value)
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class Decoded:
    """A frame's usable bytes and what chargeproto made of them."""

    raw: bytes
    message: Message | None
    error: str | None

    @classmethod
    def of(cls, raw: bytes, direction: str) -> Decoded:
        """Decode ``raw``; a failure is kept as ``error``, never raised."""
        try:
            return cls(raw, decode(raw, direction), None)
        except ChargeProtoError as exc:
            return cls(raw, None, str(exc))
