"""BKV codec benchmark: our decoder/encoder against hand-written struct code.

Run with ``nox -s bench`` (or ``uv run python benchmarks/bench_bkv.py``). Every figure
is the best of several timing runs, and every ratio compares two measurements taken in
the same run, so the ratios hold on a noisy shared machine even when the absolute
microseconds move. ``--write FILE`` replaces the BKV section of FILE.

Frames: a 0x1000/0x1017 status cluster with two sockets of two jacks each (built with
the library: the guide's example has one socket), and the guide's 0x0015/0x02 end
report (vector ``bkv_0x0015_0x02_end_report``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import partial
from typing import Any

from common import TIMING_COLUMNS, Row, bench_main, best_us, markdown_section, measure_codec

from chargeproto import ABSENT, Absent, bkv
from chargeproto.bkv import EndReport, JackStatus, SocketStatus, StatusCluster

GATEWAY = "82231214002700"


def _jack(port: int, charging: bool) -> JackStatus:
    return JackStatus(
        port=port,
        status_bits=0x90 if charging else 0x80,
        business_no=104 if charging else 0,
        voltage_v=227.5,
        power_w=183.4 if charging else 0.0,
        current_a=0.812 if charging else 0.001,
        energy_kwh=0.35 if charging else 0.0,
        duration_min=42 if charging else 0,
    )


CLUSTER_MESSAGE = StatusCluster.create(
    GATEWAY,
    0,
    sockets=tuple(
        SocketStatus(
            socket=socket,
            firmware_version=0xFFFF,
            temperature_c=37,
            signal_strength=30,
            ports=(_jack(0, socket == 1), _jack(1, False)),
        )
        for socket in (1, 2)
    ),
)
CLUSTER = bkv.encode(CLUSTER_MESSAGE)
END_REPORT = bytes.fromhex(
    "fcfe00250015000000000186004459453005001102025036302000980068000000010050002d41fcee"
)

# --- the hand-written baseline: what a careful engineer writes for one frame ------------

_HEAD = struct.Struct(">2sHHIB7s")
_DIRECTION = {b"\xfc\xfe": 1, b"\xfc\xff": 0}


def _check(frame: bytes) -> tuple[int, int, str]:
    """Header, length, tail, checksum, direction byte; returns command, seq, gateway."""
    head, length, command, seq, direction, gateway = _HEAD.unpack_from(frame)
    if _DIRECTION.get(head) != direction or length + 4 != len(frame):
        raise ValueError("bad frame")
    if frame[-2:] != b"\xfc\xee" or sum(frame[2:-3]) & 0xFF != frame[-3]:
        raise ValueError("bad tail or checksum")
    return command, seq, gateway.hex().upper()


_U16 = struct.Struct(">H")


def _hand_jack(frame: bytes, off: int, end: int) -> JackStatus:
    v: dict[int, int] = {}
    while off < end:
        size = frame[off]
        if size == 3:
            v[frame[off + 2]] = frame[off + 3]
        elif size == 4:
            v[frame[off + 2]] = _U16.unpack_from(frame, off + 3)[0]
        else:
            raise ValueError("unexpected jack item")
        off += 1 + size
    return JackStatus(
        port=v[0x08],
        status_bits=v[0x09],
        business_no=v[0x0A],
        voltage_v=v[0x95] / 10,
        power_w=v[0x0B] / 10,
        current_a=v[0x0C] / 1000,
        energy_kwh=v[0x0D] / 1000,
        duration_min=v[0x0E],
    )


def _hand_socket(frame: bytes, off: int, end: int) -> SocketStatus:
    v: dict[int, int] = {}
    ports = []
    while off < end:
        size = frame[off]
        tag = frame[off + 2]
        if tag == 0x5B:
            ports.append(_hand_jack(frame, off + 3, off + 1 + size))
        elif size == 3:
            v[tag] = frame[off + 3]
        elif size == 4:
            v[tag] = _U16.unpack_from(frame, off + 3)[0]
        else:
            raise ValueError("unexpected socket item")
        off += 1 + size
    return SocketStatus(
        socket=v[0x4A],
        firmware_version=v[0x3E],
        temperature_c=v[0x07],
        signal_strength=v[0x96],
        ports=tuple(ports),
    )


def hand_decode_cluster(frame: bytes) -> StatusCluster:
    _, seq, gateway = _check(frame)
    off, end = 18, len(frame) - 3
    bkv_seq: int | Absent = ABSENT
    bkv_gateway: str | Absent = ABSENT
    sockets = []
    while off < end:
        size = frame[off]
        tag = frame[off + 2]
        nxt = off + 1 + size
        if tag == 0x94:
            sockets.append(_hand_socket(frame, off + 3, nxt))
        elif tag == 0x02:
            bkv_seq = int.from_bytes(frame[off + 3 : nxt], "big")
        elif tag == 0x03:
            bkv_gateway = frame[off + 3 : nxt].hex().upper()
        elif tag != 0x01:
            raise ValueError("unexpected item")
        off = nxt
    return StatusCluster(
        gateway_id=gateway,
        seq=seq,
        bkv_seq=bkv_seq,
        bkv_gateway_id=bkv_gateway,
        sockets=tuple(sockets),
    )


_END = struct.Struct(">HBBHBBBBHHHHH")


def hand_decode_end_report(frame: bytes) -> EndReport:
    _, seq, gateway = _check(frame)
    (_, _, socket, fw, temp, signal, port, status, business, power, current, energy, minutes) = (
        _END.unpack_from(frame, 18)
    )
    return EndReport(
        gateway,
        seq,
        socket,
        fw,
        temp,
        signal,
        port,
        status,
        business,
        power / 10,
        current / 1000,
        energy / 1000,
        minutes,
    )


def _frame(head: bytes, direction: int, command: int, seq: int, gw: str, payload: bytes) -> bytes:
    body = _HEAD.pack(head, len(payload) + 17, command, seq, direction, bytes.fromhex(gw))
    body += payload
    return body + bytes((sum(body[2:]) & 0xFF,)) + b"\xfc\xee"


def _u8(tag: int, value: int) -> bytes:
    return bytes((3, 1, tag, value))


def _u16(tag: int, value: int) -> bytes:
    return bytes((4, 1, tag)) + _U16.pack(value)


def _group(tag: int, items: bytes) -> bytes:
    return bytes((len(items) + 2, 1, tag)) + items


def hand_encode_cluster(m: StatusCluster) -> bytes:
    sockets = b""
    for s in m.sockets:  # type: ignore[union-attr]
        jacks = b"".join(
            _group(
                0x5B,
                _u8(0x08, j.port)  # type: ignore[arg-type]
                + _u8(0x09, j.status_bits)  # type: ignore[arg-type]
                + _u16(0x0A, j.business_no)  # type: ignore[arg-type]
                + _u16(0x95, round(j.voltage_v * 10))  # type: ignore[operator]
                + _u16(0x0B, round(j.power_w * 10))  # type: ignore[operator]
                + _u16(0x0C, round(j.current_a * 1000))  # type: ignore[operator]
                + _u16(0x0D, round(j.energy_kwh * 1000))  # type: ignore[operator]
                + _u16(0x0E, j.duration_min),  # type: ignore[arg-type]
            )
            for j in s.ports  # type: ignore[union-attr]
        )
        sockets += _group(
            0x94,
            _u8(0x4A, s.socket)  # type: ignore[arg-type]
            + _u16(0x3E, s.firmware_version)  # type: ignore[arg-type]
            + _u8(0x07, s.temperature_c)  # type: ignore[arg-type]
            + _u8(0x96, s.signal_strength)  # type: ignore[arg-type]
            + jacks,
        )
    payload = (
        _u16(0x01, 0x1017)
        + bytes((10, 1, 0x02))
        + m.bkv_seq.to_bytes(8, "big")  # type: ignore[union-attr]
        + bytes((9, 1, 0x03))
        + bytes.fromhex(m.bkv_gateway_id)  # type: ignore[operator, arg-type]
        + sockets
    )
    return _frame(b"\xfc\xfe", 1, 0x1000, m.seq, m.gateway_id, payload)


def hand_encode_end_report(m: EndReport) -> bytes:
    payload = _END.pack(
        17,
        0x02,
        m.socket,
        m.firmware_version,
        m.temperature_c,
        m.signal_strength,
        m.port,
        m.status_bits,
        m.business_no,
        round(m.power_w * 10),
        round(m.current_a * 1000),
        round(m.energy_kwh * 1000),
        m.duration_min,
    )
    return _frame(b"\xfc\xfe", 1, 0x0015, m.seq, m.gateway_id, payload)


# --- measuring -----------------------------------------------------------------------


CASES: list[tuple[str, bytes, Callable[[bytes], Any], Callable[[Any], bytes]]] = [
    (
        "0x1000/0x1017 status cluster (2 sockets, 4 jacks)",
        CLUSTER,
        hand_decode_cluster,
        hand_encode_cluster,
    ),
    ("0x0015/0x02 end report", END_REPORT, hand_decode_end_report, hand_encode_end_report),
]


def run(number: int, repeat: int) -> list[Row]:
    rows = []
    for label, frame, hand_decode, hand_encode in CASES:
        ours, row = measure_codec(
            label, frame, bkv.decode, bkv.encode, hand_decode, hand_encode, number, repeat
        )
        row["bytes"] = len(frame)
        row["construct_compiled_us"] = row["construct_interpreted_us"] = None
        if isinstance(ours, bkv.FixedMessage):  # the TLV container has no construct layout
            wire = type(ours).WIRE
            compiled = wire.compile()
            params = frame[21:-3] if isinstance(ours, bkv.InnerMessage) else frame[18:-3]
            row["construct_compiled_us"] = best_us(partial(compiled.parse, params), number, repeat)
            row["construct_interpreted_us"] = best_us(
                partial(wire.parse, params), number // 5, repeat
            )
        rows.append(row)
    return rows


def markdown(rows: list[Row]) -> str:
    method = [
        "header, length, tail, checksum and direction byte, walks the items (TLV) or",
        "unpacks with `struct.unpack_from` (0x0015) and builds the same typed message;",
        "the hand-written encoder packs the same message with `struct`/`bytes`. The status",
        "cluster has two sockets of two jacks (built with the library; the guide's example",
        "has one socket). The construct columns parse the parameters only; the TLV",
        "container has no construct layout (`-`).",
    ]
    columns = [("frame", "case"), ("bytes", "bytes"), *TIMING_COLUMNS]
    return markdown_section("BKV codec", method, columns, rows)


if __name__ == "__main__":
    bench_main(__doc__, run, markdown, number=5000, repeat=15)
