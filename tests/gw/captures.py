"""Record (or regenerate) the replay corpus in ``fixtures/captures/`` (docs/replay.md).

    uv run --frozen python -m tests.gw.captures [--dsn postgresql://...] [--out DIR] [NAME ...]

Each simulator scenario runs the current gateway on a fresh database with simulated
piles (chargesim), drives it through the HTTP API where a scenario needs the server
to act, then exports the traffic and the resulting state with the gateway's own export
(:func:`chargegw.ops.frames_export.export_frames`), as ``chargegw frames export`` does.
The vendor captures are built from the protocol reference's example frames
(``fixtures/ap3000.json``, ``fixtures/bkv.json``): the device frames, one connection per
device, replayed once with ``--record-baseline`` so that the expected replies are the
gateway's (the vendor's example replies carry other times and ids).

Without ``--dsn`` the server of ``CHARGEGW_TEST_DSN`` is used. Without names, every
capture is written. Review the diff of ``fixtures/captures/`` before committing it: a
changed reply there is a changed behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from chargegw.app import Gateway
from chargegw.capture import Capture, CaptureFrame, header, write_capture
from chargegw.replay.baseline import write_baseline
from chargegw.replay.engine import replay
from chargegw.store.database import migrate
from chargeproto import bkv
from chargesim import Ap3000Intervals, Faults, SimulatedAp3000Pile, Simulator
from chargesim.bkv import BkvIntervals, SimulatedBkvGateway

from .conftest import fresh_database, settings_for
from .waiting import api_client, eventually, eventually_json

ROOT = Path(__file__).resolve().parents[2]
CAPTURES = ROOT / "fixtures" / "captures"
ACCEL = 120.0
PILE = "04000001"
BKV_GATEWAY = "82231214000001"
SOCKET = f"{BKV_GATEWAY}-1"

Scenario = Callable[[Gateway, httpx.AsyncClient], Awaitable[list[str]]]


async def _known(gateway: Gateway, device: str) -> None:
    """Until ``device`` is stored and connected here."""

    async def stored() -> bool:
        await gateway.writer.drained()
        assert gateway.pool is not None
        row = await gateway.pool.fetchval("SELECT 1 FROM devices WHERE device_id = $1", device)
        return bool(row) and gateway.sessions.link_of(device) is not None

    await eventually(stored, what=f"{device} connected and stored", timeout=20)


async def _order(api: httpx.AsyncClient, device: str, port: int, body: dict[str, Any]) -> str:
    response = await api.post(f"/api/v1/devices/{device}/ports/{port}/start", json=body)
    assert response.status_code == 202, response.text
    order_no: str = response.json()["order_no"]
    return order_no


async def _settled(api: httpx.AsyncClient, order_no: str) -> None:
    await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"}, timeout=60)


def _simulator(gateway: Gateway, *piles: Any) -> Simulator:
    return Simulator("127.0.0.1", gateway.server.port, list(piles), accel=ACCEL, jitter=0, seed=1)


async def ap3000_session(gateway: Gateway, api: httpx.AsyncClient) -> list[str]:
    """An AP3000 pile: ICCID, registration, time, heartbeats; a start by time from the
    API that runs to its limit and settles; a start until full stopped from the API."""
    pile = SimulatedAp3000Pile(PILE, ports=2, heartbeat_s=180)
    async with _simulator(gateway, pile):
        await _known(gateway, PILE)
        await _settled(api, await _order(api, PILE, 1, {"mode": "time", "duration_min": 2}))
        full = await _order(api, PILE, 2, {"mode": "full"})
        await eventually_json(api, f"/api/v1/orders/{full}", "status", {"charging"})
        response = await api.post(f"/api/v1/devices/{PILE}/ports/2/stop")
        assert response.status_code == 202, response.text
        await _settled(api, full)
    return [PILE]


async def ap3000_local_and_card(gateway: Gateway, api: httpx.AsyncClient) -> list[str]:
    """An AP3000 pile: a session started at the pile (coin/button) by energy with 0x06
    progress and its settlement, and a card swipe (the card number is masked)."""
    pile = SimulatedAp3000Pile(
        PILE, ports=2, heartbeat_s=180, intervals=Ap3000Intervals(power_heartbeat_s=30)
    )
    async with _simulator(gateway, pile):
        await _known(gateway, PILE)
        await pile.swipe_card(1, "1A2B3C4D")
        await eventually(lambda: pile.swipe_replies, what="the card swipe answered")
        assert pile.start_local(0, duration_s=120) is not None
        await eventually(lambda: pile.ledger and pile.ledger[-1].acked, what="local settled")
    return [PILE]


async def ap3000_faults(gateway: Gateway, api: httpx.AsyncClient) -> list[str]:
    """Simulator faults on AP3000: garbage before every frame (the gateway resynchronises
    and records the garbage as errors) and a lost settlement ACK (the pile resends the
    settlement; the gateway acknowledges the copy without settling twice)."""
    pile = SimulatedAp3000Pile(
        PILE,
        ports=2,
        heartbeat_s=180,
        faults=Faults(garbage=3, lose_acks=1.0),
        intervals=Ap3000Intervals(settlement_resend_s=60),
    )
    async with _simulator(gateway, pile):
        await _known(gateway, PILE)
        await _settled(api, await _order(api, PILE, 1, {"mode": "time", "duration_min": 1}))
        await eventually(lambda: len(pile.sent(0x03)) >= 2, what="the settlement resent")
        pile.faults.lose_acks = 0.0
        await eventually(lambda: pile.ledger and pile.ledger[-1].acked, what="an ACK kept")
    return [PILE]


async def bkv_session(gateway: Gateway, api: httpx.AsyncClient) -> list[str]:
    """A BKV gateway with one socket: heartbeat, the 0x1013 container and status
    clusters real gateways send after connecting (bkv.md 15); a start by time from the
    API that runs to its end report, acknowledged in the 0x0C form."""
    box = SimulatedBkvGateway(
        BKV_GATEWAY,
        sockets=1,
        heartbeat_s=600,
        intervals=BkvIntervals(status_s=60, end_report_resend_s=60),
    )
    async with _simulator(gateway, box):
        await _known(gateway, SOCKET)
        await _settled(api, await _order(api, SOCKET, 1, {"mode": "time", "duration_min": 2}))
    return [BKV_GATEWAY, SOCKET]


async def bkv_faults(gateway: Gateway, api: httpx.AsyncClient) -> list[str]:
    """BKV field behaviour under faults: a session started at the socket whose end
    report's first ACK is lost, so the gateway resends it with other live readings
    (bkv.md 15) until acknowledged."""
    box = SimulatedBkvGateway(
        BKV_GATEWAY,
        sockets=1,
        heartbeat_s=600,
        faults=Faults(lose_acks=1.0, resend_changed_readings=1.0),
        intervals=BkvIntervals(status_s=60, end_report_resend_s=30, end_report_resends=None),
    )
    async with _simulator(gateway, box):
        await _known(gateway, SOCKET)
        assert box.start_local(1, 0, duration_min=2) is not None
        await eventually(
            lambda: len(box.sent_messages(bkv.EndReport)) >= 2, what="the end report resent"
        )
        box.faults.lose_acks = 0.0
        await eventually(lambda: box.bkv_stats.end_reports_acked >= 1, what="an ACK kept")
    return [BKV_GATEWAY, SOCKET]


SCENARIOS: dict[str, Scenario] = {
    "ap3000_session": ap3000_session,
    "ap3000_local_and_card": ap3000_local_and_card,
    "ap3000_faults": ap3000_faults,
    "bkv_session": bkv_session,
    "bkv_faults": bkv_faults,
}


async def record(name: str, scenario: Scenario, server_dsn: str, out: Path) -> int:
    """Run ``scenario`` on a fresh gateway and write its capture; frames written."""
    from chargegw.ops.frames_export import export_frames

    async with fresh_database(server_dsn, "chargegw_capture") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        gateway = Gateway(settings_for(dsn, ack_timeout_s=1.0, command_spacing_s=0.2))
        since = datetime.now(UTC) - timedelta(seconds=1)
        await gateway.start(http=False)
        try:
            async with api_client(gateway) as api:
                devices = await scenario(gateway, api)
            await gateway.writer.drained()
        finally:
            await gateway.stop()
        conn = await asyncpg.connect(dsn)
        try:
            frames, state = await export_frames(
                conn, device_ids=devices, since=since, until=datetime.now(UTC)
            )
        finally:
            await conn.close()
    head = header("tests/gw/captures.py", scenario=name, description=_doc(scenario))
    with open(out, "w", encoding="utf-8") as handle:
        return write_capture(handle, frames, head=head, state=state)


def _doc(scenario: Scenario) -> str:
    return " ".join((scenario.__doc__ or "").split())


def vendor_frames(path: Path, protocol: str) -> list[CaptureFrame]:
    """The valid device frames of a vendor example file, one connection per device."""
    from chargeproto import ap3000, bkv

    at = datetime(2024, 5, 1, tzinfo=UTC)
    frames = []
    for index, example in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        if not example.get("valid") or example.get("direction") not in ("up", None):
            continue
        raw = bytes.fromhex(example["hex"])
        try:
            message = ap3000.decode(raw, "up") if protocol == "ap3000" else bkv.decode(raw)
        except Exception:  # an example the codec refuses is not device traffic to replay
            continue
        device = str(getattr(message, "phy_id", None) or getattr(message, "gateway_id", ""))
        frames.append(
            CaptureFrame(
                at=at + timedelta(seconds=index),
                direction="in",
                connection=f"vendor-{device}",
                protocol=protocol,
                hex=raw.hex(),
                device_id=device,
                command=example.get("command"),
            )
        )
    return frames


async def record_vendor(protocol: str, server_dsn: str, out: Path) -> int:
    """A capture of the vendor example frames, its replies recorded from the gateway."""
    source = ROOT / "fixtures" / f"{protocol}.json"
    capture = Capture(
        frames=vendor_frames(source, protocol),
        header=header(
            "tests/gw/captures.py",
            scenario=f"vendor_{protocol}",
            description=f"the device frames of the vendor examples in fixtures/{protocol}.json",
        ),
    )
    report = await replay(capture, dsn=server_dsn, source=str(out))
    return write_baseline(out, capture, report)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("CHARGEGW_TEST_DSN"))
    parser.add_argument(
        "--out", type=Path, default=CAPTURES, help="directory (default: %(default)s)"
    )
    parser.add_argument("names", nargs="*", help="captures to write (default: all)")
    args = parser.parse_args(argv)
    if not args.dsn:
        parser.error("give --dsn or set CHARGEGW_TEST_DSN")
    known = [*SCENARIOS, "vendor_ap3000", "vendor_bkv"]
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        parser.error(f"unknown capture(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if any(name in SCENARIOS for name in args.names or known):
        try:
            import chargegw.ops.frames_export  # noqa: F401
        except ImportError:
            parser.error("the simulator captures need chargegw.ops.frames_export")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or known:
        out = args.out / f"{name}.jsonl"
        if name in SCENARIOS:
            count = await record(name, SCENARIOS[name], args.dsn, out)
        else:
            count = await record_vendor(name.removeprefix("vendor_"), args.dsn, out)
        print(f"{out}: {count} frames")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
