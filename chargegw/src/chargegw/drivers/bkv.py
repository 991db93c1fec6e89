"""The BKV driver: a gateway relays several sockets, each with two jacks.

One connection = one gateway (``gateway_id``); its sockets are devices with the ids
``<gateway_id>-<socket>``. Replies follow bkv.md and its field notes: the heartbeat is
answered with the server's local time, status clusters and event reports are ACKed,
end reports are ACKed only after they are stored, in the 0x0C form that stops a real
gateway's resends.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog

from chargeproto import ABSENT, Message, bkv

from ..audit import mask_text
from ..core import EventKind, PortStatus, bkv_device_id
from ..transport import REPLY, DeviceLink
from .base import DriverContext, command_label

log = structlog.get_logger("chargegw.bkv")

#: BKV success code (bkv.md 11.1)
OK = 1
_BEIJING = timezone(timedelta(hours=8), "UTC+08:00")

#: end reports: a settlement, ACKed after commit
_END_REPORTS = (bkv.EndReport, bkv.PowerTierEndReport, bkv.CardEndReport, bkv.FeeModeEndReport)


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


def _jack_status(status_bits: int | None) -> PortStatus:
    if status_bits is None:
        return PortStatus.UNKNOWN
    flags = bkv.status_flags(status_bits)
    if not flags["online"]:
        return PortStatus.UNKNOWN
    if flags["charging"]:
        return PortStatus.CHARGING
    return PortStatus.IDLE


def _flags_text(status_bits: int | None) -> str | None:
    if status_bits is None:
        return None
    flags = bkv.status_flags(status_bits)
    return ", ".join(name for name, on in flags.items() if on) or "none"


class BkvDriver:
    """Answers BKV frames as the protocol requires and records what they report."""

    protocol = "bkv"

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.zone = device_timezone(ctx.settings.device_timezone)
        self._handlers: dict[type[Message], Callable[[DeviceLink, Any], None]] = {
            bkv.Heartbeat: self._heartbeat,
            bkv.StatusCluster: self._status_cluster,
            bkv.SocketState: self._socket_state,
            bkv.SocketState1D: self._socket_state,
            bkv.EventReport: self._event_report,
            bkv.CardSwipe: self._card_swipe,
            bkv.BalanceQuery: self._balance,
            **{cls: self._end_report for cls in _END_REPORTS},
        }

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
        handler = self._handlers.get(type(message))
        if handler is not None:
            handler(link, message)
            return
        up = message.direction is bkv.Heartbeat.direction
        kind = EventKind.COMMAND_REPLY if up and message.seq else EventKind.REPORT
        self.ctx.writer.put_event(
            device_id or message.gateway_id,
            wall,
            kind.value,
            type(message).__name__,
            _detail(message),
        )

    # -- identity --

    def _gateway(self, link: DeviceLink, message: bkv.BkvMessage, wall: datetime) -> None:
        if link.driver_state.get("gateway") != message.gateway_id:
            link.driver_state["gateway"] = message.gateway_id
            self.ctx.writer.put_gateway(
                message.gateway_id,
                protocol=self.protocol,
                online=True,
                connection_id=link.id,
                node=self.ctx.settings.node,
                remote_addr=link.remote,
                connected_at=wall,
                iccid=link.iccid,
            )
        self.ctx.writer.put_gateway(message.gateway_id, protocol=self.protocol, last_seen_at=wall)

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
        self.ctx.send(
            link,
            bkv.encode(reply),
            device_id=device_id,
            command=command_label(reply),
            priority=REPLY,
            message=reply,
            after_commit=after_commit,
        )

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

    # -- handlers --

    def _heartbeat(self, link: DeviceLink, m: bkv.Heartbeat) -> None:
        now = self.ctx.wall().astimezone(self.zone).replace(microsecond=0, tzinfo=None)
        self._reply(
            link, bkv.HeartbeatReply(m.gateway_id, m.seq, server_time=now.isoformat()), None
        )
        if m.iccid:
            self.ctx.sessions.bind_iccid(link, m.iccid)
        self.ctx.writer.put_gateway(
            m.gateway_id,
            protocol=self.protocol,
            iccid=m.iccid or None,
            firmware=m.firmware_version or None,
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
            firmware = _present(socket.firmware_version)
            self.ctx.writer.put_device(
                device_id,
                protocol=self.protocol,
                gateway_id=m.gateway_id,
                socket_no=number,
                firmware=None if firmware is None else str(firmware),
                port_count=len(ports) or None,
                temperature_c=_present(socket.temperature_c),
                signal_strength=_present(socket.signal_strength),
            )
            for jack in ports:
                port = _present(jack.port)
                if not isinstance(port, int):
                    continue
                bits = _present(jack.status_bits)
                business_no = _present(jack.business_no)
                self.ctx.writer.put_port(
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
        self._reply(link, self._ack(bkv.StatusClusterAck, m, result=OK), None)

    def _socket_state(self, link: DeviceLink, m: bkv.SocketState) -> None:
        device_id = bkv_device_id(m.gateway_id, m.socket)
        wall = self.ctx.wall()
        self.ctx.writer.put_device(
            device_id,
            protocol=self.protocol,
            gateway_id=m.gateway_id,
            socket_no=m.socket,
            firmware=str(m.firmware_version),
            temperature_c=m.temperature_c,
            signal_strength=m.signal_strength,
            port_count=len(m.ports),
        )
        for jack in m.ports:
            self.ctx.writer.put_port(
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
        self.ctx.writer.put_event(
            device_id, wall, EventKind.COMMAND_REPLY.value, type(m).__name__, _detail(m)
        )

    def _event_report(self, link: DeviceLink, m: bkv.EventReport) -> None:
        socket = _present(m.socket)
        owner = bkv_device_id(m.gateway_id, socket) if isinstance(socket, int) else m.gateway_id
        self.ctx.writer.put_event(
            owner, self.ctx.wall(), EventKind.ALARM.value, "EventReport", _detail(m)
        )
        self._reply(link, self._ack(bkv.EventReportAck, m, socket=m.socket, result=OK), None)

    def _end_report(self, link: DeviceLink, m: Any) -> None:
        socket = _present(m.socket)
        owner = bkv_device_id(m.gateway_id, socket) if isinstance(socket, int) else m.gateway_id
        self.ctx.writer.put_event(
            owner, self.ctx.wall(), EventKind.SETTLEMENT.value, type(m).__name__, _detail(m)
        )
        reply: bkv.BkvMessage
        if isinstance(m, bkv.FeeModeEndReport):
            reply = self._ack(bkv.FeeModeEndAck, m, result=OK, socket=m.socket, port=m.port)
        else:
            # the 0x0C form stops a real gateway's resends (bkv.md field notes)
            reply = bkv.CardEndAck(m.gateway_id, m.seq, socket=m.socket, result=OK)
        self._reply(link, reply, owner, after_commit=True)

    def _card_swipe(self, link: DeviceLink, m: bkv.CardSwipe) -> None:
        # no card registry yet: nothing is started for an unknown card
        device_id = bkv_device_id(m.gateway_id, m.socket)
        self.ctx.writer.put_event(
            device_id,
            self.ctx.wall(),
            EventKind.CARD_SWIPE.value,
            "card not registered",
            _detail(m),
        )

    def _balance(self, link: DeviceLink, m: bkv.BalanceQuery) -> None:
        device_id = bkv_device_id(m.gateway_id, m.socket)
        self.ctx.writer.put_event(
            device_id,
            self.ctx.wall(),
            EventKind.CARD_SWIPE.value,
            "balance query, card not registered",
            _detail(m),
        )
        reply = bkv.BalanceReply(
            m.gateway_id, m.seq, socket=m.socket, port=m.port, card_id=m.card_id, balance_cent=0
        )
        self._reply(link, reply, device_id)
