"""The events: a live stream (Server-Sent Events), the pull API, and the catalogue.

``GET /api/v1/events/stream`` streams every event as it is sequenced, from whichever
process serves the request (each one hears all events through PostgreSQL LISTEN/NOTIFY):
``id: <id>``, ``event: <type>``, ``data: <the event's JSON>``. ``Last-Event-ID`` (or
``after=``) replays the events after that id from the table first, without a gap or a
duplicate at the switch to live ones. The stream starts with ``retry: 2000`` and sends a
comment line after ``events_heartbeat_s`` without events. A client that does not keep up
(``events_stream_buffer`` events waiting) is disconnected; it reconnects with its last id.

Messages of the stream itself carry no ``id:`` line:

- ``stream.gap``: the ids asked for were deleted by retention (``after`` is older than
  ``purged_through``); the stream goes on with the oldest kept events;
- ``stream.reset``: ``Last-Event-ID`` is beyond the last event there is (another
  database?); the stream goes on with live events.

``GET /api/v1/events`` pulls the same events, in id order, with the same filters and a
time window; ``GET /api/v1/event-types`` lists the catalogue with each type's JSON Schema
(published in the OpenAPI document as well: one schema per type, ``OrderSettledEvent`` ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import structlog
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model
from starlette.types import Message, Receive, Scope, Send

from chargegw.api.deps import Pool, Services
from chargegw.api.devices import Protocol
from chargegw.api.errors import error_responses
from chargegw.api.pagination import (
    DEFAULT_LIMIT,
    Cursor,
    Limit,
    check_window,
    decode_cursor,
    encode_cursor,
    invalid,
    utc,
)
from chargegw.domain import event_types
from chargegw.domain import events as events_domain
from chargegw.domain.event_types import ENVELOPE_SCHEMA, EVENT_TYPES
from chargegw.domain.events import EventFilter, EventHub, control_frame
from chargegw.store.database import Connection
from chargegw.store.errors import DB_ERRORS, reason

__all__ = ["Event", "EventStreamResponse", "router"]

log = structlog.get_logger("chargegw.api.events")

#: waiting for a pooled connection longer than this means the database is unavailable
ACQUIRE_TIMEOUT_S = 5.0
#: what EventSource clients wait before reconnecting, in milliseconds (the `retry:` line)
RETRY_MS = 2000
#: ending the body of a stream whose client does not read: give up after this long
FINAL_WRITE_S = 1.0
#: most type patterns, device ids or gateway ids one filter may name
MAX_FILTER_VALUES = 1000


# ---------------------------------------------------------------- models


def _model_name(type_name: str) -> str:
    words = re.split(r"[._]", type_name)
    return "".join(w.capitalize() for w in words) + "Event"


TypeName = Literal[tuple(EVENT_TYPES)]  # type: ignore[valid-type]


class Event(BaseModel):
    """One domain event: its id (increasing in commit order), type, time, the subjects it
    concerns (null where they do not apply), then the keys of its data: each type's own
    schema (`<Type>Event`, e.g. `OrderSettledEvent`) lists them."""

    model_config = ConfigDict(extra="allow")

    id: int = Field(description=ENVELOPE_SCHEMA["id"][1], examples=[1042])
    type: TypeName = Field(description=ENVELOPE_SCHEMA["type"][1])  # type: ignore[valid-type]
    at: dt.datetime = Field(description=ENVELOPE_SCHEMA["at"][1])
    device_id: str | None = Field(description=ENVELOPE_SCHEMA["device_id"][1])
    gateway_id: str | None = Field(description=ENVELOPE_SCHEMA["gateway_id"][1])
    protocol: str | None = Field(description=ENVELOPE_SCHEMA["protocol"][1])
    port: int | None = Field(description=ENVELOPE_SCHEMA["port"][1])
    order_no: str | None = Field(description=ENVELOPE_SCHEMA["order_no"][1])
    command_id: int | None = Field(description=ENVELOPE_SCHEMA["command_id"][1])
    job_id: int | None = Field(description=ENVELOPE_SCHEMA["job_id"][1])
    frame_id: int | None = Field(description=ENVELOPE_SCHEMA["frame_id"][1])


def _typed_event(spec: event_types.EventType) -> type[BaseModel]:
    fields: dict[str, Any] = {
        "type": (Literal[spec.name], Field(description=spec.description)),
    }
    for key, schema in spec.data_schema()["properties"].items():
        if key in ENVELOPE_SCHEMA:
            continue  # the subject (a card swipe's port) is the same value
        fields[key] = (Annotated[Any, WithJsonSchema(schema)], None)
    model: type[BaseModel] = create_model(
        _model_name(spec.name),
        __base__=Event,
        __doc__=f"`{spec.name}`: {spec.description}",
        **fields,
    )
    return model


#: one model per event type, by name
EVENT_MODELS: dict[str, type[BaseModel]] = {
    name: _typed_event(spec) for name, spec in EVENT_TYPES.items()
}
if TYPE_CHECKING:
    AnyEvent = Event
else:
    #: any event, told apart by its type: one schema per type in the OpenAPI document
    AnyEvent = Annotated[Union[tuple(EVENT_MODELS.values())], Field(discriminator="type")]  # noqa: UP007


class EventFeedPage(BaseModel):
    """A page of events in id order."""

    items: list[AnyEvent]
    next_cursor: str | None = Field(
        description="null on the last page: poll again later with `after=<id of the last item>`"
    )


class EventTypeInfo(BaseModel):
    """One type of the event catalogue."""

    name: TypeName = Field(examples=["order.settled"])  # type: ignore[valid-type]
    description: str
    data: dict[str, str] = Field(description="the keys of its data, with their meaning")
    data_schema: dict[str, Any] = Field(description="the JSON Schema of its data keys")


class EventCatalogue(BaseModel):
    """Every event type."""

    items: list[EventTypeInfo]


# ---------------------------------------------------------------- filters


def _values(raw: list[str] | None, field: str) -> list[str]:
    """Repeated parameters and comma-separated lists, flattened; empty items dropped."""
    values = [v.strip() for item in raw or () for v in item.split(",") if v.strip()]
    if len(values) > MAX_FILTER_VALUES:
        raise invalid(field, f"at most {MAX_FILTER_VALUES} values", len(values))
    return values


def event_filter(
    types: Annotated[
        list[str] | None,
        Query(
            description="event types, comma-separated or repeated; `*` is any run of "
            "characters (`order.*`)",
            examples=["order.*,device.offline"],
        ),
    ] = None,
    device_id: Annotated[
        list[str] | None,
        Query(description="only these devices (comma-separated or repeated)"),
    ] = None,
    gateway_id: Annotated[
        list[str] | None,
        Query(description="only devices of these gateways (comma-separated or repeated)"),
    ] = None,
    protocol: Protocol | None = None,
) -> EventFilter:
    """The filter of the query (a dependency); 422 naming ``types`` for a pattern that is
    malformed or matches no type of the catalogue."""
    patterns = _values(types, "types")
    unknown = event_types.unknown_patterns(patterns)
    if unknown:
        raise invalid(
            "types",
            "unknown or malformed event type: " + ", ".join(unknown[:10]),
            ",".join(unknown[:10]),
        )
    return EventFilter(
        types=tuple(dict.fromkeys(patterns)),
        device_ids=frozenset(_values(device_id, "device_id")),
        gateway_ids=frozenset(_values(gateway_id, "gateway_id")),
        protocol=None if protocol is None else protocol.value,
    )


Filter = Annotated[EventFilter, Depends(event_filter)]
After = Annotated[
    int | None,
    Query(ge=0, description="only events after this id (the last one you have)"),
]


def _last_event_id(value: str | None) -> int | None:
    # the header's pattern (digits only, at most 18) was checked by FastAPI
    return int(value) if value else None


# ---------------------------------------------------------------- the stream


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response fed by a :class:`Subscription` to ``hub`` (made
    when the response starts): it ends when the client goes away, when the subscription
    is closed (the process stops, the client is too slow), or when reading the table
    fails."""

    #: none for the OpenAPI document: the route documents its `text/event-stream` itself,
    #: and its error answers stay `application/json` (each answer sets its own)
    media_type = None

    def __init__(
        self,
        hub: EventHub,
        flt: EventFilter,
        acquire: Callable[[], AbstractAsyncContextManager[Connection]],
        *,
        after: int | None,
        preamble: list[bytes],
    ) -> None:
        super().__init__(
            (),
            media_type="text/event-stream; charset=utf-8",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._hub = hub
        self._filter = flt
        self._acquire = acquire
        self._after = after
        self._preamble = preamble

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self._hub.subscribe(self._filter)
        chunks = sub.frames(
            self._acquire,
            after=self._after,
            heartbeat_s=self._hub.settings.heartbeat_s,
            preamble=self._preamble,
        )
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
        except BaseException:
            sub.close("client")
            raise
        writer = asyncio.create_task(_write(chunks, send))
        gone = asyncio.create_task(_disconnected(receive))
        closed = asyncio.create_task(sub.wait_closed())
        tasks = (writer, gone, closed)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sub.close("client")
        if not writer.cancelled() and (error := writer.exception()) is not None:
            if isinstance(error, DB_ERRORS):
                log.info("event stream ended: database unavailable", reason=reason(error))
            else:
                log.error("event stream failed", exc_info=error)
        if gone.cancelled():  # the client is still there: end the body
            # a client that does not read cannot take it either: then the connection is
            # closed without it (the server says the response was incomplete)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_WRITE_S):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _write(chunks: AsyncIterator[bytes], send: Send) -> None:
    async for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _disconnected(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


router = APIRouter(prefix="/api/v1", tags=["events"])

_ONE_OF_EVENTS = {
    "oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in EVENT_MODELS.values()],
    "discriminator": {
        "propertyName": "type",
        "mapping": {name: f"#/components/schemas/{m.__name__}" for name, m in EVENT_MODELS.items()},
    },
}
#: one message of the stream (OpenAPI 3.2's `itemSchema`, as FastAPI writes it for SSE)
_STREAM_ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "description": "the event's id (none on stream messages)"},
        "event": {
            "type": "string",
            "description": "the event's type, or `stream.gap` / `stream.reset`",
        },
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": _ONE_OF_EVENTS,
        },
        "retry": {"type": "integer", "minimum": 0},
    },
}


@router.get(
    "/events/stream",
    summary="The live event stream (Server-Sent Events)",
    status_code=200,
    response_class=EventStreamResponse,
    responses={
        200: {
            "description": "`text/event-stream`: per event `id: <id>`, `event: <type>`, "
            "`data: <the event as JSON>`; comment lines as heartbeats; `stream.gap` and "
            "`stream.reset` messages without an id",
            "content": {
                "text/event-stream": {"schema": {"type": "string"}, "itemSchema": _STREAM_ITEM}
            },
        }
    },
)
async def stream_events(
    pool: Pool,
    services: Services,
    flt: Filter,
    *,
    after: After = None,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            pattern=r"^[0-9]{0,18}$",
            description="resume after this event id (EventSource sends it when it "
            "reconnects); wins over `after`",
        ),
    ] = None,
) -> EventStreamResponse:
    """Events as they are sequenced, optionally after a given id first (replayed from the
    table, up to the retention), filtered like webhook subscriptions."""
    resume = _last_event_id(last_event_id)
    if resume is None:
        resume = after
    hub = services.events
    preamble = [f"retry: {RETRY_MS}\n\n".encode()]
    if resume is not None:
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            where = await events_domain.position(conn)
        if resume < where.purged_through:
            gap = {"after": resume, "purged_through": where.purged_through}
            preamble.append(control_frame("stream.gap", gap))
        elif resume > where.last_id:
            reset = {"after": resume, "last_id": where.last_id}
            preamble.append(control_frame("stream.reset", reset))
            resume = None
    return EventStreamResponse(
        hub,
        flt,
        lambda: pool.acquire(timeout=ACQUIRE_TIMEOUT_S),
        after=resume,
        preamble=preamble,
    )


@router.get("/events", summary="Events in id order (the pull API)", response_model=EventFeedPage)
async def list_events(
    pool: Pool,
    flt: Filter,
    *,
    after: After = None,
    since: Annotated[dt.datetime | None, Query(description="at or after this time")] = None,
    until: Annotated[dt.datetime | None, Query(description="before this time")] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> JSONResponse:
    """Sequenced events after ``after`` (or the cursor) in id order, filtered, within a
    time window. The last page has ``next_cursor`` null: poll for newer events with
    ``after=<id of the last item>``."""
    since, until = utc(since), utc(until)
    check_window(since, until)
    start = after or 0
    if cursor is not None:
        start = max(start, decode_cursor(cursor, "events-feed", (int,))[0])
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        page = await events_domain.list_events(
            conn, after=start, flt=flt, since=since, until=until, limit=limit
        )
    next_cursor = encode_cursor("events-feed", [page.items[-1]["id"]]) if page.more else None
    return JSONResponse({"items": page.items, "next_cursor": next_cursor})


@router.get(
    "/events/{event_id}",
    summary="One event",
    response_model=AnyEvent,
    responses=error_responses((404, "No such event (or deleted by retention)")),
)
async def get_event(
    pool: Pool, event_id: Annotated[int, Path(ge=1, description="the event's id")]
) -> JSONResponse:
    """The event with this id."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        found = await events_domain.get_event(conn, event_id)
    if found is None:
        raise HTTPException(404, f"event {event_id} not found")
    return JSONResponse(found)


@router.get("/event-types", summary="The event catalogue")
async def list_event_types() -> EventCatalogue:
    """Every event type: its name, meaning, data keys and their JSON Schema."""
    return EventCatalogue(
        items=[
            EventTypeInfo(
                name=spec.name,
                description=spec.description,
                data=dict(spec.data),
                data_schema=spec.data_schema(),
            )
            for spec in EVENT_TYPES.values()
        ]
    )
