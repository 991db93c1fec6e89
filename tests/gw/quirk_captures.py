"""The captures that prove the shipped quirk profiles (``fixtures/captures/quirks/``).

    uv run --frozen python -m tests.gw.quirk_captures

Each capture holds the device side of one connection (``in`` frames, in the capture
format of :mod:`chargegw.capture`), built from the hex the protocol reference quotes
(the vendor examples of ``fixtures/ap3000.json`` / ``fixtures/bkv.json``) or with
chargeproto's encoders where the field note describes a frame without quoting it.
tests/gw/test_quirks.py feeds them to a gateway and checks each profile's effect.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

from chargegw.capture import CaptureFrame, header, write_capture
from chargegw.quirks import DEFAULT_PROFILES
from chargeproto import bkv

ROOT = Path(__file__).resolve().parents[2]
QUIRK_CAPTURES = ROOT / "fixtures" / "captures" / "quirks"
START = datetime(2024, 5, 1, tzinfo=UTC)
#: the AP3000 pile of the vendor examples
PILE = "04AB373B"
#: the BKV gateway of the vendor examples
BKV_GATEWAY = "82200520004869"


def _vector(protocol: str, name: str) -> str:
    vectors = json.loads((ROOT / "fixtures" / f"{protocol}.json").read_text())
    return str(next(v["hex"] for v in vectors if v["name"] == name))


def _dny(phy_id: str, msg_id: int, command: int, payload: bytes) -> bytes:
    """An AP3000 frame with any payload (the encoders build only declared layouts)."""
    body = bytes.fromhex(phy_id)[::-1] + struct.pack("<H", msg_id) + bytes([command]) + payload
    data = b"DNY" + struct.pack("<H", len(body) + 2) + body
    return data + struct.pack("<H", sum(data) & 0xFFFF)


def _frames(protocol: str, device: str, items: list[tuple[str, str]]) -> list[CaptureFrame]:
    return [
        CaptureFrame(
            at=START + timedelta(seconds=2 * n),
            direction="in",
            connection=f"quirk-{device}",
            protocol=protocol,
            hex=hex_,
            device_id=device,
            command=command,
        )
        for n, (command, hex_) in enumerate(items)
    ]


def captures() -> dict[str, list[CaptureFrame]]:
    """File name -> frames of every quirk capture."""
    connect_report = bkv.TlvContainer(
        BKV_GATEWAY,
        0,
        bkv_seq=0,
        bkv_gateway_id=BKV_GATEWAY,
        bkv_cmd=0x1013,
        raw_items=(
            bkv.TlvItem(0x4A, "01"),  # socket 1
            bkv.TlvItem(0x08, "7F"),  # all ports
            bkv.TlvItem(0x06, "20240501080000"),  # the gateway's clock, BCD
            bkv.TlvItem(0x5A, "0000"),  # meaning unknown
        ),
    )
    registration = _vector("ap3000", "ap3000_0x20_register")
    return {
        "ap3000_short_charge_reply.jsonl": _frames(
            "ap3000",
            PILE,
            [
                ("0x20", registration),
                ("0x82", _dny(PILE, 0x0101, 0x82, bytes([0x00, 0x01])).hex()),
            ],
        ),
        "ap3000_registration_trailing_bytes.jsonl": _frames(
            "ap3000", PILE, [("0x20", registration)]
        ),
        "ap3000_legacy_heartbeat.jsonl": _frames(
            "ap3000",
            PILE,
            [
                ("0x01", _vector("ap3000", "ap3000_0x01_heartbeat_legacy")),
                ("0x22", _vector("ap3000", "ap3000_0x22_get_time")),
            ],
        ),
        "bkv_connect_report_0x1013.jsonl": _frames(
            "bkv",
            BKV_GATEWAY,
            [
                ("0x0000", _vector("bkv", "bkv_0x0000_heartbeat")),
                ("0x1000/0x1013", bkv.encode(connect_report).hex()),
            ],
        ),
    }


def main() -> None:
    """Write every quirk capture."""
    QUIRK_CAPTURES.mkdir(parents=True, exist_ok=True)
    proves = {p.capture: p.name for p in DEFAULT_PROFILES}
    for name, frames in captures().items():
        head = header(
            "tests/gw/quirk_captures.py",
            created_at="2024-05-01T00:00:00+00:00",
            description=f"the device frames that prove the quirk profile {proves[name]}",
            quirk_profile=proves[name],
        )
        with (QUIRK_CAPTURES / name).open("w", encoding="utf-8") as out:
            write_capture(out, frames, head=head)


if __name__ == "__main__":
    main()
