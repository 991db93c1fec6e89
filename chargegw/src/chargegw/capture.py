"""Capture files: recorded device traffic, one JSON record per line (docs/replay.md).

A capture is what ``chargegw frames export`` writes and what ``chargegw replay`` reads.
Each line is one JSON object; blank lines are ignored. Three kinds of record:

- a header (optional, first): ``{"capture": 1, "created_at": ..., "source": ..., ...}``;
  any further keys are kept in :attr:`Capture.header`;
- a frame: ``{"t": ISO time, "dir": "in"|"out", "conn": connection id, "protocol":
  "ap3000"|"bkv"|null, "hex": ..., "device": ..., "command": ..., "id": ..., "error": ...}``;
  ``in`` is from the device, ``out`` from the server. ``hex`` is the frame as the audit
  log keeps it: masked bytes (ICCIDs, card numbers) are ``**`` pairs;
- the recorded run's state (optional, last): ``{"state": {"orders": [...], "ports":
  [...], ...}}``.

Reading never stops at a bad line: each one is reported as a :class:`LineProblem`
(its number and why) and the rest is read. The module is pure (no I/O beyond the file
the caller names, no clock) and is used by the export, the replay and the tests.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

#: the version in a capture's header
FORMAT_VERSION = 1
PROTOCOLS = frozenset({"ap3000", "bkv"})
DIRECTIONS = frozenset({"in", "out"})
#: a masked byte in ``hex``
MASK = "**"
#: what a masked byte becomes when a frame's bytes are needed (``*``)
MASK_BYTE = 0x2A

_HEX = re.compile(r"(?:[0-9a-fA-F]{2}|\*\*)*")


class CaptureError(ValueError):
    """A capture file cannot be used at all (not one usable line)."""


@dataclasses.dataclass(frozen=True, slots=True)
class LineProblem:
    """A line of a capture that was skipped, and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclasses.dataclass(frozen=True, slots=True)
class CaptureFrame:
    """One frame of a capture."""

    at: datetime
    direction: str
    connection: str
    protocol: str | None
    hex: str
    device_id: str | None = None
    command: str | None = None
    frame_id: int | None = None
    error: str | None = None
    #: the line of the file it was read from (0 when built in memory)
    line: int = 0

    @property
    def masked(self) -> bool:
        """Whether some of its bytes were masked in the audit log."""
        return MASK in self.hex

    @property
    def raw(self) -> bytes:
        """Its bytes, a masked byte as ``*`` (0x2A)."""
        return frame_bytes(self.hex)

    def to_json(self) -> dict[str, Any]:
        """The record as it is written to a capture file."""
        record: dict[str, Any] = {
            "t": self.at.isoformat(),
            "dir": self.direction,
            "conn": self.connection,
            "protocol": self.protocol,
            "hex": self.hex,
        }
        for key, value in (
            ("device", self.device_id),
            ("command", self.command),
            ("id", self.frame_id),
            ("error", self.error),
        ):
            if value is not None:
                record[key] = value
        return record


@dataclasses.dataclass(slots=True)
class Capture:
    """A capture file's content."""

    frames: list[CaptureFrame]
    header: dict[str, Any] = dataclasses.field(default_factory=dict)
    state: dict[str, Any] | None = None
    problems: list[LineProblem] = dataclasses.field(default_factory=list)

    def connections(self) -> dict[str, list[CaptureFrame]]:
        """The frames per connection, in the order of the file."""
        out: dict[str, list[CaptureFrame]] = {}
        for frame in self.frames:
            out.setdefault(frame.connection, []).append(frame)
        return out


def frame_bytes(text: str) -> bytes:
    """The bytes of a (possibly masked) hex string; ``**`` becomes ``*`` (0x2A)."""
    if MASK not in text:
        return bytes.fromhex(text)
    return bytes(
        MASK_BYTE if text[i : i + 2] == MASK else int(text[i : i + 2], 16)
        for i in range(0, len(text), 2)
    )


def _time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("`t` must be an ISO 8601 time")
    at = datetime.fromisoformat(value)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _optional_str(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"`{key}` must be a string or null")


def parse_frame(record: dict[str, Any], line: int = 0) -> CaptureFrame:
    """A frame record as :class:`CaptureFrame`; ``ValueError`` says what is wrong."""
    direction = record.get("dir")
    if direction not in DIRECTIONS:
        raise ValueError(f"`dir` must be 'in' or 'out', not {direction!r}")
    connection = record.get("conn")
    if not isinstance(connection, str) or not connection:
        raise ValueError("`conn` must be a non-empty string")
    protocol = record.get("protocol")
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r} (known: ap3000, bkv)")
    text = record.get("hex")
    if not isinstance(text, str) or len(text) % 2 or not _HEX.fullmatch(text):
        raise ValueError("`hex` must be pairs of hex digits (or ** for a masked byte)")
    frame_id = record.get("id")
    if frame_id is not None and (isinstance(frame_id, bool) or not isinstance(frame_id, int)):
        raise ValueError("`id` must be an integer or null")
    return CaptureFrame(
        at=_time(record.get("t")),
        direction=direction,
        connection=connection,
        protocol=protocol,
        hex=text.lower(),
        device_id=_optional_str(record, "device"),
        command=_optional_str(record, "command"),
        frame_id=frame_id,
        error=_optional_str(record, "error"),
        line=line,
    )


def parse_lines(lines: Iterable[str]) -> Capture:
    """A capture from its lines; bad lines become :attr:`Capture.problems`."""
    capture = Capture(frames=[])
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except ValueError as exc:
            capture.problems.append(LineProblem(number, f"not JSON: {exc}"))
            continue
        if not isinstance(record, dict):
            capture.problems.append(LineProblem(number, "not a JSON object"))
            continue
        if "capture" in record:
            if capture.frames or capture.header:
                capture.problems.append(LineProblem(number, "a header after the first record"))
            elif record["capture"] != FORMAT_VERSION:
                capture.problems.append(
                    LineProblem(number, f"unknown capture version {record['capture']!r}")
                )
            else:
                capture.header = record
            continue
        if "state" in record:
            if not isinstance(record["state"], dict):
                capture.problems.append(LineProblem(number, "`state` must be an object"))
            else:
                capture.state = record["state"]
            continue
        try:
            capture.frames.append(parse_frame(record, number))
        except ValueError as exc:
            capture.problems.append(LineProblem(number, str(exc)))
    return capture


def read_capture(path: str | Path) -> Capture:
    """Read a capture file (see the module's docstring); :class:`CaptureError` if it
    cannot be read or holds no frame at all."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            capture = parse_lines(handle)
    except OSError as exc:
        raise CaptureError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not capture.frames:
        why = "; ".join(str(p) for p in capture.problems[:5]) or "it is empty"
        raise CaptureError(f"{path} holds no usable frame: {why}")
    return capture


def header(source: str, **extra: Any) -> dict[str, Any]:
    """A header record for a new capture."""
    return {
        "capture": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "source": source,
        **extra,
    }


def write_capture(
    out: IO[str],
    frames: Iterable[CaptureFrame],
    *,
    head: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> int:
    """Write a capture (header, frames, state); the number of frames written."""
    if head is not None:
        out.write(json.dumps(head, ensure_ascii=False, sort_keys=True) + "\n")
    count = 0
    for frame in frames:
        out.write(json.dumps(frame.to_json(), ensure_ascii=False) + "\n")
        count += 1
    if state is not None:
        out.write(json.dumps({"state": state}, ensure_ascii=False, default=str) + "\n")
    return count


# --- pcap -------------------------------------------------------------------------------

#: the server's synthetic address and the devices' subnet in an exported pcap
PCAP_SERVER = (10, 255, 0, 1)
PCAP_SERVER_PORT = {"ap3000": 8990, "bkv": 8991, None: 8990}
_PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps
_LINKTYPE_RAW = 101  # raw IPv4, no Ethernet header


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclasses.dataclass(slots=True)
class _Flow:
    client: tuple[int, int, int, int]
    client_port: int
    server_port: int
    seq_in: int = 1_000
    seq_out: int = 5_000


def _flows() -> Iterator[tuple[tuple[int, int, int, int], int]]:
    number = 0
    while True:
        number += 1
        yield (10, 0, (number >> 8) & 0xFF, number & 0xFF), 40_000 + number % 20_000


def _packet(
    src: tuple[int, ...],
    dst: tuple[int, ...],
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    payload: bytes,
) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, 0x18, 65535, 0, 0)
    pseudo = struct.pack("!4B4BBBH", *src, *dst, 0, 6, len(tcp) + len(payload))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp + payload)) + tcp[18:]
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4B4B", 0x45, 0, total, 0, 0x4000, 64, 6, 0, *src, *dst)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + tcp + payload


def write_pcap(out: IO[bytes], frames: Iterable[CaptureFrame]) -> int:
    """Write frames as a pcap file (raw IPv4 with synthetic TCP headers, one segment per
    frame, a flow per connection: the device at 10.0.x.y, the server at 10.255.0.1 on
    8990 for AP3000 and 8991 for BKV). Masked bytes are ``*``; frames that were not a
    device frame (a decode error's bytes) are written too. The number of packets."""
    out.write(struct.pack("<IHHiIII", _PCAP_MAGIC, 2, 4, 0, 0, 65535, _LINKTYPE_RAW))
    flows: dict[str, _Flow] = {}
    addresses = _flows()
    count = 0
    for frame in frames:
        flow = flows.get(frame.connection)
        if flow is None:
            client, port = next(addresses)
            flow = flows[frame.connection] = _Flow(
                client, port, PCAP_SERVER_PORT.get(frame.protocol, 8990)
            )
        payload = frame.raw
        if frame.direction == "in":
            packet = _packet(
                flow.client,
                PCAP_SERVER,
                flow.client_port,
                flow.server_port,
                flow.seq_in,
                flow.seq_out,
                payload,
            )
            flow.seq_in = (flow.seq_in + len(payload)) & 0xFFFFFFFF
        else:
            packet = _packet(
                PCAP_SERVER,
                flow.client,
                flow.server_port,
                flow.client_port,
                flow.seq_out,
                flow.seq_in,
                payload,
            )
            flow.seq_out = (flow.seq_out + len(payload)) & 0xFFFFFFFF
        stamp = frame.at.timestamp()
        seconds = int(stamp)
        micros = round((stamp - seconds) * 1_000_000)
        out.write(struct.pack("<IIII", seconds, micros, len(packet), len(packet)))
        out.write(packet)
        count += 1
    return count
