"""Outbox safety (issue 11, findings 4, 6, 8 and 9), over real TCP and a real PostgreSQL.

- Finding 4: a stop never overtakes its own start: a stop for a start not sent yet
  cancels it (also one whose attempt was taken back); a stop for a start in flight goes
  after the start's answer, and dies (``after_failed``, an event like any dead command)
  when the start was refused.
- Finding 6: an answer the pile gave is never lost to a failed database write (also when
  the pile leaves before the database returns), and an attempt counts only when its
  bytes were written.
- Finding 9: spacing holds per TCP link (AP3000 piles on one connection, the sockets of
  one BKV gateway), and a pile never gets the previous command's msg id again, not even
  across a restart.
- Finding 8: a BKV start answered together with the session's end report settles that
  order, also when the end report reaches a new process that never saw the answer; two
  concurrent starts on one port open one order.

Every test observes from outside: the HTTP API, the database, and what the piles
(simulated or raw) received and when. Faults are real (a database outage, a pile that
leaves) except where no real fault can hit the exact moment: then the outbox's public
``on_sent_tx`` hook (``outbox.hooks``; ``on_sent`` on the old main) is wrapped to fail or
to let the pile leave while a start is being marked sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

import httpx
import pytest
import structlog

from chargegw.app import Gateway
from chargegw.domain import outbox as outbox_module
from chargeproto import MessageReceived, ap3000, bkv
from chargesim import Faults, SimulatedAp3000Pile, Simulator
from chargesim.bkv import BkvIntervals, SimulatedBkvGateway

from .conftest import database_outage, settings_for
from .piles import RawBkvGateway, RawPile
from .waiting import api_client, eventually, eventually_json, first

ACCEL = 120.0
PHY = "04000301"
BKV_GW = "82231214000301"

_T = TypeVar("_T")
_M = TypeVar("_M", bound=bkv.BkvMessage)


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    # a short scan: a worker that died is restarted quickly (old main relied on it)
    return {"ack_timeout_s": 3.0, "command_spacing_s": 0.2, "outbox_scan_s": 0.5}


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture
def outbox_log(monkeypatch: pytest.MonkeyPatch) -> list[MutableMapping[str, Any]]:
    """What ``chargegw.domain.outbox`` logs during the test, as structlog event dicts (a
    logger of its own: loggers cached earlier in the session ignore ``capture_logs``)."""
    capture = structlog.testing.LogCapture()
    monkeypatch.setattr(outbox_module, "log", structlog.wrap_logger(None, processors=[capture]))
    return capture.entries


def _events(entries: list[MutableMapping[str, Any]]) -> list[str]:
    return [entry["event"] for entry in entries]


async def _post(api: httpx.AsyncClient, path: str, body: Any = None) -> dict[str, Any]:
    response = await api.post(path, json=body)
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


async def _device_online(api: httpx.AsyncClient, device_id: str, online: bool) -> None:
    """Wait until the API lists ``device_id`` with that online flag."""

    async def check() -> bool:
        response = await api.get(f"/api/v1/devices/{device_id}")
        return response.status_code == 200 and response.json()["online"] is online

    await first(check, f"{device_id} online={online}")


async def _ap3000(
    gateway: Gateway, api: httpx.AsyncClient, **options: Any
) -> tuple[Simulator, SimulatedAp3000Pile]:
    """A simulated AP3000 pile, connected and known to the API."""
    pile = SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180, **options)
    sim = Simulator("127.0.0.1", gateway.server.port, [pile], accel=ACCEL, jitter=0, seed=1)
    await sim.start()
    await sim.wait_connected(1, timeout=10)
    await _device_online(api, PHY, True)
    return sim, pile


def _charge_controls(pile: SimulatedAp3000Pile) -> list[tuple[float, str, str]]:
    """The 0x82 the pile received: (time, start/stop, order id), in arrival order."""
    out = []
    for record in pile.received(0x82):
        message = record.message
        assert isinstance(message, ap3000.ChargeControl)
        kind = "start" if message.charge_command == 1 else "stop"
        out.append((record.t, kind, message.order_id))
    return out


def _never_stop_before_start(controls: list[tuple[float, str, str]], order_no: str) -> None:
    """At the pile, every stop of ``order_no`` came after a start of it."""
    started = False
    for _, kind, order_id in controls:
        if order_id != order_no:
            continue
        if kind == "start":
            started = True
        assert started, f"the pile got a stop before its start: {controls}"


# -- finding 4: a stop never overtakes its own start -----------------------------------


async def test_a_stop_while_the_pile_is_offline_cancels_the_unsent_start(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """Start, then stop, while the pile is offline (known, not connected): the stop
    cancels the start in the database, and when the pile comes back it receives neither
    (old main: the stop, priority 0, went first and was refused, then the start arrived
    and the pile charged: the order ended ``charging``)."""
    sim, pile = await _ap3000(gateway, api)
    await sim.stop()
    await _device_online(api, PHY, False)

    start = await _post(api, f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "full"})
    order_no = start["order_no"]
    stop = await _post(api, f"/api/v1/devices/{PHY}/ports/1/stop")

    again = Simulator("127.0.0.1", gateway.server.port, [pile], accel=ACCEL, jitter=0, seed=2)
    async with again:
        await again.wait_connected(1, timeout=10)
        # a query goes after any start or stop of the device (lower priority): once it
        # is delivered, whatever was due before it has been sent
        marker = await _post(api, f"/api/v1/devices/{PHY}/commands", {"command": "query"})
        await eventually_json(api, f"/api/v1/commands/{marker['command_id']}", "status", {"acked"})

        controls = _charge_controls(pile)
        order = (await api.get(f"/api/v1/orders/{order_no}")).json()
        assert controls == [], f"the pile got {controls}; order {order['status']}"
        assert pile.ports[0].session is None, "the pile charges after the user stopped"
        assert order["status"] == "cancelled", order
        assert stop["status"] == "cancelled" and stop["order_no"] == order_no, stop
        command = (await api.get(f"/api/v1/commands/{start['command_id']}")).json()
        assert command["status"] == "dead" and command["attempts"] == 0, command


@pytest.mark.settings(ack_timeout_s=4.0)
async def test_a_stop_for_a_start_in_flight_goes_after_the_starts_answer(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """A stop submitted while the pile has the start but not yet answered it reaches the
    pile after the pile's answer to the start; the order is stopped and settled, not
    left charging.

    Old main passes this case too: its per-device worker waits for the start's answer
    before it takes the next command. It guards the new mechanism (the stop waits for
    the start's outcome through ``after_command``)."""
    sim, pile = await _ap3000(gateway, api, faults=Faults(reply_delay_s=1.0))
    async with sim:
        start = await _post(api, f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "full"})
        order_no = start["order_no"]
        await eventually_json(api, f"/api/v1/commands/{start['command_id']}", "status", {"sent"})
        stop = await _post(api, f"/api/v1/devices/{PHY}/ports/1/stop")
        assert stop["status"] == "pending" and stop["order_no"] == order_no, stop

        order = await eventually_json(
            api, f"/api/v1/orders/{order_no}", "status", {"settled"}, timeout=15
        )
        assert order["stop_reason"] == "server_stop", order
        command = (await api.get(f"/api/v1/commands/{stop['command_id']}")).json()
        assert command["status"] == "acked", command

        controls = _charge_controls(pile)
        assert [kind for _, kind, _ in controls] == ["start", "stop"], controls
        _never_stop_before_start(controls, order_no)
        # the stop arrived only after the pile had answered the start
        answered = [r.t for r in pile.sent(0x82)]
        assert answered and controls[1][0] >= answered[0], (controls, answered)
        assert pile.ports[0].session is None


@pytest.mark.settings(ack_timeout_s=4.0)
async def test_a_stop_behind_a_refused_start_is_dead_and_never_sent(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """A stop queued behind a start in flight that the pile then refuses is ``dead``
    with reason ``after_failed`` and never reaches the pile (old main sent it after the
    refusal: the pile got a stop for a session that never started). Like every dead
    command it leaves a ``command_dead`` event and counts in ``commands_dead_total``
    (the new code first killed it silently, in SQL only)."""
    sim, pile = await _ap3000(gateway, api, faults=Faults(reply_delay_s=1.0, refuse_with=1))
    async with sim:
        start = await _post(api, f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "full"})
        await eventually_json(api, f"/api/v1/commands/{start['command_id']}", "status", {"sent"})
        stop = await _post(api, f"/api/v1/devices/{PHY}/ports/1/stop")
        assert stop["status"] == "pending", stop

        path = f"/api/v1/commands/{stop['command_id']}"
        command = await eventually_json(api, path, "status", {"acked", "failed", "dead"})
        controls = _charge_controls(pile)
        assert [kind for _, kind, _ in controls] == ["start"], controls
        assert command["status"] == "dead" and command["dead_reason"] == "after_failed", command
        assert command["attempts"] == 0, command
        refused = (await api.get(f"/api/v1/commands/{start['command_id']}")).json()
        assert refused["status"] == "failed" and refused["result_code"] == 1, refused
        order = await eventually_json(
            api, f"/api/v1/orders/{start['order_no']}", "status", {"failed"}
        )
        assert order["failure_reason"], order

        # like every dead command, it is an event of the device (and counted)
        async def dead_event() -> list[dict[str, Any]]:
            events = f"/api/v1/devices/{PHY}/events"
            items = (await api.get(events, params={"kind": "command_dead"})).json()["items"]
            return [e for e in items if e["detail"].get("command_id") == stop["command_id"]]

        events = await first(dead_event, "a command_dead event for the stop", 5)
        assert [e["reason"] for e in events] == ["after_failed"], events
        dead = gateway.metrics.registry.get_sample_value(
            "chargegw_commands_dead_total", {"reason": "after_failed"}
        )
        assert dead == 1, dead


@pytest.mark.settings(command_spacing_s=1.0)
async def test_a_stop_never_overtakes_a_start_that_waits_behind_spacing(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """Start and stop submitted back to back while the pile is online and the outbox is
    pacing an earlier command: the pile never gets the stop before its start, and the
    order does not end charging (old main: the stop, priority 0, went out first and was
    refused, then the start: the pile charged and the order stayed ``charging``)."""
    sim, pile = await _ap3000(gateway, api)
    async with sim:
        query = await _post(api, f"/api/v1/devices/{PHY}/commands", {"command": "query"})
        await eventually_json(api, f"/api/v1/commands/{query['command_id']}", "status", {"acked"})
        # the next command now waits for the spacing after the first one
        paced = await _post(api, f"/api/v1/devices/{PHY}/commands", {"command": "query"})
        start = await _post(api, f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "full"})
        order_no = start["order_no"]
        stop = await _post(api, f"/api/v1/devices/{PHY}/ports/1/stop")
        paced_row = (await api.get(f"/api/v1/commands/{paced['command_id']}")).json()
        assert paced_row["status"] in ("pending", "sent"), "the query was not paced"

        # a query goes after any start or stop of the device (lower priority)
        marker = await _post(api, f"/api/v1/devices/{PHY}/commands", {"command": "query"})
        path = f"/api/v1/commands/{marker['command_id']}"
        await eventually_json(api, path, "status", {"acked"}, timeout=15)

        controls = _charge_controls(pile)
        _never_stop_before_start(controls, order_no)
        order = (await api.get(f"/api/v1/orders/{order_no}")).json()
        assert order["status"] != "charging" and pile.ports[0].session is None, (
            order["status"],
            controls,
        )
        # the start had not been written when the stop came: cancelled, nothing went
        assert stop["status"] == "cancelled" and controls == [], (stop, controls)
        assert order["status"] == "cancelled", order


async def test_a_stop_after_an_attempt_taken_back_closes_the_order_and_frees_the_port(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """The pile disconnects while the outbox marks its start sent (the order moved to
    ``starting`` in that transaction); the bytes are never written, so the attempt is
    taken back and the start waits, unsent. A stop now cancels the unsent start and
    closes the order (``cancelled``, or ``failed`` with the reason), so the port takes
    a new start; the returning pile receives neither the old start nor a stop.

    (Two bugs of the new code this test found (fixed in outbox.py and commands_api.py):
    the take-back required the device's directory entry, which the closed connection
    had usually released already, so the attempt stayed counted and the start ``sent``
    (the stop then queued behind it); and when the take-back worked, the stop's
    ``cancel`` was refused from ``starting``, so the order stayed open for ever and
    every later start on the port was a 409. Old main wrote the start to the closed
    connection, counted the attempt, and sent it again on reconnect.)"""
    sim, pile = await _ap3000(gateway, api)
    outbox = gateway.outbox
    hook = outbox.hooks.on_sent_tx
    assert hook is not None
    dropped: list[str] = []

    async def no_connection() -> bool:
        return not gateway.server.links

    async def pile_leaves_while_marking(*args: Any) -> None:
        if not dropped and "start" in args:
            dropped.append("start")
            await sim.stop()
            await first(no_connection, "the gateway to see the pile leave")
        await hook(*args)

    outbox.hooks = dataclasses.replace(outbox.hooks, on_sent_tx=pile_leaves_while_marking)
    start = await _post(api, f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "full"})
    order_no = start["order_no"]
    path = f"/api/v1/commands/{start['command_id']}"

    async def taken_back() -> bool:
        row = (await api.get(path)).json()
        # marked once (a correlation id chosen), then back to pending without attempts
        marked = row["correlation"] is not None
        return marked and row["status"] == "pending" and row["attempts"] == 0

    await first(taken_back, "the unwritten attempt to be taken back", 5)
    stop = await _post(api, f"/api/v1/devices/{PHY}/ports/1/stop")
    assert stop["status"] == "cancelled", stop
    order = (await api.get(f"/api/v1/orders/{order_no}")).json()
    assert order["status"] in ("cancelled", "failed"), order
    assert order["status"] == "cancelled" or order["failure_reason"], order

    again = Simulator("127.0.0.1", gateway.server.port, [pile], accel=ACCEL, jitter=0, seed=2)
    async with again:
        await again.wait_connected(1, timeout=10)
        marker = await _post(api, f"/api/v1/devices/{PHY}/commands", {"command": "query"})
        await eventually_json(api, f"/api/v1/commands/{marker['command_id']}", "status", {"acked"})
        assert _charge_controls(pile) == []
        # the port is free: a new start is taken and charges
        fresh = await _post(api, f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "full"})
        await eventually_json(api, f"/api/v1/orders/{fresh['order_no']}", "status", {"charging"})


# -- finding 6: an answer is never lost, an attempt is only counted when written ------


@pytest.mark.settings(ack_timeout_s=8.0)
async def test_an_answer_received_during_a_database_outage_is_recorded_not_resent(
    gateway: Gateway,
    api: httpx.AsyncClient,
    pg_server_dsn: str,
    db_dsn: str,
    outbox_log: list[MutableMapping[str, Any]],
) -> None:
    """The pile answers a start while the database is down, so the outbox cannot write
    the outcome: once the database is back the command is ``acked`` with the pile's
    answer, the pile received the start once, and the order is ``charging`` (old main:
    the failed write ended the worker, the rescan sent the start again: two copies at
    the pile, two attempts)."""
    sim, pile = await _ap3000(gateway, api, faults=Faults(reply_delay_s=1.0))
    async with sim:
        start = await _post(api, f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "full"})
        path = f"/api/v1/commands/{start['command_id']}"
        await eventually_json(api, path, "status", {"sent"})

        async def answered() -> bool:
            return bool(pile.sent(0x82))

        async with database_outage(pg_server_dsn, db_dsn):
            # the pile answers while the database refuses connections ...
            await first(answered, "the pile's answer", 5)
            # ... and the outage lasts until the gateway has tried to write the outcome
            await eventually(
                lambda: "command outcome not written yet, retrying" in _events(outbox_log),
                what="a failed attempt to write the outcome",
            )
        command = await eventually_json(
            api, path, "status", {"acked", "failed", "dead"}, timeout=15
        )
        order = await eventually_json(
            api, f"/api/v1/orders/{start['order_no']}", "status", {"charging"}
        )

        assert len(pile.received(0x82)) == 1, "the start was sent again"
        assert command["status"] == "acked" and command["attempts"] == 1, command
        assert command["result_code"] == 0 and command["reply"], command
        assert order["started_at"], order


@pytest.mark.settings(ack_timeout_s=8.0)
async def test_an_answer_received_during_an_outage_survives_the_pile_leaving(
    gateway: Gateway, api: httpx.AsyncClient, pg_server_dsn: str, db_dsn: str
) -> None:
    """The pile answers a start while the database is down, then its connection drops
    before the database returns: the answer is still written when it does (``acked``,
    one attempt, the order ``charging``), although the process no longer holds the
    pile. Otherwise the row stays ``sent`` and, unless the pile returns in time, dies
    ``offline`` and fails the order of a pile that charges (old main: the outcome was
    never written)."""
    sim, pile = await _ap3000(gateway, api, faults=Faults(reply_delay_s=1.0))
    start = await _post(api, f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "full"})
    path = f"/api/v1/commands/{start['command_id']}"
    await eventually_json(api, path, "status", {"sent"})

    async def answered() -> bool:
        return bool(pile.sent(0x82))

    async def disconnected() -> bool:
        return not gateway.server.links

    async with database_outage(pg_server_dsn, db_dsn):
        await first(answered, "the pile's answer", 5)
        await sim.stop()  # the pile leaves with the answer given, the database still away
        await first(disconnected, "the gateway to see the pile leave")
    await _device_online(api, PHY, False)  # the database is back, the pile released
    command = await eventually_json(api, path, "status", {"acked", "failed", "dead"}, timeout=10)
    assert command["status"] == "acked" and command["attempts"] == 1, command
    assert len(pile.received(0x82)) == 1
    order = await eventually_json(
        api, f"/api/v1/orders/{start['order_no']}", "status", {"charging"}
    )
    assert order["started_at"], order


async def test_an_attempt_counts_only_when_its_bytes_were_written(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """The step that marks a start sent fails once with a connection error (a fault in
    the outbox's sent hook, the order's ``start_sent`` transition): the start is still
    delivered, and ``attempts`` counts exactly the copies the pile received (old main:
    the mark was committed before the hook failed, so an attempt without bytes was
    counted; the start was written once and recorded with two attempts)."""
    outbox = gateway.outbox
    hook = outbox.hooks.on_sent_tx
    assert hook is not None
    failed: list[str] = []

    async def failing_once(*args: Any) -> None:
        if not failed and "start" in args:
            failed.append("start")
            raise ConnectionError("injected: connection lost while marking the start sent")
        await hook(*args)

    outbox.hooks = dataclasses.replace(outbox.hooks, on_sent_tx=failing_once)
    sim, pile = await _ap3000(gateway, api)
    async with sim:
        start = await _post(api, f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "full"})
        path = f"/api/v1/commands/{start['command_id']}"
        command = await eventually_json(
            api, path, "status", {"acked", "failed", "dead"}, timeout=15
        )
        order = await eventually_json(
            api, f"/api/v1/orders/{start['order_no']}", "status", {"charging"}
        )
        assert failed == ["start"], "the fault was not injected"
        written = len(pile.received(0x82))
        assert command["status"] == "acked", command
        assert command["attempts"] == written == 1, (command["attempts"], written)
        assert order["started_at"], order


# -- finding 9: spacing per link, msg ids that never repeat ----------------------------


class _RecordingPile(RawPile):
    """A raw AP3000 connection that speaks for several piles (as piles behind one host
    share its connection), records when each frame arrives and answers 0x81 queries
    with a 0x21 heartbeat of the pile asked."""

    def __init__(self, phy_ids: list[str]) -> None:
        super().__init__(phy_ids[0])
        self.phy_ids = phy_ids
        self.arrivals: list[tuple[float, ap3000.Ap3000Message]] = []
        self._reader_task: asyncio.Task[None] | None = None

    async def register_all(self) -> None:
        for phy_id in self.phy_ids:
            await self.send(
                ap3000.Registration(
                    phy_id,
                    self.next_id(),
                    firmware_version=126,
                    port_count=2,
                    virtual_id=0,
                    device_type=0x21,
                    work_mode=0,
                    power_board_version=0,
                )
            )
            await self._heartbeat(phy_id)

    async def _heartbeat(self, phy_id: str) -> None:
        ports = tuple(ap3000.PortState(i, 0) for i in range(2))
        await self.send(
            ap3000.Heartbeat(
                phy_id,
                self.next_id(),
                voltage_v=221.5,
                ports=ports,
                signal_strength=20,
                temperature_c=30,
            )
        )

    def start_reading(self) -> None:
        self._reader_task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.reader is not None
        loop = asyncio.get_running_loop()
        while data := await self.reader.read(4096):
            now = loop.time()
            for event in self.decoder.feed(data):
                if isinstance(event, MessageReceived):
                    message = event.message
                    assert isinstance(message, ap3000.Ap3000Message)
                    self.arrivals.append((now, message))
                    if isinstance(message, ap3000.QueryStatus):
                        await self._heartbeat(message.phy_id)

    def queries(self) -> list[tuple[float, str]]:
        return [(t, m.phy_id) for t, m in self.arrivals if isinstance(m, ap3000.QueryStatus)]

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        await super().close()


@pytest.mark.settings(command_spacing_s=0.4)
async def test_spacing_holds_per_link_for_ap3000_piles_behind_one_connection(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """Two piles on one TCP connection (as behind one host), two commands each, queued
    at once: consecutive commands on that connection arrive at least
    ``command_spacing_s`` apart (old main spaced per device: both piles' commands went
    out together)."""
    phy_ids = ["04000311", "04000312"]
    pile = _RecordingPile(phy_ids)
    await pile.connect(gateway.server.port)
    pile.start_reading()
    try:
        await pile.register_all()
        for phy_id in phy_ids:
            await _device_online(api, phy_id, True)
        commands = []
        for _ in range(2):
            for phy_id in phy_ids:
                body = await _post(api, f"/api/v1/devices/{phy_id}/commands", {"command": "query"})
                commands.append(body["command_id"])
        for command_id in commands:
            await eventually_json(api, f"/api/v1/commands/{command_id}", "status", {"acked"})
        arrivals = pile.queries()
        assert sorted(p for _, p in arrivals) == sorted(phy_ids * 2), arrivals
        gaps = [round(b[0] - a[0], 3) for a, b in itertools.pairwise(arrivals)]
        assert all(gap >= 0.4 - 0.05 for gap in gaps), gaps
    finally:
        await pile.close()


@pytest.mark.settings(command_spacing_s=0.4)
async def test_spacing_holds_per_link_for_the_sockets_of_one_bkv_gateway(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """Two sockets of one BKV gateway (one connection), two queries each, queued at
    once: consecutive commands arrive at least ``command_spacing_s`` apart (old main:
    both sockets' commands went out together)."""
    box = SimulatedBkvGateway(
        BKV_GW, sockets=2, heartbeat_s=600, intervals=BkvIntervals(status_s=3600)
    )
    sim = Simulator("127.0.0.1", gateway.server.port, [box], accel=1.0, jitter=0, seed=1)
    async with sim:
        await sim.wait_connected(1, timeout=10)
        sockets = [f"{BKV_GW}-1", f"{BKV_GW}-2"]
        for device_id in sockets:
            await _device_online(api, device_id, True)
        commands = []
        for _ in range(2):
            for device_id in sockets:
                body = await _post(
                    api, f"/api/v1/devices/{device_id}/commands", {"command": "query"}
                )
                commands.append(body["command_id"])
        for command_id in commands:
            await eventually_json(api, f"/api/v1/commands/{command_id}", "status", {"acked"})
        arrivals = [
            (r.t, r.message.socket)
            for r in box.received()
            if isinstance(r.message, bkv.SocketQuery)
        ]
        assert sorted(s for _, s in arrivals) == [1, 1, 2, 2], arrivals
        gaps = [round(b[0] - a[0], 3) for a, b in itertools.pairwise(arrivals)]
        assert all(gap >= 0.4 - 0.05 for gap in gaps), gaps


async def test_msg_ids_to_a_pile_never_repeat_the_previous_one_across_a_restart(
    db_dsn: str,
) -> None:
    """Consecutive commands to one AP3000 pile carry different msg ids, also when the
    gateway restarts between them (a pile that sees the previous command's msg id again
    takes the new command for a resend and answers the old one).

    Old main started each process's msg ids at ``random.randrange``: two processes can
    start at the same id. The test makes that coincidence certain by seeding ``random``
    identically before each gateway is built: on old main the first command after the
    restart carries the same id as the last one before it. The new code takes the next
    id from ``device_correlations`` (the seed then only picks the first id ever used)."""
    pile = SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180)
    locate = {"command": "locate", "params": {"locate_duration_s": 5}}
    settings = settings_for(db_dsn, ack_timeout_s=3.0, command_spacing_s=0.1)
    state = random.getstate()
    try:
        command_ids: list[int] = []
        for run in range(2):
            random.seed(20251)
            gateway = Gateway(settings)
            await gateway.start(http=False)
            try:
                async with api_client(gateway) as api:
                    sim = Simulator(
                        "127.0.0.1", gateway.server.port, [pile], accel=ACCEL, jitter=0, seed=1
                    )
                    async with sim:
                        await sim.wait_connected(1, timeout=10)
                        await _device_online(api, PHY, True)
                        for _ in range(1 if run == 0 else 2):
                            body = await _post(api, f"/api/v1/devices/{PHY}/commands", locate)
                            command_ids.append(body["command_id"])
                            path = f"/api/v1/commands/{body['command_id']}"
                            await eventually_json(api, path, "status", {"acked"})
            finally:
                await gateway.stop()
    finally:
        random.setstate(state)
    ids = [record.msg_id for record in pile.received(0x96)]
    assert len(ids) == 3, ids  # one before the restart, two after it
    before, after, then = ids
    assert before != after, f"msg id {after} repeated across the restart: {ids}"
    assert after != then, ids


# -- finding 8: BKV correlation, concurrent starts --------------------------------------


class _RawBkvSockets(RawBkvGateway):
    """A raw BKV gateway (socket 1, two jacks) that reads in the background, keeps what
    the server sent, and answers every 0x07 start with ``answer(command)`` if set."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[bkv.BkvMessage] = []
        self.answer: Callable[[bkv.ChargeControl], bytes] | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def connect(self, port: int) -> _RawBkvSockets:
        await super().connect(port)
        self._reader_task = asyncio.get_running_loop().create_task(self._read())
        heartbeat = bkv.Heartbeat(
            BKV_GW, 0, iccid="89860448161870064815", firmware_version="cV.1r46", signal_strength=25
        )
        await self.send_raw(bkv.encode(heartbeat))
        return self

    async def _read(self) -> None:
        assert self.reader is not None
        while data := await self.reader.read(4096):
            for event in self.decoder.feed(data):
                if isinstance(event, MessageReceived):
                    message = event.message
                    assert isinstance(message, bkv.BkvMessage)
                    self.got.append(message)
                    if isinstance(message, bkv.ChargeControl) and self.answer is not None:
                        await self.send_raw(self.answer(message))

    def of(self, cls: type[_M]) -> list[_M]:
        return [m for m in self.got if isinstance(m, cls)]

    async def wait_for(self, cls: type[_M], count: int = 1, timeout: float = 10.0) -> _M:
        """The ``count``-th frame of class ``cls`` the server sent."""

        async def check() -> _M | None:
            frames = self.of(cls)
            return frames[count - 1] if len(frames) >= count else None

        return await first(check, f"{count} x {cls.__name__}", timeout)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        await super().close()


def _start_reply(control: bkv.ChargeControl, business_no: int) -> bytes:
    return bkv.encode(
        bkv.ChargeControlReply(
            BKV_GW, control.seq, result=1, socket=1, port=0, business_no=business_no
        )
    )


def _end_report(business_no: int) -> bytes:
    """A 0x0015/0x02 end report of jack A of socket 1: 0.02 kWh in 1 minute."""
    return bkv.encode(
        bkv.EndReport(
            BKV_GW,
            0,
            socket=1,
            firmware_version=0x5136,
            temperature_c=30,
            signal_strength=25,
            port=0,
            status_bits=0xB0,
            business_no=business_no,
            power_w=0.0,
            current_a=0.0,
            energy_kwh=0.02,
            duration_min=1,
        )
    )


async def _one_settled_order(
    api: httpx.AsyncClient, order_no: str, business_no: int
) -> dict[str, Any]:
    """The socket's only order is ``order_no``, settled with ``business_no``."""
    device_id = f"{BKV_GW}-1"

    async def settled_or_doubled() -> list[dict[str, Any]] | None:
        params = {"device_id": device_id}
        items: list[dict[str, Any]] = (await api.get("/api/v1/orders", params=params)).json()[
            "items"
        ]
        done = any(o["order_no"] == order_no and o["status"] == "settled" for o in items)
        return items if done or len(items) > 1 else None

    items = await first(settled_or_doubled, f"order {order_no} settled")
    seen = [(o["order_no"], o["status"], o["business_no"], o["device_initiated"]) for o in items]
    assert seen == [(order_no, "settled", business_no, False)], seen
    order = items[0]
    assert order["energy_kwh"] == pytest.approx(0.02) and order["duration_s"] == 60, order
    return order


async def test_a_bkv_start_answered_with_the_end_report_at_once_settles_that_order(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """The socket answers a start and, in the same TCP write, reports the session
    charging and then ended (status cluster and 0x02 end report with the new business
    number): the platform's own order is settled with that business number, and no
    second (device-initiated) order appears.

    Old main passes this case too (its in-memory ``_started`` hint covers it within one
    process); the case that fails on old main is the next test."""
    business_no = 4711
    raw = _RawBkvSockets()
    raw.answer = lambda control: (
        _start_reply(control, business_no)
        + bkv.encode(_cluster(status_bits=0x90, business_no=business_no))
        + _end_report(business_no)
    )
    await raw.connect(gateway.server.port)
    try:
        await raw.send_raw(bkv.encode(_cluster(status_bits=0x80, business_no=0)))
        device_id = f"{BKV_GW}-1"
        await _device_online(api, device_id, True)
        body = await _post(
            api, f"/api/v1/devices/{device_id}/ports/1/start", {"mode": "time", "duration_min": 5}
        )
        ack = await raw.wait_for(bkv.CardEndAck)
        assert ack.socket == 1 and ack.result == 1
        command = await eventually_json(
            api, f"/api/v1/commands/{body['command_id']}", "status", {"acked"}
        )
        assert command["reply"]["business_no"] == business_no, command
        await _one_settled_order(api, body["order_no"], business_no)
        assert len(raw.of(bkv.ChargeControl)) == 1
    finally:
        await raw.close()


async def test_a_bkv_start_answered_during_an_outage_is_found_by_its_end_report_after_a_restart(
    db_dsn: str, pg_server_dsn: str
) -> None:
    """The socket answers a start while the database is unavailable, the connection
    drops and the gateway process ends before the database returns; the socket reports
    the session's end to the next process, which never saw the answer: the end report
    still finds the platform's order (a start without a recorded answer, reconciled by
    the business number), which is settled with it; no second order.

    Old main recorded the business number in a fire-and-forget task that gave up when
    the connection closed, and found the order otherwise only through the first
    process's in-memory hint: the new process created a second, device-initiated
    order for the session, and the resent start then left the platform's order
    ``charging`` for a session that had ended."""
    business_no = 815
    device_id = f"{BKV_GW}-1"
    settings = settings_for(db_dsn, ack_timeout_s=3.0, command_spacing_s=0.1, outbox_scan_s=0.5)
    first_gw = Gateway(settings)
    await first_gw.start(http=False)
    try:
        async with api_client(first_gw) as api:
            raw = await _RawBkvSockets().connect(first_gw.server.port)
            await raw.send_raw(bkv.encode(_cluster(status_bits=0x80, business_no=0)))
            await _device_online(api, device_id, True)
            body = await _post(
                api,
                f"/api/v1/devices/{device_id}/ports/1/start",
                {"mode": "time", "duration_min": 5},
            )
            order_no = body["order_no"]
            control = await raw.wait_for(bkv.ChargeControl)
            await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"starting"})

            async def disconnected() -> bool:
                return not first_gw.server.links

            async with database_outage(pg_server_dsn, db_dsn):
                charging = bkv.encode(_cluster(status_bits=0x90, business_no=business_no))
                await raw.send_raw(_start_reply(control, business_no) + charging)
                await raw.wait_for(bkv.StatusClusterAck)  # the answer was taken
                await raw.close()
                await first(disconnected, "the gateway to see the connection close")
                # the process ends before it could write anything about the answer
                await asyncio.wait_for(first_gw.stop(), 15)
    finally:
        await first_gw.stop()

    second = Gateway(settings)
    await second.start(http=False)
    try:
        async with api_client(second) as api:
            raw = await _RawBkvSockets().connect(second.server.port)
            await raw.send_raw(
                bkv.encode(_cluster(status_bits=0x90, business_no=business_no))
                + _end_report(business_no)
            )
            try:
                ack = await raw.wait_for(bkv.CardEndAck)
                assert ack.socket == 1 and ack.result == 1
                # the new process resends the unanswered start (same seq); the socket
                # answers it as it answered the first copy, after its end report
                raw.answer = lambda control: _start_reply(control, business_no)
                for control in raw.of(bkv.ChargeControl):
                    await raw.send_raw(_start_reply(control, business_no))
                path = f"/api/v1/commands/{body['command_id']}"
                await eventually_json(api, path, "status", {"acked", "failed", "dead"})
                await _one_settled_order(api, order_no, business_no)
            finally:
                await raw.close()
    finally:
        await second.stop()


def _cluster(*, status_bits: int, business_no: int) -> bkv.StatusCluster:
    """A 0x1017 status cluster of socket 1: jack A as given, jack B idle."""
    jacks = tuple(
        bkv.JackStatus(
            port=port,
            status_bits=status_bits if port == 0 else 0x80,
            business_no=business_no if port == 0 else 0,
            voltage_v=220.0,
            power_w=200.0 if port == 0 and status_bits == 0x90 else 0.0,
            current_a=0.9 if port == 0 and status_bits == 0x90 else 0.0,
            energy_kwh=0.0,
            duration_min=0,
        )
        for port in (0, 1)
    )
    group = bkv.SocketStatus(
        socket=1, firmware_version=0x5136, temperature_c=30, signal_strength=25, ports=jacks
    )
    return bkv.StatusCluster.create(BKV_GW, 0, sockets=(group,))


async def test_two_concurrent_starts_on_one_port_open_one_order(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """Two start requests for the same port at the same moment: one order (202), one
    conflict (409), never two open orders on the port (old main checked, then inserted,
    in separate statements: both requests could pass the check)."""
    pile = RawPile(PHY)
    await pile.connect(gateway.server.port)
    try:
        await pile.register()
        await _device_online(api, PHY, True)
        path = f"/api/v1/devices/{PHY}/ports/1/start"
        responses = await asyncio.gather(*(api.post(path, json={"mode": "full"}) for _ in range(2)))
        codes = sorted(r.status_code for r in responses)
        assert gateway.pool is not None
        open_orders = await gateway.pool.fetchval(
            """SELECT count(*) FROM orders WHERE device_id = $1 AND port = 1
               AND status IN ('pending', 'starting', 'charging', 'stopping')""",
            PHY,
        )
        assert open_orders == 1, (open_orders, [r.text for r in responses])
        assert codes == [202, 409], [r.text for r in responses]
    finally:
        await pile.close()
