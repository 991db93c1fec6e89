"""Fixtures for chargegw tests: a real PostgreSQL, one fresh database per test.

``CHARGEGW_TEST_DSN`` names a server to use (CI sets it to the local one); without it
the embedded PostgreSQL wheel is started in a temporary directory, so the suite also
runs on a laptop with nothing installed.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from chargegw.app import Gateway
from chargegw.config import Settings
from chargegw.store.database import migrate, start_embedded

from .waiting import api_client


@pytest.fixture(scope="session")
def pg_server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of a PostgreSQL server with rights to create databases."""
    dsn = os.environ.get("CHARGEGW_TEST_DSN")
    if dsn:
        yield dsn
        return
    data_dir: Path = tmp_path_factory.mktemp("embedded-pg")
    yield start_embedded(data_dir)


def database_name(dsn: str) -> str:
    """The database a DSN names (its path), whatever the host part looks like."""
    return urlsplit(dsn).path.lstrip("/")


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@contextlib.asynccontextmanager
async def fresh_database(pg_server_dsn: str, prefix: str = "chargegw_test") -> AsyncIterator[str]:
    """A new empty database on the test server (its DSN), dropped at the end."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _with_database(pg_server_dsn, name)
    finally:
        admin = await asyncpg.connect(pg_server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def empty_db_dsn(pg_server_dsn: str) -> AsyncIterator[str]:
    """A freshly created, empty database; dropped after the test."""
    async with fresh_database(pg_server_dsn) as dsn:
        yield dsn


@pytest.fixture
async def db_dsn(empty_db_dsn: str) -> str:
    """A fresh database with every migration applied."""
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return empty_db_dsn


@pytest.fixture
async def db_pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=4)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def database_outage(pg_server_dsn: str, db_dsn: str) -> AsyncIterator[None]:
    """The database of ``db_dsn`` goes away (no new connections, existing ones killed)
    for the duration of the block; it comes back when the block ends."""
    name = database_name(db_dsn)
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await admin.close()


async def _reconnect(admin: asyncpg.Connection, name: str, pool: asyncpg.Pool | None) -> None:
    """End every session of database ``name``: the pool's next connections start anew."""
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = $1 AND pid <> pg_backend_pid()",
        name,
    )
    if pool is not None:  # connections in the pool are replaced, not met half-terminated
        await pool.expire_connections()


@contextlib.asynccontextmanager
async def read_only_database(
    pg_server_dsn: str, db_dsn: str, pool: asyncpg.Pool | None = None
) -> AsyncIterator[None]:
    """The database of ``db_dsn`` takes reads but refuses writes (25006), like a standby
    after a failover, for the duration of the block."""
    name = database_name(db_dsn)
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        await _reconnect(admin, name, pool)
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await _reconnect(admin, name, pool)
        await admin.close()


def settings_for(dsn: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "dsn": dsn,
        "device_host": "127.0.0.1",
        "device_port": 0,
        "batch_interval_s": 0.02,
        "liveness_check_s": 0.05,
        "ap3000_heartbeat_s": 180.0,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    """Settings a module's ``gateway`` starts with (overridden per module; a test's
    ``settings`` marker adds to them)."""
    return {}


@pytest.fixture
async def gateway(
    db_dsn: str, gateway_settings: dict[str, Any], request: pytest.FixtureRequest
) -> AsyncIterator[Gateway]:
    """A gateway on a fresh database, devices on a free local port, no HTTP server."""
    marker = request.node.get_closest_marker("settings")
    overrides = {**gateway_settings, **(marker.kwargs if marker else {})}
    gw = Gateway(settings_for(db_dsn, **overrides))
    await gw.start(http=False)
    try:
        yield gw
    finally:
        await gw.stop()


@pytest.fixture
async def api(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """The device and command API of ``gateway``, in process, without authentication."""
    async with api_client(gateway) as client:
        yield client
