"""The outbox's shared background work: expiry of commands nobody can deliver, and the
retention purge (one process at a time)."""

from __future__ import annotations

from chargegw.service import Gateway


async def test_scan_expires_unheld_commands_and_purges_old_ones(gateway: Gateway) -> None:
    pool = gateway.pool
    assert pool is not None
    await pool.execute(
        """INSERT INTO commands (device_id, protocol, name, priority, status, expires_at,
                                 finished_at)
           VALUES ('04000001', 'ap3000', 'locate', 2, 'pending', now() - interval '1 s', NULL),
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
