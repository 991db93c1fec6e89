"""The gateway service: composes store, writer, sessions, transport, drivers and HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
import uvicorn

from chargeproto import (
    Event,
    IccidReceived,
    KeepaliveReceived,
    MessageReceived,
    StreamError,
)

from .audit import mask_frame, mask_iccid_hex, mask_text
from .config import Settings
from .drivers.ap3000 import Ap3000Driver
from .drivers.base import command_label
from .drivers.bkv import BkvDriver
from .metrics import Metrics
from .sessions import SessionRegistry
from .store.database import connect_pool, migrate, start_embedded
from .store.partitions import maintain
from .store.writer import BatchWriter
from .transport import DeviceLink, DeviceServer

log = structlog.get_logger("chargegw")


class Gateway:
    """One gateway process: ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pool: asyncpg.Pool | None = None
        self.dsn = settings.dsn
        self.writer = BatchWriter(
            lambda: self.pool,
            self.metrics,
            batch_rows=settings.batch_rows,
            interval_s=settings.batch_interval_s,
            limit=settings.buffer_limit,
        )
        self.sessions = SessionRegistry(
            self.writer,
            self.metrics,
            missed_heartbeats=settings.missed_heartbeats,
            ack_timeouts_offline=settings.ack_timeouts_offline,
            node=settings.node,
        )
        self.server = DeviceServer(
            self,
            self.metrics,
            max_frame=settings.max_frame,
            max_connections=settings.max_connections,
            accept_rate=settings.accept_rate,
            idle_timeout_s=settings.idle_timeout_s,
            write_queue_limit=settings.write_queue_limit,
            node=settings.node,
        )
        self.writer.on_overload = self.server.set_paused
        self.drivers: dict[str, Any] = {"ap3000": Ap3000Driver(self), "bkv": BkvDriver(self)}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: uvicorn.Server | None = None

    # -- clock (one place, so tests and drivers agree) --

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> datetime:
        return datetime.now(UTC)

    # -- lifecycle --

    async def start(self, *, http: bool = True) -> None:
        if not self.dsn:
            log.info(
                "no DSN configured, starting the embedded PostgreSQL",
                data_dir=self.settings.data_dir,
            )
            self.dsn = await asyncio.to_thread(start_embedded, self.settings.data_dir)
        self.pool = await connect_pool(self.dsn)
        async with self.pool.acquire() as conn:
            await migrate(conn)
        await self._maintain_partitions()
        self.writer.start()
        await self.server.start(self.settings.device_host, self.settings.device_port)
        self._spawn(self._sweeper(), "liveness-sweeper")
        self._spawn(self._maintenance(), "partition-maintenance")
        if http:
            await self._start_http()

    async def stop(self) -> None:
        """Stop accepting, close devices, flush the writer, close the pool."""
        await self.server.stop_listening()
        self.server.close_all("shutdown")
        await asyncio.sleep(0)
        if self._http is not None:
            self._http.should_exit = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.writer.close()
        if self.pool is not None:
            await self.pool.close()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_http(self) -> None:
        from .api import ApiState, create_app

        self.api_state = ApiState(pool=self.pool, metrics=self.metrics, readiness=self.readiness)
        app = create_app(self.api_state)
        config = uvicorn.Config(
            app,
            host=self.settings.http_host,
            port=self.settings.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
        self._http = uvicorn.Server(config)
        self._spawn(self._http.serve(), "http")
        while not self._http.started:
            await asyncio.sleep(0.02)
        log.info("http listener up", host=self.settings.http_host, port=self.settings.http_port)

    def readiness(self) -> dict[str, bool]:
        return {
            "database": self.pool is not None and self.writer.healthy,
            "listener": self.server.listening,
        }

    async def _maintain_partitions(self) -> None:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            await maintain(
                conn,
                today=self.wall().date(),
                retention_days=self.settings.audit_retention_days,
            )

    async def _maintenance(self) -> None:
        """Hourly: audit partitions ahead, expired ones dropped (retries while the DB is away)."""
        while True:
            await asyncio.sleep(3600)
            try:
                await self._maintain_partitions()
            except Exception:
                log.exception("audit partition maintenance failed, retrying in an hour")

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.liveness_check_s)
            now = self.now()
            self.sessions.sweep(now, self.wall())
            self.server.sweep_idle(now)
            self.metrics.batch_queue_depth.set(self.writer.backlog)

    # -- transport handler --

    def on_open(self, link: DeviceLink) -> None:
        self.sessions.link_opened(link)
        log.debug("connection opened", connection=link.id, remote=link.remote)

    def on_events(self, link: DeviceLink, events: list[Event]) -> None:
        wall = self.wall()
        for event in events:
            if link.closed:
                return
            if isinstance(event, MessageReceived):
                self._message(link, event, wall)
            elif isinstance(event, IccidReceived):
                self.sessions.bind_iccid(link, event.iccid)
                self.writer.put_frame(
                    wall, link.id, None, "in", link.protocol, "iccid", mask_iccid_hex(event.raw)
                )
                log.info("ICCID", connection=link.id, iccid=mask_text(event.iccid))
            elif isinstance(event, KeepaliveReceived):
                self.metrics.frames_total.labels(
                    protocol=link.protocol or "ap3000", direction="in", command="link"
                ).inc()
            elif isinstance(event, StreamError):
                self._stream_error(link, event, wall)

    def _message(self, link: DeviceLink, event: MessageReceived, wall: datetime) -> None:
        message = event.message
        protocol = event.protocol
        link.protocol = protocol
        driver = self.drivers.get(protocol)
        command = command_label(message)
        self.metrics.frames_total.labels(protocol=protocol, direction="in", command=command).inc()
        device_id = driver.device_of(message) if driver is not None else None
        self.writer.put_frame(
            wall,
            link.id,
            device_id or getattr(message, "phy_id", None) or getattr(message, "gateway_id", None),
            "in",
            protocol,
            command,
            mask_frame(message, event.raw),
        )
        if driver is None:
            log.warning("no driver for protocol", protocol=protocol, connection=link.id)
            return
        try:
            driver.on_message(link, message)
        except Exception:
            # a driver bug must not take the connection (or the server) down
            log.exception("driver failed on a frame", connection=link.id, command=command)

    def _stream_error(self, link: DeviceLink, event: StreamError, wall: datetime) -> None:
        kind = getattr(event.error, "kind", "decode")
        self.metrics.decode_errors_total.labels(kind=kind).inc()
        link.errors += 1
        self.writer.put_frame(
            wall,
            link.id,
            None,
            "in",
            link.protocol,
            None,
            event.raw.hex(),
            f"{kind}: {event.error}",
        )
        if link.errors > self.settings.garbage_budget:
            log.warning(
                "closing connection: too many decode errors", connection=link.id, errors=link.errors
            )
            link.close("garbage")

    def on_closed(self, link: DeviceLink, reason: str) -> None:
        wall = self.wall()
        self.sessions.link_closed(link, reason, wall)
        gateway = link.driver_state.get("gateway")
        if gateway is not None:
            self.writer.put_gateway(
                str(gateway), protocol=link.protocol or "ap3000", online=False, last_seen_at=wall
            )
        log.info("connection closed", connection=link.id, reason=reason)

    # -- used by drivers --

    def send(
        self,
        link: DeviceLink,
        frame: bytes,
        *,
        device_id: str | None,
        command: str,
        priority: int,
        message: Any = None,
        after_commit: bool = False,
    ) -> None:
        protocol = link.protocol or "ap3000"

        def write() -> None:
            link.send(frame, priority)
            self.metrics.frames_total.labels(
                protocol=protocol, direction="out", command=command
            ).inc()

        self.writer.put_frame(
            self.wall(),
            link.id,
            device_id,
            "out",
            protocol,
            command,
            mask_frame(message, frame),
        )
        if after_commit:
            self.writer.after_commit(write)
        else:
            write()


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Run a gateway until ``stop`` is set."""
    gateway = Gateway(settings)
    await gateway.start()
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await gateway.stop()
