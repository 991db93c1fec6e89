"""Decode and encode whole BKV frames."""

from __future__ import annotations

import re

from .._base import Direction
from .._errors import CommandMismatchError, DecodeError, EncodeError, InnerLengthError, PayloadError
from .._hex import parse_hex
from ._frame import ABSOLUTE_MAX_FRAME, PAYLOAD_OFFSET, FrameHeader, check_frame
from ._messages import (
    CONTROL,
    NODE_LIST,
    REGISTRY,
    TLV,
    BkvMessage,
    FixedMessage,
    UnknownMessage,
    UnknownSubCommand,
)
from ._tlv import decode_tlv

#: a required command: the outer command, (command, sub-command or BKV command id),
#: or the vectors' text form ``"0x0015/0x07"``
ExpectedCommand = int | tuple[int, int] | str

_INNER_HEADER = 3
_COMMAND_TEXT = re.compile(r"(0x[0-9A-Fa-f]{1,4})(?:/(0x[0-9A-Fa-f]{1,4}))?")


def decode(
    data: bytes | bytearray | memoryview | str,
    *,
    expect_command: ExpectedCommand | None = None,
    max_frame: int = ABSOLUTE_MAX_FRAME,
) -> BkvMessage:
    """Decode one complete BKV frame into its typed message.

    ``data`` is the frame, or hex text (``HexSyntaxError`` when it is not hex). The
    direction comes from the header (``fc fe`` up, ``fc ff`` down). With
    ``expect_command`` (``0x0015``, ``(0x0015, 0x07)`` or ``"0x0015/0x07"``), a frame
    carrying anything else raises ``CommandMismatchError``. Commands, sub-commands and
    BKV command ids without a layout decode as :class:`UnknownMessage`,
    :class:`UnknownSubCommand` or :class:`TlvContainer`. Raises only ``DecodeError``.
    """
    if isinstance(data, str):
        data = parse_hex(data)
    header = check_frame(data, max_frame)
    message = decode_checked(data, header)
    if expect_command is not None:
        _check_command(message, header, expect_command)
    return message


def decode_checked(data: bytes | bytearray | memoryview, header: FrameHeader) -> BkvMessage:
    """Decode the payload of a frame whose framing and checksum are already verified."""
    end = len(data) - 3
    command = header.command
    try:
        if command in (NODE_LIST, CONTROL):
            return _decode_inner(data, end, header)
        if command == TLV:
            return decode_tlv(
                data,
                PAYLOAD_OFFSET,
                end,
                gateway_id=header.gateway_id,
                seq=header.seq,
                direction=header.direction,
            )
        cls = REGISTRY.get((command, None, header.direction))
        if cls is None:
            return UnknownMessage(
                header.gateway_id,
                header.seq,
                command,
                bytes(data[PAYLOAD_OFFSET:end]).hex().upper(),
                header.direction,
            )
        assert issubclass(cls, FixedMessage)
        return _fixed(cls, data, PAYLOAD_OFFSET, end, header)
    except DecodeError:
        raise
    except Exception as exc:  # a decoder must never leak anything else
        raise PayloadError(f"0x{command:04X}: {exc}", offset=PAYLOAD_OFFSET) from exc


def _decode_inner(
    data: bytes | bytearray | memoryview, end: int, header: FrameHeader
) -> BkvMessage:
    size = end - PAYLOAD_OFFSET
    if size < _INNER_HEADER:
        raise InnerLengthError(
            f"payload of {size} bytes cannot hold the inner length and sub-command",
            offset=PAYLOAD_OFFSET,
            expected=_INNER_HEADER,
            actual=size,
        )
    inner_length = data[PAYLOAD_OFFSET] << 8 | data[PAYLOAD_OFFSET + 1]
    if inner_length != size - _INNER_HEADER:
        raise InnerLengthError(
            f"inner length {inner_length}, but {size - _INNER_HEADER} parameter bytes follow",
            offset=PAYLOAD_OFFSET,
            expected=size - _INNER_HEADER,
            actual=inner_length,
        )
    sub_cmd = data[PAYLOAD_OFFSET + 2]
    start = PAYLOAD_OFFSET + _INNER_HEADER
    cls = REGISTRY.get((header.command, sub_cmd, header.direction))
    if cls is None:
        return UnknownSubCommand(
            header.gateway_id,
            header.seq,
            header.command,
            sub_cmd,
            bytes(data[start:end]).hex().upper(),
            header.direction,
        )
    assert issubclass(cls, FixedMessage)
    return _fixed(cls, data, start, end, header)


def _fixed(
    cls: type[FixedMessage],
    data: bytes | bytearray | memoryview,
    start: int,
    end: int,
    header: FrameHeader,
) -> BkvMessage:
    try:
        message: BkvMessage = cls.codec.decode(data, start, end, header.gateway_id, header.seq)
    except DecodeError as exc:
        if exc.offset is not None:
            exc.offset += start
        raise
    return message


def _check_command(message: BkvMessage, header: FrameHeader, expected: ExpectedCommand) -> None:
    want_command, want_key = _parse_expected(expected)
    key = message_key(message)
    if header.command != want_command or (want_key is not None and key != want_key):
        got = f"0x{header.command:04X}" + (f"/0x{key:02X}" if key is not None else "")
        raise CommandMismatchError(
            f"frame carries {got}, expected {expected!r}",
            offset=4,
            expected=expected,
            actual=got,
        )


def _parse_expected(expected: ExpectedCommand) -> tuple[int, int | None]:
    if isinstance(expected, int):
        return expected, None
    if isinstance(expected, tuple):
        return expected[0], expected[1]
    match = _COMMAND_TEXT.fullmatch(expected.strip())
    if match is None:
        raise ValueError(f"expect_command {expected!r} is not like '0x0015' or '0x0015/0x07'")
    sub = match.group(2)
    return int(match.group(1), 16), (int(sub, 16) if sub else None)


def message_key(message: BkvMessage) -> int | None:
    """The sub-command (0x0005/0x0015) or BKV command id (0x1000) of a message."""
    if isinstance(message, UnknownSubCommand):
        return message.sub_cmd
    bkv_cmd = getattr(message, "bkv_cmd", None)
    if isinstance(bkv_cmd, int):
        return bkv_cmd
    return message.key


def encode(message: BkvMessage) -> bytes:
    """Encode a message into a complete frame (lengths, checksum and tail included).

    Raises ``EncodeError`` naming the field when a value does not fit the wire.
    """
    if not isinstance(message, BkvMessage):
        raise EncodeError(f"{type(message).__name__} is not a BKV message")
    return message.to_bytes()


def message_class(
    command: int, key: int | None, direction: Direction | str
) -> type[BkvMessage] | None:
    """The class registered for ``(command, sub-command or BKV command id, direction)``."""
    return REGISTRY.get((command, key, Direction(direction)))


def socket_id(gateway_id: str, socket: int) -> str:
    """The canonical id of a socket: ``"<gateway_id>-<socket>"``.

    >>> socket_id("82231214002700", 1)
    '82231214002700-1'
    """
    if not isinstance(gateway_id, str) or len(gateway_id) != 14:
        raise EncodeError(
            f"gateway_id must be 14 hex digits, got {gateway_id!r}", field="gateway_id"
        )
    try:
        int(gateway_id, 16)
    except ValueError:
        raise EncodeError(f"gateway_id is not hex: {gateway_id!r}", field="gateway_id") from None
    if isinstance(socket, bool) or not isinstance(socket, int) or not 0 <= socket <= 0xFF:
        raise EncodeError(f"socket must be 0-255, got {socket!r}", field="socket")
    return f"{gateway_id.upper()}-{socket}"
