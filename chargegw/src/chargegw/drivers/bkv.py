"""The BKV driver: a gateway relays several sockets, each with two jacks.

One connection = one gateway (``gateway_id``); its sockets are devices with the ids
``<gateway_id>-<socket>``. Replies follow bkv.md and its field notes: the heartbeat is
answered with the server's local time, status clusters and event reports are ACKed,
end reports are ACKed only after they are stored, in the 0x0C form that stops a real
gateway's resends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog

from chargegw.audit import mask_text
from chargegw.core import EventKind, PortStatus, bkv_device_id
from chargegw.domain.orders import SettlementReport, find_session_order, note_session
from chargegw.domain.ports import Handler, Inbound, M
from chargegw.drivers import bkv_commands as commands
from chargegw.drivers.base import (
    DriverContext,
    Hooks,
    gateway_connected,
    record_swipe,
    retry_while_connected,
    send_reply,
)
from chargegw.net.transport import DeviceLink
from chargegw.quirks import CONNECT_REPORT, Switch
from chargegw.store.database import Connection
from chargegw.store.writer import DeviceRow, EventRow, GatewayRow, PortRow, port_mask
from chargeproto import ABSENT, Message, bkv

log = structlog.get_logger("chargegw.bkv")

#: BKV success code (bkv.md 11.1)
OK = 1
_BEIJING = timezone(timedelta(hours=8), "UTC+08:00")

#: end reports: a settlement, ACKed after commit
_END_REPORTS = (bkv.EndReport, bkv.PowerTierEndReport, bkv.CardEndReport, bkv.FeeModeEndReport)
#: energy reported in 1 Wh steps: a limit counts as reached within this much
_ENERGY_SLACK_KWH = 0.0015

_R = TypeVar("_R")


def device_timezone(name: str) -> timezone | ZoneInfo:
    """The zone the gateways' clocks run in (China: UTC+8 without DST)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("unknown time zone, using UTC+8", zone=name)
        return _BEIJING


def _present(value: Any) -> Any:
    return None if value is ABSENT else value


def _detail(message: Message) -> dict[str, Any]:
    fields = message.to_fields()
    for key in ("card_id", "iccid"):
        if isinstance(fields.get(key), str):
            fields[key] = mask_text(fields[key])
    return fields


def _reported(message: bkv.BkvMessage, device_id: str | None) -> list[str | None]:
    """The devices a message reports on: every socket of a status cluster, else the one
    it names (or None)."""
    if not isinstance(message, bkv.StatusCluster):
        return [device_id]
    sockets = message.sockets if message.sockets is not ABSENT else ()
    numbers = [_present(socket.socket) for socket in sockets]
    return [bkv_device_id(message.gateway_id, n) for n in numbers if isinstance(n, int)]


def _status_of(status_bits: int) -> PortStatus:
    flags = bkv.status_flags(status_bits)
    if not flags["online"]:
        return PortStatus.UNKNOWN
    if flags["charging"]:
        return PortStatus.CHARGING
    return PortStatus.IDLE


def _text_of(status_bits: int) -> str:
    flags = bkv.status_flags(status_bits)
    return ", ".join(name for name, on in flags.items() if on) or "none"


_CHARGING_BIT = 0x10  # the jack status byte's charging bit (bkv.md 10.1)
#: both per status byte, worked out once (every status cluster carries them)
_STATUS_OF_BYTE = tuple(_status_of(bits) for bits in range(256))
_TEXT_OF_BYTE = tuple(_text_of(bits) for bits in range(256))


def _jack_status(status_bits: int | None) -> PortStatus:
    if status_bits is None:
        return PortStatus.UNKNOWN
    if 0 <= status_bits < 256:
        return _STATUS_OF_BYTE[status_bits]
    return _status_of(status_bits)


def _flags_text(status_bits: int | None) -> str | None:
    if status_bits is None:
        return None
    if 0 <= status_bits < 256:
        return _TEXT_OF_BYTE[status_bits]
    return _text_of(status_bits)


class BkvDriver:
    """Answers BKV frames as the protocol requires and records what they report; then
    hands them to the handlers the engines registered (:meth:`on`)."""

    protocol = "bkv"

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.hooks = Hooks(self.protocol, bkv.BkvMessage)
        self.zone = device_timezone(ctx.settings.device_timezone)
        #: (device, API port) -> (order, business number) of starts the socket accepted
        self._started: dict[tuple[str, int], tuple[str, int]] = {}
        #: (device, API port, business number) of sessions a stop was acknowledged for
        self._stops_acked: set[tuple[str, int, int]] = set()
        #: order lookups, settlements and progress of one socket, one at a time
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._handlers: dict[type[Message], Callable[[DeviceLink, Any], None]] = {
            bkv.Heartbeat: self._heartbeat,
            bkv.StatusCluster: self._status_cluster,
            bkv.SocketState: self._socket_state,
            bkv.SocketState1D: self._socket_state,
            bkv.EventReport: self._event_report,
            bkv.CardSwipe: self._card_swipe,
            bkv.BalanceQuery: self._balance,
            bkv.TlvContainer: self._container,
            **{cls: self._end_report for cls in _END_REPORTS},
        }

    def on(self, message_type: type[M], handler: Handler[M]) -> None:
        """Hand every ``message_type`` message to ``handler`` once it is answered (a
        status cluster once per socket it reports)."""
        self.hooks.on(message_type, handler)

    def heartbeat_interval(self) -> float:
        return self.ctx.settings.bkv_status_interval_s

    def device_of(self, message: Message) -> str | None:
        """The socket a frame concerns, when it names exactly one."""
        assert isinstance(message, bkv.BkvMessage)
        socket = _present(getattr(message, "socket", None))
        if isinstance(socket, int):
            return bkv_device_id(message.gateway_id, socket)
        return None

    def on_message(self, link: DeviceLink, message: Message) -> None:
        assert isinstance(message, bkv.BkvMessage)
        wall = self.ctx.wall()
        self._gateway(link, message, wall)
        device_id = self.device_of(message)
        if device_id is not None and not isinstance(message, bkv.StatusCluster):
            self._seen(link, message.gateway_id, device_id, wall, heartbeat=False)
        answered = None
        if message.direction is bkv.Heartbeat.direction and message.seq:
            answered = self._command_reply(link, message)
        handler = self._handlers.get(type(message))
        if handler is not None:
            handler(link, message)
        else:
            self._other(message, device_id, wall)
        if self.hooks.wants(type(message)):  # parameter read-backs, OTA verification ...
            for reported in _reported(message, device_id):
                reply = partial(self._answer, link, reported)
                owner = reported or message.gateway_id
                self.hooks.tell(Inbound(link, message, reported, owner, answered, reply))

    # -- identity --

    def _gateway(self, link: DeviceLink, message: bkv.BkvMessage, wall: datetime) -> None:
        if link.gateway != message.gateway_id:
            link.gateway = message.gateway_id
            gateway_connected(self.ctx, link, message.gateway_id, protocol=self.protocol, wall=wall)
        self.ctx.writer.put_gateway(
            GatewayRow(message.gateway_id, protocol=self.protocol, last_seen_at=wall)
        )

    def _seen(
        self, link: DeviceLink, gateway_id: str, device_id: str, wall: datetime, *, heartbeat: bool
    ) -> None:
        self.ctx.sessions.seen(
            link,
            device_id,
            protocol=self.protocol,
            gateway_id=gateway_id,
            heartbeat_interval_s=self.heartbeat_interval(),
            heartbeat=heartbeat,
            now=self.ctx.now(),
            wall=wall,
        )

    def _reply(
        self,
        link: DeviceLink,
        reply: bkv.BkvMessage,
        device_id: str | None,
        *,
        after_commit: bool = False,
    ) -> None:
        send_reply(self.ctx, link, reply, bkv.encode(reply), device_id, after_commit=after_commit)

    def _answer(self, link: DeviceLink, device_id: str | None, reply: Any) -> None:
        """An engine's answer to a device's message."""
        assert isinstance(reply, bkv.BkvMessage)
        self._reply(link, reply, device_id)

    def _ack(self, cls: Any, message: Any, **fields: Any) -> bkv.BkvMessage:
        """A TLV ACK echoing the report's header items (bkv.md 9.4, 9.6, 9.8)."""
        reply: bkv.BkvMessage = cls.create(
            message.gateway_id,
            message.seq,
            bkv_seq=message.bkv_seq,
            bkv_gateway_id=message.bkv_gateway_id,
            **fields,
        )
        return reply

    # -- commands and orders --

    def _command_reply(self, link: DeviceLink, m: bkv.BkvMessage) -> int | None:
        """A frame echoing a server seq: the answer to the command in flight, if any
        (its id is returned)."""
        key = commands.key_of(m)
        waiting = self.ctx.outbox.open_command(key)
        if waiting is None:
            self.ctx.outbox.late_reply(key)  # counted if its command timed out
            return None
        result = commands.outcome(m)
        if isinstance(m, bkv.ChargeControlReply) and result.success:
            port = m.port + 1
            if waiting.name == "stop":
                self._stops_acked.add((waiting.device_id, port, m.business_no))
            elif waiting.name == "start" and waiting.order_no is not None:
                # the outbox writes the business number with the start's outcome; until
                # that commits, a status or end report that follows at once finds the
                # order by this hint
                self._started[(waiting.device_id, port)] = (waiting.order_no, m.business_no)
        self.ctx.outbox.on_reply(key, result)
        return waiting.command_id

    def _query_answered(self, device_id: str, m: Message) -> None:
        """A 0x1D query is answered by 0x1C or by a 0x1017 cluster about the socket."""
        key = commands.query_key(device_id)
        if self.ctx.outbox.open_command(key) is not None:
            self.ctx.outbox.on_reply(key, commands.outcome(m))

    @contextlib.asynccontextmanager
    async def _lock(self, device_id: str) -> AsyncIterator[None]:
        """One socket's order lookups, settlements and progress, one at a time. The lock
        exists only while someone holds or waits for it."""
        lock, users = self._locks.get(device_id, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[device_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            _, users = self._locks[device_id]
            if users <= 1:
                del self._locks[device_id]
            else:
                self._locks[device_id] = (lock, users - 1)

    def _hint(self, device_id: str, port: int, business_no: int) -> str | None:
        """The order whose start this socket just answered with ``business_no``."""
        started = self._started.get((device_id, port))
        return started[0] if started is not None and started[1] == business_no else None

    def forget(self, device_id: str) -> None:
        """The process let go of the socket: drop what is kept for it (the database keeps
        the orders)."""
        for key in [k for k in self._started if k[0] == device_id]:
            del self._started[key]
        self._stops_acked = {k for k in self._stops_acked if k[0] != device_id}

    async def _db(self, step: Callable[[Connection], Awaitable[_R]], link: DeviceLink | None) -> _R:
        """Run ``step(conn)`` in a transaction; while the database is away, retry as long
        as ``link`` is open (the gateway resends otherwise)."""

        async def attempt() -> _R:
            pool = self.ctx.pool
            assert pool is not None
            async with pool.acquire(timeout=5) as conn, conn.transaction():
                return await step(conn)

        return await retry_while_connected(attempt, link)

    def _stop_reason(self, order: Any, device_id: str, port: int, m: Any) -> str:
        """The neutral stop reason BKV lets one derive honestly.

        0x02 carries no reason code and the status byte is no guide (bkv.md 15): a
        session the platform stopped (stop acknowledged) is ``server_stop``; one that
        reached the order's own limit ``time_limit`` / ``energy_limit``; anything else
        ``unknown`` (the unpublished ``end_reason`` code is kept beside).
        """
        business_no = _present(m.business_no)
        stopped = (device_id, port, business_no) in self._stops_acked
        if stopped or (order is not None and order["stop_acked"]):
            return "server_stop"
        if order is None:
            return "unknown"
        minutes, energy = _present(m.duration_min), _present(m.energy_kwh)
        limit_min, limit_kwh = order["requested_duration_min"], order["requested_energy_kwh"]
        time_reached = isinstance(minutes, int) and bool(limit_min) and minutes >= limit_min
        if order["mode"] == "time" and time_reached:
            return "time_limit"
        energy_reached = (
            isinstance(energy, int | float)
            and bool(limit_kwh)
            and energy + _ENERGY_SLACK_KWH >= limit_kwh
        )
        if order["mode"] == "energy" and energy_reached:
            return "energy_limit"
        return "unknown"

    def _device_time(self, text: Any) -> datetime | None:
        if not isinstance(text, str):
            return None
        try:
            local = datetime.fromisoformat(text)
        except ValueError:
            return None
        return local.replace(tzinfo=self.zone).astimezone(UTC)

    def _settlement_values(
        self, m: Any, detail: dict[str, Any], order: Any, device_id: str, port: int
    ) -> dict[str, Any]:
        minutes, energy = _present(m.duration_min), _present(m.energy_kwh)
        code = _present(getattr(m, "end_reason", None))
        values: dict[str, Any] = {
            "duration_s": minutes * 60 if isinstance(minutes, int) else None,
            "energy_kwh": energy,
            "stop_reason": self._stop_reason(order, device_id, port, m),
            "stop_reason_code": code,
            "stop_reason_text": None if code is None else bkv.END_REASONS.text(code),
            "business_no": _present(m.business_no),
            "settlement": detail,
        }
        if isinstance(m, bkv.FeeModeEndReport):
            fees = [_present(m.electricity_fee_cent), _present(m.service_fee_cent)]
            if any(isinstance(fee, int) for fee in fees):
                values["amount_cent"] = sum(fee for fee in fees if isinstance(fee, int))
        elif isinstance(m, bkv.PowerTierEndReport | bkv.CardEndReport):
            values["amount_cent"] = m.amount_cent
            if m.settlement_power_w:
                values["max_power_w"] = m.settlement_power_w
        ended = self._device_time(_present(getattr(m, "end_time", None)))
        if ended is not None:
            values["device_ended_at"] = ended
        return values

    async def _progress(
        self, link: DeviceLink, device_id: str, port: int, business_no: int, sample: dict[str, Any]
    ) -> None:
        """A jack reports charging: a sample of its order; a start left ``starting`` or
        ``failed`` without an answer is reconciled (``charging``)."""
        wall = self.ctx.wall()
        charged_s = sample.get("duration_s") or 0
        began = None if sample.get("duration_s") is None else wall - timedelta(seconds=charged_s)

        async def find(conn: Connection) -> str | None:
            order = await find_session_order(
                conn,
                device_id,
                port,
                business_no,
                hint_order_no=self._hint(device_id, port, business_no),
                session_started_at=began,
            )
            if order is None:
                return None
            order_no = str(order["order_no"])
            await note_session(conn, order_no, business_no, wall - timedelta(seconds=charged_s))
            return order_no

        async with self._lock(device_id):
            order_no = await self._db(find, link)
            if order_no is None:  # not started by the platform: its end report creates it
                return
            await self.ctx.order_progress(
                protocol=self.protocol,
                device_id=device_id,
                port=port,
                order_no=order_no,
                start_mode="online",
                sample=sample,
            )

    def _jacks_reported(self, link: DeviceLink, device_id: str, jacks: Any) -> None:
        for jack in jacks:
            port, bits = _present(jack.port), _present(jack.status_bits)
            business_no = _present(jack.business_no)
            if not isinstance(port, int) or not isinstance(bits, int):
                continue
            if not bits & _CHARGING_BIT or not business_no:  # status_flags' "charging"
                continue
            minutes = _present(jack.duration_min)
            sample = {
                "duration_s": minutes * 60 if isinstance(minutes, int) else None,
                "energy_kwh": _present(jack.energy_kwh),
                "power_w": _present(jack.power_w),
                "voltage_v": _present(jack.voltage_v),
                "current_a": _present(jack.current_a),
            }
            self.ctx.run(
                self._progress(link, device_id, port + 1, business_no, sample), "order-progress"
            )

    # -- handlers --

    def _other(self, message: bkv.BkvMessage, device_id: str | None, wall: datetime) -> None:
        """A frame without a handler of its own: an event (answers to server commands,
        unknown commands) for the command layer and the log."""
        up = message.direction is bkv.Heartbeat.direction
        kind = EventKind.COMMAND_REPLY if up and message.seq else EventKind.REPORT
        self.ctx.writer.put_event(
            EventRow(
                device_id or message.gateway_id,
                wall,
                kind.value,
                type(message).__name__,
                _detail(message),
            )
        )

    def _container(self, link: DeviceLink, m: bkv.TlvContainer) -> None:
        """A 0x1000 container without a class. The 0x1013 a gateway sends after
        connecting is a known connect report for gateways with that quirk profile
        (docs/quirks.md); any other container is kept as an unknown one."""
        wall = self.ctx.wall()
        device_id = self.device_of(m)
        if m.bkv_cmd == CONNECT_REPORT and self.ctx.quirks.active(m.gateway_id).has(
            Switch.CONNECT_REPORT_0X1013
        ):
            self.ctx.writer.put_event(
                EventRow(
                    device_id or m.gateway_id,
                    wall,
                    EventKind.REPORT.value,
                    "connect_report",
                    _detail(m),
                )
            )
            return
        log.info("unknown 0x1000 container", gateway_id=m.gateway_id, bkv_cmd=m.bkv_cmd)
        self._other(m, device_id, wall)

    def _heartbeat(self, link: DeviceLink, m: bkv.Heartbeat) -> None:
        self.ctx.quirks.learn(m.gateway_id, self.protocol, "gateway", m.firmware_version or None)
        now = self.ctx.wall().astimezone(self.zone).replace(microsecond=0, tzinfo=None)
        self._reply(
            link, bkv.HeartbeatReply(m.gateway_id, m.seq, server_time=now.isoformat()), None
        )
        if m.iccid:
            self.ctx.sessions.bind_iccid(link, m.iccid)
        self.ctx.writer.put_gateway(
            GatewayRow(
                m.gateway_id,
                protocol=self.protocol,
                iccid=m.iccid or None,
                firmware=m.firmware_version or None,
            )
        )

    def _status_cluster(self, link: DeviceLink, m: bkv.StatusCluster) -> None:
        wall = self.ctx.wall()
        for socket in m.sockets if m.sockets is not ABSENT else ():
            number = _present(socket.socket)
            if not isinstance(number, int):
                continue
            device_id = bkv_device_id(m.gateway_id, number)
            self._seen(link, m.gateway_id, device_id, wall, heartbeat=True)
            ports = socket.ports if socket.ports is not ABSENT else ()
            version = _present(socket.firmware_version)
            firmware = None if version is None else str(version)
            self.ctx.quirks.learn(device_id, self.protocol, "socket", firmware)
            writer = self.ctx.writer
            # a socket's report repeats while it idles: one the same as the last (its
            # rows unchanged since) only moves its jacks' report times. The flag tells
            # -1 from -2 (in CPython they hash alike; temperatures go below zero)
            same, key = writer.repeated(device_id, socket, socket.temperature_c == -1)
            if same:
                writer.touch_ports(device_id, wall)
                self._jacks_reported(link, device_id, ports)
                self._query_answered(device_id, m)
                continue
            writer.put_device(
                DeviceRow(
                    device_id,
                    protocol=self.protocol,
                    gateway_id=m.gateway_id,
                    socket_no=number,
                    firmware=None if version is None else str(version),
                    port_count=len(ports) or None,
                    temperature_c=_present(socket.temperature_c),
                    signal_strength=_present(socket.signal_strength),
                    reported_ports=port_mask(
                        port + 1 for jack in ports if isinstance(port := _present(jack.port), int)
                    ),
                )
            )
            for jack in ports:
                port = _present(jack.port)
                if not isinstance(port, int):
                    continue
                bits = _present(jack.status_bits)
                business_no = _present(jack.business_no)
                self.ctx.writer.put_port(
                    PortRow(
                        device_id,
                        port + 1,
                        status=_jack_status(bits).value,
                        status_code=bits,
                        status_text=_flags_text(bits),
                        voltage_v=_present(jack.voltage_v),
                        power_w=_present(jack.power_w),
                        current_a=_present(jack.current_a),
                        energy_kwh=_present(jack.energy_kwh),
                        order_ref=None if not business_no else str(business_no),
                        reported_at=wall,
                    )
                )
            writer.remember_repeat(device_id, key)
            self._jacks_reported(link, device_id, ports)
            self._query_answered(device_id, m)
        self._reply(link, self._ack(bkv.StatusClusterAck, m, result=OK), None)

    def _socket_state(self, link: DeviceLink, m: bkv.SocketState) -> None:
        device_id = bkv_device_id(m.gateway_id, m.socket)
        self.ctx.quirks.learn(device_id, self.protocol, "socket", str(m.firmware_version))
        wall = self.ctx.wall()
        self.ctx.writer.put_device(
            DeviceRow(
                device_id,
                protocol=self.protocol,
                gateway_id=m.gateway_id,
                socket_no=m.socket,
                firmware=str(m.firmware_version),
                temperature_c=m.temperature_c,
                signal_strength=m.signal_strength,
                port_count=len(m.ports),
            )
        )
        for jack in m.ports:
            self.ctx.writer.put_port(
                PortRow(
                    device_id,
                    jack.port + 1,
                    status=_jack_status(jack.status_bits).value,
                    status_code=jack.status_bits,
                    status_text=_flags_text(jack.status_bits),
                    voltage_v=jack.voltage_v,
                    power_w=jack.power_w,
                    current_a=jack.current_a,
                    energy_kwh=jack.energy_kwh,
                    order_ref=str(jack.business_no) if jack.business_no else None,
                    reported_at=wall,
                )
            )
        self.ctx.writer.put_event(
            EventRow(device_id, wall, EventKind.COMMAND_REPLY.value, type(m).__name__, _detail(m))
        )
        self._jacks_reported(link, device_id, m.ports)
        self._query_answered(device_id, m)

    def _event_report(self, link: DeviceLink, m: bkv.EventReport) -> None:
        socket = _present(m.socket)
        owner = bkv_device_id(m.gateway_id, socket) if isinstance(socket, int) else m.gateway_id
        self.ctx.writer.put_event(
            EventRow(owner, self.ctx.wall(), EventKind.ALARM.value, "EventReport", _detail(m))
        )
        self._reply(link, self._ack(bkv.EventReportAck, m, socket=m.socket, result=OK), None)

    def _end_report(self, link: DeviceLink, m: Any) -> None:
        socket, port = _present(m.socket), _present(m.port)
        reply: bkv.BkvMessage
        if isinstance(m, bkv.FeeModeEndReport):
            reply = self._ack(bkv.FeeModeEndAck, m, result=OK, socket=m.socket, port=m.port)
        else:
            # the 0x0C form stops a real gateway's resends (bkv.md field notes)
            reply = bkv.CardEndAck(m.gateway_id, m.seq, socket=m.socket, result=OK)
        if not isinstance(socket, int) or not isinstance(port, int):
            # no jack to settle: kept as an event, acknowledged once stored
            owner = bkv_device_id(m.gateway_id, socket) if isinstance(socket, int) else None
            self.ctx.writer.put_event(
                EventRow(
                    owner or m.gateway_id,
                    self.ctx.wall(),
                    EventKind.SETTLEMENT.value,
                    type(m).__name__,
                    _detail(m),
                )
            )
            self._reply(link, reply, owner, after_commit=True)
            return
        device_id = bkv_device_id(m.gateway_id, socket)
        business_no = _present(m.business_no)
        business_no = business_no if isinstance(business_no, int) and business_no else None
        detail = _detail(m)
        card = isinstance(m, bkv.CardEndReport)
        minutes, energy = _present(m.duration_min), _present(m.energy_kwh)
        report = SettlementReport(
            protocol=self.protocol,
            device_id=device_id,
            port=port + 1,
            start_mode="card" if card else "device",
            order_ref=None,
            business_no=business_no,
            duration_s=minutes * 60 if isinstance(minutes, int) else None,
            energy_kwh=energy if isinstance(energy, int | float) else None,
            device_ended_at=self._device_time(_present(getattr(m, "end_time", None))),
            values=lambda order: self._settlement_values(m, detail, order, device_id, port + 1),
            hint_order_no=None
            if business_no is None
            else self._hint(device_id, port + 1, business_no),
            stuck_starts=not card,
        )

        async def settle_then_ack() -> None:
            # the gateway resends until acknowledged: acknowledge only what is committed
            async with self._lock(device_id):
                await self.ctx.settle_order(report, detail=detail, while_connected=link)
            # committed: nothing after this may keep the ACK from going out
            self._reply(link, reply, device_id)
            if business_no is not None and self._hint(device_id, port + 1, business_no):
                self._started.pop((device_id, port + 1), None)
                self._stops_acked.discard((device_id, port + 1, business_no))

        self.ctx.run(settle_then_ack(), "settlement")

    def _card_swipe(self, link: DeviceLink, m: bkv.CardSwipe) -> None:
        """Answer 0x0B from the card registry (bkv.md 7.6). Accepted: an order (start
        mode ``card``, the swipe's business number) and its 0x0B down order in the
        outbox, confirmed by 0x0F. Refused: a 0x0B down with ``switch`` 0 at once."""
        ctx = self.ctx
        device_id = bkv_device_id(m.gateway_id, m.socket)
        port = m.port + 1

        def start_params(order: Mapping[str, Any]) -> dict[str, Any]:
            params: dict[str, Any] = {
                "port": m.port,
                "card_business_no": m.business_no,
                "charge_mode": order["charge_mode"],
                "duration_raw": order["duration_min"] or 0,
            }
            if "tiers" in order:
                params.update(amount_cent=order["amount_cent"], tiers=order["tiers"])
            return params

        async def decide_then_reply() -> None:
            result = await ctx.cards.swipe_with_limit(
                protocol=self.protocol,
                device_id=device_id,
                card_id=m.card_id,
                port=port,
                business_no=m.business_no,
                start_params=start_params,
            )
            if result.resent:
                # the same swipe again: its order is on its way, a refusal would
                # contradict it
                detail = {**_detail(m), "order_no": result.order_no}
                ctx.writer.put_event(
                    EventRow(device_id, ctx.wall(), EventKind.CARD_SWIPE.value, "resend", detail)
                )
                ctx.outbox.wake(device_id)
                return
            record_swipe(
                ctx, device_id, result, {**_detail(m), "balance_cent": result.balance_cent}
            )
            if result.order_no is not None:
                ctx.outbox.wake(device_id)  # the 0x0B order goes out through the outbox
                return
            refusal = bkv.CardOrder(
                m.gateway_id,
                m.seq,
                socket=m.socket,
                port=m.port,
                business_no=m.business_no,
                switch=0,
                charge_mode=commands.CARD_BY_TIME,
                duration_raw=0,
                energy_kwh=0.0,
            )
            self._reply(link, refusal, device_id)

        ctx.run(decide_then_reply(), "card-swipe")

    def _balance(self, link: DeviceLink, m: bkv.BalanceQuery) -> None:
        """Answer 0x1A with the card's balance (bkv.md 7.7); 0 for an unknown card."""
        ctx = self.ctx
        device_id = bkv_device_id(m.gateway_id, m.socket)

        async def look_up_then_reply() -> None:
            result = await ctx.cards.swipe(
                protocol=self.protocol,
                device_id=device_id,
                card_id=m.card_id,
                port=None,
                start_params=None,
                what="balance query",
            )
            record_swipe(
                ctx, device_id, result, {**_detail(m), "balance_cent": result.balance_cent}
            )
            reply = bkv.BalanceReply(
                m.gateway_id,
                m.seq,
                socket=m.socket,
                port=m.port,
                card_id=m.card_id,
                balance_cent=min(result.balance_cent, 0xFFFFFFFF),
            )
            self._reply(link, reply, device_id)

        ctx.run(look_up_then_reply(), "balance-query")
