"""The outbox's shared background work: expiry of commands nobody can deliver, and the
retention purge (one process at a time)."""

from __future__ import annotations

import pytest

from chargegw.app import Gateway
from chargegw.domain.outbox import Priority
from chargeproto import ap3000

from .metric_values import sample
from .piles import RawPile
from .waiting import eventually


async def test_scan_expires_unheld_commands_and_purges_old_ones(gateway: Gateway) -> None:
    pool = gateway.pool
    assert pool is not None
    await pool.execute(
        """INSERT INTO commands (device_id, protocol, name, priority, status, expires_at,
                                 finished_at)
           VALUES ('04000001', 'ap3000', 'start', 2, 'pending', now() - interval '1 s', NULL),
                  ('04000002', 'ap3000', 'locate', 2, 'pending', now() + interval '1 h', NULL),
                  ('04000003', 'ap3000', 'locate', 2, 'acked', now(), now() - interval '30 days'),
                  ('04000004', 'ap3000', 'locate', 2, 'acked', now(), now())"""
    )
    # a device held by a live process is not expired here: its owner delivers it
    await pool.execute(
        """INSERT INTO device_sessions (device_id, owner, connection_id, since, window_start)
           VALUES ('04000005', $1, 'c1', now(), now())""",
        gateway.cluster.owner,
    )
    await pool.execute(
        """INSERT INTO commands (device_id, protocol, name, priority, status, expires_at)
           VALUES ('04000005', 'ap3000', 'locate', 2, 'pending', now() - interval '1 s')"""
    )
    await pool.execute(
        "UPDATE commands SET created_at = now() - interval '1 h' WHERE device_id = '04000002'"
    )
    await gateway.outbox.scan()
    rows = {
        r["device_id"]: (r["status"], r["dead_reason"])
        for r in await pool.fetch("SELECT device_id, status, dead_reason FROM commands")
    }
    assert rows == {
        "04000001": ("dead", "offline"),
        "04000002": ("pending", None),
        "04000004": ("acked", None),
        "04000005": ("pending", None),
    }
    await gateway.writer.drained()
    dead = await pool.fetchval(
        "SELECT count(*) FROM device_events WHERE kind = 'command_dead' AND reason = 'offline'"
    )
    assert dead == 1
    # the figures of the scan: what is left open, how old, and the start that expired
    m = gateway.metrics
    assert sample(m, "chargegw_outbox_backlog", status="pending") == 2
    assert 3590 < sample(m, "chargegw_outbox_oldest_pending_seconds") < 3700
    assert sample(m, "chargegw_start_commands_total", protocol="ap3000", outcome="offline") == 1


@pytest.mark.settings(ack_timeout_s=0.2, command_spacing_s=0.0)
async def test_unanswered_frames_for_a_host_do_not_count_against_the_device(
    gateway: Gateway,
) -> None:
    pile = await RawPile("04000009").connect(gateway.server.port, iccid=None)
    await pile.register()
    await pile.expect(ap3000.RegistrationReply)
    await gateway.writer.drained()
    pool = gateway.pool
    assert pool is not None
    host_frame = {"phy_id": "81000001"}  # addressed to the host the pile sits behind
    async with pool.acquire() as conn, conn.transaction():
        for params in (host_frame, {}):
            await gateway.outbox.submit(
                conn,
                device_id="04000009",
                protocol="ap3000",
                name="locate",
                params={**params, "locate_duration_s": 1},
                priority=Priority.QUERY,
                expires_s=60,
            )
    gateway.outbox.wake("04000009")
    await eventually(  # both go unanswered (sent twice each), then die
        lambda: pool.fetchval(
            "SELECT count(*) FROM commands WHERE status = 'dead' AND dead_reason = 'no answer'"
        ),
        lambda dead: dead == 2,
        what="both commands dead without an answer",
    )
    # only the device's own command counts toward taking it offline
    assert gateway.sessions.devices["04000009"].ack_timeouts == 1
    await pile.close()
