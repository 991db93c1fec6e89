"""Daily partitions of the audit log (``frames``) and their retention.

Each UTC day gets its own partition ``frames_YYYYMMDD``, created a few days ahead;
partitions older than the retention are dropped whole (no slow DELETE). Rows that
land in the default partition (a day nobody created in time) are moved into their
day's partition when it is created, so nothing is lost.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

import structlog

from chargegw.store.database import Connection

log = structlog.get_logger("chargegw.partitions")

_NAME = re.compile(r"^frames_(\d{8})$")
#: serialises partition maintenance across processes and nodes (and keeps it out of a
#: backup: a partition dropped while pg_dump runs would fail the dump)
MAINTENANCE_LOCK = 0x43484750  # "CHGP"


def partition_name(day: date) -> str:
    return f"frames_{day:%Y%m%d}"


def _bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(0), tzinfo=UTC)
    return start, start + timedelta(days=1)


async def existing_partitions(conn: Connection) -> dict[date, str]:
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_class p ON p.oid = i.inhparent
           WHERE p.relname = 'frames'"""
    )
    out = {}
    for row in rows:
        match = _NAME.match(row["relname"])
        if match:
            out[datetime.strptime(match.group(1), "%Y%m%d").date()] = row["relname"]
    return out


async def ensure_partition(conn: Connection, day: date) -> bool:
    """Create the partition of ``day`` (moving its rows out of the default); True if new."""
    name = partition_name(day)
    start, end = _bounds(day)
    async with conn.transaction():
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
        if exists:
            return False
        await conn.execute(
            f"CREATE TABLE {name} (LIKE frames INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        await conn.execute(
            f"""WITH moved AS (
                    DELETE FROM frames_default
                    WHERE received_at >= $1 AND received_at < $2 RETURNING *)
                INSERT INTO {name} SELECT * FROM moved""",
            start,
            end,
        )
        await conn.execute(
            f"ALTER TABLE frames ATTACH PARTITION {name} FOR VALUES FROM ('{start.isoformat()}') "
            f"TO ('{end.isoformat()}')"
        )
    log.info("audit partition created", partition=name)
    return True


async def maintain(
    conn: Connection,
    *,
    today: date,
    retention_days: int,
    days_ahead: int = 2,
    wait: bool = True,
) -> tuple[list[str], list[str]]:
    """Create the partitions of today and the next days; drop the expired ones.

    With ``wait=False`` nothing is done while another process holds the maintenance lock
    (a gateway doing it, or a ``chargegw backup`` holding it shared for its dump): the
    partitions are made days ahead, the next pass catches up."""
    created: list[str] = []
    dropped: list[str] = []
    if wait:
        await conn.execute("SELECT pg_advisory_lock($1)", MAINTENANCE_LOCK)
    elif not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK):
        log.info("partition maintenance skipped: another process or a backup holds it")
        return created, dropped
    try:
        for offset in range(days_ahead + 1):
            day = today + timedelta(days=offset)
            if await ensure_partition(conn, day):
                created.append(partition_name(day))
        oldest = today - timedelta(days=retention_days)
        for day, name in sorted((await existing_partitions(conn)).items()):
            if day < oldest:
                await conn.execute(f"DROP TABLE {name}")
                dropped.append(name)
                log.info("audit partition dropped", partition=name, retention_days=retention_days)
        cutoff, _ = _bounds(oldest)
        await conn.execute("DELETE FROM frames_default WHERE received_at < $1", cutoff)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)
    return created, dropped
