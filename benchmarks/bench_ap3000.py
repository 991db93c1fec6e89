"""AP3000 codec benchmark: our decoder/encoder against hand-written struct code.

Run with ``nox -s bench`` (or ``uv run python benchmarks/bench_ap3000.py``). Every
figure is the best of several timing runs, and every ratio compares two measurements
taken in the same run, so the ratios hold on a noisy shared machine even when the
absolute microseconds move. ``--write FILE`` replaces the AP3000 section of FILE.
"""

from __future__ import annotations

import struct
from functools import partial

from common import TIMING_COLUMNS, Row, bench_main, best_us, markdown_section, measure_codec

from chargeproto import ap3000
from chargeproto.ap3000 import Heartbeat, PortState, PowerHeartbeat, Settlement

HEARTBEAT = bytes.fromhex("444e5910003b37ab0401002198080200000905ee02")
POWER = bytes.fromhex(
    "444e5932003b37ab040a00060101100e300001e803b0042003e80320190901180000130030"
    "3801020304050100e8039808c7015500da08"
)
SETTLEMENT = bytes.fromhex(
    "444e5928003b37ab04010003100ee80330000101000000000120190901180000130030380102030405e8034405"
)

# --- the hand-written baseline: what a careful engineer writes for one frame ------------

_HEAD = struct.Struct("<3sHIHB")


def _check(frame: bytes) -> tuple[int, int, int]:
    magic, length, phy, msg_id, command = _HEAD.unpack_from(frame)
    if magic != b"DNY" or length + 5 != len(frame):
        raise ValueError("bad frame")
    if sum(frame[:-2]) & 0xFFFF != frame[-2] | frame[-1] << 8:
        raise ValueError("bad checksum")
    return phy, msg_id, command


def _temp(raw: int) -> int | None:
    return raw - 65 if raw else None


def hand_decode_heartbeat(frame: bytes) -> Heartbeat:
    phy, msg_id, _ = _check(frame)
    voltage, count = struct.unpack_from("<HB", frame, 12)
    statuses = frame[15 : 15 + count]
    signal, temp = struct.unpack_from("<BB", frame, 15 + count)
    ports = tuple([PortState(i, s) for i, s in enumerate(statuses)])
    return Heartbeat("%08X" % phy, msg_id, voltage / 10, ports, signal, _temp(temp))


_POWER = struct.Struct("<BBHHBHHHH16sHHHHBB")


def hand_decode_power(frame: bytes) -> PowerHeartbeat:
    phy, msg_id, _ = _check(frame)
    (
        port,
        status,
        duration,
        energy,
        mode,
        power,
        pmax,
        pmin,
        pavg,
        order,
        period,
        peak,
        volt,
        cur,
        temp,
        ptemp,
    ) = _POWER.unpack_from(frame, 12)
    return PowerHeartbeat(
        "%08X" % phy,
        msg_id,
        port,
        status,
        duration,
        energy / 100,
        mode,
        power / 10,
        pmax / 10,
        pmin / 10,
        pavg / 10,
        order.hex().upper(),
        period,
        peak / 10,
        volt / 10,
        cur / 1000,
        _temp(temp),
        _temp(ptemp),
    )


_SETTLE = struct.Struct("<HHHBB4sB16sH")


def hand_decode_settlement(frame: bytes) -> Settlement:
    phy, msg_id, _ = _check(frame)
    duration, pmax, energy, port, mode, card, reason, order, second = _SETTLE.unpack_from(frame, 12)
    return Settlement(
        "%08X" % phy,
        msg_id,
        duration,
        pmax / 10,
        energy / 100,
        port,
        mode,
        card.hex().upper(),
        reason,
        order.hex().upper(),
        second / 10,
    )


def _frame(phy: str, msg_id: int, command: int, payload: bytes) -> bytes:
    body = _HEAD.pack(b"DNY", len(payload) + 9, int(phy, 16), msg_id, command) + payload
    return body + struct.pack("<H", sum(body) & 0xFFFF)


def hand_encode_heartbeat(m: Heartbeat) -> bytes:
    n = len(m.ports)
    temp = 0 if m.temperature_c is None else m.temperature_c + 65
    payload = struct.pack(
        f"<HB{n}BBB",
        round(m.voltage_v * 10),
        n,
        *[p.status for p in m.ports],
        m.signal_strength,
        temp,
    )
    return _frame(m.phy_id, m.msg_id, 0x21, payload)


def hand_encode_power(m: PowerHeartbeat) -> bytes:
    payload = _POWER.pack(
        m.port,
        m.status,
        m.duration_s,
        round(m.energy_kwh * 100),
        m.start_mode,
        round(m.power_w * 10),
        round(m.max_power_w * 10),
        round(m.min_power_w * 10),
        round(m.avg_power_w * 10),
        bytes.fromhex(m.order_id),
        m.period_energy_raw,
        round(m.peak_power_w * 10),
        round(m.voltage_v * 10),
        round(m.current_a * 1000),
        0 if m.temperature_c is None else m.temperature_c + 65,
        0 if m.port_temperature_c is None else m.port_temperature_c + 65,
    )  # type: ignore[operator]
    return _frame(m.phy_id, m.msg_id, 0x06, payload)


def hand_encode_settlement(m: Settlement) -> bytes:
    payload = _SETTLE.pack(
        m.duration_s,
        round(m.max_power_w * 10),
        round(m.energy_kwh * 100),
        m.port,
        m.start_mode,
        bytes.fromhex(m.card_id),
        m.stop_reason,
        bytes.fromhex(m.order_id),
        round(m.second_max_power_w * 10),  # type: ignore[operator]
    )
    return _frame(m.phy_id, m.msg_id, 0x03, payload)


# --- measuring -----------------------------------------------------------------------


CASES = [
    ("0x21 heartbeat (2 ports)", HEARTBEAT, hand_decode_heartbeat, hand_encode_heartbeat),
    ("0x06 power heartbeat", POWER, hand_decode_power, hand_encode_power),
    ("0x03 settlement", SETTLEMENT, hand_decode_settlement, hand_encode_settlement),
]


def run(number: int, repeat: int) -> list[Row]:
    rows = []
    for label, frame, hand_decode, hand_encode in CASES:
        ours, row = measure_codec(
            label, frame, ap3000.decode, ap3000.encode, hand_decode, hand_encode, number, repeat
        )
        wire = type(ours).WIRE
        compiled = wire.compile()
        payload = frame[12:-2]
        row["construct_compiled_us"] = best_us(partial(compiled.parse, payload), number, repeat)
        row["construct_interpreted_us"] = best_us(partial(wire.parse, payload), number // 5, repeat)
        rows.append(row)
    return rows


def markdown(rows: list[Row]) -> str:
    method = [
        "header, length and checksum, unpacks with `struct.unpack_from` and builds the same",
        "typed message;",
        "the hand-written encoder packs the same message with `struct.pack`.",
        "The construct columns parse the payload only (no frame, no typed message).",
    ]
    return markdown_section("AP3000 codec", method, [("frame", "case"), *TIMING_COLUMNS], rows)


if __name__ == "__main__":
    bench_main(__doc__, run, markdown, number=20000, repeat=7)
