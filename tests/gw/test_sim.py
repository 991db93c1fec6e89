"""The device simulator against a tiny real TCP server built on chargeproto.

Timing assertions are on counts and spacing within generous bounds, never exact times.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable

import pytest
from click.testing import CliRunner

from chargeproto import Event as StreamEvent
from chargeproto import (
    GarbageError,
    IccidReceived,
    KeepaliveReceived,
    MessageReceived,
    StreamError,
    ap3000,
)
from chargesim import (
    Ap3000Intervals,
    Faults,
    Flow,
    PortStatus,
    SimulatedAp3000Pile,
    Simulator,
    make_ap3000_piles,
)
from chargesim.cli import sim_command

from .waiting import eventually

ORDER = "20231105123000000000000000000001"
OTHER_ORDER = "20231105123000000000000000000099"


class ServerConnection:
    """One accepted connection: every event with its time."""

    def __init__(self, number: int, writer: asyncio.StreamWriter) -> None:
        self.number = number
        self.writer = writer
        self.events: list[tuple[float, StreamEvent]] = []
        self.closed_by_peer = False

    def messages(self, command: int | None = None) -> list[tuple[float, ap3000.Ap3000Message]]:
        out: list[tuple[float, ap3000.Ap3000Message]] = []
        for t, event in self.events:
            if isinstance(event, MessageReceived):
                message = event.message
                assert isinstance(message, ap3000.Ap3000Message)
                if command is None or message.command == command:
                    out.append((t, message))
        return out


class TinyServer:
    """Answers 0x20/0x21/0x22 (each switchable), acknowledges 0x03 after N copies."""

    def __init__(self) -> None:
        self.answer_registration = True
        self.answer_heartbeat = True
        self.answer_time = True
        self.ack_settlement_after = 1
        self.connections: list[ServerConnection] = []
        self._by_phy: dict[str, ServerConnection] = {}
        self._pulse = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.connections:
            conn.writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConnection(len(self.connections) + 1, writer)
        self.connections.append(conn)
        decoder = ap3000.Ap3000StreamDecoder()
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(4096):
                for event in decoder.feed(data):
                    conn.events.append((loop.time(), event))
                    if isinstance(event, MessageReceived):
                        message = event.message
                        assert isinstance(message, ap3000.Ap3000Message)
                        self._by_phy[message.phy_id] = conn
                        reply = self._reply(conn, message)
                        if reply is not None:
                            writer.write(ap3000.encode(reply))
                self._pulse.set()
                self._pulse = asyncio.Event()
        except ConnectionError:
            pass
        conn.closed_by_peer = True

    def _reply(
        self, conn: ServerConnection, m: ap3000.Ap3000Message
    ) -> ap3000.Ap3000Message | None:
        if isinstance(m, ap3000.Registration) and self.answer_registration:
            return ap3000.RegistrationReply(m.phy_id, m.msg_id, result=0)
        if isinstance(m, ap3000.Heartbeat) and self.answer_heartbeat:
            return ap3000.HeartbeatReply(m.phy_id, m.msg_id, result=0)
        if isinstance(m, ap3000.TimeRequest) and self.answer_time:
            return ap3000.TimeReply(m.phy_id, m.msg_id, timestamp_unix=1_700_000_000)
        if isinstance(m, ap3000.Settlement):
            copies = sum(1 for _, s in conn.messages(0x03) if s.msg_id == m.msg_id)
            if copies >= self.ack_settlement_after:
                return ap3000.SettlementReply(m.phy_id, m.msg_id, result=0)
        return None

    def messages(
        self, phy_id: str, command: int | None = None
    ) -> list[tuple[float, ap3000.Ap3000Message]]:
        out: list[tuple[float, ap3000.Ap3000Message]] = []
        for conn in self.connections:
            out.extend((t, m) for t, m in conn.messages(command) if m.phy_id == phy_id)
        return sorted(out, key=lambda item: item[0])

    async def send(self, phy_id: str, message: ap3000.Ap3000Message) -> float:
        """Send to the pile's latest connection; returns the send time."""
        conn = self._by_phy[phy_id]
        conn.writer.write(ap3000.encode(message))
        await conn.writer.drain()
        return asyncio.get_running_loop().time()

    async def wait_count(self, phy_id: str, command: int, count: int, *, timeout: float) -> None:
        await eventually(
            lambda: len(self.messages(phy_id, command)) >= count,
            what=f"{count} x 0x{command:02X} from {phy_id}",
            timeout=timeout,
            interval=0.01,
        )

    async def wait_message(
        self,
        phy_id: str,
        command: int,
        *,
        timeout: float,
        since: float = 0.0,
        where: Callable[[ap3000.Ap3000Message], bool] = lambda m: True,
    ) -> tuple[float, ap3000.Ap3000Message]:
        async with asyncio.timeout(timeout):
            while True:
                pulse = self._pulse
                for t, m in self.messages(phy_id, command):
                    if t >= since and where(m):
                        return t, m
                await pulse.wait()


@pytest.fixture
async def server() -> AsyncIterator[TinyServer]:
    srv = TinyServer()
    await srv.start()
    yield srv
    await srv.close()


def start(
    phy_id: str,
    *,
    port: int = 0,
    limit: int = 0,
    order: str = ORDER,
    command: int = 1,
    msg_id: int,
) -> ap3000.ChargeControl:
    return ap3000.ChargeControl(
        phy_id,
        msg_id,
        rate_mode=0,
        balance_or_expiry=500,
        port=port,
        charge_command=command,
        charge_limit=limit,
        order_id=order,
    )


def fast_pile(number: int = 1, **options: object) -> SimulatedAp3000Pile:
    """A dual-port pile with 30 s (pile) heartbeats, power heartbeats and resends."""
    intervals = Ap3000Intervals(
        time_retry_s=30, power_heartbeat_s=30, settlement_resend_s=30, boot_s=5
    )
    return SimulatedAp3000Pile(
        f"04{number:06X}",
        heartbeat_s=30,
        intervals=intervals,
        **options,  # type: ignore[arg-type]
    )


def sim_for(server: TinyServer, *piles: SimulatedAp3000Pile, accel: float = 60) -> Simulator:
    return Simulator(
        "127.0.0.1", server.port, piles, accel=accel, jitter=0.1, seed=3, reconnect_min_s=0.1
    )


# --- ids ----------------------------------------------------------------------------------


def test_generated_ids_follow_port_count_and_number() -> None:
    dual = make_ap3000_piles(2, ports=2, id_start=13544000)
    assert [p.phy_id for p in dual] == ["04CEAA40", "04CEAA41"]
    assert [p.phy_id[:2] for p in make_ap3000_piles(1, ports=10)] == ["05"]
    assert [p.phy_id[:2] for p in make_ap3000_piles(1, ports=16)] == ["06"]
    iccids = {p.iccid for p in dual}
    assert len(iccids) == 2
    assert all(len(i) == 20 and i.startswith("89860") for i in iccids)
    with pytest.raises(ValueError, match="24 bits"):
        make_ap3000_piles(2, id_start=0xFFFFFF)


# --- connecting ---------------------------------------------------------------------------


async def test_connect_iccid_registration_time_then_heartbeats_at_accelerated_interval(
    server: TinyServer,
) -> None:
    piles = [*make_ap3000_piles(5, heartbeat_s=30), *make_ap3000_piles(1, ports=10, heartbeat_s=30)]
    sim = Simulator("127.0.0.1", server.port, piles, accel=60, jitter=0.3, seed=11)

    def beats(pile: SimulatedAp3000Pile) -> int:
        return len(server.messages(pile.phy_id, 0x21))

    async with sim:
        await sim.wait_connected(timeout=3)
        # 0.5 s +-30 %: the first at once, then three more
        await eventually(lambda: min(beats(p) for p in piles) >= 4, timeout=5)
        stats = sim.stats()
    assert stats.connected == 6
    assert not sim.errors
    connect_times = sorted(c.events[0][0] for c in server.connections)
    # start times spread over jitter * heartbeat = 0.15 s, not all at once
    assert 0.0 < connect_times[-1] - connect_times[0] < 0.5
    for pile in piles:
        (conn,) = [
            c
            for c in server.connections
            if c.messages() and c.messages()[0][1].phy_id == pile.phy_id
        ]
        first = conn.events[0][1]
        assert isinstance(first, IccidReceived) and first.iccid == pile.iccid
        commands = [m.command for _, m in conn.messages()]
        assert commands[:3] == [0x20, 0x22, 0x21]
        assert commands.count(0x20) == 1 and commands.count(0x22) == 1  # answered at once
        registration = conn.messages(0x20)[0][1]
        assert isinstance(registration, ap3000.Registration)
        assert registration.port_count == len(pile.ports)
        times = [t for t, _ in conn.messages(0x21)]
        assert len(times) >= 4, times
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.3 <= g <= 0.8 for g in gaps), gaps
        msg_ids = [m.msg_id for _, m in conn.messages()]
        assert len(set(msg_ids)) == len(msg_ids)  # every new message has a new id
        assert pile.registered is False  # disconnected now


async def test_registration_and_time_request_repeat_with_same_msg_id_until_answered(
    server: TinyServer,
) -> None:
    server.answer_registration = False
    server.answer_time = False
    pile = fast_pile()
    async with sim_for(server, pile, accel=120):  # resends every 0.25 s
        await server.wait_message(pile.phy_id, 0x20, timeout=2)
        await eventually(
            lambda: min(len(server.messages(pile.phy_id, c)) for c in (0x20, 0x22)) >= 3,
            what="three registrations and three time requests",
        )
        registrations = server.messages(pile.phy_id, 0x20)
        times = server.messages(pile.phy_id, 0x22)
        assert len(registrations) >= 3
        assert len({m.msg_id for _, m in registrations}) == 1
        assert len(times) >= 3
        assert len({m.msg_id for _, m in times}) == 1
        assert not pile.registered
        server.answer_registration = True
        await eventually(lambda: pile.registered, what="the pile registered")
        count = len(server.messages(pile.phy_id, 0x20))
        await asyncio.sleep(0.4)  # proves no registration is resent within 0.4 s (was 0.25 s)
        assert len(server.messages(pile.phy_id, 0x20)) == count


# --- charging -----------------------------------------------------------------------------


async def test_start_power_heartbeats_then_settlement_resent_until_acknowledged(
    server: TinyServer,
) -> None:
    server.ack_settlement_after = 3
    intervals = Ap3000Intervals(power_heartbeat_s=60, settlement_resend_s=36)
    pile = SimulatedAp3000Pile("04000001", heartbeat_s=60, intervals=intervals)
    async with sim_for(server, pile, accel=120):
        await server.wait_message(pile.phy_id, 0x21, timeout=2)
        # 360 pile seconds at accel 120: a 3 s charge
        sent = await server.send(pile.phy_id, start(pile.phy_id, limit=360, msg_id=77))
        _, reply = await server.wait_message(pile.phy_id, 0x82, timeout=1)
        assert isinstance(reply, ap3000.ChargeControlReply)
        assert (reply.msg_id, reply.result, reply.order_id, reply.port) == (77, 0, ORDER, 0)
        assert pile.ports[0].status is PortStatus.CHARGING
        t_settle, settlement = await server.wait_message(pile.phy_id, 0x03, timeout=5)
        assert 2.5 <= t_settle - sent <= 4.0
        assert isinstance(settlement, ap3000.Settlement)
        assert settlement.stop_reason == 3  # preset time reached
        assert settlement.order_id == ORDER and settlement.port == 0
        assert 340 <= settlement.duration_s <= 380
        assert settlement.energy_kwh > 0
        # resent every 0.3 s (+-10 %) until the third copy is acknowledged
        await server.wait_message(pile.phy_id, 0x03, timeout=2, since=t_settle + 0.5)
        # acknowledged: nothing is left to resend (the pile resends only from that list)
        await eventually(lambda: not pile.settlements, what="the settlement acknowledged")
        copies = server.messages(pile.phy_id, 0x03)
        assert len(copies) == 3
        assert {m.msg_id for _, m in copies} == {settlement.msg_id}
        assert not pile.settlements
    powers = [m for _, m in server.messages(pile.phy_id, 0x06)]
    assert 4 <= len(powers) <= 7
    assert all(isinstance(p, ap3000.PowerHeartbeat) and p.order_id == ORDER for p in powers)
    durations = [p.duration_s for p in powers if isinstance(p, ap3000.PowerHeartbeat)]
    energies = [p.energy_kwh for p in powers if isinstance(p, ap3000.PowerHeartbeat)]
    assert durations == sorted(durations) and energies == sorted(energies)
    assert durations[-1] > durations[0]
    statuses = [m.ports[0].status for t, m in server.messages(pile.phy_id, 0x21)]  # type: ignore[attr-defined]
    assert statuses[-1] == 0 and 1 in statuses
    assert pile.ports[0].status is PortStatus.IDLE


async def test_stop_needs_the_running_order_number(server: TinyServer) -> None:
    pile = fast_pile()
    async with sim_for(server, pile):
        await server.wait_message(pile.phy_id, 0x21, timeout=2)
        await server.send(pile.phy_id, start(pile.phy_id, msg_id=1))
        await server.wait_message(pile.phy_id, 0x82, timeout=1, where=lambda m: m.msg_id == 1)
        await server.send(pile.phy_id, start(pile.phy_id, command=0, order=OTHER_ORDER, msg_id=2))
        _, wrong = await server.wait_message(
            pile.phy_id, 0x82, timeout=1, where=lambda m: m.msg_id == 2
        )
        assert isinstance(wrong, ap3000.ChargeControlReply) and wrong.result != 0
        assert pile.ports[0].status is PortStatus.CHARGING
        await server.send(pile.phy_id, start(pile.phy_id, command=0, msg_id=3))
        _, right = await server.wait_message(
            pile.phy_id, 0x82, timeout=1, where=lambda m: m.msg_id == 3
        )
        assert isinstance(right, ap3000.ChargeControlReply) and right.result == 0
        _, settlement = await server.wait_message(pile.phy_id, 0x03, timeout=1)
        assert isinstance(settlement, ap3000.Settlement)
        assert settlement.stop_reason == 7 and settlement.order_id == ORDER


async def test_start_results_for_unplugged_missing_and_busy_ports(server: TinyServer) -> None:
    pile = fast_pile(plugged=[False, True])
    async with sim_for(server, pile):
        await server.wait_message(pile.phy_id, 0x21, timeout=2)
        results = {}
        for msg_id, port in ((1, 0), (2, 1), (3, 1), (4, 5)):
            await server.send(pile.phy_id, start(pile.phy_id, port=port, msg_id=msg_id))
            _, reply = await server.wait_message(
                pile.phy_id, 0x82, timeout=1, where=lambda m, i=msg_id: m.msg_id == i
            )
            assert isinstance(reply, ap3000.ChargeControlReply)
            results[msg_id] = reply.result
        assert results == {1: 1, 2: 0, 3: 2, 4: 4}
        pile.unplug(1)
        _, settlement = await server.wait_message(pile.phy_id, 0x03, timeout=1)
        assert isinstance(settlement, ap3000.Settlement) and settlement.stop_reason == 5


async def test_modify_limit_ends_the_charge_at_the_new_time(server: TinyServer) -> None:
    pile = fast_pile()
    async with sim_for(server, pile, accel=120):
        await server.wait_message(pile.phy_id, 0x21, timeout=2)
        modify = ap3000.ModifyChargeLimit(pile.phy_id, 9, rate_mode=0, port=0, charge_limit=60)
        await server.send(pile.phy_id, modify)
        _, idle = await server.wait_message(pile.phy_id, 0x8A, timeout=1)
        assert isinstance(idle, ap3000.ModifyChargeLimitReply) and idle.result == 1
        await server.send(pile.phy_id, start(pile.phy_id, msg_id=10))  # until full
        await server.send(pile.phy_id, ap3000.ModifyChargeLimit(pile.phy_id, 11, 0, 0, 60))
        _, done = await server.wait_message(
            pile.phy_id, 0x8A, timeout=1, where=lambda m: m.msg_id == 11
        )
        assert isinstance(done, ap3000.ModifyChargeLimitReply) and done.result == 0
        _, settlement = await server.wait_message(pile.phy_id, 0x03, timeout=2)
        assert isinstance(settlement, ap3000.Settlement)
        assert settlement.stop_reason == 3 and 50 <= settlement.duration_s <= 75


async def test_energy_limit_ends_with_reason_4(server: TinyServer) -> None:
    pile = fast_pile(charge_power_w=2000.0)
    async with sim_for(server, pile, accel=120):
        await server.wait_message(pile.phy_id, 0x21, timeout=2)
        energy = ap3000.ChargeControl(
            pile.phy_id,
            1,
            rate_mode=2,
            balance_or_expiry=0,
            port=1,
            charge_command=1,
            charge_limit=1,
            order_id=ORDER,
        )  # 0.01 kWh at about 2 kW: about 18 pile seconds
        await server.send(pile.phy_id, energy)
        _, settlement = await server.wait_message(pile.phy_id, 0x03, timeout=2)
    assert isinstance(settlement, ap3000.Settlement)
    assert (settlement.stop_reason, settlement.port, settlement.energy_kwh) == (4, 1, 0.01)


# --- faults -------------------------------------------------------------------------------


async def test_refuse_with_answers_the_configured_result(server: TinyServer) -> None:
    pile = fast_pile(faults=Faults(refuse_with=6))
    async with sim_for(server, pile):
        await server.wait_message(pile.phy_id, 0x21, timeout=2)
        await server.send(pile.phy_id, start(pile.phy_id, msg_id=5))
        _, reply = await server.wait_message(pile.phy_id, 0x82, timeout=1)
        assert isinstance(reply, ap3000.ChargeControlReply)
        assert (reply.msg_id, reply.result) == (5, 6)
        assert pile.ports[0].session is None


async def test_silent_pile_answers_nothing_until_the_fault_is_lifted(server: TinyServer) -> None:
    pile = fast_pile(faults=Faults(silent=True))
    async with sim_for(server, pile):
        await server.wait_message(pile.phy_id, 0x21, timeout=2)
        sent = await server.send(pile.phy_id, start(pile.phy_id, msg_id=5))
        await server.send(pile.phy_id, ap3000.Locate(pile.phy_id, 6, locate_duration_s=5))
        await eventually(lambda: pile.stats.commands_ignored == 2, what="both commands ignored")
        await server.wait_message(pile.phy_id, 0x21, timeout=2, since=sent)  # still alive
        assert server.messages(pile.phy_id, 0x82) == []
        assert server.messages(pile.phy_id, 0x96) == []
        pile.faults.silent = False
        await server.send(pile.phy_id, start(pile.phy_id, msg_id=5))  # the resend
        _, reply = await server.wait_message(pile.phy_id, 0x82, timeout=1)
        assert isinstance(reply, ap3000.ChargeControlReply) and reply.result == 0


async def test_answer_only_resend_ignores_the_first_copy(server: TinyServer) -> None:
    pile = fast_pile(faults=Faults(answer_only_resend=True))
    async with sim_for(server, pile):
        await server.wait_message(pile.phy_id, 0x21, timeout=2)
        await server.send(pile.phy_id, start(pile.phy_id, msg_id=500))
        await eventually(lambda: pile.stats.commands_ignored == 1, what="the first copy ignored")
        assert server.messages(pile.phy_id, 0x82) == []
        assert pile.ports[0].session is None
        resent = await server.send(pile.phy_id, start(pile.phy_id, msg_id=500))
        t, reply = await server.wait_message(pile.phy_id, 0x82, timeout=1)
        assert t >= resent
        assert isinstance(reply, ap3000.ChargeControlReply)
        assert (reply.msg_id, reply.result) == (500, 0)
        # a further copy gets the same answer again, not a second start
        await server.send(pile.phy_id, start(pile.phy_id, msg_id=500))
        await server.wait_count(pile.phy_id, 0x82, 2, timeout=1)
        assert [m.result for _, m in server.messages(pile.phy_id, 0x82)] == [0, 0]  # type: ignore[attr-defined]


async def test_reply_delay(server: TinyServer) -> None:
    pile = fast_pile(faults=Faults(reply_delay_s=0.4))
    async with sim_for(server, pile):
        await server.wait_message(pile.phy_id, 0x21, timeout=2)
        sent = await server.send(pile.phy_id, ap3000.Locate(pile.phy_id, 8, locate_duration_s=3))
        t, reply = await server.wait_message(pile.phy_id, 0x96, timeout=2)
        assert t - sent >= 0.38
        assert isinstance(reply, ap3000.LocateReply) and reply.msg_id == 8


async def test_garbage_before_frames_is_skipped_by_the_server(server: TinyServer) -> None:
    pile = fast_pile(faults=Faults(garbage=7))
    async with sim_for(server, pile):
        await server.wait_message(pile.phy_id, 0x21, timeout=2)
        await eventually(lambda: pile.registered, what="the pile registered")
    events = [e for c in server.connections for _, e in c.events]
    garbage = [e for e in events if isinstance(e, StreamError)]
    assert garbage and all(isinstance(e.error, GarbageError) for e in garbage)
    assert len(server.messages(pile.phy_id, 0x21)) >= 1


async def test_dropped_connections_reconnect_with_iccid(server: TinyServer) -> None:
    pile = fast_pile(faults=Faults(drop_connection_after_s=0.3))
    async with sim_for(server, pile):
        await eventually(
            lambda: len(server.connections) >= 2 and all(c.events for c in server.connections),
            what="a second connection with its first frame",
        )
        pile.faults.drop_connection_after_s = None
    assert len(server.connections) >= 2
    for conn in server.connections:
        first = conn.events[0][1]
        assert isinstance(first, IccidReceived) and first.iccid == pile.iccid
    assert server.connections[0].closed_by_peer


async def test_half_open_reconnect_keeps_the_old_connection_open(server: TinyServer) -> None:
    pile = fast_pile()
    async with sim_for(server, pile):
        await server.wait_message(pile.phy_id, 0x21, timeout=2)
        pile.abandon_connection()
        await eventually(
            lambda: len(server.connections) == 2 and server.connections[1].messages(0x20),
            what="a second connection registering",
        )
        old, new = server.connections
        assert not old.closed_by_peer
        assert new.messages(0x20)[0][1].phy_id == pile.phy_id
        assert pile.connected and pile.connection_count == 2


async def test_link_keepalive_and_offline_after_unanswered_heartbeats(
    server: TinyServer,
) -> None:
    server.answer_heartbeat = False
    quiet = SimulatedAp3000Pile(
        "04000001", heartbeat_s=600, send_link=True, intervals=Ap3000Intervals(link_idle_s=30)
    )
    offline = fast_pile(2, offline_after_missed_heartbeats=2)

    def links() -> list[float]:
        return [
            t
            for conn in server.connections
            for t, e in conn.events
            if isinstance(e, KeepaliveReceived)
        ]

    async with sim_for(server, quiet, offline, accel=120):
        await eventually(
            lambda: len(links()) >= 2 and offline.connection_count >= 2,
            what="two keepalives and a reconnect",
        )
    # every 0.25 s (+-10 %) while the 5 s heartbeat is far away, never sooner
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(links())), links()
    # two unanswered heartbeats (0.25 s apart) make the pile drop and reconnect
    assert offline.connection_count >= 2
    assert quiet.connection_count == 1


# --- other commands -----------------------------------------------------------------------


async def test_query_parameters_locate_reboot_and_unknown_commands(server: TinyServer) -> None:
    pile = fast_pile()
    phy = pile.phy_id
    async with sim_for(server, pile):
        await server.wait_message(phy, 0x21, timeout=2)
        sent = await server.send(phy, ap3000.QueryStatus(phy, 20))
        await server.wait_message(phy, 0x20, timeout=1, since=sent)
        await server.wait_message(phy, 0x21, timeout=1, since=sent)

        limits = ap3000.SetLimits(phy, 21, max_charge_duration_s=7200, overload_power_w=1500.0)
        await server.send(phy, limits)
        await server.send(phy, ap3000.ReadLimits(phy, 22))
        _, read = await server.wait_message(phy, 0x92, timeout=1)
        assert isinstance(read, ap3000.Limits)
        assert (read.msg_id, read.max_charge_duration_s, read.overload_power_w) == (
            22,
            7200,
            1500.0,
        )
        assert [m.result for _, m in server.messages(phy, 0x85)] == [0]  # type: ignore[attr-defined]

        await server.send(phy, ap3000.ReadRunningParams1(phy, 23))
        _, params = await server.wait_message(phy, 0x90, timeout=1)
        assert isinstance(params, ap3000.RunningParams1) and params.heartbeat_interval_s == 30

        await server.send(phy, ap3000.UnknownMessage(phy, 24, 0x77, "00"))
        await server.send(phy, ap3000.SetWorkMode(phy, 25, work_mode=0))
        _, mode = await server.wait_message(phy, 0x8D, timeout=1)
        assert isinstance(mode, ap3000.SetWorkModeReply) and mode.msg_id == 25
        assert server.messages(phy, 0x77) == []

        await server.send(phy, ap3000.Reboot(phy, 26))
        _, reboot = await server.wait_message(phy, 0x87, timeout=1)
        assert isinstance(reboot, ap3000.RebootReply) and reboot.result == 0
        await eventually(lambda: len(server.connections) >= 2, timeout=2, interval=0.02)
    assert server.connections[0].closed_by_peer
    first = server.connections[1].events[0][1]
    assert isinstance(first, IccidReceived)
    received = [r.command for r in pile.received()]
    assert received[:3] == [0x20, 0x22, 0x21]  # the server's replies, in order
    assert all(r.flow is Flow.RECEIVED and r.t > 0 for r in pile.received())


# --- command line -------------------------------------------------------------------------


def test_cli_rejects_a_bad_server_and_runs_for_a_duration() -> None:
    runner = CliRunner()
    bad = runner.invoke(sim_command, ["--server", "nowhere"])
    assert bad.exit_code == 2 and "HOST:PORT" in bad.output
    # nothing listens on port 1: piles keep retrying until the duration ends
    result = runner.invoke(
        sim_command, ["--server", "127.0.0.1:1", "--ap3000", "2", "--duration-s", "0.5"]
    )
    assert result.exit_code == 0, result.output
    assert "simulating 2 AP3000 piles (04000001...)" in result.output
    assert "stopped after" in result.output and "connected 0" in result.output


async def test_cli_runs_against_a_server_and_stops_on_sigint(server: TinyServer) -> None:
    code = "from chargesim.cli import sim_command; sim_command()"
    args = ["--server", f"127.0.0.1:{server.port}", "--ap3000", "3", "--accel", "60"]
    args += ["--heartbeat-s", "30", "--status-every-s", "0.3", "--seed", "1"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await eventually(
            lambda: {c.messages()[0][1].phy_id for c in server.connections if c.messages()},
            lambda phy_ids: len(phy_ids) == 3,
            timeout=10,
        )
        assert proc.stdout is not None
        stdout = proc.stdout
        lines: list[bytes] = []

        async def status() -> bytes:  # the next line the simulator prints
            lines.append(await stdout.readline())
            return lines[-1]

        await eventually(status, lambda line: b"connected 3" in line, timeout=10)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            out, err = await proc.communicate()
        out = b"".join(lines) + out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "connected 3" in text and "stopped after" in text
    assert all(conn.closed_by_peer for conn in server.connections)
