"""A simulated BKV gateway: real ``fc fe`` frames over TCP, built with chargeproto.

Behaviour follows docs/protocols/bkv.md, including the field notes of section 15 on
what production gateways do: no ICCID preamble (the ICCID travels in the 0x0000
heartbeat), heartbeat every minute, then the undocumented 0x1000/0x1013 container after
every (re)connection, a 0x1000/0x1017 status cluster per socket every 5 min and on any
change, and end reports (0x0015/0x02, 0x0015/0x18, 0x1000/0x1004) resent every 10 s
until acknowledged; after three unanswered resends the gateway closes the connection
and sends the same report again after reconnecting. Only the acknowledgement forms real
gateways honour stop the resends: 0x0015/0x0C (socket + result 1) for 0x02 and 0x18,
0x1000/0x1004 (result 1, socket, port) for 0x1004. Intervals are in gateway seconds and
divided by the simulator's acceleration.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar, Final, TypeVar

from chargeproto import ABSENT, Direction, EncodeError, Message, bkv
from chargesim.pile import Faults, LedgerEntry, SimulatedPile, StreamDecoder

log = logging.getLogger(__name__)

_B = TypeVar("_B", bound=bkv.BkvMessage)

_U16: Final = 0xFFFF
MAX_PENDING_END_REPORTS: Final = 64
#: real gateways answer a change (a start, a query) with a status cluster ~10 ms later
CHANGE_REPORT_DELAY_S: Final = 0.01
#: 0x0015/0x07 by-time limit (minutes, bkv.md 7.2)
MAX_ORDER_MINUTES: Final = 900
#: Beijing time, the devices' local time (bkv.md 10.2)
DEVICE_TZ: Final = dt.timezone(dt.timedelta(hours=8))

STATUS_IDLE: Final = 0x80  # online
STATUS_CHARGING: Final = 0x90  # online, charging

#: the socket parameters of 0x1012 (values of the guide's example, bkv.md 9.7)
DEFAULT_PARAMS: Final[Mapping[str, Any]] = {
    "full_charge_power_w": 10.0,
    "trickle_threshold_pct": 10,
    "full_charge_delay_s": 7200,
    "no_load_power_w": 0.8,
    "no_load_delay_s": 120,
    "max_charge_duration_min": 600,
    "high_temperature_c": 85,
    "power_limit_w": 700.0,
    "overcurrent_limit_a": 5.0,
    "key_base_amount_cent": 0,
    "anti_pulse_time_raw": 45,
}
#: tags 0x98-0x9B of the 0x1012 reply: listed in the guide without a meaning
_RAW_PARAM_ITEMS: Final = (
    bkv.TlvItem(0x98, "01"),
    bkv.TlvItem(0x99, "00"),
    bkv.TlvItem(0x9A, "00"),
    bkv.TlvItem(0x9B, "00"),
)

# stop causes, and what the simulator reports for them
CAUSE_LIMIT: Final = "limit"  # the ordered time, energy or amount is used up
CAUSE_MAX_DURATION: Final = "max_duration"  # parameter 0x59
CAUSE_STOPPED: Final = "stopped"  # switched off by the server
CAUSE_UNPLUGGED: Final = "unplugged"  # no load

#: cause -> (jack status byte of the end report, ``end_reason`` of 0x18/0x1004).
#: The vendor publishes no reason table (bkv.md 11.4): these are the simulator's own
#: choices. 0xB0 is what real gateways report after a normal time-limited end (bkv.md 15),
#: 0x98 the guide's "ended for lack of load"; 2 and 8 are the reasons seen in the guide.
DEFAULT_END_CODES: Final[Mapping[str, tuple[int, int]]] = {
    CAUSE_LIMIT: (0xB0, 2),
    CAUSE_MAX_DURATION: (0xB0, 4),
    CAUSE_STOPPED: (0x90, 8),
    CAUSE_UNPLUGGED: (0x98, 3),
}


@dataclasses.dataclass(slots=True)
class BkvIntervals:
    """Protocol intervals in gateway seconds (divided by the acceleration factor)."""

    #: each socket's 0x1017 status cluster (and at once on any change)
    status_s: float = 300.0
    #: an unacknowledged end report is resent this often
    end_report_resend_s: float = 10.0
    #: after this many unanswered resends (one interval later) the gateway closes the
    #: connection and sends the report again after reconnecting; None: resend forever
    end_report_resends: int | None = 3
    #: 0x0007 OTA: downloading the file from the FTP server, then rebooting
    ota_download_s: float = 30.0
    ota_boot_s: float = 10.0
    #: :meth:`SimulatedBkvGateway.reboot` until the gateway reconnects
    boot_s: float = 10.0


@dataclasses.dataclass(slots=True)
class BkvSession:
    """One running charge on one jack.

    ``mode``: ``time`` / ``energy`` (0x07), ``tiers`` (0x17) or ``fee`` (0x1007).
    """

    socket: int
    port: int
    business_no: int
    mode: str
    started_at: float  # loop.time()
    power_w: float
    max_duration_min: int
    #: limit of a time order; cap of an energy order (0: none)
    duration_min: int = 0
    #: limit of an energy order
    energy_kwh: float = 0.0
    #: paid amount (tiers, fee)
    amount_cent: int = 0
    tiers: tuple[bkv.PowerTier, ...] = ()
    fee_tiers: tuple[bkv.FeeTier, ...] = ()
    service_fee_mode: int = 1
    #: the power tier (``tiers``) or fee tier (``fee``) the session is billed in
    tier_index: int = 0
    peak_power_w: float = 0.0
    stop_cause: str | None = None
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: "server" (a start command) or "device" (:meth:`SimulatedBkvGateway.start_local`)
    started_by: str = "server"
    #: wall-clock start (Unix seconds), for the ledger
    started_wall: float = dataclasses.field(default_factory=time.time)

    def energy_at(self, pile_s: float) -> float:
        """kWh after ``pile_s`` gateway seconds."""
        return self.power_w * pile_s / 3_600_000.0

    def fees_at(self, pile_s: float) -> tuple[float, float]:
        """(electricity, service) fee in fen after ``pile_s`` (fee mode)."""
        if not self.fee_tiers:
            return 0.0, 0.0
        tier = self.fee_tiers[self.tier_index]
        energy = self.energy_at(pile_s)
        electricity = energy * tier.electricity_price_cent_per_kwh
        if self.service_fee_mode == 1:  # by energy
            service = energy * tier.service_price_cent_per_kwh
        else:  # by time: the simulator reads the price as fen per hour
            service = pile_s / 3600.0 * tier.service_price_cent_per_kwh
        return electricity, service

    def end(self) -> tuple[float, str]:
        """Gateway seconds from the start at which the charge ends, and the cause."""
        candidates: list[tuple[float, str]] = []
        if self.max_duration_min > 0:
            candidates.append((self.max_duration_min * 60.0, CAUSE_MAX_DURATION))
        if self.mode == "time" or (self.mode == "energy" and self.duration_min > 0):
            candidates.append((self.duration_min * 60.0, CAUSE_LIMIT))
        if self.mode == "energy" and self.energy_kwh > 0:
            candidates.append((self.energy_kwh * 3_600_000.0 / self.power_w, CAUSE_LIMIT))
        if self.mode == "tiers" and self.tiers:
            tier = self.tiers[self.tier_index]
            if tier.price_cent > 0:
                minutes = self.amount_cent * tier.duration_min / tier.price_cent
                candidates.append((minutes * 60.0, CAUSE_LIMIT))
        if self.mode == "fee":
            per_s = sum(self.fees_at(3600.0)) / 3600.0
            if per_s > 0:
                candidates.append((self.amount_cent / per_s, CAUSE_LIMIT))
        if not candidates:
            return 600 * 60.0, CAUSE_MAX_DURATION
        return min(candidates)

    def stop(self, cause: str) -> None:
        if self.stop_cause is None:
            self.stop_cause = cause
        self.changed.set()


@dataclasses.dataclass(slots=True)
class BkvJack:
    """One jack (``port`` 0 = A, 1 = B) and its running charge."""

    port: int
    plugged: bool = True
    session: BkvSession | None = None
    #: the current or last business number
    business_no: int = 0

    @property
    def status_bits(self) -> int:
        return STATUS_CHARGING if self.session is not None else STATUS_IDLE


@dataclasses.dataclass(slots=True)
class BkvSocket:
    """One socket behind the gateway: its number, radio values, jacks and parameters."""

    number: int
    jacks: list[BkvJack]
    firmware_version: int = 0x5136
    temperature_c: int = 30
    signal_strength: int = 30
    voltage_v: float = 220.0
    params: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_PARAMS))
    last_business_no: int = 0
    #: 0x0015/0x1B per jack: ``{"buzzer", "voice", "periods": [{"start", "end"}]}``
    voice_windows: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def next_business_no(self) -> int:
        self.last_business_no = self.last_business_no % _U16 + 1
        return self.last_business_no


@dataclasses.dataclass(slots=True)
class PendingEndReport:
    """An end report kept until the server acknowledges it in the right form."""

    message: bkv.EndReport | bkv.PowerTierEndReport | bkv.FeeModeEndReport
    socket: int
    port: int
    next_send_at: float
    copies_sent: int = 0
    copies_this_connection: int = 0
    last_sent_at: float = 0.0
    #: the session in the gateway's ledger
    entry: LedgerEntry | None = None
    #: acknowledgements taken for this report (lost ones included)
    acks_seen: int = 0


@dataclasses.dataclass(slots=True)
class BkvGatewayStats:
    """BKV counters on top of :class:`~chargesim.pile.PileStats`."""

    heartbeats_answered: int = 0
    status_sent: int = 0
    status_acked: int = 0
    end_reports_sent: int = 0
    end_reports_acked: int = 0
    #: end-report acknowledgements in a form real gateways ignore (e.g. 0x0015/0x02 down)
    wrong_end_acks: int = 0


def bkv_gateway_id(number: int) -> str:
    """The gateway id for a number, like the generated ``8223121400xxxx`` ids.

    >>> bkv_gateway_id(27)
    '82231214000027'
    """
    if not 0 <= number <= 999_999:
        raise ValueError(f"BKV gateway numbers are 0-999999, not {number}")
    return "82231214%06d" % number


def bkv_iccid_for(gateway_id: str) -> str:
    """A deterministic 20-digit ICCID (``898604...``) for a gateway id."""
    digits = gateway_id if gateway_id.isdigit() else "%014d" % (int(gateway_id, 16) % 10**14)
    return "898604" + digits


def _bcd(moment: dt.datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S")


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


class SimulatedBkvGateway(SimulatedPile):
    """A simulated BKV gateway with ``sockets`` sockets (numbers 1..N) of two jacks each.

    State is public and may be changed at run time (``sockets``, ``faults``,
    ``heartbeat_s``); see also :meth:`plug` / :meth:`unplug`. ``query_reply`` chooses
    how a 0x0015/0x1D query is answered: ``"state"`` (the documented 0x1C reply),
    ``"cluster"`` (an unsolicited 0x1017 status cluster, as real gateways do) or
    ``"both"``.
    """

    protocol: ClassVar[str] = "bkv"

    def __init__(
        self,
        gateway_id: str,
        *,
        sockets: int = 2,
        iccid: str | None = None,
        firmware: str = "cV.1r46",
        signal_strength: int = 31,
        socket_firmware_version: int = 0x5136,
        heartbeat_s: float = 60.0,
        plugged: bool = True,
        charge_power_w: float = 200.0,
        voltage_v: float = 220.0,
        temperature_c: int = 30,
        query_reply: str = "state",
        send_0x1013: bool = True,
        send_iccid: bool = False,
        offline_after_missed_heartbeats: int | None = None,
        end_codes: Mapping[str, tuple[int, int]] | None = None,
        intervals: BkvIntervals | None = None,
        faults: Faults | None = None,
        record_limit: int = 10_000,
    ) -> None:
        gateway_id = gateway_id.upper()
        try:
            bkv.socket_id(gateway_id, 1)  # validates: 14 hex digits
        except EncodeError as exc:
            raise ValueError(str(exc)) from None
        super().__init__(
            gateway_id, heartbeat_s=heartbeat_s, faults=faults, record_limit=record_limit
        )
        if not 1 <= sockets <= 250:
            raise ValueError(f"a BKV gateway has 1 to 250 sockets, not {sockets}")
        if query_reply not in ("state", "cluster", "both"):
            raise ValueError(f"query_reply is 'state', 'cluster' or 'both', not {query_reply!r}")
        self.gateway_id = gateway_id
        self.iccid = iccid if iccid is not None else bkv_iccid_for(gateway_id)
        if len(self.iccid) != 20 or not self.iccid.startswith("89"):
            raise ValueError(f"an ICCID is 20 characters starting with 89, not {self.iccid!r}")
        self.firmware = firmware
        self.signal_strength = signal_strength
        self.sockets: dict[int, BkvSocket] = {
            n: BkvSocket(
                n,
                [BkvJack(0, plugged=plugged), BkvJack(1, plugged=plugged)],
                firmware_version=socket_firmware_version,
                temperature_c=temperature_c,
                voltage_v=voltage_v,
            )
            for n in range(1, sockets + 1)
        }
        self.charge_power_w = charge_power_w
        self.query_reply = query_reply
        self.send_0x1013 = send_0x1013
        self.send_iccid = send_iccid
        self.offline_after_missed_heartbeats = offline_after_missed_heartbeats
        self.end_codes = dict(DEFAULT_END_CODES if end_codes is None else end_codes)
        self.intervals = intervals if intervals is not None else BkvIntervals()
        self.end_reports: collections.deque[PendingEndReport] = collections.deque()
        self.bkv_stats = BkvGatewayStats()
        self.server_time: str | None = None
        self._clock: tuple[dt.datetime, float] | None = None
        self._heartbeats_unanswered = 0
        self._end_wakeup = asyncio.Event()
        self._status_changed: dict[int, asyncio.Event] = {n: asyncio.Event() for n in self.sockets}
        #: 0x0007 OTA: the version text each file name installs (a file not listed, or
        #: ``ota_keep_version``: the gateway comes back with its old version), and the
        #: (ftp_ip, ftp_port, file_name) of every OTA received
        self.ota_files: dict[str, str] = {}
        self.ota_keep_version = False
        self.ota_requests: list[tuple[str, int, str]] = []
        #: parameter faults: :meth:`reboot` restores the factory parameters and clears
        #: the voice windows; parameters named here (or ``"voice_window"``) are
        #: acknowledged by 0x1011 (0x1B) but not stored
        self.factory_reset_on_reboot = False
        self.params_ignored: set[str] = set()

    # --- helpers -------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def device_time(self) -> dt.datetime:
        """The gateway's clock (naive Beijing time), set by the heartbeat replies."""
        if self._clock is not None:
            base, at = self._clock
            return base + dt.timedelta(seconds=self._now() - at)
        return dt.datetime.now(DEVICE_TZ).replace(tzinfo=None, microsecond=0)

    async def send_message(self, message: bkv.BkvMessage) -> bool:
        """Encode and send one message; False if offline."""
        return await self.send_frame(bkv.encode(message), message)

    def describe_frame(self, frame: bytes) -> Message | None:
        return bkv.decode(frame)

    def sent_messages(self, cls: type[_B]) -> list[_B]:
        """Messages of one class sent so far (those still in the bounded record)."""
        return [r.message for r in self.sent() if isinstance(r.message, cls)]

    def received_messages(self, cls: type[_B]) -> list[_B]:
        """Messages of one class received so far (those still in the bounded record)."""
        return [r.message for r in self.received() if isinstance(r.message, cls)]

    def reset_params(self, socket: int | None = None) -> None:
        """Factory reset of one socket (or all): the guide's parameter values, no voice
        windows."""
        for sock in self.sockets.values():
            if socket is None or sock.number == socket:
                sock.params = dict(DEFAULT_PARAMS)
                sock.voice_windows.clear()

    def reboot(self, reason: str = "reboot") -> None:
        """Power-cycle: the connection closes and the gateway reconnects after
        ``intervals.boot_s`` (gateway seconds), its sockets with factory parameters when
        ``factory_reset_on_reboot`` is set."""
        if self.factory_reset_on_reboot:
            self.reset_params()
        self.end_connection(reason, reconnect_after_s=self.timing.real(self.intervals.boot_s))

    def jack(self, socket: int, port: int) -> BkvJack:
        """The jack ``port`` (0 = A) of socket ``socket``; KeyError/IndexError if none."""
        return self.sockets[socket].jacks[port]

    # --- messages the gateway builds -----------------------------------------------------

    def heartbeat(self) -> bkv.Heartbeat:
        return bkv.Heartbeat(
            self.gateway_id,
            0,
            iccid=self.iccid,
            firmware_version=self.firmware,
            signal_strength=self.signal_strength,
        )

    def connect_report(self, socket: BkvSocket) -> bkv.TlvContainer:
        """The undocumented 0x1000/0x1013 sent after every (re)connection (bkv.md 15)."""
        return bkv.TlvContainer(
            self.gateway_id,
            0,
            bkv_seq=0,
            bkv_gateway_id=self.gateway_id,
            bkv_cmd=0x1013,
            raw_items=(
                bkv.TlvItem(0x4A, "%02X" % socket.number),
                bkv.TlvItem(0x08, "7F"),  # all ports
                bkv.TlvItem(0x06, _bcd(self.device_time())),
                bkv.TlvItem(0x5A, "0000"),  # meaning unknown
            ),
        )

    def _jack_values(self, socket: BkvSocket, jack: BkvJack) -> dict[str, Any]:
        session = jack.session
        if session is None:
            return {
                "status_bits": jack.status_bits,
                "business_no": jack.business_no,
                "voltage_v": socket.voltage_v,
                "power_w": 0.0,
                "current_a": 0.0,
                "energy_kwh": 0.0,
                "duration_min": 0,
            }
        pile_s = self.timing.pile_seconds(self._now() - session.started_at)
        power = round(session.power_w * self.rng.uniform(0.97, 1.03), 1)
        session.peak_power_w = max(session.peak_power_w, power)
        return {
            "status_bits": jack.status_bits,
            "business_no": session.business_no,
            "voltage_v": socket.voltage_v,
            "power_w": min(power, 6553.5),
            "current_a": min(round(power / socket.voltage_v, 3), 65.535),
            "energy_kwh": min(round(session.energy_at(pile_s), 3), 65.535),
            "duration_min": min(round(pile_s / 60.0), _U16),
        }

    def status_cluster(self, socket: BkvSocket) -> bkv.StatusCluster:
        """A 0x1017 status cluster of one socket (seq 0)."""
        jacks = tuple(
            bkv.JackStatus(port=j.port, **self._jack_values(socket, j)) for j in socket.jacks
        )
        group = bkv.SocketStatus(
            socket=socket.number,
            firmware_version=socket.firmware_version,
            temperature_c=socket.temperature_c,
            signal_strength=socket.signal_strength,
            ports=jacks,
        )
        return bkv.StatusCluster.create(self.gateway_id, 0, sockets=(group,))

    def socket_state(self, socket: BkvSocket, seq: int, sub_cmd: int = 0x1C) -> bkv.SocketState:
        """The 0x1C reply to a 0x1D query."""
        ports = tuple(
            bkv.JackState(port=j.port, **self._jack_values(socket, j)) for j in socket.jacks
        )
        cls = bkv.SocketState if sub_cmd == 0x1C else bkv.SocketState1D
        return cls(
            self.gateway_id,
            seq,
            socket=socket.number,
            firmware_version=socket.firmware_version,
            temperature_c=socket.temperature_c,
            signal_strength=socket.signal_strength,
            ports=ports,
        )

    # --- protocol hooks ------------------------------------------------------------------

    def new_decoder(self) -> StreamDecoder:
        return bkv.BkvStreamDecoder()

    def preamble(self) -> tuple[bytes, str]:
        # bkv.md 12: BKV modems send no ICCID preamble; the ICCID is in the heartbeat
        if self.send_iccid:
            return self.iccid.encode("ascii"), "iccid"
        return b"", "iccid"

    def is_command(self, message: Message) -> bool:
        # the server's replies are not commands, except a card order: the socket
        # confirms it (0x0F) and acts on it
        return bkv.reply_for(message) is not None or not bkv.is_server_reply(message)

    def command_key(self, message: Message) -> Hashable:
        assert isinstance(message, bkv.BkvMessage)
        return (message.wire_command, bkv.message_key(message), message.seq)

    def frame_ids(self, message: Message) -> tuple[int | None, int | None]:
        if isinstance(message, bkv.BkvMessage):
            return message.wire_command, message.seq
        return None, None

    async def on_connected(self, tg: asyncio.TaskGroup) -> None:
        self._heartbeats_unanswered = 0
        # the opening sequence of real gateways: heartbeat, 0x1013, unacknowledged reports
        await self._send_heartbeat()
        if self.send_0x1013:
            for socket in self.sockets.values():
                await self.send_message(self.connect_report(socket))
        now = self._now()
        for pending in list(self.end_reports):
            pending.copies_this_connection = 0
            pending.next_send_at = now
            await self._send_end_report(pending)
        for socket in self.sockets.values():
            await self._send_status(socket)
        tg.create_task(self._heartbeat_loop())
        tg.create_task(self._end_report_loop())
        for socket in self.sockets.values():
            tg.create_task(self._status_loop(socket))

    def on_reply(self, message: Message) -> None:
        if isinstance(message, bkv.HeartbeatReply):
            self._heartbeats_unanswered = 0
            self.bkv_stats.heartbeats_answered += 1
            self.server_time = message.server_time
            try:
                clock = dt.datetime.fromisoformat(message.server_time)
            except ValueError:
                self.stats.unmatched_replies += 1
            else:
                self._clock = (clock.replace(tzinfo=None), self._now())
        elif isinstance(message, bkv.StatusClusterAck):
            if message.result == 1:
                self.bkv_stats.status_acked += 1
        elif isinstance(message, bkv.CardEndAck):
            self._acknowledge_end(message.socket, None, message.result, fee_mode=False)
        elif isinstance(message, bkv.FeeModeEndAck):
            socket = message.socket if isinstance(message.socket, int) else -1
            port = message.port if isinstance(message.port, int) else -1
            result = message.result if isinstance(message.result, int) else 0
            self._acknowledge_end(socket, port, result, fee_mode=True)
        else:  # event-report ACKs and balances concern frames this gateway never sends
            self.stats.unmatched_replies += 1

    # --- periodic tasks of a connection --------------------------------------------------

    async def _send_heartbeat(self) -> None:
        self._heartbeats_unanswered += 1
        await self.send_message(self.heartbeat())

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.spread(self.heartbeat_s, self.rng))
            limit = self.offline_after_missed_heartbeats
            if limit is not None and self._heartbeats_unanswered >= limit:
                self.end_connection(f"offline: {limit} heartbeats unanswered")
                return
            await self._send_heartbeat()

    async def _send_status(self, socket: BkvSocket) -> None:
        if await self.send_message(self.status_cluster(socket)):
            self.bkv_stats.status_sent += 1

    def status_changed(self, socket: int) -> None:
        """Make ``socket`` report its status now (as a socket does on any change)."""
        event = self._status_changed.get(socket)
        if event is not None:
            event.set()

    async def _status_loop(self, socket: BkvSocket) -> None:
        next_at = self._now() + self.timing.spread(self.intervals.status_s, self.rng)
        while True:
            event = self._status_changed[socket.number]
            try:
                async with asyncio.timeout(max(0.0, next_at - self._now())):
                    await event.wait()
                await asyncio.sleep(CHANGE_REPORT_DELAY_S)
            except TimeoutError:
                pass
            event.clear()
            await self._send_status(socket)
            next_at = self._now() + self.timing.spread(self.intervals.status_s, self.rng)

    async def _end_report_loop(self) -> None:
        while True:
            wakeup = self._end_wakeup
            if not self.end_reports:
                await wakeup.wait()
                continue
            due = min(self.end_reports, key=lambda p: p.next_send_at)
            wait = due.next_send_at - self._now()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await wakeup.wait()
                continue
            limit = self.intervals.end_report_resends
            if limit is not None and due.copies_this_connection > limit:
                self.end_connection(
                    f"end report unacknowledged after {due.copies_this_connection} copies"
                )
                return
            await self._send_end_report(due)

    async def _send_end_report(self, pending: PendingEndReport) -> None:
        now = self._now()
        pending.next_send_at = now + self.timing.spread(
            self.intervals.end_report_resend_s, self.rng
        )
        copy = self._copy_of(pending)
        if await self.send_message(copy):
            pending.copies_sent += 1
            pending.copies_this_connection += 1
            pending.last_sent_at = now
            self.bkv_stats.end_reports_sent += 1
            if pending.entry is not None:
                pending.entry.sent()
                pending.entry.copies_changed += copy is not pending.message

    def _copy_of(
        self, pending: PendingEndReport
    ) -> bkv.EndReport | bkv.PowerTierEndReport | bkv.FeeModeEndReport:
        """The report to send now: a resend may carry other live readings (the fault
        ``resend_changed_readings``); the session values never change."""
        message = pending.message
        key = (pending.socket, pending.port, pending.entry and pending.entry.business_no)
        copy = pending.copies_sent
        if copy == 0 or not self.chance(
            self.faults.resend_changed_readings, "readings", *key, copy
        ):
            return message
        shift = 1 + int(self.roll("shift", *key, copy) * 5)  # 1..5
        if isinstance(message, bkv.FeeModeEndReport):
            fee_temperature = message.temperature_c
            if isinstance(fee_temperature, int):
                fee_temperature += shift if fee_temperature < 60 else -shift
            # residual readings after the relay opened
            return dataclasses.replace(
                message,
                temperature_c=fee_temperature,
                power_w=round(0.1 * shift, 1),
                current_a=round(0.001 * shift, 3),
            )
        temperature = message.temperature_c
        temperature += shift if temperature < 60 else -shift
        signal = message.signal_strength
        signal = signal - shift if signal > 5 else signal + shift
        return dataclasses.replace(message, temperature_c=temperature, signal_strength=signal)

    def _wake_end_reports(self) -> None:
        self._end_wakeup.set()
        self._end_wakeup = asyncio.Event()

    def _acknowledge_end(self, socket: int, port: int | None, result: int, fee_mode: bool) -> None:
        # the 0x0C form names only the socket: it acknowledges that socket's report sent last
        candidates = [
            p
            for p in self.end_reports
            if p.socket == socket
            and (port is None or p.port == port)
            and isinstance(p.message, bkv.FeeModeEndReport) == fee_mode
            and p.copies_sent > 0
        ]
        if not candidates:
            self.stats.unmatched_replies += 1
            return
        if result != 1:
            return  # not accepted: keep resending
        acked = max(candidates, key=lambda p: p.last_sent_at)
        acked.acks_seen += 1
        entry = acked.entry
        business_no = None if entry is None else entry.business_no
        if self.chance(
            self.faults.lose_acks, "ack", acked.socket, acked.port, business_no, acked.acks_seen
        ):
            self.stats.acks_lost += 1
            if entry is not None:
                entry.acks_lost += 1
            return  # the fault: as if the answer never arrived
        if entry is not None:
            entry.acknowledge()
        self.end_reports.remove(acked)
        self.bkv_stats.end_reports_acked += 1
        self._wake_end_reports()

    # --- charging ------------------------------------------------------------------------

    def plug(self, socket: int, port: int, plugged: bool = True) -> None:
        """Plug a charger into a jack (or unplug it with ``plugged=False``)."""
        jack = self.jack(socket, port)
        jack.plugged = plugged
        if not plugged and jack.session is not None:
            jack.session.stop(CAUSE_UNPLUGGED)

    def unplug(self, socket: int, port: int) -> None:
        """Unplug the charger of a jack; a running charge ends (no load)."""
        self.plug(socket, port, False)

    def start_local(
        self,
        socket: int,
        port: int,
        *,
        duration_min: int | None = None,
        energy_kwh: float | None = None,
        amount_cent: int | None = None,
        fee_tiers: Sequence[bkv.FeeTier] | None = None,
        service_fee_mode: int = 1,
    ) -> BkvSession | None:
        """Start charging a jack (``port`` 0 = A) at the socket, without the server: a
        coin, button or offline start. The socket allocates a business number; status
        clusters report the session and its end report follows as for any session. By
        time (``duration_min``, 0x02 end report), by energy (0x02), or in fee mode for
        ``amount_cent`` with ``fee_tiers`` (default: one tier, 100 + 50 fen per kWh; a
        0x1004 end report). Returns None when the jack is busy, unplugged or unknown."""
        free = self._free_jack(socket, port)
        if free is None:
            return None
        if amount_cent is not None:
            tiers = tuple(fee_tiers) if fee_tiers else (bkv.FeeTier("23:59", 100, 50),)
            session = self._start(
                *free,
                "fee",
                amount_cent=amount_cent,
                fee_tiers=tiers,
                service_fee_mode=service_fee_mode,
            )
        elif energy_kwh is not None:
            session = self._start(
                *free, "energy", energy_kwh=energy_kwh, duration_min=duration_min or 0
            )
        else:
            session = self._start(*free, "time", duration_min=duration_min or MAX_ORDER_MINUTES)
        session.started_by = "device"
        return session

    def device_ids(self) -> list[str]:
        return [bkv.socket_id(self.gateway_id, n) for n in self.sockets]

    def charging(self) -> set[tuple[str, int]]:
        return {
            (bkv.socket_id(self.gateway_id, sock.number), jack.port + 1)
            for sock in self.sockets.values()
            for jack in sock.jacks
            if jack.session is not None
        }

    def _free_jack(self, socket: int, port: int) -> tuple[BkvSocket, BkvJack] | None:
        sock = self.sockets.get(socket)
        if sock is None or not 0 <= port < len(sock.jacks):
            return None
        jack = sock.jacks[port]
        if jack.session is not None or not jack.plugged:
            return None
        return sock, jack

    def _start(self, sock: BkvSocket, jack: BkvJack, mode: str, **limits: Any) -> BkvSession:
        business_no = sock.next_business_no()
        session = BkvSession(
            socket=sock.number,
            port=jack.port,
            business_no=business_no,
            mode=mode,
            started_at=self._now(),
            power_w=self.charge_power_w * self.rng.uniform(0.9, 1.1),
            max_duration_min=int(sock.params.get("max_charge_duration_min", 600)),
            **limits,
        )
        session.peak_power_w = session.power_w
        if mode == "tiers" and session.tiers:
            session.tier_index = _power_tier(session.tiers, session.power_w)
        if mode == "fee" and session.fee_tiers:
            session.tier_index = _fee_tier(session.fee_tiers, self.device_time())
        jack.session = session
        jack.business_no = business_no
        self.spawn(self._charge(sock, jack, session))
        self.status_changed(sock.number)
        return session

    def _stop(self, socket: int, port: int) -> BkvSession | None:
        sock = self.sockets.get(socket)
        if sock is None or not 0 <= port < len(sock.jacks):
            return None
        session = sock.jacks[port].session
        if session is not None:
            session.stop(CAUSE_STOPPED)
        return session

    async def _charge(self, sock: BkvSocket, jack: BkvJack, session: BkvSession) -> None:
        while session.stop_cause is None:
            end_s, cause = session.end()
            end_at = session.started_at + self.timing.real(end_s)
            now = self._now()
            if now >= end_at:
                session.stop(cause)
                break
            session.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(end_at - now):
                    await session.changed.wait()
        self._finish(sock, jack, session)

    def _finish(self, sock: BkvSocket, jack: BkvJack, session: BkvSession) -> None:
        cause = session.stop_cause or CAUSE_STOPPED
        status_bits, end_reason = self.end_codes.get(cause, DEFAULT_END_CODES[CAUSE_STOPPED])
        pile_s = self.timing.pile_seconds(self._now() - session.started_at)
        if cause == CAUSE_LIMIT:  # a limit ends exactly at the limit
            pile_s = min(pile_s, session.end()[0])
        energy = min(round(session.energy_at(pile_s), 3), 65.535)
        minutes = min(round(pile_s / 60.0), _U16)
        if jack.session is session:
            jack.session = None
        end_time = self.device_time()
        message: bkv.EndReport | bkv.PowerTierEndReport | bkv.FeeModeEndReport
        head: dict[str, Any] = {
            "socket": sock.number,
            "port": jack.port,
            "status_bits": status_bits,
            "business_no": session.business_no,
            "power_w": 0.0,
            "current_a": 0.0,
            "energy_kwh": energy,
            "duration_min": minutes,
        }
        if session.mode == "fee":
            electricity, service = session.fees_at(pile_s)
            total = min(round(electricity + service), session.amount_cent)
            electricity_cent = min(round(electricity), total)
            count = max(len(session.fee_tiers), 1)
            usage = tuple(
                bkv.TierUsage(minutes, round(energy * 1000))
                if i == session.tier_index
                else bkv.TierUsage(0, 0)
                for i in range(count)
            )
            message = bkv.FeeModeEndReport.create(
                self.gateway_id,
                0,
                temperature_c=sock.temperature_c,
                **head,
                end_time=_iso(end_time),
                end_reason=end_reason,
                charge_mode=4,
                electricity_fee_cent=min(electricity_cent, _U16),
                service_fee_cent=min(total - electricity_cent, _U16),
                tier_count=count,
                tier_usage=usage,
            )
        elif session.mode == "tiers":
            tier = session.tiers[session.tier_index] if session.tiers else None
            spent = 0
            if tier is not None and tier.duration_min > 0:
                spent = min(round(pile_s / 60.0 / tier.duration_min * tier.price_cent), _U16)
                spent = min(spent, session.amount_cent)
            durations = tuple(
                minutes if i == session.tier_index else 0 for i in range(len(session.tiers))
            )
            message = bkv.PowerTierEndReport(
                self.gateway_id,
                0,
                firmware_version=sock.firmware_version,
                temperature_c=sock.temperature_c,
                signal_strength=sock.signal_strength,
                **head,
                end_time=_iso(end_time),
                end_reason=end_reason,
                amount_cent=spent,
                settlement_power_w=min(round(session.peak_power_w, 1), 6553.5),
                tier_durations_min=durations,
            )
        else:
            message = bkv.EndReport(
                self.gateway_id,
                0,
                firmware_version=sock.firmware_version,
                temperature_c=sock.temperature_c,
                signal_strength=sock.signal_strength,
                **head,
            )
        omitted = isinstance(message, bkv.FeeModeEndReport) and self.chance(
            self.faults.omit_optional_tags, "omit", sock.number, jack.port, session.business_no
        )
        if omitted:
            assert isinstance(message, bkv.FeeModeEndReport)
            message = dataclasses.replace(message, business_no=ABSENT)
        entry = LedgerEntry(
            protocol=self.protocol,
            device_id=bkv.socket_id(self.gateway_id, sock.number),
            port=jack.port + 1,
            started_by=session.started_by,
            energy_kwh=energy,
            duration_s=minutes * 60,
            started_at=session.started_wall,
            ended_at=time.time(),
            stop_reason=cause,
            business_no=session.business_no,
            report=message,
            tag_omitted=omitted,
        )
        self.ledger.append(entry)
        self.end_reports.append(
            PendingEndReport(message, sock.number, jack.port, self._now(), entry=entry)
        )
        while len(self.end_reports) > MAX_PENDING_END_REPORTS:
            lost = self.end_reports.popleft()  # the gateway's storage is finite
            if lost.entry is not None:
                lost.entry.dropped = True
        self._wake_end_reports()
        self.status_changed(sock.number)  # "a status report follows" (bkv.md 7.3)

    # --- commands ------------------------------------------------------------------------

    async def on_command(self, message: Message) -> list[bytes]:
        reply = self._answer(message)
        if reply is None:
            self.stats.commands_ignored += 1
            return []
        return [bkv.encode(m) for m in reply]

    def _answer(self, m: Message) -> list[bkv.BkvMessage] | None:
        if isinstance(m, bkv.ChargeControl):
            return [self._charge_control(m)]
        if isinstance(m, bkv.SocketQuery):
            return self._query(m)
        if isinstance(m, bkv.PowerTierControl):
            return [self._power_tier_control(m)]
        if isinstance(m, bkv.FeeModeControl):
            return [self._fee_mode_control(m)]
        if isinstance(m, bkv.SetParams):
            return [self._set_params(m)]
        if isinstance(m, bkv.QueryParams):
            return [self._query_params(m)]
        if isinstance(m, bkv.OtaUpgrade):  # the answer is undocumented (bkv.md 14.7): none
            self.ota_requests.append((m.ftp_ip, m.ftp_port, m.file_name))
            self.spawn(self._ota(m.file_name))
            return []
        gw = self.gateway_id
        if isinstance(m, bkv.NodeListRefresh):
            return [bkv.NodeListRefreshReply(gw, m.seq, result=1)]
        if isinstance(m, bkv.NodeAdd):
            return [bkv.NodeAddReply(gw, m.seq, result=1)]
        if isinstance(m, bkv.VoiceWindow):
            return [self._voice_window(m)]
        if (
            isinstance(m, bkv.UnknownSubCommand)
            and m.outer_command == 0x0015
            and m.sub_cmd in (0x02, 0x18)
        ):
            # an end-report ACK in the 0x02/0x18 form: real gateways keep resending
            self.bkv_stats.wrong_end_acks += 1
            log.debug("gateway %s: ignored a 0x%02X-form end-report ACK", gw, m.sub_cmd)
        return None

    async def _ota(self, file_name: str) -> None:
        """Download the file (simulated), install it and reboot."""
        await asyncio.sleep(self.timing.real(self.intervals.ota_download_s))
        version = self.ota_files.get(file_name)
        if version is not None and not self.ota_keep_version:
            self.firmware = version
        self.end_connection(
            "rebooting after an OTA upgrade",
            reconnect_after_s=self.timing.real(self.intervals.ota_boot_s),
        )

    def _charge_control(self, m: bkv.ChargeControl) -> bkv.ChargeControlReply:
        def reply(result: int, business_no: int = 0) -> bkv.ChargeControlReply:
            return bkv.ChargeControlReply(
                self.gateway_id,
                m.seq,
                result=result,
                socket=m.socket,
                port=m.port,
                business_no=business_no,
            )

        if self.faults.refuse_with is not None:
            return reply(self.faults.refuse_with)
        if m.switch == 0:
            session = self._stop(m.socket, m.port)
            return reply(0) if session is None else reply(1, session.business_no)
        if m.switch != 1:
            return reply(0)
        free = self._free_jack(m.socket, m.port)
        if free is None:
            return reply(0)
        if m.charge_mode == 1:  # by time; a non-zero energy field is accepted (bkv.md 15)
            if not 1 <= m.duration_min <= MAX_ORDER_MINUTES:
                return reply(0)
            session = self._start(*free, "time", duration_min=m.duration_min)
        elif m.charge_mode == 0:  # by energy
            if m.energy_kwh <= 0:
                return reply(0)
            session = self._start(
                *free, "energy", energy_kwh=m.energy_kwh, duration_min=m.duration_min
            )
        else:
            return reply(0)
        return reply(1, session.business_no)

    def _query(self, m: bkv.SocketQuery) -> list[bkv.BkvMessage] | None:
        sock = self.sockets.get(m.socket)
        if sock is None:
            return None
        if self.query_reply in ("cluster", "both"):
            self.status_changed(sock.number)  # an unsolicited 0x1017 (seq 0) ~10 ms later
        if self.query_reply == "cluster":
            return []
        return [self.socket_state(sock, m.seq)]

    def _power_tier_control(self, m: bkv.PowerTierControl) -> bkv.UnknownSubCommand:
        # the guide does not show the reply; it "answers with the business number", so
        # sub-command 0x17 with the 0x07 reply layout: result, socket, port, business_no
        def reply(result: int, business_no: int = 0) -> bkv.UnknownSubCommand:
            params = bytes((result & 0xFF, m.socket, m.port)) + business_no.to_bytes(2, "big")
            return bkv.UnknownSubCommand(
                self.gateway_id, m.seq, 0x0015, 0x17, params.hex().upper(), Direction.UP
            )

        if self.faults.refuse_with is not None:
            return reply(self.faults.refuse_with)
        if m.switch == 0:
            session = self._stop(m.socket, m.port)
            return reply(0) if session is None else reply(1, session.business_no)
        free = self._free_jack(m.socket, m.port)
        if m.switch != 1 or free is None or not m.tiers or m.amount_cent <= 0:
            return reply(0)
        session = self._start(*free, "tiers", amount_cent=m.amount_cent, tiers=tuple(m.tiers))
        return reply(1, session.business_no)

    def _fee_mode_control(self, m: bkv.FeeModeControl) -> bkv.FeeModeControlReply:
        socket = m.socket if isinstance(m.socket, int) else 0
        port = m.port if isinstance(m.port, int) else 0

        def reply(result: int, business_no: int = 0) -> bkv.FeeModeControlReply:
            return bkv.FeeModeControlReply.create(
                self.gateway_id,
                m.seq,
                socket=socket,
                port=port,
                result=result,
                business_no=business_no,
            )

        if self.faults.refuse_with is not None:
            return reply(self.faults.refuse_with)
        if m.socket is ABSENT or m.port is ABSENT:
            return reply(0)
        if m.switch == 0:
            session = self._stop(socket, port)
            return reply(0) if session is None else reply(1, session.business_no)
        free = self._free_jack(socket, port)
        amount = m.amount_cent if isinstance(m.amount_cent, int) else 0
        if m.switch != 1 or free is None or m.charge_mode != 4 or amount <= 0:
            return reply(0)
        fee_tiers = () if m.fee_tiers is ABSENT else tuple(m.fee_tiers)
        service_mode = m.service_fee_mode if isinstance(m.service_fee_mode, int) else 1
        session = self._start(
            *free,
            "fee",
            amount_cent=amount,
            fee_tiers=fee_tiers,
            service_fee_mode=service_mode,
        )
        return reply(1, session.business_no)

    def _set_params(self, m: bkv.SetParams) -> bkv.SetParamsReply:
        socket = m.socket if isinstance(m.socket, int) else 0
        sock = self.sockets.get(socket)
        if sock is None:
            return bkv.SetParamsReply.create(self.gateway_id, m.seq, socket=socket, result=0)
        for name in DEFAULT_PARAMS:
            value = getattr(m, name)
            if value is not ABSENT and name not in self.params_ignored:
                sock.params[name] = value
        return bkv.SetParamsReply.create(self.gateway_id, m.seq, socket=socket, result=1)

    def _voice_window(self, m: bkv.VoiceWindow) -> bkv.VoiceWindowReply:
        """Store the window of one jack (socket 254: of every socket's jack)."""
        targets = list(self.sockets.values()) if m.socket == 254 else [self.sockets.get(m.socket)]
        ok = None not in targets and m.port in (0, 1) and m.buzzer in (0, 1) and m.voice in (0, 1)
        if ok and "voice_window" not in self.params_ignored:
            window = {
                "buzzer": m.buzzer,
                "voice": m.voice,
                "periods": [{"start": p.start, "end": p.end} for p in m.periods],
            }
            for sock in targets:
                assert sock is not None
                sock.voice_windows[m.port] = dict(window)
        return bkv.VoiceWindowReply(
            self.gateway_id, m.seq, socket=m.socket, port=m.port, result=1 if ok else 0
        )

    def _query_params(self, m: bkv.QueryParams) -> bkv.ParamsReport:
        socket = m.socket if isinstance(m.socket, int) else 0
        sock = self.sockets.get(socket)
        if sock is None:
            return bkv.ParamsReport.create(self.gateway_id, m.seq, socket=socket, result=0)
        return bkv.ParamsReport.create(
            self.gateway_id,
            m.seq,
            socket=socket,
            result=1,
            **sock.params,
            raw_items=_RAW_PARAM_ITEMS,
        )


def _power_tier(tiers: Sequence[bkv.PowerTier], power_w: float) -> int:
    """The tier whose bracket holds ``power_w``: the first (by power) at or above it."""
    order = sorted(range(len(tiers)), key=lambda i: tiers[i].power_w)
    for i in order:
        if power_w <= tiers[i].power_w:
            return i
    return order[-1]


def _fee_tier(tiers: Sequence[bkv.FeeTier], moment: dt.datetime) -> int:
    """The time-of-day tier at ``moment``: the first whose end is not yet reached."""
    now = moment.strftime("%H:%M")
    for i, tier in enumerate(tiers):
        if now <= tier.end_time:
            return i
    return len(tiers) - 1


def make_bkv_gateways(
    count: int,
    *,
    sockets: int = 2,
    id_start: int = 1,
    heartbeat_s: float = 60.0,
    **options: Any,
) -> list[SimulatedBkvGateway]:
    """``count`` gateways ``82231214000001``, ``...02`` ... from ``id_start``.

    ``options`` go to every :class:`SimulatedBkvGateway`.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    if id_start < 0 or id_start + count - 1 > 999_999:
        raise ValueError("BKV gateway numbers are 0-999999")
    return [
        SimulatedBkvGateway(
            bkv_gateway_id(id_start + i), sockets=sockets, heartbeat_s=heartbeat_s, **options
        )
        for i in range(count)
    ]
