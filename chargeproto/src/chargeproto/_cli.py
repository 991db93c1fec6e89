"""The ``chargeproto`` command line: decode AP3000 and BKV frames to JSON or a table,
encode JSON to frames."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import click

from . import ap3000, bkv
from ._base import Direction, Message, unknown_text
from ._errors import (
    ChargeProtoError,
    DecodeError,
    EncodeError,
    HexSyntaxError,
    ProtocolDetectionError,
)
from ._events import Event, IccidReceived, KeepaliveReceived, MessageReceived
from ._layout import Codec
from ._stream import StreamDecoder
from .bkv import _frame as bkv_frame
from .bkv._tlv import parse_items

_TLV = 0x1000
_NODE_LIST = 0x0005
_CONTROL = 0x0015
_SEPARATORS = re.compile(r"[\s:,-]+")
_ICCID = re.compile(r"^89[0-9A-Fa-f]{18}$")


def parse_hex(text: str) -> bytes:
    """Bytes from hex text; spaces, colons, commas and dashes between bytes are allowed."""
    cleaned = _SEPARATORS.sub("", text.strip())
    if cleaned.lower().startswith("0x"):
        cleaned = cleaned[2:]
    bad = re.search(r"[^0-9A-Fa-f]", cleaned)
    if bad:
        raise HexSyntaxError(
            f"not hex: {bad.group()!r} at position {bad.start()}", offset=bad.start()
        )
    if len(cleaned) % 2:
        raise HexSyntaxError("odd number of hex digits", offset=len(cleaned))
    return bytes.fromhex(cleaned)


def _inputs(hex_args: tuple[str, ...], file: TextIO | None) -> Iterator[str]:
    if hex_args:
        yield from hex_args
        return
    source: Iterable[str] = file if file is not None else sys.stdin
    for line in source:
        content = line.split("#", 1)[0].strip()
        if content:
            yield content


def _message_record(message: Message, direction: str) -> dict[str, Any]:
    if isinstance(message, bkv.BkvMessage):
        return _bkv_record(message)
    fields = message.to_fields()
    record: dict[str, Any] = {"protocol": message.protocol, "direction": direction}
    if isinstance(message, ap3000.UnknownMessage):
        record["command"] = f"0x{message.unknown_command:02x}"
        fields.pop("unknown_command", None)
        fields.pop("unknown_direction", None)
    else:
        record["command"] = f"0x{message.command:02x}"
    record["name"] = type(message).__name__
    for key in ("phy_id", "msg_id"):
        if key in fields:
            record[key] = fields.pop(key)
    record["fields"] = fields
    return record


def bkv_command_text(message: bkv.BkvMessage) -> str:
    """``"0x0000"``, ``"0x0015/0x07"`` (sub-command) or ``"0x1000/0x1017"`` (BKV command)."""
    text = f"0x{message.wire_command:04x}"
    key = bkv.message_key(message)
    if key is None:
        return text
    return text + (f"/0x{key:04x}" if message.wire_command == _TLV else f"/0x{key:02x}")


def _bkv_record(message: bkv.BkvMessage) -> dict[str, Any]:
    fields = message.to_fields()
    for key in ("command", "direction", "gateway_id", "seq"):
        fields.pop(key, None)
    return {
        "protocol": "bkv",
        "direction": message.wire_direction.value,
        "command": bkv_command_text(message),
        "name": type(message).__name__,
        "gateway_id": message.gateway_id,
        "seq": message.seq,
        "fields": fields,
    }


def _event_records(
    events: list[Event], direction: str, protocol: str | None = None
) -> Iterator[dict[str, Any]]:
    for event in events:
        if isinstance(event, MessageReceived):
            yield _message_record(event.message, direction)
        elif isinstance(event, IccidReceived):
            yield {
                "protocol": protocol,
                "direction": direction,
                "command": "iccid",
                "fields": {"iccid": event.iccid},
            }
        elif isinstance(event, KeepaliveReceived):
            yield {
                "protocol": protocol,
                "direction": direction,
                "command": "link",
                "fields": {"keepalive": True},
            }
        else:
            yield _error_record(event.error, event.raw)


def _error_record(error: ChargeProtoError, raw: bytes | str) -> dict[str, Any]:
    record: dict[str, Any] = {"error": str(error)}
    if isinstance(error, DecodeError):
        record["kind"] = error.kind
    record["hex"] = raw.hex() if isinstance(raw, bytes) else raw
    return record


def _decode_one(text: str, direction: str) -> tuple[list[dict[str, Any]], bytes | None]:
    try:
        data = parse_hex(text)
    except HexSyntaxError as exc:
        return [_error_record(exc, text)], None
    if data == b"link":
        return list(_event_records([KeepaliveReceived()], direction)), data
    if _ICCID.match(data.decode("latin-1")):
        return list(_event_records([IccidReceived(data.decode("ascii"), data)], direction)), data
    message: Message
    try:
        if data[:2] in (bkv.HEADER_UP, bkv.HEADER_DOWN):
            message = bkv.decode(data)
        elif data[:3] == b"DNY":
            message = ap3000.decode(data, direction)
        else:
            raise ProtocolDetectionError(
                "starts with neither DNY (AP3000) nor fc fe / fc ff (BKV)",
                offset=0,
                actual=data[:3],
            )
    except DecodeError as exc:
        return [_error_record(exc, data)], data
    return [_message_record(message, direction)], data


# --- the table format -------------------------------------------------------------------

#: (offset in the frame or None, the bytes, "name=value")
Row = tuple[int | None, bytes, str]


def _table(record: dict[str, Any], data: bytes | None) -> str:
    """A readable breakdown: offset, bytes, field, value."""
    if "error" in record:
        return (
            f"error ({record.get('kind', 'decode')}): {record['error']}\n  hex: {record['hex']}\n"
        )
    title = f"{record['protocol'] or '-'} {record['direction']} {record['command']}"
    if "name" in record:
        title += f" {record['name']}"
    lines = [title]
    fields = record["fields"]
    if data is None or record["command"] in ("iccid", "link"):
        lines += [f"  {k}: {v}" for k, v in fields.items()]
        return "\n".join(lines) + "\n"
    if record["protocol"] == "bkv":
        rows = _bkv_rows(record, data)
        derived: tuple[str, ...] = ("success",)
    else:
        rows = _ap3000_rows(record, data)
        derived = _DERIVED_SHOWN
    lines.append(f"  {'offset':>6}  {'bytes':<24}  field = value")
    for offset, chunk, text in rows:
        shown = chunk.hex(" ")
        if len(shown) > 24:
            shown = shown[:20] + " ..."
        where = "" if offset is None else str(offset)
        lines.append(f"  {where:>6}  {shown:<24}  {text}".rstrip())
    spanned = {text.split("=", 1)[0] for _, _, text in rows}
    for key in derived:
        if key in fields and key not in spanned:
            lines.append(f"  {'':>6}  {'':<24}  {key}={fields[key]} (derived)")
    return "\n".join(lines) + "\n"


def _span_rows(
    codec: Codec, data: bytes, start: int, end: int, fields: dict[str, Any]
) -> list[Row]:
    """Rows of a fixed layout: one per wire field (lists of objects: one per entry)."""
    rows: list[Row] = []
    for name, offset, size in codec.spans(data, start, end):
        key = name.split("[]")[0]
        chunk = data[start + offset : start + offset + size]
        value = fields.get(key, "")
        if "[]." in name:
            member = name.split("[].")[1]
            value = [item.get(member) for item in fields.get(key, [])]
        elif isinstance(value, list) and value and isinstance(value[0], dict) and size:
            step = size // len(value)
            for i, item in enumerate(value):
                at = start + offset + i * step
                text = " ".join(f"{k}={v}" for k, v in item.items() if not k.endswith("_text"))
                rows.append((at, data[at : at + step], f"{key}[{i}]: {text}"))
            continue
        elif name not in fields and key not in fields:
            value = "(derived)" if name.endswith(("_count", "_length")) else ""
        text = f"{name}={value}"
        if isinstance(value, int) and f"{key}_text" in fields:
            text += f" ({fields[f'{key}_text']})"
        rows.append((start + offset, chunk, text))
    return rows


def _ap3000_rows(record: dict[str, Any], data: bytes) -> list[Row]:
    fields = record["fields"]
    rows: list[Row] = [
        (0, data[0:3], "header=DNY"),
        (3, data[3:5], f"length={len(data) - 5}"),
        (5, data[5:9], f"phy_id={record.get('phy_id')}"),
        (9, data[9:11], f"msg_id={record.get('msg_id')}"),
        (11, data[11:12], f"command={record['command']}"),
    ]
    cls = ap3000.message_class(data[11], record["direction"])
    end = len(data) - 2
    if cls is None:
        rows.append((12, data[12:end], f"payload_hex={fields.get('payload_hex', '')}"))
    else:
        rows += _span_rows(cls.codec, data, 12, end, fields)
    rows.append((end, data[end:], f"checksum=0x{int.from_bytes(data[end:], 'little'):04X}"))
    return rows


def _bkv_rows(record: dict[str, Any], data: bytes) -> list[Row]:
    fields = record["fields"]
    command = int.from_bytes(data[4:6], "big")
    end = len(data) - 3
    rows: list[Row] = [
        (0, data[0:2], f"header={data[0:2].hex(' ')} ({record['direction']})"),
        (2, data[2:4], f"length={fields.get('length', len(data) - 4)}"),
        (4, data[4:6], f"command=0x{command:04X}"),
        (6, data[6:10], f"seq={record['seq']}"),
        (10, data[10:11], f"direction={record['direction']}"),
        (11, data[11:18], f"gateway_id={record['gateway_id']}"),
    ]
    start = bkv_frame.PAYLOAD_OFFSET
    cls = bkv.message_class(command, _key_of(record["command"]), record["direction"])
    if command == _TLV:
        tlv_cls: Any = cls if cls is not None else bkv.TlvContainer
        rows += _tlv_rows(tlv_cls, data, start, end, "", fields)
    elif command in (_NODE_LIST, _CONTROL):
        rows.append((start, data[start : start + 2], f"inner_length={fields['inner_length']}"))
        rows.append((start + 2, data[start + 2 : start + 3], f"sub_cmd=0x{data[start + 2]:02X}"))
        if isinstance(cls, type) and issubclass(cls, bkv.FixedMessage):
            rows += _span_rows(cls.codec, data, start + 3, end, fields)
        else:
            rows.append((start + 3, data[start + 3 : end], f"params_hex={fields['params_hex']}"))
    elif isinstance(cls, type) and issubclass(cls, bkv.FixedMessage):
        rows += _span_rows(cls.codec, data, start, end, fields)
    else:
        rows.append((start, data[start:end], f"payload_hex={fields.get('payload_hex', '')}"))
    rows.append((end, data[end : end + 1], f"checksum=0x{data[end]:02X}"))
    rows.append((end + 1, data[end + 1 :], "tail=fc ee"))
    return rows


def _key_of(command: str) -> int | None:
    _, _, key = command.partition("/")
    return int(key, 16) if key else None


def _tlv_rows(
    cls: Any, data: bytes, start: int, end: int, prefix: str, fields: dict[str, Any]
) -> list[Row]:
    """One row per TLV item (``L marker tag value``); groups are opened, their items
    indented by name (``sockets[0].ports[1].voltage_v``). Offsets are in the frame."""
    rows: list[Row] = []
    counts: dict[str, int] = {}
    seen: set[str] = set()
    texts = cls.TEXTS if not prefix else {}
    for marker, tag, value, offset in parse_items(data, start, end):
        size = 1 + data[offset]
        spec = cls.TAG_MAP.get(tag)
        decoded: Any = None
        fits = spec is not None and marker == 1 and (spec.kind.is_list or spec.name not in seen)
        if fits:
            try:
                decoded = spec.kind.decode(value)
            except Exception:  # the item is kept raw: shown as tag_xx below
                fits = False
        if not fits or spec is None:
            note = "" if spec is None else f" (kept raw; {spec.name})"
            marker_text = "" if marker == 1 else f" marker=0x{marker:02X}"
            text = f"{prefix}tag_{tag:02x}={value.hex().upper()}{marker_text}{note}"
            rows.append((offset, data[offset : offset + size], text))
            continue
        seen.add(spec.name)
        if spec.kind.is_group:
            index = counts.get(spec.name, 0)
            counts[spec.name] = index + 1
            name = f"{prefix}{spec.name}[{index}]"
            rows.append((offset, data[offset : offset + 3], f"{name} (group 0x{tag:02X})"))
            record_cls = spec.kind.record
            rows += _tlv_rows(record_cls, data, offset + 3, offset + size, name + ".", fields)
            continue
        if spec.kind.is_list:
            decoded = [entry.to_fields() for entry in decoded]
        text = f"{prefix}{spec.name}={decoded}"
        if spec.name == "bkv_cmd":
            text = f"{prefix}bkv_cmd=0x{decoded:04X}"
        table = texts.get(spec.name)
        if table is not None and isinstance(decoded, int):
            text += f" ({table.get(decoded) or unknown_text(decoded)})"
        rows.append((offset, data[offset : offset + size], text))
    return rows


_DERIVED_SHOWN = (
    "success",
    "card_number",
    "balance_cent",
    "expiry_unix",
    "duration_s",
    "energy_kwh",
    "check_packet",
    "upgrade_trigger",
)


def _dumps(record: dict[str, Any]) -> str:
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable text bytes (surrogates): escape them
        return json.dumps(record)
    return text


@click.group()
@click.version_option(package_name="chargeproto")
def main() -> None:
    """Decode and encode AP3000 and BKV charging-pile frames."""


@main.command()
@click.argument("hex_frames", nargs=-1)
@click.option("--file", "file", type=click.File("r"), help="Read hex frames, one per line.")
@click.option(
    "--direction",
    type=click.Choice(["up", "down"]),
    default="up",
    show_default=True,
    help="Who sent AP3000 frames (they do not say): up = device, down = server."
    " BKV frames carry their direction, which wins.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "table"]),
    default="json",
    show_default=True,
    help="JSON Lines (one object per frame) or a table for people.",
)
@click.option(
    "--stream",
    is_flag=True,
    help="Treat all input as one connection's captured byte stream: detect the protocol,"
    " split it into ICCID, link and frames.",
)
def decode(
    hex_frames: tuple[str, ...], file: TextIO | None, direction: str, fmt: str, stream: bool
) -> None:
    """Decode frames given as hex arguments, one per line on stdin, or with --file.

    Each input is detected on its own: DNY is AP3000, fc fe / fc ff is BKV.
    Exit status 1 when any input could not be decoded (after processing all input).
    """
    failed = False
    if stream:
        items = _decode_stream("".join(_inputs(hex_frames, file)), direction)
    else:
        items = []
        for line in _inputs(hex_frames, file):
            records, frame = _decode_one(line, direction)
            items.extend((r, frame) for r in records)
    for record, raw in items:
        failed |= "error" in record
        if fmt == "json":
            click.echo(_dumps(record))
        else:
            click.echo(_table(record, raw))
    if failed:
        sys.exit(1)


def _decode_stream(text: str, direction: str) -> list[tuple[dict[str, Any], bytes | None]]:
    """One connection's bytes through :class:`chargeproto.StreamDecoder`."""
    try:
        data = parse_hex(text)
    except HexSyntaxError as exc:
        return [(_error_record(exc, text[:200]), None)]
    decoder = StreamDecoder(
        direction, ap3000_max_frame=0xFFFF + 5, bkv_max_frame=bkv_frame.ABSOLUTE_MAX_FRAME
    )
    events = decoder.feed(data)
    items: list[tuple[dict[str, Any], bytes | None]] = []
    for event in events:
        raw = event.raw if isinstance(event, MessageReceived) else None
        # ICCID and link may precede the first frame: they belong to the connection's protocol
        items.extend((r, raw) for r in _event_records([event], direction, decoder.protocol))
    if decoder.buffered:
        rest = data[len(data) - decoder.buffered :]
        error = DecodeError(f"{len(rest)} bytes at the end of input form no whole frame")
        items.append((_error_record(error, rest), None))
    return items


@main.command()
@click.argument("json_messages", nargs=-1)
@click.option("--file", "file", type=click.File("r"), help="Read JSON objects, one per line.")
def encode(json_messages: tuple[str, ...], file: TextIO | None) -> None:
    """Encode messages given as JSON (the shape `decode` prints) into hex frames.

    AP3000: "command" (or "name"), "direction" (default "down": a frame to send to a
    pile), "phy_id", "msg_id" and "fields". BKV: "protocol": "bkv", "command"
    ("0x0015/0x07", "0x1000/0x1007" ...) or "name", "direction" (default "down"),
    "gateway_id", "seq" and "fields". Exit status 1 on any error.
    """
    failed = False
    for text in _inputs(json_messages, file):
        try:
            frame = encode_record(json.loads(text))
        except (ChargeProtoError, ValueError, TypeError) as exc:
            failed = True
            click.echo(json.dumps({"error": str(exc), "input": text}))
            continue
        click.echo(frame.hex())
    if failed:
        sys.exit(1)


def encode_record(record: Any) -> bytes:
    """A frame from a JSON object of the shape ``chargeproto decode`` prints."""
    if not isinstance(record, dict):
        raise EncodeError("expected a JSON object")
    protocol = record.get("protocol", "ap3000")
    if protocol == "bkv":
        return encode_bkv_record(record)
    if protocol != "ap3000":
        raise EncodeError(f"unsupported protocol {protocol!r}")
    direction = Direction(record.get("direction", "down"))
    cls: type[ap3000.Ap3000Message] | None
    if "name" in record:
        cls = next((c for c in ap3000.MESSAGE_CLASSES if c.__name__ == record["name"]), None)
        if cls is None:
            raise EncodeError(f"no message named {record['name']!r}")
    else:
        command = record.get("command")
        if not isinstance(command, str | int):
            raise EncodeError('"command" (e.g. "0x82") or "name" is required')
        code = int(command, 16) if isinstance(command, str) else command
        cls = ap3000.message_class(code, direction)
        if cls is None:
            raise EncodeError(f"no {direction} message with command {command}")
    fields = dict(record.get("fields") or {})
    for key in ("phy_id", "msg_id"):
        if key in record:
            fields[key] = record[key]
    fields.setdefault("msg_id", 0)
    return ap3000.encode(cls.from_fields(fields))


#: BKV classes ``encode`` finds by name: the registered ones and those for raw frames
_BKV_RAW: tuple[type[bkv.BkvMessage], ...] = (
    bkv.NodeDelete,
    bkv.TlvContainer,
    bkv.UnknownSubCommand,
    bkv.UnknownMessage,
)
_BKV_CLASSES: dict[str, type[bkv.BkvMessage]] = {
    c.__name__: c for c in (*bkv.MESSAGE_CLASSES, *_BKV_RAW)
}
_BKV_COMMAND = re.compile(r"0x([0-9A-Fa-f]{1,4})(?:/0x([0-9A-Fa-f]{1,4}))?")


def encode_bkv_record(record: dict[str, Any]) -> bytes:
    """A BKV frame from ``{"protocol": "bkv", "command" or "name", "gateway_id", "seq",
    "fields"}``; the message is built with the class's ``from_fields``."""
    raw_fields = record.get("fields") or {}
    if not isinstance(raw_fields, dict):
        raise EncodeError('"fields" must be an object')
    fields: dict[str, Any] = dict(raw_fields)
    command: int | None = None
    key: int | None = None
    if "command" in record:
        match = _BKV_COMMAND.fullmatch(str(record["command"]).strip())
        if match is None:
            raise EncodeError(
                f"command {record['command']!r} is not like 0x0000, 0x0015/0x07, 0x1000/0x1017"
            )
        command = int(match.group(1), 16)
        key = int(match.group(2), 16) if match.group(2) else None
    cls: type[bkv.BkvMessage] | None
    if "name" in record:
        cls = _BKV_CLASSES.get(record["name"])
        if cls is None:
            raise EncodeError(f"no BKV message named {record['name']!r}")
        if "direction" in record:
            fields["direction"] = record["direction"]
    elif command is None:
        raise EncodeError('"command" (e.g. "0x0015/0x07") or "name" is required')
    else:
        direction = bkv_direction(record.get("direction", "down"))
        cls = bkv.message_class(command, key, direction)
        if cls is None:
            if command == _TLV:
                cls = bkv.TlvContainer
            elif key is None:
                cls = bkv.UnknownMessage
            elif command in (_NODE_LIST, _CONTROL):
                cls = bkv.UnknownSubCommand
            else:
                raise EncodeError(f"command 0x{command:04x} has no sub-command")
        fields["direction"] = direction.value
    if command is not None:
        fields["command"] = command
        if key is not None:
            fields["bkv_cmd" if command == _TLV else "sub_cmd"] = key
    for name in ("gateway_id", "seq"):
        if name in record:
            fields[name] = record[name]
    fields.setdefault("seq", 0)
    if issubclass(cls, bkv.TlvMessage):  # as TlvMessage.create(): header items from the frame
        fields.setdefault("bkv_seq", fields["seq"])
        if "gateway_id" in fields:
            fields.setdefault("bkv_gateway_id", fields["gateway_id"])
    return bkv.encode(cls.from_fields(fields))


def bkv_direction(value: Any) -> Direction:
    """``"up"``/``"down"`` as a :class:`Direction`; ``EncodeError`` otherwise."""
    try:
        return Direction(value)
    except ValueError:
        raise EncodeError(f"direction must be 'up' or 'down', got {value!r}") from None
