"""AP3000 order numbers (16 bytes, 8.6.1) and verification codes (8.6.2)."""

from __future__ import annotations

import dataclasses
import re
import struct
import zlib
from typing import Any, Literal

from .._errors import EncodeError, HexSyntaxError
from ._phy_id import PhysicalId

OrderFormat = Literal["online", "card", "code", "unparsed"]

_HEX32 = re.compile(r"^[0-9A-Fa-f]{32}$")
_CODE_STRUCT = struct.Struct("<IIB")
#: a verification code is accepted this many seconds either side of its minute
CODE_WINDOW_S = 120


@dataclasses.dataclass(frozen=True, slots=True)
class OrderNumber:
    """An order number split into its named parts.

    ``format`` is ``"online"`` (opaque bytes from the server), ``"card"`` (offline card
    start), ``"code"`` (verification-code start), or ``"unparsed"`` when the start mode
    says offline but a byte is not valid BCD (the raw bytes are always in ``order_id``).
    """

    order_id: str
    format: OrderFormat
    time: str | None = None
    card_id: str | None = None
    verification_code: str | None = None
    device_number: int | None = None
    port: int | None = None

    def to_fields(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _bcd(data: bytes) -> str | None:
    digits = data.hex()
    return digits if digits.isdigit() else None


def parse_order_id(order_id: str, start_mode: int) -> OrderNumber:
    """Split the 32-hex-digit ``order_id`` according to ``start_mode`` (11.4).

    Start mode 1 (server) is opaque; 0 (card) and 3 (code) are BCD date-time, card
    UID or code, device number and port + 30 / + 70 (13.5).
    """
    if not _HEX32.match(order_id):
        raise HexSyntaxError(f"order_id must be 32 hex digits, got {order_id!r}")
    raw = bytes.fromhex(order_id)
    canonical = raw.hex().upper()
    if start_mode not in (0, 3):
        return OrderNumber(canonical, "online")
    stamp = _bcd(raw[:7])
    if stamp is None:
        return OrderNumber(canonical, "unparsed")
    time = f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[8:10]}:{stamp[10:12]}:{stamp[12:14]}"
    device = _bcd(raw[11:15])
    port = _bcd(raw[15:16])
    if device is None or port is None:
        return OrderNumber(canonical, "unparsed")
    if start_mode == 0:
        if int(port) < 30:
            return OrderNumber(canonical, "unparsed")
        return OrderNumber(
            canonical,
            "card",
            time,
            card_id=raw[7:11].hex().upper(),
            device_number=int(device),
            port=int(port) - 30,
        )
    code = _bcd(raw[8:11])
    if raw[7] != 0 or code is None or int(port) < 70:
        return OrderNumber(canonical, "unparsed")
    return OrderNumber(
        canonical,
        "code",
        time,
        verification_code=code,
        device_number=int(device),
        port=int(port) - 70,
    )


def _to_bcd(number: int, digits: int, field: str) -> bytes:
    if not 0 <= number < 10**digits:
        raise EncodeError(f"{field}: {number} does not fit {digits} decimal digits", field=field)
    return bytes.fromhex(f"{number:0{digits}d}")


def _time_bcd(time: str) -> bytes:
    match = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})", time)
    if match is None:
        raise EncodeError(f"time must be YYYY-MM-DDTHH:MM:SS, got {time!r}", field="time")
    return bytes.fromhex("".join(match.groups()))


def card_order_id(time: str, card_id: str, device_number: int, port: int) -> str:
    """The order number a pile makes for an offline card start."""
    try:
        card = bytes.fromhex(card_id)
    except ValueError:
        raise EncodeError(f"card_id is not hex: {card_id!r}", field="card_id") from None
    if len(card) != 4:
        raise EncodeError("card_id must be 4 bytes", field="card_id")
    raw = _time_bcd(time) + card + _to_bcd(device_number, 8, "device_number")
    return (raw + _to_bcd(port + 30, 2, "port")).hex().upper()


def code_order_id(time: str, verification_code: str, device_number: int, port: int) -> str:
    """The order number a pile makes for a verification-code start."""
    if not re.fullmatch(r"\d{6}", verification_code):
        raise EncodeError("verification_code must be 6 digits", field="verification_code")
    raw = _time_bcd(time) + b"\0" + bytes.fromhex(verification_code)
    raw += _to_bcd(device_number, 8, "device_number") + _to_bcd(port + 70, 2, "port")
    return raw.hex().upper()


def verification_code(phy_id: str | int, timestamp_unix: int, port: int) -> str:
    """The 6-digit code for ``phy_id``, the minute of ``timestamp_unix`` and ``port``.

    CRC-32 (IEEE, zlib) of the packed little-endian struct {u32 phy_id; u32 t; u8 port}
    with t rounded down to the minute, modulo 1,000,000 (8.6.2, 13.6).
    """
    phy = PhysicalId.parse(phy_id).value if isinstance(phy_id, str) else phy_id
    if not 0 <= port <= 0xFF:
        raise EncodeError(f"port {port} is not a byte", field="port")
    if not 0 <= timestamp_unix <= 0xFFFFFFFF:
        raise EncodeError("timestamp_unix is not a u32", field="timestamp_unix")
    minute = timestamp_unix - timestamp_unix % 60
    return "%06d" % (zlib.crc32(_CODE_STRUCT.pack(phy, minute, port)) % 1_000_000)


def check_verification_code(
    code: str, phy_id: str | int, now_unix: int, port: int, window_s: int = CODE_WINDOW_S
) -> bool:
    """Whether ``code`` is valid for ``phy_id`` and ``port`` within ``window_s`` of now."""
    start = now_unix - window_s
    return any(
        verification_code(phy_id, minute, port) == code
        for minute in range(start - start % 60, now_unix + window_s + 1, 60)
    )
