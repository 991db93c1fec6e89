"""Retention of the device event log (``device_events``): rows older than
``device_events_retention_days`` are deleted in batches, oldest id first, by one process
at a time (the others skip the pass). The hourly maintenance of ``chargegw.app`` runs it.

Ids follow the order rows were written, and ``at`` is the gateway's clock when it wrote
them, so the oldest ids are the old rows; a young row among them (held back during an
outage) only waits, it never stops the rows behind it from being reached later.
"""

from __future__ import annotations

from chargegw.store.database import Connection

__all__ = ["BATCH", "purge_device_events"]

#: rows deleted per transaction
BATCH = 5000
#: one process at a time (``pg_try_advisory_xact_lock``)
_LOCK = 0x43474445  # "CGDE"


async def purge_device_events(
    conn: Connection, *, retention_days: float, batch: int = BATCH
) -> int | None:
    """Delete device events older than ``retention_days``, ``batch`` per transaction;
    the number deleted, or None when another process is at it."""
    total = 0
    while True:
        async with conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
                return None if total == 0 else total
            deleted = int(
                await conn.fetchval(
                    """WITH head AS (SELECT id, at FROM device_events ORDER BY id LIMIT $2),
                            gone AS (DELETE FROM device_events d USING head
                                      WHERE d.id = head.id
                                        AND head.at < now() - make_interval(secs => $1 * 86400)
                                      RETURNING 1)
                       SELECT count(*) FROM gone""",
                    float(retention_days),
                    batch,
                )
            )
        total += deleted
        if deleted < batch:
            return total
