"""Craft a start-charging frame (0x82) for a pile, and read its reply.

Run: uv run python examples/craft_start.py 04CEAA40 1 3600
(physical id from the pile's sticker or frames, human port number, seconds)
"""

from __future__ import annotations

import secrets
import sys

from chargeproto import ap3000


def start_frame(phy_id: str, human_port: int, seconds: int, msg_id: int = 1) -> bytes:
    """A 0x82 start: time mode, charge for ``seconds`` (0 = until full)."""
    order_id = secrets.token_hex(16).upper()  # any 16 bytes; the pile echoes them
    message = ap3000.ChargeControl(
        phy_id=phy_id,
        msg_id=msg_id,
        rate_mode=0,  # time-based
        balance_or_expiry=0,  # only used for the voice prompt
        port=human_port - 1,  # the wire counts ports from 0
        charge_command=1,  # 1 = start, 0 = stop
        charge_limit=seconds,
        order_id=order_id,
        max_charge_duration_s=0,  # 0 = the pile's own setting
        overload_power_w=0.0,
    )
    return ap3000.encode(message)


def main() -> None:
    phy_id = sys.argv[1] if len(sys.argv) > 1 else "04CEAA40"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    seconds = int(sys.argv[3]) if len(sys.argv) > 3 else 3600
    frame = start_frame(phy_id, port, seconds)
    print("send:", frame.hex())
    print("      ", ap3000.decode(frame, "down").to_fields())
    # what a pile answers when the port is empty (result 1), with the same msg id
    sent = ap3000.decode(frame, "down")
    assert isinstance(sent, ap3000.ChargeControl)
    reply = ap3000.encode(
        ap3000.ChargeControlReply(
            phy_id=phy_id, msg_id=sent.msg_id, result=1, order_id=sent.order_id, port=sent.port,
            waiting_ports=0,
        )
    )
    decoded = ap3000.decode(reply, "up")
    print("reply:", reply.hex())
    print("      ", decoded.to_fields())


if __name__ == "__main__":
    main()
