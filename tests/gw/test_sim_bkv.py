"""Simulated BKV gateways against a tiny real TCP server built on chargeproto.

The server detects the protocol per connection (``chargeproto.StreamDecoder``), so the
same server also serves AP3000 piles for the mixed-fleet test. Timing assertions are on
counts and spacing within generous bounds, never exact times.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest
from click.testing import CliRunner

from chargeproto import (
    ABSENT,
    Direction,
    IccidReceived,
    Message,
    MessageReceived,
    StreamDecoder,
    ap3000,
    bkv,
)
from chargeproto import Event as StreamEvent
from chargesim import (
    BkvIntervals,
    Faults,
    SimulatedBkvGateway,
    Simulator,
    bkv_gateway_id,
    make_ap3000_piles,
    make_bkv_gateways,
)
from chargesim.cli import sim_command

from .waiting import eventually

SERVER_TIME = "2024-08-23T10:17:29"
_M = TypeVar("_M", bound=Message)
_END_REPORTS = (bkv.EndReport, bkv.PowerTierEndReport, bkv.FeeModeEndReport)


def encode(message: Message) -> bytes:
    if isinstance(message, bkv.BkvMessage):
        return bkv.encode(message)
    assert isinstance(message, ap3000.Ap3000Message)
    return ap3000.encode(message)


def device_of(message: Message) -> str:
    if isinstance(message, bkv.BkvMessage):
        return message.gateway_id
    assert isinstance(message, ap3000.Ap3000Message)
    return message.phy_id


class ServerConnection:
    def __init__(self, number: int, writer: asyncio.StreamWriter) -> None:
        self.number = number
        self.writer = writer
        self.events: list[tuple[float, StreamEvent]] = []
        self.closed_by_peer = False

    def messages(self) -> list[tuple[float, Message]]:
        return [(t, e.message) for t, e in self.events if isinstance(e, MessageReceived)]


class TinyServer:
    """Answers heartbeats and status clusters; acknowledges end reports after N copies.

    ``end_ack_form``: ``"0x0C"`` (what real gateways honour) or ``"0x02"`` (a 0x02
    sub-command with socket + result, which they ignore). AP3000 registration,
    heartbeat and time requests are answered too.
    """

    def __init__(self) -> None:
        self.answer_heartbeat = True
        self.answer_status = True
        self.ack_end_after = 1
        self.end_ack_form = "0x0C"
        self.connections: list[ServerConnection] = []
        self._by_device: dict[str, ServerConnection] = {}
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
        decoder = StreamDecoder()
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(4096):
                for event in decoder.feed(data):
                    conn.events.append((loop.time(), event))
                    if isinstance(event, MessageReceived):
                        self._by_device[device_of(event.message)] = conn
                        reply = self._reply(event.message)
                        if reply is not None:
                            writer.write(encode(reply))
                self._pulse.set()
                self._pulse = asyncio.Event()
        except ConnectionError:
            pass
        conn.closed_by_peer = True

    def _reply(self, m: Message) -> Message | None:
        if isinstance(m, ap3000.Registration):
            return ap3000.RegistrationReply(m.phy_id, m.msg_id, result=0)
        if isinstance(m, ap3000.Heartbeat):
            return ap3000.HeartbeatReply(m.phy_id, m.msg_id, result=0)
        if isinstance(m, ap3000.TimeRequest):
            return ap3000.TimeReply(m.phy_id, m.msg_id, timestamp_unix=1_700_000_000)
        if isinstance(m, bkv.Heartbeat) and self.answer_heartbeat:
            return bkv.HeartbeatReply(m.gateway_id, m.seq, server_time=SERVER_TIME)
        if isinstance(m, bkv.StatusCluster) and self.answer_status:
            return bkv.StatusClusterAck.create(m.gateway_id, m.seq, result=1)
        if isinstance(m, _END_REPORTS):
            key = (m.socket, m.port, m.business_no)
            copies = [
                r
                for _, r in self.messages(m.gateway_id, type(m))
                if (r.socket, r.port, r.business_no) == key
            ]
            if len(copies) < self.ack_end_after:
                return None
            if isinstance(m, bkv.FeeModeEndReport):
                return bkv.FeeModeEndAck.create(
                    m.gateway_id, m.seq, result=1, socket=m.socket, port=m.port
                )
            assert isinstance(m.socket, int)
            if self.end_ack_form == "0x0C":
                return bkv.CardEndAck(m.gateway_id, m.seq, socket=m.socket, result=1)
            params = bytes((m.socket, 1)).hex()
            return bkv.UnknownSubCommand(m.gateway_id, m.seq, 0x0015, 0x02, params, Direction.DOWN)
        return None

    def messages(self, device: str, cls: type[_M] = Message) -> list[tuple[float, _M]]:  # type: ignore[assignment]
        out = [
            (t, m)
            for conn in self.connections
            for t, m in conn.messages()
            if device_of(m) == device and isinstance(m, cls)
        ]
        return sorted(out, key=lambda item: item[0])

    async def send(self, message: bkv.BkvMessage) -> float:
        """Send to the gateway's latest connection; returns the send time."""
        conn = self._by_device[message.gateway_id]
        conn.writer.write(bkv.encode(message))
        await conn.writer.drain()
        return asyncio.get_running_loop().time()

    async def wait_message(
        self,
        device: str,
        cls: type[_M],
        *,
        timeout: float,
        since: float = 0.0,
        where: Callable[[_M], bool] = lambda m: True,
    ) -> tuple[float, _M]:
        async with asyncio.timeout(timeout):
            while True:
                pulse = self._pulse
                for t, m in self.messages(device, cls):
                    if t >= since and where(m):
                        return t, m
                await pulse.wait()


@pytest.fixture
async def server() -> AsyncIterator[TinyServer]:
    srv = TinyServer()
    await srv.start()
    yield srv
    await srv.close()


def gateway(number: int = 1, *, resend_s: float = 30, **options: object) -> SimulatedBkvGateway:
    """Two sockets, 30 s (gateway) heartbeats and status clusters."""
    intervals = BkvIntervals(status_s=30, end_report_resend_s=resend_s)
    return SimulatedBkvGateway(
        bkv_gateway_id(number),
        heartbeat_s=30,
        intervals=intervals,
        **options,  # type: ignore[arg-type]
    )


def sim_for(server: TinyServer, *piles: object, accel: float = 60) -> Simulator:
    return Simulator(
        "127.0.0.1",
        server.port,
        piles,  # type: ignore[arg-type]
        accel=accel,
        jitter=0.1,
        seed=5,
        reconnect_min_s=0.1,
    )


def start_by_time(
    gw: str, seq: int, *, minutes: int, socket: int = 1, port: int = 0, switch: int = 1
) -> bkv.ChargeControl:
    return bkv.ChargeControl(
        gw,
        seq,
        socket=socket,
        port=port,
        switch=switch,
        charge_mode=1,
        duration_min=minutes,
        energy_kwh=0.5,  # real gateways accept a non-zero energy field by time
    )


def socket_of(cluster: bkv.StatusCluster) -> int | None:
    """The socket of a one-socket status cluster (as the simulator sends them)."""
    assert cluster.sockets is not ABSENT and len(cluster.sockets) == 1
    number = cluster.sockets[0].socket
    return None if number is ABSENT else number


def jack_status(cluster: Message, socket: int, port: int) -> bkv.JackStatus:
    assert isinstance(cluster, bkv.StatusCluster) and cluster.sockets is not ABSENT
    for group in cluster.sockets:
        if group.socket == socket:
            assert group.ports is not ABSENT
            for jack in group.ports:
                if jack.port == port:
                    return jack
    raise AssertionError(f"no jack {socket}/{port} in {cluster}")


# --- ids ----------------------------------------------------------------------------------


def test_generated_gateway_ids_and_iccids() -> None:
    gateways = make_bkv_gateways(3, sockets=4, id_start=2700)
    assert [g.gateway_id for g in gateways] == [
        "82231214002700",
        "82231214002701",
        "82231214002702",
    ]
    assert all(len(g.sockets) == 4 for g in gateways)
    assert sorted(gateways[0].sockets) == [1, 2, 3, 4]
    iccids = {g.iccid for g in gateways}
    assert len(iccids) == 3 and all(len(i) == 20 and i.startswith("898604") for i in iccids)
    with pytest.raises(ValueError, match="999999"):
        make_bkv_gateways(2, id_start=999_999)
    with pytest.raises(ValueError, match="14 hex digits"):
        SimulatedBkvGateway("1234")


# --- connecting ---------------------------------------------------------------------------


async def test_connect_heartbeat_0x1013_status_clusters_acked_and_heartbeats_repeat(
    server: TinyServer,
) -> None:
    gw = gateway()

    def quiet_after_enough() -> bool:
        """Four heartbeats and eight clusters in, and every one answered."""
        clusters = len(server.messages(gw.gateway_id, bkv.StatusCluster))
        beats = len(server.messages(gw.gateway_id, bkv.Heartbeat))
        stats = gw.bkv_stats
        answered = stats.status_acked == stats.status_sent == clusters
        return clusters >= 8 and beats >= 4 and answered and stats.heartbeats_answered == beats

    async with sim_for(server, gw):
        await server.wait_message(gw.gateway_id, bkv.Heartbeat, timeout=2)
        await eventually(quiet_after_enough, timeout=5, interval=0.01)
    assert not gw.connected
    (conn,) = server.connections
    # bkv.md 12: no ICCID preamble; the heartbeat carries it
    assert not any(isinstance(e, IccidReceived) for _, e in conn.events)
    messages = [m for _, m in conn.messages()]
    first = messages[0]
    assert isinstance(first, bkv.Heartbeat)
    assert (first.iccid, first.firmware_version, first.seq) == (gw.iccid, "cV.1r46", 0)
    # then the undocumented 0x1013 per socket, then a status cluster per socket
    opening = [m for m in messages[1:3] if isinstance(m, bkv.TlvContainer)]
    assert [m.bkv_cmd for m in opening] == [0x1013, 0x1013]
    assert [m.socket for m in opening] == [1, 2]  # the global tag 0x4A is named
    clusters = [m for m in messages if isinstance(m, bkv.StatusCluster)]
    assert isinstance(messages[3], bkv.StatusCluster)
    # every 0.5 s +-10 % per socket after the first two
    assert len(clusters) >= 8, len(clusters)
    assert {jack_status(c, 1, 0).status_bits for c in clusters if socket_of(c) == 1} == {0x80}
    assert jack_status(clusters[0], 1, 1).voltage_v == 220.0
    assert gw.bkv_stats.status_acked == gw.bkv_stats.status_sent == len(clusters)
    beats = [t for t, m in conn.messages() if isinstance(m, bkv.Heartbeat)]
    assert len(beats) >= 4, beats
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert all(0.4 <= g <= 0.6 for g in gaps), gaps
    assert gw.bkv_stats.heartbeats_answered == len(beats)
    assert gw.server_time == SERVER_TIME
    assert gw.device_time().strftime("%Y-%m-%d") == "2024-08-23"  # clock set by the server


# --- charging -----------------------------------------------------------------------------


async def test_start_by_time_charges_ends_at_the_limit_and_resends_until_0x0c_ack(
    server: TinyServer,
) -> None:
    server.ack_end_after = 3
    gw = gateway(resend_s=30)  # accel 120: clusters every 0.25 s, resends every 0.25 s
    g = gw.gateway_id
    async with sim_for(server, gw, accel=120):
        await server.wait_message(g, bkv.StatusCluster, timeout=2)
        # 3 minutes = 180 gateway seconds = 1.5 s at accel 120
        sent = await server.send(start_by_time(g, 0x00120034, minutes=3))
        t_reply, reply = await server.wait_message(g, bkv.ChargeControlReply, timeout=1)
        assert isinstance(reply, bkv.ChargeControlReply)
        assert (reply.seq, reply.result, reply.socket, reply.port) == (0x00120034, 1, 1, 0)
        business_no = reply.business_no
        assert business_no == 1

        # the socket's next report already shows the charge (no wall-clock bound here: a
        # loaded CI machine delays the simulator's loop by most of a second)
        def reported_after_reply() -> list[bkv.StatusCluster]:
            ordered = [m for _, m in server.messages(g)]
            return [
                m
                for m in ordered[ordered.index(reply) + 1 :]
                if isinstance(m, bkv.StatusCluster) and socket_of(m) == 1
            ]

        await eventually(reported_after_reply, timeout=2, what="a report after the reply")
        assert jack_status(reported_after_reply()[0], 1, 0).status_bits == 0x90
        t_end, end = await server.wait_message(g, bkv.EndReport, timeout=4)
        assert t_end - sent >= 1.3  # never before the limit
        assert isinstance(end, bkv.EndReport)
        assert (end.socket, end.port, end.business_no, end.seq) == (1, 0, business_no, 0)
        assert end.duration_min == 3 and end.status_bits == 0xB0
        assert 0.008 <= end.energy_kwh <= 0.012  # 200 W +-10 % for 3 min
        # resent every 0.25 s until the third copy is acknowledged in the 0x0C form
        await server.wait_message(g, bkv.EndReport, timeout=2, since=t_end + 0.4)
        # acknowledged: nothing is left to resend (the socket resends only from that list)
        await eventually(lambda: not gw.end_reports, what="the end report acknowledged")
        copies = server.messages(g, bkv.EndReport)
        assert len(copies) == 3 and {m for _, m in copies} == {end}
        assert not gw.end_reports and gw.bkv_stats.end_reports_acked == 1
        assert gw.jack(1, 0).session is None
    during = [
        jack_status(m, 1, 0)
        for t, m in server.messages(g, bkv.StatusCluster)
        if t_reply < t < t_end and socket_of(m) == 1
    ]
    # charging until the limit; a report built as the session ended may arrive just before
    # the end report (separate tasks), and from then on the socket stays idle
    bits = [j.status_bits for j in during]
    ended = bits.index(0x80) if 0x80 in bits else len(bits)
    assert set(bits[ended:]) <= {0x80}, bits
    charging = during[:ended]
    assert len(charging) >= 4
    assert all(j.status_bits == 0x90 and j.business_no == business_no for j in charging)
    energies = [float(j.energy_kwh) for j in charging]  # type: ignore[arg-type]
    assert energies == sorted(energies) and energies[-1] > energies[0]
    assert all(150 < float(j.power_w) < 250 for j in charging[1:])  # type: ignore[arg-type]
    after = [m for t, m in server.messages(g, bkv.StatusCluster) if t > t_end and socket_of(m) == 1]
    assert jack_status(after[0], 1, 0).status_bits == 0x80  # "a status report follows"


async def test_stop_and_a_wrong_ack_form_make_the_gateway_reconnect_and_resend(
    server: TinyServer,
) -> None:
    server.end_ack_form = "0x02"  # the form real gateways ignore
    gw = gateway(resend_s=10)  # accel 60: resends every ~0.17 s
    g = gw.gateway_id
    async with sim_for(server, gw, accel=60):
        await server.wait_message(g, bkv.StatusCluster, timeout=2)
        sent = await server.send(start_by_time(g, 7, minutes=600, socket=2, port=1))
        _, started = await server.wait_message(g, bkv.ChargeControlReply, timeout=1)
        await server.wait_message(  # the socket reports the charge
            g,
            bkv.StatusCluster,
            timeout=1,
            since=sent,
            where=lambda m: socket_of(m) == 2 and jack_status(m, 2, 1).status_bits == 0x90,
        )
        await server.send(start_by_time(g, 8, minutes=0, socket=2, port=1, switch=0))
        _, stopped = await server.wait_message(
            g, bkv.ChargeControlReply, timeout=1, where=lambda m: m.seq == 8
        )
        assert isinstance(started, bkv.ChargeControlReply)
        assert isinstance(stopped, bkv.ChargeControlReply)
        assert stopped.result == 1 and stopped.business_no == started.business_no
        _, end = await server.wait_message(g, bkv.EndReport, timeout=1)
        assert isinstance(end, bkv.EndReport)
        assert (end.socket, end.port, end.status_bits) == (2, 1, 0x90)  # stopped by the server
        assert end.duration_min <= 1
        # three resends, then the gateway closes the connection and starts again
        await eventually(lambda: server.connections[0].closed_by_peer, timeout=3, interval=0.01)
        server.end_ack_form = "0x0C"  # before the reconnect (0.1 s backoff)
        await eventually(lambda: len(server.connections) >= 2, timeout=1, interval=0.02)
        assert len(server.connections[0].messages()) > 0
        first_copies = [m for _, m in server.connections[0].messages() if m == end]
        assert len(first_copies) == 4
        assert server.connections[0].closed_by_peer
        assert gw.bkv_stats.wrong_end_acks == 4
        await eventually(
            lambda: any(m == end for _, m in server.connections[1].messages()),
            timeout=1,
            interval=0.02,
        )
        await eventually(lambda: not gw.end_reports, what="the end report acknowledged")
    second = [m for _, m in server.connections[1].messages()]
    assert isinstance(second[0], bkv.Heartbeat)
    assert isinstance(second[1], bkv.TlvContainer) and second[1].bkv_cmd == 0x1013
    assert isinstance(second[2], bkv.TlvContainer)  # socket 2's
    assert second[3] == end  # the same end report again
    assert sum(1 for m in second if m == end) == 1  # acknowledged at once this time


async def test_power_tier_and_fee_mode_sessions_end_with_their_reports(
    server: TinyServer,
) -> None:
    gw = gateway()
    g = gw.gateway_id
    async with sim_for(server, gw, accel=120):
        await server.wait_message(g, bkv.StatusCluster, timeout=2)
        tiers = (bkv.PowerTier(100.0, 50, 60), bkv.PowerTier(400.0, 10, 2))
        # 10 fen at 10 fen per 2 min in the 400 W tier: 2 minutes (1 s)
        await server.send(bkv.PowerTierControl(g, 21, 1, 0, 1, amount_cent=10, tiers=tiers))
        # 1 fen at 100 fen/kWh (50 + 50, service by energy) at ~200 W: ~3 minutes (1.5 s)
        fee = bkv.FeeModeControl.create(
            g,
            22,
            socket=2,
            port=0,
            switch=1,
            charge_mode=4,
            control_type=1,
            amount_cent=1,
            service_fee_mode=1,
            tier_count=1,
            fee_tiers=(bkv.FeeTier("23:59", 50, 50),),
        )
        await server.send(fee)
        _, tier_reply = await server.wait_message(
            g, bkv.UnknownSubCommand, timeout=1, where=lambda m: m.sub_cmd == 0x17
        )
        assert isinstance(tier_reply, bkv.UnknownSubCommand) and tier_reply.seq == 21
        assert tier_reply.params_hex == "0101000001"  # result, socket, port, business_no
        _, fee_reply = await server.wait_message(g, bkv.FeeModeControlReply, timeout=1)
        assert isinstance(fee_reply, bkv.FeeModeControlReply)
        assert (fee_reply.seq, fee_reply.result, fee_reply.business_no) == (22, 1, 1)
        _, tier_end = await server.wait_message(g, bkv.PowerTierEndReport, timeout=3)
        _, fee_end = await server.wait_message(g, bkv.FeeModeEndReport, timeout=3)
        # acknowledged: 0x0C for 0x18, 0x1004 ACK for 0x1004
        await eventually(lambda: not gw.end_reports, what="both end reports acknowledged")
    assert isinstance(tier_end, bkv.PowerTierEndReport)
    assert (tier_end.duration_min, tier_end.amount_cent) == (2, 10)
    assert tier_end.tier_durations_min == (0, 2) and tier_end.end_reason == 2
    assert tier_end.end_time.startswith("2024-08-23T")  # the gateway's clock
    assert isinstance(fee_end, bkv.FeeModeEndReport)
    assert (fee_end.socket, fee_end.port, fee_end.charge_mode, fee_end.end_reason) == (2, 0, 4, 2)
    assert fee_end.electricity_fee_cent + fee_end.service_fee_cent == 1  # type: ignore[operator]
    assert 2 <= fee_end.duration_min <= 4  # type: ignore[operator]
    assert fee_end.tier_usage[0].duration_min == fee_end.duration_min  # type: ignore[index]


async def test_query_state_or_cluster_and_parameters(server: TinyServer) -> None:
    state = gateway(1)
    clustered = gateway(2, query_reply="cluster")
    async with sim_for(server, state, clustered):
        await server.wait_message(clustered.gateway_id, bkv.StatusCluster, timeout=2)
        await server.wait_message(state.gateway_id, bkv.StatusCluster, timeout=2)
        await server.send(bkv.SocketQuery(state.gateway_id, 31, socket=2))
        _, reply = await server.wait_message(state.gateway_id, bkv.SocketState, timeout=1)
        assert isinstance(reply, bkv.SocketState) and (reply.seq, reply.socket) == (31, 2)
        assert [p.port for p in reply.ports] == [0, 1]
        assert all(p.status_bits == 0x80 for p in reply.ports)

        sent = await server.send(bkv.SocketQuery(clustered.gateway_id, 32, socket=1))
        t, cluster = await server.wait_message(
            clustered.gateway_id, bkv.StatusCluster, timeout=1, since=sent
        )
        assert t - sent < 0.2 and cluster.seq == 0
        assert server.messages(clustered.gateway_id, bkv.SocketState) == []

        g = state.gateway_id
        await server.send(bkv.SetParams.create(g, 33, socket=1, max_charge_duration_min=30))
        _, set_reply = await server.wait_message(g, bkv.SetParamsReply, timeout=1)
        assert isinstance(set_reply, bkv.SetParamsReply) and set_reply.result == 1
        await server.send(bkv.QueryParams.create(g, 34, socket=1))
        _, params = await server.wait_message(g, bkv.ParamsReport, timeout=1)
        assert isinstance(params, bkv.ParamsReport)
        assert (params.seq, params.result, params.max_charge_duration_min) == (34, 1, 30)
        assert params.power_limit_w == 700.0
        assert [i.tag for i in params.raw_items] == [0x98, 0x99, 0x9A, 0x9B]
        await server.send(bkv.QueryParams.create(g, 35, socket=9))
        _, missing = await server.wait_message(
            g, bkv.ParamsReport, timeout=1, where=lambda m: m.seq == 35
        )
        assert missing.result == 0


# --- faults -------------------------------------------------------------------------------


async def test_refusal_silence_and_answer_only_resend(server: TinyServer) -> None:
    refusing = gateway(1, faults=Faults(refuse_with=0))
    silent = gateway(2, faults=Faults(silent=True))
    resend = gateway(3, faults=Faults(answer_only_resend=True))
    async with sim_for(server, refusing, silent, resend):
        for gw in (refusing, silent, resend):
            await server.wait_message(gw.gateway_id, bkv.StatusCluster, timeout=2)

        await server.send(start_by_time(refusing.gateway_id, 41, minutes=10))
        _, refused = await server.wait_message(
            refusing.gateway_id, bkv.ChargeControlReply, timeout=1
        )
        assert isinstance(refused, bkv.ChargeControlReply)
        assert (refused.seq, refused.result, refused.business_no) == (41, 0, 0)
        assert refusing.jack(1, 0).session is None

        s = silent.gateway_id
        sent = await server.send(start_by_time(s, 42, minutes=10))
        await server.send(bkv.SocketQuery(s, 43, socket=1))
        await eventually(lambda: silent.stats.commands_ignored == 2, what="both ignored")
        await server.wait_message(s, bkv.Heartbeat, timeout=2, since=sent)  # still alive
        assert server.messages(s, bkv.ChargeControlReply) == []
        assert server.messages(s, bkv.SocketState) == []
        silent.faults.silent = False
        await server.send(start_by_time(s, 42, minutes=10))  # the resend
        _, late = await server.wait_message(s, bkv.ChargeControlReply, timeout=1)
        assert late.result == 1

        r = resend.gateway_id
        await server.send(start_by_time(r, 44, minutes=10))
        await eventually(lambda: resend.stats.commands_ignored == 1, what="the first copy ignored")
        assert server.messages(r, bkv.ChargeControlReply) == []
        again = await server.send(start_by_time(r, 44, minutes=10))  # same frame seq
        t, answered = await server.wait_message(r, bkv.ChargeControlReply, timeout=1)
        assert t >= again and answered.result == 1
        await server.send(start_by_time(r, 44, minutes=10))  # a third copy: same answer
        await eventually(lambda: len(server.messages(r, bkv.ChargeControlReply)) >= 2)
        replies = [m for _, m in server.messages(r, bkv.ChargeControlReply)]
        assert len(replies) == 2 and replies[0] == replies[1]
        assert resend.jack(1, 0).business_no == 1  # started once


async def test_garbage_is_skipped_by_the_server(server: TinyServer) -> None:
    gw = gateway(faults=Faults(garbage=9))
    async with sim_for(server, gw):
        await server.wait_message(gw.gateway_id, bkv.StatusCluster, timeout=2)
        await eventually(
            lambda: (
                len(server.messages(gw.gateway_id, bkv.Heartbeat)) >= 2
                and gw.bkv_stats.status_acked >= 2
            ),
            what="two heartbeats and two clusters acknowledged through the garbage",
        )


# --- mixed fleets ---------------------------------------------------------------------------


async def test_mixed_simulator_with_ap3000_piles_and_bkv_gateways(server: TinyServer) -> None:
    piles = make_ap3000_piles(2, heartbeat_s=30)
    gateways = make_bkv_gateways(2, sockets=3, heartbeat_s=30)

    def every_socket_reported() -> bool:
        clusters = [server.messages(gw.gateway_id, bkv.StatusCluster) for gw in gateways]
        return (
            len(server.connections) == 4
            and all(c.messages() for c in server.connections)
            and all({socket_of(m) for _, m in sent} == {1, 2, 3} for sent in clusters)
        )

    async with sim_for(server, *piles, *gateways) as sim:
        await sim.wait_connected(timeout=3)
        await eventually(every_socket_reported, what="a status cluster from every socket")
        stats = sim.stats()
    assert not sim.errors
    assert stats.by_protocol == (("ap3000", 2, 2), ("bkv", 2, 2))
    assert "piles 4 (ap3000 2, bkv 2) connected 4 (ap3000 2, bkv 2)" in stats.line()
    assert len(server.connections) == 4
    for conn in server.connections:
        first_event = conn.events[0][1]
        first = conn.messages()[0][1]
        if isinstance(first, bkv.BkvMessage):
            assert isinstance(first, bkv.Heartbeat) and isinstance(first_event, MessageReceived)
            seqs = {m.seq for _, m in conn.messages() if isinstance(m, bkv.BkvMessage)}
            assert seqs == {0}  # device-initiated frames only
        else:
            assert isinstance(first_event, IccidReceived)  # AP3000 modems send the ICCID
            assert isinstance(first, ap3000.Registration)
    for gw in gateways:
        clusters = server.messages(gw.gateway_id, bkv.StatusCluster)
        assert {socket_of(m) for _, m in clusters} == {1, 2, 3}


def test_cli_counts_bkv_gateways() -> None:
    runner = CliRunner()
    args = ["--server", "127.0.0.1:1", "--ap3000", "0", "--bkv", "2", "--bkv-sockets", "4"]
    result = runner.invoke(sim_command, [*args, "--duration-s", "0.3"])
    assert result.exit_code == 0, result.output
    assert "simulating 2 BKV gateways (82231214000001...) with 4 sockets" in result.output
    assert "AP3000" not in result.output
    assert "piles 2 (bkv 2) connected 0 (bkv 0)" in result.output
    bad = runner.invoke(sim_command, [*args, "--bkv-id-start", "999999"])
    assert bad.exit_code == 2 and "999999" in bad.output
