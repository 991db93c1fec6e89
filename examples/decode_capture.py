"""Decode a captured AP3000 session from a hex dump.

A capture is what one TCP connection carried from the pile: the SIM's ICCID, frames
(split or stuck together however the network delivered them) and `link` keepalives.
Run: uv run python examples/decode_capture.py [capture.txt]
"""

from __future__ import annotations

import sys
from pathlib import Path

from chargeproto import IccidReceived, KeepaliveReceived, MessageReceived, StreamError, ap3000

# ICCID, registration, heartbeat, power heartbeat, settlement, keepalive - as one stream
CAPTURE = """
3839383630343438313631383730303634383135
444e5913003b37ab04b900207e00021421000000e4009104
444e5910003b37ab0401002198080200000905ee02
444e5932003b37ab040a00060101100e300001e803b0042003e8032019090118000013003038010203040501
00e8039808c7015500da08
444e5928003b37ab04010003100ee80330000101000000000120190901180000130030380102030405e8034405
6c696e6b
"""


def main() -> int:
    text = Path(sys.argv[1]).read_text() if len(sys.argv) > 1 else CAPTURE
    data = bytes.fromhex("".join(text.split()))
    decoder = ap3000.Ap3000StreamDecoder()
    errors = 0
    # feed in 7-byte chunks, as a slow network might deliver them
    for start in range(0, len(data), 7):
        for event in decoder.feed(data[start : start + 7]):
            if isinstance(event, MessageReceived):
                msg = event.message
                print(f"{type(msg).__name__:<16} {msg.to_fields()}")
            elif isinstance(event, IccidReceived):
                print(f"{'ICCID':<16} {event.iccid}")
            elif isinstance(event, KeepaliveReceived):
                print(f"{'keepalive':<16} link")
            elif isinstance(event, StreamError):
                errors += 1
                print(f"{'ERROR':<16} {event.error} ({event.raw.hex()})")
    if decoder.buffered:
        print(f"{decoder.buffered} bytes left over at the end of the capture")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
