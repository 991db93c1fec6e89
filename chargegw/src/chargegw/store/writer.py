"""Batched persistence: state and audit rows are written in one transaction per batch.

Frame-rate data is not written one round trip per frame. Callers ``put_*`` typed rows
(``GatewayRow``, ``DeviceRow``, ``PortRow``, ``EventRow``, ``FrameRow``, ``SessionRow``:
one class per table, field names are column names, so a misspelt column fails when the
row is built) into the writer without awaiting; a background task flushes every
``interval_s`` or as soon as ``batch_rows`` rows wait. Device, gateway and port state is
coalesced by key (only the newest values matter), events and frames are appended.

If PostgreSQL goes away, or refuses every statement (a read-only standby after a
failover, a full disk, missing permissions: see ``store/errors.py``), rows stay in memory
and the flush is retried with backoff; ``healthy`` turns False and ``last_error`` says why
(readiness reports it). The buffer is bounded: above ``limit`` rows ``overloaded`` turns
True and the transport pauses reading from the devices until the backlog drains, so
nothing accepted is ever dropped. Only a row whose own values the database refuses
(SQLSTATE classes 22 and 23) is set aside: the batch is written row by row and each such
row goes to the ``rejected_rows`` table with the error, counted in
``db_rows_rejected_total``; the rows around it are written.

``after_commit(callback)`` runs ``callback`` once every row put before it is
committed (or set aside as rejected): a settlement is acknowledged to its device only then.

State that did not change is not written again: a device, gateway or port row with the
same values as the last one put for the same key is not upserted again until
``refresh_s`` has passed. Only its timestamps (``last_seen_at``, ``last_heartbeat_at``,
``reported_at``) move, and those are *touched*: one ``UPDATE ... FROM unnest(...)`` per
table and batch, far cheaper than an upsert per row. A periodic report that repeats the
last one moves one time for all its ports, on the device (``touch_ports``; the API reads a
port's time as the greater of its own and its device's). A heartbeat that says "still
here, nothing new" costs its audit rows and one touch of its device.

A state row is compared with the last row put for the same key (whatever its columns),
so a row that undoes a change in between (offline, online, offline again) is written.
An offline row names the connection that went away and only takes effect while the row
still names that connection: a late offline from an old connection (here or in another
process) cannot hide a newer one.

Session-directory rows (which process holds which device) go through the same batches,
stamped with *database* time: ``since`` is the server's ``now()`` minus the age of the
bind on this process's monotonic clock, so nodes with skewed clocks still order their
binds correctly, and a bind held during an outage keeps its true moment. The newest bind
wins; ``on_sessions`` hears after the commit which binds took effect (with their
``since``) and which lost to a newer one. Binding a device counts its (re)connections,
and a device that reconnects more than ``FlapPolicy.max_connects`` times in ``window_s``
is banned for ``ban_s`` in the same transaction (``on_banned`` hears of it after the
commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import operator
import time
from array import array
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import asyncpg
import structlog

from chargegw.audit import mask_text
from chargegw.causes import current as current_cause
from chargegw.metrics import Metrics
from chargegw.store.causes import FrameIds
from chargegw.store.database import Connection
from chargegw.store.errors import describe, is_row_error, is_unavailable, reason, sqlstate
from chargegw.store.values import safe_json, safe_text

log = structlog.get_logger("chargegw.writer")

# -- the rows: one class per table, field names are column names --
#
# In a state row (gateways, devices, ports) None means "not reported": the stored value
# is kept. A misspelt column is a TypeError when the row is built (and a mypy error).
# NamedTuples, not frozen dataclasses: as safe (immutable, typed, no unknown fields) at a
# third to a half of the cost per row on the per-frame path (docs/benchmarks.md).


class GatewayRow(NamedTuple):
    """A ``gateways`` row (an AP3000 host or a BKV gateway); None keeps the stored value."""

    gateway_id: str
    owner: str | None = None
    protocol: str | None = None
    iccid: str | None = None
    imei: str | None = None
    firmware: str | None = None
    online: bool | None = None
    connection_id: str | None = None
    node: str | None = None
    remote_addr: str | None = None
    connected_at: datetime | None = None
    last_seen_at: datetime | None = None


class DeviceRow(NamedTuple):
    """A ``devices`` row; None keeps the stored value, ``attributes`` are merged into the
    stored ones. An offline row (``online`` False) names the connection that went away."""

    device_id: str
    protocol: str | None = None
    gateway_id: str | None = None
    phy_id: str | None = None
    socket_no: int | None = None
    device_type: int | None = None
    firmware: str | None = None
    port_count: int | None = None
    iccid: str | None = None
    online: bool | None = None
    offline_reason: str | None = None
    connection_id: str | None = None
    last_seen_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    signal_strength: int | None = None
    temperature_c: int | None = None
    voltage_v: float | None = None
    #: the ports its periodic report covers (bit ``port - 1``): a repeat of the report
    #: moves their report time on the device (``BatchWriter.touch_ports``)
    reported_ports: int | None = None
    attributes: dict[str, Any] | None = None


def port_mask(ports: Iterable[int]) -> int:
    """``DeviceRow.reported_ports`` of a report of ``ports`` (1-based). Ports past 31
    (no real device has them) are not covered: their time moves only when the report's
    rows are put again (at least every ``refresh_s``)."""
    mask = 0
    for port in ports:
        if 1 <= port <= 31:
            mask |= 1 << (port - 1)
    return mask


class PortRow(NamedTuple):
    """A ``ports`` row (``port`` 1-based); None keeps the stored value."""

    device_id: str
    port: int
    status: str | None = None
    status_code: int | None = None
    status_text: str | None = None
    power_w: float | None = None
    voltage_v: float | None = None
    current_a: float | None = None
    energy_kwh: float | None = None
    temperature_c: int | None = None
    order_ref: str | None = None
    reported_at: datetime | None = None
    device_time: datetime | None = None
    #: what changed the status (``chargegw.causes``; None: the ambient cause when put).
    #: Stored only with a change of status: the row keeps its last change's cause
    cause_kind: str | None = None
    cause_ref: str | None = None
    cause_frame_id: int | None = None


class EventRow(NamedTuple):
    """A ``device_events`` row: something that happened to a device, at ``at``."""

    device_id: str
    at: datetime
    kind: str
    reason: str | None = None
    detail: dict[str, Any] | None = None
    #: what caused it (``chargegw.causes``; None: the ambient cause when put)
    cause_kind: str | None = None
    cause_ref: str | None = None
    cause_frame_id: int | None = None


class FrameRow(NamedTuple):
    """A ``frames`` row: one frame in or out, its bytes as (masked) hex; ``id`` from the
    writer's :attr:`BatchWriter.frame_ids` (None: the database gives one)."""

    received_at: datetime
    connection_id: str
    device_id: str | None
    direction: str
    protocol: str | None
    command: str | None
    hex: str
    error: str | None = None
    id: int | None = None


def _columns(row_class: type[tuple[Any, ...]]) -> tuple[str, ...]:
    fields: tuple[str, ...] = row_class._fields  # type: ignore[attr-defined]
    return fields


GATEWAY_COLUMNS = _columns(GatewayRow)
DEVICE_COLUMNS = _columns(DeviceRow)
PORT_COLUMNS = _columns(PortRow)
EVENT_COLUMNS = _columns(EventRow)
FRAME_COLUMNS = _columns(FrameRow)


@dataclasses.dataclass(frozen=True)
class FlapPolicy:
    """When reconnecting counts as flapping; ``max_connects`` 0 turns detection off."""

    window_s: float = 300.0
    max_connects: int = 10
    ban_s: float = 600.0


@dataclasses.dataclass(frozen=True)
class SessionRow:
    """A device bound to (``bound``) or released from a process's connection; ``mono`` is
    when, on this process's monotonic clock (turned into database time when written)."""

    device_id: str
    owner: str
    connection_id: str
    remote: str
    mono: float
    bound: bool


@dataclasses.dataclass(frozen=True)
class BindResult:
    """What became of a bind: taken (``since`` set, database time) or lost to a newer
    bind of the same device (``since`` None)."""

    device_id: str
    connection_id: str
    since: datetime | None


#: columns that only say "seen again": a row differing only in these is not new
_FRESHNESS = frozenset({"last_seen_at", "last_heartbeat_at", "reported_at", "device_time"})
#: a state row's cause (the last columns of a row that has them): not part of its content
#: (every frame has its own), kept from the row that changed the status
_CAUSE = ("cause_kind", "cause_ref", "cause_frame_id")
#: remembered rows before the memory of unchanged state is reset
_MAX_REMEMBERED = 500_000


class _Stamps:
    """A map of ``hash()`` values to ``hash()`` values: the writer's memory of what it
    wrote, one entry per state row (and one per device's periodic report), kept for
    every device a process holds.

    Two arrays of 64-bit integers with linear probing: about 30 bytes an entry, where a
    dict took about 120 (its entry and two int objects): hundreds of bytes per idle pile.
    Neither a key nor a value is ever -1 (CPython's ``hash()`` never returns it): -1
    marks a free slot among the keys, and a forgotten entry among the values (its key
    stays until the next growth, so that the probe chains through it stay whole). A
    growth beyond ``_MAX_REMEMBERED`` live entries starts it empty instead (so it holds
    up to about one and a half times that). A growth rehashes in Python: a pause of
    tens of milliseconds near 100,000 entries (20,000 piles), once per doubling.
    """

    __slots__ = ("_keys", "_mask", "_used", "_values")

    def __init__(self) -> None:
        self.clear()

    def __len__(self) -> int:
        return self._used

    def clear(self) -> None:
        self._keys = array("q", [-1]) * 1024
        self._values = array("q", [-1]) * 1024
        self._mask = 1023
        #: slots taken, forgotten entries included
        self._used = 0

    def _slot(self, key: int) -> int:
        """The index of ``key``, or of the free slot it would take (value -1 there)."""
        keys = self._keys
        mask = self._mask
        i = key & mask
        while True:
            k = keys[i]
            if k in (key, -1):
                return i
            i = (i + 1) & mask

    def get(self, key: int) -> int:
        """The value of ``key``; -1 if there is none."""
        return self._values[self._slot(key)]

    def put(self, key: int, value: int) -> bool:
        """Set ``key`` to ``value`` (neither -1); True if that was its value already."""
        i = self._slot(key)
        values = self._values
        if self._keys[i] == key:
            if values[i] == value:
                return True
            values[i] = value
            return False
        self._keys[i] = key
        values[i] = value
        self._used += 1
        if self._used * 4 > self._mask * 3:  # at most three quarters full
            self._grow()
        return False

    def forget(self, key: int) -> None:
        """Drop ``key``'s value, if it has one (a free slot's is -1 already)."""
        if self._used:
            self._values[self._slot(key)] = -1

    def _grow(self) -> None:
        old_keys, old_values = self._keys, self._values
        live = len(old_values) - old_values.count(-1)  # forgotten entries are dropped
        if live > _MAX_REMEMBERED:
            self.clear()
            return
        size = self._mask + 1
        while live * 2 > size:  # at most half full after
            size *= 2
        self._keys = keys = array("q", [-1]) * size
        self._values = values = array("q", [-1]) * size
        self._mask = mask = size - 1
        for key, value in zip(old_keys, old_values, strict=True):
            if value != -1:
                i = key & mask
                while keys[i] != -1:
                    i = (i + 1) & mask
                keys[i] = key
                values[i] = value
        self._used = live


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    """The later of two optional times."""
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _content(values: tuple[Any, ...]) -> int:
    """A hash of a state row's values (its freshness columns left out by the caller)."""
    try:
        return hash(values)
    except TypeError:  # a dict (attributes): rare rows, hashed through JSON
        return hash(json.dumps(values, sort_keys=True, default=str))


#: NOT NULL columns with a default: a partial row inserts the default, updates keep the value
_DEFAULTS = {"online": "false", "attributes": "'{}'::jsonb"}


def _upsert_sql(table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    """An upsert where a NULL parameter means "keep what is stored".

    PostgreSQL checks NOT NULL on the proposed row before it resolves the conflict, so
    the inserted values fall back to the column defaults, while the update refers to
    the parameters themselves and keeps the stored value when one is NULL.

    In tables with ``online``, an offline row (``online`` false) names the connection
    that went away and changes nothing unless the stored row still names it (or none).
    In tables with a cause, the cause is stored only with a change of status.
    """
    names = ", ".join(columns)
    number = {column: f"${index}" for index, column in enumerate(columns, start=1)}
    values = []
    updates = []
    # an offline row from a connection that is no longer the device's (or gateway's)
    stale = None
    if "online" in columns:
        conn = number["connection_id"]
        stale = (
            f"({number['online']} = false AND {conn} IS NOT NULL"
            f" AND t.connection_id IS NOT NULL AND t.connection_id <> {conn})"
        )
    for column in columns:
        param = number[column]
        default = _DEFAULTS.get(column)
        values.append(f"COALESCE({param}, {default})" if default else param)
        if column in key:
            continue
        if column == "attributes":
            updates.append(f"attributes = t.attributes || COALESCE({param}, '{{}}'::jsonb)")
        elif column == "offline_reason" and stale:
            updates.append(
                f"offline_reason = CASE WHEN {stale} THEN t.offline_reason "
                f"WHEN {number['online']} THEN NULL "
                f"ELSE COALESCE({param}, t.offline_reason) END"
            )
        elif column in ("online", "connection_id", "owner") and stale:
            updates.append(
                f"{column} = CASE WHEN {stale} THEN t.{column} "
                f"ELSE COALESCE({param}, t.{column}) END"
            )
        elif column in _CAUSE:
            status = number["status"]
            updates.append(
                f"{column} = CASE WHEN {status} IS NOT NULL AND {status} IS DISTINCT FROM "
                f"t.status THEN {param} ELSE t.{column} END"
            )
        else:
            updates.append(f"{column} = COALESCE({param}, t.{column})")
    stamp = ", updated_at = now()" if table in ("gateways", "devices") else ""
    return (
        f"INSERT INTO {table} AS t ({names}) VALUES ({', '.join(values)}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {', '.join(updates)}{stamp}"
    )


#: columns an offline row for an old connection must not change in a newer row
_CONNECTION_STATE = ("online", "offline_reason", "connection_id", "owner")
#: columns whose text comes from the device and may hold any byte
_DEVICE_TEXT = ("iccid", "imei", "firmware")

_Row = TypeVar("_Row", GatewayRow, DeviceRow, PortRow)
#: a state row as the writer keeps it: its values in column order
_Values = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class _StateTable(Generic[_Row]):
    """How the rows of one state table are compared, coalesced and written. A row's
    values are read once, with ``operator.attrgetter`` (one C call), in column order."""

    #: the table's letter in the writer's memory of unchanged state (see ``forget``)
    memo: str
    columns: tuple[str, ...]
    sql: str
    #: the row's values, in column order
    values: Callable[[_Row], _Values]
    #: the row's values without its freshness columns
    content: Callable[[_Row], _Values]
    #: positions of ``online``, ``connection_id`` and ``attributes`` (None: no such column)
    online: int | None
    connection: int | None
    attributes: int | None
    #: positions of the connection-state columns and of the device-provided text columns
    connection_state: tuple[int, ...]
    texts: tuple[int, ...]
    #: position of ``status`` and the number of cause columns closing the row (0: none)
    status: int | None
    causes: int


def _state_table(
    memo: str, table: str, row_class: type[_Row], key: tuple[str, ...]
) -> _StateTable[_Row]:
    columns = _columns(row_class)
    position = {column: index for index, column in enumerate(columns)}
    return _StateTable(
        memo=memo,
        columns=columns,
        sql=_upsert_sql(table, columns, key),
        values=operator.attrgetter(*columns),
        content=operator.attrgetter(
            *(c for c in columns if c not in _FRESHNESS and c not in _CAUSE)
        ),
        online=position.get("online"),
        connection=position.get("connection_id"),
        attributes=position.get("attributes"),
        connection_state=tuple(position[c] for c in _CONNECTION_STATE if c in position),
        texts=tuple(position[c] for c in _DEVICE_TEXT if c in position),
        status=position.get("status"),
        causes=len(_CAUSE) if columns[-len(_CAUSE) :] == _CAUSE else 0,
    )


_GATEWAYS = _state_table("g", "gateways", GatewayRow, ("gateway_id",))
_DEVICES = _state_table("d", "devices", DeviceRow, ("device_id",))
_PORTS = _state_table("p", "ports", PortRow, ("device_id", "port"))
_FRAME_VALUES: Callable[[FrameRow], _Values] = operator.attrgetter(*FRAME_COLUMNS)
#: the state tables by name (``BatchWriter.pending``)
StateTableName = Literal["gateways", "devices", "ports"]
_STATE_TABLES: dict[str, _StateTable[Any]] = {
    "gateways": _GATEWAYS,
    "devices": _DEVICES,
    "ports": _PORTS,
}


def _merge(table: _StateTable[Any], old: _Values | None, new: _Values) -> _Values:
    """Values ``new`` put after ``old`` (same key, same batch): the reported ones win."""
    if old is None:
        return new
    online, connection = table.online, table.connection
    if (
        online is not None
        and connection is not None
        and new[online] is False
        and old[online] is True
        and new[connection] not in (None, old[connection])
    ):  # the old connection went offline after the newer one came online
        masked = list(new)
        for index in table.connection_state:
            masked[index] = None
        new = tuple(masked)
    merged = [o if n is None else n for o, n in zip(old, new, strict=True)]
    at = table.attributes
    if at is not None and old[at] and new[at] is not None:
        merged[at] = {**old[at], **new[at]}
    status = table.status
    if table.causes and status is not None and new[status] in (None, old[status]):
        # the newer row did not change the status: the cause is the row's that did
        merged[-table.causes :] = old[-table.causes :]
    return tuple(merged)


def _params(table: _StateTable[Any], values: _Values) -> _Values:
    """A row's values as statement parameters: device-provided text made storable (see
    ``store/values.py``), attributes as JSON."""
    if not table.texts and table.attributes is None:
        return values
    out = list(values)
    for index in table.texts:
        text = out[index]
        if isinstance(text, str):
            out[index] = safe_text(text)
    at = table.attributes
    if at is not None and out[at]:
        out[at] = safe_json(out[at])
    return tuple(out)


def _reported(table: _StateTable[Any], values: _Values) -> dict[str, Any]:
    """The reported columns of a row (for ``rejected_rows``)."""
    return {c: v for c, v in zip(table.columns, values, strict=True) if v is not None}


@dataclasses.dataclass
class _Batch:
    #: state rows (values in column order), one per key: the newest values coalesced
    gateways: dict[str, _Values] = dataclasses.field(default_factory=dict)
    devices: dict[str, _Values] = dataclasses.field(default_factory=dict)
    ports: dict[tuple[str, int], _Values] = dataclasses.field(default_factory=dict)
    #: records in column order, ready for COPY
    events: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    frames: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    #: directory rows: a device's latest bind (key: device id) and its releases (key:
    #: device id and connection id); binds are written before releases
    sessions: dict[Any, SessionRow] = dataclasses.field(default_factory=dict)
    #: timestamps only: key -> (last_seen_at, last_heartbeat_at, ports_reported_at) /
    #: last_seen_at / reported_at
    touched_devices: dict[str, tuple[Any, Any, Any]] = dataclasses.field(default_factory=dict)
    touched_gateways: dict[str, Any] = dataclasses.field(default_factory=dict)
    touched_ports: dict[tuple[str, int], Any] = dataclasses.field(default_factory=dict)
    callbacks: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def rows(self) -> int:
        return (
            len(self.sessions)
            + len(self.touched_devices)
            + len(self.touched_gateways)
            + len(self.touched_ports)
            + len(self.gateways)
            + len(self.devices)
            + len(self.ports)
            + len(self.events)
            + len(self.frames)
        )

    def absorb(self, newer: _Batch) -> None:
        """Fold a newer batch into this (older, unwritten) one, keeping order."""
        for gid, gateway in newer.gateways.items():
            self.gateways[gid] = _merge(_GATEWAYS, self.gateways.get(gid), gateway)
        for did, device in newer.devices.items():
            self.devices[did] = _merge(_DEVICES, self.devices.get(did), device)
        for key, port in newer.ports.items():
            self.ports[key] = _merge(_PORTS, self.ports.get(key), port)
        self.events.extend(newer.events)
        self.frames.extend(newer.frames)
        for session in newer.sessions.values():
            _add_session(self.sessions, session)
        for did, (seen, beat, ports) in newer.touched_devices.items():
            old = self.touched_devices.get(did, (None, None, None))
            self.touched_devices[did] = (
                _later(seen, old[0]),
                _later(beat, old[1]),
                _later(ports, old[2]),
            )
        self.touched_gateways.update(newer.touched_gateways)
        self.touched_ports.update(newer.touched_ports)
        self.callbacks.extend(newer.callbacks)


def _add_session(sessions: dict[Any, SessionRow], row: SessionRow) -> None:
    """Add a bind or release to a batch's directory rows (see ``_Batch.sessions``)."""
    if row.bound:
        # a bind after a release of the same connection: the release is over
        sessions.pop((row.device_id, row.connection_id), None)
        sessions[row.device_id] = row
    else:
        sessions[(row.device_id, row.connection_id)] = row


class BatchWriter:
    """Collects rows from the event loop and writes them in batches (see module doc)."""

    def __init__(
        self,
        pool_factory: Callable[[], asyncpg.Pool | None],
        metrics: Metrics,
        *,
        batch_rows: int = 500,
        interval_s: float = 0.1,
        limit: int = 100000,
        refresh_s: float = 0.0,
    ) -> None:
        self._pool_factory = pool_factory
        #: the ids of the frames this process puts (started with the gateway)
        self.frame_ids = FrameIds(pool_factory)
        #: unchanged state is written again after this long (0: always written)
        self.refresh_s = refresh_s
        #: hash of (table, row key) -> stamp of the row last put (``_unchanged``)
        self._remembered = _Stamps()
        #: hash of a device id -> key of its last periodic report whose rows were put
        #: (``repeated``)
        self._repeats = _Stamps()
        #: device -> how often it was forgotten (part of its ports' stamps)
        self._forgotten: dict[str, int] = {}
        self._metrics = metrics
        self.batch_rows = batch_rows
        self.interval_s = interval_s
        self.limit = limit
        self._pending = _Batch()
        self._failed: _Batch | None = None
        #: puts since the last take (at least the pending rows: puts coalesce) and the
        #: rows of the failed batch: the cheap test of ``_added``
        self._puts = 0
        self._failed_rows = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.healthy = True
        self.last_error: str | None = None
        #: called with True when the backlog passes ``limit``, False when it drains
        self.on_overload: Callable[[bool], None] = lambda overloaded: None
        self.overloaded = False
        self.flap_policy = FlapPolicy()
        #: called after a commit with the devices that were just banned for flapping
        self.on_banned: Callable[[list[str]], None] = lambda device_ids: None
        #: called after a commit with what became of the directory binds it wrote
        self.on_sessions: Callable[[list[BindResult]], None] = lambda results: None

    # -- putting rows (synchronous: called from protocol callbacks) --

    def put_gateway(self, row: GatewayRow) -> None:
        """A gateway's state (coalesced with the rows put before it for the gateway)."""
        key = row.gateway_id
        if self._unchanged(_GATEWAYS, key, row):
            if row.last_seen_at is not None:
                self._pending.touched_gateways[key] = row.last_seen_at
                self._added()
            return
        pending = self._pending.gateways
        pending[key] = _merge(_GATEWAYS, pending.get(key), _GATEWAYS.values(row))
        self._added()

    def put_device(self, row: DeviceRow) -> None:
        """A device's state (coalesced with the rows put before it for the device)."""
        key = row.device_id
        if self._unchanged(_DEVICES, key, row):
            if row.last_seen_at is not None or row.last_heartbeat_at is not None:
                self.touch_device(key, row.last_seen_at, row.last_heartbeat_at)
            return
        pending = self._pending.devices
        pending[key] = _merge(_DEVICES, pending.get(key), _DEVICES.values(row))
        self._repeats.forget(hash(key))
        self._added()

    def put_port(self, row: PortRow) -> None:
        """A port's state (coalesced with the rows put before it for the port)."""
        key = (row.device_id, row.port)
        if self._unchanged(_PORTS, key, row):
            if row.reported_at is not None:
                self._pending.touched_ports[key] = row.reported_at
                self._added()
            return
        values = _PORTS.values(row)
        if row.cause_kind is None:
            cause = current_cause()
            if cause is not None:
                values = values[: -_PORTS.causes] + cause
        pending = self._pending.ports
        pending[key] = _merge(_PORTS, pending.get(key), values)
        self._repeats.forget(hash(row.device_id))
        self._added()

    def touch_device(
        self,
        device_id: str,
        seen: datetime | None,
        beat: datetime | None,
        ports: datetime | None = None,
    ) -> None:
        """Move only the device's ``last_seen_at``/``last_heartbeat_at`` (and
        ``ports_reported_at``: :meth:`touch_ports`) forward."""
        touched = self._pending.touched_devices
        old = touched.get(device_id)
        if old is not None:
            seen = _later(seen, old[0])
            beat = _later(beat, old[1])
            ports = _later(ports, old[2])
        touched[device_id] = (seen, beat, ports)
        self._added()

    def _unchanged(self, table: _StateTable[_Row], key: Any, row: _Row) -> bool:
        """True if the last row put for ``key`` had the same values (timestamps aside)
        and was put less than ``refresh_s`` ago; otherwise remember this one. Compared
        with the last row of the key whatever it reported, so a row that undoes a change
        in between is written again."""
        if self.refresh_s <= 0:
            return False
        slot = hash((table.memo, key))
        # one int per row: the content and the refresh period it was written in (each
        # key with its own phase, so the rewrites of many devices do not coincide)
        period = int(time.monotonic() / self.refresh_s + (slot % 997) / 997)
        # a port's memory ends with its device's (``forget("d")``): the generation
        forgotten = self._forgotten.get(key[0], 0) if self._forgotten and table is _PORTS else 0
        stamp = hash((_content(table.content(row)), period, forgotten))
        return self._remembered.put(slot, stamp)

    def put_event(self, row: EventRow) -> None:
        """An event of a device (appended; ``detail`` is serialised now)."""
        cause: tuple[Any, ...] = (row.cause_kind, row.cause_ref, row.cause_frame_id)
        if row.cause_kind is None:
            cause = current_cause() or cause
        self._pending.events.append(
            (row.device_id, row.at, row.kind, row.reason, safe_json(row.detail or {}), *cause)
        )
        self._added()

    def put_frame(self, row: FrameRow) -> None:
        """A frame in or out (appended); its ``id`` from :attr:`frame_ids`, given by the
        caller, which may name the frame as a cause before it is written."""
        self._pending.frames.append(_FRAME_VALUES(row))
        self._added()

    def put_session(self, row: SessionRow) -> None:
        """Record a device bound to (or released from) a connection of this process."""
        _add_session(self._pending.sessions, row)
        self._added()

    def forget(self, table: str, key: Any) -> None:
        """Forget the last row put for ``key`` (``"d"`` devices, ``"g"`` gateways, ``"p"``
        ports): something else wrote that row, so the next put is written whatever it
        holds."""
        self._remembered.forget(hash((table, key)))
        if table == "d":  # and its ports' (their keys are not enumerable: a generation)
            if len(self._forgotten) >= _MAX_REMEMBERED:
                self._forgotten.clear()
                self._remembered.clear()  # stamps of older generations must not match
            self._forgotten[key] = self._forgotten.get(key, 0) + 1
            self._repeats.forget(hash(key))
        elif table == "p":
            self._repeats.forget(hash(key[0]))

    def repeated(self, device_id: str, *content: Any) -> tuple[bool, int]:
        """Whether a device's periodic report made of ``content`` repeats the last one
        remembered with :meth:`remember_repeat`, and the key to remember it by.

        True means: the rows that report put have not changed since (any changed row
        of the device's forgets the memory), so putting them again would only move
        their timestamps (:meth:`touch_ports`). The key changes every half
        ``refresh_s`` (per device phase): the rows are still put, and so rewritten,
        within one and a half refresh periods (and a report interval). Never True
        without a refresh period. ``content`` should hold no negative integers: in
        CPython -1 and -2 hash alike (give the wire values, unsigned).
        """
        if self.refresh_s <= 0:
            return False, 0
        phase = (hash(device_id) % 997) / 997
        key = hash((content, int(time.monotonic() * 2.0 / self.refresh_s + phase)))
        return self._repeats.get(hash(device_id)) == key, key

    def remember_repeat(self, device_id: str, key: int) -> None:
        """The report of ``key`` (:meth:`repeated`) has put its rows."""
        if self.refresh_s <= 0:
            return
        self._repeats.put(hash(device_id), key)

    def touch_ports(self, device_id: str, reported_at: datetime) -> None:
        """The ports of a report :meth:`repeated` found repeated were reported again at
        ``reported_at``: one timestamp on the device (``ports_reported_at``, for the
        ports of its ``reported_ports``) instead of one per port, as putting its rows
        again would."""
        self.touch_device(device_id, None, None, reported_at)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after every row put so far is committed."""
        self._pending.callbacks.append(callback)
        self._idle.clear()
        self._wake.set()

    @property
    def backlog(self) -> int:
        """Rows waiting to be written."""
        failed = self._failed.rows() if self._failed else 0
        return self._pending.rows() + failed

    def pending(self, table: StateTableName) -> dict[Any, dict[str, Any]]:
        """The rows of ``table`` put since the last flush that wait to be upserted, by
        key, each as column -> value (a copy: for diagnostics and tests)."""
        state = _STATE_TABLES[table]
        rows: dict[Any, _Values] = getattr(self._pending, table)
        return {key: dict(zip(state.columns, row, strict=True)) for key, row in rows.items()}

    def pending_touches(self, table: StateTableName) -> dict[Any, Any]:
        """The timestamps of ``table`` put since the last flush that wait to be moved
        forward without an upsert (unchanged rows), by key (a copy)."""
        touched: dict[Any, Any] = getattr(self._pending, f"touched_{table}")
        return dict(touched)

    def _added(self) -> None:
        self._idle.clear()
        puts = self._puts = self._puts + 1
        upper = puts + self._failed_rows  # never below the backlog
        if upper < self.batch_rows and upper <= self.limit:
            return
        if puts & 63 and self._wake.is_set():
            return  # a flush is due already: the overload test every 64 puts is enough
        backlog = self.backlog
        if backlog >= self.batch_rows:
            self._wake.set()
        if backlog > self.limit and not self.overloaded:
            self.overloaded = True
            log.warning("write backlog over limit, pausing device reads", backlog=backlog)
            self.on_overload(True)

    # -- the flushing task --

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batch-writer")

    async def close(self, timeout: float = 10.0) -> None:
        """Flush what is pending (within ``timeout``) and stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                self._task.cancel()
                log.error("writer stopped with unwritten rows", backlog=self.backlog)
        await self.frame_ids.close()

    async def drained(self) -> None:
        """Wait until everything put so far is committed (tests, shutdown). Rows put
        meanwhile are not waited for: under steady traffic the writer is never idle."""
        if self._idle.is_set():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def committed() -> None:
            if not done.done():
                done.set_result(None)

        self.after_commit(committed)
        await done

    async def _run(self) -> None:
        delay = 0.0
        while True:
            with contextlib.suppress(TimeoutError):  # not wait_for: see domain/passes.py
                async with asyncio.timeout(delay or self.interval_s):
                    await self._wake.wait()
            self._wake.clear()
            batch = self._take()
            if batch.rows() == 0 and not batch.callbacks:
                self._idle.set()
                if self._closing:
                    return
                continue
            retry = await self._write(batch)
            if retry is None:
                delay = 0.0
                for callback in batch.callbacks:
                    try:
                        callback()
                    except Exception:
                        log.exception("after-commit callback failed")
                if self.overloaded and self.backlog < self.limit // 2:
                    self.overloaded = False
                    log.info("write backlog drained, resuming device reads")
                    self.on_overload(False)
                if self.backlog == 0:
                    self._idle.set()
                    if self._closing:
                        return
            else:
                self._failed = retry
                self._failed_rows = retry.rows()
                delay = min(max(delay * 2, 0.5), 5.0)
                if self._closing and delay >= 5.0:
                    return
            self._metrics.batch_queue_depth.set(self.backlog)
            self._metrics.db_buffered_rows.set(self.backlog)

    def _take(self) -> _Batch:
        """The rows to write next: a failed batch first, with newer rows folded in."""
        batch = self._failed or _Batch()
        self._failed = None
        self._failed_rows = 0
        batch.absorb(self._pending)
        self._pending = _Batch()
        self._puts = 0
        return batch

    def _holding(self, exc: BaseException, rows: int) -> None:
        """The database takes no statement now: say so once, keep the rows."""
        self._metrics.db_write_failures_total.inc()
        why = reason(exc)
        if self.healthy or self.last_error != why:
            if is_unavailable(exc):
                log.warning("database unavailable, holding rows", reason=why, rows=rows)
            else:  # a defect or an unexpected refusal: never drop rows for it
                log.error(
                    "database refused a batch for no row's fault, holding rows",
                    error=describe(exc),
                    rows=rows,
                    exc_info=exc,
                )
        self.healthy = False
        self.last_error = why

    async def _write(self, batch: _Batch, *, retried: bool = False) -> _Batch | None:
        """Write one batch in one transaction; returns what must be retried (None: done)."""
        pool = self._pool_factory()
        started = time.perf_counter()
        try:
            if pool is None:
                raise ConnectionError("no database pool")
            async with pool.acquire(timeout=5) as conn, conn.transaction():
                written = await _write_batch(conn, batch, self.flap_policy)
        except Exception as exc:
            if not is_row_error(exc) or pool is None:
                self._holding(exc, batch.rows())
                return batch
            if (
                not retried
                and getattr(exc, "sqlstate", None) == "23505"
                and await _drop_stored_frames(pool, batch)
            ):
                # a retry of a batch whose COMMIT went through unacknowledged: its frames
                # (ids given in process) are stored already; the rest is written again
                log.info("frames of a retried batch were stored already", rows=batch.rows())
                return await self._write(batch, retried=True)
            # one row's values are refused: retrying the batch would block every later
            # row, so write row by row and set aside only the refused ones
            self._metrics.db_write_failures_total.inc()
            log.warning(
                "database refused a row of a batch, writing rows one by one",
                error=describe(exc),
            )
            return await self._write_isolated(pool, batch)
        self._metrics.db_write_seconds.observe(time.perf_counter() - started)
        self._written(written)
        if not self.healthy:
            log.info("database writes recovered", rows=batch.rows())
        self.healthy = True
        self.last_error = None
        return None

    def _written(self, written: _Written) -> None:
        if written.banned:
            self.on_banned(written.banned)
        if written.binds:
            self.on_sessions(written.binds)

    async def _write_isolated(self, pool: asyncpg.Pool, batch: _Batch) -> _Batch | None:
        """Write ``batch`` one row at a time; refused rows go to ``rejected_rows``.
        Returns the rows not written yet (with the callbacks) if the database became
        unavailable on the way."""
        singles = _singles(batch)
        for index, (table, key, single) in enumerate(singles):
            try:
                async with pool.acquire(timeout=5) as conn, conn.transaction():
                    written = await _write_batch(conn, single, self.flap_policy)
            except Exception as exc:
                if not is_row_error(exc) or not await self._reject(pool, table, key, single, exc):
                    self._holding(exc, batch.rows())
                    remaining = _Batch(callbacks=batch.callbacks)
                    for _, _, rest in singles[index:]:
                        remaining.absorb(rest)
                    return remaining
                continue
            self._written(written)
        return None

    async def _reject(
        self, pool: asyncpg.Pool, table: str, key: str, single: _Batch, exc: BaseException
    ) -> bool:
        """Store a refused row in ``rejected_rows``; False if that failed too."""
        try:
            await pool.execute(
                """INSERT INTO rejected_rows (table_name, row_key, row_data, error, sqlstate)
                   VALUES ($1, $2, $3::jsonb, $4, $5)""",
                table,
                safe_text(key),
                safe_json(_row_data(single)),
                safe_text(str(exc)),
                sqlstate(exc),
                timeout=5,
            )
        except Exception as failure:
            log.warning("could not set a refused row aside", error=describe(failure))
            return False
        self._metrics.db_rows_rejected_total.labels(table=table).inc()
        # the row's values may be personal data: the log names the table and key only
        log.error(
            "row refused by the database, kept in rejected_rows",
            table=table,
            key=mask_text(key),
            error=describe(exc),
        )
        return True


@dataclasses.dataclass
class _Written:
    """What a committed batch reports back."""

    banned: list[str] = dataclasses.field(default_factory=list)
    binds: list[BindResult] = dataclasses.field(default_factory=list)


def _singles(batch: _Batch) -> list[tuple[str, str, _Batch]]:
    """``batch`` cut into one-row batches, each with its table and key."""
    out: list[tuple[str, str, _Batch]] = []
    out += [("gateways", k, _Batch(gateways={k: v})) for k, v in batch.gateways.items()]
    out += [("devices", k, _Batch(devices={k: v})) for k, v in batch.devices.items()]
    out += [("ports", f"{k[0]}/{k[1]}", _Batch(ports={k: v})) for k, v in batch.ports.items()]
    out += [("device_events", str(row[0]), _Batch(events=[row])) for row in batch.events]
    out += [("frames", str(row[1]), _Batch(frames=[row])) for row in batch.frames]
    out += [
        ("device_sessions", row.device_id, _Batch(sessions={k: row}))
        for k, row in batch.sessions.items()
    ]
    if batch.touched_devices or batch.touched_gateways or batch.touched_ports:
        touches = _Batch(
            touched_devices=batch.touched_devices,
            touched_gateways=batch.touched_gateways,
            touched_ports=batch.touched_ports,
        )
        out.append(("touches", "", touches))
    return out


def _row_data(single: _Batch) -> Any:
    """The content of a one-row batch, for ``rejected_rows``."""
    if single.gateways:
        return _reported(_GATEWAYS, next(iter(single.gateways.values())))
    if single.devices:
        return _reported(_DEVICES, next(iter(single.devices.values())))
    if single.ports:
        return _reported(_PORTS, next(iter(single.ports.values())))
    if single.events:
        return dict(zip(EVENT_COLUMNS, single.events[0], strict=True))
    if single.frames:
        return dict(zip(FRAME_COLUMNS, single.frames[0], strict=True))
    if single.sessions:
        return dataclasses.asdict(next(iter(single.sessions.values())))
    return {
        "touched_devices": len(single.touched_devices),
        "touched_gateways": len(single.touched_gateways),
        "touched_ports": len(single.touched_ports),
    }


# ``since`` and ``released_at`` are database time: now() minus the row's age on the
# writing process's monotonic clock; the newest bind of a device wins
_BIND_SQL = """
INSERT INTO device_sessions AS s (device_id, owner, connection_id, remote_addr, since,
                                  window_start, connects, updated_at)
SELECT d, o, c, r, now() - make_interval(secs => a), now() - make_interval(secs => a), 1,
       clock_timestamp()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[]) AS u(d, o, c, r, a)
ON CONFLICT (device_id) DO UPDATE SET
    owner = EXCLUDED.owner,
    connection_id = EXCLUDED.connection_id,
    remote_addr = EXCLUDED.remote_addr,
    since = EXCLUDED.since,
    released_at = NULL,
    lost_owner = NULL,
    updated_at = EXCLUDED.updated_at,
    connects = CASE WHEN s.window_start > EXCLUDED.since - make_interval(secs => $6)
                    THEN s.connects + 1 ELSE 1 END,
    window_start = CASE WHEN s.window_start > EXCLUDED.since - make_interval(secs => $6)
                        THEN s.window_start ELSE EXCLUDED.since END
WHERE s.since <= EXCLUDED.since
RETURNING device_id, connection_id, connects, since"""

# only the connection that holds the device releases it (a newer one may have taken it)
_RELEASE_SQL = """
UPDATE device_sessions AS s SET owner = NULL, connection_id = NULL,
       released_at = now() - make_interval(secs => u.a), updated_at = clock_timestamp()
FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) AS u(d, o, c, a)
WHERE s.device_id = u.d AND s.owner = u.o AND s.connection_id = u.c"""

_BAN_SQL = """
INSERT INTO device_bans (device_id, until, reason, connects)
SELECT d, now() + make_interval(secs => $3), 'flapping', n
FROM unnest($1::text[], $2::int[]) AS u(d, n)
ON CONFLICT (device_id) DO UPDATE SET until = EXCLUDED.until, reason = EXCLUDED.reason,
    connects = EXCLUDED.connects, created_at = now()"""


async def _write_sessions(
    conn: Connection, rows: list[SessionRow], policy: FlapPolicy, written: _Written
) -> None:
    """Bind and release directory rows; reports the binds' fate and flapping bans."""
    binds = [r for r in rows if r.bound]
    releases = [r for r in rows if not r.bound]
    now = time.monotonic()
    if binds:
        taken = await conn.fetch(
            _BIND_SQL,
            [r.device_id for r in binds],
            [r.owner for r in binds],
            [r.connection_id for r in binds],
            [r.remote for r in binds],
            [max(now - r.mono, 0.0) for r in binds],
            policy.window_s,
        )
        since = {(r["device_id"], r["connection_id"]): r["since"] for r in taken}
        written.binds = [
            BindResult(r.device_id, r.connection_id, since.get((r.device_id, r.connection_id)))
            for r in binds
        ]
        if policy.max_connects > 0:
            flapping = [(r["device_id"], r["connects"]) for r in taken]
            flapping = [(d, n) for d, n in flapping if n > policy.max_connects]
            if flapping:
                await conn.execute(
                    _BAN_SQL, [d for d, _ in flapping], [n for _, n in flapping], policy.ban_s
                )
                written.banned = [d for d, _ in flapping]
    if releases:
        await conn.execute(
            _RELEASE_SQL,
            [r.device_id for r in releases],
            [r.owner for r in releases],
            [r.connection_id for r in releases],
            [max(now - r.mono, 0.0) for r in releases],
        )


async def _write_touches(conn: Connection, batch: _Batch) -> None:
    """Timestamps only, one statement per table (never moving a timestamp back)."""
    if batch.touched_devices:
        ids = list(batch.touched_devices)
        await conn.execute(
            """UPDATE devices d SET
                   last_seen_at = GREATEST(d.last_seen_at, v.seen),
                   last_heartbeat_at = GREATEST(d.last_heartbeat_at, v.beat),
                   ports_reported_at = GREATEST(d.ports_reported_at, v.ports)
               FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[],
                           $4::timestamptz[]) AS v(id, seen, beat, ports)
               WHERE d.device_id = v.id""",
            ids,
            *(list(column) for column in zip(*batch.touched_devices.values(), strict=True)),
        )
    if batch.touched_gateways:
        await conn.execute(
            """UPDATE gateways g SET last_seen_at = GREATEST(g.last_seen_at, v.seen)
               FROM unnest($1::text[], $2::timestamptz[]) AS v(id, seen)
               WHERE g.gateway_id = v.id""",
            list(batch.touched_gateways),
            list(batch.touched_gateways.values()),
        )
    if batch.touched_ports:
        keys = list(batch.touched_ports)
        await conn.execute(
            """UPDATE ports p SET reported_at = GREATEST(p.reported_at, v.at)
               FROM unnest($1::text[], $2::int[], $3::timestamptz[]) AS v(id, port, at)
               WHERE p.device_id = v.id AND p.port = v.port""",
            [k[0] for k in keys],
            [k[1] for k in keys],
            list(batch.touched_ports.values()),
        )


async def _write_batch(conn: Connection, batch: _Batch, policy: FlapPolicy) -> _Written:
    """Write every row of ``batch``; returns what the directory rows came to."""
    written = _Written()
    if batch.sessions:
        await _write_sessions(conn, list(batch.sessions.values()), policy, written)
    if batch.gateways:
        await conn.executemany(
            _GATEWAYS.sql, [_params(_GATEWAYS, r) for r in batch.gateways.values()]
        )
    if batch.devices:
        await conn.executemany(_DEVICES.sql, [_params(_DEVICES, r) for r in batch.devices.values()])
    if batch.ports:
        await conn.executemany(_PORTS.sql, [_params(_PORTS, r) for r in batch.ports.values()])
    await _write_touches(conn, batch)
    if batch.events:
        await conn.copy_records_to_table(
            "device_events", records=batch.events, columns=list(EVENT_COLUMNS)
        )
    if batch.frames:
        await _copy_frames(conn, batch.frames)
    return written


_FRAME_ID = FRAME_COLUMNS.index("id")
_FRAME_AT = FRAME_COLUMNS.index("received_at")


async def _drop_stored_frames(pool: asyncpg.Pool, batch: _Batch) -> bool:
    """Remove from ``batch`` the frames whose (received_at, id) is stored already;
    whether there were any. Errors count as none (the caller goes on as before)."""
    keyed = [f for f in batch.frames if f[_FRAME_ID] is not None]
    if not keyed:
        return False
    try:
        async with pool.acquire(timeout=5) as conn:
            rows = await conn.fetch(
                """SELECT f.id, f.received_at FROM frames f
                     JOIN unnest($1::bigint[], $2::timestamptz[]) AS k(id, at)
                       ON f.id = k.id AND f.received_at = k.at""",
                [f[_FRAME_ID] for f in keyed],
                [f[_FRAME_AT] for f in keyed],
            )
    except Exception:
        return False
    stored = {(r["id"], r["received_at"]) for r in rows}
    if not stored:
        return False
    batch.frames = [f for f in batch.frames if (f[_FRAME_ID], f[_FRAME_AT]) not in stored]
    return True


_FRAME_COLUMNS_WITHOUT_ID = [c for c in FRAME_COLUMNS if c != "id"]


async def _copy_frames(conn: Connection, frames: list[tuple[Any, ...]]) -> None:
    """COPY the frames; those without an id (no epoch: a writer not started, or one used
    up while the database was away) get theirs from the table's sequence."""
    with_id = [f for f in frames if f[_FRAME_ID] is not None]
    if with_id:
        await conn.copy_records_to_table("frames", records=with_id, columns=list(FRAME_COLUMNS))
    if len(with_id) < len(frames):
        await conn.copy_records_to_table(
            "frames",
            records=[f[:_FRAME_ID] + f[_FRAME_ID + 1 :] for f in frames if f[_FRAME_ID] is None],
            columns=_FRAME_COLUMNS_WITHOUT_ID,
        )
