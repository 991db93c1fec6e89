"""Connection hygiene at scale (issue 6): flapping bans, frame-rate limits, the
connection limit derived from the open-file limit. Real TCP, real PostgreSQL."""

from __future__ import annotations

import resource
from collections.abc import AsyncIterator

import httpx
import pytest

from chargegw.api import cluster as cluster_routes
from chargegw.api.app import ApiState, create_app
from chargegw.app import Gateway
from chargegw.cluster.directory import rebalance
from chargegw.net.transport import FD_RESERVE, connection_limit
from chargeproto import ap3000

from .piles import RawPile
from .waiting import eventually

PHY = "04000077"


@pytest.fixture
def gateway_settings() -> dict[str, float]:
    return {
        "flap_max_connects": 3,
        "flap_window_s": 60.0,
        "flap_ban_s": 60.0,
        "frame_rate_per_connection": 10.0,
    }


@pytest.fixture
async def cluster_api(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    state = ApiState(
        pool=gateway.pool,
        metrics=gateway.metrics,
        readiness=gateway.readiness,
        auth_required=False,
        services=gateway.api_services(),
    )
    app = create_app(state, routers=[cluster_routes.router])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        yield client


async def _connect_and_register(gateway: Gateway) -> RawPile:
    pile = await RawPile(PHY).connect(gateway.server.port)
    await pile.register()
    return pile


async def _bans(api: httpx.AsyncClient) -> list[str]:
    return [b["device_id"] for b in (await api.get("/api/v1/bans")).json()["items"]]


async def test_a_device_that_reconnects_too_often_is_refused_for_a_while(
    gateway: Gateway, cluster_api: httpx.AsyncClient
) -> None:
    for _ in range(3):  # within the limit: each connection is answered
        pile = await _connect_and_register(gateway)
        await pile.expect(ap3000.RegistrationReply)
        await gateway.writer.drained()
        await pile.close()
    assert await _bans(cluster_api) == []

    pile = await _connect_and_register(gateway)  # the fourth: banned, closed
    assert await pile.closed_by_server(timeout=5)
    assert await _bans(cluster_api) == [PHY]
    ban = (await cluster_api.get("/api/v1/bans")).json()["items"][0]
    assert ban["reason"] == "flapping" and ban["connects"] == 4

    pile = await _connect_and_register(gateway)  # refused while banned: nothing answered
    assert await pile.closed_by_server(timeout=5)
    assert pile.received == []

    lifted = await cluster_api.delete(f"/api/v1/bans/{PHY}")
    assert lifted.status_code == 200
    assert (await cluster_api.delete(f"/api/v1/bans/{PHY}")).status_code == 404
    # the notification reaches the process
    await eventually(lambda: not gateway.cluster.banned(PHY), what=f"the ban of {PHY} lifted")
    pile = await _connect_and_register(gateway)
    await pile.expect(ap3000.RegistrationReply)
    await pile.close()


async def test_frames_over_the_rate_limit_are_slowed_down_not_dropped(gateway: Gateway) -> None:
    pile = await RawPile(PHY).connect(gateway.server.port)
    await pile.register()
    await pile.expect(ap3000.RegistrationReply)
    # 120 heartbeats at once: the burst allowance is 50 frames (10/s for 5 s)
    frames = b"".join(
        ap3000.encode(
            ap3000.Heartbeat(
                PHY,
                100 + n,
                voltage_v=220.0,
                ports=(ap3000.PortState(0, 0), ap3000.PortState(1, 0)),
                signal_strength=20,
                temperature_c=25,
            )
        )
        for n in range(120)
    )
    await pile.send_raw(frames)
    answered = []
    for _ in range(120):  # 50 at once, the other 70 at 10/s from the connection's backlog
        reply = await pile.expect(ap3000.HeartbeatReply, timeout=20)
        answered.append(reply.msg_id)
    assert answered == list(range(100, 220))  # every one answered, in order
    registry = gateway.metrics.registry
    throttled = registry.get_sample_value(
        "chargegw_frames_throttled_total", {"scope": "connection"}
    )
    assert throttled is not None and throttled >= 1
    # the backlog worked off, reading resumes: the next frame is answered
    msg_id = await pile.heartbeat()
    reply = await pile.expect(ap3000.HeartbeatReply, timeout=30)
    assert reply.msg_id == msg_id
    await pile.close()


def test_the_connection_limit_follows_the_open_file_limit() -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    allowed, files = connection_limit(0)
    assert files == resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= soft
    assert allowed == files - FD_RESERVE
    assert connection_limit(100) == (100, files)
    assert connection_limit(10**9) == (allowed, files)  # capped, with the reason logged


async def test_a_rebalance_sheds_connections_at_the_asked_rate(gateway: Gateway) -> None:
    piles = []
    for n in range(6):
        pile = await RawPile(f"0400010{n}").connect(gateway.server.port, iccid=None)
        await pile.register()
        await pile.expect(ap3000.RegistrationReply)
        piles.append(pile)
    await gateway.writer.drained()
    await gateway.cluster.beat()  # the row now says 6 connections
    pool = gateway.pool
    assert pool is not None
    # a second, idle process joins: the mean is 3, so this one sheds 3
    await pool.execute(
        """INSERT INTO cluster_processes (owner, node, worker, pid, connections)
           VALUES ('other/0/1', 'other', 0, 1, 0)"""
    )
    async with pool.acquire() as conn:
        plan = await rebalance(conn, rate=20.0)
    assert plan["target_per_process"] == 3
    assert plan["shed"] == {gateway.cluster.owner: 3}
    await gateway.cluster.beat()  # picks the request up and sheds in the background
    closed = 0
    for pile in piles:
        if await pile.closed_by_server(timeout=0.5 if closed >= 3 else 5):
            closed += 1
    assert closed == 3
    remaining = await pool.fetchval(
        "SELECT shed_remaining FROM cluster_processes WHERE owner = $1", gateway.cluster.owner
    )
    assert remaining == 0
    reasons = gateway.metrics.registry.get_sample_value(
        "chargegw_connections_closed_total", {"reason": "rebalance"}
    )
    assert reasons == 3
    for pile in piles:
        await pile.close()


async def test_a_rebalance_needs_a_positive_rate(gateway: Gateway) -> None:
    assert gateway.pool is not None
    async with gateway.pool.acquire() as conn:
        with pytest.raises(ValueError, match="rate"):
            await rebalance(conn, rate=0)
        plan = await rebalance(conn, rate=5, dry_run=True)
    assert plan["dry_run"] and plan["processes"] == 1
