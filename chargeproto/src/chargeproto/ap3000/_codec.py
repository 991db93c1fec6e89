"""Decode and encode whole AP3000 frames."""

from __future__ import annotations

from .._base import Direction
from .._errors import DecodeError, EncodeError, PayloadError
from .._hex import parse_hex
from .._texts import shared_text
from .._units import PHY_ID
from ._frame import ABSOLUTE_MAX_FRAME, PAYLOAD_OFFSET, build_frame, check_frame
from ._messages import REGISTRY, Ap3000Message, UnknownMessage

_UP: dict[int, type[Ap3000Message]] = {c: m for (c, d), m in REGISTRY.items() if d is Direction.UP}
_DOWN: dict[int, type[Ap3000Message]] = {
    c: m for (c, d), m in REGISTRY.items() if d is Direction.DOWN
}
_TABLES: dict[object, dict[int, type[Ap3000Message]]] = {
    Direction.UP: _UP,
    "up": _UP,
    Direction.DOWN: _DOWN,
    "down": _DOWN,
}


def decode(
    data: bytes | bytearray | memoryview | str,
    direction: Direction | str = Direction.UP,
    *,
    max_frame: int = ABSOLUTE_MAX_FRAME,
) -> Ap3000Message:
    """Decode one complete AP3000 frame into its typed message.

    ``data`` is the frame, or hex text (spaces, ``:``, ``-`` and ``_`` between digits
    are ignored; ``HexSyntaxError`` when it is not hex), as for ``bkv.decode``.
    AP3000 frames do not carry their direction: say who sent them (``"up"`` = the
    device, the default; ``"down"`` = the server). A command this library has no
    layout for decodes as :class:`UnknownMessage`. Raises only ``DecodeError``.
    """
    if isinstance(data, str):
        data = parse_hex(data)
    phy, msg_id, command = check_frame(data, max_frame)
    return decode_checked(data, phy, msg_id, command, direction)


def decode_checked(
    data: bytes | bytearray | memoryview,
    phy: int,
    msg_id: int,
    command: int,
    direction: Direction | str,
) -> Ap3000Message:
    """Decode the payload of a frame whose header and checksum are already verified."""
    table = _TABLES.get(direction)
    if table is None:
        raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")
    end = len(data) - 2
    # shared: a pile's id is kept by many tables of a long-running receiver, and every
    # frame would otherwise bring a copy of its own
    phy_id = shared_text("%08X" % phy)
    cls = table.get(command)
    if cls is None:
        return UnknownMessage(
            phy_id,
            msg_id,
            command,
            bytes(data[PAYLOAD_OFFSET:end]).hex().upper(),
            Direction(direction),
        )
    try:
        message: Ap3000Message = cls.codec.decode(data, PAYLOAD_OFFSET, end, phy_id, msg_id)
    except DecodeError as exc:
        if exc.offset is not None:
            exc.offset += PAYLOAD_OFFSET
        raise
    except Exception as exc:  # a generated decoder must never leak anything else
        raise PayloadError(f"{cls.__name__}: {exc}", offset=PAYLOAD_OFFSET) from exc
    return message


def encode(message: Ap3000Message) -> bytes:
    """Encode a message into a complete frame (length and checksum included).

    Raises ``EncodeError`` naming the field when a value does not fit the wire.
    """
    phy = PHY_ID.encode(message.phy_id, "phy_id")
    if isinstance(message, UnknownMessage):
        try:
            payload = bytes.fromhex(message.payload_hex)
        except ValueError:
            raise EncodeError("payload_hex is not hex", field="payload_hex") from None
        return build_frame(phy, message.msg_id, message.unknown_command, payload)
    codec = getattr(type(message), "codec", None)
    if codec is None:
        raise EncodeError(f"{type(message).__name__} is not a registered AP3000 message")
    return build_frame(phy, message.msg_id, message.command, codec.encode(message))


def message_class(command: int, direction: Direction | str) -> type[Ap3000Message] | None:
    """The message class registered for ``command`` in ``direction``, if any."""
    return _TABLES[direction].get(command)
