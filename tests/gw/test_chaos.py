"""The chaos run (docs/chaos.md): the simulator's fault switches and ledger against a tiny
server, the invariant checks on hand-made states, and a 60 s chaos profile against a
real `chargegw serve --workers 3` that fails on any invariant violation."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chargeproto import ABSENT, Message, ap3000, bkv
from chargesim import (
    Ap3000Intervals,
    BkvIntervals,
    Faults,
    LedgerEntry,
    SimulatedAp3000Pile,
    SimulatedBkvGateway,
    Simulator,
    bkv_gateway_id,
)
from chargesim.chaos import ChaosOptions, run_chaos
from chargesim.chaos.checks import DbState, SimSnapshot, check_all
from chargesim.chaos.driver import ApiCall
from chargesim.chaos.faults import plan

from .test_sim_bkv import TinyServer
from .waiting import eventually

PHY = "04000001"
CARD = "0A1B2C3D"


class Server(TinyServer):
    """The BKV test server, also answering AP3000 settlements and card swipes (a swipe
    is accepted and followed by a 0x82 start for its port)."""

    def __init__(self) -> None:
        super().__init__()
        self.swipe_order = "C" * 32

    def _reply(self, m: Message) -> Message | None:
        if isinstance(m, ap3000.Settlement):
            return ap3000.SettlementReply(m.phy_id, m.msg_id, result=0)
        if isinstance(m, ap3000.CardSwipe):
            start = ap3000.ChargeControl(
                m.phy_id,
                0x7777,
                rate_mode=0,
                balance_or_expiry=500,
                port=m.port,
                charge_command=1,
                charge_limit=120,
                order_id=self.swipe_order,
            )
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, self._send_ap3000, m.phy_id, start)
            return ap3000.CardSwipeReply(
                m.phy_id,
                m.msg_id,
                card_id=m.card_id,
                account_status=0,
                rate_mode=0,
                balance_or_expiry=500,
                port=m.port,
            )
        return super()._reply(m)

    def _send_ap3000(self, device: str, message: ap3000.Ap3000Message) -> None:
        self._by_device[device].writer.write(ap3000.encode(message))


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    await srv.start()
    yield srv
    await srv.close()


def simulator(server: Server, *piles: Any) -> Simulator:
    return Simulator(
        "127.0.0.1", server.port, piles, accel=60, jitter=0, seed=7, reconnect_min_s=0.1
    )


def ap3000_pile(**options: Any) -> SimulatedAp3000Pile:
    intervals = Ap3000Intervals(
        power_heartbeat_s=60, settlement_delay_s=6, settlement_resend_s=60, settlement_gap_s=6
    )
    return SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=60, intervals=intervals, **options)


def bkv_gateway(**options: Any) -> SimulatedBkvGateway:
    intervals = BkvIntervals(status_s=60, end_report_resend_s=30, end_report_resends=None)
    return SimulatedBkvGateway(
        bkv_gateway_id(1), sockets=2, heartbeat_s=30, intervals=intervals, **options
    )


# --- the simulator's switches and ledger ---------------------------------------------------


def test_fault_rolls_are_fixed_by_seed_and_event() -> None:
    a, b = ap3000_pile(), ap3000_pile()
    a.seed = b.seed = "1:04000001"
    assert a.roll("ack", "X", 1) == b.roll("ack", "X", 1)
    assert a.roll("ack", "X", 1) != a.roll("ack", "X", 2)
    b.seed = "2:04000001"
    assert a.roll("ack", "X", 1) != b.roll("ack", "X", 1)
    assert not a.chance(0.0, "anything") and a.chance(1.0, "anything")


async def test_ap3000_device_start_is_settled_and_in_the_ledger(server: Server) -> None:
    pile = ap3000_pile()
    async with simulator(server, pile) as sim:
        await sim.wait_connected(timeout=5)
        session = pile.start_local(1, duration_s=120)  # 2 s real
        assert session is not None and pile.start_local(1) is None  # busy now
        assert pile.charging() == {(PHY, 2)} == sim.charging()
        await eventually(lambda: pile.ledger and pile.ledger[0].acked)
    entry = pile.ledger[0]
    assert (entry.device_id, entry.port, entry.started_by) == (PHY, 2, "device")
    assert entry.order_id == session.order_id and len(entry.order_id) == 32
    assert entry.duration_s == 120 and entry.copies_sent == 1 and not pile.unacknowledged()
    settlement = entry.report
    assert isinstance(settlement, ap3000.Settlement)
    assert settlement.start_mode == 3 and settlement.energy_kwh == entry.energy_kwh
    assert all(m.start_mode == 3 for _, m in server.messages(PHY, ap3000.PowerHeartbeat))
    assert pile.device_ids() == [PHY] and not pile.charging()


async def test_ap3000_lost_acks_make_the_pile_resend_until_switched_off(server: Server) -> None:
    pile = ap3000_pile(faults=Faults(lose_acks=1.0))
    async with simulator(server, pile) as sim:
        await sim.wait_connected(timeout=5)
        pile.start_local(0, duration_s=60)
        await eventually(lambda: pile.ledger and pile.ledger[0].acks_lost >= 2)
        entry = pile.ledger[0]
        assert not entry.acked and pile.unacknowledged() == [entry]
        assert pile.stats.acks_lost == entry.acks_lost
        pile.faults.lose_acks = 0.0  # switched at run time
        await eventually(lambda: entry.acked)
    assert entry.copies_sent == entry.acks_lost + 1
    copies = server.messages(PHY, ap3000.Settlement)
    assert len({m.msg_id for _, m in copies}) == 1  # resends keep the msg id


async def test_ap3000_card_swipe_becomes_a_card_start(server: Server) -> None:
    pile = ap3000_pile()
    async with simulator(server, pile) as sim:
        await sim.wait_connected(timeout=5)
        assert await pile.swipe_card(0, CARD.lower())
        await eventually(lambda: pile.ledger and pile.ledger[0].acked)
    assert pile.swipe_replies[0].account_status == 0
    entry = pile.ledger[0]
    assert (entry.started_by, entry.card_id, entry.order_id) == ("server", CARD, "C" * 32)
    assert isinstance(entry.report, ap3000.Settlement)
    assert (entry.report.start_mode, entry.report.card_id) == (0, CARD)


async def test_bkv_fee_report_without_tag_0x0a_and_resends_with_other_readings(
    server: Server,
) -> None:
    server.ack_end_after = 3  # the first two copies go unanswered: resends
    box = bkv_gateway(faults=Faults(omit_optional_tags=1.0, resend_changed_readings=1.0))
    async with simulator(server, box) as sim:
        await sim.wait_connected(timeout=5)
        session = box.start_local(2, 1, amount_cent=1)
        assert session is not None and session.started_by == "device"
        assert box.charging() == {(f"{box.gateway_id}-2", 2)}
        await eventually(lambda: box.ledger and box.ledger[0].acked, timeout=15)
    entry = box.ledger[0]
    assert (entry.device_id, entry.port, entry.business_no) == (f"{box.gateway_id}-2", 2, 1)
    assert entry.tag_omitted and entry.copies_sent == 3 and entry.copies_changed == 2
    copies = [m for _, m in server.messages(box.gateway_id, bkv.FeeModeEndReport)]
    assert len(copies) == 3 and all(m.business_no is ABSENT for m in copies)
    session_values = {
        (
            m.socket,
            m.port,
            m.duration_min,
            m.energy_kwh,
            m.end_time,
            m.electricity_fee_cent,
            m.service_fee_cent,
        )
        for m in copies
    }
    assert len(session_values) == 1
    first = (copies[0].temperature_c, copies[0].power_w)
    assert all((m.temperature_c, m.power_w) != first for m in copies[1:])  # resends differ


async def test_bkv_time_report_resends_change_temperature_and_signal_only(
    server: Server,
) -> None:
    server.ack_end_after = 2
    box = bkv_gateway(faults=Faults(resend_changed_readings=1.0))
    async with simulator(server, box) as sim:
        await sim.wait_connected(timeout=5)
        box.start_local(1, 0, duration_min=1)
        await eventually(lambda: box.ledger and box.ledger[0].acked, timeout=15)
    first, second = [m for _, m in server.messages(box.gateway_id, bkv.EndReport)]
    assert first.business_no == second.business_no == box.ledger[0].business_no
    assert (first.energy_kwh, first.duration_min) == (second.energy_kwh, second.duration_min)
    assert (first.temperature_c, first.signal_strength) != (
        second.temperature_c,
        second.signal_strength,
    )
    assert box.ledger[0].duration_s == first.duration_min * 60


def test_fault_schedule_never_overlaps_database_faults() -> None:
    for seed in range(20):
        schedule = plan(("kill", "outage", "readonly"), 540.0, random.Random(seed))
        db = [p for p in schedule if p.kind != "kill"]
        assert db and any(p.kind == "kill" for p in schedule)
        for a, b in itertools.pairwise(db):
            assert a.at + a.length <= b.at
        assert all(p.at >= 54.0 and p.at + p.length <= 532.0 for p in schedule)


# --- the checks on hand-made states ----------------------------------------------------------


GATEWAY = "82231214000001"
END_TIME = "2026-12-03T23:45:49"


def _bkv_entry(business_no: int, *, acked: bool = True, fee: bool = False) -> LedgerEntry:
    report: Message
    if fee:  # a 0x1004 report that left tag 0x0A out
        report = bkv.FeeModeEndReport.create(
            GATEWAY, 0, socket=1, port=0, energy_kwh=0.05, duration_min=3, end_time=END_TIME
        )
    else:
        report = bkv.EndReport(
            GATEWAY,
            0,
            socket=1,
            firmware_version=1,
            temperature_c=30,
            signal_strength=20,
            port=0,
            status_bits=0xB0,
            business_no=business_no,
            power_w=0.0,
            current_a=0.0,
            energy_kwh=0.05,
            duration_min=3,
        )
    return LedgerEntry(
        "bkv",
        f"{GATEWAY}-1",
        1,
        "server",
        0.05,
        180,
        0.0,
        time.time(),
        "limit",
        business_no=business_no,
        report=report,
        tag_omitted=fee,
        acked_at=time.time() if acked else None,
    )


def _fields(business_no: int | None, **more: Any) -> dict[str, Any]:
    """Settlement fields as the gateway stores them (an EndReport's, or with ``more``)."""
    fields = {"port": 0, "energy_kwh": 0.05, "duration_min": 3, **more}
    if "bkv_cmd" not in more:
        fields["sub_cmd"] = 2
    if business_no is not None:
        fields["business_no"] = business_no
    return fields


def _order(
    order_no: str, status: str, number: int | None, settlement: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "order_no": order_no,
        "device_id": f"{GATEWAY}-1",
        "port": 1,
        "protocol": "bkv",
        "status": status,
        "business_no": number,
        "created_at": None,
        "ended_at": None,
        "energy_kwh": 0.05,
        "duration_s": 180,
        "device_initiated": False,
        "failure_reason": None,
        "settlement": settlement,
    }


def _applied(detail: dict[str, Any]) -> dict[str, Any]:
    return {"device_id": f"{GATEWAY}-1", "reason": "applied", "detail": detail}


def _state(orders: list[dict[str, Any]], events: list[dict[str, Any]] | None = None) -> DbState:
    return DbState([], orders, events or [], {}, [], [], {})


def _snapshot(ledger: list[LedgerEntry]) -> SimSnapshot:
    return SimSnapshot(ledger, {}, {}, [], ports=2)


def _violations(results: Any) -> dict[str, int]:
    return {r.key: len(r.violations) for r in results if r.violations}


def test_checks_pass_one_settlement_per_session() -> None:
    orders = [_order("A", "settled", 7, _fields(7))]
    state = _state(orders, [_applied(_fields(7))])
    assert _violations(check_all(_snapshot([_bkv_entry(7)]), state, [])) == {}


def test_checks_find_a_resend_with_other_readings_settled_again() -> None:
    resend = _fields(7, temperature_c=33)
    orders = [_order("A", "settled", 7, _fields(7)), _order("B", "settled", 7, resend)]
    state = _state(orders, [_applied(_fields(7)), _applied(resend)])
    found = _violations(check_all(_snapshot([_bkv_entry(7)]), state, []))
    assert found == {"b": 1, "f": 2}  # two orders; settled twice, applied twice


def test_checks_find_an_order_left_open_by_a_report_without_its_tag() -> None:
    fee = _fields(None, bkv_cmd=0x1004, end_time=END_TIME)
    orders = [_order("A", "charging", 7), _order("B", "settled", None, fee)]
    ledger = [_bkv_entry(7, fee=True), _bkv_entry(8, acked=False)]
    found = _violations(check_all(_snapshot(ledger), _state(orders), []))
    assert found == {"b": 1, "c": 1, "q": 1}


def test_checks_do_not_take_another_session_with_equal_values_for_a_double() -> None:
    fee = _fields(None, bkv_cmd=0x1004, end_time=END_TIME)  # the second session's order
    orders = [_order("A", "settled", 7, _fields(7)), _order("B", "settled", None, fee)]
    ledger = [_bkv_entry(7), _bkv_entry(8, fee=True)]
    assert _violations(check_all(_snapshot(ledger), _state(orders), [])) == {}


def test_checks_find_a_command_dead_offline_while_its_pile_was_connected() -> None:
    now = time.time()
    created = dt.datetime.fromtimestamp(now - 100, dt.UTC)
    command = {
        "command_id": 1,
        "device_id": PHY,
        "name": "start",
        "status": "dead",
        "order_no": None,
        "correlation": None,
        "attempts": 0,
        "created_at": created,
        "sent_at": None,
        "finished_at": created + dt.timedelta(seconds=60),
        "expires_at": created + dt.timedelta(seconds=60),
        "result_code": None,
        "result_text": None,
        "dead_reason": "offline",
    }
    state = DbState([command], [], [], {}, [], [], {})
    snapshot = SimSnapshot([], {}, {}, [], ports=0, spans={PHY: [(now - 200, None)]})
    assert _violations(check_all(snapshot, state, [])) == {"j": 1}
    # the database was away for all but 10 s of it: the platform had no chance
    outage = [(now - 95, now - 30)]
    assert _violations(check_all(snapshot, state, [], outage)) == {}
    # or the pile came back only 10 s before the command died
    snapshot.spans[PHY] = [(now - 200, now - 99), (now - 50, None)]
    assert _violations(check_all(snapshot, state, [])) == {}


def test_checks_find_an_accepted_command_that_is_not_in_the_database() -> None:
    call = ApiCall(
        "api_start",
        "POST",
        "/api/v1/devices/X/ports/1/start",
        time.time(),
        status=202,
        body={"order_no": "N", "command_id": 5},
    )
    found = _violations(check_all(_snapshot([]), _state([]), [call]))
    assert found == {"a": 2}


# --- the 60 s chaos profile ------------------------------------------------------------------


async def test_chaos_profile_keeps_every_invariant(pg_server_dsn: str, tmp_path: Any) -> None:
    """60 s of chaos with every fault kind on 100 piles, 3 workers; fails on any
    violation with the invariant table (and the violations) in the message."""
    opts = ChaosOptions(
        duration_s=60.0,
        piles=100,
        seed=3,
        activity=3.0,
        quiet_timeout_s=45.0,
        dsn=pg_server_dsn,
        report=str(tmp_path / "chaos-report.json"),
        log_dir=str(tmp_path),
        status_every_s=30.0,
    )
    result = await run_chaos(opts)
    violations = result.violations
    assert violations == 0, "the chaos run found violations\n" + result.text()
