"""Migrations run against a real PostgreSQL, once, in order, and are recorded."""

from __future__ import annotations

import asyncpg

from chargegw.store.database import migrate, migrations


async def test_migrations_apply_once_and_are_recorded(empty_db_dsn: str) -> None:
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        applied = await migrate(conn)
        assert applied == [m.name for m in migrations()]
        assert await migrate(conn) == []
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        assert versions == [m.version for m in migrations()]
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert {"gateways", "devices", "ports", "device_events", "frames"} <= tables
    finally:
        await conn.close()
