"""The events' runtime: ids in commit order, fan-out to stream subscribers, the pull API's
queries, and retention.

Events are rows written by database triggers in the transaction of the change they report
(``0012_events.sql``); a committed event has no ``id`` until ``sequence_events()`` gives
it one, one caller at a time, so ids grow in commit order and a reader that has seen id N
never later meets a smaller one.

One :class:`EventHub` per process holds a dedicated connection (not from the pool) that

- LISTENs on ``chargegw_events_new`` (an event was committed) and runs
  ``sequence_events()`` at once: at most one call in flight, run again when more
  notifications came meanwhile, and every ``sequence_s`` anyway (a notification sent
  while the connection was away is lost);
- LISTENs on ``chargegw_events`` (ids were given), reads the new events in id order,
  fans them out to the local stream subscribers and calls the wake-ups registered with
  :meth:`EventHub.add_wakeup` (the webhook engine);
- after losing the database, reconnects with backoff and catches up from the last id it
  fanned out, logging once per outage; it never takes the process down.

A subscriber has a bounded queue; one that does not keep up is disconnected (it
reconnects with ``Last-Event-ID`` and replays from the table), the others are unaffected.
A stream replays the events after a given id from the table, then switches to live ones
without a gap or a duplicate: once history is nearly read, the subscription goes live at
the hub's position of that moment, the rest of history up to that position is read, and
live events at or below the last id sent are dropped.

Retention deletes events older than ``retention_days`` in batches, oldest id first, one
process at a time, with the finished webhook deliveries of each; an event with a delivery
still open is kept until the delivery ends. ``event_retention`` records the
id up to which events were deleted, so a stream resumed from before it is told what it
lost.

:func:`event_json` is the one JSON shape of an event: the SSE ``data:``, the pull API's
items and the webhook body's ``data``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, NamedTuple

import asyncpg
import structlog

from chargegw.config import Settings
from chargegw.domain import event_types
from chargegw.domain.pages import Page, Where, page_of
from chargegw.metrics import Metrics
from chargegw.store.database import Connection
from chargegw.store.errors import DB_ERRORS, reason

__all__ = [
    "EVENTS_CHANNEL",
    "EVENTS_NEW_CHANNEL",
    "SUBJECTS",
    "EventFilter",
    "EventHub",
    "HubSettings",
    "Position",
    "Purged",
    "StreamClosedError",
    "StreamEvent",
    "Subscription",
    "control_frame",
    "event_json",
    "events_after",
    "get_event",
    "list_events",
    "position",
    "purge_batch",
    "sequence",
]

log = structlog.get_logger("chargegw.domain.events")

#: an event was committed (``emit_event``): sequence it
EVENTS_NEW_CHANNEL = "chargegw_events_new"
#: ids were given; the payload is the last one
EVENTS_CHANNEL = "chargegw_events"
#: what an event may concern, besides its type and time (columns of ``events``)
SUBJECTS = (
    "device_id",
    "gateway_id",
    "protocol",
    "port",
    "order_no",
    "command_id",
    "job_id",
    "frame_id",
)
_COLUMNS = "id, type, at, " + ", ".join(SUBJECTS) + ", data"

#: events ``sequence_events()`` numbers per call (it also makes their webhook
#: deliveries); after a call ran out of time, a quarter as many, down to the least, and
#: back up by doubling after each call that went through
SEQUENCE_BATCH = 10000
SEQUENCE_BATCH_LEAST = 100
#: events read from the table per query (fan-out, replay)
READ_PAGE = 1000
#: the longest any of the hub's statements may run
STATEMENT_TIMEOUT_S = 30.0
#: how often retention runs (the first pass runs shortly after the start)
RETENTION_EVERY_S = 3600.0
RETENTION_FIRST_S = 60.0
#: events deleted per retention transaction
RETENTION_BATCH = 5000
#: only one process deletes expired events at a time (``pg_try_advisory_xact_lock``)
_RETENTION_LOCK = 0x43474556  # "CGEV"
#: reconnecting after losing the database: first and longest wait
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 5.0
#: a connection that served this long before failing counts as a new outage (no backoff)
_STABLE_S = 10.0


# ---------------------------------------------------------------- the event's JSON


def _data(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else {"value": value}


def _timestamp(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return value


def event_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object of one event (a row of ``events``): ``id``, ``type``, ``at`` (ISO
    8601, UTC), the subjects (:data:`SUBJECTS`, null where they do not apply), then the
    keys of its ``data``. A data key never replaces one of those (a card swipe's ``port``
    is the subject's port)."""
    out: dict[str, Any] = {"id": row["id"], "type": row["type"], "at": _timestamp(row["at"])}
    for name in SUBJECTS:
        out[name] = row[name]
    for key, value in _data(row["data"]).items():
        out.setdefault(key, value)
    return out


def _sse(event: str, data: Mapping[str, Any], event_id: int | None = None) -> bytes:
    # compact JSON has no raw newline (they are escaped in strings): one `data:` line
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {text}\n\n".encode()


def control_frame(name: str, data: Mapping[str, Any]) -> bytes:
    """A message of the stream itself (``stream.gap``, ``stream.reset``): no ``id:``
    line, so a client's last event id stays that of the last event it received."""
    return _sse(name, data)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamEvent:
    """A sequenced event as the stream sends it, with what filters look at."""

    id: int
    type: str
    device_id: str | None
    gateway_id: str | None
    protocol: str | None
    at: dt.datetime | None
    #: ``id:``, ``event:`` and ``data:`` lines, rendered once for every subscriber
    frame: bytes

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StreamEvent:
        """The stream's view of a row of ``events``."""
        body = event_json(row)
        return cls(
            row["id"],
            row["type"],
            row["device_id"],
            row["gateway_id"],
            row["protocol"],
            row["at"],
            _sse(row["type"], body, row["id"]),
        )


# ---------------------------------------------------------------- filters


@dataclasses.dataclass(frozen=True)
class EventFilter:
    """Which events a client wants, as webhook subscriptions choose them: type patterns
    (``*`` is any run of characters), device ids, gateway ids, a protocol. Empty: any."""

    types: tuple[str, ...] = ()
    device_ids: frozenset[str] = frozenset()
    gateway_ids: frozenset[str] = frozenset()
    protocol: str | None = None
    _matched: dict[str, bool] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def _type_matches(self, type_name: str) -> bool:
        known = self._matched.get(type_name)
        if known is None:
            known = self._matched[type_name] = any(
                event_types.matches(p, type_name) for p in self.types
            )
        return known

    def accepts(self, event: StreamEvent) -> bool:
        """Whether ``event`` passes (the same rule as :meth:`where`)."""
        return (
            (not self.types or self._type_matches(event.type))
            and (not self.device_ids or event.device_id in self.device_ids)
            and (not self.gateway_ids or event.gateway_id in self.gateway_ids)
            and (self.protocol is None or event.protocol == self.protocol)
        )

    def where(self, where: Where) -> None:
        """Add the filter's conditions on ``events`` to ``where``."""
        if self.types:
            where.add(
                "EXISTS (SELECT 1 FROM unnest({}::text[]) AS p(pattern)"
                " WHERE event_type_matches(p.pattern, type))",
                list(self.types),
            )
        if self.device_ids:
            where.add("device_id = ANY({}::text[])", sorted(self.device_ids))
        if self.gateway_ids:
            where.add("gateway_id = ANY({}::text[])", sorted(self.gateway_ids))
        if self.protocol is not None:
            where.add("protocol = {}", self.protocol)


# ---------------------------------------------------------------- the repository


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the event log stands: the last id given, and the id up to which events
    were deleted by retention (0: none yet)."""

    last_id: int
    purged_through: int


async def position(conn: Connection) -> Position:
    """The last id given and the retention horizon."""
    row = await conn.fetchrow(
        """SELECT s.last_id, r.purged_through FROM event_sequencer s, event_retention r""",
        timeout=STATEMENT_TIMEOUT_S,
    )
    assert row is not None  # both tables hold one row from their migrations on
    return Position(int(row["last_id"]), int(row["purged_through"]))


async def sequence(conn: Connection, batch: int = SEQUENCE_BATCH) -> int:
    """Give ids to up to ``batch`` committed events (in the order they were written);
    the last id given, 0 when there was nothing to do."""
    last = await conn.fetchval("SELECT sequence_events($1)", batch, timeout=STATEMENT_TIMEOUT_S)
    return int(last or 0)


async def events_after(
    conn: Connection,
    after: int,
    flt: EventFilter | None = None,
    *,
    through: int | None = None,
    limit: int = READ_PAGE,
) -> list[StreamEvent]:
    """Up to ``limit`` sequenced events after id ``after`` (up to ``through``), in id
    order, that pass ``flt``."""
    where = Where()
    where.add("id > {}", after)
    if through is not None:
        where.add("id <= {}", through)
    if flt is not None:
        flt.where(where)
    where.args.append(limit)
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM events {where.sql()} ORDER BY id LIMIT ${len(where.args)}",
        *where.args,
        timeout=STATEMENT_TIMEOUT_S,
    )
    return [StreamEvent.from_row(r) for r in rows]


async def list_events(
    conn: Connection,
    *,
    after: int,
    flt: EventFilter,
    since: dt.datetime | None,
    until: dt.datetime | None,
    limit: int,
) -> Page[dict[str, Any]]:
    """A page of sequenced events after id ``after`` in id order, as :func:`event_json`,
    that pass ``flt`` and happened within [since, until)."""
    where = Where()
    where.add("id > {}", after)
    flt.where(where)
    if since is not None:
        where.add("at >= {}", since)
    if until is not None:
        where.add("at < {}", until)
    query = f"SELECT {_COLUMNS} FROM events {where.sql()} ORDER BY id {where.limit(limit)}"
    rows = await conn.fetch(query, *where.args, timeout=STATEMENT_TIMEOUT_S)
    return page_of([event_json(r) for r in rows], limit)


async def get_event(conn: Connection, event_id: int) -> dict[str, Any] | None:
    """One sequenced event as :func:`event_json`; None if there is none with that id."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM events WHERE id = $1", event_id, timeout=STATEMENT_TIMEOUT_S
    )
    return None if row is None else event_json(row)


class Purged(NamedTuple):
    """What one retention step did."""

    #: events deleted (with their finished webhook deliveries)
    deleted: int
    #: the retention horizon moved (more may follow)
    advanced: bool


async def purge_batch(conn: Connection, *, retention_days: float, batch: int) -> Purged | None:
    """One retention step, inside the caller's transaction: move the horizon over the
    oldest sequenced events (in id order, up to the first one younger than
    ``retention_days``, at most ``batch``) and delete the events up to it with their
    webhook deliveries, except events with a delivery still open (queued, pending, in
    flight: they are looked at again next time). None if another process holds the retention lock
    (it is doing the work)."""
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _RETENTION_LOCK):
        return None
    horizon = int(
        await conn.fetchval(
            "SELECT purged_through FROM event_retention FOR UPDATE", timeout=STATEMENT_TIMEOUT_S
        )
    )
    # the old prefix of the id order: the ids after the horizon stay dense
    found = await conn.fetchval(
        """WITH head AS (
               SELECT id, at < now() - make_interval(secs => $2 * 86400) AS old
                 FROM events WHERE id > $1 ORDER BY id LIMIT $3
           )
           SELECT max(id) FROM head
            WHERE old AND id < coalesce((SELECT min(id) FROM head WHERE NOT old),
                                        9223372036854775807)""",
        horizon,
        float(retention_days),
        batch,
        timeout=STATEMENT_TIMEOUT_S,
    )
    through = max(horizon, int(found or 0))
    if through == 0:
        return Purged(0, False)
    # an event whose row another transaction locks (a replay adding a delivery) is skipped
    deleted = await conn.fetchval(
        """WITH doomed AS (
               SELECT e.pk FROM events e
                WHERE e.id <= $1
                  AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                                   WHERE d.event_pk = e.pk
                                     AND d.status NOT IN ('delivered', 'failed', 'cancelled'))
                ORDER BY e.id LIMIT $2
                FOR UPDATE OF e SKIP LOCKED
           ), deliveries AS (
               DELETE FROM webhook_deliveries d USING doomed WHERE d.event_pk = doomed.pk
           ), gone AS (
               DELETE FROM events e USING doomed WHERE e.pk = doomed.pk RETURNING 1
           )
           SELECT count(*) FROM gone""",
        through,
        batch,
        timeout=STATEMENT_TIMEOUT_S,
    )
    if through > horizon:
        await conn.execute(
            "UPDATE event_retention SET purged_through = $1", through, timeout=STATEMENT_TIMEOUT_S
        )
    return Purged(int(deleted), through > horizon)


async def _waiting(conn: Connection) -> int:
    """Committed events without an id yet (bounded count)."""
    count = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM events WHERE id IS NULL LIMIT 100000) AS w",
        timeout=STATEMENT_TIMEOUT_S,
    )
    return int(count)


# ---------------------------------------------------------------- subscriptions


class StreamClosedError(Exception):
    """The subscription was closed: ``reason`` is ``slow`` (its buffer overflowed),
    ``shutdown`` (the process stops) or ``client`` (the client went away)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Subscription:
    """One stream client's place at the hub: a bounded queue of live events that pass
    its filter, from :meth:`go_live` on. Close it when done (a context manager)."""

    def __init__(self, hub: EventHub, flt: EventFilter, buffer: int) -> None:
        self.filter = flt
        self._hub = hub
        self._queue: asyncio.Queue[StreamEvent] = asyncio.Queue(buffer)
        self._closed = asyncio.Event()
        #: why it was closed; None while open
        self.closed_reason: str | None = None
        #: events at or below this id are not queued (set by :meth:`go_live`)
        self.live_after: int | None = None

    def go_live(self) -> int:
        """Start queueing live events; returns the hub's last id: every later event
        passing the filter is queued, every earlier one is in the table already."""
        if self.live_after is None:
            self.live_after = self._hub.last_id
        return self.live_after

    def offer(self, event: StreamEvent) -> bool:
        """Queue ``event`` if it passes the filter; False if the queue is full."""
        if not self.filter.accepts(event):
            return True
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            return False
        return True

    async def next_batch(self, timeout: float, most: int = READ_PAGE) -> list[StreamEvent]:
        """The queued events (at least one, at most ``most``); [] after ``timeout`` s
        without any. Raises :class:`StreamClosedError` once closed."""
        if self.closed_reason is not None:
            raise StreamClosedError(self.closed_reason)
        try:
            async with asyncio.timeout(timeout):
                first = await self._queue.get()
        except TimeoutError:
            return []
        batch = [first]
        while len(batch) < most and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    def close(self, why: str) -> None:
        """Stop queueing and wake :meth:`wait_closed` (the first reason counts)."""
        if self.closed_reason is None:
            self.closed_reason = why
            self._closed.set()
        self._hub._forget(self)

    async def wait_closed(self) -> str:
        """Until the subscription is closed; returns why."""
        await self._closed.wait()
        assert self.closed_reason is not None
        return self.closed_reason

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close("client")

    async def frames(
        self,
        acquire: Callable[[], AbstractAsyncContextManager[Connection]],
        *,
        after: int | None,
        heartbeat_s: float,
        preamble: Iterable[bytes] = (),
    ) -> AsyncIterator[bytes]:
        """The stream's bytes: ``preamble``, the events after id ``after`` from the table
        (none when None), then live ones, with a comment line after ``heartbeat_s``
        without events. Several events may come in one chunk. Ends when closed."""
        head = b"".join(preamble)
        if head:
            yield head
        sent = 0
        if after is not None:
            sent = after
            caught_up = False
            while True:
                if caught_up and self.live_after is None:
                    self.go_live()
                async with acquire() as conn:
                    page = await events_after(
                        conn, sent, self.filter, through=self.live_after, limit=READ_PAGE
                    )
                if page:
                    sent = page[-1].id
                    self._hub.metrics.events_streamed_total.inc(len(page))
                    yield b"".join(e.frame for e in page)
                if len(page) < READ_PAGE:
                    if self.live_after is not None:
                        break
                    caught_up = True  # go live, then read the little left up to there
        else:
            sent = self.go_live()
        while True:
            try:
                batch = await self.next_batch(heartbeat_s)
            except StreamClosedError:
                return
            if not batch:
                yield b": keep-alive\n\n"
                continue
            fresh = [e for e in batch if e.id > sent]
            if fresh:
                sent = fresh[-1].id
                self._hub.metrics.events_streamed_total.inc(len(fresh))
                yield b"".join(e.frame for e in fresh)


# ---------------------------------------------------------------- the hub


@dataclasses.dataclass(frozen=True)
class HubSettings:
    """What the hub is configured with (from :class:`~chargegw.config.Settings`)."""

    sequence_s: float = 1.0
    retention_days: float = 30.0
    stream_buffer: int = 1000
    heartbeat_s: float = 15.0

    @classmethod
    def from_settings(cls, settings: Settings) -> HubSettings:
        """The hub's part of the gateway's settings."""
        return cls(
            sequence_s=settings.events_sequence_s,
            retention_days=settings.events_retention_days,
            stream_buffer=settings.events_stream_buffer,
            heartbeat_s=settings.events_heartbeat_s,
        )


Wakeup = Callable[[int], None]


class EventHub:
    """Sequences events, fans them out to this process's stream subscribers and wake-ups,
    deletes expired ones. ``await start()`` (the database must be reachable), then
    ``await stop()``."""

    def __init__(
        self,
        dsn: Callable[[], str],
        pool: Callable[[], asyncpg.Pool | None],
        metrics: Metrics,
        settings: HubSettings | None = None,
    ) -> None:
        self._dsn = dsn
        self._pool = pool
        self.metrics = metrics
        self.settings = settings or HubSettings()
        self._last_id: int | None = None
        #: the highest id this process knows was given (own calls, notifications)
        self._known_id = 0
        self._batch = SEQUENCE_BATCH
        self._subscriptions: set[Subscription] = set()
        self._wakeups: list[Wakeup] = []
        self._wake = asyncio.Event()
        self._new = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._outage_since: float | None = None
        self._conn: asyncpg.Connection[Any] | None = None

    # -- the public side --

    @property
    def last_id(self) -> int:
        """The id of the last event fanned out (every earlier one was)."""
        return self._last_id or 0

    @property
    def connected(self) -> bool:
        """The hub holds its database connection now."""
        return self._conn is not None

    def add_wakeup(self, callback: Wakeup) -> None:
        """Call ``callback(last_id)`` after each batch of newly sequenced events is read
        (in the event loop: it must not block). Its exceptions are logged."""
        self._wakeups.append(callback)

    def subscribe(self, flt: EventFilter, *, buffer: int | None = None) -> Subscription:
        """A new subscription (not live until :meth:`Subscription.go_live`); closed at
        once if the hub is stopping."""
        sub = Subscription(self, flt, buffer or self.settings.stream_buffer)
        if self._stopping:
            sub.close("shutdown")
            return sub
        self._subscriptions.add(sub)
        self.metrics.event_stream_subscribers.set(len(self._subscriptions))
        return sub

    def close_streams(self, why: str = "shutdown") -> None:
        """Close every subscription (the process stops: their clients reconnect elsewhere)."""
        for sub in list(self._subscriptions):
            sub.close(why)

    async def start(self) -> None:
        """Connect and LISTEN (raises if the database cannot be reached), learn the last
        id, then run the loops."""
        conn = await self._connect()
        self._spawn(self._run(conn), "event-hub")
        self._spawn(self._retention(), "event-retention")

    async def stop(self) -> None:
        """Close the streams, stop the loops, close the connection."""
        self._stopping = True
        self.close_streams()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def purge_expired(self) -> int:
        """Delete the events older than ``retention_days`` (and their finished webhook
        deliveries), batch by batch; the number deleted. Does nothing while another
        process does it."""
        pool = self._pool()
        if pool is None:
            return 0
        total = 0
        while True:
            async with pool.acquire(timeout=5) as conn, conn.transaction():
                step = await purge_batch(
                    conn, retention_days=self.settings.retention_days, batch=RETENTION_BATCH
                )
            if step is None:
                break
            total += step.deleted
            self.metrics.events_deleted_total.inc(step.deleted)
            if not step.advanced and step.deleted < RETENTION_BATCH:
                break
        if total:
            log.info("expired events deleted", count=total, days=self.settings.retention_days)
        self.metrics.housekeeping_done("events", deleted=total)
        return total

    # -- internals --

    def _forget(self, sub: Subscription) -> None:
        if sub in self._subscriptions:
            self._subscriptions.discard(sub)
            self.metrics.event_stream_subscribers.set(len(self._subscriptions))

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> asyncpg.Connection[Any]:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(self._dsn(), timeout=5)
        try:
            await conn.add_listener(EVENTS_NEW_CHANNEL, self._notified)
            await conn.add_listener(EVENTS_CHANNEL, self._notified)
            if self._last_id is None:
                # after LISTEN: anything given later is notified; earlier is not news
                self._last_id = (await position(conn)).last_id
                self._known_id = self._last_id
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
            raise
        self._conn = conn
        return conn

    def _notified(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        if channel == EVENTS_NEW_CHANNEL:
            self._new = True
        else:
            with contextlib.suppress(ValueError, TypeError):
                self._known_id = max(self._known_id, int(str(payload)))
        self._wake.set()

    async def _run(self, conn: asyncpg.Connection[Any] | None) -> None:
        """Serve on the connection; after losing it, reconnect with backoff."""
        delay = _BACKOFF_FIRST_S
        while True:
            if conn is None:
                try:
                    conn = await self._connect()
                except DB_ERRORS as exc:
                    self._lost(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX_S)
                    continue
                self._back()
            connected_at = time.monotonic()
            try:
                await self._serve(conn)
            except DB_ERRORS as exc:
                self._lost(exc)
                if time.monotonic() - connected_at < _STABLE_S:
                    # it fails as soon as it serves (a read-only standby, a statement
                    # timeout): back off, as when connecting fails
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX_S)
                else:
                    delay = _BACKOFF_FIRST_S
            except Exception:
                # a defect must not stop the events for good: log it, start over
                log.exception("event hub failed, restarting it")
                await asyncio.sleep(delay)
            finally:
                self._conn = None
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)
                conn = None

    def _lost(self, exc: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "event hub lost the database; reconnecting, then catching up",
                reason=reason(exc),
                last_id=self.last_id,
            )

    def _back(self) -> None:
        if self._outage_since is not None:
            log.info(
                "event hub reconnected, catching up",
                unavailable_s=round(time.monotonic() - self._outage_since, 1),
                last_id=self.last_id,
            )
            self._outage_since = None
        self.metrics.event_hub_reconnects_total.inc()

    async def _serve(self, conn: asyncpg.Connection[Any]) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = 0.0  # at once: catch up after (re)connecting
        while True:
            self._wake.clear()
            if loop.time() >= next_sweep:
                self._new = False
                self.metrics.events_unsequenced.set(await _waiting(conn))
                await self._sequence(conn)
                next_sweep = loop.time() + self.settings.sequence_s
            elif self._new:
                self._new = False
                await self._sequence(conn)
            await self._read_new(conn)
            if self._wake.is_set():
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_sweep - loop.time())):
                    await self._wake.wait()

    async def _sequence(self, conn: asyncpg.Connection[Any]) -> None:
        while True:
            before, batch = self._known_id, self._batch
            try:
                last = await sequence(conn, batch)
            except TimeoutError:
                if batch <= SEQUENCE_BATCH_LEAST:
                    raise
                # a batch whose deliveries (many subscriptions) took longer than the
                # statement's limit would be tried again as it is, for ever
                self._batch = max(SEQUENCE_BATCH_LEAST, batch // 4)
                log.warning("event numbering ran out of time", batch=batch, next=self._batch)
                continue
            self._batch = min(SEQUENCE_BATCH, batch * 2)
            if not last:
                return
            self._known_id = max(self._known_id, last)
            # a full batch may have left more behind: look again
            if last - before < batch:
                return

    async def _read_new(self, conn: asyncpg.Connection[Any]) -> None:
        # a page fits in half a subscriber's buffer: one that keeps up between pages
        # (they are read from the database) is never disconnected by a burst
        size = max(1, min(READ_PAGE, self.settings.stream_buffer // 2))
        while True:
            page = await events_after(conn, self.last_id, limit=size)
            if not page:
                return
            self._fan_out(page)
            for callback in list(self._wakeups):
                try:
                    callback(self.last_id)
                except Exception:
                    log.exception("event wake-up failed", callback=repr(callback))
            if len(page) < size:
                return

    def _fan_out(self, events: list[StreamEvent]) -> None:
        """Queue ``events`` for every live subscription and move ``last_id``, without
        yielding to the loop: a subscription goes live either before or after a batch."""
        now = time.time()
        delay = self.metrics.event_fanout_delay_seconds
        for event in events:
            if event.at is not None:
                delay.observe(max(0.0, now - event.at.timestamp()))
        for sub in list(self._subscriptions):
            if sub.live_after is None:
                continue
            for event in events:
                if event.id > sub.live_after and not sub.offer(event):
                    self.metrics.event_stream_slow_disconnects_total.inc()
                    log.warning(
                        "event stream subscriber too slow, disconnecting it",
                        buffer=self.settings.stream_buffer,
                        last_id=event.id,
                    )
                    sub.close("slow")
                    break
        self._last_id = events[-1].id
        self._known_id = max(self._known_id, self._last_id)

    async def _retention(self) -> None:
        await asyncio.sleep(RETENTION_FIRST_S)
        while True:
            try:
                await self.purge_expired()
            except DB_ERRORS as exc:
                self.metrics.housekeeping_failed("events")
                log.warning("event retention failed, retrying later", reason=reason(exc))
            await asyncio.sleep(RETENTION_EVERY_S)
