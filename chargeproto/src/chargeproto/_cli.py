"""The ``chargeproto`` command line: decode AP3000 and BKV frames to JSON or a table,
encode JSON to frames.

The JSON objects are the records of :func:`chargeproto.to_record`; ``encode`` reads
them back with :func:`chargeproto.from_record`. Each protocol package is imported only
when an input of that protocol shows up, so one decode loads one protocol.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, TextIO

import click

from ._base import Direction, Message, unknown_text
from ._errors import (
    ChargeProtoError,
    DecodeError,
    EncodeError,
    HexSyntaxError,
    ProtocolDetectionError,
    RecordError,
)
from ._events import Event, IccidReceived, KeepaliveReceived, MessageReceived, StreamError
from ._record import bkv_command_text, from_record, to_record

if TYPE_CHECKING:
    from ._layout import Codec
    from .ap3000 import Ap3000Message

_TLV = 0x1000
_NODE_LIST = 0x0005
_CONTROL = 0x0015
_SEPARATORS = re.compile(r"[\s:,-]+")
_ICCID = re.compile(r"^89[0-9A-Fa-f]{18}$")
#: ``--direction auto``: AP3000 frames are decoded in the direction their layout fits
AUTO: Final = "auto"

__all__ = ["bkv_command_text", "encode_record", "main", "parse_hex"]


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


def _warn(text: str) -> None:
    click.echo(f"warning: {text}", err=True)


# --- which direction an AP3000 frame fits --------------------------------------------

#: how well a payload fits a direction's layout, best last
_NO_FIT, _NO_LAYOUT, _EXTRA_BYTES, _EXACT = range(4)


@dataclasses.dataclass(frozen=True)
class _Fit:
    """An AP3000 frame decoded in one direction, and how well it fits there."""

    direction: Direction
    message: Ap3000Message | None
    error: DecodeError | None
    rank: int

    def describe(self) -> str:
        if self.message is None:
            return f"{self.direction}: {self.error}"
        return f"{self.direction}: {type(self.message).__name__}"


def _fit(data: bytes, direction: Direction) -> _Fit:
    from . import ap3000

    try:
        message = ap3000.decode(data, direction)
    except DecodeError as exc:
        return _Fit(direction, None, exc, _NO_FIT)
    if isinstance(message, ap3000.UnknownMessage):
        return _Fit(direction, message, None, _NO_LAYOUT)
    rank = _EXTRA_BYTES if message.trailing_hex else _EXACT
    return _Fit(direction, message, None, rank)


def decode_ap3000(data: bytes, direction: str) -> Ap3000Message:
    """Decode an AP3000 frame for the command line; see ``--direction``.

    ``up``/``down``: that direction, with a warning when the frame fits only the other
    one, and a ``DecodeError`` that says which direction fits when it fits only that
    one. ``auto``: the direction whose layout the frame fits best (whole payload, then
    payload with bytes left over, then a command without a layout); a tie goes to
    ``up``; a warning on stderr whenever the choice is ``down`` or the frame fits both.
    Frame errors (header, length, checksum) do not depend on the direction.
    """
    from . import ap3000

    ap3000.check_frame(data)
    command = data[11]
    up, down = _fit(data, Direction.UP), _fit(data, Direction.DOWN)
    if direction != AUTO:
        chosen, other = (up, down) if direction == "up" else (down, up)
        if chosen.message is None:
            assert chosen.error is not None
            if other.rank >= _EXTRA_BYTES:
                raise _retagged(
                    chosen.error,
                    f"0x{command:02x} does not fit direction {chosen.direction}"
                    f" ({chosen.error}); it fits direction {other.direction}"
                    f" ({type(other.message).__name__}): try --direction {other.direction}",
                )
            raise chosen.error
        if other.rank == _EXACT and chosen.rank < _EXACT:
            _warn(
                f"AP3000 0x{command:02x} fits direction {other.direction}"
                f" ({type(other.message).__name__}) better; decoded as {chosen.direction}"
                " as asked"
            )
        return chosen.message
    best = down if down.rank > up.rank else up
    if best.rank <= _NO_LAYOUT and _NO_FIT in (up.rank, down.rank):
        failed = up if up.rank == _NO_FIT else down
        assert failed.error is not None
        if up.rank == down.rank:  # a layout in both directions, and neither fits
            raise _retagged(
                failed.error,
                f"0x{command:02x} fits neither direction ({up.describe()}; {down.describe()})",
            )
        raise failed.error
    assert best.message is not None
    other = up if best is down else down
    if best is down:
        how = "and not up" if other.rank <= _NO_LAYOUT else "better than up"
        if best.rank == _EXTRA_BYTES:
            extra = len(best.message.trailing_hex) // 2
            how += f", with {extra} byte{'s' if extra > 1 else ''} left over"
        _warn(
            f"AP3000 0x{command:02x} fits direction down ({type(best.message).__name__})"
            f" {how}: decoded as down, a server frame (--direction up or down to choose)"
        )
    elif other.rank == best.rank and best.rank >= _EXTRA_BYTES:
        assert other.message is not None
        _warn(
            f"AP3000 0x{command:02x} fits both directions: decoded as up"
            f" ({type(best.message).__name__}); pass --direction down for the server's"
            f" {type(other.message).__name__}"
        )
    return best.message


def _retagged(error: DecodeError, text: str) -> DecodeError:
    """The same kind of error with a message that explains the direction."""
    out = type(error)(text, offset=error.offset, expected=error.expected, actual=error.actual)
    out.__cause__ = error
    return out


# --- records -----------------------------------------------------------------------


def _event_records(
    events: list[Event], direction: str, protocol: str | None = None
) -> Iterator[tuple[dict[str, Any], bytes | None]]:
    for event in events:
        if isinstance(event, MessageReceived):
            if event.protocol == "ap3000" and direction == AUTO:
                yield _decode_frame(event.raw, direction)
            else:
                yield to_record(event.message, frame=event.raw), event.raw
        elif isinstance(event, IccidReceived):
            record = _plain(protocol, direction, "iccid", {"iccid": event.iccid})
            yield record, None
        elif isinstance(event, KeepaliveReceived):
            yield _plain(protocol, direction, "link", {"keepalive": True}), None
        elif direction == AUTO and _whole_ap3000_frame(event):
            yield _decode_frame(event.raw, direction)  # it may fit the other direction
        else:
            yield _error_record(event.error, event.raw), None


def _whole_ap3000_frame(event: StreamError) -> bool:
    """A checked AP3000 frame whose payload did not fit the stream's direction."""
    from . import ap3000

    if event.raw[:3] != ap3000.HEADER:
        return False
    try:
        ap3000.check_frame(event.raw)
    except DecodeError:
        return False
    return True


def _plain(
    protocol: str | None, direction: str, command: str, fields: dict[str, Any]
) -> dict[str, Any]:
    """The record of an ICCID or a keepalive (the modem sends them: ``up`` in auto)."""
    shown = "up" if direction == AUTO else direction
    return {"protocol": protocol, "direction": shown, "command": command, "fields": fields}


def _error_record(error: ChargeProtoError, raw: bytes | str) -> dict[str, Any]:
    record: dict[str, Any] = {"error": str(error)}
    if isinstance(error, DecodeError):
        record["kind"] = error.kind
    record["hex"] = raw.hex() if isinstance(raw, bytes) else raw
    return record


def _decode_frame(data: bytes, direction: str) -> tuple[dict[str, Any], bytes | None]:
    """One frame of either protocol -> its record (or an error record)."""
    message: Message
    try:
        if data[:2] in (b"\xfc\xfe", b"\xfc\xff"):
            from . import bkv

            message = bkv.decode(data)
        elif data[:3] == b"DNY":
            message = decode_ap3000(data, direction)
        else:
            raise ProtocolDetectionError(
                "starts with neither DNY (AP3000) nor fc fe / fc ff (BKV)",
                offset=0,
                actual=data[:3],
            )
    except DecodeError as exc:
        return _error_record(exc, data), data
    return to_record(message, frame=data), data


def _decode_one(text: str, direction: str) -> list[tuple[dict[str, Any], bytes | None]]:
    try:
        data = parse_hex(text)
    except HexSyntaxError as exc:
        return [(_error_record(exc, text), None)]
    if data == b"link":
        return list(_event_records([KeepaliveReceived()], direction))
    if _ICCID.match(data.decode("latin-1")):
        return list(_event_records([IccidReceived(data.decode("ascii"), data)], direction))
    return [_decode_frame(data, direction)]


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
    from . import ap3000

    fields = record["fields"]
    rows: list[Row] = [
        (0, data[0:3], "header=DNY"),
        (3, data[3:5], f"length={record['length']}"),
        (5, data[5:9], f"phy_id={record['phy_id']}"),
        (9, data[9:11], f"msg_id={record['msg_id']}"),
        (11, data[11:12], f"command={record['command']}"),
    ]
    cls = ap3000.message_class(data[11], record["direction"])
    end = len(data) - 2
    if cls is None:
        rows.append((12, data[12:end], f"payload_hex={fields.get('payload_hex', '')}"))
    else:
        rows += _span_rows(cls.codec, data, 12, end, fields)
    rows.append((end, data[end:], f"checksum=0x{record['checksum']:04X}"))
    return rows


def _bkv_rows(record: dict[str, Any], data: bytes) -> list[Row]:
    from . import bkv

    fields = record["fields"]
    command = int.from_bytes(data[4:6], "big")
    end = len(data) - 3
    rows: list[Row] = [
        (0, data[0:2], f"header={data[0:2].hex(' ')} ({record['direction']})"),
        (2, data[2:4], f"length={record['length']}"),
        (4, data[4:6], f"command=0x{command:04X}"),
        (6, data[6:10], f"seq={record['seq']}"),
        (10, data[10:11], f"direction={record['direction']}"),
        (11, data[11:18], f"gateway_id={record['gateway_id']}"),
    ]
    start = 18  # the payload offset (bkv.md 2)
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
    rows.append((end, data[end : end + 1], f"checksum=0x{record['checksum']:02X}"))
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
    from .bkv._tlv import parse_items

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


# --- commands ----------------------------------------------------------------------


@click.group()
@click.version_option(package_name="chargeproto")
def main() -> None:
    """Decode and encode AP3000 and BKV charging-pile frames."""


@main.command()
@click.argument("hex_frames", nargs=-1)
@click.option("--file", "file", type=click.File("r"), help="Read hex frames, one per line.")
@click.option(
    "--direction",
    type=click.Choice(["auto", "up", "down"]),
    default=AUTO,
    show_default=True,
    help="Who sent AP3000 frames (they do not say): up = device, down = server, auto ="
    " the direction whose layout the frame fits (a warning on stderr when that is down"
    " or when both fit). A frame that fits neither is an error. BKV frames carry their"
    " direction, which wins.",
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
        batches: Iterable[list[tuple[dict[str, Any], bytes | None]]] = [
            _decode_stream("".join(_inputs(hex_frames, file)), direction)
        ]
    else:  # one input at a time: a warning on stderr comes right before its record
        batches = (_decode_one(line, direction) for line in _inputs(hex_frames, file))
    for batch in batches:
        for record, raw in batch:
            failed |= "error" in record
            click.echo(_dumps(record) if fmt == "json" else _table(record, raw))
    if failed:
        sys.exit(1)


def _decode_stream(text: str, direction: str) -> list[tuple[dict[str, Any], bytes | None]]:
    """One connection's bytes through :class:`chargeproto.StreamDecoder`."""
    from ._stream import StreamDecoder
    from .ap3000._frame import ABSOLUTE_MAX_FRAME as AP3000_MAX
    from .bkv._frame import ABSOLUTE_MAX_FRAME as BKV_MAX

    try:
        data = parse_hex(text)
    except HexSyntaxError as exc:
        return [(_error_record(exc, text[:200]), None)]
    decoder = StreamDecoder(
        Direction.UP if direction == AUTO else direction,
        ap3000_max_frame=AP3000_MAX,
        bkv_max_frame=BKV_MAX,
    )
    events = decoder.feed(data)
    # ICCID and link may precede the first frame: they belong to the connection's protocol
    items = list(_event_records(events, direction, decoder.protocol))
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
    pile), "phy_id", "msg_id" (default 0) and "fields". BKV: "protocol": "bkv",
    "command" ("0x0015/0x07", "0x1000/0x1007" ...) or "name", "direction" (default
    "down"), "gateway_id", "seq" (default 0) and "fields". Exit status 1 on any error.
    """
    failed = False
    for text in _inputs(json_messages, file):
        try:
            frame = encode_record(json.loads(text))
        except (ChargeProtoError, ValueError, TypeError) as exc:
            failed = True
            out: dict[str, Any] = {"error": str(exc), "input": text}
            if isinstance(exc, EncodeError) and exc.field is not None:
                out["field"] = exc.field
            click.echo(json.dumps(out))
            continue
        click.echo(frame.hex())
    if failed:
        sys.exit(1)


@main.command()
@click.option(
    "--out",
    type=click.File("w", encoding="utf-8", lazy=False),
    default="-",
    show_default=True,
    help="Write the Lua file here (- = standard output).",
)
def dissector(out: TextIO) -> None:
    """Generate a Wireshark Lua dissector for AP3000 and BKV from the codec.

    Load it with `tshark -X lua_script:FILE` or copy it into Wireshark's personal
    plugins folder. It dissects TCP ports 8990 (AP3000) and 8991 (BKV), the ports of
    `chargegw frames export --format pcap`, and finds both protocols on other ports
    by their headers.
    """
    from ._dissector import dissector_lua

    out.write(dissector_lua())


def encode_record(record: Any) -> bytes:
    """A frame from a JSON object of the shape ``chargeproto decode`` prints.

    A hand-written record may leave out what :func:`chargeproto.from_record` requires
    and the command line can default: ``protocol`` (AP3000), ``direction`` (down, when
    the message is chosen by ``command``), ``msg_id``/``seq`` (0), and for a BKV
    0x1000 command the header items ``bkv_seq`` and ``bkv_gateway_id`` (the frame's
    ``seq`` and ``gateway_id``, as in the guide's examples).
    """
    if not isinstance(record, dict):
        raise RecordError("expected a JSON object")
    prepared = dict(record)
    prepared.setdefault("protocol", "ap3000")
    if "name" not in prepared:
        prepared.setdefault("direction", "down")
    fields = prepared.get("fields") or {}
    if prepared["protocol"] == "ap3000":
        if "msg_id" not in prepared and isinstance(fields, dict) and "msg_id" not in fields:
            prepared["msg_id"] = 0
        from . import ap3000

        message = from_record(prepared)
        assert isinstance(message, ap3000.Ap3000Message)
        return ap3000.encode(message)
    if "seq" not in prepared and isinstance(fields, dict) and "seq" not in fields:
        prepared["seq"] = 0
    message = from_record(prepared)
    from . import bkv

    assert isinstance(message, bkv.BkvMessage)
    if isinstance(message, bkv.TlvMessage) and isinstance(fields, dict):
        defaults: dict[str, Any] = {}
        if "bkv_seq" not in fields:
            defaults["bkv_seq"] = message.seq
        if "bkv_gateway_id" not in fields and "gateway_id" in record:
            defaults["bkv_gateway_id"] = message.gateway_id
        message = dataclasses.replace(message, **defaults)
    return bkv.encode(message)
