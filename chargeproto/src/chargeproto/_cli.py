"""The ``chargeproto`` command line: decode frames to JSON or a table, encode JSON to frames."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import click

from . import ap3000
from ._base import Direction, Message
from ._errors import ChargeProtoError, DecodeError, EncodeError, HexSyntaxError
from ._events import Event, IccidReceived, KeepaliveReceived, MessageReceived

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


def _event_records(events: list[Event], direction: str) -> Iterator[dict[str, Any]]:
    for event in events:
        if isinstance(event, MessageReceived):
            yield _message_record(event.message, direction)
        elif isinstance(event, IccidReceived):
            yield {
                "protocol": "ap3000",
                "direction": direction,
                "command": "iccid",
                "fields": {"iccid": event.iccid},
            }
        elif isinstance(event, KeepaliveReceived):
            yield {
                "protocol": "ap3000",
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
    try:
        message = ap3000.decode(data, direction)
    except DecodeError as exc:
        return [_error_record(exc, data)], data
    return [_message_record(message, direction)], data


def _table(record: dict[str, Any], data: bytes | None) -> str:
    """A readable breakdown: offset, bytes, field, value."""
    if "error" in record:
        return (
            f"error ({record.get('kind', 'decode')}): {record['error']}\n  hex: {record['hex']}\n"
        )
    title = f"{record['protocol']} {record['direction']} {record['command']}"
    if "name" in record:
        title += f" {record['name']}"
    lines = [title]
    fields = record["fields"]
    if data is None or record["command"] in ("iccid", "link"):
        lines += [f"  {k}: {v}" for k, v in fields.items()]
        return "\n".join(lines) + "\n"
    rows: list[tuple[int, bytes, str, str]] = [
        (0, data[0:3], "header", "DNY"),
        (3, data[3:5], "length", str(len(data) - 5)),
        (5, data[5:9], "phy_id", str(record.get("phy_id"))),
        (9, data[9:11], "msg_id", str(record.get("msg_id"))),
        (11, data[11:12], "command", record["command"]),
    ]
    cls = ap3000.message_class(data[11], record["direction"])
    end = len(data) - 2
    if cls is None:
        rows.append((12, data[12:end], "payload_hex", fields.get("payload_hex", "")))
    else:
        for name, offset, size in cls.codec.spans(data, 12, end):
            key = name.split("[]")[0]
            value = fields.get(key, "")
            if "[]." in name:
                member = name.split("[].")[1]
                value = [item.get(member) for item in fields.get(key, [])]
            elif name in fields or key in fields:
                value = fields.get(name, value)
            else:
                value = fields.get(
                    name, "(derived)" if name.endswith(("_count", "_length")) else ""
                )
            text = f"{name}={value}"
            if isinstance(value, int) and f"{key}_text" in fields:
                text += f" ({fields[f'{key}_text']})"
            rows.append((12 + offset, data[12 + offset : 12 + offset + size], name, text))
    rows.append((end, data[end:], "checksum", f"0x{int.from_bytes(data[end:], 'little'):04X}"))
    lines.append(f"  {'offset':>6}  {'bytes':<24}  field = value")
    for offset, chunk, name, value_text in rows:
        text = f"{name}={value_text}" if offset < 12 or offset == end else value_text
        shown = chunk.hex(" ")
        if len(shown) > 24:
            shown = shown[:20] + " ..."
        lines.append(f"  {offset:>6}  {shown:<24}  {text}")
    spanned = {row[2] for row in rows}
    for key in _DERIVED_SHOWN:
        if key in fields and key not in spanned:
            lines.append(f"  {'':>6}  {'':<24}  {key}={fields[key]} (derived)")
    return "\n".join(lines) + "\n"


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


@click.group()
@click.version_option(package_name="chargeproto")
def main() -> None:
    """Decode and encode AP3000 charging-pile frames."""


@main.command()
@click.argument("hex_frames", nargs=-1)
@click.option("--file", "file", type=click.File("r"), help="Read hex frames, one per line.")
@click.option(
    "--direction",
    type=click.Choice(["up", "down"]),
    default="up",
    show_default=True,
    help="Who sent the frames (AP3000 frames do not say): up = device, down = server.",
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
    help="Treat all input as one captured byte stream and split it into frames.",
)
def decode(
    hex_frames: tuple[str, ...], file: TextIO | None, direction: str, fmt: str, stream: bool
) -> None:
    """Decode frames given as hex arguments, one per line on stdin, or with --file.

    Exit status 1 when any input could not be decoded (after processing all input).
    """
    failed = False
    items: list[tuple[dict[str, Any], bytes | None]] = []
    if stream:
        text = "".join(_inputs(hex_frames, file))
        try:
            data = parse_hex(text)
        except HexSyntaxError as exc:
            items.append((_error_record(exc, text[:200]), None))
        else:
            splitter = ap3000.Ap3000StreamDecoder(direction, max_frame=0xFFFF + 5)
            for event in splitter.feed(data):
                raw = event.raw if isinstance(event, MessageReceived) else None
                items.extend((r, raw) for r in _event_records([event], direction))
            if splitter.buffered:
                rest = data[len(data) - splitter.buffered :]
                error = DecodeError(f"{len(rest)} bytes at the end of input form no whole frame")
                items.append((_error_record(error, rest), None))
    else:
        for line in _inputs(hex_frames, file):
            records, frame = _decode_one(line, direction)
            items.extend((r, frame) for r in records)
    for record, raw in items:
        failed |= "error" in record
        if fmt == "json":
            click.echo(json.dumps(record, ensure_ascii=False))
        else:
            click.echo(_table(record, raw))
    if failed:
        sys.exit(1)


@main.command()
@click.argument("json_messages", nargs=-1)
@click.option("--file", "file", type=click.File("r"), help="Read JSON objects, one per line.")
def encode(json_messages: tuple[str, ...], file: TextIO | None) -> None:
    """Encode messages given as JSON (the shape `decode` prints) into hex frames.

    Each object needs "command" (or "name"), "direction" (default "down": a frame to
    send to a pile), "phy_id", "msg_id" and "fields". Exit status 1 on any error.
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
