"""The platform under test: a fresh database on a PostgreSQL server, ``chargegw serve
--workers N`` in a subprocess, and the faults done to them (database outages, read-only
periods, killed workers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from chargesim.chaos.options import ChaosError
from chargesim.loadtest.runner import _embedded_postgres, _free_port, _terminate
from chargesim.loadtest.stats import command_name, process_tree


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name`` instead of the one it names."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@contextlib.asynccontextmanager
async def postgres_server(dsn: str | None, say: Callable[[str], None]) -> AsyncIterator[str]:
    """``dsn`` if given, else a throw-away embedded PostgreSQL (deleted afterwards)."""
    if dsn:
        yield dsn
        return
    async with _embedded_postgres(say) as embedded:
        yield embedded


class Database:
    """The run's own database on a server: created, faulted, dropped."""

    def __init__(self, server_dsn: str, name: str | None = None) -> None:
        self.server_dsn = server_dsn
        self.name = name or f"chargegw_chaos_{uuid.uuid4().hex[:10]}"
        self.dsn = with_database(server_dsn, self.name)

    async def _admin(self, *statements: str) -> None:
        conn = await asyncpg.connect(self.server_dsn, timeout=10)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def _terminate_backends(self) -> None:
        conn = await asyncpg.connect(self.server_dsn, timeout=10)
        try:
            await conn.execute(
                """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                   WHERE datname = $1 AND pid <> pg_backend_pid()""",
                self.name,
            )
        finally:
            await conn.close()

    async def create(self) -> None:
        """Create the (empty) database; the gateway's supervisor migrates it."""
        await self._admin(f'CREATE DATABASE "{self.name}"')

    async def drop(self) -> None:
        """Drop the database, whoever is still connected."""
        await self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    async def outage_begin(self) -> None:
        """No new connections, and every existing one is cut."""
        await self._admin(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS false')
        await self._terminate_backends()

    async def outage_end(self) -> None:
        """Connections are allowed again."""
        await self._admin(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS true')

    async def readonly_begin(self) -> None:
        """Every new transaction is read-only; existing sessions are cut so they reconnect
        into it."""
        await self._admin(f'ALTER DATABASE "{self.name}" SET default_transaction_read_only = on')
        await self._terminate_backends()

    async def readonly_end(self) -> None:
        """Writable again: the setting is reset and the read-only sessions are cut."""
        await self._admin(f'ALTER DATABASE "{self.name}" RESET default_transaction_read_only')
        await self._terminate_backends()

    async def heal(self) -> None:
        """End any fault (safe to call whatever state the database is in)."""
        await self._admin(
            f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS true',
            f'ALTER DATABASE "{self.name}" RESET default_transaction_read_only',
        )


class GatewayProcess:
    """``chargegw serve --workers N`` on free loopback ports, logging to a file."""

    def __init__(self, dsn: str, workers: int, settings: dict[str, str], log_path: Path) -> None:
        self.dsn = dsn
        self.workers = workers
        self.settings = settings
        self.log_path = log_path
        self.device_port = _free_port()
        self.http_port = _free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.killed: list[int] = []
        self._seen: dict[int, str] = {}

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self, timeout: float = 90.0) -> None:
        """Start the supervisor and wait until every worker is live."""
        env = {**os.environ, "CHARGEGW_DSN": self.dsn, "CHARGEGW_API_KEYS": ""}
        env.update({f"CHARGEGW_{name.upper()}": value for name, value in self.settings.items()})
        command = [sys.executable, "-m", "chargegw", "serve", "--workers", str(self.workers)]
        command += ["--device-host", "127.0.0.1", "--device-port", str(self.device_port)]
        command += ["--http-host", "127.0.0.1", "--http-port", str(self.http_port)]
        command += ["--node", "chaos"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # a file, not a pipe: logs never block
            self.proc = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        try:
            async with asyncio.timeout(timeout):
                while len(await self.live_workers()) < self.workers:
                    if self.proc.returncode is not None:
                        raise ChaosError(
                            f"chargegw serve exited ({self.proc.returncode}); see {self.log_path}"
                        )
                    await asyncio.sleep(0.3)
        except TimeoutError:
            await self.stop()
            raise ChaosError(f"chargegw serve did not come up; see {self.log_path}") from None

    async def live_workers(self) -> list[dict[str, Any]]:
        """The live processes the cluster table lists ([] while the API cannot answer)."""
        try:
            async with httpx.AsyncClient(base_url=self.api, timeout=5) as client:
                response = await client.get("/api/v1/nodes")
        except httpx.HTTPError:
            return []
        if response.status_code != 200:
            return []
        items: list[dict[str, Any]] = response.json().get("items", [])
        return [p for p in items if p.get("state") == "live"]

    def worker_pids(self) -> list[int]:
        """The worker processes running now (children of the supervisor), from /proc:
        it works while the database is away."""
        if self.proc is None or self.proc.returncode is not None:
            return []
        pids = []
        for pid in process_tree(self.proc.pid)[1:]:
            name = command_name(pid)
            self._seen.setdefault(pid, name)
            if "spawn_main" in name and "resource_tracker" not in name:
                pids.append(pid)
        return pids

    def kill_worker(self, pid: int) -> None:
        """SIGKILL one worker (the supervisor starts it again)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)

    async def stop(self) -> None:
        """SIGTERM (drain), SIGKILL after a grace period; no worker is left behind."""
        await _terminate(self.proc, grace_s=40.0)
        for pid, name in self._seen.items():
            if command_name(pid) == name:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
