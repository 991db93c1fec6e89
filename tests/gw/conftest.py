"""Fixtures for chargegw tests: a real PostgreSQL, one fresh database per test.

``CHARGEGW_TEST_DSN`` names a server to use (CI sets it to the local one); without it
the embedded PostgreSQL wheel is started in a temporary directory, so the suite also
runs on a laptop with nothing installed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from chargegw.store.database import migrate, start_embedded


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


@pytest.fixture
async def empty_db_dsn(pg_server_dsn: str) -> AsyncIterator[str]:
    """A freshly created, empty database; dropped after the test."""
    name = f"chargegw_test_{uuid.uuid4().hex[:12]}"
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
