"""The AP3000 driver: reply rules and state updates for "DNY" piles and hosts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

import structlog

from chargegw.audit import mask_text
from chargegw.core import AP3000_CHARGING_STATUS, AP3000_PORT_STATUS, EventKind, PortStatus
from chargegw.domain.orders import AP3000_STOP_REASONS, SettlementReport
from chargegw.domain.ports import Handler, Inbound, M
from chargegw.drivers import ap3000_commands as commands
from chargegw.drivers.base import (
    DriverContext,
    Hooks,
    gateway_connected,
    record_swipe,
    send_reply,
)
from chargegw.net.transport import DeviceLink
from chargegw.quirks import ActiveQuirks, Switch, ap3000_device_type
from chargegw.store.writer import DeviceRow, EventRow, GatewayRow, PortRow, port_mask
from chargeproto import ABSENT, Direction, Message, ap3000

log = structlog.get_logger("chargegw.ap3000")

#: physical-id type codes of hosts (main units): gateways, not devices with ports
HOST_TYPES = frozenset({0x09, 0x0A})
#: 0x01 heartbeats in a row, with no 0x21 ever, before the server answers 0x01
LEGACY_AFTER = 2

#: messages that prove the device is alive and running
_HEARTBEATS = (ap3000.Heartbeat, ap3000.LegacyHeartbeat, ap3000.PowerHeartbeat, ap3000.Registration)
#: messages that acknowledge a 0x81 query (it has no reply of its own)
_QUERY_ANSWERS = (ap3000.Registration, ap3000.Heartbeat)
#: device-to-server reports that only go to the event log
_REPORTS: dict[type[Message], EventKind] = {
    ap3000.AlarmPush: EventKind.ALARM,
    ap3000.CabinetHeartbeat: EventKind.REPORT,
    ap3000.ChargeFinished: EventKind.REPORT,
    ap3000.PortPush: EventKind.ALARM,
    ap3000.UpgradeRequest: EventKind.REPORT,
    ap3000.HostFirmwareRequest: EventKind.REPORT,
    ap3000.HostStatusReport: EventKind.REPORT,
    ap3000.SubDeviceVersions: EventKind.REPORT,
    ap3000.FskParamsRequest: EventKind.REPORT,
    ap3000.TestModeReport: EventKind.REPORT,
    ap3000.LocalServerAddress: EventKind.REPORT,
}


class _LinkState:
    """What the driver keeps per connection (piles behind a host share it), freed with it."""

    __slots__ = ("host", "legacy_count", "modern")

    def __init__(self) -> None:
        #: the connection's gateway is a host (not the first pile that spoke)
        self.host = False
        #: piles that sent a 0x21 heartbeat (a tuple: mostly one pile per connection)
        self.modern: tuple[str, ...] = ()
        #: 0x01 heartbeats in a row of piles that sent no 0x21 yet
        self.legacy_count: dict[str, int] | None = None


def _state(link: DeviceLink) -> _LinkState:
    state = link.driver_state
    if state is None:
        state = link.driver_state = _LinkState()
    assert isinstance(state, _LinkState)
    return state


def _detail(message: Message) -> dict[str, Any]:
    fields = message.to_fields()
    for key in ("card_id", "card2", "iccid", "imei"):
        if isinstance(fields.get(key), str):
            fields[key] = mask_text(fields[key])
    fields.pop("card_number", None)
    fields["command"] = f"0x{message.command:02x}" if message.command >= 0 else None
    return fields


#: AP3000 start modes (11.4) -> the platform's start modes
_START_MODES = {0: "card", 1: "online", 3: "code"}


def _status(code: int, table: dict[int, PortStatus]) -> PortStatus:
    return table.get(code, PortStatus.UNKNOWN)


class Ap3000Driver:
    """Answers AP3000 frames as the protocol requires and records what they report; then
    hands them to the handlers the engines registered (:meth:`on`)."""

    protocol = "ap3000"

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.hooks = Hooks(self.protocol, ap3000.Ap3000Message)
        self._handlers: dict[type[Message], Callable[[DeviceLink, Any, str | None], None]] = {
            ap3000.Registration: self._registration,
            ap3000.Heartbeat: self._heartbeat,
            ap3000.LegacyHeartbeat: self._legacy_heartbeat,
            ap3000.PowerHeartbeat: self._power_heartbeat,
            ap3000.TimeRequest: self._time,
            ap3000.HostTimeRequest: self._time,
            ap3000.Settlement: self._settlement,
            ap3000.CardSwipe: self._card_swipe,
            ap3000.OrderConfirm: self._order_confirm,
            ap3000.HostHeartbeat: self._host_heartbeat,
        }

    def on(self, message_type: type[M], handler: Handler[M]) -> None:
        """Hand every ``message_type`` message to ``handler`` once it is answered."""
        self.hooks.on(message_type, handler)

    def heartbeat_interval(self) -> float:
        return self.ctx.settings.ap3000_heartbeat_s

    def forget(self, device_id: str) -> None:
        """Nothing is kept per device outside its connection's ``driver_state``
        (:class:`_LinkState`)."""

    def device_of(self, message: Message) -> str | None:
        """The device a frame concerns (None for a host speaking for itself)."""
        assert isinstance(message, ap3000.Ap3000Message)
        return None if int(message.phy_id[:2], 16) in HOST_TYPES else message.phy_id

    def on_message(self, link: DeviceLink, message: Message) -> None:
        assert isinstance(message, ap3000.Ap3000Message)
        ctx = self.ctx
        wall = ctx.wall()
        gateway_id = self._gateway(link, message, wall)
        device_id = self.device_of(message)
        if device_id is not None:
            ctx.sessions.seen(
                link,
                device_id,
                protocol=self.protocol,
                gateway_id=gateway_id,
                heartbeat_interval_s=self.heartbeat_interval(),
                heartbeat=isinstance(message, _HEARTBEATS),
                now=ctx.now(),
                wall=wall,
            )
        owner = device_id or message.phy_id  # a host answers for itself (host upgrades)
        answered = None
        if message.direction is Direction.UP:
            answered = self._command_reply(owner, message)
            if device_id is not None and isinstance(message, _QUERY_ANSWERS):
                answered = self._query_answered(device_id, message) or answered
        handler = self._handlers.get(type(message))
        if handler is not None:
            handler(link, message, device_id)
        else:
            kind = _REPORTS.get(type(message))
            if kind is None:
                # answers to server commands, unknown commands: kept for the command layer
                up = message.direction is Direction.UP
                kind = EventKind.COMMAND_REPLY if up else EventKind.REPORT
                if isinstance(message, ap3000.UnknownMessage):
                    kind = EventKind.REPORT
            ctx.writer.put_event(
                EventRow(
                    device_id or gateway_id,
                    wall,
                    kind.value,
                    type(message).__name__,
                    _detail(message),
                )
            )
        if self.hooks.wants(type(message)):  # parameter read-backs, upgrade progress ...
            reply = partial(self._answer, link, device_id)
            self.hooks.tell(Inbound(link, message, device_id, owner, answered, reply))

    # -- identity --

    def _gateway(self, link: DeviceLink, message: ap3000.Ap3000Message, wall: datetime) -> str:
        """The gateway of this connection: its host if one spoke, else the pile itself."""
        current = link.gateway
        is_host = int(message.phy_id[:2], 16) in HOST_TYPES
        if current is None or (is_host and current != message.phy_id and not _state(link).host):
            current = message.phy_id
            link.gateway = current
            _state(link).host = is_host
            gateway_connected(self.ctx, link, current, protocol=self.protocol, wall=wall)
        # a pile that is its own gateway: its device's time stands for the gateway's
        # (the API reads the greater), one row update per frame instead of two
        itself = current == message.phy_id and not is_host
        if not itself:
            self.ctx.writer.put_gateway(
                GatewayRow(current, protocol=self.protocol, last_seen_at=wall)
            )
        return current

    # -- replies and updates --

    def _reply(
        self,
        link: DeviceLink,
        reply: ap3000.Ap3000Message,
        device_id: str | None,
        *,
        after_commit: bool = False,
    ) -> None:
        send_reply(
            self.ctx, link, reply, ap3000.encode(reply), device_id, after_commit=after_commit
        )

    def _answer(self, link: DeviceLink, device_id: str | None, reply: Message) -> None:
        """An engine's answer to a device's message."""
        assert isinstance(reply, ap3000.Ap3000Message)
        self._reply(link, reply, device_id)

    def _command_reply(self, owner: str, m: ap3000.Ap3000Message) -> int | None:
        """The command in flight ``m`` answers, if any (its id is returned)."""
        key = commands.reply_key(owner, m.command, m.msg_id)
        waiting = self.ctx.outbox.open_command(key)
        if waiting is None:
            self.ctx.outbox.late_reply(key)  # counted if its command timed out
            return None
        self.ctx.outbox.on_reply(key, commands.outcome(m))
        return waiting.command_id

    def _query_answered(self, device_id: str, m: Message) -> int | None:
        """0x81 has no reply of its own: the 0x20/0x21 it triggers acknowledge it. The
        query's id if ``m`` answered one."""
        key = commands.query_key(device_id)
        waiting = self.ctx.outbox.open_command(key)
        if waiting is not None and self.ctx.outbox.on_reply(key, commands.outcome(m)):
            return waiting.command_id
        return None

    def _registration(
        self, link: DeviceLink, m: ap3000.Registration, device_id: str | None
    ) -> None:
        self._reply(link, ap3000.RegistrationReply(m.phy_id, m.msg_id, result=0), device_id)
        if device_id is None:
            return
        self._learn(device_id, m.device_type, m.firmware_version)
        wall = self.ctx.wall()
        attributes = {"virtual_id": m.virtual_id}
        if m.work_mode is not ABSENT:
            attributes["work_mode"] = m.work_mode
        if m.power_board_version is not ABSENT:
            attributes["power_board_version"] = m.power_board_version
        self.ctx.writer.put_device(
            DeviceRow(
                device_id,
                protocol=self.protocol,
                phy_id=m.phy_id,
                firmware=str(m.firmware_version),
                port_count=m.port_count,
                device_type=m.device_type,
                attributes=attributes,
            )
        )
        self.ctx.writer.put_event(
            EventRow(device_id, wall, EventKind.REGISTERED.value, None, _detail(m))
        )

    def _learn(self, device_id: str | None, device_type: int, firmware: int) -> ActiveQuirks:
        """The quirk profiles of a pile whose type and firmware a frame told."""
        if device_id is None:  # a host speaking for itself
            return self.ctx.quirks.match(self.protocol, ap3000_device_type(device_type), None)
        return self.ctx.quirks.learn(
            device_id, self.protocol, ap3000_device_type(device_type), str(firmware)
        )

    def _heartbeat(self, link: DeviceLink, m: ap3000.Heartbeat, device_id: str | None) -> None:
        state = _state(link)
        if m.phy_id not in state.modern:
            state.modern = (*state.modern, m.phy_id)
            if state.legacy_count:
                state.legacy_count.pop(m.phy_id, None)
        self._reply(link, ap3000.HeartbeatReply(m.phy_id, m.msg_id, result=0), device_id)
        if device_id is None:
            return
        wall = self.ctx.wall()
        writer = self.ctx.writer
        # heartbeats repeat: one the same as the last (its rows unchanged since) only
        # moves the ports' report times, as putting its rows again would
        celsius = m.temperature_c  # as on the wire (unsigned): -1 and -2 hash alike
        same, key = writer.repeated(
            device_id,
            m.ports,
            m.signal_strength,
            None if celsius is None else celsius + 65,
            m.voltage_v,
        )
        if same:
            writer.touch_ports(device_id, wall)
            return
        writer.put_device(
            DeviceRow(
                device_id,
                protocol=self.protocol,
                phy_id=m.phy_id,
                port_count=len(m.ports),
                signal_strength=m.signal_strength,
                temperature_c=m.temperature_c,
                voltage_v=m.voltage_v,
                reported_ports=port_mask(p.port + 1 for p in m.ports),
            )
        )
        # 0x21 reports no port power: an idle port draws none, a busy one is unknown
        self._put_ports(
            device_id,
            m.ports,
            ap3000.PortState.TEXTS["status"],
            m.voltage_v,
            wall,
            power_w=lambda p, status: 0.0 if status is PortStatus.IDLE else None,
        )
        writer.remember_repeat(device_id, key)

    def _put_ports(
        self,
        device_id: str,
        ports: Any,
        texts: Mapping[int, str],
        voltage_v: Any,
        wall: datetime,
        *,
        power_w: Callable[[Any, PortStatus], Any],
    ) -> None:
        """The port list of a 0x21 or 0x01 heartbeat (ports 0-based on the wire)."""
        for p in ports:
            status = _status(p.status, AP3000_PORT_STATUS)
            self.ctx.writer.put_port(
                PortRow(
                    device_id,
                    p.port + 1,
                    status=status.value,
                    status_code=p.status,
                    status_text=texts.get(p.status),
                    voltage_v=voltage_v,
                    power_w=power_w(p, status),
                    reported_at=wall,
                )
            )

    def _legacy_heartbeat(
        self, link: DeviceLink, m: ap3000.LegacyHeartbeat, device_id: str | None
    ) -> None:
        quirks = self._learn(device_id, m.device_type, m.firmware_version)
        # answer 0x01 or 0x21, never both (ap3000.md 3): only devices without 0x21 (by
        # their quirk profile at once, else after LEGACY_AFTER of them in a row)
        state = _state(link)
        if m.phy_id not in state.modern:
            counts = state.legacy_count
            if counts is None:
                counts = state.legacy_count = {}
            count = counts[m.phy_id] = counts.get(m.phy_id, 0) + 1
            if count >= LEGACY_AFTER or quirks.has(Switch.ANSWER_LEGACY_HEARTBEAT):
                self._reply(
                    link, ap3000.LegacyHeartbeatReply(m.phy_id, m.msg_id, result=0), device_id
                )
        if device_id is None:
            return
        wall = self.ctx.wall()
        self.ctx.writer.put_device(
            DeviceRow(
                device_id,
                protocol=self.protocol,
                phy_id=m.phy_id,
                firmware=str(m.firmware_version),
                port_count=len(m.ports),
                device_type=m.device_type,
                signal_strength=m.signal_strength,
                temperature_c=m.temperature_c,
                voltage_v=m.voltage_v,
            )
        )
        self._put_ports(
            device_id,
            m.ports,
            ap3000.LegacyPortState.TEXTS["status"],
            m.voltage_v,
            wall,
            power_w=lambda p, status: p.power_w,
        )

    def _power_heartbeat(
        self, link: DeviceLink, m: ap3000.PowerHeartbeat, device_id: str | None
    ) -> None:
        if device_id is None:
            return
        known = AP3000_CHARGING_STATUS.get(m.status)
        self.ctx.writer.put_port(
            PortRow(
                device_id,
                m.port + 1,
                # other values are errors to ignore (ap3000.md 11.3)
                status=PortStatus.UNKNOWN.value if known is None else known.value,
                status_code=m.status,
                status_text=(
                    None if known is None else ap3000.PowerHeartbeat.TEXTS["status"].get(m.status)
                ),
                power_w=m.power_w,
                voltage_v=None if m.voltage_v is ABSENT else m.voltage_v,
                current_a=None if m.current_a is ABSENT else m.current_a,
                energy_kwh=m.energy_kwh,
                temperature_c=None if m.port_temperature_c is ABSENT else m.port_temperature_c,
                order_ref=m.order_id,
                reported_at=self.ctx.wall(),
            )
        )
        if known in (PortStatus.CHARGING, PortStatus.FLOAT, PortStatus.FULL):
            sample = {
                "duration_s": m.duration_s,
                "energy_kwh": m.energy_kwh,
                "power_w": m.power_w,
                "voltage_v": None if m.voltage_v is ABSENT else m.voltage_v,
                "current_a": None if m.current_a is ABSENT else m.current_a,
            }
            self.ctx.run(
                self.ctx.order_progress(
                    protocol=self.protocol,
                    device_id=device_id,
                    port=m.port + 1,
                    order_no=m.order_id,
                    start_mode=_START_MODES.get(m.start_mode, "device"),
                    sample=sample,
                ),
                "order-progress",
            )

    def _time(self, link: DeviceLink, m: ap3000.Ap3000Message, device_id: str | None) -> None:
        now = int(self.ctx.wall().timestamp())
        reply: ap3000.Ap3000Message
        if isinstance(m, ap3000.HostTimeRequest):
            reply = ap3000.HostTimeReply(m.phy_id, m.msg_id, timestamp_unix=now)
        else:
            reply = ap3000.TimeReply(m.phy_id, m.msg_id, timestamp_unix=now)
        self._reply(link, reply, device_id)

    def _settlement(self, link: DeviceLink, m: ap3000.Settlement, device_id: str | None) -> None:
        # the device deletes a settlement once answered: answer only after it is stored
        owner = device_id or m.phy_id
        values: dict[str, Any] = {
            "duration_s": m.duration_s,
            "energy_kwh": m.energy_kwh,
            "max_power_w": m.max_power_w,
            "stop_reason": AP3000_STOP_REASONS.get(m.stop_reason, "unknown"),
            "stop_reason_code": m.stop_reason,
            "stop_reason_text": ap3000.Settlement.TEXTS["stop_reason"].get(m.stop_reason),
            "settlement": _detail(m),
        }
        if m.timestamp_unix is not ABSENT:
            values["device_ended_at"] = datetime.fromtimestamp(m.timestamp_unix, UTC)

        report = SettlementReport(
            protocol=self.protocol,
            device_id=owner,
            port=m.port + 1,
            start_mode=_START_MODES.get(m.start_mode, "device"),
            order_ref=m.order_id,
            business_no=None,
            duration_s=m.duration_s,
            energy_kwh=m.energy_kwh,
            device_ended_at=values.get("device_ended_at"),
            values=lambda order: values,
        )

        async def settle_then_ack() -> None:
            await self.ctx.settle_order(report, detail=_detail(m), while_connected=link)
            # committed: acknowledged now (the pile deletes it then)
            self._reply(link, ap3000.SettlementReply(m.phy_id, m.msg_id, result=0), device_id)

        self.ctx.run(settle_then_ack(), "settlement")

    def _card_swipe(self, link: DeviceLink, m: ap3000.CardSwipe, device_id: str | None) -> None:
        """Answer 0x02 from the card registry; an accepted swipe on a real port becomes
        an order whose 0x82 start the outbox sends after this reply (ap3000.md 8.5)."""
        ctx = self.ctx
        owner = device_id or m.phy_id
        port = None if m.port == 0xFF else m.port + 1

        def start_params(order_no: str, _port: int, rate_mode: int, balance: int) -> dict[str, Any]:
            return {
                "port": m.port,
                "rate_mode": rate_mode,
                "charge_limit": 0,
                "balance_cent": min(balance, 0xFFFFFFFF),
                "order_id": order_no,
            }

        async def decide_then_reply() -> None:
            result = await ctx.cards.swipe(
                protocol=self.protocol,
                device_id=owner,
                card_id=m.card_id,
                port=port,
                start_params=start_params,
                what="card swipe",
            )
            record_swipe(
                ctx, owner, result, {**_detail(m), "account_status": result.account_status}
            )
            reply = ap3000.CardSwipeReply(
                m.phy_id,
                m.msg_id,
                card_id=m.card_id,
                account_status=result.account_status,
                rate_mode=result.rate_mode,
                balance_or_expiry=min(result.balance_cent, 0xFFFFFFFF),
                port=m.port,
            )
            self._reply(link, reply, device_id)
            if result.order_no is not None:
                ctx.outbox.wake(owner)  # the 0x82 follows the 0x02 reply

        ctx.run(decide_then_reply(), "card-swipe")

    def _order_confirm(
        self, link: DeviceLink, m: ap3000.OrderConfirm, device_id: str | None
    ) -> None:
        self.ctx.writer.put_event(
            EventRow(
                device_id or m.phy_id,
                self.ctx.wall(),
                EventKind.REPORT.value,
                "OrderConfirm",
                _detail(m),
            )
        )
        self._reply(
            link,
            ap3000.OrderConfirmReply(m.phy_id, m.msg_id, port=m.port, result=0),
            device_id,
            after_commit=True,
        )

    def _host_heartbeat(
        self, link: DeviceLink, m: ap3000.HostHeartbeat, device_id: str | None
    ) -> None:
        gateway = link.gateway or m.phy_id
        self.ctx.writer.put_gateway(
            GatewayRow(
                gateway,
                protocol=self.protocol,
                iccid=m.iccid or None,
                imei=None if m.imei is ABSENT else m.imei,
                firmware=str(m.firmware_version),
            )
        )
        if device_id is not None:  # sockets with their own modem send 0x11 too
            self.ctx.writer.put_device(
                DeviceRow(
                    device_id,
                    protocol=self.protocol,
                    iccid=m.iccid or None,
                    signal_strength=m.signal_strength,
                )
            )
        self.ctx.writer.put_event(
            EventRow(
                device_id or m.phy_id,
                self.ctx.wall(),
                EventKind.REPORT.value,
                "HostHeartbeat",
                _detail(m),
            )
        )
