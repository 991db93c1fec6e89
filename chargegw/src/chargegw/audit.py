"""Masking of personal data in the audit log and in log lines.

ICCIDs and card numbers identify people. Frames are stored in hex with those bytes
replaced by ``**`` pairs, and log lines carry masked values only. The head and tail
of a value stay visible so an operator can still tell two values apart.
"""

from __future__ import annotations

from chargeproto import Message, ap3000, bkv

#: message fields that hold personal data
SENSITIVE_FIELDS = frozenset({"iccid", "card_id", "card2", "imei"})


def _keep(size: int) -> tuple[int, int]:
    if size < 4:
        return 0, 0
    return max(1, size // 4), max(1, size // 5)


def mask_text(value: str | None) -> str | None:
    """``89860448161870064815`` -> ``89860*********** 4815``-style masking (no spaces)."""
    if not value:
        return value
    head, tail = _keep(len(value))
    return value[:head] + "*" * (len(value) - head - tail) + value[len(value) - tail :]


def mask_bytes_hex(raw: bytes, spans: list[tuple[int, int]]) -> str:
    """Hex of ``raw`` with each (offset, size) span masked in the middle."""
    text = raw.hex()
    if not spans:
        return text
    chars = list(text)
    for offset, size in spans:
        head, tail = _keep(size)
        for index in range(offset + head, offset + size - tail):
            if 0 <= index < len(raw):
                chars[2 * index] = chars[2 * index + 1] = "*"
    return "".join(chars)


_SENSITIVE: dict[type, bool] = {}


def _sensitive(cls: type[Message]) -> bool:
    known = _SENSITIVE.get(cls)
    if known is None:
        known = _SENSITIVE[cls] = bool(
            SENSITIVE_FIELDS & set(getattr(cls, "__dataclass_fields__", {}))
        )
    return known


def mask_ap3000_frame(message: Message | None, raw: bytes) -> str:
    """Hex of an AP3000 frame with its ICCID, IMEI and card numbers masked."""
    if message is None or not _sensitive(type(message)):
        return raw.hex()
    codec = getattr(type(message), "codec", None)
    if codec is None:
        return raw.hex()
    spans = [
        (ap3000.PAYLOAD_OFFSET + offset, size)
        for name, offset, size in codec.spans(raw, ap3000.PAYLOAD_OFFSET, len(raw) - 2)
        if name in SENSITIVE_FIELDS
    ]
    return mask_bytes_hex(raw, spans)


#: BKV: header 2, length 2, command 2, seq 4, direction 1, gateway id 7
BKV_PAYLOAD_OFFSET = 18
#: 0x0005/0x0015: inner length 2 + sub-command 1 before the fields
BKV_INNER_HEADER = 3


def mask_bkv_frame(message: Message | None, raw: bytes) -> str:
    """Hex of a BKV frame with its ICCID and card numbers masked."""
    if not isinstance(message, bkv.FixedMessage) or not _sensitive(type(message)):
        return raw.hex()
    start = BKV_PAYLOAD_OFFSET
    if isinstance(message, bkv.InnerMessage):
        start += BKV_INNER_HEADER
    spans = [
        (start + offset, size)
        for name, offset, size in type(message).codec.spans(raw, start, len(raw) - 3)
        if name in SENSITIVE_FIELDS
    ]
    return mask_bytes_hex(raw, spans)


def mask_frame(message: Message | None, raw: bytes) -> str:
    """Hex of a frame of either protocol with personal data masked."""
    if message is not None and message.protocol == "bkv":
        return mask_bkv_frame(message, raw)
    return mask_ap3000_frame(message, raw)


def mask_iccid_hex(raw: bytes) -> str:
    """Hex of an unframed ICCID preamble, masked."""
    return mask_bytes_hex(raw, [(0, len(raw))])
