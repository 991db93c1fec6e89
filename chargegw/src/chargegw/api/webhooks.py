"""The webhook API: subscriptions, their delivery ledger, retries, replays, pings and
secret rotation (docs/webhooks.md; the delivery engine is
:mod:`chargegw.domain.webhook_delivery`).

A subscription's signing secret is in the answer of its creation and of a rotation,
never in any other.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from chargegw.api.deps import Pool, Services, refused
from chargegw.api.errors import api_error, error_responses
from chargegw.api.pagination import (
    DEFAULT_LIMIT,
    Cursor,
    Limit,
    decode_cursor,
    encode_cursor,
    invalid,
    utc,
)
from chargegw.domain import webhooks
from chargegw.domain.event_types import TYPE_PATTERN, unknown_patterns
from chargegw.domain.refusals import RequestError
from chargegw.domain.webhook_delivery import UrlError, check_url
from chargegw.domain.webhooks import (
    MAX_REPLAY,
    UNSET,
    Delivery,
    DeliveryStatus,
    Subscription,
    SubscriptionChanges,
    SubscriptionFields,
)

__all__ = ["router"]

#: filters of one subscription hold at most this many ids
MAX_FILTER_IDS = 10_000
#: a rotation's overlap: a day unless asked, at most a week
DEFAULT_OVERLAP_S = 86400.0
MAX_OVERLAP_S = 7 * 86400

Ids = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=64)]],
    Field(max_length=MAX_FILTER_IDS),
]
EventTypes = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=64)]],
    Field(min_length=1, max_length=100),
]
Url = Annotated[str, Field(min_length=1, max_length=2048, examples=["https://example.com/hooks"])]
ProtocolName = Literal["ap3000", "bkv"]
Concurrency = Annotated[int, Field(ge=1, le=100)]
Timeout = Annotated[float, Field(gt=0, le=60)]
Description = Annotated[str, Field(max_length=500)]


class WebhookCreate(BaseModel):
    """A new subscription; the answer holds its signing secret, shown this once."""

    model_config = ConfigDict(extra="forbid")

    url: Url = Field(description="http or https; private addresses need webhooks_allow_private")
    event_types: EventTypes = Field(
        description="types or patterns (`order.*`, `*`) of the event catalogue",
        examples=[["order.*", "device.offline"]],
    )
    device_ids: Ids | None = Field(None, description="only these devices")
    gateway_ids: Ids | None = Field(None, description="only these gateways")
    protocol: ProtocolName | None = Field(None, description="only this protocol")
    description: Description = ""
    enabled: bool = True
    max_concurrency: Concurrency = Field(10, description="deliveries in flight at once")
    timeout_s: Timeout = Field(10.0, description="an attempt's connect and total timeout")


class WebhookPatch(BaseModel):
    """The fields to change; a filter set to null matches anything again. Enabling a
    disabled subscription resumes its deliveries and forgets its failures."""

    model_config = ConfigDict(extra="forbid")

    url: Url | None = None
    event_types: EventTypes | None = None
    device_ids: Ids | None = None
    gateway_ids: Ids | None = None
    protocol: ProtocolName | None = None
    description: Description | None = None
    enabled: bool | None = None
    max_concurrency: Concurrency | None = None
    timeout_s: Timeout | None = None


class WebhookWithSecret(Subscription):
    """A subscription with its signing secret (only when made or rotated)."""

    secret: str = Field(
        description="`whsec_` + base64: verify signatures with it (Standard Webhooks)"
    )


class WebhookPage(BaseModel):
    """A page of subscriptions, in id order."""

    items: list[Subscription]
    next_cursor: str | None


class DeliveryPage(BaseModel):
    """A page of deliveries, newest first."""

    items: list[Delivery]
    next_cursor: str | None


class ReplayRequest(BaseModel):
    """A window of events to deliver again: ``since`` (and ``until``) by event time, or
    ``after_event_id`` (and ``until``)."""

    model_config = ConfigDict(extra="forbid")

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    after_event_id: int | None = Field(None, ge=0)


class ReplayAnswer(BaseModel):
    """What the replay queued."""

    deliveries: int = Field(description="deliveries made (the events the filters select)")
    first_event_id: int | None
    last_event_id: int | None


class RotateRequest(BaseModel):
    """How long the current secret keeps signing beside the new one."""

    model_config = ConfigDict(extra="forbid")

    overlap_s: float = Field(DEFAULT_OVERLAP_S, ge=0, le=MAX_OVERLAP_S)


_DEFAULT_ROTATION = RotateRequest(overlap_s=DEFAULT_OVERLAP_S)

router = APIRouter(prefix="/api/v1", tags=["webhooks"])

_NOT_FOUND = (404, "No such webhook subscription")


def _not_found(webhook_id: int) -> HTTPException:
    return HTTPException(404, f"webhook {webhook_id} not found")


async def _url(url: str, services: Services) -> str:
    try:
        await check_url(url, allow_private=services.webhooks_allow_private)
    except UrlError as exc:
        raise api_error(422, f"url: {exc}", field="url") from None
    return url


def _event_types(patterns: list[str]) -> list[str]:
    bad = unknown_patterns(patterns)
    if bad:
        raise api_error(
            422,
            "event_types: malformed or matching no event type of the catalogue: "
            + ", ".join(repr(p) for p in bad),
            field="event_types",
        )
    return list(dict.fromkeys(patterns))


def _ids(ids: list[str] | None, field: str) -> list[str] | None:
    if ids is not None and not ids:
        raise api_error(
            422, f"{field}: an empty list matches nothing; leave it out (null) for any", field=field
        )
    return None if ids is None else list(dict.fromkeys(ids))


def _creator(request: Request) -> str | None:
    key = getattr(request.state, "api_key", None)
    key_id = getattr(key, "key_id", None)
    return None if key_id is None else str(key_id)


@router.post(
    "/webhooks",
    status_code=201,
    summary="Subscribe a URL to events; the answer shows the signing secret once",
)
async def create(
    request: Request, pool: Pool, services: Services, body: WebhookCreate
) -> WebhookWithSecret:
    """It receives the events sequenced after it is made (replay for earlier ones)."""
    fields = SubscriptionFields(
        url=await _url(body.url, services),
        event_types=_event_types(body.event_types),
        device_ids=_ids(body.device_ids, "device_ids"),
        gateway_ids=_ids(body.gateway_ids, "gateway_ids"),
        protocol=body.protocol,
        description=body.description,
        enabled=body.enabled,
        max_concurrency=body.max_concurrency,
        timeout_s=body.timeout_s,
    )
    secret = webhooks.new_secret()
    async with pool.acquire() as conn:
        made = await webhooks.create_subscription(
            conn, fields, secret=secret, created_by=_creator(request)
        )
    return WebhookWithSecret(**made.model_dump(), secret=secret)


@router.get("/webhooks", summary="Webhook subscriptions")
async def list_all(pool: Pool, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> WebhookPage:
    """In id order, without their secrets."""
    after = None if cursor is None else decode_cursor(cursor, "webhooks", (int,))[0]
    async with pool.acquire() as conn:
        page = await webhooks.list_subscriptions(conn, after_id=after, limit=limit)
    next_cursor = encode_cursor("webhooks", [page.items[-1].id]) if page.more else None
    return WebhookPage(items=page.items, next_cursor=next_cursor)


@router.get(
    "/webhooks/{webhook_id}",
    summary="One webhook subscription",
    responses=error_responses(_NOT_FOUND),
)
async def get_one(pool: Pool, webhook_id: int) -> Subscription:
    """Without its secret."""
    async with pool.acquire() as conn:
        found = await webhooks.get_subscription(conn, webhook_id)
    if found is None:
        raise _not_found(webhook_id)
    return found


@router.patch(
    "/webhooks/{webhook_id}",
    summary="Change a webhook subscription (enable, disable, filters, URL ...)",
    responses=error_responses(_NOT_FOUND),
)
async def patch(
    pool: Pool, services: Services, webhook_id: int, body: WebhookPatch
) -> Subscription:
    """Deliveries already made keep the filters they were made with."""
    given = body.model_fields_set
    for required in ("url", "event_types", "description", "enabled", "max_concurrency",
                     "timeout_s"):  # fmt: skip
        if required in given and getattr(body, required) is None:
            raise api_error(422, f"{required}: may not be null", field=required)
    changes = SubscriptionChanges(
        url=await _url(body.url, services) if body.url is not None else UNSET,
        event_types=_event_types(body.event_types) if body.event_types is not None else UNSET,
        device_ids=_ids(body.device_ids, "device_ids") if "device_ids" in given else UNSET,
        gateway_ids=_ids(body.gateway_ids, "gateway_ids") if "gateway_ids" in given else UNSET,
        protocol=body.protocol if "protocol" in given else UNSET,
        description=body.description if body.description is not None else UNSET,
        enabled=body.enabled if body.enabled is not None else UNSET,
        max_concurrency=body.max_concurrency if body.max_concurrency is not None else UNSET,
        timeout_s=body.timeout_s if body.timeout_s is not None else UNSET,
    )
    async with pool.acquire() as conn:
        found = await webhooks.update_subscription(conn, webhook_id, changes)
    if found is None:
        raise _not_found(webhook_id)
    if body.enabled:
        services.wake_webhooks()
    return found


@router.delete(
    "/webhooks/{webhook_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a webhook subscription and its deliveries",
    responses=error_responses(_NOT_FOUND),
)
async def delete(pool: Pool, webhook_id: int) -> Response:
    """An attempt in flight still reaches the receiver; nothing is recorded of it."""
    async with pool.acquire() as conn:
        if not await webhooks.delete_subscription(conn, webhook_id):
            raise _not_found(webhook_id)
    return Response(status_code=204)


@router.get(
    "/webhooks/{webhook_id}/deliveries",
    summary="A subscription's deliveries: status, attempts, the last answer",
    responses=error_responses(_NOT_FOUND),
)
async def deliveries(
    pool: Pool,
    webhook_id: int,
    status: Annotated[DeliveryStatus | None, Query(description="only in this state")] = None,
    event_type: Annotated[
        str | None,
        Query(
            alias="type",
            max_length=64,
            description="only of this event type (`*` wildcards allowed)",
        ),
    ] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> DeliveryPage:
    """Newest first. ``queued``: behind an earlier delivery of the same device;
    ``pending``: due at ``next_attempt_at``; ``delivering``: in flight until then."""
    if event_type is not None and not TYPE_PATTERN.match(event_type):
        raise invalid("type", "an event type or pattern: a-z, 0-9, _, . and *", event_type)
    before = None if cursor is None else decode_cursor(cursor, "webhook-deliveries", (int,))[0]
    async with pool.acquire() as conn:
        if await webhooks.get_subscription(conn, webhook_id) is None:
            raise _not_found(webhook_id)
        page = await webhooks.list_deliveries(
            conn, webhook_id, status=status, type_pattern=event_type, before_id=before, limit=limit
        )
    next_cursor = encode_cursor("webhook-deliveries", [page.items[-1].id]) if page.more else None
    return DeliveryPage(items=page.items, next_cursor=next_cursor)


@router.get(
    "/webhooks/{webhook_id}/deliveries/{delivery_id}",
    summary="One delivery",
    responses=error_responses((404, "No such delivery of this subscription")),
)
async def delivery(pool: Pool, webhook_id: int, delivery_id: int) -> Delivery:
    """Its status, attempts and the last answer."""
    async with pool.acquire() as conn:
        found = await webhooks.get_delivery(conn, webhook_id, delivery_id)
    if found is None:
        raise HTTPException(404, f"webhook {webhook_id} has no delivery {delivery_id}")
    return found


@router.post(
    "/webhooks/{webhook_id}/deliveries/{delivery_id}/retry",
    status_code=202,
    summary="Attempt a delivery again now",
    responses=error_responses(
        (404, "No such delivery of this subscription"),
        (409, "Queued behind another delivery, in flight, or cancelled"),
    ),
)
async def retry(pool: Pool, services: Services, webhook_id: int, delivery_id: int) -> Delivery:
    """A pending or failed delivery is attempted now; a delivered one is sent again as a
    new delivery (origin `retry`) with the same `webhook-id`, after what its device has
    queued. Deliveries of a disabled subscription wait until it is enabled."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            found = await webhooks.retry_delivery(conn, webhook_id, delivery_id)
    except RequestError as exc:
        raise refused(exc) from None
    services.wake_webhooks()
    return found


@router.post(
    "/webhooks/{webhook_id}/replay",
    status_code=202,
    summary="Deliver a window of past events again",
    responses=error_responses(_NOT_FOUND),
)
async def replay(
    pool: Pool, services: Services, webhook_id: int, body: ReplayRequest
) -> ReplayAnswer:
    """New deliveries (origin `replay`, `webhook-id` `evt_<id>` as before) of the events
    of the window that the subscription's types and filters select, in event order,
    each after what its device has queued; at most 100,000 (a 422 beyond: replay in
    parts). Events older than the event retention are gone."""
    since, until = utc(body.since), utc(body.until)
    if (since is None) == (body.after_event_id is None):
        raise api_error(
            422, "since: give since (and until) or after_event_id (and until)", field="since"
        )
    if since is not None and until is not None and since > until:
        raise api_error(422, "since: since is after until", field="since")
    try:
        async with pool.acquire() as conn, conn.transaction():
            done = await webhooks.replay(
                conn,
                webhook_id,
                since=since,
                until=until,
                after_event_id=body.after_event_id,
                limit=MAX_REPLAY,
            )
    except RequestError as exc:
        raise refused(exc) from None
    services.wake_webhooks()
    return ReplayAnswer(
        deliveries=done.deliveries,
        first_event_id=done.first_event_id,
        last_event_id=done.last_event_id,
    )


@router.post(
    "/webhooks/{webhook_id}/test",
    status_code=202,
    summary="Send a test delivery (`webhook.ping`)",
    responses=error_responses(_NOT_FOUND, (409, "The subscription is disabled")),
)
async def send_test(pool: Pool, services: Services, webhook_id: int) -> Delivery:
    """Signed like any delivery, with `webhook-id: ping_<delivery id>`; follow it in the
    deliveries list."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            made = await webhooks.ping(conn, webhook_id, message="a test delivery from chargegw")
    except RequestError as exc:
        raise refused(exc) from None
    services.wake_webhooks()
    return made


@router.post(
    "/webhooks/{webhook_id}/rotate-secret",
    summary="A new signing secret; the old one signs too during the overlap",
    responses=error_responses(_NOT_FOUND),
)
async def rotate(
    pool: Pool, webhook_id: int, body: RotateRequest = _DEFAULT_ROTATION
) -> WebhookWithSecret:
    """The answer shows the new secret once. Until `previous_secret_until`, requests
    carry two signatures (the new secret's first): receivers switch at their pace. The
    body may be left out (an overlap of a day)."""
    overlap = body.overlap_s
    secret = webhooks.new_secret()
    async with pool.acquire() as conn:
        found = await webhooks.rotate_secret(conn, webhook_id, secret=secret, overlap_s=overlap)
    if found is None:
        raise _not_found(webhook_id)
    return WebhookWithSecret(**found.model_dump(), secret=secret)
