"""Scheduled housekeeping: retention of the device event log, audit partitions, events,
finished commands and webhook deliveries, each counted in the metrics; the autovacuum
settings of migration 0018."""

from __future__ import annotations

from datetime import timedelta

from chargegw.app import Gateway
from chargegw.domain import call_audit
from chargegw.ops.dbstats import db_stats
from chargegw.store.partitions import ensure_partition, existing_partitions


def _sample(gateway: Gateway, name: str, **labels: str) -> float:
    value = gateway.metrics.registry.get_sample_value(f"chargegw_{name}", labels)
    return 0.0 if value is None else value


async def test_each_job_deletes_past_its_retention_and_is_counted_and_hot_tables_are_tuned(
    gateway: Gateway,
) -> None:
    pool = gateway.pool
    assert pool is not None
    await pool.execute(
        """INSERT INTO device_events (device_id, at, kind)
           SELECT 'D1', now() - make_interval(days => d), 'report'
             FROM unnest(ARRAY[400, 200, 100, 1, 0]) AS d"""
    )
    await pool.execute(
        """INSERT INTO events (id, type, at) SELECT n, 'device.online', now() - interval '40 days'
             FROM generate_series(1, 3) n"""
    )
    await pool.execute("UPDATE event_sequencer SET last_id = 3")
    await pool.execute(
        """INSERT INTO commands (device_id, protocol, name, priority, status, expires_at,
                                 finished_at)
           VALUES ('D1', 'ap3000', 'read_running_params1', 5, 'acked', now(),
                   now() - interval '30 days')"""
    )
    old_day = gateway.wall().date() - timedelta(days=gateway.settings.audit_retention_days + 5)
    async with pool.acquire() as conn:
        await ensure_partition(conn, old_day)

    await gateway._purge_device_events()
    await gateway._maintain_partitions()
    await gateway.events.purge_expired()
    await gateway.outbox.scan()
    await gateway.webhooks.purge()
    gateway.call_audit.purged(await call_audit.purge(pool, 90))

    ages = await pool.fetch("SELECT (now() - at) > interval '2 days' AS old FROM device_events")
    assert [r["old"] for r in ages] == [False, False]  # 90 days kept by default
    assert await pool.fetchval("SELECT count(*) FROM events") == 0
    assert await pool.fetchval("SELECT count(*) FROM commands") == 0
    async with pool.acquire() as conn:
        assert old_day not in await existing_partitions(conn)

    deleted = {"device_events": 3, "events": 3, "commands": 1}
    for job, count in deleted.items():
        assert _sample(gateway, "housekeeping_rows_deleted_total", task=job) == count, job
    jobs = ("audit_partitions", "device_events", "events", "commands")
    for job in (*jobs, "webhook_deliveries", "call_audit"):
        assert _sample(gateway, "housekeeping_runs_total", task=job, result="ok") >= 1, job
        stamp = _sample(gateway, "housekeeping_last_success_timestamp_seconds", task=job)
        assert abs(stamp - gateway.wall().timestamp()) < 60, job
    dropped = _sample(gateway, "housekeeping_partitions_total", table="frames", action="dropped")
    created = _sample(gateway, "housekeeping_partitions_total", table="frames", action="created")
    assert dropped == 1 and created == 3  # today and two days ahead, at the start
    exposition = gateway.metrics.render()[0].decode()
    assert 'chargegw_housekeeping_rows_deleted_total{task="device_events"} 3.0' in exposition

    # migration 0018: the hot tables' storage settings
    async with pool.acquire() as conn:
        stats = await db_stats(conn)
    options = {t["name"]: t["options"] for t in stats["tables"]}
    assert "fillfactor=80" in options["devices"] and "fillfactor=80" in options["ports"]
    assert "autovacuum_vacuum_scale_factor=0.02" in options["commands"]
    assert "autovacuum_vacuum_scale_factor=0.02" in options["events"]
