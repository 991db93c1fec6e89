"""Records: a message as one JSON-ready dict, the form ``chargeproto decode`` prints.

A record names the protocol, the direction, the command and the message class, then
the frame-level fields of the naming contract (rule 13), then ``fields``: everything
else ``to_fields()`` gives (payload fields, ``_text`` siblings, derived values).

AP3000::

    {"protocol": "ap3000", "direction": "up", "command": "0x21", "name": "Heartbeat",
     "length": 16, "phy_id": "04AB373B", "phy_id_type": 4, "phy_id_number": 11220795,
     "phy_id_qr": "3b37ab04", "msg_id": 1, "checksum": 750, "fields": {...}}

BKV::

    {"protocol": "bkv", "direction": "down", "command": "0x0015/0x07",
     "name": "ChargeControl", "length": 28, "seq": 1874513,
     "gateway_id": "86004459453005", "checksum": 216, "fields": {...}}

:func:`from_record` is the inverse: ``from_record(to_record(m)) == m`` for every
message that can be encoded, also after a JSON round trip. The protocol packages are
imported only when a record of theirs is built or read.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from ._base import Direction, Message
from ._errors import ChargeProtoError, EncodeError, RecordError

if TYPE_CHECKING:
    from . import ap3000, bkv

_TLV: Final = 0x1000
_NODE_LIST: Final = 0x0005
_CONTROL: Final = 0x0015
_AP3000_COMMAND = re.compile(r"0x([0-9A-Fa-f]{1,2})")
_BKV_COMMAND = re.compile(r"0x([0-9A-Fa-f]{1,4})(?:/0x([0-9A-Fa-f]{1,4}))?")
#: frame-level names a record keeps at its top level, per protocol
AP3000_FRAME_KEYS: Final = (
    "length",
    "phy_id",
    "phy_id_type",
    "phy_id_number",
    "phy_id_qr",
    "msg_id",
    "checksum",
)
BKV_FRAME_KEYS: Final = ("length", "seq", "gateway_id", "checksum")
#: keys of ``to_fields()`` that the record's head already says
_BKV_HEAD_NAMES: Final = frozenset(
    {"length", "command", "seq", "direction", "gateway_id", "checksum", "unknown_direction"}
)


def to_record(
    message: Message, *, frame: bytes | bytearray | memoryview | None = None
) -> dict[str, Any]:
    """The record of ``message``: a dict of JSON types (see the module docstring).

    ``length`` and ``checksum`` are those of ``frame`` when it is given (the bytes the
    message was decoded from), else of ``message``'s encoding. Raises ``EncodeError``
    when there is no frame and the message cannot be encoded, ``RecordError`` when
    ``message`` is not a chargeproto message.
    """
    if not isinstance(message, Message):
        raise RecordError(f"{type(message).__name__} is not a chargeproto message")
    if message.protocol == "ap3000":
        return _ap3000_record(message, frame)
    if message.protocol == "bkv":
        return _bkv_record(message, frame)
    raise RecordError(f"unsupported protocol {message.protocol!r}", field="protocol")


def from_record(record: Mapping[str, Any]) -> Message:
    """The message a record describes; the inverse of :func:`to_record`.

    Required: ``protocol``, ``name`` or ``command`` (``"0x82"``, ``"0x0015/0x07"``),
    the addressing fields (AP3000 ``phy_id`` and ``msg_id``, BKV ``gateway_id`` and
    ``seq``; at the top level or inside ``fields``) and the message's own fields.
    ``direction`` is required when only ``command`` names an AP3000 message (the
    code means different messages in the two directions). AP3000 ``phy_id`` may be
    given as ``phy_id_qr`` or as ``phy_id_type`` + ``phy_id_number`` instead; what is
    given must agree. ``length``, ``checksum`` and the values ``to_fields`` derives
    (``success``, ``_text`` ...) are computed, not read. A command code without a
    class is a raw message only when named so (``UnknownMessage``) for AP3000; for
    BKV it becomes ``UnknownMessage``, ``UnknownSubCommand`` or ``TlvContainer``.

    Raises :class:`~chargeproto.RecordError` naming the offending key (``"phy_id"``,
    ``"fields.port"`` ...) when the record describes no message that can be encoded.
    """
    if not isinstance(record, Mapping):
        raise RecordError(f"a record is a JSON object, not {type(record).__name__}")
    protocol = record.get("protocol")
    if protocol == "ap3000":
        return _ap3000_message(record)
    if protocol == "bkv":
        return _bkv_message(record)
    if protocol is None:
        raise RecordError('"protocol" is required ("ap3000" or "bkv")', field="protocol")
    raise RecordError(f"unsupported protocol {protocol!r}", field="protocol")


# --- AP3000 ------------------------------------------------------------------------


def _ap3000_record(
    message: Message, frame: bytes | bytearray | memoryview | None
) -> dict[str, Any]:
    from . import ap3000

    assert isinstance(message, ap3000.Ap3000Message)
    if frame is None:
        frame = ap3000.encode(message)
    fields = message.to_fields()
    if isinstance(message, ap3000.UnknownMessage):
        command, direction = message.unknown_command, Direction(message.unknown_direction)
        fields.pop("unknown_command", None)
        fields.pop("unknown_direction", None)
    else:
        command, direction = message.command, type(message).direction
    fields.pop("phy_id", None)
    fields.pop("msg_id", None)
    return {
        "protocol": "ap3000",
        "direction": direction.value,
        "command": f"0x{command:02x}",
        "name": type(message).__name__,
        "length": frame[3] | frame[4] << 8,
        **ap3000.PhysicalId.parse(message.phy_id).fields(),
        "msg_id": message.msg_id,
        "checksum": frame[-2] | frame[-1] << 8,
        "fields": fields,
    }


@functools.cache
def _ap3000_classes() -> dict[str, type[ap3000.Ap3000Message]]:
    from . import ap3000

    classes = {cls.__name__: cls for cls in ap3000.MESSAGE_CLASSES}
    classes["UnknownMessage"] = ap3000.UnknownMessage
    return classes


def _ap3000_message(record: Mapping[str, Any]) -> Message:
    from . import ap3000

    fields = _fields_of(record)
    direction = _direction(record) if "direction" in record else None
    code = _ap3000_command(record["command"]) if "command" in record else None
    cls = _class_by_name(record, _ap3000_classes())
    if cls is None:
        if code is None:
            raise RecordError('"name" or "command" (e.g. "0x82") is required', field="command")
        if direction is None:
            raise RecordError(
                f'"direction" is required: command 0x{code:02x} means different messages'
                " up and down",
                field="direction",
            )
        cls = ap3000.message_class(code, direction)
        if cls is None:
            raise RecordError(
                f"no {direction.value} message with command 0x{code:02x}"
                ' (name it "UnknownMessage" with a payload_hex to send raw bytes)',
                field="command",
            )
    if cls is ap3000.UnknownMessage:
        if code is None:
            raise RecordError('an UnknownMessage needs its "command"', field="command")
        _merge(fields, "unknown_command", code, "command")
        if direction is not None:
            _merge(fields, "unknown_direction", direction.value, "direction")
        if "unknown_direction" in fields:
            fields["unknown_direction"] = _direction(fields, "unknown_direction")
    else:
        if code is not None and code != cls.command:
            raise RecordError(
                f"{cls.__name__} is command 0x{cls.command:02x}, not 0x{code:02x}",
                field="command",
            )
        if direction is not None and direction is not cls.direction:
            raise RecordError(
                f"{cls.__name__} is sent {cls.direction.value}, not {direction.value}",
                field="direction",
            )
    _merge(fields, "phy_id", _phy_id(record, fields), "phy_id")
    for key in ("phy_id_type", "phy_id_number", "phy_id_qr"):
        fields.pop(key, None)
    for key in ("msg_id",):
        if key in record:
            _merge(fields, key, record[key], key)
        if key not in fields:
            raise RecordError(f'"{key}" is required', field=key)
    _check_computed(record, ("length", "checksum"))
    return _build(cls, fields, ap3000.encode, top=("phy_id", "msg_id"))


def _ap3000_command(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFF:
        return value
    match = _AP3000_COMMAND.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise RecordError(f"command {value!r} is not like 0x82", field="command")
    return int(match.group(1), 16)


def _phy_id(record: Mapping[str, Any], fields: Mapping[str, Any]) -> str:
    """The canonical phy_id from whichever forms the record gives; they must agree."""
    from .ap3000 import PhysicalId

    def get(key: str) -> Any:
        return record[key] if key in record else fields.get(key)

    def parse(key: str, value: Any, how: Any) -> PhysicalId:
        if not isinstance(value, str):
            raise RecordError(f"{key} must be 8 hex digits, got {value!r}", field=key)
        try:
            result: PhysicalId = how(value)
        except ChargeProtoError as exc:
            raise RecordError(f"{key}: {exc}", field=key) from exc
        return result

    found: list[tuple[str, PhysicalId]] = []
    if get("phy_id") is not None:
        found.append(("phy_id", parse("phy_id", get("phy_id"), PhysicalId.parse)))
    if get("phy_id_qr") is not None:
        found.append(("phy_id_qr", parse("phy_id_qr", get("phy_id_qr"), PhysicalId.from_qr)))
    type_code, number = get("phy_id_type"), get("phy_id_number")
    if type_code is not None or number is not None:
        for key, value in (("phy_id_type", type_code), ("phy_id_number", number)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise RecordError(f"{key} must be an integer, got {value!r}", field=key)
        try:
            found.append(("phy_id_type", PhysicalId.from_sticker(type_code, number)))
        except EncodeError as exc:
            raise RecordError(str(exc), field=exc.field) from exc
    if not found:
        raise RecordError(
            '"phy_id" is required (or phy_id_qr, or phy_id_type and phy_id_number)',
            field="phy_id",
        )
    first_key, first = found[0]
    for key, other in found[1:]:
        if other != first:
            raise RecordError(
                f"{key} says {other.canonical}, {first_key} says {first.canonical}", field=key
            )
    return first.canonical


# --- BKV ---------------------------------------------------------------------------


def bkv_command_text(message: bkv.BkvMessage) -> str:
    """``"0x0000"``, ``"0x0015/0x07"`` (sub-command) or ``"0x1000/0x1017"`` (BKV command)."""
    from . import bkv

    text = f"0x{message.wire_command:04x}"
    key = bkv.message_key(message)
    if key is None:
        return text
    return text + (f"/0x{key:04x}" if message.wire_command == _TLV else f"/0x{key:02x}")


def _bkv_record(message: Message, frame: bytes | bytearray | memoryview | None) -> dict[str, Any]:
    from . import bkv

    assert isinstance(message, bkv.BkvMessage)
    if frame is None:
        frame = bkv.encode(message)
    fields = {k: v for k, v in message.to_fields().items() if k not in _BKV_HEAD_NAMES}
    if hasattr(message, "raw_items"):  # a TLV message: the item order, exact raw items
        from .bkv._tlv import exact_fields

        exact_fields(message, fields)
    return {
        "protocol": "bkv",
        "direction": message.wire_direction.value,
        "command": bkv_command_text(message),
        "name": type(message).__name__,
        "length": frame[2] << 8 | frame[3],
        "seq": message.seq,
        "gateway_id": message.gateway_id,
        "checksum": frame[-3],
        "fields": fields,
    }


@functools.cache
def _bkv_classes() -> dict[str, type[bkv.BkvMessage]]:
    from . import bkv

    raw: tuple[type[bkv.BkvMessage], ...] = (
        bkv.NodeDelete,
        bkv.TlvContainer,
        bkv.UnknownSubCommand,
        bkv.UnknownMessage,
    )
    return {cls.__name__: cls for cls in (*bkv.MESSAGE_CLASSES, *raw)}


def _bkv_message(record: Mapping[str, Any]) -> Message:
    from . import bkv

    fields = _fields_of(record)
    command: int | None = None
    key: int | None = None
    if "command" in record:
        command, key = _bkv_command(record["command"])
    cls = _class_by_name(record, _bkv_classes())
    direction = _direction(record) if "direction" in record else None
    if cls is None:
        if command is None:
            raise RecordError(
                '"name" or "command" (e.g. "0x0015/0x07") is required', field="command"
            )
        if direction is None:
            raise RecordError('"direction" ("up" or "down") is required', field="direction")
        cls = bkv.message_class(command, key, direction)
        if cls is None:
            if command == _TLV:
                cls = bkv.TlvContainer
            elif key is None:
                cls = bkv.UnknownMessage
            elif command in (_NODE_LIST, _CONTROL):
                cls = bkv.UnknownSubCommand
            else:
                raise RecordError(f"command 0x{command:04x} has no sub-command", field="command")
    if direction is not None:
        _merge(fields, "direction", direction.value, "direction")
    if command is not None:
        _merge(fields, "command", command, "command")
        if key is not None:
            _merge(fields, "bkv_cmd" if command == _TLV else "sub_cmd", key, "command")
    for name in ("gateway_id", "seq"):
        if name in record:
            _merge(fields, name, record[name], name)
        if name not in fields:
            raise RecordError(f'"{name}" is required', field=name)
    _check_computed(record, ("length", "checksum"))
    return _build(cls, fields, bkv.encode, top=("gateway_id", "seq", "command", "direction"))


def _bkv_command(value: Any) -> tuple[int, int | None]:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF:
        return value, None
    match = _BKV_COMMAND.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise RecordError(
            f"command {value!r} is not like 0x0000, 0x0015/0x07 or 0x1000/0x1017",
            field="command",
        )
    sub = match.group(2)
    return int(match.group(1), 16), (int(sub, 16) if sub else None)


# --- shared ------------------------------------------------------------------------


def _fields_of(record: Mapping[str, Any]) -> dict[str, Any]:
    fields = record.get("fields", {})
    if not isinstance(fields, Mapping):
        raise RecordError('"fields" must be an object', field="fields")
    return dict(fields)


def _class_by_name(record: Mapping[str, Any], classes: Mapping[str, type[Any]]) -> Any:
    if "name" not in record:
        return None
    cls = classes.get(record["name"]) if isinstance(record["name"], str) else None
    if cls is None:
        raise RecordError(
            f"no {record.get('protocol')} message named {record['name']!r}", field="name"
        )
    return cls


def _direction(record: Mapping[str, Any], key: str = "direction") -> Direction:
    value = record[key]
    try:
        return Direction(value)
    except ValueError:
        raise RecordError(f"{key} must be 'up' or 'down', got {value!r}", field=key) from None


def _merge(fields: dict[str, Any], name: str, value: Any, key: str) -> None:
    """Put a head value into ``fields``; a different value already there is an error."""
    if name in fields and fields[name] != value:
        raise RecordError(
            f"{key} is {value!r} but fields.{name} is {fields[name]!r}", field=f"fields.{name}"
        )
    fields[name] = value


def _check_computed(record: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    """``length`` and ``checksum`` are recomputed on encoding; they must still be numbers."""
    for key in keys:
        value = record.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise RecordError(f"{key} must be a non-negative integer, got {value!r}", field=key)


def _build(cls: type[Any], fields: dict[str, Any], encode: Any, top: tuple[str, ...]) -> Message:
    """``cls.from_fields(fields)``, checked by encoding it once."""
    try:
        message: Message = cls.from_fields(fields)
        encode(message)
    except EncodeError as exc:
        name = exc.field
        key = None if name is None else (name if name in top else f"fields.{name}")
        raise RecordError(f"{cls.__name__}: {exc}", field=key) from exc
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise RecordError(f"{cls.__name__}: fields do not fit: {exc}", field="fields") from exc
    return message
