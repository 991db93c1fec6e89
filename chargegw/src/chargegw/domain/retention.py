"""Retention of the device event log (``device_events``): rows older than
``device_events_retention_days`` are deleted in batches, oldest id first, by one process
at a time (the others skip the pass). The hourly maintenance of ``chargegw.app`` runs it.

Old rows are taken in id order, which is about the order of ``at``; a young row among
them (a clock that ran ahead) is passed over, not waited for. A pass pauses between
batches and stops after ``PASS_BUDGET_S`` (the next pass goes on), so a first run over a
long history is no burst of I/O and WAL.
"""

from __future__ import annotations

import asyncio
import time

from chargegw.store.database import Connection

__all__ = ["BATCH", "purge_device_events"]

#: rows deleted per transaction
BATCH = 5000
#: pause between two batches, and the longest one pass goes on
PAUSE_S = 0.2
PASS_BUDGET_S = 60.0
#: one process at a time (``pg_try_advisory_xact_lock``)
_LOCK = 0x43474445  # "CGDE"


async def purge_device_events(
    conn: Connection, *, retention_days: float, batch: int = BATCH
) -> int | None:
    """Delete device events older than ``retention_days``, ``batch`` per transaction;
    the number deleted, or None when another process is at it."""
    total = 0
    deadline = time.monotonic() + PASS_BUDGET_S
    while True:
        async with conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
                return None if total == 0 else total
            deleted = int(
                await conn.fetchval(
                    """WITH old AS (SELECT id FROM device_events
                                     WHERE at < now() - make_interval(secs => $1 * 86400)
                                     ORDER BY id LIMIT $2),
                            gone AS (DELETE FROM device_events d USING old
                                      WHERE d.id = old.id RETURNING 1)
                       SELECT count(*) FROM gone""",
                    float(retention_days),
                    batch,
                )
            )
        total += deleted
        if deleted < batch or time.monotonic() > deadline:
            return total
        await asyncio.sleep(PAUSE_S)
