"""The gateway service: composes store, writer, sessions, transport, drivers and HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
import uvicorn

from chargegw import __version__, causes
from chargegw.audit import mask_frame, mask_iccid_hex, mask_text
from chargegw.causes import Cause
from chargegw.cluster.directory import Cluster, ProcessStats
from chargegw.config import Settings, env_var, flag, parse_networks
from chargegw.core import EventKind
from chargegw.domain import billing, call_audit, device_registry, firmware, params
from chargegw.domain.call_audit import CallAuditWriter
from chargegw.domain.compliance import Compliance, Kind
from chargegw.domain.events import EventHub, HubSettings
from chargegw.domain.orders import (
    OrderStatus,
    Settled,
    SettlementReport,
    add_charging_sample,
    add_sample,
    note_business_no,
    reported_charging,
    transition,
)
from chargegw.domain.outbox import CommandStatus, Finished, Outbox, OutboxHooks, OutboxSettings
from chargegw.domain.ports import CardService
from chargegw.domain.retention import purge_device_events
from chargegw.domain.webhook_delivery import WebhookEngine, WebhookSettings
from chargegw.drivers.ap3000 import Ap3000Driver
from chargegw.drivers.ap3000_commands import Ap3000Commands
from chargegw.drivers.base import command_label, retry_while_connected
from chargegw.drivers.bkv import BkvDriver
from chargegw.drivers.bkv_commands import BkvCommands
from chargegw.metrics import Metrics, guarded, never_fails, update_failed
from chargegw.net.sessions import Held, SessionRegistry
from chargegw.net.transport import CONTROL, DeviceLink, DeviceServer, bound_socket
from chargegw.process_health import ProcessHealth
from chargegw.quirks import QuirkBook
from chargegw.store.causes import apply as apply_cause
from chargegw.store.database import Connection, connect_pool, migrate, start_embedded
from chargegw.store.errors import reason
from chargegw.store.partitions import maintain
from chargegw.store.writer import (
    BatchWriter,
    DeviceRow,
    EventRow,
    FlapPolicy,
    FrameRow,
    GatewayRow,
    SessionRow,
)
from chargeproto import (
    Event,
    IccidReceived,
    KeepaliveReceived,
    MessageReceived,
    StreamError,
)

if TYPE_CHECKING:
    from chargegw.api.deps import ApiServices

log = structlog.get_logger("chargegw")

#: longest shutdown waits for the pool's connections to come back before cutting them
POOL_CLOSE_S = 10.0
#: the compliance counters' last flush at shutdown waits at most this long
COMPLIANCE_FLUSH_S = 5.0
#: the cause of what the liveness sweep changes
_OFFLINE_SWEEP = Cause.timer(causes.OFFLINE_SWEEP)
#: how often partitions and the device event log are looked after (first: after the start)
MAINTENANCE_EVERY_S = 3600.0
#: an order found charging takes its progress samples without the full check (port
#: lock, order lookup, transition) for this long
PROGRESS_MEMO_S = 60.0
#: lag measures (0.5 s apart) below half of ``overload_lag_s`` before a worker that was
#: behind counts as caught up
_CAUGHT_UP_TICKS = 4
MAINTENANCE_FIRST_S = 60.0


def start_outcome(done: Finished) -> str:
    """The ``outcome`` label of a finished start command (chargegw_start_commands_total)."""
    if done.status is CommandStatus.ACKED:
        return "acked"
    if done.status is CommandStatus.FAILED:
        return "refused"  # the pile answered no
    if done.dead_reason == "no answer":
        return "timeout"
    if done.dead_reason == "offline":
        return "offline"
    return "failed"


class StartupError(Exception):
    """The gateway cannot start as configured; the message says which setting to change."""


def check_listen_addresses(
    settings: Settings, *, http: bool = True, reuse_port: bool = False
) -> None:
    """Fail at once if the device (or HTTP) address cannot be bound, for example because
    another program (another chargegw?) holds the port: before the embedded PostgreSQL or
    anything else starts. Port 0 (any free port) is not checked."""
    listeners = [("device", "device_host", "device_port")]
    if http:
        listeners.append(("HTTP", "http_host", "http_port"))
    for what, host_name, port_name in listeners:
        host, port = getattr(settings, host_name), getattr(settings, port_name)
        if port == 0:
            continue
        try:
            bound_socket(host, port, reuse_port=reuse_port).close()
        except OSError as exc:
            change_port = f"{flag(port_name)} or {env_var(port_name)}"
            if exc.errno == errno.EADDRINUSE:
                why = (
                    f"the {what} port {port} is already in use on {host} (is another chargegw "
                    f"running?); stop that program or choose another port with {change_port}"
                )
            elif exc.errno == errno.EACCES:
                why = (
                    f"no permission to listen on the {what} port {port} (ports below 1024 "
                    f"need privileges); choose another port with {change_port}"
                )
            else:
                why = (
                    f"cannot listen on the {what} address {host}:{port} "
                    f"({exc.strerror or exc}); check {flag(host_name)} or {env_var(host_name)}"
                )
            raise StartupError(why) from None


class Gateway:
    """One gateway process: ``await start()``, then ``await drain()`` or ``await stop()``.

    ``worker`` is the index of this process among the workers of its node
    (``chargegw serve --workers N``); its id in the session directory is
    ``node/worker/pid``.
    """

    def __init__(self, settings: Settings, *, worker: int = 0) -> None:
        self.settings = settings
        self.worker = worker
        self.metrics = Metrics()
        self.pool: asyncpg.Pool | None = None
        self.dsn = settings.dsn
        self.writer = BatchWriter(
            lambda: self.pool,
            self.metrics,
            batch_rows=settings.batch_rows,
            interval_s=settings.batch_interval_s,
            limit=settings.buffer_limit,
            refresh_s=settings.state_refresh_s,
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
            node=f"{settings.node}-{worker}" if settings.workers > 1 else settings.node,
            frame_rate=settings.frame_rate_per_connection,
            process_frame_rate=settings.frame_rate_per_process,
            reuse_port=settings.workers > 1,
            identify_timeout_s=settings.device_identify_timeout_s,
            max_unidentified_per_source=settings.device_max_unidentified_per_source,
            allowed_networks=parse_networks(settings.device_allowed_networks),
        )
        #: the device registry as this process knows it (device_registry_mode)
        self.registry = device_registry.RegistryCache(
            lambda: self.pool,
            self.metrics,
            mode=device_registry.RegistryMode(settings.device_registry_mode),
            refresh_s=settings.device_registry_refresh_s,
            on_removed=self._unregistered,
        )
        self.writer.on_overload = self.server.set_paused
        self.writer.flap_policy = FlapPolicy(
            settings.flap_window_s, settings.flap_max_connects, settings.flap_ban_s
        )
        self.writer.on_banned = self._banned
        self.draining = False
        self._stopped = False
        self._bound_since_commit: dict[str, None] = {}
        self.cluster = Cluster(
            lambda: self.pool,
            lambda: self.dsn,
            node=settings.node,
            worker=worker,
            heartbeat_s=settings.cluster_heartbeat_s,
            process_timeout_s=settings.process_timeout_s,
            stats=self._process_stats,
            on_command=self._command_notified,
            on_resync=self._resync,
            shed=lambda count: self.server.shed(count, "rebalance", keep=self._busy),
            superseded=self._superseded,
            held=self.sessions.held,
            held_count=self.sessions.held_count,
            knows=self.sessions.devices.__contains__,
            held_gateways=self._held_gateways,
            on_reasserted=self._reasserted,
        )
        #: the quirk profiles of the devices this process holds (docs/quirks.md)
        self.quirks = QuirkBook.from_config(settings.quirk_profiles)
        #: protocol deviations per device and firmware, flushed by an owned task
        self.compliance = Compliance(
            lambda: self.pool,
            self.metrics,
            flush_s=settings.compliance_flush_s,
            heartbeat_s=settings.ap3000_heartbeat_s,
            missing_heartbeat_periods=settings.compliance_missing_heartbeat_periods,
            clock_drift_s=settings.compliance_clock_drift_s,
            tolerates=self.quirks.tolerates,
        )
        self.outbox = Outbox(
            lambda: self.pool,
            {"ap3000": Ap3000Commands(), "bkv": BkvCommands()},
            OutboxHooks(
                link_of=self.sessions.link_of,
                write=self._write_command,
                frame_id=self.writer.frame_ids,
                on_sent_tx=self._command_sent_tx,
                on_finish_tx=self._command_finished_tx,
                on_result=self._command_finished,
                on_backlog=guarded(self._outbox_backlog),
                on_timeout=lambda device_id: self.sessions.ack_timeout(device_id, self.wall()),
                on_answered=self.sessions.ack_ok,
                on_oldest=guarded(self.metrics.outbox_oldest_pending_seconds.set),
                on_purged=guarded(lambda n: self.metrics.housekeeping_done("commands", deleted=n)),
                on_late_reply=guarded(self._late_reply),
                on_sent=guarded(
                    lambda protocol, name: self.metrics.commands_sent_total.labels(
                        protocol, name
                    ).inc()
                ),
                on_resend=guarded(
                    lambda protocol, name: self.metrics.commands_resent_total.labels(
                        protocol, name
                    ).inc()
                ),
            ),
            OutboxSettings.from_settings(settings),
            owner=self.cluster.owner,
        )
        # -- the audit trail of API calls: written before each call's answer (group
        # commit), held while the database is away, purged after the retention --
        self.call_audit = CallAuditWriter(lambda: self.pool, self.metrics)
        # -- the events: ids in commit order, the SSE fan-out, wake-ups, retention --
        self.events = EventHub(
            lambda: self.dsn, lambda: self.pool, self.metrics, HubSettings.from_settings(settings)
        )
        # -- webhooks: claim due deliveries (shared by every process), send them signed,
        # record the outcomes; woken by each batch of newly sequenced events --
        self.webhooks = WebhookEngine(
            lambda: self.pool,
            self.metrics,
            WebhookSettings.from_settings(settings),
            owner=self.cluster.owner,
            user_agent=f"chargegw/{__version__}",
        )
        self.events.add_wakeup(self.webhooks.wake)
        self.sessions.on_online = self._online
        self.sessions.on_bound = self._bound
        self.sessions.on_released = self._released
        self.sessions.on_gone = self._gone
        self.writer.on_sessions = self.sessions.bind_results
        #: the card registry, as the drivers ask it
        self.cards: CardService = billing.CardDesk(self)
        self.drivers: dict[str, Any] = {"ap3000": Ap3000Driver(self), "bkv": BkvDriver(self)}
        # the engines hear from the drivers what concerns them, and check the commands
        # they queue with the drivers' encodings
        for driver in self.drivers.values():
            params.listen(self, driver)
            firmware.listen(self, driver)
        params.use_encodings({"ap3000": Ap3000Commands(), "bkv": BkvCommands()})
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: uvicorn.Server | None = None
        #: the API's documentation page, once the HTTP server runs
        self.http_url: str | None = None
        #: the event loop's latest lag, and the measures below half the overload lag
        #: in a row while behind (see ``_loop_lag``)
        self._lag = 0.0
        self._calm_ticks = 0
        #: the time of the read whose frames are being handled (see ``wall``)
        self._read_wall: datetime | None = None
        #: (device, port) -> (its report's order reference, order number, until when):
        #: orders found charging by ``order_progress`` (its fast path)
        self._progressing: dict[tuple[str, int], tuple[str, str, float]] = {}

    # -- clock (one place, so tests and drivers agree) --

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> datetime:
        """Now, UTC; while the frames of one read are handled, the read's time (one
        clock reading for every row and reply they cause in the loop's turn)."""
        return self._read_wall or datetime.now(UTC)

    @property
    def owner(self) -> str:
        """This process's id in the session directory (``node/worker/pid``)."""
        return self.cluster.owner

    # -- lifecycle --

    async def start(self, *, http: bool = True) -> None:
        if not self.dsn:
            log.info(
                "no DSN configured, starting the embedded PostgreSQL",
                data_dir=self.settings.data_dir,
            )
            self.dsn = await asyncio.to_thread(start_embedded, self.settings.data_dir)
        self.pool = await connect_pool(self.dsn, max_size=self.settings.db_pool_size)
        async with self.pool.acquire() as conn:
            await migrate(conn)
        await self._maintain_partitions()
        # the first epoch of frame ids, before the first frame (the database answered)
        await self.writer.frame_ids.start()
        self.writer.start()
        if self.registry.mode is not device_registry.RegistryMode.OFF:
            # known before the first device is served
            await self.registry.load()
            self._spawn(self.registry.run(), "device-registry")
        await self.server.start(self.settings.device_host, self.settings.device_port)
        self.cluster.device_listen = f"{self.settings.device_host}:{self.server.port}"
        self.cluster.http_listen = f"{self.settings.http_host}:{self.settings.http_port}"
        await self.cluster.start()
        self.outbox.start()
        await self.events.start()
        self.webhooks.start()
        firmware.engine_for(self)  # resumes the upgrades a restart interrupted
        params.engine_for(self)  # and the parameter jobs
        self._spawn(self._sweeper(), "liveness-sweeper")
        self._spawn(self.compliance.run(), "compliance-flush")
        self._spawn(
            call_audit.upkeep(
                self.call_audit, lambda: self.pool, self.settings.call_audit_retention_days
            ),
            "call-audit-upkeep",
        )
        self._spawn(self._maintenance(), "partition-maintenance")
        self._spawn(
            ProcessHealth(
                self.metrics,
                self.worker,
                self.settings.workers,
                on_lag=self._loop_lag,
                gc_full_s=self.settings.gc_full_s,
            ).run(),
            "process-health",
        )
        if http:
            await self._start_http()

    async def drain(self, force: asyncio.Event | None = None) -> None:
        """Leave gracefully (SIGTERM): stop accepting and claiming, close the device
        connections at ``drain_rate`` per second so the piles reconnect elsewhere a few
        at a time, letting commands in flight finish first (up to ``drain_timeout_s``),
        then stop. Setting ``force`` cuts the drain short."""
        settings = self.settings
        self.draining = True
        self.outbox.draining = True
        self.webhooks.draining = True  # attempts in flight go on, nothing new is claimed
        await self.server.stop_listening()
        with contextlib.suppress(Exception):
            await self.cluster.beat()
        log.info("draining", connections=len(self.server.links), rate=settings.drain_rate)
        deadline = self.now() + settings.drain_timeout_s
        step_s = 0.05
        credit = 0.0
        while self.server.links and self.now() < deadline:
            if force is not None and force.is_set():
                break
            await asyncio.sleep(step_s)
            credit += settings.drain_rate * step_s
            count = int(credit)
            if count:
                credit -= self.server.shed(count, "drain", keep=self._busy)
                credit = min(credit, settings.drain_rate)  # no saving up while waiting
        log.info("drained", left=len(self.server.links))
        forced = force is not None and force.is_set()
        await self.webhooks.close(grace_s=0.0 if forced else max(deadline - self.now(), 1.0))
        await self.stop()

    def _busy(self, link: DeviceLink) -> bool:
        """A command to one of the link's devices waits for its reply."""
        return any(self.outbox.busy(d) for d in self.sessions.device_ids(link))

    async def stop(self) -> None:
        """Stop accepting, close devices, flush the writer, leave the cluster, close the pool."""
        if self._stopped:
            return
        self._stopped = True
        await self.server.stop_listening()
        self.server.close_all("shutdown")
        await asyncio.sleep(0)
        self.events.close_streams()  # stream clients reconnect to another process
        if self._http is not None:
            self._http.should_exit = True
        await self.outbox.close()
        await self.webhooks.close()  # attempts cut short are retried by another process
        await self.events.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.call_audit.close()  # rows of the last calls, before the pool goes
        await self.writer.close()
        try:  # the counts since the last flush, after the writer's rows; bounded
            await asyncio.wait_for(self.compliance.flush(), COMPLIANCE_FLUSH_S)
        except Exception as exc:
            log.warning("compliance counts of the last seconds not written", error=str(exc))
        await self.cluster.stop()
        if self.pool is not None:
            try:  # close waits for every connection to come back: bounded, then cut
                await asyncio.wait_for(self.pool.close(), POOL_CLOSE_S)
            except TimeoutError:
                log.error("pool connections still in use at shutdown: terminated")
                self.pool.terminate()

    # -- the cluster --

    def _process_stats(self) -> ProcessStats:
        return ProcessStats(
            connections=len(self.server.links),
            devices=self.metrics_devices_online(),
            max_connections=self.server.max_connections,
            draining=self.draining,
        )

    def metrics_devices_online(self) -> int:
        return sum(1 for s in self.sessions.devices.values() if s.online)

    def _bound(self, device_id: str, link: Any) -> None:
        """A device is on one of our connections: claim it in the session directory,
        then deliver its commands (the claim must be committed for the outbox to
        take them)."""
        self.writer.put_session(
            SessionRow(device_id, self.owner, link.id, link.remote, time.monotonic(), True)
        )
        if not self._bound_since_commit:
            self.writer.after_commit(self._look_for_waiting_commands)
        self._bound_since_commit[device_id] = None

    def _online(self, device_id: str) -> None:
        """Online again on the connection it is bound to (a newly bound device is looked
        at once its directory row is committed)."""
        if device_id not in self._bound_since_commit:
            self.run(self.outbox.wake_waiting([device_id]), "wake-online")

    def _look_for_waiting_commands(self) -> None:
        """After the directory rows of newly bound devices are committed: wake those with
        commands waiting (one query per batch, not one per device, for reconnect storms)."""
        bound, self._bound_since_commit = self._bound_since_commit, {}
        self.run(self.outbox.wake_waiting(list(bound)), "wake-bound")

    def _released(self, device_id: str, link: Any) -> None:
        self.writer.put_session(
            SessionRow(device_id, self.owner, link.id, link.remote, time.monotonic(), False)
        )

    def _superseded(self, bound: list[tuple[str, Any]]) -> None:
        for device_id, since in bound:
            self.sessions.superseded(device_id, since)

    def _gone(self, device_id: str) -> None:
        """The process no longer holds the device: drop what is kept per device (and the
        writer's memory of its row: it may come back on another connection soon)."""
        self.writer.forget("d", device_id)
        self.compliance.forget(device_id)
        self.quirks.forget(device_id)
        for driver in self.drivers.values():
            driver.forget(device_id)

    def _held_gateways(self) -> list[tuple[str, str]]:
        """(gateway id, connection id) of every open connection whose gateway is known."""
        return [
            (link.gateway, link.id)
            for link in self.server.links.values()
            if not link.closed and link.gateway is not None
        ]

    def _reasserted(self, taken: list[Held]) -> None:
        """Devices claimed again after an outage or a stall: their rows were written by
        SQL (the writer's memory of them is stale), and their commands can go. One whose
        connection closed meanwhile is released again (the release may have been
        committed before the re-assertion)."""
        for held in taken:
            self.writer.forget("d", held.device_id)
            link = self.sessions.link_of(held.device_id)
            if link is None or link.id != held.connection_id:
                self.writer.put_session(
                    SessionRow(
                        held.device_id, self.owner, held.connection_id, "", time.monotonic(), False
                    )
                )
                self.writer.put_device(
                    DeviceRow(
                        held.device_id,
                        protocol=held.protocol,
                        online=False,
                        offline_reason="peer closed",
                        connection_id=held.connection_id,
                    )
                )
        self.metrics.devices_reasserted_total.inc(len(taken))
        if taken:
            self.run(self.outbox.wake_waiting([h.device_id for h in taken]), "wake-reasserted")

    def _command_notified(self, device_id: str) -> None:
        if not self.draining:
            self.outbox.wake(device_id)

    def _resync(self) -> None:
        self.run(self.outbox.scan(), "outbox-resync")

    def _banned(self, device_ids: list[str]) -> None:
        """Devices just banned for flapping: tell every process, refuse them here now."""
        self.metrics.devices_banned_total.inc(len(device_ids))
        for device_id in device_ids:
            log.warning(
                "device banned for reconnecting too often",
                device_id=device_id,
                seconds=self.settings.flap_ban_s,
            )
            self.cluster.bans[device_id] = self.now() + self.settings.flap_ban_s
            session = self.sessions.devices.get(device_id)
            if session is not None and not session.link.closed:
                session.link.close("banned")
        self.run(self.cluster.announce_bans(device_ids), "announce-bans")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def api_services(self) -> ApiServices:
        """What the HTTP routers act through: the outbox, the engines (:meth:`start`
        runs them) and the settings they need. Building it starts nothing."""
        from chargegw.api.deps import ApiServices

        return ApiServices(
            outbox=self.outbox,
            command_expiry_s=self.settings.command_expiry_s,
            firmware_max_bytes=self.settings.firmware_max_bytes,
            owner=self.cluster.owner,
            kick_params=lambda: params.engine_for(self).kick(),
            kick_firmware=lambda: firmware.engine_for(self).kick(),
            events=self.events,
            start_param_job=functools.partial(params.start_ready, self),
            webhooks_allow_private=self.settings.webhooks_allow_private,
            wake_webhooks=self.webhooks.wake,
            quirks=self.quirks,
        )

    async def _start_http(self) -> None:
        from chargegw import console
        from chargegw.api.app import ApiState, ConsoleConfig, create_app
        from chargegw.api.guard import Guard, HttpLimits
        from chargegw.api.routers import ROUTERS
        from chargegw.domain import auth

        assert self.pool is not None
        keys = auth.parse_keys(self.settings.api_keys)
        required = await auth.auth_mode(keys, self.pool)
        host, warning = auth.effective_http_host(self.settings.http_host, required)
        if warning:
            log.warning(warning)
        self.api_state = ApiState(
            pool=self.pool,
            metrics=self.metrics,
            readiness=self.readiness,
            reasons=self.readiness_reasons,
            api_keys=keys,
            auth_required=required,
            services=self.api_services(),
            guard=Guard(HttpLimits.from_settings(self.settings), audit=self.call_audit),
            console=ConsoleConfig(
                session_lifetime_s=self.settings.console_session_lifetime_s,
                idle_timeout_s=self.settings.console_idle_timeout_s,
                timezone=self.settings.device_timezone,
                process_timeout_s=self.settings.process_timeout_s,
            ),
            local_hosts=None
            if required
            else frozenset({"127.0.0.1", "localhost", "::1", host.lower()}),
        )
        if required:  # key changes (revocations) reach this process's key cache at once
            self.key_listener = auth.KeyListener(lambda: self.dsn, self.api_state.key_cache)
            self._spawn(self.key_listener.run(), "api-key-listener")
        app = create_app(self.api_state, routers=ROUTERS)
        console.install(app)
        config = uvicorn.Config(
            app,
            host=host,
            port=self.settings.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
        self._http = uvicorn.Server(config)
        listener = bound_socket(host, self.settings.http_port, reuse_port=self.settings.workers > 1)
        listener.listen(2048)
        listener.setblocking(False)
        self._spawn(self._http.serve(sockets=[listener]), "http")
        while not self._http.started:
            await asyncio.sleep(0.02)
        port = listener.getsockname()[1]
        self.http_url = f"http://{f'[{host}]' if ':' in host else host}:{port}/docs"
        log.info("http listener up", host=host, port=port)

    def readiness(self) -> dict[str, bool]:
        return {
            "database": self.pool is not None and self.writer.healthy,
            "listener": self.server.listening,
            "load": not self.server.behind,
        }

    def _loop_lag(self, lag: float) -> None:
        """The event loop's latest lag: behind (overloaded) from ``overload_lag_s``, no
        longer after ``_CAUGHT_UP_TICKS`` measures below half of it."""
        self._lag = lag
        limit = self.settings.overload_lag_s
        server = self.server
        if lag >= limit:
            self._calm_ticks = 0
            if not server.behind:
                server.behind = True
                self.metrics.worker_behind.labels(str(self.worker)).set(1)
                log.warning("event loop behind: answering late", lag_s=round(lag, 3))
        elif server.behind:
            self._calm_ticks = self._calm_ticks + 1 if lag < limit / 2 else 0
            if self._calm_ticks >= _CAUGHT_UP_TICKS:
                server.behind = False
                self.metrics.worker_behind.labels(str(self.worker)).set(0)
                log.info("event loop caught up", lag_s=round(lag, 3))

    def readiness_reasons(self) -> dict[str, str]:
        """Why the checks of :meth:`readiness` fail, by check."""
        reasons: dict[str, str] = {}
        if self.pool is None:
            reasons["database"] = "no database pool"
        elif not self.writer.healthy:
            reasons["database"] = (
                f"writes held ({self.writer.backlog} rows): {self.writer.last_error}"
            )
        if not self.server.listening:
            reasons["listener"] = "the device listener is not accepting connections"
        if self.server.behind:
            reasons["load"] = (
                f"event loop {self._lag:.2f} s behind (overload_lag_s "
                f"{self.settings.overload_lag_s:g}): devices are answered late"
            )
        return reasons

    async def _maintain_partitions(self) -> None:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            created, dropped = await maintain(
                conn,
                today=self.wall().date(),
                retention_days=self.settings.audit_retention_days,
                wait=False,
            )
        partitions = self.metrics.housekeeping_partitions_total
        partitions.labels(table="frames", action="created").inc(len(created))
        partitions.labels(table="frames", action="dropped").inc(len(dropped))
        self.metrics.housekeeping_done("audit_partitions")

    async def _purge_device_events(self) -> None:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            deleted = await purge_device_events(
                conn, retention_days=self.settings.device_events_retention_days
            )
        if deleted:
            log.info("expired device events deleted", count=deleted)
        self.metrics.housekeeping_done("device_events", deleted=deleted or 0)

    async def _maintenance(self) -> None:
        """Hourly: audit partitions ahead, expired ones dropped; expired device events
        deleted (each retried at the next turn after a failure)."""
        jobs = (
            ("audit_partitions", self._maintain_partitions),
            ("device_events", self._purge_device_events),
        )
        delay = MAINTENANCE_FIRST_S  # a process restarted often still gets its turn
        while True:
            await asyncio.sleep(delay)
            delay = MAINTENANCE_EVERY_S
            for job, run in jobs:
                try:
                    await run()
                except Exception:
                    self.metrics.housekeeping_failed(job)
                    log.exception("housekeeping failed, retrying at the next turn", job=job)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.liveness_check_s)
            now = self.now()
            with causes.using(_OFFLINE_SWEEP):
                self.sessions.sweep(now, self.wall())
            self.server.sweep_idle(now)
            self.metrics.batch_queue_depth.set(self.writer.backlog)

    # -- transport handler --

    def on_open(self, link: DeviceLink) -> None:
        self.sessions.link_opened(link)
        log.debug("connection opened", connection=link.id, remote=link.remote)

    def on_events(self, link: DeviceLink, events: list[Event]) -> None:
        # a read handler or timer made while a frame was handled carries that frame's
        # cause in its context: nothing here is caused by it
        token = causes.enter(None)
        try:
            self._on_events(link, events)
        finally:
            causes.leave(token)

    def _on_events(self, link: DeviceLink, events: list[Event]) -> None:
        wall = self._read_wall = self.wall()
        try:
            self._handle_events(link, events, wall)
        finally:
            self._read_wall = None

    def _handle_events(self, link: DeviceLink, events: list[Event], wall: datetime) -> None:
        for event in events:
            if link.closed:
                return
            if isinstance(event, MessageReceived):
                self._message(link, event, wall)
            elif isinstance(event, IccidReceived):
                if self._iccid_waits(link):
                    link.pending_iccid = event.iccid
                else:
                    self.sessions.bind_iccid(link, event.iccid)
                self.writer.put_frame(
                    FrameRow(
                        wall,
                        link.id,
                        None,
                        "in",
                        link.protocol,
                        "iccid",
                        mask_iccid_hex(event.raw),
                        id=self.writer.frame_ids(),
                    )
                )
                log.info("ICCID", connection=link.id, iccid=mask_text(event.iccid))
            elif isinstance(event, KeepaliveReceived):
                self.metrics.frame(link.protocol or "ap3000", "in", "link")
            elif isinstance(event, StreamError):
                self._stream_error(link, event, wall)

    def _message(self, link: DeviceLink, event: MessageReceived, wall: datetime) -> None:
        message = event.message
        protocol = event.protocol
        link.protocol = protocol
        driver = self.drivers.get(protocol)
        command = command_label(message)
        self.metrics.frame(protocol, "in", command)
        device_id = driver.device_of(message) if driver is not None else None
        if self.cluster.bans and self._refused(link, message, device_id):
            return
        if self.registry.mode is not device_registry.RegistryMode.OFF:
            registry_id = device_registry.registry_id(protocol, message)
            if registry_id is not None and not self.registry.admits(link, registry_id):
                # before anything is answered or stored: no device row, no audit frame
                self.server.refuse(link, "unregistered", device_id=registry_id)
                return
            if link.pending_iccid is not None:  # let in: its SIM now counts
                iccid, link.pending_iccid = link.pending_iccid, None
                self.sessions.bind_iccid(link, iccid)
        frame_id = self.writer.frame_ids()
        owner = (
            device_id or getattr(message, "phy_id", None) or getattr(message, "gateway_id", None)
        )
        self.writer.put_frame(
            FrameRow(
                wall,
                link.id,
                owner,
                "in",
                protocol,
                command,
                mask_frame(message, event.raw),
                id=frame_id,
            )
        )
        if owner is not None:
            try:  # a counter's fault must not cost the frame (never_fails, inlined)
                self.compliance.observe(link, owner, message, event.raw, command, frame_id, wall)
            except Exception:
                update_failed()
        if driver is None:
            log.warning("no driver for protocol", protocol=protocol, connection=link.id)
            return
        # what the frame changes, here and in the tasks its handling starts, it causes
        token = causes.enter_frame(frame_id)
        try:
            driver.on_message(link, message)
        except Exception:
            # a driver bug must not take the connection (or the server) down
            log.exception("driver failed on a frame", connection=link.id, command=command)
        finally:
            causes.leave(token)

    def _refused(self, link: DeviceLink, message: Any, device_id: str | None) -> bool:
        """Close a connection that speaks for a banned device (nothing is answered)."""
        names = (device_id, getattr(message, "gateway_id", None), getattr(message, "phy_id", None))
        banned = next((n for n in names if n and self.cluster.banned(n)), None)
        if banned is None:
            return False
        log.info("refusing a banned device", device_id=banned, connection=link.id)
        self.server.refuse(link, "banned", device_id=banned)
        return True

    def _iccid_waits(self, link: DeviceLink) -> bool:
        """With ``enforce``, an ICCID is bound (closing an older connection with that SIM)
        only once the connection has been let in: an unregistered one must not close a
        registered device's connection by naming its SIM."""
        enforce = self.registry.mode is device_registry.RegistryMode.ENFORCE
        return enforce and link.gateway is None

    def _unregistered(self, removed: frozenset[str]) -> None:
        """Ids removed from the registry: with ``enforce``, close the connections that
        speak for them (as a device or as the gateway of the connection)."""
        if self.registry.mode is not device_registry.RegistryMode.ENFORCE:
            return
        for link in list(self.server.links.values()):
            ids = {*self.sessions.device_ids(link), link.gateway}
            gone = removed.intersection(ids)
            if gone:
                self.server.refuse(link, "unregistered", device_id=min(gone))

    def _stream_error(self, link: DeviceLink, event: StreamError, wall: datetime) -> None:
        kind = getattr(event.error, "kind", "decode")
        self.metrics.decode_errors_total.labels(kind=kind).inc()
        link.errors += 1
        frame_id = self.writer.frame_ids()
        self.writer.put_frame(
            FrameRow(
                wall,
                link.id,
                None,
                "in",
                link.protocol,
                None,
                event.raw.hex(),
                f"{kind}: {event.error}",
                id=frame_id,
            )
        )
        with never_fails():
            self.compliance.stream_error(link, event, frame_id, wall)
        if link.errors > self.settings.garbage_budget:
            log.warning(
                "closing connection: too many decode errors", connection=link.id, errors=link.errors
            )
            link.close("garbage")

    def on_closed(self, link: DeviceLink, reason: str) -> None:
        wall = self.wall()
        with causes.using(causes.of_close(reason)):
            self.sessions.link_closed(link, reason, wall)
        self.compliance.link_closed(link)
        gateway = link.gateway
        if gateway is not None:
            self.quirks.forget(gateway)
            self.writer.put_gateway(
                GatewayRow(
                    gateway,
                    protocol=link.protocol or "ap3000",
                    online=False,
                    connection_id=link.id,
                    last_seen_at=wall,
                )
            )
        log.info("connection closed", connection=link.id, reason=reason)

    # -- used by drivers --

    def run(self, coro: Any, name: str) -> None:
        """Run a driver's coroutine as an owned task; failures are logged."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background step failed", step=name)

        self._spawn(guarded(), name)

    async def settle_order(
        self,
        report: SettlementReport,
        *,
        detail: dict[str, Any],
        while_connected: DeviceLink | None = None,
    ) -> Settled:
        """Commit a settlement (once: a resend changes nothing) with its price and event;
        while the database is unavailable, retry with backoff as long as
        ``while_connected`` is open (the device resends later otherwise)."""

        def retrying(exc: Exception) -> None:
            log.warning(
                "settlement not stored yet, retrying",
                device_id=report.device_id,
                port=report.port,
                reason=reason(exc),
            )

        metrics = self.metrics
        received = time.monotonic()
        with never_fails():
            metrics.settlements_waiting.inc()
        try:
            settled = await retry_while_connected(
                lambda: self._settle_once(report, detail),
                while_connected,
                on_retry=retrying,
            )
        finally:
            with never_fails():
                metrics.settlements_waiting.dec()
        with never_fails():
            metrics.settlement_ingest_seconds.labels(report.protocol).observe(
                time.monotonic() - received
            )
        return settled

    async def _settle_once(
        self,
        report: SettlementReport,
        detail: dict[str, Any],
    ) -> Settled:
        assert self.pool is not None
        wall = self.wall()
        self._progressing.pop((report.device_id, report.port), None)
        async with self.pool.acquire(timeout=5) as conn, conn.transaction():
            await apply_cause(conn)  # the settlement's frame
            settled, unpriced = await billing.settle_and_price(conn, report, at=wall, detail=detail)
        if not settled.applied:
            self.metrics.settlements_duplicate_total.inc()
            cause = causes.current()
            self.compliance.record(
                report.device_id,
                report.protocol,
                Kind.SETTLEMENT_RESEND,
                f"settlement of port {report.port} resent after it was stored",
                frame_id=None if cause is None else cause.frame_id,
            )
            return settled
        self.metrics.settlements_committed_total.labels(report.protocol).inc()
        if unpriced is not None:
            self.metrics.settlements_unpriced_total.inc()
        if settled.review_reason is not None or unpriced is not None:
            self.metrics.orders_for_review_total.inc()
        return settled

    async def order_progress(
        self,
        *,
        protocol: str,
        device_id: str,
        port: int,
        order_no: str,
        start_mode: str,
        sample: dict[str, Any],
    ) -> None:
        assert self.pool is not None
        wall = self.wall()
        key, order_ref = (device_id, port), order_no
        known = self._progressing.get(key)
        cause = causes.current()
        if (
            known is not None
            and known[0] == order_ref
            and known[2] > time.monotonic()
            and cause is not None
        ):
            # the order was charging (found so within PROGRESS_MEMO_S): the sample alone
            # if it still is, one statement; else the full check below
            async with self.pool.acquire() as conn:
                if await add_charging_sample(conn, known[1], wall, sample, cause):
                    return
        async with self.pool.acquire() as conn, conn.transaction():
            await apply_cause(conn)  # the report's frame
            order_no = await reported_charging(
                conn,
                protocol=protocol,
                device_id=device_id,
                port=port,
                order_ref=order_ref,
                start_mode=start_mode,
                at=wall,
            )
            await add_sample(conn, order_no, wall, sample)
            status = await conn.fetchval("SELECT status FROM orders WHERE order_no = $1", order_no)
        if status == OrderStatus.CHARGING.value:
            if len(self._progressing) >= 100_000:
                self._progressing.clear()
            self._progressing[key] = (order_ref, order_no, time.monotonic() + PROGRESS_MEMO_S)
        else:
            self._progressing.pop(key, None)

    # -- outbox hooks --

    def _write_command(
        self, link: Any, frame: bytes, device_id: str, name: str, frame_id: int | None
    ) -> None:
        self.send(
            link, frame, device_id=device_id, command=name, priority=CONTROL, frame_id=frame_id
        )

    async def _command_sent_tx(
        self, conn: Connection, command_id: int, order_no: str | None, name: str, sent: bool
    ) -> None:
        """A start or stop is marked sent (or, its bytes never written, taken back): its
        order moves in the same transaction."""
        if order_no is not None and name in ("start", "stop"):
            await transition(conn, order_no, f"{name}_{'sent' if sent else 'unsent'}")

    def _late_reply(self, device_id: str, name: str) -> None:
        """A device answered a command after its ACK timeout (the frame handled now)."""
        self.compliance.record_current(
            Kind.LATE_REPLY, f"reply to {name} after its {self.settings.ack_timeout_s:g} s timeout"
        )

    def _outbox_backlog(self, counts: dict[str, int]) -> None:
        for status, count in counts.items():
            self.metrics.outbox_backlog.labels(status=status).set(count)

    async def _command_finished_tx(self, conn: Connection, done: Finished) -> None:
        """A start's outcome moves its order in the command's own transaction (with the
        business number a BKV socket named): committed together or not at all."""
        if done.order_no is None or done.name != "start":
            return
        if done.status is CommandStatus.ACKED:
            await transition(conn, done.order_no, "start_acked", started_at=self.wall())
            business_no = (done.outcome.reply if done.outcome else {}).get("business_no")
            if isinstance(business_no, int) and business_no:  # also if the order moved on
                await note_business_no(conn, done.order_no, business_no)
        else:
            outcome = done.outcome
            why = done.dead_reason or (outcome.result_text if outcome else None)
            await transition(
                conn, done.order_no, "start_failed", failure_reason=why or done.status.value
            )

    async def _command_finished(self, done: Finished) -> None:
        """After a command's outcome is committed: metrics, events, the firmware engine."""
        metrics = self.metrics
        with never_fails():
            status = done.status.value
            metrics.commands_finished_total.labels(done.protocol, done.name, status).inc()
            if done.outcome is not None:
                latency = (self.wall() - done.created_at).total_seconds()
                metrics.command_latency_seconds.labels(done.protocol, done.name).observe(latency)
            if done.name == "start":
                metrics.start_commands_total.labels(done.protocol, start_outcome(done)).inc()
        if done.status is CommandStatus.DEAD:
            reason = done.dead_reason or "unknown"
            # the label takes the kind only ("cannot encode: <error>" carries free text)
            with never_fails():
                metrics.commands_dead_total.labels(reason=reason.split(":", 1)[0][:40]).inc()
            # webhook-ready: the device's event log says which command died and why
            self.writer.put_event(
                EventRow(
                    done.device_id,
                    self.wall(),
                    EventKind.COMMAND_DEAD.value,
                    reason,
                    {
                        "command_id": done.command_id,
                        "command": done.name,
                        "order_no": done.order_no,
                    },
                )
            )
        await firmware.on_command_finished(self, done.command_id, done.name)

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
        frame_id: int | None = None,
    ) -> None:
        """Write ``frame`` to the device (after the rows put so far are committed, with
        ``after_commit``) and put its audit row, with ``frame_id`` if the caller took
        one already (to name the frame as a cause), else a new id."""
        protocol = link.protocol or "ap3000"

        def write() -> None:
            link.send(frame, priority)
            self.metrics.frame(protocol, "out", command)

        self.writer.put_frame(
            FrameRow(
                self.wall(),
                link.id,
                device_id,
                "out",
                protocol,
                command,
                mask_frame(message, frame),
                id=self.writer.frame_ids() if frame_id is None else frame_id,
            )
        )
        if after_commit:
            self.writer.after_commit(write)
        else:
            write()


async def run(
    settings: Settings,
    stop: asyncio.Event,
    *,
    worker: int = 0,
    force: asyncio.Event | None = None,
) -> None:
    """Run a gateway until ``stop`` is set, then drain it (``force``: cut the drain short).

    A port that cannot be bound is a :class:`StartupError` before anything starts (the
    workers of ``serve --workers N`` share theirs: the supervisor checked them).
    """
    if settings.workers == 1:
        check_listen_addresses(settings)
    gateway = Gateway(settings, worker=worker)
    await gateway.start()
    if settings.workers == 1:
        log.info(
            "ready; Ctrl-C (SIGTERM) drains and stops",
            devices=gateway.cluster.device_listen,
            api=gateway.http_url,
        )
    try:
        await stop.wait()
        await gateway.drain(force)
    finally:
        with contextlib.suppress(Exception):
            await gateway.stop()
