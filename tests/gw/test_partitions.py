"""Daily audit partitions: created ahead, rows of the default partition moved, old dropped."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import asyncpg

from chargegw.store.partitions import existing_partitions, maintain


async def _insert_frame(pool: asyncpg.Pool, at: datetime) -> None:
    await pool.execute(
        "INSERT INTO frames (received_at, connection_id, direction, hex)"
        " VALUES ($1, 'c', 'in', '00')",
        at,
    )


async def test_partitions_are_created_ahead_and_dropped_after_retention(
    db_pool: asyncpg.Pool,
) -> None:
    today = date(2026, 11, 28)
    old = datetime(2026, 11, 20, 12, tzinfo=UTC)
    fresh = datetime(2026, 11, 28, 9, tzinfo=UTC)
    # rows written before any partition existed land in the default partition
    await _insert_frame(db_pool, old)
    await _insert_frame(db_pool, fresh)
    async with db_pool.acquire() as conn:
        created, dropped = await maintain(conn, today=today, retention_days=30)
        assert created == ["frames_20261128", "frames_20261129", "frames_20261130"]
        assert dropped == []
        assert await conn.fetchval("SELECT count(*) FROM frames_20261128") == 1  # moved
        assert await conn.fetchval("SELECT count(*) FROM frames") == 2  # nothing lost
        # a second run is a no-op
        assert await maintain(conn, today=today, retention_days=30) == ([], [])
        # 25 days later with a 7-day retention: the 28th is gone, the 20th (default) too
        later = today + timedelta(days=25)
        created, dropped = await maintain(conn, today=later, retention_days=7)
        assert "frames_20261128" in dropped
        assert await conn.fetchval("SELECT count(*) FROM frames") == 0
        names = await existing_partitions(conn)
        assert min(names) >= later - timedelta(days=7)
