"""Every change of state records its cause: sessions over real TCP with the simulator
and the real database, the frame ids given in-process, and the writer's coalescing."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from chargegw.api.guard import Guard, HttpLimits
from chargegw.app import Gateway
from chargegw.causes import Cause, using
from chargegw.metrics import Metrics
from chargegw.store.causes import FrameIds
from chargegw.store.writer import BatchWriter, PortRow
from chargesim import Faults, SimulatedAp3000Pile, Simulator
from chargesim.bkv import BkvIntervals, SimulatedBkvGateway

from .waiting import api_client, eventually, eventually_json

PHY = "04000001"
GW = "82231214000001"
SOCKET = f"{GW}-1"
#: the event types whose every row must name its cause
CAUSED = ("port.status_changed", "device.online", "device.offline")
CAUSED_PREFIXES = ("order.", "command.")


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.2}


@pytest.fixture
async def api(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway's API with its calls audited (as ``serve`` runs it)."""
    guard = Guard(HttpLimits(), audit=gateway.call_audit)
    async with api_client(gateway, guard=guard) as client:
        yield client


async def _connected(gateway: Gateway, device_id: str) -> bool:
    await gateway.writer.drained()
    assert gateway.pool is not None
    known = await gateway.pool.fetchval("SELECT 1 FROM devices WHERE device_id = $1", device_id)
    return bool(known) and gateway.sessions.link_of(device_id) is not None


async def _ap3000(gateway: Gateway, **options: Any) -> Simulator:
    pile = SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180, **options)
    sim = Simulator("127.0.0.1", gateway.server.port, [pile], accel=120.0, jitter=0, seed=1)
    await sim.start()
    await sim.wait_connected(1, timeout=10)
    await eventually(lambda: _connected(gateway, PHY), what=f"{PHY} connected")
    return sim


async def _events(pool: asyncpg.Pool, device_id: str) -> list[asyncpg.Record]:
    """The device's events, each with the frame its cause names (NULL columns if none)."""
    rows: list[asyncpg.Record] = await pool.fetch(
        """SELECT e.pk, e.type, e.order_no, e.command_id, e.cause_kind, e.cause_ref, e.frame_id,
                  f.id AS f_id, f.direction AS f_direction, f.command AS f_command,
                  f.device_id AS f_device
           FROM events e LEFT JOIN frames f ON f.id = e.frame_id
           WHERE e.device_id = $1 ORDER BY e.pk""",
        device_id,
    )
    return rows


def _one(events: list[asyncpg.Record], type_: str, **match: Any) -> asyncpg.Record:
    found = [e for e in events if e["type"] == type_ and all(e[k] == v for k, v in match.items())]
    assert len(found) == 1, (type_, match, [dict(e) for e in events])
    return found[0]


def _assert_all_caused(events: list[asyncpg.Record]) -> None:
    """Every state change names a cause; a frame cause an existing frame of the device."""
    for event in events:
        if event["type"] not in CAUSED and not event["type"].startswith(CAUSED_PREFIXES):
            continue
        if event["type"] == "order.progress":
            continue  # not a change of state (it has the report's frame anyway)
        assert event["cause_kind"] in ("frame", "api", "timer", "fault", "system"), dict(event)
        if event["cause_kind"] == "frame":
            assert event["frame_id"] is not None and event["f_id"] == event["frame_id"], dict(event)
        else:
            assert event["frame_id"] is None and event["cause_ref"], dict(event)


def _frame(event: asyncpg.Record, direction: str) -> None:
    assert event["cause_kind"] == "frame" and event["f_direction"] == direction, dict(event)


async def _settled_quietly(gateway: Gateway, api: httpx.AsyncClient, order_no: str) -> None:
    await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"}, timeout=20)
    await gateway.writer.drained()


async def test_an_ap3000_session_names_the_cause_of_every_change(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    pool = gateway.pool
    assert pool is not None
    sim = await _ap3000(gateway)
    async with sim:
        response = await api.post(
            f"/api/v1/devices/{PHY}/ports/1/start",
            json={"mode": "time", "duration_min": 10},
            headers={"X-Request-Id": "c1-ap3000-start"},
        )
        assert response.status_code == 202, response.text
        order_no, command_id = response.json()["order_no"], response.json()["command_id"]
        await _settled_quietly(gateway, api, order_no)
    await eventually(lambda: gateway.sessions.link_of(PHY) is None, what=f"{PHY} gone")
    await gateway.writer.drained()

    events = await _events(pool, PHY)
    _assert_all_caused(events)
    created = _one(events, "order.created", order_no=order_no)
    assert (created["cause_kind"], created["cause_ref"]) == ("api", "c1-ap3000-start")
    audited = await pool.fetchval(
        "SELECT count(*) FROM call_audit WHERE request_id = $1", "c1-ap3000-start"
    )
    assert audited == 1  # the API cause is the call the audit trail holds
    # the start's answer from the pile starts the order and acknowledges the command
    started = _one(events, "order.started", order_no=order_no)
    acked = _one(events, "command.acked", command_id=command_id)
    _frame(started, "in")
    assert started["frame_id"] == acked["frame_id"] and started["f_device"] == PHY
    # the settlement report settles it
    settled = _one(events, "order.settled", order_no=order_no)
    _frame(settled, "in")
    assert settled["frame_id"] > started["frame_id"]
    # the frame that carried the start, and the row's own cause
    command = await pool.fetchrow("SELECT * FROM commands WHERE command_id = $1", command_id)
    assert command is not None
    sent = await pool.fetchrow("SELECT * FROM frames WHERE id = $1", command["sent_frame_id"])
    assert sent is not None and sent["direction"] == "out" and sent["device_id"] == PHY
    assert (command["cause_kind"], command["cause_frame_id"]) == ("frame", acked["frame_id"])
    order = await pool.fetchrow("SELECT * FROM orders WHERE order_no = $1", order_no)
    assert order is not None and order["cause_frame_id"] == settled["frame_id"]
    # each progress sample names its 0x06 report
    progress = [e for e in events if e["type"] == "order.progress"]
    assert progress, [dict(e) for e in events]
    for event in progress:
        _frame(event, "in")
        assert event["f_command"] == "0x06" and event["order_no"] == order_no, dict(event)
    # the pile's reports move its port; its login brings it online; the drop, offline
    ports = [e for e in events if e["type"] == "port.status_changed"]
    assert ports and all(p["f_direction"] == "in" for p in ports)
    _frame(_one(events, "device.online"), "in")
    offline = _one(events, "device.offline")
    assert (offline["cause_kind"], offline["cause_ref"]) == ("fault", "connection_lost")


async def test_an_unanswered_command_dies_by_the_ack_timer(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    pool = gateway.pool
    assert pool is not None
    sim = await _ap3000(gateway, faults=Faults(silent=True))
    async with sim:
        body = (
            await api.post(f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "full"})
        ).json()
        await eventually_json(api, f"/api/v1/commands/{body['command_id']}", "status", {"dead"})
        await eventually_json(api, f"/api/v1/orders/{body['order_no']}", "status", {"failed"})
        await gateway.writer.drained()
        events = await _events(pool, PHY)
    _assert_all_caused(events)
    dead = _one(events, "command.dead", command_id=body["command_id"])
    failed = _one(events, "order.failed", order_no=body["order_no"])
    for event in (dead, failed):
        assert (event["cause_kind"], event["cause_ref"]) == ("timer", "ack_timeout")


async def test_a_bkv_session_stopped_from_the_api_names_its_causes(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    pool = gateway.pool
    assert pool is not None
    intervals = BkvIntervals(status_s=60, end_report_resend_s=60)
    box = SimulatedBkvGateway(GW, sockets=1, heartbeat_s=600, intervals=intervals)
    sim = Simulator("127.0.0.1", gateway.server.port, [box], accel=60.0, jitter=0, seed=1)
    await sim.start()
    await sim.wait_connected(1, timeout=10)
    await eventually(lambda: _connected(gateway, SOCKET), what=f"{SOCKET} connected")
    async with sim:
        start = await api.post(
            f"/api/v1/devices/{SOCKET}/ports/1/start",
            json={"mode": "full"},
            headers={"X-Request-Id": "c1-bkv-start"},
        )
        assert start.status_code == 202, start.text
        order_no = start.json()["order_no"]
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"charging"})
        stop = await api.post(
            f"/api/v1/devices/{SOCKET}/ports/1/stop", headers={"X-Request-Id": "c1-bkv-stop"}
        )
        assert stop.status_code == 202, stop.text
        stop_id = stop.json()["command_id"]
        await _settled_quietly(gateway, api, order_no)
        events = await _events(pool, SOCKET)
        stop_row = await pool.fetchrow("SELECT * FROM commands WHERE command_id = $1", stop_id)
    _assert_all_caused(events)
    assert stop_row is not None
    created = _one(events, "order.created", order_no=order_no)
    assert (created["cause_kind"], created["cause_ref"]) == ("api", "c1-bkv-start")
    stopping = _one(events, "order.stopping", order_no=order_no)
    _frame(stopping, "out")
    assert stopping["frame_id"] == stop_row["sent_frame_id"]
    _frame(_one(events, "order.started", order_no=order_no), "in")
    _frame(_one(events, "order.settled", order_no=order_no), "in")
    stop_acked = _one(events, "command.acked", command_id=stop_id)
    _frame(stop_acked, "in")
    assert stop_row["cause_frame_id"] == stop_acked["frame_id"]  # the row's last change
    _frame(_one(events, "device.online"), "in")


async def test_frame_ids_grow_within_a_process_and_across_writer_restarts(
    db_pool: asyncpg.Pool,
) -> None:
    first = FrameIds(lambda: db_pool)
    assert first() is None  # no epoch yet: the database gives the id
    await first.start()
    ids = [first() for _ in range(1000)]
    again = FrameIds(lambda: db_pool)  # a restarted writer (or another process)
    await again.start()
    later = [again() for _ in range(1000)]
    assert all(isinstance(i, int) for i in ids + later)
    assert ids == sorted(set(ids)) and later == sorted(set(later))
    assert min(later) > max(ids)
    await first.close()
    await again.close()


async def test_a_used_up_epoch_goes_on_with_the_next_one(db_pool: asyncpg.Pool) -> None:
    ids = FrameIds(lambda: db_pool, bits=2)  # four ids an epoch: the next one at two
    await ids.start()
    taken = [ids() for _ in range(4)]
    assert None not in taken and taken == sorted(taken)
    later = await eventually(ids, lambda i: i is not None, what="the next epoch")
    assert later > taken[-1]
    await ids.close()


def test_coalesced_port_rows_keep_the_cause_of_the_row_that_changed_the_status() -> None:
    writer = BatchWriter(lambda: None, Metrics())
    at = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    with using(Cause.frame(11)):
        writer.put_port(PortRow("D1", 1, status="charging", reported_at=at))
    with using(Cause.frame(12)):  # the same status reported again, and a new power
        writer.put_port(PortRow("D1", 1, status="charging", power_w=100.0, reported_at=at))
    with using(Cause.frame(13)):  # a row without a status
        writer.put_port(PortRow("D1", 1, power_w=120.0))
    row = writer.pending("ports")[("D1", 1)]
    assert (row["cause_kind"], row["cause_frame_id"], row["power_w"]) == ("frame", 11, 120.0)
    with using(Cause.frame(14)):
        writer.put_port(PortRow("D1", 1, status="idle", reported_at=at))
    explicit = Cause.system("test")  # a row that names its cause keeps it
    writer.put_port(PortRow("D1", 2, status="idle", cause_kind=explicit.kind, cause_ref="test"))
    pending = writer.pending("ports")
    assert pending[("D1", 1)]["cause_frame_id"] == 14
    assert (pending[("D1", 2)]["cause_kind"], pending[("D1", 2)]["cause_ref"]) == ("system", "test")
