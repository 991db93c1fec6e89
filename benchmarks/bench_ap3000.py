"""AP3000 codec benchmark: our decoder/encoder against hand-written struct code.

Run with ``nox -s bench`` (or ``uv run python benchmarks/bench_ap3000.py``). Every
figure is the best of several timing runs, and every ratio compares two measurements
taken in the same run, so the ratios hold on a noisy shared machine even when the
absolute microseconds move. ``--write FILE`` replaces the AP3000 section of FILE.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import struct
from functools import partial
from pathlib import Path

import construct
from common import best_us, machine_name, paired_best_us, write_section

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


def run(number: int, repeat: int) -> list[dict[str, object]]:
    rows = []
    for label, frame, hand_decode, hand_encode in CASES:
        ours = ap3000.decode(frame)
        assert hand_decode(frame) == ours, label
        assert hand_encode(ours) == frame == ap3000.encode(ours), label
        cls = type(ours)
        compiled = cls.WIRE.compile()
        payload = frame[12:-2]
        decode_ours, decode_hand = paired_best_us(
            partial(ap3000.decode, frame), partial(hand_decode, frame), number, repeat
        )
        encode_ours, encode_hand = paired_best_us(
            partial(ap3000.encode, ours), partial(hand_encode, ours), number, repeat
        )
        construct_compiled = best_us(partial(compiled.parse, payload), number, repeat)
        construct_interp = best_us(partial(cls.WIRE.parse, payload), number // 5, repeat)
        rows.append(
            {
                "case": label,
                "decode_us": decode_ours,
                "hand_decode_us": decode_hand,
                "decode_ratio": decode_ours / decode_hand,
                "encode_us": encode_ours,
                "hand_encode_us": encode_hand,
                "encode_ratio": encode_ours / encode_hand,
                "construct_compiled_us": construct_compiled,
                "construct_interpreted_us": construct_interp,
            }
        )
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    when = datetime.date.today().isoformat()
    machine = f"{machine_name()}, Python {platform.python_version()}"
    out = [
        "## AP3000 codec",
        "",
        f"Measured {when} on {machine} ({construct.version_string} for the construct columns),",
        "`nox -s bench`. Microseconds per frame, best of the timing runs; a ratio compares",
        "two figures of the same run, timed interleaved. The hand-written decoder checks",
        "header, length and checksum, unpacks with `struct.unpack_from` and builds the same",
        "typed message;",
        "the hand-written encoder packs the same message with `struct.pack`.",
        "The construct columns parse the payload only (no frame, no typed message).",
        "",
        "| frame | decode us | hand us | ratio | encode us | hand us | ratio |"
        " construct compiled us | construct interpreted us |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['decode_us']:.2f} | {r['hand_decode_us']:.2f} |"
            f" **{r['decode_ratio']:.2f}x** | {r['encode_us']:.2f} | {r['hand_encode_us']:.2f} |"
            f" **{r['encode_ratio']:.2f}x** | {r['construct_compiled_us']:.2f} |"
            f" {r['construct_interpreted_us']:.2f} |"
        )
    out += ["", "Target: decode and encode within 3x of the hand-written code.", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--write", type=Path, help="update this markdown file")
    args = parser.parse_args()
    rows = run(args.number, args.repeat)
    section = markdown(rows)
    print(section)
    if args.write:
        write_section(args.write, section)
    worst = max(max(float(r["decode_ratio"]), float(r["encode_ratio"])) for r in rows)  # type: ignore[arg-type]
    print(f"worst ratio {worst:.2f}x (target 3x)")


if __name__ == "__main__":
    main()
