"""Protocol compliance per firmware: the deviations from the protocol each device shows.

The gateway hands every inbound frame to :meth:`Compliance.observe` (after it is
decoded) or :meth:`Compliance.stream_error` (bytes that made no valid frame); the
outbox, the settlement path and the periodic check report what only they see
(:meth:`Compliance.record`). Counting is an attribute increment per frame; a deviation
adds to a small per-device tally. An owned task (:meth:`Compliance.run`) adds the
tallies to PostgreSQL every ``flush_s`` (an upsert that increments, one transaction), so
the counts survive restarts; what a failed flush could not write is kept and added to
the next one.

A device is counted under the (protocol, device type, firmware) it had when the frames
arrived: learnt from its own frames (AP3000 0x20 and 0x01, 0x11 of hosts; BKV heartbeats
of gateways, socket states and status clusters), else from the ``devices`` and
``gateways`` tables at the flush, else unknown (``""``). Frames that fail before any
device spoke on a connection count under the connection's first device, or under the
device ``unknown`` of the protocol when the connection closes without one.

The kinds (:class:`Kind`), their weights and the score are documented in
docs/compliance.md; :func:`score` is the formula.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import json
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import structlog
from pydantic import BaseModel, Field

from chargegw.audit import mask_frame
from chargegw.metrics import Metrics, update_failed
from chargegw.store.database import Connection
from chargeproto import ABSENT, Direction, Message, StreamError, ap3000, bkv, shared_text

log = structlog.get_logger("chargegw.domain.compliance")

#: the device id deviations count under when no device spoke on their connection
UNKNOWN_DEVICE: Final = "unknown"
#: example frames kept per device and kind (the newest)
EXAMPLES: Final = 3
#: the most top deviations a report lists per firmware by default
TOP: Final = 5


class Kind(str, enum.Enum):
    """What deviates; the value is the stable code stored, served and labelled."""

    CHECKSUM_ERROR = "checksum_error"
    LENGTH_ERROR = "length_error"
    FRAMING_ERROR = "framing_error"
    UNKNOWN_COMMAND = "unknown_command"
    UNKNOWN_TAG = "unknown_tag"
    TRUNCATED_PAYLOAD = "truncated_payload"
    INVALID_PAYLOAD = "invalid_payload"
    SHORT_PAYLOAD = "short_payload"
    LONG_PAYLOAD = "long_payload"
    MISSING_HEARTBEAT = "missing_heartbeat"
    MISSING_BUSINESS_NO = "missing_business_no"
    LATE_REPLY = "late_reply"
    SETTLEMENT_RESEND = "settlement_resend"
    CLOCK_DRIFT = "clock_drift"
    OUT_OF_RANGE = "out_of_range"


#: how much one deviation of a kind weighs in the score: 10 = the device misses a duty
#: of the protocol, 5 = a frame is lost, 3 = data is wrong, 1-2 = tolerable oddities
WEIGHTS: Final[dict[Kind, int]] = {
    Kind.CHECKSUM_ERROR: 5,
    Kind.LENGTH_ERROR: 5,
    Kind.FRAMING_ERROR: 3,
    Kind.UNKNOWN_COMMAND: 1,
    Kind.UNKNOWN_TAG: 1,
    Kind.TRUNCATED_PAYLOAD: 5,
    Kind.INVALID_PAYLOAD: 5,
    Kind.SHORT_PAYLOAD: 1,
    Kind.LONG_PAYLOAD: 1,
    Kind.MISSING_HEARTBEAT: 10,
    Kind.MISSING_BUSINESS_NO: 5,
    Kind.LATE_REPLY: 2,
    Kind.SETTLEMENT_RESEND: 1,
    Kind.CLOCK_DRIFT: 2,
    Kind.OUT_OF_RANGE: 3,
}

#: the decoder's error kinds (``DecodeError.kind``) -> deviation
_STREAM_KINDS: Final[dict[str, Kind]] = {
    "checksum": Kind.CHECKSUM_ERROR,
    "length": Kind.LENGTH_ERROR,
    "inner_length": Kind.LENGTH_ERROR,
    "truncated": Kind.TRUNCATED_PAYLOAD,
    "payload": Kind.INVALID_PAYLOAD,
}

#: plausible ranges of readings, engineering units: outside is ``out_of_range``
RANGES: Final[tuple[tuple[str, float, float], ...]] = (
    ("voltage_v", 0.0, 300.0),
    ("current_a", 0.0, 63.0),
    ("power_w", 0.0, 10_000.0),
    ("temperature_c", -40.0, 125.0),
    ("port_temperature_c", -40.0, 150.0),
)
#: AP3000 port 0xFF: "no port" (a balance query), never out of range
_NO_PORT: Final = 0xFF


def score(frames: int, weighted: int) -> float:
    """100 minus the weighted deviations per 1,000 frames, floored at 0 (one decimal).

    ``weighted`` is the sum of count x weight over the kinds; ``frames`` counts every
    inbound frame, valid or not. With no frames and no deviations the score is 100."""
    if weighted <= 0:
        return 100.0
    penalty = 1000.0 * weighted / max(frames, 1)
    return round(max(0.0, 100.0 - penalty), 1)


# ----------------------------------------------------------------- counting in memory


class _Tally:
    """One kind's deviations of one device since the last flush."""

    __slots__ = ("count", "examples", "first", "last", "tolerated")

    def __init__(self, at: dt.datetime) -> None:
        self.count = 0
        self.tolerated = 0
        self.first = at
        self.last = at
        self.examples: list[dict[str, Any]] = []

    def merge(self, other: _Tally) -> None:
        self.count += other.count
        self.tolerated += other.tolerated
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        self.examples = (other.examples + self.examples)[:EXAMPLES]


class _Device:
    """What is counted for one device (under one firmware) until the next flush."""

    __slots__ = (
        "device_id",
        "device_type",
        "firmware",
        "first",
        "frames",
        "kinds",
        "last",
        "port_count",
        "protocol",
    )

    def __init__(self, device_id: str, protocol: str) -> None:
        self.device_id = device_id
        self.protocol = protocol
        #: None: not known yet (looked up at the flush)
        self.device_type: str | None = None
        self.firmware: str | None = None
        self.port_count: int | None = None
        self.frames = 0
        self.first: dt.datetime | None = None
        self.last: dt.datetime | None = None
        self.kinds: dict[Kind, _Tally] | None = None

    @property
    def dirty(self) -> bool:
        return self.frames > 0 or self.kinds is not None

    def key(self) -> tuple[str, str, str | None, str | None]:
        return (self.device_id, self.protocol, self.device_type, self.firmware)

    def detach(self) -> _Device:
        """A copy holding the counts, which are reset here."""
        copy = _Device(self.device_id, self.protocol)
        copy.device_type, copy.firmware = self.device_type, self.firmware
        copy.frames, copy.first, copy.last, copy.kinds = (
            self.frames,
            self.first,
            self.last,
            self.kinds,
        )
        self.frames, self.first, self.last, self.kinds = 0, None, None, None
        return copy

    def merge(self, other: _Device) -> None:
        self.frames += other.frames
        if other.first is not None:
            self.first = other.first if self.first is None else min(self.first, other.first)
        if other.last is not None:
            self.last = other.last if self.last is None else max(self.last, other.last)
        for kind, tally in (other.kinds or {}).items():
            kinds = self.kinds if self.kinds is not None else {}
            self.kinds = kinds
            mine = kinds.get(kind)
            if mine is None:
                kinds[kind] = tally
            else:
                mine.merge(tally)


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """What to look at in a message class (worked out once per class)."""

    unknown: bool
    #: the last optional field: ABSENT means the payload was shorter than the layout
    short_field: str | None
    optional: tuple[str, ...]
    trailing: bool
    tlv: bool
    #: (field, lowest, highest) of the readings the class carries
    ranges: tuple[tuple[str, float, float], ...]
    port: bool
    #: the device's clock, Unix seconds
    clock: bool
    #: BKV end reports: their business number
    business_no: bool


def _plan_for(cls: type[Message]) -> _Plan:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = issubclass(
        cls, (ap3000.UnknownMessage, bkv.UnknownMessage, bkv.UnknownSubCommand, bkv.TlvContainer)
    )
    tlv = issubclass(cls, bkv.TlvMessage) or issubclass(cls, bkv.TlvContainer)
    optional: tuple[str, ...] = ()
    if not tlv and not unknown and dataclasses.is_dataclass(cls):
        optional = tuple(f.name for f in dataclasses.fields(cls) if f.default is ABSENT)
    up = getattr(cls, "direction", None) is not Direction.DOWN
    return _Plan(
        unknown=unknown,
        short_field=optional[-1] if optional else None,
        optional=optional,
        trailing="trailing_hex" in names,
        tlv=tlv and not unknown,
        ranges=tuple(r for r in RANGES if r[0] in names) if up else (),
        port="port" in names and up,
        clock=issubclass(cls, (ap3000.PowerHeartbeat, ap3000.CardSwipe, ap3000.HostHeartbeat)),
        business_no=issubclass(cls, (bkv.FeeModeEndReport,)) and "business_no" in names,
    )


def _ap3000_type(code: int) -> str:
    return f"0x{code:02X}"


#: message class -> (device type, firmware, port count) it tells of its sender
_IDENTITY: Final[dict[type[Message], Callable[[Any], tuple[str, str, int | None]]]] = {
    ap3000.Registration: lambda m: (
        _ap3000_type(m.device_type),
        str(m.firmware_version),
        m.port_count,
    ),
    ap3000.LegacyHeartbeat: lambda m: (
        _ap3000_type(m.device_type),
        str(m.firmware_version),
        len(m.ports),
    ),
    ap3000.HostHeartbeat: lambda m: ("host", str(m.firmware_version), None),
    bkv.Heartbeat: lambda m: ("gateway", str(m.firmware_version), None),
    bkv.SocketState: lambda m: ("socket", str(m.firmware_version), len(m.ports)),
    bkv.SocketState1D: lambda m: ("socket", str(m.firmware_version), len(m.ports)),
}


@dataclasses.dataclass(slots=True)
class _Awaiting:
    """An AP3000 pile that registered and owes its first 0x21."""

    deadline: float
    link: Any
    protocol: str
    example: dict[str, Any]


class Compliance:
    """The in-memory counters of one gateway process and their flush to PostgreSQL.

    ``tolerates(device_id, kind, command)`` says whether a quirk profile of the device
    expects the deviation on that command (None when the frame's command is unknown);
    it is then counted as ``tolerated`` too. None: nothing is tolerated.
    """

    def __init__(
        self,
        pool: Callable[[], Any],
        metrics: Metrics,
        *,
        flush_s: float = 5.0,
        heartbeat_s: float = 180.0,
        missing_heartbeat_periods: float = 3.0,
        clock_drift_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        tolerates: Callable[[str, str, str | None], bool] | None = None,
    ) -> None:
        self._pool = pool
        self.metrics = metrics
        self.flush_s = flush_s
        self.heartbeat_s = heartbeat_s
        self.missing_heartbeat_periods = missing_heartbeat_periods
        self.clock_drift_s = clock_drift_s
        self.clock = clock
        self.tolerates = tolerates
        self._devices: dict[str, _Device] = {}
        #: counts of a device under a firmware it no longer has, waiting for the flush
        self._retired: list[_Device] = []
        #: counts a flush could not write, merged by key, added to the next one
        self._unsaved: dict[tuple[str, str, str | None, str | None], _Device] = {}
        #: connection id -> deviations before any device spoke on it
        self._pending: dict[str, _Device] = {}
        self._awaiting: dict[str, _Awaiting] = {}
        self._plans: dict[type[Message], _Plan] = {}
        self._short_texts: dict[tuple[type[Message], tuple[bool, ...]], str] = {}
        #: the deviation counter's child per (protocol, kind), looked up once
        self._deviation_counters: dict[tuple[str, str], Any] = {}
        # the frame being handled (for deviations found while a driver handles it)
        self._cur_device: _Device | None = None
        self._cur_message: Message | None = None
        self._cur_raw = b""
        self._cur_command: str | None = None
        self._cur_frame_id: int | None = None
        self._cur_wall: dt.datetime | None = None

    # -- frames --

    def observe(
        self,
        link: Any,
        owner: str,
        message: Message,
        raw: bytes,
        command: str,
        frame_id: int | None,
        wall: dt.datetime,
    ) -> None:
        """A decoded inbound frame of ``owner`` (the device, host or gateway it names)."""
        dev = self._devices.get(owner)
        if dev is None:
            dev = self._devices[owner] = _Device(owner, message.protocol)
        dev.frames += 1
        if dev.first is None:
            dev.first = wall
        dev.last = wall
        if self._pending and link.id in self._pending:
            dev.merge(self._pending.pop(link.id))
        self._cur_device, self._cur_message, self._cur_raw = dev, message, raw
        self._cur_command, self._cur_frame_id, self._cur_wall = command, frame_id, wall
        cls = type(message)
        identity = _IDENTITY.get(cls)
        if identity is not None:
            self._learn(dev, *identity(message))
        plan = self._plans.get(cls)
        if plan is None:
            plan = self._plans[cls] = _plan_for(cls)
        if plan.unknown:
            self._deviation(dev, Kind.UNKNOWN_COMMAND, f"command {command} is not in the protocol")
        if plan.short_field is not None and getattr(message, plan.short_field) is ABSENT:
            self._deviation(dev, Kind.SHORT_PAYLOAD, self._short_text(cls, plan, message))
        if plan.trailing and message.trailing_hex:  # type: ignore[attr-defined]
            extra = len(message.trailing_hex) // 2  # type: ignore[attr-defined]
            self._deviation(dev, Kind.LONG_PAYLOAD, f"{extra} bytes after the last field")
        if plan.tlv:
            self._tags(dev, message)
        for name, low, high in plan.ranges:
            value = getattr(message, name)
            if isinstance(value, int | float) and not low <= value <= high:
                self._deviation(dev, Kind.OUT_OF_RANGE, f"{name} {value} outside {low:g}..{high:g}")
        if plan.port and dev.port_count:
            port = getattr(message, "port", None)
            if isinstance(port, int) and port != _NO_PORT and port >= dev.port_count:
                self._deviation(
                    dev, Kind.OUT_OF_RANGE, f"port {port} (0-based) of {dev.port_count} ports"
                )
        if plan.clock:
            device_time = getattr(message, "timestamp_unix", ABSENT)
            if isinstance(device_time, int):
                drift = device_time - wall.timestamp()
                if abs(drift) > self.clock_drift_s:
                    self._deviation(dev, Kind.CLOCK_DRIFT, f"device clock {drift:+.0f} s")
        if plan.business_no and message.business_no is ABSENT:  # type: ignore[attr-defined]
            self._deviation(dev, Kind.MISSING_BUSINESS_NO, "end report without business number")
        if self._awaiting and cls is ap3000.Heartbeat:
            self._awaiting.pop(owner, None)
        elif cls is ap3000.Registration:
            self._expect_heartbeat(link, owner, message)

    def _short_text(self, cls: type[Message], plan: _Plan, message: Message) -> str:
        """``<Class> without <the optional fields absent>`` (the text is kept per set of
        absent fields: a pile sends the same short layout every time)."""
        absent = tuple(getattr(message, name) is ABSENT for name in plan.optional)
        key = (cls, absent)
        text = self._short_texts.get(key)
        if text is None:
            missing = [name for name, gone in zip(plan.optional, absent, strict=True) if gone]
            text = self._short_texts[key] = f"{cls.__name__} without {', '.join(missing)}"
        return text

    def stream_error(
        self, link: Any, event: StreamError, frame_id: int | None, wall: dt.datetime
    ) -> None:
        """Bytes that made no valid frame, on ``link``: counted under the connection's
        device (its gateway or first pile), or kept until one speaks."""
        error_kind = getattr(event.error, "kind", "decode")
        kind = _STREAM_KINDS.get(error_kind, Kind.FRAMING_ERROR)
        protocol = link.protocol or "unknown"
        owner = link.gateway
        if owner is not None:
            dev = self._devices.get(owner)
            if dev is None:
                dev = self._devices[owner] = _Device(str(owner), protocol)
        else:
            dev = self._pending.get(link.id)
            if dev is None:
                dev = self._pending[link.id] = _Device(UNKNOWN_DEVICE, protocol)
        dev.frames += 1
        if dev.first is None:
            dev.first = wall
        dev.last = wall
        example = {
            "at": wall.isoformat(),
            "direction": "in",
            "command": None,
            "hex": event.raw.hex(),
            "frame_id": frame_id,
            "detail": f"{error_kind}: {event.error}"[:300],
        }
        self._count(dev, kind, wall, example)

    def link_closed(self, link: Any) -> None:
        """Deviations of a connection on which no device ever spoke: device ``unknown``."""
        pending = self._pending.pop(link.id, None)
        if pending is not None:
            self._retired.append(pending)

    def forget(self, device_id: str) -> None:
        """The process no longer holds the device: its counts wait for the flush."""
        dev = self._devices.pop(device_id, None)
        if dev is not None and dev.dirty:
            self._retired.append(dev)

    def record(
        self,
        device_id: str,
        protocol: str,
        kind: Kind,
        detail: str,
        *,
        frame_id: int | None = None,
        command: str | None = None,
    ) -> None:
        """A deviation seen outside the frame's own handling (a settlement resend found
        by the database, ...): the example names the frame by id."""
        dev = self._devices.get(device_id)
        if dev is None:
            dev = self._devices[device_id] = _Device(device_id, protocol)
        wall = dt.datetime.now(dt.UTC)
        example = {
            "at": wall.isoformat(),
            "direction": "in",
            "command": command,
            "hex": None,
            "frame_id": frame_id,
            "detail": detail,
        }
        self._count(dev, kind, wall, example)

    def record_current(self, kind: Kind, detail: str) -> None:
        """A deviation of the frame being handled now (from inside its handling)."""
        if self._cur_device is not None:
            self._deviation(self._cur_device, kind, detail)

    # -- inside --

    def _learn(self, dev: _Device, device_type: str, firmware: str, ports: int | None) -> None:
        if ports:
            dev.port_count = ports
        if dev.firmware == firmware and dev.device_type == device_type:
            return
        if dev.firmware is not None and dev.dirty:
            # counted so far under the firmware it had: kept apart
            retired = dev.detach()
            retired.frames -= 1  # this frame counts under the new firmware
            dev.frames, dev.first, dev.last = 1, retired.last, retired.last
            self._retired.append(retired)
        # a few texts shared by many devices: one copy each, not one per device
        dev.device_type, dev.firmware = shared_text(device_type), shared_text(firmware)

    def _tags(self, dev: _Device, record: Any) -> None:
        """Items of a BKV TLV message (and of its groups) the library kept raw: unknown
        tags, and known tags whose value does not fit (wrong length, other marker)."""
        raw_items = record.raw_items
        if raw_items:
            tag_map = type(record).TAG_MAP
            for item in raw_items:
                spec = tag_map.get(item.tag)
                if spec is None:
                    self._deviation(dev, Kind.UNKNOWN_TAG, f"tag 0x{item.tag:02X} is not known")
                else:
                    self._deviation(
                        dev,
                        Kind.INVALID_PAYLOAD,
                        f"tag 0x{item.tag:02X} ({spec.name}) does not fit its layout",
                    )
        for name in type(record).LIST_NAMES:
            entries = getattr(record, name)
            if entries is ABSENT:
                continue
            for entry in entries:
                if hasattr(entry, "raw_items"):
                    self._tags(dev, entry)

    def _expect_heartbeat(self, link: Any, owner: str, message: Message) -> None:
        if owner in self._awaiting or int(owner[:2], 16) in (0x09, 0x0A):  # hosts send 0x11
            return
        wall = self._cur_wall or dt.datetime.now(dt.UTC)
        self._awaiting[owner] = _Awaiting(
            self.clock() + self.missing_heartbeat_periods * self.heartbeat_s,
            link,
            message.protocol,
            self._example(
                message,
                wall,
                f"registered, then no 0x21 within {self.missing_heartbeat_periods:g} "
                f"heartbeat periods ({self.heartbeat_s:g} s)",
            ),
        )

    def check_missing(self) -> None:
        """Registered AP3000 piles whose first 0x21 is overdue (on an open connection)."""
        if not self._awaiting:
            return
        now = self.clock()
        for owner, waiting in list(self._awaiting.items()):
            if waiting.link.closed:
                del self._awaiting[owner]
            elif waiting.deadline <= now:
                del self._awaiting[owner]
                dev = self._devices.get(owner)
                if dev is None:
                    dev = self._devices[owner] = _Device(owner, waiting.protocol)
                self._count(
                    dev,
                    Kind.MISSING_HEARTBEAT,
                    dt.datetime.now(dt.UTC),
                    waiting.example,
                )

    def _example(self, message: Message, wall: dt.datetime, detail: str) -> dict[str, Any]:
        raw = self._cur_raw if message is self._cur_message else b""
        return {
            "at": wall.isoformat(),
            "direction": "in",
            "command": self._cur_command if message is self._cur_message else None,
            "hex": mask_frame(message, raw) if raw else None,
            "frame_id": self._cur_frame_id if message is self._cur_message else None,
            "detail": detail[:300],
        }

    def _deviation(self, dev: _Device, kind: Kind, detail: str) -> None:
        assert self._cur_message is not None and self._cur_wall is not None
        wall = self._cur_wall
        tally = dev.kinds.get(kind) if dev.kinds is not None else None
        example = None
        if tally is None or len(tally.examples) < EXAMPLES or tally.count % 100 == 0:
            example = self._example(self._cur_message, wall, detail)
        self._count(dev, kind, wall, example)

    def _count(
        self, dev: _Device, kind: Kind, wall: dt.datetime, example: dict[str, Any] | None
    ) -> None:
        kinds = dev.kinds
        if kinds is None:
            kinds = dev.kinds = {}
        tally = kinds.get(kind)
        if tally is None:
            tally = kinds[kind] = _Tally(wall)
        tally.count += 1
        tally.last = wall
        command = example.get("command") if example is not None else self._cur_command
        tolerated = self.tolerates is not None and self.tolerates(
            dev.device_id, kind.value, command
        )
        if tolerated:
            tally.tolerated += 1
        if example is not None:
            if tolerated:
                example["tolerated"] = True
            tally.examples.insert(0, example)
            del tally.examples[EXAMPLES:]
        try:  # never_fails, inlined (a deviation per frame is common)
            key = (dev.protocol, kind.value)
            counter = self._deviation_counters.get(key)
            if counter is None:
                labels = self.metrics.protocol_deviations_total.labels
                counter = self._deviation_counters[key] = labels(*key)
            counter.inc()
        except Exception:
            update_failed()

    # -- the flush --

    async def run(self) -> None:
        """Every ``flush_s``: look for overdue heartbeats, add the counts to the
        database (an owned task of the gateway; a failed flush is retried next time)."""
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                self.check_missing()
                await self.flush()
            except Exception as exc:
                log.warning("compliance counts not written yet, retrying", error=str(exc))

    async def flush(self) -> int:
        """Add the counts since the last flush to the database; returns the rows written.
        Counts that could not be written are kept for the next flush."""
        for dev in self._devices.values():
            if dev.dirty:
                self._keep(dev.detach())
        retired, self._retired = self._retired, []
        for dev in retired:
            self._keep(dev)
        if not self._unsaved:
            return 0
        pool = self._pool()
        if pool is None:
            return 0
        batch, self._unsaved = self._unsaved, {}
        committed = False
        try:
            async with pool.acquire(timeout=5) as conn:
                async with conn.transaction():
                    await self._resolve(conn, batch.values())
                    written = await _write(conn, list(batch.values()))
                committed = True
            return written
        except BaseException:
            # kept for the next flush only if not written: a flush cancelled after the
            # commit (the gateway stopping while the connection went back to the pool)
            # counted its batch twice
            if not committed:
                for dev in batch.values():
                    self._keep(dev)
            raise

    def _keep(self, dev: _Device) -> None:
        key = dev.key()
        kept = self._unsaved.get(key)
        if kept is None:
            self._unsaved[key] = dev
        else:
            kept.merge(dev)

    async def _resolve(self, conn: Connection, devices: Iterable[_Device]) -> None:
        """Fill in the device type and firmware the frames did not tell, from the
        ``devices`` and ``gateways`` tables (``""`` when neither knows)."""
        unknown = [d for d in devices if d.firmware is None or d.device_type is None]
        if not unknown:
            return
        ids = list({d.device_id for d in unknown})
        rows = await conn.fetch(
            """SELECT d.device_id AS id, d.protocol, d.device_type, d.firmware,
                      d.socket_no IS NOT NULL AS socket, d.port_count
               FROM devices d WHERE d.device_id = ANY($1::text[])
               UNION ALL
               SELECT g.gateway_id, g.protocol, NULL, g.firmware, false, NULL
               FROM gateways g WHERE g.gateway_id = ANY($1::text[])
                 AND NOT EXISTS (SELECT 1 FROM devices d WHERE d.device_id = g.gateway_id)""",
            ids,
        )
        known: dict[str, tuple[str, str, int | None]] = {}
        for row in rows:
            if row["device_type"] is not None:
                device_type = _ap3000_type(row["device_type"])
            elif row["socket"]:
                device_type = "socket"
            else:
                device_type = "gateway" if row["protocol"] == "bkv" else ""
            known[row["id"]] = (device_type, row["firmware"] or "", row["port_count"])
        for dev in unknown:
            device_type, firmware, ports = known.get(dev.device_id, ("", "", None))
            dev.device_type = dev.device_type if dev.device_type is not None else device_type
            dev.firmware = dev.firmware if dev.firmware is not None else firmware
            live = self._devices.get(dev.device_id)
            if live is not None and live.firmware is None and firmware:
                # the frames since did not tell either: take what the database knows
                live.device_type, live.firmware = dev.device_type, dev.firmware
                live.port_count = live.port_count or ports


_UPSERT_FRAMES = """
INSERT INTO compliance_frames AS c (protocol, device_type, firmware, device_id, frames,
                                    first_seen, last_seen)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                     $6::timestamptz[], $7::timestamptz[])
ON CONFLICT (device_id, protocol, device_type, firmware) DO UPDATE
SET frames = c.frames + EXCLUDED.frames,
    first_seen = least(c.first_seen, EXCLUDED.first_seen),
    last_seen = greatest(c.last_seen, EXCLUDED.last_seen)
"""

_UPSERT_DEVIATIONS = (
    """
INSERT INTO compliance_deviations AS c (protocol, device_type, firmware, device_id, kind,
                                        count, tolerated, first_seen, last_seen, examples)
SELECT p, t, f, d, k, n, tol, fs, ls, ex::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
            $7::bigint[], $8::timestamptz[], $9::timestamptz[], $10::text[])
     AS u(p, t, f, d, k, n, tol, fs, ls, ex)
ON CONFLICT (device_id, protocol, device_type, firmware, kind) DO UPDATE
SET count = c.count + EXCLUDED.count,
    tolerated = c.tolerated + EXCLUDED.tolerated,
    first_seen = least(c.first_seen, EXCLUDED.first_seen),
    last_seen = greatest(c.last_seen, EXCLUDED.last_seen),
    examples = (SELECT coalesce(jsonb_agg(e ORDER BY n), '[]'::jsonb)
                FROM jsonb_array_elements(EXCLUDED.examples || c.examples)
                     WITH ORDINALITY AS x(e, n)
                WHERE n <= """
    + str(EXAMPLES)
    + """)
"""
)


async def _write(conn: Connection, devices: list[_Device]) -> int:
    frames: list[list[Any]] = [[] for _ in range(7)]
    deviations: list[list[Any]] = [[] for _ in range(10)]
    for dev in devices:
        head = (dev.protocol, dev.device_type or "", dev.firmware or "", dev.device_id)
        if dev.frames and dev.first is not None and dev.last is not None:
            for column, value in zip(frames, (*head, dev.frames, dev.first, dev.last), strict=True):
                column.append(value)
        for kind, tally in (dev.kinds or {}).items():
            values = (
                *head,
                kind.value,
                tally.count,
                tally.tolerated,
                tally.first,
                tally.last,
                json.dumps(tally.examples),
            )
            for column, value in zip(deviations, values, strict=True):
                column.append(value)
    if frames[0]:
        await conn.execute(_UPSERT_FRAMES, *frames)
    if deviations[0]:
        await conn.execute(_UPSERT_DEVIATIONS, *deviations)
    return len(frames[0]) + len(deviations[0])


# ----------------------------------------------------------------------- the reports


class ExampleFrame(BaseModel):
    """A frame that showed a deviation."""

    at: dt.datetime = Field(description="when the gateway received it (or found the deviation)")
    direction: str = Field(examples=["in"])
    command: str | None = Field(description="the frame's command, if it decoded", examples=["0x20"])
    hex: str | None = Field(
        description="the frame, hex, personal data masked (`**`); null when only its id is "
        "known (a deviation the database found)"
    )
    frame_id: int | None = Field(description="the audit frame's id, when known")
    detail: str = Field(examples=["Registration ends before power_board_version"])
    tolerated: bool = Field(False, description="a quirk profile of the device expects it")


class Deviation(BaseModel):
    """One kind of deviation, summed."""

    kind: Kind
    count: int
    tolerated: int = Field(description="how many of them a quirk profile of the device expects")
    weight: int = Field(description="its weight in the score (docs/compliance.md)")
    first_seen: dt.datetime
    last_seen: dt.datetime
    examples: list[ExampleFrame] = Field(description="the newest frames that showed it")


class FirmwareCompliance(BaseModel):
    """How one (protocol, device type, firmware) keeps to the protocol."""

    protocol: str = Field(examples=["ap3000"])
    device_type: str = Field(
        description="AP3000: the 0x20 device type (`0x27`), `host`; BKV: `socket`, "
        "`gateway`; empty when unknown",
        examples=["0x27"],
    )
    firmware: str = Field(description="the firmware version; empty when unknown", examples=["312"])
    devices: int = Field(description="devices counted under it")
    frames: int = Field(description="inbound frames counted, valid or not")
    deviations: int = Field(description="deviations counted, every kind")
    weighted: int = Field(description="deviations times their weights")
    score: float = Field(
        description="100 minus the weighted deviations per 1,000 frames, at least 0",
        examples=[99.2],
    )
    top: list[Deviation] = Field(description="the kinds with the most weight, heaviest first")


class DeviceCompliance(BaseModel):
    """One device, per firmware it was counted under."""

    device_id: str
    firmwares: list[FirmwareCompliance]


async def report(
    conn: Connection,
    *,
    protocol: str | None = None,
    firmware: str | None = None,
    device_id: str | None = None,
    top: int = TOP,
) -> list[FirmwareCompliance]:
    """Per (protocol, device type, firmware): devices, frames, score and the heaviest
    deviations with examples; lowest score first. Filters narrow the rows counted."""
    where = """($1::text IS NULL OR protocol = $1) AND ($2::text IS NULL OR firmware = $2)
               AND ($3::text IS NULL OR device_id = $3)"""
    groups = await conn.fetch(
        f"""SELECT protocol, device_type, firmware, count(DISTINCT device_id) AS devices,
                   sum(frames)::bigint AS frames
            FROM compliance_frames WHERE {where}
            GROUP BY protocol, device_type, firmware""",
        protocol,
        firmware,
        device_id,
    )
    kinds = await conn.fetch(
        f"""SELECT protocol, device_type, firmware, kind, sum(count)::bigint AS count,
                   sum(tolerated)::bigint AS tolerated, min(first_seen) AS first_seen,
                   max(last_seen) AS last_seen,
                   (array_agg(examples ORDER BY last_seen DESC))[1] AS examples,
                   count(DISTINCT device_id) AS devices
            FROM compliance_deviations WHERE {where}
            GROUP BY protocol, device_type, firmware, kind""",
        protocol,
        firmware,
        device_id,
    )
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for g in groups:
        found[(g["protocol"], g["device_type"], g["firmware"])] = {
            "devices": g["devices"],
            "frames": g["frames"],
            "kinds": [],
        }
    for k in kinds:
        entry = found.setdefault(
            (k["protocol"], k["device_type"], k["firmware"]),
            {"devices": k["devices"], "frames": 0, "kinds": []},
        )
        try:
            kind = Kind(k["kind"])
        except ValueError:  # a kind a newer version stored
            continue
        examples = k["examples"]
        if isinstance(examples, str):
            examples = json.loads(examples)
        entry["kinds"].append(
            Deviation(
                kind=kind,
                count=k["count"],
                tolerated=k["tolerated"],
                weight=WEIGHTS[kind],
                first_seen=k["first_seen"],
                last_seen=k["last_seen"],
                examples=[ExampleFrame(**e) for e in examples[:EXAMPLES]],
            )
        )
    out = []
    for (proto, device_type, fw), entry in found.items():
        deviations: list[Deviation] = entry["kinds"]
        deviations.sort(key=lambda d: (-d.count * d.weight, d.kind.value))
        weighted = sum(d.count * d.weight for d in deviations)
        out.append(
            FirmwareCompliance(
                protocol=proto,
                device_type=device_type,
                firmware=fw,
                devices=entry["devices"],
                frames=entry["frames"],
                deviations=sum(d.count for d in deviations),
                weighted=weighted,
                score=score(entry["frames"], weighted),
                top=deviations[:top],
            )
        )
    out.sort(key=lambda f: (f.score, f.protocol, f.device_type, f.firmware))
    return out


async def device_report(
    conn: Connection, device_id: str, *, top: int = len(Kind)
) -> DeviceCompliance | None:
    """One device's counts per firmware (every kind by default); None if none."""
    firmwares = await report(conn, device_id=device_id, top=top)
    if not firmwares:
        return None
    return DeviceCompliance(device_id=device_id, firmwares=firmwares)
