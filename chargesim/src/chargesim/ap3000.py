"""A simulated AP3000 pile: real DNY frames over TCP, built with chargeproto.

Behaviour follows docs/protocols/ap3000.md (sections 1, 3, 8, 9): ICCID preamble,
0x20 registration until answered, 0x22 time until answered, 0x21 heartbeats, ``link``
keepalives, 0x06 power heartbeats while charging, 0x03 settlements stored and resent
until acknowledged (same msg id), and replies to the server's commands that echo their
msg id. Intervals are in pile seconds and divided by the simulator's acceleration.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import enum
import hashlib
import time
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar, Final

from chargeproto import ABSENT, Message, ap3000
from chargesim.pile import Faults, LedgerEntry, SimulatedPile, StreamDecoder

#: id type code for a port count (ap3000.md section 4)
TYPE_CODE_FOR_PORTS: Final = {1: 0x03, 2: 0x04, 10: 0x05, 12: 0x07, 16: 0x06}
#: (device type of 0x20, firmware version) per id type code (ap3000.md 11.9)
_MODEL: Final = {
    0x03: (0x27, 312),  # new GM5 dual-mode, 3.xx
    0x04: (0x27, 312),
    0x05: (0x29, 210),  # new 10/16-port F460, 2.xx
    0x06: (0x29, 210),
    0x07: (0x30, 105),  # new 12-port F460, 1.xx
}
_U16: Final = 0xFFFF
MAX_STORED_SETTLEMENTS: Final = 64
#: the QR content piles ship with (ap3000.md 9.14)
DEFAULT_QR_DATA: Final = "http://ap3200.haokuaichong.cn/ap3200"

# stop reasons (ap3000.md 11.2)
STOP_FULL: Final = 0x01
STOP_MAX_DURATION: Final = 0x02
STOP_TIME_REACHED: Final = 0x03
STOP_ENERGY_REACHED: Final = 0x04
STOP_UNPLUGGED: Final = 0x05
STOP_BY_SERVER: Final = 0x07
# start modes (ap3000.md 11.4)
START_CARD: Final = 0
START_ONLINE: Final = 1
START_CODE: Final = 3
#: the card field of a settlement that no card started
NO_CARD: Final = "00000000"


class PortStatus(enum.IntEnum):
    """What a simulated port reports in 0x21 (ap3000.md 11.1)."""

    IDLE = 0x00
    CHARGING = 0x01
    FULL = 0x03


@dataclasses.dataclass(slots=True)
class Ap3000Intervals:
    """Protocol intervals in pile seconds (divided by the acceleration factor)."""

    #: 0x22 resent while unanswered
    time_retry_s: float = 180.0
    #: 0x22 again after an answer
    time_refresh_s: float = 12 * 3600.0
    #: 0x06 while a port charges
    power_heartbeat_s: float = 300.0
    #: first 0x03 after the power is cut
    settlement_delay_s: float = 2.0
    #: 0x03 resent while unacknowledged
    settlement_resend_s: float = 1800.0
    #: next stored 0x03 after one was acknowledged
    settlement_gap_s: float = 60.0
    #: ``link`` after this long without sending anything
    link_idle_s: float = 30.0
    #: reboot (0x87) until the pile reconnects
    boot_s: float = 5.0
    #: after the last firmware packet: flashing and rebooting until it reconnects
    upgrade_boot_s: float = 10.0
    #: an until-full charge reports full after this long
    full_after_s: float = 4 * 3600.0
    #: after a card swipe, a 0x82 start for its port within this long is a card start
    swipe_window_s: float = 120.0


@dataclasses.dataclass(slots=True)
class ChargeSession:
    """One running charge on one port."""

    order_id: str
    port: int
    started_at: float  # loop.time()
    power_w: float
    #: "time", "energy" or "full"
    mode: str
    #: pile seconds (time) or kWh (energy); unused for "full"
    target: float
    stop_when_full: bool
    max_duration_s: float
    peak_power_w: float = 0.0
    stop_reason: int | None = None
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: "server" (0x82, also after a card swipe) or "device" (:meth:`start_local`)
    started_by: str = "server"
    #: start mode reported in 0x06 and 0x03 (ap3000.md 11.4)
    start_mode: int = START_ONLINE
    #: the card of a card start (0x02 then 0x82), reported in 0x03
    card_id: str = NO_CARD
    #: wall-clock start (Unix seconds), for the ledger
    started_wall: float = dataclasses.field(default_factory=time.time)

    def energy_kwh(self, duration_s: float) -> float:
        return self.power_w * duration_s / 3_600_000.0

    def end(self, full_after_s: float) -> tuple[float, int]:
        """Pile seconds from the start at which the charge ends, and the stop reason."""
        candidates: list[tuple[float, int]] = []
        if self.mode == "time":
            candidates.append((self.target, STOP_TIME_REACHED))
        else:
            candidates.append((self.max_duration_s, STOP_MAX_DURATION))
            if self.mode == "energy":
                seconds = self.target * 3_600_000.0 / self.power_w
                candidates.append((seconds, STOP_ENERGY_REACHED))
        if self.stop_when_full or self.mode == "full":
            candidates.append((full_after_s, STOP_FULL))
        return min(candidates)

    def stop(self, reason: int) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.changed.set()


@dataclasses.dataclass(slots=True)
class SimPort:
    """One port: whether a charger is plugged in, its status and running charge."""

    index: int
    plugged: bool = True
    status: PortStatus = PortStatus.IDLE
    session: ChargeSession | None = None


@dataclasses.dataclass(slots=True)
class StoredSettlement:
    """A 0x03 kept until the server acknowledges it (``message.msg_id`` fixed)."""

    message: ap3000.Settlement
    next_send_at: float
    copies_sent: int = 0
    #: the session in the pile's ledger
    entry: LedgerEntry | None = None
    #: acknowledgements received (lost ones included)
    acks_seen: int = 0


@dataclasses.dataclass(slots=True)
class UpgradeFaults:
    """Firmware-upgrade fault injection; each packet fault fires once, then clears."""

    #: close the connection when packet k arrives (neither stored nor answered)
    drop_at_packet: int | None = None
    #: answer packet k with "checksum error" once (0xE0/0xE1/0xE2: result 2; the
    #: legacy and host commands: 1, "error, resend")
    checksum_error_at_packet: int | None = None
    #: after acknowledging packet k, ask for firmware (piles 0x05, 0xFA hosts an up 0xFA
    #: with packet 0, 0xF9 hosts 0x15) and leave other packets unanswered until packet 1
    #: comes: the server must start again from packet 1
    request_restart_after_packet: int | None = None
    #: reboot after the last packet but come back with the old version
    keep_version: bool = False


@dataclasses.dataclass(slots=True)
class FirmwareTransfer:
    """What a simulated device holds of an upgrade in progress (kept across reconnects,
    as a device keeps received packets in flash)."""

    command: int
    total: int
    expected: int = 1
    data: bytearray = dataclasses.field(default_factory=bytearray)


#: 0xE0/0xE1/0xE2 results (ap3000.md 11.13)
UPGRADE_OK: Final = 0
UPGRADE_RESEND: Final = 1
UPGRADE_CHECKSUM: Final = 2
UPGRADE_WRONG_TYPE: Final = 3
UPGRADE_NO_CHECK: Final = 4
_CHECKED: Final = frozenset({0xE0, 0xE1, 0xE2})


def take_packet(
    transfer: FirmwareTransfer | None,
    command: int,
    total: int,
    index: int,
    data: bytes,
    *,
    device_type: int,
) -> tuple[FirmwareTransfer | None, int, int, ap3000.CheckPacket | None]:
    """One firmware packet into a device's transfer (ap3000.md 9.22-10.6).

    Returns the transfer, the reply's result and packet index, and the check packet when
    the transfer is complete with one. Packets must come in order from 1; a repeat of an
    accepted packet is acknowledged again. The check packet (0xE0/0xE1/0xE2) must carry
    the device's type and the byte sum of what arrived (zero padding adds nothing).
    """
    if index == 1 or transfer is None or (transfer.command, transfer.total) != (command, total):
        if index != 1:
            return transfer, UPGRADE_RESEND, 1, None
        transfer = FirmwareTransfer(command, total)
    if index < transfer.expected:
        return transfer, UPGRADE_OK, index, None
    if index > transfer.expected:
        return transfer, UPGRADE_RESEND, transfer.expected, None
    check = None
    if command in _CHECKED and index == total:
        check = ap3000.parse_check_packet(data)
        if check is None:
            return transfer, UPGRADE_NO_CHECK, index, None
        if check.device_type != device_type:
            return transfer, UPGRADE_WRONG_TYPE, index, None
        if sum(transfer.data) & 0xFFFFFFFF != check.image_checksum:
            return transfer, UPGRADE_CHECKSUM, index, None
    else:
        transfer.data += data
    transfer.expected += 1
    return transfer, UPGRADE_OK, index, check


def ap3000_phy_id(number: int, ports: int = 2) -> str:
    """Canonical physical id for a device number and port count (``"04000001"``)."""
    type_code = type_code_for_ports(ports)
    return ap3000.PhysicalId.from_sticker(type_code, number).canonical


def type_code_for_ports(ports: int) -> int:
    """Id type code of a pile with ``ports`` ports (the next larger model)."""
    for count in sorted(TYPE_CODE_FOR_PORTS):
        if ports <= count:
            return TYPE_CODE_FOR_PORTS[count]
    raise ValueError(f"AP3000 piles have 1 to 16 ports, not {ports}")


def iccid_for(phy_id: str) -> str:
    """A deterministic 20-character ICCID (``89860...``) for a physical id."""
    pid = ap3000.PhysicalId.parse(phy_id)
    return "89860%02d%013d" % (pid.type_code, pid.number)


def _params(message: Message) -> dict[str, Any]:
    skip = {"phy_id", "msg_id", "trailing_hex"}
    return {
        f.name: getattr(message, f.name) for f in dataclasses.fields(message) if f.name not in skip
    }


class SimulatedAp3000Pile(SimulatedPile):
    """A simulated AP3000 pile (socket or multi-port pile) on one TCP connection.

    ``plugged`` says per port (or for all) whether a charger is plugged in; a start on
    an unplugged port is answered with result 1. State is public and may be changed at
    run time (``ports``, ``faults``, ``heartbeat_s``); see also ``plug``/``unplug``.
    """

    protocol: ClassVar[str] = "ap3000"

    def __init__(
        self,
        phy_id: str,
        *,
        ports: int = 2,
        iccid: str | None = None,
        firmware_version: int | None = None,
        device_type: int | None = None,
        heartbeat_s: float = 180.0,
        plugged: bool | Sequence[bool] = True,
        charge_power_w: float = 200.0,
        voltage_v: float = 220.0,
        temperature_c: int = 30,
        signal_strength: int = 0,
        send_link: bool = False,
        offline_after_missed_heartbeats: int | None = None,
        intervals: Ap3000Intervals | None = None,
        faults: Faults | None = None,
        record_limit: int = 10_000,
    ) -> None:
        pid = ap3000.PhysicalId.parse(phy_id)
        super().__init__(
            pid.canonical, heartbeat_s=heartbeat_s, faults=faults, record_limit=record_limit
        )
        if not 1 <= ports <= 16:
            raise ValueError(f"AP3000 piles have 1 to 16 ports, not {ports}")
        model_type, model_firmware = _MODEL.get(pid.type_code, (0x27, 312))
        self.phy_id = pid.canonical
        self.iccid = iccid if iccid is not None else iccid_for(self.phy_id)
        if len(self.iccid) != 20 or not self.iccid.startswith("89"):
            raise ValueError(f"an ICCID is 20 characters starting with 89, not {self.iccid!r}")
        self.firmware_version = firmware_version if firmware_version is not None else model_firmware
        self.device_type = device_type if device_type is not None else model_type
        flags = [plugged] * ports if isinstance(plugged, bool) else list(plugged)
        if len(flags) != ports:
            raise ValueError(f"plugged has {len(flags)} entries for {ports} ports")
        self.ports = [SimPort(i, plugged=flag) for i, flag in enumerate(flags)]
        self.charge_power_w = charge_power_w
        self.voltage_v = voltage_v
        self.temperature_c = temperature_c
        self.signal_strength = signal_strength
        self.send_link = send_link
        self.offline_after_missed_heartbeats = offline_after_missed_heartbeats
        self.intervals = intervals if intervals is not None else Ap3000Intervals()
        self.work_mode = 0
        self.clock_offset_s = 0.0
        self.locate_until = 0.0
        self.settlements: collections.deque[StoredSettlement] = collections.deque()
        self.running_params_1: dict[str, Any] = {
            "unplug_power_w": 0.3,
            "unplug_detect_time_s": 10,
            "float_percent": 20,
            "float_detect_time_s": 1800,
            "float_time_s": 3600,
            "heartbeat_interval_s": min(round(heartbeat_s), _U16),
        }
        self.running_params_2: dict[str, Any] = {
            "dynamic_overload_power_w": 80.0,
            "dynamic_overload_detect_time_s": 30,
            "dynamic_overload_start_time_s": 1800,
            "unplug_interference_power_w": 1.0,
            "unplug_interference_time_s": 300,
            "float_second_time_point_s": 10800,
            "float_second_detect_time_s": 300,
            "min_power_w": 30.0,
            "min_power_time_point_s": 1800,
            "second_max_power_time_point_s": 300,
            "ambient_alarm_temperature_c": 80,
            "port_alarm_temperature_c": 80,
            "unplug_detect_mode": 0,
            "qr_light": 1,
        }
        self.limits: dict[str, Any] = {
            "max_charge_duration_s": 36000,
            "overload_power_w": 2000.0,
            "overvoltage_v": 270.0,
            "undervoltage_v": 100.0,
        }
        self.card_params: dict[str, Any] = {
            "card_sector": 0,
            "user_card_key": "159185191880",
            "new_card_key": "FFFFFFFFFFFF",
        }
        #: 0x97 mute, 0x8F TC card mode and 0x8E QR code (no read-back in the protocol)
        self.mute_mode = 0
        self.tc_card_mode = 0
        self.qr_code: dict[str, Any] = {"main_screen_type": 0, "qr_data": DEFAULT_QR_DATA}
        #: parameter faults: a reboot (0x87, :meth:`reboot`) restores the factory
        #: parameters; fields named here are acknowledged by the set commands but not
        #: stored (``"work_mode"``, ``"mute_mode"`` ... for the single-value commands)
        self.factory_reset_on_reboot = False
        self.params_ignored: set[str] = set()
        self._factory = copy.deepcopy(self._parameter_state())
        #: firmware upgrades: the power board's version (0: none), faults, the transfer
        #: in progress, the version reported after an upgrade without a check packet
        #: (None: one more than before), and (command, new version) of each one done
        self.power_board_version = 0
        self.upgrade_faults = UpgradeFaults()
        self.transfer: FirmwareTransfer | None = None
        self.next_firmware_version: int | None = None
        self.upgrades: list[tuple[int, int]] = []
        #: asked for firmware: packets other than packet 1 go unanswered until it comes
        self._restart_asked = False
        #: 0x02 card swipes: port -> card of a swipe waiting for its 0x82 start, and the
        #: server's answers (``CardSwipeReply``) in order
        self._swipes: dict[int, tuple[str, float]] = {}
        self.swipe_replies: list[ap3000.CardSwipeReply] = []
        self._local_orders = 0
        self._msg_id = 0
        self._registration_id: int | None = None
        self._time_id: int | None = None
        self._registered = asyncio.Event()
        self._time_synced = asyncio.Event()
        self._heartbeats_unanswered = 0
        self._settlement_wakeup = asyncio.Event()

    # --- parameters ----------------------------------------------------------------------

    def _parameter_state(self) -> dict[str, Any]:
        return {
            "running_params_1": self.running_params_1,
            "running_params_2": self.running_params_2,
            "limits": self.limits,
            "card_params": self.card_params,
            "work_mode": self.work_mode,
            "mute_mode": self.mute_mode,
            "tc_card_mode": self.tc_card_mode,
            "qr_code": self.qr_code,
        }

    def reset_params(self) -> None:
        """Factory reset: every parameter back to the value it had at construction (the
        heartbeat interval included)."""
        for name, value in copy.deepcopy(self._factory).items():
            setattr(self, name, value)
        self.heartbeat_s = float(self.running_params_1["heartbeat_interval_s"])

    def reboot(self, reason: str = "reboot") -> None:
        """Power-cycle: the connection closes and the pile registers again after
        ``intervals.boot_s`` (pile seconds), with factory parameters when
        ``factory_reset_on_reboot`` is set. Charges and stored settlements survive."""
        if self.factory_reset_on_reboot:
            self.reset_params()
        self.end_connection(reason, reconnect_after_s=self.timing.real(self.intervals.boot_s))

    def _stored(self, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        """``new`` as stored: ignored fields (``params_ignored``) keep their old values."""
        return {**new, **{k: old[k] for k in self.params_ignored if k in old}}

    # --- identity and helpers ------------------------------------------------------------

    @property
    def registered(self) -> bool:
        """Whether the server answered this connection's 0x20."""
        return self._registered.is_set()

    def next_msg_id(self) -> int:
        """A new message id (1..65535, wrapping)."""
        self._msg_id = self._msg_id % _U16 + 1
        return self._msg_id

    def device_time(self) -> int:
        """The pile's clock as Unix seconds (corrected by the server's 0x22 answer)."""
        return int(time.time() + self.clock_offset_s)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _pile_seconds_since(self, start: float) -> float:
        return self.timing.pile_seconds(self._now() - start)

    async def send_message(self, message: ap3000.Ap3000Message) -> bool:
        """Encode and send one message; False if offline."""
        return await self.send_frame(ap3000.encode(message), message)

    def describe_frame(self, frame: bytes) -> Message | None:
        return ap3000.decode(frame, "up")

    # --- messages the pile builds --------------------------------------------------------

    def registration(self, msg_id: int) -> ap3000.Registration:
        if self.faults.short_payloads:
            return ap3000.Registration(
                self.phy_id,
                msg_id,
                firmware_version=self.firmware_version,
                port_count=len(self.ports),
                virtual_id=0,
                device_type=self.device_type,
            )
        return ap3000.Registration(
            self.phy_id,
            msg_id,
            firmware_version=self.firmware_version,
            port_count=len(self.ports),
            virtual_id=0,
            device_type=self.device_type,
            work_mode=self.work_mode,
            power_board_version=self.power_board_version,
        )

    def heartbeat(self, msg_id: int) -> ap3000.Heartbeat:
        return ap3000.Heartbeat(
            self.phy_id,
            msg_id,
            voltage_v=self.voltage_v,
            ports=tuple(ap3000.PortState(p.index, int(p.status)) for p in self.ports),
            signal_strength=self.signal_strength,
            temperature_c=self.temperature_c,
        )

    # --- protocol hooks ------------------------------------------------------------------

    def new_decoder(self) -> StreamDecoder:
        return ap3000.Ap3000StreamDecoder("down")

    def preamble(self) -> tuple[bytes, str]:
        return self.iccid.encode("ascii"), "iccid"

    def is_command(self, message: Message) -> bool:
        return not ap3000.is_server_reply(message)

    def command_key(self, message: Message) -> Hashable:
        if isinstance(message, ap3000.UnknownMessage):
            return (message.unknown_command, message.msg_id)
        assert isinstance(message, ap3000.Ap3000Message)
        return (message.command, message.msg_id)

    def frame_ids(self, message: Message) -> tuple[int | None, int | None]:
        if isinstance(message, ap3000.UnknownMessage):
            return message.unknown_command, message.msg_id
        return type(message).command, getattr(message, "msg_id", None)

    async def on_connected(self, tg: asyncio.TaskGroup) -> None:
        self._registered = asyncio.Event()
        self._time_synced = asyncio.Event()
        self._heartbeats_unanswered = 0
        self._registration_id = self.next_msg_id()
        self._time_id = self.next_msg_id()
        # the opening sequence, in order: 0x20, 0x22, 0x21
        await self.send_message(self.registration(self._registration_id))
        await self.send_message(ap3000.TimeRequest(self.phy_id, self._time_id))
        await self._send_heartbeat()
        tg.create_task(self._registration_loop(self._registration_id))
        tg.create_task(self._time_loop())
        tg.create_task(self._heartbeat_loop())
        tg.create_task(self._settlement_loop())
        if self.send_link:
            tg.create_task(self._link_loop())

    def on_reply(self, message: Message) -> None:
        if isinstance(message, ap3000.RegistrationReply):
            if message.msg_id == self._registration_id and message.result == 0:
                self._registered.set()
            else:
                self.stats.unmatched_replies += 1
        elif isinstance(message, ap3000.HeartbeatReply):
            self._heartbeats_unanswered = 0
        elif isinstance(message, ap3000.TimeReply):
            if message.msg_id == self._time_id:
                self.clock_offset_s = message.timestamp_unix - time.time()
                self._time_synced.set()
            else:
                self.stats.unmatched_replies += 1
        elif isinstance(message, ap3000.SettlementReply):
            self._acknowledge_settlement(message)
        elif isinstance(message, ap3000.CardSwipeReply):
            self.swipe_replies.append(message)
            if message.account_status != 0 and message.port in self._swipes:
                del self._swipes[message.port]  # refused: no start follows
        # other server replies (legacy) concern messages this pile never sends

    def on_disconnected(self) -> None:
        self._registered = asyncio.Event()

    # --- periodic tasks of a connection --------------------------------------------------

    async def _send_heartbeat(self) -> None:
        if self.faults.omit_heartbeat:
            return
        self._heartbeats_unanswered += 1
        await self.send_message(self.heartbeat(self.next_msg_id()))

    async def _registration_loop(self, msg_id: int) -> None:
        registered = self._registered
        while not registered.is_set():
            try:
                async with asyncio.timeout(self.timing.spread(self.heartbeat_s, self.rng)):
                    await registered.wait()
            except TimeoutError:
                await self.send_message(self.registration(msg_id))  # a resend keeps its id

    async def _time_loop(self) -> None:
        while True:
            synced = self._time_synced
            assert self._time_id is not None
            while not synced.is_set():
                try:
                    async with asyncio.timeout(
                        self.timing.spread(self.intervals.time_retry_s, self.rng)
                    ):
                        await synced.wait()
                except TimeoutError:
                    await self.send_message(ap3000.TimeRequest(self.phy_id, self._time_id))
            await asyncio.sleep(self.timing.spread(self.intervals.time_refresh_s, self.rng))
            self._time_synced = asyncio.Event()
            self._time_id = self.next_msg_id()
            await self.send_message(ap3000.TimeRequest(self.phy_id, self._time_id))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.spread(self.heartbeat_s, self.rng))
            limit = self.offline_after_missed_heartbeats
            if limit is not None and self._heartbeats_unanswered >= limit:
                self.end_connection(f"offline: {limit} heartbeats unanswered")
                return
            await self._send_heartbeat()

    async def _link_loop(self) -> None:
        idle_s = self.timing.real(self.intervals.link_idle_s)
        while True:
            wait = self.last_sent_at + idle_s - self._now()
            if wait <= 0:
                await self.send_unframed(b"link", "link")
            else:
                await asyncio.sleep(wait)

    async def _settlement_loop(self) -> None:
        while True:
            wakeup = self._settlement_wakeup
            stored = self.settlements[0] if self.settlements else None
            if stored is None:
                await wakeup.wait()
                continue
            wait = stored.next_send_at - self._now()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await wakeup.wait()
                continue
            stored.next_send_at = self._now() + self.timing.spread(
                self.intervals.settlement_resend_s, self.rng
            )
            stored.copies_sent += 1
            if await self.send_message(stored.message) and stored.entry is not None:
                stored.entry.sent()

    def _wake_settlements(self) -> None:
        self._settlement_wakeup.set()
        self._settlement_wakeup = asyncio.Event()

    def _acknowledge_settlement(self, reply: ap3000.SettlementReply) -> None:
        for stored in self.settlements:
            if stored.message.msg_id == reply.msg_id:
                break
        else:
            self.stats.unmatched_replies += 1
            return
        if reply.result != 0:
            return  # not accepted: keep resending
        stored.acks_seen += 1
        entry = stored.entry
        if self.chance(
            self.faults.lose_acks,
            "ack",
            stored.message.order_id,
            stored.message.msg_id,
            stored.acks_seen,
        ):
            self.stats.acks_lost += 1
            if entry is not None:
                entry.acks_lost += 1
            return  # the fault: as if the answer never arrived
        if entry is not None:
            entry.acknowledge()
        self.settlements.remove(stored)
        if self.settlements:
            head = self.settlements[0]
            gap = self._now() + self.timing.real(self.intervals.settlement_gap_s)
            head.next_send_at = max(head.next_send_at, gap)
        self._wake_settlements()

    # --- charging ------------------------------------------------------------------------

    def plug(self, port: int, plugged: bool = True) -> None:
        """Plug a charger into ``port`` (or unplug it with ``plugged=False``)."""
        self.ports[port].plugged = plugged
        if not plugged:
            session = self.ports[port].session
            if session is not None:
                session.stop(STOP_UNPLUGGED)

    def unplug(self, port: int) -> None:
        """Unplug the charger of ``port``; a running charge ends (stop reason 5)."""
        self.plug(port, False)

    def _start_charge(self, port: SimPort, command: ap3000.ChargeControl) -> None:
        limit = command.charge_limit
        max_duration = command.max_charge_duration_s
        if max_duration is ABSENT or not max_duration:
            max_duration = self.limits["max_charge_duration_s"]
        assert isinstance(max_duration, int)
        if limit == 0 or command.rate_mode in (1, 3):
            mode, target = "full", 0.0
        elif command.rate_mode == 2:
            mode, target = "energy", limit / 100.0
        else:
            mode, target = "time", float(limit)
        swipe = self._swipes.pop(port.index, None)
        window = self.timing.real(self.intervals.swipe_window_s)
        card = swipe[0] if swipe is not None and self._now() - swipe[1] <= window else None
        self._begin(
            port,
            command.order_id,
            mode,
            target,
            stop_when_full=command.force_full_stop == 1,
            max_duration_s=float(max_duration),
            started_by="server",
            start_mode=START_ONLINE if card is None else START_CARD,
            card_id=NO_CARD if card is None else card,
        )

    def _begin(
        self,
        port: SimPort,
        order_id: str,
        mode: str,
        target: float,
        *,
        stop_when_full: bool,
        max_duration_s: float,
        started_by: str,
        start_mode: int,
        card_id: str = NO_CARD,
    ) -> ChargeSession:
        power = self.charge_power_w * self.rng.uniform(0.9, 1.1)
        session = ChargeSession(
            order_id=order_id,
            port=port.index,
            started_at=self._now(),
            power_w=power,
            mode=mode,
            target=target,
            stop_when_full=stop_when_full,
            max_duration_s=max_duration_s,
            peak_power_w=power,
            started_by=started_by,
            start_mode=start_mode,
            card_id=card_id,
        )
        port.session = session
        port.status = PortStatus.CHARGING
        self.spawn(self._charge(port, session))
        return session

    def new_order_id(self) -> str:
        """An order number made up by the pile (32 hex digits), fixed by the seed."""
        self._local_orders += 1
        key = f"{self.seed}:{self.phy_id}:order:{self._local_orders}".encode()
        return hashlib.blake2b(key, digest_size=16).hexdigest().upper()

    def start_local(
        self,
        port: int,
        *,
        duration_s: float | None = None,
        energy_kwh: float | None = None,
        start_mode: int = START_CODE,
    ) -> ChargeSession | None:
        """Start charging ``port`` (0-based) at the pile, without the server: a coin,
        button or offline start. The pile makes up the order number; 0x06 power
        heartbeats and the 0x03 settlement follow as for any charge. By time
        (``duration_s`` pile seconds), by energy, or until full (neither). Returns None
        when the port is busy, unplugged or does not exist."""
        if not 0 <= port < len(self.ports):
            return None
        sim_port = self.ports[port]
        if sim_port.session is not None or not sim_port.plugged:
            return None
        if duration_s is not None:
            mode, target = "time", float(duration_s)
        elif energy_kwh is not None:
            mode, target = "energy", float(energy_kwh)
        else:
            mode, target = "full", 0.0
        return self._begin(
            sim_port,
            self.new_order_id(),
            mode,
            target,
            stop_when_full=False,
            max_duration_s=float(self.limits["max_charge_duration_s"]),
            started_by="device",
            start_mode=start_mode,
        )

    async def swipe_card(self, port: int, card_id: str, *, card_type: int = 0) -> bool:
        """A card is swiped for ``port`` (0-based; 0xFF asks for the balance only): the
        pile sends 0x02. If the server accepts it, its 0x82 start for that port (within
        ``intervals.swipe_window_s``) becomes a card start (start mode 0 and the card in
        0x06/0x03). False if offline."""
        card_id = card_id.upper()
        if port != 0xFF:
            self._swipes[port] = (card_id, self._now())
        message = ap3000.CardSwipe(
            self.phy_id,
            self.next_msg_id(),
            card_id=card_id,
            card_type=card_type,
            port=port,
            balance_cent=0,
            timestamp_unix=self.device_time(),
        )
        sent = await self.send_message(message)
        if not sent:
            self._swipes.pop(port, None)
        return sent

    def device_ids(self) -> list[str]:
        return [self.phy_id]

    def charging(self) -> set[tuple[str, int]]:
        return {(self.phy_id, p.index + 1) for p in self.ports if p.session is not None}

    async def _charge(self, port: SimPort, session: ChargeSession) -> None:
        interval = self.intervals.power_heartbeat_s
        next_report = self._now() + self.timing.spread(interval, self.rng)
        while session.stop_reason is None:
            end_s, reason = session.end(self.intervals.full_after_s)
            end_at = session.started_at + self.timing.real(end_s)
            now = self._now()
            if now >= end_at:
                session.stop(reason)
                break
            if now >= next_report:
                await self._power_heartbeat(session)
                next_report = now + self.timing.spread(interval, self.rng)
                continue
            session.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(end_at, next_report) - now):
                    await session.changed.wait()
        self._finish_charge(port, session)

    async def _power_heartbeat(self, session: ChargeSession) -> None:
        duration = self._pile_seconds_since(session.started_at)
        power = session.power_w * self.rng.uniform(0.97, 1.03)
        session.peak_power_w = max(session.peak_power_w, power)
        await self.send_message(
            ap3000.PowerHeartbeat(
                self.phy_id,
                self.next_msg_id(),
                port=session.port,
                status=1,
                duration_s=min(round(duration), _U16),
                energy_kwh=min(round(session.energy_kwh(duration), 2), 655.35),
                start_mode=session.start_mode,
                power_w=round(power, 1),
                max_power_w=round(max(power, session.power_w), 1),
                min_power_w=round(min(power, session.power_w), 1),
                avg_power_w=round(session.power_w, 1),
                order_id=session.order_id,
                period_energy_raw=0,
                peak_power_w=round(session.peak_power_w, 1),
                voltage_v=self.voltage_v,
                current_a=round(power / self.voltage_v, 3),
                temperature_c=self.temperature_c,
                port_temperature_c=self.temperature_c + 2,
                timestamp_unix=self.device_time(),
            )
        )

    def _finish_charge(self, port: SimPort, session: ChargeSession) -> None:
        reason = session.stop_reason if session.stop_reason is not None else STOP_BY_SERVER
        # a charge never runs past its end: a late wake-up of this loop (a busy machine,
        # at high acceleration) is not time the pile charged
        end_s, _ = session.end(self.intervals.full_after_s)
        duration = min(self._pile_seconds_since(session.started_at), end_s)
        if port.session is session:
            port.session = None
            port.status = PortStatus.FULL if reason == STOP_FULL else PortStatus.IDLE
        settlement = ap3000.Settlement(
            self.phy_id,
            self.next_msg_id(),
            duration_s=min(round(duration), _U16),
            max_power_w=round(session.peak_power_w, 1),
            energy_kwh=min(round(session.energy_kwh(duration), 2), 655.35),
            port=session.port,
            start_mode=session.start_mode,
            card_id=session.card_id,
            stop_reason=reason,
            order_id=session.order_id,
            second_max_power_w=round(session.peak_power_w, 1),
            timestamp_unix=self.device_time(),
        )
        entry = LedgerEntry(
            protocol=self.protocol,
            device_id=self.phy_id,
            port=session.port + 1,
            started_by=session.started_by,
            energy_kwh=settlement.energy_kwh,
            duration_s=settlement.duration_s,
            started_at=session.started_wall,
            ended_at=time.time(),
            stop_reason=reason,
            order_id=session.order_id,
            card_id=None if session.card_id == NO_CARD else session.card_id,
            report=settlement,
        )
        self.ledger.append(entry)
        send_at = self._now() + self.timing.real(self.intervals.settlement_delay_s)
        if self.settlements:
            send_at = max(send_at, self.settlements[-1].next_send_at)
        self.settlements.append(StoredSettlement(settlement, send_at, entry=entry))
        while len(self.settlements) > MAX_STORED_SETTLEMENTS:
            lost = self.settlements.popleft()  # the device's storage is finite
            if lost.entry is not None:
                lost.entry.dropped = True
        self._wake_settlements()

    # --- commands ------------------------------------------------------------------------

    async def on_command(self, message: Message) -> list[bytes]:
        if not isinstance(message, ap3000.Ap3000Message) or isinstance(
            message, ap3000.UnknownMessage
        ):
            self.stats.commands_ignored += 1
            return []
        reply = await self._answer(message)
        return [] if reply is None else [ap3000.encode(reply)]

    async def _answer(self, m: ap3000.Ap3000Message) -> ap3000.Ap3000Message | None:
        phy, mid = self.phy_id, m.msg_id
        if isinstance(m, ap3000.ChargeControl):
            return self._charge_control(m)
        if isinstance(m, ap3000.ModifyChargeLimit):
            return ap3000.ModifyChargeLimitReply(phy, mid, result=self._modify_limit(m))
        if isinstance(m, ap3000.QueryStatus):
            await self.send_message(self.registration(self.next_msg_id()))
            await self._send_heartbeat()
            return None
        if isinstance(m, ap3000.Reboot):
            await self.send_message(ap3000.RebootReply(phy, mid, result=0))
            self.reboot("reboot (0x87)")
            return None
        if isinstance(m, ap3000.Locate):
            self.locate_until = self._now() + m.locate_duration_s
            return ap3000.LocateReply(phy, mid, result=0)
        if isinstance(m, ap3000.SetRunningParams1):
            if m.heartbeat_interval_s == 0:
                return ap3000.SetRunningParams1Reply(phy, mid, result=1)
            self.running_params_1 = self._stored(self.running_params_1, _params(m))
            self.heartbeat_s = float(self.running_params_1["heartbeat_interval_s"])
            return ap3000.SetRunningParams1Reply(phy, mid, result=0)
        if isinstance(m, ap3000.SetRunningParams2):
            self.running_params_2 = self._stored(self.running_params_2, _params(m))
            return ap3000.SetRunningParams2Reply(phy, mid, result=0)
        if isinstance(m, ap3000.SetLimits):
            if m.max_charge_duration_s == 0:
                return ap3000.SetLimitsReply(phy, mid, result=1)
            self.limits = self._stored(self.limits, {**self.limits, **_params(m)})
            return ap3000.SetLimitsReply(phy, mid, result=0)
        if isinstance(m, ap3000.SetCardParams):
            self.card_params = self._stored(self.card_params, _params(m))
            return ap3000.SetCardParamsReply(phy, mid, result=0)
        if isinstance(m, ap3000.SetRunningParams3):
            if m.mute_mode not in (0, 1):
                return ap3000.SetRunningParams3Reply(phy, mid, result=1)
            if "mute_mode" not in self.params_ignored:
                self.mute_mode = m.mute_mode
            return ap3000.SetRunningParams3Reply(phy, mid, result=0)
        if isinstance(m, ap3000.SetTcCardMode):
            if "tc_card_mode" not in self.params_ignored:
                self.tc_card_mode = m.tc_card_mode
            return ap3000.SetTcCardModeReply(phy, mid, result=0)
        if isinstance(m, ap3000.SetQrCode):
            stored = {"main_screen_type": m.main_screen_type, "qr_data": m.qr_data}
            self.qr_code = self._stored(self.qr_code, stored)
            return ap3000.SetQrCodeReply(phy, mid, result=0)
        if isinstance(m, ap3000.ReadRunningParams1):
            return ap3000.RunningParams1(phy, mid, **self.running_params_1)
        if isinstance(m, ap3000.ReadRunningParams2):
            return ap3000.RunningParams2(phy, mid, **self.running_params_2)
        if isinstance(m, ap3000.ReadLimits):
            return ap3000.Limits(phy, mid, **self.limits)
        if isinstance(m, ap3000.ReadCardParams):
            return ap3000.CardParams(phy, mid, **self.card_params)
        if isinstance(m, ap3000.SetWorkMode):
            if m.work_mode not in (0, 1):  # "1 switching not supported"
                return ap3000.SetWorkModeReply(phy, mid, result=1)
            changed = m.work_mode != self.work_mode and "work_mode" not in self.params_ignored
            if changed:
                self.work_mode = m.work_mode
                # 0x20 is sent again whenever a value it carries changes (ap3000.md 8.2)
                self.spawn(self._send_later(lambda: self.registration(self.next_msg_id())))
            return ap3000.SetWorkModeReply(phy, mid, result=0)
        if isinstance(m, ap3000.ClearStorage):
            for held in self.settlements:
                if held.entry is not None:
                    held.entry.dropped = True
            self.settlements.clear()
            self._wake_settlements()
            return ap3000.ClearStorageReply(phy, mid, result=0)
        if isinstance(
            m,
            ap3000.SubDeviceFirmwarePacket
            | ap3000.PowerBoardFirmwarePacket
            | ap3000.LegacyFirmwarePacket,
        ):
            return self._firmware_packet(m)
        return self._plausible_reply(m)

    # --- firmware upgrades ---------------------------------------------------------------

    def _firmware_packet(self, m: Any) -> ap3000.Ap3000Message | None:
        """A 0xE0/0xE1/0xF8 packet for this pile."""
        faults = self.upgrade_faults
        index: int = m.packet_index
        reply: Any = ap3000.replies[type(m)]
        fired, fault_reply = self._packet_fault(m, reply, index)
        if fired:
            return fault_reply
        if self._restart_asked and index != 1:
            return None
        self._restart_asked = False
        self.transfer, result, acked, check = take_packet(
            self.transfer,
            m.command,
            m.total_packets,
            index,
            bytes.fromhex(m.firmware),
            device_type=self.device_type,
        )
        if result == UPGRADE_OK and faults.request_restart_after_packet == index:
            faults.request_restart_after_packet = None
            self.transfer = None
            self._restart_asked = True
            self.spawn(self._send_later(self._upgrade_request))
        elif result == UPGRADE_OK and index == m.total_packets:
            self.transfer = None
            version = check.firmware_version if check is not None else None
            self.spawn(self._install(m.command, version))
        answer: ap3000.Ap3000Message = reply(
            self.phy_id, m.msg_id, result=result, packet_index=acked
        )
        return answer

    def _packet_fault(
        self, m: Any, reply: Any, index: int
    ) -> tuple[bool, ap3000.Ap3000Message | None]:
        """The drop and checksum-error faults for packet ``index``: whether one fired,
        and its reply (none when the connection drops)."""
        faults = self.upgrade_faults
        if faults.drop_at_packet == index:
            faults.drop_at_packet = None
            self.end_connection(f"dropped at firmware packet {index} (fault)")
            return True, None
        if faults.checksum_error_at_packet == index:
            faults.checksum_error_at_packet = None
            code = UPGRADE_CHECKSUM if m.command in _CHECKED else UPGRADE_RESEND
            return True, reply(m.phy_id, m.msg_id, result=code, packet_index=index)
        return False, None

    def _upgrade_request(self) -> ap3000.Ap3000Message:
        return ap3000.UpgradeRequest(
            self.phy_id,
            self.next_msg_id(),
            device_type=self.device_type,
            firmware_version=self.firmware_version,
            package_type=0,
        )

    async def _send_later(self, build: Any) -> None:
        await asyncio.sleep(0)  # right after the reply that is being sent now
        await self.send_message(build())

    def new_version(self, current: int, check_version: int | None) -> int:
        """The version an upgrade installs (the fault keeps the old one)."""
        if self.upgrade_faults.keep_version:
            return current
        if check_version is not None:
            return check_version
        if self.next_firmware_version is not None:
            return self.next_firmware_version
        return current + 1

    async def _install(self, command: int, check_version: int | None) -> None:
        """Flash the image and reboot: the pile comes back with the new version."""
        await asyncio.sleep(0.05)  # the last packet's answer goes out first
        if command == 0xE1:
            self.power_board_version = self.new_version(self.power_board_version, check_version)
            installed = self.power_board_version
        else:
            self.firmware_version = self.new_version(self.firmware_version, check_version)
            installed = self.firmware_version
        self.upgrades.append((command, installed))
        self.end_connection(
            "rebooting after a firmware upgrade",
            reconnect_after_s=self.timing.real(self.intervals.upgrade_boot_s),
        )

    def _plausible_reply(self, m: ap3000.Ap3000Message) -> ap3000.Ap3000Message | None:
        """Result 0 (and echoed fields) for any other command the library knows."""
        phy, mid = self.phy_id, m.msg_id
        if isinstance(m, ap3000.ReadEeprom):
            return ap3000.ReadEepromReply(phy, mid, result=0, data="00" * m.data_length)
        if isinstance(m, ap3000.CabinetStop):
            return ap3000.CabinetStopReply(phy, mid, result=0, order_id=m.order_id)
        if isinstance(m, ap3000.ReservedFD):
            return ap3000.ReservedFDReply(phy, mid, function=m.function, result=0)
        packet_index = getattr(m, "packet_index", 0)
        reply_cls = ap3000.reply_for(m)
        if reply_cls is None:
            return None
        if issubclass(reply_cls, ap3000.ResultReply):
            return reply_cls(phy, mid, result=0)
        if reply_cls in (
            ap3000.SubDeviceFirmwareReply,
            ap3000.PowerBoardFirmwareReply,
            ap3000.HostSetFirmwareReply,
            ap3000.LegacyFirmwareReply,
            ap3000.HostFirmwareReply,
            ap3000.HostLegacyFirmwareReply,
        ):
            index = packet_index if isinstance(packet_index, int) else 0
            return reply_cls(phy, mid, result=0, packet_index=index)
        return None

    def _charge_control(self, m: ap3000.ChargeControl) -> ap3000.ChargeControlReply:
        phy, mid = self.phy_id, m.msg_id

        def reply(result: int, port: int, waiting: int = 0) -> ap3000.ChargeControlReply:
            return ap3000.ChargeControlReply(
                phy, mid, result=result, order_id=m.order_id, port=port, waiting_ports=waiting
            )

        if self.faults.refuse_with is not None:
            return reply(self.faults.refuse_with, m.port)
        if m.charge_command == 1:
            index = m.port
            if index == 0xFF:
                free = [p for p in self.ports if p.plugged and p.session is None]
                if not free:
                    return reply(1, 0xFF)
                if len(free) > 1:
                    return reply(5, 0xFF, sum(1 << p.index for p in free))
                index = free[0].index
            if index >= len(self.ports):
                return reply(4, index)
            port = self.ports[index]
            if port.session is not None:
                return reply(2, index)
            if not port.plugged:
                return reply(1, index)
            self._start_charge(port, m)
            return reply(0, index)
        if m.port >= len(self.ports):
            return reply(4, m.port)
        session = self.ports[m.port].session
        if session is None:
            return reply(2, m.port)
        if session.order_id != m.order_id:
            return reply(2, m.port)  # a wrong order number stops nothing
        session.stop(STOP_BY_SERVER)
        return reply(0, m.port)

    def _modify_limit(self, m: ap3000.ModifyChargeLimit) -> int:
        if m.port >= len(self.ports) or m.rate_mode not in (0, 1, 2):
            return 3
        session = self.ports[m.port].session
        if session is None:
            return 1
        duration = self._pile_seconds_since(session.started_at)
        if m.rate_mode == 2:
            target = m.charge_limit / 100.0
            if target < session.energy_kwh(duration):
                session.stop(STOP_ENERGY_REACHED)
                return 2
            session.mode, session.target, session.stop_when_full = "energy", target, True
        else:
            if m.charge_limit < duration:
                session.stop(STOP_TIME_REACHED)
                return 2
            session.mode, session.target = "time", float(m.charge_limit)
            session.stop_when_full = m.rate_mode == 1
        session.changed.set()
        return 0


class SimulatedAp3000Host(SimulatedAp3000Pile):
    """An AP3000 host (main unit, id type 0x09) with one pile behind it, on one connection.

    The pile part (``phy_id``) behaves as :class:`SimulatedAp3000Pile`; the host speaks for
    itself with ``host_id``: a 0x11 heartbeat on every connection and every
    ``host_heartbeat_s``, and the host upgrades (ap3000.md 10.4-10.6, 9.22): 0xFA (trigger,
    then 200-byte packets), 0xF9 (256-byte packets, 0x15 to ask for them again) and 0xE2
    (packets for the piles behind it, with a check packet; afterwards the pile runs the new
    version and the host reports it in 0x35). After a 0xFA/0xF9 upgrade the host reboots
    and comes back with the new version in its 0x11. ``upgrade_faults`` apply to the host's
    transfers too.
    """

    def __init__(
        self,
        host_id: str,
        phy_id: str,
        *,
        host_type: int = 0x03,
        host_firmware_version: int = 501,
        host_heartbeat_s: float = 1800.0,
        **options: Any,
    ) -> None:
        super().__init__(phy_id, **options)
        pid = ap3000.PhysicalId.parse(host_id)
        if pid.type_code not in (0x09, 0x0A):
            raise ValueError(f"a host id has type code 0x09 or 0x0A, not {host_id}")
        self.host_id = pid.canonical
        self.host_type = host_type
        self.host_firmware_version = host_firmware_version
        self.host_heartbeat_s = host_heartbeat_s
        self.host_transfer: FirmwareTransfer | None = None
        #: the host's version after a 0xFA/0xF9 upgrade (None: one more than before)
        self.next_host_firmware_version: int | None = None

    def host_heartbeat(self) -> ap3000.HostHeartbeat:
        return ap3000.HostHeartbeat(
            self.host_id,
            self.next_msg_id(),
            firmware_version=self.host_firmware_version,
            rtc_type=0,
            timestamp_unix=0,
            signal_strength=self.signal_strength or 25,
            modem_type=6,
            iccid=self.iccid,
            host_type=self.host_type,
            frequency_mhz=0,
        )

    async def on_connected(self, tg: asyncio.TaskGroup) -> None:
        await self.send_message(self.host_heartbeat())
        await super().on_connected(tg)
        tg.create_task(self._host_heartbeat_loop())

    async def _host_heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.spread(self.host_heartbeat_s, self.rng))
            await self.send_message(self.host_heartbeat())

    async def _answer(self, m: ap3000.Ap3000Message) -> ap3000.Ap3000Message | None:
        if m.phy_id != self.host_id:
            return await super()._answer(m)
        if isinstance(m, ap3000.HostFirmwareUpgrade) and m.firmware is ABSENT:
            self.host_transfer = None  # upgrade mode: packet 1 comes next
            return ap3000.HostFirmwareReply(self.host_id, m.msg_id, result=0, packet_index=0)
        if isinstance(
            m,
            ap3000.HostFirmwareUpgrade
            | ap3000.HostLegacyFirmwarePacket
            | ap3000.HostSetFirmwarePacket,
        ):
            return self._host_packet(m)
        reply_cls = ap3000.reply_for(m)
        if reply_cls is not None and issubclass(reply_cls, ap3000.ResultReply):
            return reply_cls(self.host_id, m.msg_id, result=0)
        return None

    def _host_packet(self, m: Any) -> ap3000.Ap3000Message | None:
        reply: Any = ap3000.replies[type(m)]
        index: int = m.packet_index
        fired, fault_reply = self._packet_fault(m, reply, index)
        if fired:
            return fault_reply
        if self._restart_asked and index != 1:
            return None
        self._restart_asked = False
        self.host_transfer, result, acked, check = take_packet(
            self.host_transfer,
            m.command,
            m.total_packets,
            index,
            bytes.fromhex(m.firmware),
            device_type=self.device_type,  # 0xE2 images are for the pile behind the host
        )
        faults = self.upgrade_faults
        if result == UPGRADE_OK and faults.request_restart_after_packet == index:
            faults.request_restart_after_packet = None
            self.host_transfer = None
            self._restart_asked = True
            self.spawn(self._send_later(self._host_request))
        elif result == UPGRADE_OK and index == m.total_packets:
            self.host_transfer = None
            version = None if check is None else check.firmware_version
            self.spawn(self._install_host(m.command, version))
        answer: ap3000.Ap3000Message = reply(
            self.host_id, m.msg_id, result=result, packet_index=acked
        )
        return answer

    def _host_request(self) -> ap3000.Ap3000Message:
        """The host asks for firmware: an up 0xFA with packet 0 (0xF9 hosts: 0x15)."""
        if self.host_type == 0x01:
            return ap3000.HostFirmwareRequest(self.host_id, self.next_msg_id())
        return ap3000.HostFirmwareReply(self.host_id, self.next_msg_id(), result=0, packet_index=0)

    async def _install_host(self, command: int, check_version: int | None) -> None:
        await asyncio.sleep(0.05)  # the last packet's answer goes out first
        if command == 0xE2:  # the pile behind the host takes the image; the host stays up
            self.firmware_version = self.new_version(self.firmware_version, check_version)
            self.upgrades.append((command, self.firmware_version))
            await self.send_message(self.registration(self.next_msg_id()))
            entry = ap3000.SubDeviceVersion(
                device_type=self.device_type,
                reserved=0,
                min_firmware_version=self.firmware_version,
                phy_id=self.phy_id,
            )
            await self.send_message(
                ap3000.SubDeviceVersions(self.host_id, self.next_msg_id(), entries=(entry,))
            )
            return
        current = self.host_firmware_version
        if self.upgrade_faults.keep_version:
            installed = current
        elif self.next_host_firmware_version is not None:
            installed = self.next_host_firmware_version
        else:
            installed = current + 1
        self.host_firmware_version = installed
        self.upgrades.append((command, installed))
        self.end_connection(
            "host rebooting after a firmware upgrade",
            reconnect_after_s=self.timing.real(self.intervals.upgrade_boot_s),
        )


def make_ap3000_piles(
    count: int,
    *,
    ports: int = 2,
    id_start: int = 1,
    heartbeat_s: float = 180.0,
    **options: Any,
) -> list[SimulatedAp3000Pile]:
    """``count`` piles with sequential device numbers from ``id_start``.

    The id type code follows the port count (0x04 dual-port, 0x05 10-port, 0x06
    16-port ...); ``options`` go to every :class:`SimulatedAp3000Pile`.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    if id_start < 0 or id_start + count - 1 > 0xFFFFFF:
        raise ValueError("device numbers are 24 bits")
    return [
        SimulatedAp3000Pile(
            ap3000_phy_id(id_start + i, ports), ports=ports, heartbeat_s=heartbeat_s, **options
        )
        for i in range(count)
    ]
