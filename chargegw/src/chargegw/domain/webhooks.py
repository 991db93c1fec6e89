"""Webhook subscriptions and their deliveries: the state machine and every SQL statement
(the engine that sends them is :mod:`chargegw.domain.webhook_delivery`).

A subscription's deliveries form one queue per ordering key (the device, else the
gateway); one delivery of a queue is in flight at a time, its first open one by id, so a
device's events reach the receiver in the order of their ids while other devices go on.
A live event's deliveries are made when ``sequence_events()`` gives it its id (one caller
at a time, in id order: ``0024_webhook_fanout_in_sequence.sql``), so their ids follow
the events'; a replay or a delivered one sent again goes at the end of its queue, and a
failed one an operator retries first. A row inserted while its queue has an open row
waits ``queued`` (out of the due index: a queue blocked behind a failing head costs
nothing however long it grows) and is made ``pending`` when the rows ahead are done. A
row inserted behind a head whose finish did not see it (the transactions overlapped)
waits ``queued`` with nobody to promote it: the engine looks at such queues again
shortly after a finish, and :func:`promote_orphans` sweeps for the rest; a ``pending``
row behind it is not claimed meanwhile (only a queue's first open row is, or a claimed
one whose claimer died).
States (``DeliveryStatus``), and the only transitions the code makes
(:data:`MACHINE`)::

    (insert) --behind an open row--> queued --the row ahead finished--> pending
    (insert) --at the head--> pending --claim--> delivering --2xx--> delivered
    delivering --failed attempt--> pending (next attempt per the schedule)
    delivering --failed, older than disable_after--> failed
    delivering --the event no longer exists (retention)--> cancelled
    delivering --claim (the claimer's lease ran out: it died)--> delivering
    pending|failed --an operator's retry--> pending

Claiming is shared by every process: in one transaction, a statement locks the enabled
subscriptions with due deliveries that no other process is claiming for (an advisory
lock per subscription, tried, not waited for), and the next (whose snapshot sees every
claim committed before the locks) counts their live claims against ``max_concurrency``
and takes the due heads, oldest first. A
claim counts the attempt and holds a lease (its ``next_attempt_at``); a process that
dies mid-delivery leaves the row to be claimed again when the lease runs out, with the
same ``webhook-id``. Finishing writes the outcome only while the claim is
still the caller's (owner and attempt number), makes the next row of the queue pending
in the same transaction, and updates the subscription: ``failing_since`` on the first
failure after a success, cleared on a success; a failure while it has been failing for
``disable_after`` (or a 410 Gone) disables it and emits ``webhook.disabled``. A disabled
subscription keeps its open deliveries: enabling it again resumes them.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import json
import random
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
from pydantic import BaseModel, Field

from chargegw.domain.machine import StateMachine
from chargegw.domain.pages import Page, Where, page_of
from chargegw.domain.refusals import ConflictError, InvalidError, NotFoundError
from chargegw.store.database import Connection

__all__ = [
    "FINISHED",
    "MACHINE",
    "MAX_REPLAY",
    "OPEN",
    "UNSET",
    "Attempt",
    "Claimed",
    "Delivery",
    "DeliveryEvent",
    "DeliveryStatus",
    "Finished",
    "ReplayResult",
    "Subscription",
    "SubscriptionChanges",
    "SubscriptionFields",
    "SuccessCache",
    "WebhookEvent",
    "backlog",
    "claim",
    "create_subscription",
    "delete_subscription",
    "finish",
    "get_delivery",
    "get_subscription",
    "list_deliveries",
    "list_subscriptions",
    "new_secret",
    "next_delay",
    "ping",
    "promote_orphans",
    "promote_queues",
    "purge",
    "replay",
    "retry_delivery",
    "rotate_secret",
    "update_subscription",
]

#: a replay creates at most this many deliveries (more: a 422, replay in parts)
MAX_REPLAY = 100_000
#: stored of a receiver's answer
RESPONSE_BODY_CHARS = 1024
#: a success updates the subscription's ``last_success_at`` at most this often per process
_SUCCESS_WRITE_S = 1.0


class DeliveryStatus(str, enum.Enum):
    """Where a delivery is: waiting behind its queue's head, due, in flight, done."""

    QUEUED = "queued"
    PENDING = "pending"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DeliveryEvent(str, enum.Enum):
    """What happens to a delivery."""

    ENQUEUE = "enqueue"
    CREATE = "create"
    PROMOTE = "promote"
    CLAIM = "claim"
    SUCCEED = "succeed"
    FAIL = "fail"
    GIVE_UP = "give_up"
    CANCEL = "cancel"
    RETRY = "retry"


_S = DeliveryStatus
_E = DeliveryEvent

#: the deliveries' transitions (the insert trigger of 0013_webhooks.sql makes the first two)
MACHINE: StateMachine[DeliveryStatus, DeliveryEvent] = StateMachine(
    "webhook delivery",
    {
        (None, _E.ENQUEUE): _S.QUEUED,
        (None, _E.CREATE): _S.PENDING,
        (_S.QUEUED, _E.PROMOTE): _S.PENDING,
        (_S.PENDING, _E.CLAIM): _S.DELIVERING,
        (_S.DELIVERING, _E.CLAIM): _S.DELIVERING,
        (_S.DELIVERING, _E.SUCCEED): _S.DELIVERED,
        (_S.DELIVERING, _E.FAIL): _S.PENDING,
        (_S.DELIVERING, _E.GIVE_UP): _S.FAILED,
        (_S.DELIVERING, _E.CANCEL): _S.CANCELLED,
        (_S.PENDING, _E.RETRY): _S.PENDING,
        (_S.FAILED, _E.RETRY): _S.PENDING,
    },
)

#: a queue's rows not finished yet
OPEN = (_S.QUEUED, _S.PENDING, _S.DELIVERING)
FINISHED = (_S.DELIVERED, _S.FAILED, _S.CANCELLED)


def _sql_list(states: Iterable[DeliveryStatus]) -> str:
    """States as SQL literals (not parameters: the partial indexes' predicates must be
    provable from the query text)."""
    return ", ".join(f"'{s.value}'" for s in sorted(states, key=lambda s: s.value))


def _one(event: DeliveryEvent) -> tuple[str, str]:
    """An event's target and its sources as SQL text, from the table."""
    target, sources = MACHINE.step(event)
    return f"'{target}'", ", ".join(f"'{s}'" for s in sources)


_OPEN_SQL = _sql_list(OPEN)
#: the rows of a queue that may be in flight or next: never more than a few. A lookup of
#: the one in flight says "in here, not pending" (not "= delivering"): the index of every
#: claim of the subscription would serve that too, and scan them all per row
_HEADS_SQL = _sql_list((_S.PENDING, _S.DELIVERING))
_FINISHED_SQL = _sql_list(FINISHED)
_CLAIM_TO, _CLAIM_FROM = _one(_E.CLAIM)
_SUCCEED_TO, _SUCCEED_FROM = _one(_E.SUCCEED)
_FAIL_TO, _FAIL_FROM = _one(_E.FAIL)
_GIVE_UP_TO, _ = _one(_E.GIVE_UP)
_CANCEL_TO, _CANCEL_FROM = _one(_E.CANCEL)
_PROMOTE_TO, _PROMOTE_FROM = _one(_E.PROMOTE)
_RETRY_TO, _RETRY_FROM = _one(_E.RETRY)
_DELIVERING = f"'{_S.DELIVERING.value}'"
_PENDING = f"'{_S.PENDING.value}'"


def _next_open(sub: str, key: str, after: str = "") -> str:
    """The SQL of a queue's next row, its first open one by delivery id (the queue named
    by the expressions ``sub`` and ``key``; ``after`` adds a condition on ``q``)."""
    return f"""SELECT q.id FROM webhook_deliveries q
             WHERE q.subscription_id = {sub} AND q.ordering_key = {key}
               AND q.status IN ({_OPEN_SQL}) {after}
             ORDER BY q.id LIMIT 1"""


# ---------------------------------------------------------------- secrets and retries


def new_secret() -> str:
    """A signing secret in the Standard Webhooks format: ``whsec_`` + base64 of 24
    random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def next_delay(
    attempts: int,
    schedule: Sequence[float],
    *,
    jitter: float = 0.2,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds until the attempt after ``attempts`` failed ones: the schedule's entry for
    it (the last entry repeats), within +-``jitter`` of it; never sooner than a
    ``Retry-After`` the receiver asked for, which is capped at the schedule's last entry."""
    base = schedule[min(max(attempts, 1), len(schedule)) - 1]
    delay = base * (1 + (rng or random).uniform(-jitter, jitter))
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, schedule[-1]))
    return max(delay, 0.0)


# ---------------------------------------------------------------- subscriptions


class Subscription(BaseModel):
    """A webhook subscription (its secret is shown only when made or rotated)."""

    id: int
    url: str
    description: str
    event_types: list[str] = Field(description="type patterns; `*` is any run of characters")
    device_ids: list[str] | None = Field(description="only these devices (null: any)")
    gateway_ids: list[str] | None = Field(description="only these gateways (null: any)")
    protocol: str | None = Field(description="only this protocol (null: any)")
    enabled: bool
    disabled_reason: str | None = Field(
        description="`manual`, `failing` (for the disable period) or `gone` (410)"
    )
    disabled_at: dt.datetime | None
    max_concurrency: int = Field(description="deliveries in flight at once, over all processes")
    timeout_s: float = Field(description="an attempt's connect and total timeout")
    failing_since: dt.datetime | None = Field(
        description="the first failure since the last success (null while it succeeds)"
    )
    last_success_at: dt.datetime | None
    previous_secret_until: dt.datetime | None = Field(
        description="during a rotation: until when the previous secret signs too"
    )
    created_by: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


_SUBSCRIPTION_COLUMNS = """id, url, description, event_types, device_ids, gateway_ids,
    protocol, enabled, disabled_reason, disabled_at, max_concurrency, timeout_s,
    failing_since, last_success_at,
    CASE WHEN previous_secret_until > now() THEN previous_secret_until END
        AS previous_secret_until,
    created_by, created_at, updated_at"""


def _subscription(row: asyncpg.Record) -> Subscription:
    return Subscription.model_validate(dict(row))


@dataclasses.dataclass(frozen=True)
class SubscriptionFields:
    """What a new subscription is made of (validated by the API)."""

    url: str
    event_types: list[str]
    device_ids: list[str] | None = None
    gateway_ids: list[str] | None = None
    protocol: str | None = None
    description: str = ""
    enabled: bool = True
    max_concurrency: int = 10
    timeout_s: float = 10.0


class _Unset(enum.Enum):
    UNSET = "unset"


#: a field a change leaves as it is
UNSET = _Unset.UNSET


@dataclasses.dataclass(frozen=True)
class SubscriptionChanges:
    """The fields a PATCH changes; ``UNSET`` leaves one as it is (None clears a filter)."""

    url: str | _Unset = UNSET
    event_types: list[str] | _Unset = UNSET
    device_ids: list[str] | _Unset | None = UNSET
    gateway_ids: list[str] | _Unset | None = UNSET
    protocol: str | _Unset | None = UNSET
    description: str | _Unset = UNSET
    enabled: bool | _Unset = UNSET
    max_concurrency: int | _Unset = UNSET
    timeout_s: float | _Unset = UNSET


async def create_subscription(
    conn: Connection, fields: SubscriptionFields, *, secret: str, created_by: str | None
) -> Subscription:
    """Insert a subscription; it receives the events sequenced after it commits."""
    row = await conn.fetchrow(
        f"""INSERT INTO webhook_subscriptions
               (url, description, event_types, device_ids, gateway_ids, protocol, enabled,
                disabled_reason, disabled_at, secret, max_concurrency, timeout_s, created_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7,
                    CASE WHEN NOT $7 THEN 'manual' END, CASE WHEN NOT $7 THEN now() END,
                    $8, $9, $10, $11)
            RETURNING {_SUBSCRIPTION_COLUMNS}""",
        fields.url,
        fields.description,
        fields.event_types,
        fields.device_ids,
        fields.gateway_ids,
        fields.protocol,
        fields.enabled,
        secret,
        fields.max_concurrency,
        fields.timeout_s,
        created_by,
    )
    assert row is not None
    return _subscription(row)


async def get_subscription(conn: Connection, subscription_id: int) -> Subscription | None:
    """One subscription, or None."""
    row = await conn.fetchrow(
        f"SELECT {_SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE id = $1",
        subscription_id,
    )
    return None if row is None else _subscription(row)


async def list_subscriptions(
    conn: Connection, *, after_id: int | None, limit: int
) -> Page[Subscription]:
    """Subscriptions in id order, after ``after_id``."""
    where = Where()
    if after_id is not None:
        where.add("id > {}", after_id)
    rows = await conn.fetch(
        f"""SELECT {_SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions {where.sql()}
            ORDER BY id {where.limit(limit)}""",
        *where.args,
    )
    return page_of([_subscription(r) for r in rows], limit)


#: the columns a change may set, by field of :class:`SubscriptionChanges`
_CHANGEABLE = (
    "url",
    "event_types",
    "device_ids",
    "gateway_ids",
    "protocol",
    "description",
    "max_concurrency",
    "timeout_s",
)


async def update_subscription(
    conn: Connection, subscription_id: int, changes: SubscriptionChanges
) -> Subscription | None:
    """Apply ``changes``; None if there is no such subscription. Enabling clears the
    reason it was disabled and its failure record (a fresh start); disabling by hand
    records ``manual``. Deliveries already made keep the filters they were made with."""
    where = Where()
    where.add("id = {}", subscription_id)
    sets = ["updated_at = now()"]
    for name in _CHANGEABLE:
        value = getattr(changes, name)
        if value is not UNSET:
            where.args.append(value)
            sets.append(f"{name} = ${len(where.args)}")
    if changes.enabled is not UNSET:
        where.args.append(changes.enabled)
        n = f"${len(where.args)}"
        sets += [
            f"enabled = {n}",
            f"disabled_reason = CASE WHEN {n} THEN NULL WHEN enabled THEN 'manual'"
            " ELSE disabled_reason END",
            f"disabled_at = CASE WHEN {n} THEN NULL WHEN enabled THEN now() ELSE disabled_at END",
            f"failing_since = CASE WHEN {n} AND NOT enabled THEN NULL ELSE failing_since END",
        ]
    row = await conn.fetchrow(
        f"""UPDATE webhook_subscriptions SET {", ".join(sets)} {where.sql()}
            RETURNING {_SUBSCRIPTION_COLUMNS}""",
        *where.args,
    )
    return None if row is None else _subscription(row)


async def delete_subscription(conn: Connection, subscription_id: int) -> bool:
    """Delete a subscription and its deliveries (an attempt in flight is not recorded)."""
    deleted = await conn.fetchval(
        "DELETE FROM webhook_subscriptions WHERE id = $1 RETURNING id", subscription_id
    )
    return deleted is not None


async def rotate_secret(
    conn: Connection, subscription_id: int, *, secret: str, overlap_s: float
) -> Subscription | None:
    """A new secret; the current one keeps signing too for ``overlap_s`` (0: not at all)."""
    row = await conn.fetchrow(
        f"""UPDATE webhook_subscriptions
               SET previous_secret = CASE WHEN $3 > 0 THEN secret END,
                   previous_secret_until = CASE WHEN $3 > 0
                       THEN now() + make_interval(secs => $3) END,
                   secret = $2, updated_at = now()
             WHERE id = $1
            RETURNING {_SUBSCRIPTION_COLUMNS}""",
        subscription_id,
        secret,
        float(overlap_s),
    )
    return None if row is None else _subscription(row)


# ---------------------------------------------------------------- the delivery ledger


class Delivery(BaseModel):
    """One delivery of an event (or a ping) to a subscription, and its attempts so far."""

    id: int
    subscription_id: int
    event_id: int | None = Field(description="null for a ping, and until the event is sequenced")
    type: str
    webhook_id: str | None = Field(
        description="the `webhook-id` header: the same for every attempt and for copies "
        "made by a retry (null until the event is sequenced)"
    )
    origin: str = Field(description="event, replay, retry or ping")
    status: DeliveryStatus
    attempts: int
    response_status: int | None = Field(description="the last attempt's HTTP status")
    response_body: str | None = Field(description="its first 1 KiB")
    latency_ms: float | None = Field(description="the last attempt's duration")
    last_error: str | None = Field(description="why the last failed attempt failed")
    created_at: dt.datetime
    first_attempt_at: dt.datetime | None
    last_attempt_at: dt.datetime | None
    next_attempt_at: dt.datetime | None = Field(
        description="pending: when it is due; delivering: when its claim runs out"
    )
    finished_at: dt.datetime | None


_DELIVERY_COLUMNS = f"""d.id, d.subscription_id, e.id AS event_id,
    coalesce(e.type, d.payload ->> 'type', '') AS type,
    coalesce(d.webhook_id, 'evt_' || e.id) AS webhook_id, d.origin, d.status, d.attempts,
    d.response_status, d.response_body, d.latency_ms, d.last_error, d.created_at,
    d.first_attempt_at, d.last_attempt_at,
    CASE WHEN d.status IN ({_sql_list((_S.PENDING, _S.DELIVERING))})
         THEN d.next_attempt_at END AS next_attempt_at,
    d.finished_at"""


def _delivery(row: asyncpg.Record) -> Delivery:
    return Delivery.model_validate(dict(row))


async def get_delivery(conn: Connection, subscription_id: int, delivery_id: int) -> Delivery | None:
    """One delivery of a subscription, or None."""
    row = await conn.fetchrow(
        f"""SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d
            LEFT JOIN events e ON e.pk = d.event_pk
            WHERE d.subscription_id = $1 AND d.id = $2""",
        subscription_id,
        delivery_id,
    )
    return None if row is None else _delivery(row)


async def list_deliveries(
    conn: Connection,
    subscription_id: int,
    *,
    status: DeliveryStatus | None,
    type_pattern: str | None,
    before_id: int | None,
    limit: int,
) -> Page[Delivery]:
    """A subscription's deliveries, newest first; ``type_pattern`` may hold ``*``."""
    where = Where()
    where.add("d.subscription_id = {}", subscription_id)
    if status is not None:
        where.add("d.status = {}", status.value)
    if type_pattern is not None:
        where.add(
            "event_type_matches({}, coalesce(e.type, d.payload ->> 'type', ''))", type_pattern
        )
    if before_id is not None:
        where.add("d.id < {}", before_id)
    rows = await conn.fetch(
        f"""SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d
            LEFT JOIN events e ON e.pk = d.event_pk
            {where.sql()} ORDER BY d.id DESC {where.limit(limit)}""",
        *where.args,
    )
    return page_of([_delivery(r) for r in rows], limit)


async def retry_delivery(conn: Connection, subscription_id: int, delivery_id: int) -> Delivery:
    """Attempt a delivery again now. A pending one is made due; a failed one pending
    again (an attempt at once, not behind the device's queue); a delivered one is sent
    again as a new delivery (origin ``retry``, the same ``webhook-id``) at the end of its
    queue. Queued and in-flight ones are a conflict, a cancelled one (its event is gone)
    too."""
    row = await conn.fetchrow(
        "SELECT status FROM webhook_deliveries WHERE id = $1 AND subscription_id = $2 FOR UPDATE",
        delivery_id,
        subscription_id,
    )
    if row is None:
        raise NotFoundError(f"webhook {subscription_id} has no delivery {delivery_id}")
    current = DeliveryStatus(row["status"])
    new_id = delivery_id
    if current is DeliveryStatus.DELIVERED:
        new_id = await conn.fetchval(
            """INSERT INTO webhook_deliveries
                   (subscription_id, event_pk, payload, ordering_key, origin, webhook_id)
               SELECT subscription_id, event_pk, payload, ordering_key, 'retry', webhook_id
                 FROM webhook_deliveries WHERE id = $1
               RETURNING id""",
            delivery_id,
        )
    elif MACHINE.next(current, DeliveryEvent.RETRY) is not None:
        await conn.execute(
            f"""UPDATE webhook_deliveries
                   SET status = {_RETRY_TO}, next_attempt_at = now(), finished_at = NULL,
                       claimed_by = NULL, lease_until = NULL
                 WHERE id = $1 AND status IN ({_RETRY_FROM})""",
            delivery_id,
        )
    elif current is DeliveryStatus.QUEUED:
        raise ConflictError(
            f"delivery {delivery_id} waits for an earlier delivery of the same device; "
            "retry that one"
        )
    elif current is DeliveryStatus.DELIVERING:
        raise ConflictError(f"delivery {delivery_id} is being attempted now")
    else:
        raise ConflictError(f"delivery {delivery_id} was cancelled: its event no longer exists")
    found = await get_delivery(conn, subscription_id, new_id)
    assert found is not None
    return found


@dataclasses.dataclass(frozen=True)
class ReplayResult:
    """What a replay queued."""

    deliveries: int
    first_event_id: int | None
    last_event_id: int | None


async def replay(
    conn: Connection,
    subscription_id: int,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    after_event_id: int | None = None,
    limit: int = MAX_REPLAY,
) -> ReplayResult:
    """New deliveries (origin ``replay``) of the sequenced events of a window that the
    subscription's types and filters select, in event id order, each queued behind what
    its device already has open. ``InvalidError`` (on the window's field) beyond ``limit``."""
    sub = await conn.fetchrow(
        """SELECT event_types, device_ids, gateway_ids, protocol FROM webhook_subscriptions
            WHERE id = $1 FOR KEY SHARE""",
        subscription_id,
    )
    if sub is None:
        raise NotFoundError(f"webhook {subscription_id} not found")
    where = Where()
    where.add("e.id IS NOT NULL")
    where.add(
        "EXISTS (SELECT 1 FROM unnest({}::text[]) AS t(p) WHERE event_type_matches(t.p, e.type))",
        sub["event_types"],
    )
    if sub["device_ids"] is not None:
        where.add("e.device_id = ANY({}::text[])", sub["device_ids"])
    if sub["gateway_ids"] is not None:
        where.add("e.gateway_id = ANY({}::text[])", sub["gateway_ids"])
    if sub["protocol"] is not None:
        where.add("e.protocol = {}", sub["protocol"])
    if after_event_id is not None:
        where.add("e.id > {}", after_event_id)
    if since is not None:
        where.add("e.at >= {}", since)
    if until is not None:
        where.add("e.at <= {}", until)
    count = await conn.fetchval(
        f"SELECT count(*) FROM (SELECT 1 FROM events e {where.sql()} LIMIT {limit + 1}) AS w",
        *where.args,
    )
    if count > limit:
        field = "after_event_id" if after_event_id is not None else "since"
        raise InvalidError(
            {
                "error": f"the window holds more than {limit} events; replay it in parts",
                "field": field,
            }
        )
    where.args.append(subscription_id)
    row = await conn.fetchrow(
        f"""WITH made AS (
                INSERT INTO webhook_deliveries (subscription_id, event_pk, ordering_key, origin)
                SELECT ${len(where.args)}, e.pk, coalesce(e.device_id, e.gateway_id, ''),
                       'replay'
                  FROM events e {where.sql()}
                 ORDER BY e.id
                RETURNING event_pk)
            SELECT count(*) AS n, min(e.id) AS first, max(e.id) AS last
              FROM made JOIN events e ON e.pk = made.event_pk""",
        *where.args,
    )
    assert row is not None
    return ReplayResult(row["n"], row["first"], row["last"])


async def ping(conn: Connection, subscription_id: int, *, message: str) -> Delivery:
    """A test delivery (``webhook.ping``, ``webhook-id: ping_<delivery id>``), in a queue
    of its own; ``ConflictError`` if the subscription is disabled."""
    enabled = await conn.fetchval(
        "SELECT enabled FROM webhook_subscriptions WHERE id = $1 FOR KEY SHARE", subscription_id
    )
    if enabled is None:
        raise NotFoundError(f"webhook {subscription_id} not found")
    if not enabled:
        raise ConflictError(f"webhook {subscription_id} is disabled; enable it first")
    delivery_id = await conn.fetchval(
        """WITH n AS (SELECT nextval(pg_get_serial_sequence('webhook_deliveries', 'id')) AS id)
           INSERT INTO webhook_deliveries
                  (id, subscription_id, payload, ordering_key, origin, webhook_id)
           SELECT n.id, $1::bigint,
                  jsonb_build_object(
                      'type', 'webhook.ping',
                      'timestamp', to_char(now() AT TIME ZONE 'UTC',
                                           'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                      'data', jsonb_build_object('message', $2::text,
                                                 'subscription_id', $1::bigint)),
                  'ping:' || n.id, 'ping', 'ping_' || n.id
             FROM n
           RETURNING id""",
        subscription_id,
        message,
    )
    found = await get_delivery(conn, subscription_id, delivery_id)
    assert found is not None
    return found


# ---------------------------------------------------------------- claiming and finishing


@dataclasses.dataclass(frozen=True)
class WebhookEvent:
    """The event a delivery carries (its row of ``events``)."""

    id: int
    type: str
    at: dt.datetime
    device_id: str | None
    gateway_id: str | None
    protocol: str | None
    port: int | None
    order_no: str | None
    command_id: int | None
    job_id: int | None
    frame_id: int | None
    data: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Claimed:
    """A delivery this process claimed: what to send where, and its claim."""

    delivery_id: int
    subscription_id: int
    #: the attempt this claim makes (the claim's identity with the owner)
    attempt: int
    ordering_key: str
    origin: str
    #: the event (None for a ping, whose body is ``payload``, or when ``event_gone``)
    event: WebhookEvent | None
    payload: dict[str, Any] | None
    #: the event was deleted (retention) before it was delivered
    event_gone: bool
    webhook_id: str | None
    url: str
    #: the current secret, then the previous one during a rotation's overlap
    secrets: tuple[str, ...]
    timeout_s: float


#: one process at a time claims for a subscription: an advisory lock (its key is this +
#: the subscription's id) held by the claiming statement; a row lock would write the
#: subscription's row at every claim
_CLAIM_LOCK = 0x57484B43 << 32  # "WHKC"

# Every lookup is a scalar subquery (never flattened into a join) on its own index: the
# rows ahead in a queue, the first due row, the live claims. Planned the same with fresh
# statistics or none (a burst into a new table), never a scan of a queue per row.
_LOCK_SUBSCRIPTIONS = f"""
SELECT s.id FROM webhook_subscriptions s
 WHERE s.enabled
   AND (SELECT w.id FROM webhook_deliveries w
         WHERE w.subscription_id = s.id AND w.status IN ({_CLAIM_FROM})
           AND w.next_attempt_at <= now()
         ORDER BY w.next_attempt_at LIMIT 1) IS NOT NULL
   AND pg_try_advisory_xact_lock({_CLAIM_LOCK} + s.id)
"""

_CLAIM = f"""
WITH subs AS MATERIALIZED (
    SELECT s.id, s.url, s.secret, s.timeout_s,
           CASE WHEN s.previous_secret_until > now() THEN s.previous_secret END AS previous,
           s.max_concurrency - (
               SELECT count(*) FROM webhook_deliveries x
                WHERE x.subscription_id = s.id AND x.status = {_DELIVERING}
                  AND x.next_attempt_at > now()) AS room
      FROM webhook_subscriptions s
     WHERE s.enabled AND s.id = ANY ($4::bigint[])
),
picked AS MATERIALIZED (
    SELECT c.*, s.url, s.secret, s.previous, s.timeout_s
      FROM subs s
     CROSS JOIN LATERAL (
        SELECT d.id, d.event_pk, d.payload, d.webhook_id, d.origin, e.pk AS e_pk,
               e.id AS e_id, e.type, e.at, e.device_id, e.gateway_id, e.protocol, e.port,
               e.order_no, e.command_id, e.job_id, e.frame_id, e.data
          FROM webhook_deliveries d
          LEFT JOIN events e ON e.pk = d.event_pk
         WHERE d.subscription_id = s.id
           AND d.status IN ({_CLAIM_FROM})
           AND d.next_attempt_at <= now()
           AND (d.event_pk IS NULL OR e.pk IS NULL OR e.id IS NOT NULL)
           AND (SELECT 1 FROM webhook_deliveries h
                 WHERE h.subscription_id = d.subscription_id
                   AND h.ordering_key = d.ordering_key
                   AND h.status IN ({_HEADS_SQL}) AND h.status <> {_PENDING}
                   AND h.id <> d.id
                 ORDER BY h.id LIMIT 1) IS NULL
           AND (d.status = {_DELIVERING}
                OR d.id = ({_next_open("d.subscription_id", "d.ordering_key")}))
         ORDER BY d.next_attempt_at, d.id
         LIMIT greatest(s.room, 0)
     ) c
     WHERE s.room > 0
     LIMIT $2
),
claimed AS (
    UPDATE webhook_deliveries d
       SET status = {_CLAIM_TO}, claimed_by = $1, attempts = d.attempts + 1,
           lease_until = now() + make_interval(secs => d_timeout.timeout_s + $3),
           next_attempt_at = now() + make_interval(secs => d_timeout.timeout_s + $3),
           first_attempt_at = coalesce(d.first_attempt_at, now()), last_attempt_at = now()
      FROM (SELECT id, timeout_s FROM picked) AS d_timeout
     WHERE d.id = d_timeout.id
       AND d.status IN ({_CLAIM_FROM}) AND d.next_attempt_at <= now()
    RETURNING d.id, d.subscription_id, d.attempts, d.ordering_key
)
SELECT c.id, c.subscription_id, c.attempts, c.ordering_key, p.origin, p.payload,
       p.webhook_id, p.event_pk, p.e_pk, p.e_id, p.type, p.at, p.device_id, p.gateway_id,
       p.protocol, p.port, p.order_no, p.command_id, p.job_id, p.frame_id, p.data, p.url,
       p.secret, p.previous, p.timeout_s
  FROM claimed c JOIN picked p ON p.id = c.id
"""


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def claim(
    conn: Connection, owner: str, *, limit: int, lease_margin_s: float
) -> list[Claimed]:
    """Claim up to ``limit`` due deliveries for ``owner`` (see the module docstring); the
    lease is the subscription's timeout plus ``lease_margin_s``. The subscriptions are
    locked first, and their rows read by a statement that starts after: read in the
    same statement, a snapshot from before the lock could miss the claim another
    process committed meanwhile, and put a second row of a queue in flight."""
    async with conn.transaction():
        locked = [r["id"] for r in await conn.fetch(_LOCK_SUBSCRIPTIONS)]
        if not locked:
            return []
        rows = await conn.fetch(_CLAIM, owner, limit, float(lease_margin_s), locked)
    claimed = []
    for r in rows:
        event = None
        if r["e_id"] is not None:
            event = WebhookEvent(
                id=r["e_id"],
                type=r["type"],
                at=r["at"],
                device_id=r["device_id"],
                gateway_id=r["gateway_id"],
                protocol=r["protocol"],
                port=r["port"],
                order_no=r["order_no"],
                command_id=r["command_id"],
                job_id=r["job_id"],
                frame_id=r["frame_id"],
                data=_json(r["data"]) or {},
            )
        gone = r["event_pk"] is not None and r["e_pk"] is None
        claimed.append(
            Claimed(
                delivery_id=r["id"],
                subscription_id=r["subscription_id"],
                attempt=r["attempts"],
                ordering_key=r["ordering_key"],
                origin=r["origin"],
                event=event,
                payload=_json(r["payload"]),
                event_gone=gone,
                webhook_id=r["webhook_id"] or (f"evt_{event.id}" if event else None),
                url=r["url"],
                secrets=(r["secret"],) + ((r["previous"],) if r["previous"] else ()),
                timeout_s=r["timeout_s"],
            )
        )
    return claimed


@dataclasses.dataclass(frozen=True)
class Attempt:
    """The outcome of one attempt, to be written by :func:`finish`."""

    delivery_id: int
    subscription_id: int
    attempt: int
    #: 2xx
    ok: bool
    #: why it failed (a stable word: timeout, connect, status_5xx ...); None when ok
    reason: str | None = None
    #: the failure in words
    error: str | None = None
    response_status: int | None = None
    response_body: str | None = None
    latency_ms: float | None = None
    #: seconds until the next attempt (failures)
    delay_s: float = 0.0
    #: the receiver answered 410 Gone: disable the subscription
    gone: bool = False
    #: the event no longer exists: cancel the delivery
    cancel: bool = False


@dataclasses.dataclass(frozen=True)
class Finished:
    """What :func:`finish` wrote."""

    #: delivery ids recorded delivered / failed for good / to be retried / cancelled
    delivered: list[int]
    given_up: list[int]
    retrying: list[int]
    cancelled: list[int]
    #: attempts whose claim was no longer ours (another process took the row over)
    stale: list[int]
    #: subscriptions disabled now, with the reason (gone, failing)
    disabled: list[tuple[int, str]]
    #: the queues (subscription, ordering key) whose head finished: their next row was
    #: made pending, unless it was still being written (see :func:`promote_queues`)
    queues: list[tuple[int, str]] = dataclasses.field(default_factory=list)


class SuccessCache:
    """When this process last wrote a subscription's success (to write it at most once
    a second per subscription: the row is hot under load)."""

    def __init__(self) -> None:
        self._written: dict[int, float] = {}

    def due(self, subscription_id: int, now: float) -> bool:
        last = self._written.get(subscription_id)
        return last is None or now - last >= _SUCCESS_WRITE_S

    def written(self, subscription_id: int, now: float) -> None:
        self._written[subscription_id] = now

    def failed(self, subscription_id: int) -> None:
        self._written.pop(subscription_id, None)


def _text(value: str | None, limit: int = RESPONSE_BODY_CHARS) -> str | None:
    """Text PostgreSQL can hold (no NUL), cut to ``limit`` characters."""
    if value is None:
        return None
    return value.replace("\x00", "\ufffd")[:limit]


async def finish(
    conn: Connection,
    owner: str,
    attempts: Sequence[Attempt],
    *,
    disable_after_s: float,
    success_cache: SuccessCache,
    now: float,
) -> Finished:
    """Write the outcomes of ``attempts`` (see the module docstring): one statement when
    they all succeeded and no subscription needs a write (the common case under load),
    else one transaction in which the subscriptions are locked first, in id order (two
    finishers never wait for each other's subscriptions in opposite orders)."""
    ok_subs = {a.subscription_id for a in attempts if a.ok}
    success_writes = sorted(s for s in ok_subs if success_cache.due(s, now))
    if all(a.ok for a in attempts) and not success_writes:
        done = await _delivered(conn, owner, attempts)
        written = {d for d, _, _ in done}
        stale = [a.delivery_id for a in attempts if a.delivery_id not in written]
        return Finished([d for d, _, _ in done], [], [], [], stale, [], _keys(done))
    async with conn.transaction():
        return await _finish_mixed(
            conn, owner, attempts, disable_after_s, success_cache, now, success_writes
        )


def _keys(rows: Sequence[tuple[int, int, str]]) -> list[tuple[int, str]]:
    return sorted({(sub, key) for _, sub, key in rows})


async def _delivered(
    conn: Connection, owner: str, ok: Sequence[Attempt]
) -> list[tuple[int, int, str]]:
    """Record successes still claimed by ``owner``, and make the next row of each of
    their queues pending, in one statement; (id, subscription, ordering key) of each."""
    next_open = _next_open("done.subscription_id", "done.ordering_key", "AND q.id <> done.id")
    rows = await conn.fetch(
        f"""WITH done AS (
                UPDATE webhook_deliveries d
                   SET status = {_SUCCEED_TO}, finished_at = now(), claimed_by = NULL,
                       lease_until = NULL, response_status = u.code, response_body = u.body,
                       latency_ms = u.latency
                  FROM unnest($2::bigint[], $3::int[], $4::int[], $5::text[], $6::float8[])
                       AS u(id, attempts, code, body, latency)
                 WHERE d.id = ANY ($2::bigint[]) AND d.id = u.id AND d.attempts = u.attempts
                   AND d.claimed_by = $1 AND d.status IN ({_SUCCEED_FROM})
                RETURNING d.id, d.subscription_id, d.ordering_key),
            nexts AS (
                SELECT ({next_open}) AS id
                  FROM done),
            promoted AS (
                UPDATE webhook_deliveries p SET status = {_PROMOTE_TO}
                 WHERE p.id IN (SELECT id FROM nexts) AND p.status IN ({_PROMOTE_FROM}))
            SELECT id, subscription_id, ordering_key FROM done""",
        owner,
        [a.delivery_id for a in ok],
        [a.attempt for a in ok],
        [a.response_status for a in ok],
        [_text(a.response_body) for a in ok],
        [a.latency_ms for a in ok],
    )
    return [(r["id"], r["subscription_id"], r["ordering_key"]) for r in rows]


async def _finish_mixed(
    conn: Connection,
    owner: str,
    attempts: Sequence[Attempt],
    disable_after_s: float,
    success_cache: SuccessCache,
    now: float,
    success_writes: list[int],
) -> Finished:
    ok_subs = {a.subscription_id for a in attempts if a.ok}
    failed_subs = {a.subscription_id for a in attempts if not a.ok and not a.cancel} - ok_subs
    gone_subs = sorted({a.subscription_id for a in attempts if a.gone})
    disabled: list[tuple[int, str]] = []
    touched = sorted(set(success_writes) | failed_subs | set(gone_subs))
    if touched:
        await conn.execute(
            """SELECT 1 FROM webhook_subscriptions WHERE id = ANY($1::bigint[])
                ORDER BY id FOR NO KEY UPDATE""",
            touched,
        )
    if success_writes:
        await conn.execute(
            """UPDATE webhook_subscriptions SET last_success_at = now(), failing_since = NULL
                WHERE id = ANY($1::bigint[])""",
            success_writes,
        )
        for s in success_writes:
            success_cache.written(s, now)
    if failed_subs or gone_subs:
        for s in failed_subs:
            success_cache.failed(s)
        rows = await conn.fetch(
            """WITH old AS (
                   SELECT id, enabled, coalesce(failing_since, now()) AS failing_since
                     FROM webhook_subscriptions WHERE id = ANY($1::bigint[])),
               decided AS (
                   SELECT id, failing_since,
                          CASE WHEN NOT enabled THEN NULL
                               WHEN id = ANY($2::bigint[]) THEN 'gone'
                               WHEN failing_since < now() - make_interval(secs => $3)
                                   THEN 'failing' END AS disable
                     FROM old)
               UPDATE webhook_subscriptions s
                  SET failing_since = CASE WHEN s.id = ANY($4::bigint[])
                                           THEN d.failing_since ELSE s.failing_since END,
                      enabled = s.enabled AND d.disable IS NULL,
                      disabled_reason = coalesce(d.disable, s.disabled_reason),
                      disabled_at = CASE WHEN d.disable IS NOT NULL THEN now()
                                         ELSE s.disabled_at END,
                      updated_at = CASE WHEN d.disable IS NOT NULL THEN now()
                                        ELSE s.updated_at END
                 FROM decided d
                WHERE s.id = d.id
               RETURNING s.id, d.disable""",
            sorted(failed_subs | set(gone_subs)),
            gone_subs,
            float(disable_after_s),
            sorted(failed_subs),
        )
        for r in rows:
            if r["disable"] is not None:
                disabled.append((r["id"], r["disable"]))
                await conn.execute(
                    """SELECT emit_event('webhook.disabled', NULL, NULL, NULL, NULL, NULL,
                                         jsonb_build_object('subscription_id', $1::bigint,
                                                            'reason', $2::text))""",
                    r["id"],
                    r["disable"],
                )
    ok = [a for a in attempts if a.ok]
    bad = [a for a in attempts if not a.ok and not a.cancel]
    cancel = [a for a in attempts if a.cancel]
    delivered: list[int] = []
    given_up: list[int] = []
    retrying: list[int] = []
    cancelled: list[int] = []
    moved: list[tuple[int, str]] = []
    finished_queues: list[tuple[int, str]] = []
    if ok:
        done = await _delivered(conn, owner, ok)
        delivered = [d for d, _, _ in done]
        finished_queues = _keys(done)
    if bad:
        rows = await conn.fetch(
            f"""UPDATE webhook_deliveries d
                   SET status = CASE WHEN d.created_at <= now() - make_interval(secs => $2)
                                     THEN {_GIVE_UP_TO} ELSE {_FAIL_TO} END,
                       finished_at = CASE WHEN d.created_at <= now() - make_interval(secs => $2)
                                          THEN now() END,
                       next_attempt_at = now() + make_interval(secs => u.delay),
                       claimed_by = NULL, lease_until = NULL, response_status = u.code,
                       response_body = u.body, latency_ms = u.latency, last_error = u.error
                  FROM unnest($3::bigint[], $4::int[], $5::int[], $6::text[], $7::float8[],
                              $8::text[], $9::float8[])
                       AS u(id, attempts, code, body, latency, error, delay)
                 WHERE d.id = ANY ($3::bigint[]) AND d.id = u.id AND d.attempts = u.attempts
                   AND d.claimed_by = $1 AND d.status IN ({_FAIL_FROM})
                RETURNING d.id, d.subscription_id, d.ordering_key, d.status""",
            owner,
            float(disable_after_s),
            [a.delivery_id for a in bad],
            [a.attempt for a in bad],
            [a.response_status for a in bad],
            [_text(a.response_body) for a in bad],
            [a.latency_ms for a in bad],
            [_text(a.error, 500) for a in bad],
            [a.delay_s for a in bad],
        )
        for r in rows:
            if r["status"] == DeliveryStatus.FAILED.value:
                given_up.append(r["id"])
                moved.append((r["subscription_id"], r["ordering_key"]))
            else:
                retrying.append(r["id"])
    if cancel:
        rows = await conn.fetch(
            f"""UPDATE webhook_deliveries d
                   SET status = {_CANCEL_TO}, finished_at = now(), claimed_by = NULL,
                       lease_until = NULL, last_error = $4
                  FROM unnest($2::bigint[], $3::int[]) AS u(id, attempts)
                 WHERE d.id = ANY ($2::bigint[]) AND d.id = u.id AND d.attempts = u.attempts
                   AND d.claimed_by = $1 AND d.status IN ({_CANCEL_FROM})
                RETURNING d.id, d.subscription_id, d.ordering_key""",
            owner,
            [a.delivery_id for a in cancel],
            [a.attempt for a in cancel],
            "the event no longer exists (deleted by retention before it was delivered)",
        )
        cancelled = [r["id"] for r in rows]
        moved += [(r["subscription_id"], r["ordering_key"]) for r in rows]
    if moved:
        await promote_queues(conn, moved)
    written = set(delivered) | set(given_up) | set(retrying) | set(cancelled)
    stale = [a.delivery_id for a in attempts if a.delivery_id not in written]
    return Finished(
        delivered,
        given_up,
        retrying,
        cancelled,
        stale,
        disabled,
        sorted(set(finished_queues) | set(moved)),
    )


async def promote_queues(conn: Connection, queues: Sequence[tuple[int, str]]) -> int:
    """Make the next row of each queue (subscription, ordering key) pending, if its first
    open row is queued; the number made pending. Finishing a head does this for the rows
    it sees; a row whose transaction was still open then (it saw the head, so it waits
    queued) is made pending when the engine asks again a moment later."""
    unique = sorted(set(queues))
    promoted: int = await conn.fetchval(
        f"""WITH done AS (
                UPDATE webhook_deliveries d SET status = {_PROMOTE_TO}
                 WHERE d.id IN (
                       SELECT ({_next_open("k.sub", "k.key")})
                         FROM unnest($1::bigint[], $2::text[]) AS k(sub, key))
                   AND d.status IN ({_PROMOTE_FROM})
                RETURNING 1)
            SELECT count(*) FROM done""",
        [s for s, _ in unique],
        [k for _, k in unique],
    )
    return promoted


async def promote_orphans(conn: Connection) -> int:
    """Make pending the first row of every queue whose first open row is queued: a row
    queued behind a head that finished while the row's transaction was still open has no
    one else to promote it. One index probe per queue (a skip scan), not per row."""
    promoted: int = await conn.fetchval(
        f"""WITH RECURSIVE heads AS (
                (SELECT subscription_id, ordering_key, id, status FROM webhook_deliveries
                  WHERE status IN ({_OPEN_SQL})
                  ORDER BY subscription_id, ordering_key, id LIMIT 1)
                UNION ALL
                SELECT n.subscription_id, n.ordering_key, n.id, n.status
                  FROM heads h
                 CROSS JOIN LATERAL (
                     SELECT d.subscription_id, d.ordering_key, d.id, d.status
                       FROM webhook_deliveries d
                      WHERE d.status IN ({_OPEN_SQL})
                        AND (d.subscription_id, d.ordering_key)
                            > (h.subscription_id, h.ordering_key)
                      ORDER BY d.subscription_id, d.ordering_key, d.id LIMIT 1) n
            ),
            done AS (
                UPDATE webhook_deliveries d SET status = {_PROMOTE_TO}
                  FROM heads h
                 WHERE d.id = h.id AND h.status IN ({_PROMOTE_FROM})
                   AND d.status IN ({_PROMOTE_FROM})
                RETURNING 1)
            SELECT count(*) FROM done"""
    )
    return promoted


async def backlog(conn: Connection) -> dict[int, int]:
    """Open deliveries (queued, pending, delivering) by subscription; every subscription
    is listed, with 0 when it has none."""
    rows = await conn.fetch(
        f"""SELECT s.id, (SELECT count(*) FROM webhook_deliveries d
                           WHERE d.subscription_id = s.id AND d.status IN ({_OPEN_SQL})) AS n
              FROM webhook_subscriptions s"""
    )
    return {r["id"]: r["n"] for r in rows}


async def purge(conn: Connection, *, older_than_s: float, batch: int = 5000) -> int:
    """Delete up to ``batch`` finished deliveries that finished more than
    ``older_than_s`` ago; returns how many (call again while it returns ``batch``)."""
    deleted: int = await conn.fetchval(
        f"""WITH gone AS (
                DELETE FROM webhook_deliveries WHERE id IN (
                    SELECT id FROM webhook_deliveries
                     WHERE status IN ({_FINISHED_SQL})
                       AND finished_at < now() - make_interval(secs => $1)
                     LIMIT $2)
                RETURNING 1)
            SELECT count(*) FROM gone""",
        float(older_than_s),
        batch,
    )
    return deleted
