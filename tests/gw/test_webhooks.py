"""Webhooks end to end: subscriptions over the HTTP API, deliveries to a real HTTP receiver
on 127.0.0.1 that verifies every signature with the ``standardwebhooks`` package (not the
project's code), retries, faults of the receiver, rotation, replay, several processes on
one database, a claimer that died; and the pieces alone (the response parser, the retry
schedule, URL rules)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from chargegw.api import webhooks as webhooks_api
from chargegw.app import Gateway
from chargegw.domain import webhooks
from chargegw.domain.refusals import InvalidError
from chargegw.domain.webhook_delivery import (
    ResponseError,
    ResponseParser,
    UrlError,
    address_refusal,
    parse_url,
    sign,
)
from chargesim import SimulatedAp3000Pile, Simulator

from .conftest import database_outage, settings_for
from .waiting import api_client, eventually, eventually_json, free_port, wait_http

FAST = {
    "webhooks_allow_private": True,
    "webhooks_poll_s": 0.2,
    "webhooks_retry_schedule_s": "0.3,0.6",
}


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return dict(FAST)


# ---------------------------------------------------------------- the receiver


@dataclasses.dataclass
class Behaviour:
    """How the receiver answers on one path."""

    status: int = 200
    #: seconds before answering
    delay: float = 0.0
    #: never answer
    hang: bool = False
    #: close the connection without an answer
    close: bool = False
    #: answer with a body this large (Content-Length announced)
    body_bytes: int = 0
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    raw: bytes
    at: float

    @property
    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.raw)
        return parsed

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request and verifies its signature
    with every secret registered for its path (``standardwebhooks``)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[Received] = []
        self.behaviours: dict[str, Behaviour] = {}
        self.secrets: dict[str, list[str]] = {}
        #: signature checks that failed
        self.errors: list[str] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = head.split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        raw = await reader.readexactly(int(headers["content-length"]))
        for secret in self.secrets.get(path, []):
            try:
                Webhook(secret).verify(raw, headers)
            except WebhookVerificationError as exc:
                self.errors.append(f"{path} {headers.get('webhook-id')}: {exc}")
        if not self.secrets.get(path):
            self.errors.append(f"{path}: no secret registered to verify with")
        self.requests.append(Received(path, headers, raw, time.monotonic()))
        behaviour = self.behaviours.get(path, Behaviour())
        if behaviour.hang:
            await asyncio.sleep(3600)
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.close:
            return
        extra = "".join(f"{k}: {v}\r\n" for k, v in behaviour.headers.items())
        length = behaviour.body_bytes or 2
        writer.write(
            f"HTTP/1.1 {behaviour.status} X\r\nContent-Length: {length}\r\n{extra}\r\n".encode()
        )
        if behaviour.body_bytes:
            chunk = b"x" * 65536
            for _ in range(behaviour.body_bytes // len(chunk)):
                writer.write(chunk)
                await writer.drain()
        else:
            writer.write(b"ok")
        await writer.drain()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()
    assert not r.errors, r.errors


@pytest.fixture
async def hooks(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """The webhook API (and the command API) of ``gateway``."""
    async with api_client(gateway, webhooks_api.router) as client:
        yield client


async def subscribe(
    hooks: httpx.AsyncClient, receiver: Receiver, path: str, **fields: Any
) -> dict[str, Any]:
    """A subscription to ``path`` of the receiver, its secret registered there."""
    body = {"url": receiver.url(path), "event_types": ["*"], **fields}
    answer = await hooks.post("/api/v1/webhooks", json=body)
    assert answer.status_code == 201, answer.text
    made: dict[str, Any] = answer.json()
    receiver.secrets[path] = [made["secret"]]
    return made


async def emit(pool: asyncpg.Pool, device_id: str | None, type_: str = "device.alarm") -> None:
    await pool.execute(
        "SELECT emit_event($1, $2, NULL, NULL, NULL, NULL, $3::jsonb)",
        type_,
        device_id,
        json.dumps({"n": random.random()}),
    )


async def ledger(pool: asyncpg.Pool, subscription_id: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM webhook_deliveries WHERE subscription_id = $1 ORDER BY id",
        subscription_id,
    )


def pool_of(gateway: Gateway) -> asyncpg.Pool:
    assert gateway.pool is not None
    return gateway.pool


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    return gateway.metrics.registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- subscriptions


async def test_subscriptions_crud_and_the_secret_shown_once(
    hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    made = await subscribe(
        hooks,
        receiver,
        "/a",
        event_types=["order.*", "device.offline", "order.*"],
        device_ids=["04000001"],
        protocol="ap3000",
        description="billing back office",
        max_concurrency=3,
        timeout_s=2.5,
    )
    assert made["secret"].startswith("whsec_")
    assert len(base64.b64decode(made["secret"].removeprefix("whsec_"))) == 24
    assert made["event_types"] == ["order.*", "device.offline"]
    assert (made["max_concurrency"], made["timeout_s"], made["enabled"]) == (3, 2.5, True)
    hook_id = made["id"]
    one = (await hooks.get(f"/api/v1/webhooks/{hook_id}")).json()
    assert "secret" not in one and one["device_ids"] == ["04000001"]
    listed = (await hooks.get("/api/v1/webhooks")).json()
    assert [h["id"] for h in listed["items"]] == [hook_id] and "secret" not in listed["items"][0]
    assert made["secret"] not in json.dumps(listed)

    changed = await hooks.patch(
        f"/api/v1/webhooks/{hook_id}",
        json={"device_ids": None, "enabled": False, "description": "paused"},
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["device_ids"] is None and body["protocol"] == "ap3000"
    assert (body["enabled"], body["disabled_reason"]) == (False, "manual")
    body = (await hooks.patch(f"/api/v1/webhooks/{hook_id}", json={"enabled": True})).json()
    assert (body["enabled"], body["disabled_reason"], body["disabled_at"]) == (True, None, None)

    second = await subscribe(hooks, receiver, "/b")
    page = (await hooks.get("/api/v1/webhooks", params={"limit": 1})).json()
    assert [h["id"] for h in page["items"]] == [hook_id] and page["next_cursor"]
    page = (
        await hooks.get("/api/v1/webhooks", params={"limit": 1, "cursor": page["next_cursor"]})
    ).json()
    assert [h["id"] for h in page["items"]] == [second["id"]] and page["next_cursor"] is None

    assert (await hooks.delete(f"/api/v1/webhooks/{hook_id}")).status_code == 204
    assert (await hooks.get(f"/api/v1/webhooks/{hook_id}")).status_code == 404
    assert (await hooks.delete(f"/api/v1/webhooks/{hook_id}")).status_code == 404
    assert (await hooks.patch(f"/api/v1/webhooks/{hook_id}", json={})).status_code == 404


#: (body, the field a 422 names, words of its message)
BAD_SUBSCRIPTIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"url": "ftp://example.com/x"}, "url", "only http and https"),
    ({"url": "http:///path"}, "url", "no host"),
    ({"url": "https://user:pw@93.184.216.34/x"}, "url", "user info"),
    ({"url": "http://93.184.216.34:99999/"}, "url", "not a valid URL"),
    ({"url": "http://127.0.0.1:8080/hook"}, "url", "loopback"),
    ({"url": "http://localhost/hook"}, "url", "loopback"),
    ({"url": "http://[::1]/hook"}, "url", "loopback"),
    ({"url": "http://[::ffff:10.1.2.3]/hook"}, "url", "private"),
    ({"url": "http://10.0.0.7/hook"}, "url", "private"),
    ({"url": "http://192.168.1.20/hook"}, "url", "private"),
    ({"url": "http://169.254.169.254/latest"}, "url", "link-local"),
    ({"url": "http://224.0.0.1/hook"}, "url", "multicast"),
    ({"url": "http://100.64.0.1/hook"}, "url", "not a public"),
    ({"event_types": ["order.nope"]}, "event_types", "order.nope"),
    ({"event_types": ["Order.*"]}, "event_types", "Order.*"),
    ({"event_types": []}, "event_types", ""),
    ({"device_ids": []}, "device_ids", "empty list"),
    ({"protocol": "ocpp"}, "protocol", ""),
    ({"timeout_s": 0}, "timeout_s", ""),
    ({"timeout_s": 61}, "timeout_s", ""),
    ({"max_concurrency": 101}, "max_concurrency", ""),
    ({"secret": "whsec_mine"}, "secret", ""),
]


async def test_bad_subscriptions_are_422_naming_the_field(gateway: Gateway) -> None:
    services = dataclasses.replace(gateway.api_services(), webhooks_allow_private=False)
    async with api_client(gateway, webhooks_api.router, services=services) as strict:
        # a public address is fine without the setting
        made = await strict.post(
            "/api/v1/webhooks", json={"url": "http://93.184.216.34/h", "event_types": ["*"]}
        )
        assert made.status_code == 201, made.text
        for body, field, words in BAD_SUBSCRIPTIONS:
            full = {"url": "http://93.184.216.34/hook", "event_types": ["order.*"], **body}
            answer = await strict.post("/api/v1/webhooks", json=full)
            assert answer.status_code == 422, (body, answer.text)
            error = answer.json()["error"]
            assert error["field"] == field and words in error["message"], (body, error)
            # PATCH checks the same way
            patched = await strict.patch(f"/api/v1/webhooks/{made.json()['id']}", json=body)
            assert patched.status_code == 422, (body, patched.text)
            assert patched.json()["error"]["field"] == field, (body, patched.text)
        listed = (await strict.get("/api/v1/webhooks")).json()["items"]
        assert len(listed) == 1 and listed[0]["url"] == "http://93.184.216.34/h"


async def test_patch_refuses_null_for_required_fields(hooks: httpx.AsyncClient) -> None:
    made = await hooks.post(
        "/api/v1/webhooks", json={"url": "http://127.0.0.1:9/h", "event_types": ["*"]}
    )
    answer = await hooks.patch(f"/api/v1/webhooks/{made.json()['id']}", json={"url": None})
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "url"


# ---------------------------------------------------------------- delivery


async def test_charging_sessions_arrive_signed_and_in_order_per_device(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    made = await subscribe(hooks, receiver, "/all", event_types=["order.*", "port.*", "device.*"])
    pool = pool_of(gateway)
    piles = [SimulatedAp3000Pile(phy, ports=2, heartbeat_s=180) for phy in ("04000011", "04000012")]
    sim = Simulator("127.0.0.1", gateway.server.port, piles, accel=120, jitter=0, seed=1)
    await sim.start()
    async with sim:
        await sim.wait_connected(2, timeout=10)
        await eventually(
            lambda: all(gateway.sessions.link_of(p.phy_id) for p in piles), what="piles bound"
        )
        orders = []
        for pile in piles:
            await eventually(
                lambda pile=pile: pool.fetchval(
                    "SELECT 1 FROM devices WHERE device_id = $1", pile.phy_id
                ),
                what="device row",
            )
            for port in (1, 2):
                answer = await hooks.post(
                    f"/api/v1/devices/{pile.phy_id}/ports/{port}/start",
                    json={"mode": "time", "duration_min": 2},
                )
                assert answer.status_code == 202, answer.text
                orders.append(answer.json()["order_no"])
        for order_no in orders:
            await eventually_json(hooks, f"/api/v1/orders/{order_no}", "status", {"settled"})

        async def settled_received() -> int:
            return sum(1 for r in receiver.on("/all") if r.body["type"] == "order.settled")

        await eventually(settled_received, lambda n: n == 4, timeout=15)
    # every event the subscription selects arrived, once, signed (the receiver checked)
    wanted = await pool.fetch(
        """SELECT id, device_id FROM events WHERE id IS NOT NULL
            AND (type LIKE 'order.%' OR type LIKE 'port.%' OR type LIKE 'device.%')
            ORDER BY id"""
    )

    async def all_received() -> set[str]:
        return {r.webhook_id for r in receiver.on("/all")}

    await eventually(all_received, lambda got: got >= {f"evt_{r['id']}" for r in wanted})
    ids = [r.webhook_id for r in receiver.on("/all")]
    assert len(ids) == len(set(ids))
    for pile in piles:
        sent = [r.body["data"]["id"] for r in receiver.on("/all")
                if r.body["data"]["device_id"] == pile.phy_id]  # fmt: skip
        assert sent == sorted(sent) and len(sent) > 5, sent
    first = receiver.on("/all")[0]
    assert first.headers["content-type"] == "application/json"
    assert first.headers["user-agent"].startswith("chargegw/")
    assert first.body["timestamp"] == first.body["data"]["at"]
    assert {"id", "type", "at", "device_id", "gateway_id", "order_no"} <= first.body["data"].keys()
    # the receiver has answered; the outcomes are recorded just after
    rows = await eventually(
        lambda: ledger(pool, made["id"]),
        lambda found: {r["status"] for r in found} == {"delivered"},
    )
    assert all(r["response_status"] == 200 and r["attempts"] == 1 for r in rows)
    assert metric(gateway, "chargegw_webhook_deliveries_total", result="delivered") == len(rows)
    assert metric(gateway, "chargegw_webhook_delivery_latency_seconds_count") == len(rows)


async def test_a_receiver_down_gets_everything_once_it_is_back(
    gateway: Gateway, hooks: httpx.AsyncClient
) -> None:
    down = Receiver()  # not listening: connection refused
    made = await subscribe(hooks, down, "/later", event_types=["device.*"])
    pool = pool_of(gateway)
    for n in range(30):
        await emit(pool, f"D{n % 5}")
    rows = await eventually(
        lambda: ledger(pool, made["id"]),
        lambda rows: sum(r["attempts"] for r in rows) >= 10,
        what="attempts against a closed port",
    )
    failed = [r for r in rows if r["attempts"]]
    assert all(r["last_error"].startswith("connect:") for r in failed), failed[0]["last_error"]
    # one head per device in flight or waiting to retry, the rest queued behind it
    open_heads = Counter(r["ordering_key"] for r in rows if r["status"] != "queued")
    assert set(open_heads.values()) == {1} and len(open_heads) == 5
    await down.start()
    try:
        rows = await eventually(
            lambda: ledger(pool, made["id"]),
            lambda rows: {r["status"] for r in rows} == {"delivered"},
            what="everything delivered",
        )
    finally:
        await down.stop()
    assert not down.errors, down.errors
    received = Counter(r.webhook_id for r in down.requests)
    events = await pool.fetch("SELECT id FROM events WHERE type = 'device.alarm'")
    assert set(received) == {f"evt_{e['id']}" for e in events}
    assert max(r["attempts"] for r in rows) > 1  # the ledger says how many attempts
    assert metric(gateway, "chargegw_webhook_attempts_total", result="connect") >= 10
    by_device: dict[str, list[int]] = {}
    for r in down.requests:
        by_device.setdefault(r.body["data"]["device_id"], []).append(r.body["data"]["id"])
    assert all(ids == sorted(ids) for ids in by_device.values()), by_device


#: (how the receiver misbehaves, the failure reason recorded, the status recorded)
BAD_RECEIVERS: dict[str, tuple[Behaviour, str, int | None]] = {
    "/500": (Behaviour(status=500), "status_5xx", 500),
    "/503": (Behaviour(status=503, headers={"Retry-After": "0"}), "status_5xx", 503),
    "/404": (Behaviour(status=404), "status_4xx", 404),
    "/hang": (Behaviour(hang=True), "timeout", None),
    "/close": (Behaviour(close=True), "closed", None),
    "/10mb": (Behaviour(body_bytes=10 * 1024 * 1024), "too_large", None),
    "/302": (Behaviour(status=302, headers={"Location": "http://127.0.0.1:1/x"}), "redirect", 302),
}


async def test_bad_receivers_fail_cleanly_are_retried_and_delay_no_one_else(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    bad = {}
    for path, (behaviour, _, _) in BAD_RECEIVERS.items():
        receiver.behaviours[path] = behaviour
        bad[path] = (await subscribe(hooks, receiver, path, timeout_s=0.5))["id"]
    await subscribe(hooks, receiver, "/fast")
    pool = pool_of(gateway)
    started = time.monotonic()
    for n in range(10):
        await emit(pool, f"X{n}")
    await eventually(lambda: len(receiver.on("/fast")) == 10, timeout=5)
    assert time.monotonic() - started < 3  # not held up by the bad receivers' timeouts
    for path, (_, reason, status) in BAD_RECEIVERS.items():
        rows = await eventually(
            lambda path=path: ledger(pool, bad[path]),
            lambda rows: all(r["attempts"] >= 2 and r["status"] == "pending" for r in rows),
            what=f"every delivery to {path} attempted twice",
        )
        for row in rows:
            assert row["last_error"].startswith(f"{reason}:"), (path, row["last_error"])
            assert row["response_status"] == status, path
        assert metric(gateway, "chargegw_webhook_attempts_total", result=reason) >= 20
    receiver.behaviours.clear()
    for path, hook_id in bad.items():
        await eventually(
            lambda hook_id=hook_id: ledger(pool, hook_id),
            lambda rows: {r["status"] for r in rows} == {"delivered"},
            what=f"{path} delivered once the receiver behaves",
        )
        assert {r.webhook_id for r in receiver.on(path)} == {
            r.webhook_id for r in receiver.on("/fast")
        }
        sub = (await hooks.get(f"/api/v1/webhooks/{hook_id}")).json()
        assert sub["enabled"] and sub["failing_since"] is None and sub["last_success_at"], sub


_EMIT_C1 = "SELECT emit_event('device.alarm', 'C1', NULL, NULL, NULL, NULL, '{}')"


async def _emit_committing_in_opposite_order(db_dsn: str) -> None:
    """Two transactions each write an event of device C1; the second commits first and
    is sequenced (the smaller id) before the first commits."""
    first, second = await asyncpg.connect(db_dsn), await asyncpg.connect(db_dsn)
    try:
        written_first = first.transaction()
        await written_first.start()
        await first.execute(_EMIT_C1)
        written_second = second.transaction()
        await written_second.start()
        await second.execute(_EMIT_C1)
        second_pk = await second.fetchval("SELECT max(pk) FROM events")
        await written_second.commit()
        await eventually(lambda: second.fetchval("SELECT id FROM events WHERE pk = $1", second_pk))
        await written_first.commit()
    finally:
        await first.close()
        await second.close()


async def _queue_order(pool: asyncpg.Pool, count: int) -> list[tuple[int, str]]:
    """(event id, status) of the deliveries in delivery id order, once there are ``count``."""
    rows = await eventually(
        lambda: pool.fetch(
            "SELECT e.id, d.status FROM webhook_deliveries d JOIN events e ON e.pk = d.event_pk"
            " ORDER BY d.id"
        ),
        lambda rows: len(rows) == count,
    )
    return [(r["id"], r["status"]) for r in rows]


async def _deliver_all(
    db_dsn: str, pool: asyncpg.Pool, receiver: Receiver, path: str, count: int
) -> None:
    """Once all ``count`` events are sequenced, a fresh gateway delivers them to ``path``."""
    await eventually(
        lambda: pool.fetchval("SELECT count(*) FROM events WHERE id IS NOT NULL"),
        lambda n: n == count,
    )
    successor = Gateway(settings_for(db_dsn, **FAST))
    await successor.start(http=False)
    try:
        await eventually(lambda: len(receiver.on(path)) == count)
    finally:
        await successor.stop()


async def test_events_of_one_device_from_concurrent_transactions_go_in_event_id_order(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver, db_dsn: str
) -> None:
    """Two transactions write an event of the same device at once and commit in the
    opposite order: the event ids follow the commits, the deliveries (made when the ids
    are given) follow the ids, and so does the delivery."""
    await subscribe(hooks, receiver, "/order", event_types=["device.*"])
    await gateway.webhooks.close()  # nothing is claimed until both have committed
    await _emit_committing_in_opposite_order(db_dsn)
    pool = pool_of(gateway)
    assert await _queue_order(pool, 2) == [(1, "pending"), (2, "queued")]
    await _deliver_all(db_dsn, pool, receiver, "/order", 2)
    ids = [r.body["data"]["id"] for r in receiver.on("/order")]
    assert ids == sorted(ids), ids
    by_pk = await pool.fetch("SELECT id FROM events ORDER BY pk")
    assert [r["id"] for r in by_pk] == [2, 1]  # written first, committed last


async def test_queued_events_of_one_device_go_in_event_id_order(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver, db_dsn: str
) -> None:
    """Behind an open delivery, two transactions write an event of the same device at
    once and commit in the opposite order: both rows wait ``queued`` in their events'
    order, and the events reach the receiver in event id order."""
    await subscribe(hooks, receiver, "/queued", event_types=["device.*"])
    await gateway.webhooks.close()  # nothing is claimed until both have committed
    pool = pool_of(gateway)
    await pool.execute(_EMIT_C1)  # the open head of the queue
    await _emit_committing_in_opposite_order(db_dsn)
    assert await _queue_order(pool, 3) == [(1, "pending"), (2, "queued"), (3, "queued")]
    await _deliver_all(db_dsn, pool, receiver, "/queued", 3)
    ids = [r.body["data"]["id"] for r in receiver.on("/queued")]
    assert ids == sorted(ids), ids
    by_pk = await pool.fetch("SELECT id FROM events ORDER BY pk")
    assert [r["id"] for r in by_pk] == [1, 3, 2]  # written second, committed last


async def test_a_replay_queues_behind_what_its_device_has_open(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver, db_dsn: str
) -> None:
    """A replay of older events goes after the live deliveries its device already has
    open, although their events have larger ids."""
    made = await subscribe(hooks, receiver, "/behind", event_types=["device.*"])
    await gateway.webhooks.close()  # nothing is claimed until the replay is queued
    pool = pool_of(gateway)
    for _ in range(3):
        await pool.execute(_EMIT_C1)
    await eventually(
        lambda: pool.fetchval("SELECT count(*) FROM events WHERE id IS NOT NULL"),
        lambda n: n == 3,
    )
    answer = await hooks.post(f"/api/v1/webhooks/{made['id']}/replay", json={"after_event_id": 0})
    assert answer.status_code == 202 and answer.json()["deliveries"] == 3, answer.text
    successor = Gateway(settings_for(db_dsn, **FAST))
    await successor.start(http=False)
    try:
        await eventually(lambda: len(receiver.on("/behind")) == 6)
    finally:
        await successor.stop()
    ids = [r.body["data"]["id"] for r in receiver.on("/behind")]
    assert ids == [1, 2, 3, 1, 2, 3], ids


async def _sub(pool: asyncpg.Pool) -> int:
    sub: int = await pool.fetchval(
        "INSERT INTO webhook_subscriptions (url, event_types, secret)"
        " VALUES ('http://127.0.0.1:9/x', '{*}', 'whsec_x') RETURNING id"
    )
    return sub


async def _claim(
    pool: asyncpg.Pool, owner: str, *, limit: int, lease_margin_s: float
) -> list[webhooks.Claimed]:
    async with pool.acquire() as conn:
        return await webhooks.claim(conn, owner, limit=limit, lease_margin_s=lease_margin_s)


async def _emit_sequenced(pool: asyncpg.Pool, sub: int, device: str = "C1") -> int:
    """An event of ``device``, sequenced; the id of its delivery row for ``sub``."""
    await pool.execute(
        "SELECT emit_event('device.alarm', $1, NULL, NULL, NULL, NULL, '{}')", device
    )
    await pool.execute("SELECT sequence_events()")
    last: int = await pool.fetchval(
        "SELECT max(id) FROM webhook_deliveries WHERE subscription_id = $1", sub
    )
    return last


async def test_events_numbered_by_the_old_sequencer_get_their_deliveries(
    db_pool: asyncpg.Pool,
) -> None:
    """During an upgrade a call of the old sequence_events() (already waiting for the
    lock when migration 0024 committed) numbers events without making deliveries: the
    next call makes them, once; deliveries follow the events' order."""
    sub = await _sub(db_pool)
    for device in ("U1", "U2"):
        await db_pool.execute(
            "SELECT emit_event('device.alarm', $1, NULL, NULL, NULL, NULL, '{}')", device
        )
    async with db_pool.acquire() as conn, conn.transaction():  # the old body, in effect
        last = await conn.fetchval("SELECT last_id FROM event_sequencer FOR UPDATE")
        await conn.execute(
            """WITH todo AS (SELECT pk, row_number() OVER (ORDER BY pk) AS n
                               FROM events WHERE id IS NULL)
               UPDATE events e SET id = $1 + todo.n FROM todo WHERE e.pk = todo.pk""",
            last,
        )
        await conn.execute("UPDATE event_sequencer SET last_id = $1 + 2", last)
    assert await db_pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 0
    await db_pool.execute("SELECT emit_event('device.alarm', 'U1', NULL, NULL, NULL, NULL, '{}')")
    await db_pool.execute("SELECT sequence_events()")
    await db_pool.execute("SELECT sequence_events()")
    rows = await db_pool.fetch(
        "SELECT e.id, d.ordering_key FROM webhook_deliveries d JOIN events e ON e.pk = d.event_pk"
        " WHERE d.subscription_id = $1 ORDER BY d.id",
        sub,
    )
    assert [(r["id"], r["ordering_key"]) for r in rows] == [(1, "U1"), (2, "U2"), (3, "U1")]


async def test_a_dead_claimers_row_is_claimed_again_whatever_waits_behind_it(
    db_pool: asyncpg.Pool,
) -> None:
    """A row in flight whose lease ran out is claimed again even when another row of its
    queue now ranks before it: a failed one an operator retried meanwhile."""
    sub = await _sub(db_pool)
    failed = await _emit_sequenced(db_pool, sub)
    (first,) = await _claim(db_pool, "me", limit=10, lease_margin_s=30)
    await db_pool.execute(
        "UPDATE webhook_deliveries SET status = 'failed', finished_at = now(), claimed_by = NULL"
        " WHERE id = $1",
        failed,
    )
    head = await _emit_sequenced(db_pool, sub)
    (taken,) = await _claim(db_pool, "dead", limit=10, lease_margin_s=0)
    assert (first.delivery_id, taken.delivery_id) == (failed, head)
    await webhooks.retry_delivery(db_pool, sub, failed)  # type: ignore[arg-type]
    await db_pool.execute(
        "UPDATE webhook_deliveries SET next_attempt_at = now() - interval '1 s',"
        " lease_until = now() - interval '1 s' WHERE id = $1",
        head,
    )
    # the retried one (the earlier event) waits for the one in flight, which is claimed
    # again although the retried one ranks first
    again = await _claim(db_pool, "alive", limit=10, lease_margin_s=30)
    assert [(c.delivery_id, c.attempt) for c in again] == [(head, 2)]


async def test_a_delivered_one_sent_again_goes_at_the_end_of_its_queue(
    db_pool: asyncpg.Pool,
) -> None:
    sub = await _sub(db_pool)
    done = await _emit_sequenced(db_pool, sub)
    await db_pool.execute(
        "UPDATE webhook_deliveries SET status = 'delivered', finished_at = now() WHERE id = $1",
        done,
    )
    head = await _emit_sequenced(db_pool, sub)  # a later event, pending
    copy = await webhooks.retry_delivery(db_pool, sub, done)  # type: ignore[arg-type]
    assert copy.status == "queued"
    taken = await _claim(db_pool, "me", limit=10, lease_margin_s=30)
    assert [c.delivery_id for c in taken] == [head]


async def test_a_pending_row_behind_an_unpromoted_queued_one_waits_for_it(
    db_pool: asyncpg.Pool,
) -> None:
    """A row left ``queued`` at the front of its queue (written behind a head whose finish
    did not see it) and a ``pending`` one behind it: the pending one is not claimed; the
    sweep promotes the front one, which goes first."""
    sub = await _sub(db_pool)
    front = await _emit_sequenced(db_pool, sub)
    behind = await _emit_sequenced(db_pool, sub)
    await db_pool.execute(
        "UPDATE webhook_deliveries SET status = CASE id WHEN $1 THEN 'queued' ELSE 'pending' END"
        " WHERE id IN ($1, $2)",
        front,
        behind,
    )
    assert await _claim(db_pool, "me", limit=10, lease_margin_s=30) == []  # type: ignore[arg-type]
    assert await webhooks.promote_orphans(db_pool) == 1  # type: ignore[arg-type]
    (taken,) = await _claim(db_pool, "me", limit=10, lease_margin_s=30)
    assert taken.delivery_id == front


async def test_a_slow_receiver_does_not_delay_a_fast_one(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.behaviours["/slow"] = Behaviour(delay=2.0)
    await subscribe(hooks, receiver, "/slow", max_concurrency=2, timeout_s=10)
    await subscribe(hooks, receiver, "/quick")
    pool = pool_of(gateway)
    for n in range(20):
        await emit(pool, f"S{n}")
    started = time.monotonic()
    await eventually(lambda: len(receiver.on("/quick")) == 20, timeout=5)
    assert time.monotonic() - started < 2.0
    # the slow one works through them two at a time (its concurrency limit)
    assert len(receiver.on("/slow")) <= 4


async def test_410_gone_disables_the_subscription_with_an_event(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.behaviours["/gone"] = Behaviour(status=410)
    gone = await subscribe(hooks, receiver, "/gone", event_types=["device.*"])
    watcher = await subscribe(hooks, receiver, "/watch", event_types=["webhook.*"])
    pool = pool_of(gateway)
    await emit(pool, "G1")
    sub = await eventually_json(hooks, f"/api/v1/webhooks/{gone['id']}", "enabled", {False})
    assert sub["disabled_reason"] == "gone" and sub["disabled_at"]
    await eventually(lambda: receiver.on("/watch"), timeout=5)
    event = receiver.on("/watch")[0].body
    assert event["type"] == "webhook.disabled"
    assert event["data"]["subscription_id"] == gone["id"] and event["data"]["reason"] == "gone"
    assert metric(gateway, "chargegw_webhook_subscriptions_disabled_total", reason="gone") == 1
    # the delivery waits (re-enabling resumes it); new events make none while disabled
    # (their deliveries are made when they are given their ids)
    await emit(pool, "G1")
    await eventually(
        lambda: pool.fetchval("SELECT count(*) FROM events WHERE id IS NULL"), lambda n: n == 0
    )
    rows = await ledger(pool, gone["id"])
    assert [r["status"] for r in rows] == ["pending"] and rows[0]["response_status"] == 410
    assert watcher["id"] != gone["id"]
    receiver.behaviours["/gone"] = Behaviour()
    await hooks.patch(f"/api/v1/webhooks/{gone['id']}", json={"enabled": True})
    await eventually(
        lambda: ledger(pool, gone["id"]),
        lambda rows: [r["status"] for r in rows] == ["delivered"],
        what="the waiting delivery resumes",
    )


@pytest.mark.settings(webhooks_disable_after_s=1.5, webhooks_retry_schedule_s="0.2")
async def test_a_subscription_failing_for_disable_after_is_disabled(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.behaviours["/broken"] = Behaviour(status=500)
    broken = await subscribe(hooks, receiver, "/broken", event_types=["device.*"])
    await subscribe(hooks, receiver, "/watch", event_types=["webhook.disabled"])
    pool = pool_of(gateway)

    async def events_keep_coming() -> None:  # of one device: its oldest fails first
        for _ in range(100):
            await emit(pool, "F1")
            await asyncio.sleep(0.2)

    feeder = asyncio.create_task(events_keep_coming())
    try:
        sub = await eventually_json(
            hooks, f"/api/v1/webhooks/{broken['id']}", "enabled", {False}, timeout=10
        )
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
    assert sub["disabled_reason"] == "failing" and sub["failing_since"]
    await eventually(lambda: receiver.on("/watch"), timeout=5)
    assert receiver.on("/watch")[0].body["data"]["reason"] == "failing"
    assert metric(gateway, "chargegw_webhook_subscriptions_disabled_total", reason="failing") == 1
    # deliveries older than disable_after at a failed attempt were given up (the first
    # after its retries; one queued behind it for that long, at its first failure, when a
    # loaded machine attempts it before the subscription is disabled); the others wait for
    # the subscription to be enabled again
    rows = await ledger(pool, broken["id"])
    given_up = [r for r in rows if r["status"] == "failed"]
    assert given_up and given_up[0]["attempts"] > 3, given_up
    assert all(r["finished_at"] and r["last_error"] for r in given_up)
    assert metric(gateway, "chargegw_webhook_deliveries_total", result="failed") == len(given_up)
    assert {r["status"] for r in rows} <= {"failed", "pending", "queued"}


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    made = await subscribe(hooks, receiver, "/rot", event_types=["device.*"])
    old = made["secret"]
    rotated = await hooks.post(f"/api/v1/webhooks/{made['id']}/rotate-secret")  # no body
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new != old and rotated.json()["previous_secret_until"]
    assert "secret" not in (await hooks.get(f"/api/v1/webhooks/{made['id']}")).json()
    receiver.secrets["/rot"] = [new, old]  # each request must verify with each
    pool = pool_of(gateway)
    await emit(pool, "R1")
    await eventually(lambda: len(receiver.on("/rot")) == 1)
    signatures = receiver.on("/rot")[0].headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    # an overlap of 0 ends the old secret at once
    await hooks.post(f"/api/v1/webhooks/{made['id']}/rotate-secret", json={"overlap_s": 0})
    newest = (
        await hooks.post(f"/api/v1/webhooks/{made['id']}/rotate-secret", json={"overlap_s": 0})
    ).json()
    assert newest["previous_secret_until"] is None
    receiver.secrets["/rot"] = [newest["secret"]]
    await emit(pool, "R1")
    await eventually(lambda: len(receiver.on("/rot")) == 2)
    last = receiver.on("/rot")[1]
    assert " " not in last.headers["webhook-signature"]
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(last.raw, last.headers)
    bad = await hooks.post(
        f"/api/v1/webhooks/{made['id']}/rotate-secret", json={"overlap_s": 8 * 86400}
    )
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "overlap_s"


async def test_replay_of_a_time_range_and_after_an_event_id(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    pool = pool_of(gateway)
    for n in range(6):
        await emit(pool, f"P{n % 2}", "device.alarm")
        await emit(pool, f"P{n % 2}", "device.online")
    events = await eventually(
        lambda: pool.fetch("SELECT id, type, at FROM events WHERE id IS NOT NULL ORDER BY id"),
        lambda rows: len(rows) == 12,
    )
    made = await subscribe(hooks, receiver, "/replay", event_types=["device.alarm"])
    window = {"since": events[2]["at"].isoformat(), "until": events[7]["at"].isoformat()}
    answer = await hooks.post(f"/api/v1/webhooks/{made['id']}/replay", json=window)
    assert answer.status_code == 202, answer.text
    expected = [e["id"] for e in events[2:8] if e["type"] == "device.alarm"]
    assert answer.json() == {
        "deliveries": 3,
        "first_event_id": expected[0],
        "last_event_id": expected[-1],
    }
    await eventually(lambda: len(receiver.on("/replay")) == 3)
    got = receiver.on("/replay")
    assert sorted(r.body["data"]["id"] for r in got) == expected
    assert sorted(r.webhook_id for r in got) == sorted(f"evt_{i}" for i in expected)
    for device in ("P0", "P1"):  # in order per device
        ids = [r.body["data"]["id"] for r in got if r.body["data"]["device_id"] == device]
        assert ids == sorted(ids)
    after = await hooks.post(
        f"/api/v1/webhooks/{made['id']}/replay", json={"after_event_id": events[9]["id"]}
    )
    assert after.json()["deliveries"] == 1  # events 11 and 12: one alarm
    await eventually(lambda: len(receiver.on("/replay")) == 4)
    rows = await ledger(pool, made["id"])
    assert {r["origin"] for r in rows} == {"replay"}
    for body, field in (
        ({}, "since"),
        ({"since": window["since"], "after_event_id": 1}, "since"),
        ({"since": window["until"], "until": window["since"]}, "since"),
        ({"after_event_id": -1}, "after_event_id"),
        ({"since": "yesterday"}, "since"),
    ):
        bad = await hooks.post(f"/api/v1/webhooks/{made['id']}/replay", json=body)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == field, bad.text
    assert (await hooks.post("/api/v1/webhooks/999/replay", json=window)).status_code == 404
    # beyond the bound: a clear refusal naming the window, nothing made
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(InvalidError, match="more than 2 events"):
            await webhooks.replay(conn, made["id"], after_event_id=0, limit=2)
    assert len(await ledger(pool, made["id"])) == 4


async def test_ping_retry_and_the_delivery_ledger(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    made = await subscribe(hooks, receiver, "/ops", event_types=["device.*"])
    hook = f"/api/v1/webhooks/{made['id']}"
    ping = await hooks.post(f"{hook}/test")
    assert ping.status_code == 202, ping.text
    assert ping.json()["webhook_id"] == f"ping_{ping.json()['id']}"
    await eventually(lambda: receiver.on("/ops"))
    got = receiver.on("/ops")[0]
    assert got.webhook_id == ping.json()["webhook_id"] and got.body["type"] == "webhook.ping"
    assert list(got.body) == ["type", "timestamp", "data"]
    pool = pool_of(gateway)
    await emit(pool, "L1")
    await eventually(lambda: len(receiver.on("/ops")) == 2)
    page = await eventually(
        lambda: hooks.get(f"{hook}/deliveries"),
        lambda answer: {d["status"] for d in answer.json()["items"]} == {"delivered"},
    )
    items = page.json()["items"]
    assert [d["type"] for d in items] == ["device.alarm", "webhook.ping"]  # newest first
    event_delivery = items[0]
    assert event_delivery["webhook_id"] == f"evt_{event_delivery['event_id']}"
    assert event_delivery["response_status"] == 200 and event_delivery["response_body"] == "ok"
    assert event_delivery["latency_ms"] > 0 and event_delivery["next_attempt_at"] is None
    # a delivered one is sent again as a new delivery with the same webhook-id
    again = await hooks.post(f"{hook}/deliveries/{event_delivery['id']}/retry")
    assert again.status_code == 202, again.text
    assert again.json()["origin"] == "retry" and again.json()["id"] != event_delivery["id"]
    await eventually(lambda: len(receiver.on("/ops")) == 3)
    assert receiver.on("/ops")[2].webhook_id == event_delivery["webhook_id"]
    # filters and pages
    only = (await hooks.get(f"{hook}/deliveries", params={"type": "webhook.*"})).json()
    assert [d["type"] for d in only["items"]] == ["webhook.ping"]
    first = (await hooks.get(f"{hook}/deliveries", params={"limit": 2})).json()
    rest = (
        await hooks.get(f"{hook}/deliveries", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()
    assert len(first["items"]) == 2 and len(rest["items"]) == 1 and rest["next_cursor"] is None
    failed = (await hooks.get(f"{hook}/deliveries", params={"status": "failed"})).json()
    assert failed["items"] == []
    for params, field in (({"status": "lost"}, "status"), ({"type": "A B"}, "type"),
                          ({"cursor": "nonsense"}, "cursor")):  # fmt: skip
        bad = await hooks.get(f"{hook}/deliveries", params=params)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == field, bad.text
    assert (await hooks.get("/api/v1/webhooks/999/deliveries")).status_code == 404
    assert (await hooks.post(f"{hook}/deliveries/999999/retry")).status_code == 404
    one = await hooks.get(f"{hook}/deliveries/{event_delivery['id']}")
    assert one.json()["id"] == event_delivery["id"]
    # a disabled subscription takes no ping
    await hooks.patch(hook, json={"enabled": False})
    assert (await hooks.post(f"{hook}/test")).status_code == 409


async def test_retry_of_a_queued_or_failed_delivery(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.behaviours["/q"] = Behaviour(status=500)
    made = await subscribe(hooks, receiver, "/q", event_types=["device.*"])
    hook = f"/api/v1/webhooks/{made['id']}"
    pool = pool_of(gateway)
    await emit(pool, "Q1")
    await emit(pool, "Q1")
    rows = await eventually(
        lambda: ledger(pool, made["id"]),
        lambda rows: len(rows) == 2 and rows[0]["attempts"] >= 1,
    )
    assert rows[1]["status"] == "queued"
    conflict = await hooks.post(f"{hook}/deliveries/{rows[1]['id']}/retry")
    assert conflict.status_code == 409 and "earlier delivery" in conflict.json()["error"]["message"]
    # given up by hand (as after disable_after), then retried: pending again, attempted now

    async def give_up() -> str:
        return str(
            await pool.fetchval(
                """UPDATE webhook_deliveries SET status = 'failed', finished_at = now()
                    WHERE id = $1 AND status IN ('pending', 'failed') RETURNING status""",
                rows[0]["id"],
            )
        )

    await eventually(give_up, lambda status: status == "failed", what="given up between attempts")
    receiver.behaviours["/q"] = Behaviour()
    retried = await hooks.post(f"{hook}/deliveries/{rows[0]['id']}/retry")
    assert retried.status_code == 202 and retried.json()["id"] == rows[0]["id"]
    await eventually(
        lambda: ledger(pool, made["id"]),
        lambda rows: [r["status"] for r in rows] == ["delivered", "delivered"],
        what="the retried one, then the queued one after it",
    )


# ---------------------------------------------------------------- several processes


async def test_two_gateways_deliver_each_event_exactly_once(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver, db_dsn: str
) -> None:
    other = Gateway(settings_for(db_dsn, **FAST))
    await other.start(http=False)
    try:
        made = await subscribe(hooks, receiver, "/both", max_concurrency=20)
        pool = pool_of(gateway)
        async with pool.acquire() as conn:
            await conn.executemany(
                "SELECT emit_event('device.alarm', $1, NULL, NULL, NULL, NULL, '{}'::jsonb)",
                [(f"T{n % 40}",) for n in range(400)],
            )
        await eventually(lambda: len(receiver.on("/both")) >= 400, timeout=20)
        rows = await eventually(
            lambda: ledger(pool, made["id"]),
            lambda rows: {r["status"] for r in rows} == {"delivered"},
        )
        assert len(rows) == 400 and {r["attempts"] for r in rows} == {1}
        counts = Counter(r.webhook_id for r in receiver.on("/both"))
        assert len(counts) == 400 and set(counts.values()) == {1}
        shares = [
            metric(g, "chargegw_webhook_attempts_total", result="delivered")
            for g in (gateway, other)
        ]
        assert sum(shares) == 400, shares
    finally:
        await other.stop()


async def test_a_dead_claimers_delivery_is_attempted_again_with_the_same_id(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    made = await subscribe(hooks, receiver, "/dead", event_types=["device.*"])
    await gateway.webhooks.close()  # this process delivers nothing until the claim is made
    pool = pool_of(gateway)
    await emit(pool, "K1")
    await emit(pool, "K1")
    event_ids = await eventually(
        lambda: pool.fetch("SELECT id FROM events WHERE device_id = 'K1' ORDER BY id"),
        lambda rows: len(rows) == 2 and all(r["id"] for r in rows),
    )
    # the first was claimed by a process that died mid-delivery (its lease runs out at
    # once); the one behind it waits for it
    rows = await ledger(pool, made["id"])
    await pool.execute(
        """UPDATE webhook_deliveries SET status = 'delivering', claimed_by = 'gone/0/1',
                  attempts = 1, lease_until = now() + interval '1 second',
                  next_attempt_at = now() + interval '1 second', last_attempt_at = now()
            WHERE id = $1""",
        rows[0]["id"],
    )
    successor = Gateway(settings_for(pool_dsn(gateway), **FAST))
    await successor.start(http=False)
    try:
        await eventually(lambda: len(receiver.on("/dead")) == 2, timeout=10)
    finally:
        await successor.stop()
    assert [r.webhook_id for r in receiver.on("/dead")] == [f"evt_{e['id']}" for e in event_ids]
    rows = await ledger(pool, made["id"])
    assert [(r["status"], r["attempts"]) for r in rows] == [("delivered", 2), ("delivered", 1)]


def pool_dsn(gateway: Gateway) -> str:
    assert gateway.dsn
    return gateway.dsn


async def test_sigkill_of_a_serving_process_mid_delivery_leads_to_one_more_attempt(
    db_dsn: str, receiver: Receiver, tmp_path: Path
) -> None:
    """``chargegw serve`` is killed while the receiver holds its request: another process
    sends the delivery again, with the same ``webhook-id``, once the claim runs out."""
    receiver.behaviours["/kill"] = Behaviour(hang=True)
    http_port = free_port()
    env = {
        **os.environ,
        "CHARGEGW_DSN": db_dsn,
        "CHARGEGW_LOG_FORMAT": "json",
        "CHARGEGW_WEBHOOKS_ALLOW_PRIVATE": "true",
        "CHARGEGW_WEBHOOKS_POLL_S": "0.2",
        "CHARGEGW_WEBHOOKS_LEASE_MARGIN_S": "1",
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chargegw", "serve", "--device-host", "127.0.0.1",
            "--device-port", "0", "--http-port", str(http_port), "--data-dir", str(tmp_path),
            env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{http_port}"
            try:
                await wait_http(f"{base}/readyz", timeout=60, process=server)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{log_path.read_text()[-3000:]}") from None
            async with httpx.AsyncClient(base_url=base) as client:
                made = await subscribe(client, receiver, "/kill", timeout_s=2)
            pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
            assert pool is not None
            try:
                await emit(pool, "KILL1")
                await eventually(lambda: receiver.on("/kill"), timeout=10)
                server.kill()  # SIGKILL, mid-delivery
                await server.wait()
                receiver.behaviours["/kill"] = Behaviour()
                successor = Gateway(settings_for(db_dsn, **FAST))
                await successor.start(http=False)
                try:
                    await eventually(lambda: len(receiver.on("/kill")) == 2, timeout=10)
                finally:
                    await successor.stop()
                rows = await ledger(pool, made["id"])
            finally:
                await pool.close()
        finally:
            if server.returncode is None:
                server.kill()
                await server.wait()
    first, second = receiver.on("/kill")
    assert first.webhook_id == second.webhook_id and first.raw == second.raw
    assert [(r["status"], r["attempts"]) for r in rows] == [("delivered", 2)]


async def test_an_answer_during_a_database_outage_is_recorded_once_it_is_back(
    gateway: Gateway,
    hooks: httpx.AsyncClient,
    receiver: Receiver,
    pg_server_dsn: str,
    db_dsn: str,
) -> None:
    """The receiver answers 2xx while the database refuses connections: the outcome is
    kept and written when it is back (no second attempt, no lost delivery), and the
    engine goes on delivering."""
    receiver.behaviours["/outage"] = Behaviour(delay=1.0)
    made = await subscribe(hooks, receiver, "/outage", event_types=["device.*"])
    pool = pool_of(gateway)
    await emit(pool, "DB1")
    await eventually(lambda: receiver.on("/outage"), timeout=5)
    async with database_outage(pg_server_dsn, db_dsn):
        # the answer comes while the database is away; the engine cannot record it yet
        await eventually(lambda: gateway.metrics.registry.get_sample_value(
            "chargegw_webhook_attempts_total", {"result": "delivered"}
        ), timeout=5)  # fmt: skip
        await asyncio.sleep(0.5)  # the finisher meets the outage at least once
    rows = await eventually(
        lambda: ledger(pool, made["id"]),
        lambda rows: [r["status"] for r in rows] == ["delivered"],
        what="the outcome written after the outage",
        retry=(OSError, asyncpg.PostgresError, asyncpg.InterfaceError),
        timeout=15,
    )
    assert rows[0]["attempts"] == 1 and len(receiver.on("/outage")) == 1
    receiver.behaviours["/outage"] = Behaviour()
    await emit(pool, "DB1")
    await eventually(lambda: len(receiver.on("/outage")) == 2, timeout=10)


async def test_a_row_written_while_its_head_finished_is_not_left_waiting(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver, db_dsn: str
) -> None:
    """A transaction writes a delivery of the device (as a replay does) while its first
    is in flight (so it waits ``queued``) and commits only after the first was delivered:
    the finishing statement could not see it, the engine looks at the queue again and
    sends it within a moment (not at the next housekeeping sweep)."""
    receiver.behaviours["/late"] = Behaviour(delay=0.5)
    made = await subscribe(hooks, receiver, "/late", event_types=["device.*"])
    pool = pool_of(gateway)
    await emit(pool, "W1")
    await eventually(lambda: receiver.on("/late"))
    writer = await asyncpg.connect(db_dsn)
    try:
        async with writer.transaction():
            await writer.execute(
                "INSERT INTO webhook_deliveries (subscription_id, event_pk, ordering_key, origin)"
                " SELECT $1, max(pk), 'W1', 'replay' FROM events",
                made["id"],
            )
            assert (
                await writer.fetchval(
                    "SELECT status FROM webhook_deliveries ORDER BY id DESC LIMIT 1"
                )
                == "queued"
            )
            await eventually(
                lambda: ledger(pool, made["id"]),
                lambda rows: [r["status"] for r in rows] == ["delivered"],
                what="the first delivered while the second is not committed",
            )
        committed = time.monotonic()
    finally:
        await writer.close()
    receiver.behaviours["/late"] = Behaviour()
    await eventually(lambda: len(receiver.on("/late")) == 2, timeout=5)
    assert time.monotonic() - committed < 3  # the housekeeping sweep runs every 10 s


# ---------------------------------------------------------------- housekeeping


async def test_an_orphaned_queue_is_resumed_and_old_deliveries_are_purged(
    gateway: Gateway, hooks: httpx.AsyncClient, receiver: Receiver
) -> None:
    made = await subscribe(hooks, receiver, "/h", event_types=["device.*"])
    pool = pool_of(gateway)
    await emit(pool, "O1")
    await eventually(lambda: receiver.on("/h"))
    # a row queued behind a head that finished while the row's transaction was open
    event_pk = await pool.fetchval("SELECT pk FROM events LIMIT 1")
    orphan = await pool.fetchval(
        """INSERT INTO webhook_deliveries (subscription_id, event_pk, ordering_key, status,
                                           origin)
           VALUES ($1, $2, 'O1', 'queued', 'replay') RETURNING id""",
        made["id"],
        event_pk,
    )
    await gateway.webhooks.housekeeping()
    await eventually(
        lambda: pool.fetchval("SELECT status FROM webhook_deliveries WHERE id = $1", orphan),
        lambda status: status == "delivered",
    )
    assert len(receiver.on("/h")) == 2
    await gateway.webhooks.housekeeping()
    assert metric(gateway, "chargegw_webhook_backlog", subscription_id=str(made["id"])) == 0
    await gateway.webhooks.close()
    await pool.execute("UPDATE webhook_deliveries SET finished_at = now() - interval '8 days'")
    await pool.execute(
        "INSERT INTO webhook_deliveries (subscription_id, event_pk, ordering_key)"
        " VALUES ($1, $2, 'open')",
        made["id"],
        event_pk,
    )
    assert await gateway.webhooks.purge() == 2
    assert [r["status"] for r in await ledger(pool, made["id"])] == ["pending"]


# ---------------------------------------------------------------- the pieces alone


def _parse(data: bytes, *, byte_by_byte: bool = False, **limits: int) -> ResponseParser:
    parser = ResponseParser(**limits)
    pieces = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    for piece in pieces:
        if parser.feed(piece):
            break
    return parser


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_the_response_parser_reads_lengths_chunks_and_interim_answers(byte_by_byte: bool) -> None:
    fixed = _parse(
        b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
        byte_by_byte=byte_by_byte,
    )
    assert (fixed.done, fixed.status, bytes(fixed.body), fixed.headers["x-a"]) == (
        True, 201, b"hello", "b",
    )  # fmt: skip
    chunked = _parse(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\n",
        byte_by_byte=byte_by_byte,
    )
    assert (chunked.done, chunked.status, bytes(chunked.body)) == (True, 200, b"Wikipedia")
    empty = _parse(b"HTTP/1.1 204 No Content\r\n\r\n", byte_by_byte=byte_by_byte)
    assert empty.done and empty.status == 204
    until_close = _parse(b"HTTP/1.0 200 OK\r\n\r\nbody", byte_by_byte=byte_by_byte)
    assert not until_close.done and until_close.closed() and bytes(until_close.body) == b"body"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", "too_large"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 70000, "too_large"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20000\r\n", "too_large"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 20000, "protocol"),
        (b"SMTP ready\r\n\r\n", "protocol"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "protocol"),
    ],
)
def test_the_response_parser_refuses_what_it_cannot_use(data: bytes, reason: str) -> None:
    with pytest.raises(ResponseError) as raised:
        _parse(data)
    assert raised.value.reason == reason


def test_a_response_cut_short_is_closed() -> None:
    for data in (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"):
        parser = _parse(data)
        with pytest.raises(ResponseError) as raised:
            parser.closed()
        assert raised.value.reason == "closed"


def test_the_body_kept_is_bounded() -> None:
    parser = _parse(b"HTTP/1.1 500 X\r\nContent-Length: 6000\r\n\r\n" + b"e" * 6000)
    assert parser.done and len(parser.body) == 4096 and parser.received == 6000


def test_the_retry_schedule_with_jitter_and_retry_after() -> None:
    schedule = (5.0, 30.0, 120.0, 10800.0)
    rng = random.Random(7)
    for attempts, base in ((1, 5.0), (2, 30.0), (3, 120.0), (4, 10800.0), (9, 10800.0)):
        delays = [webhooks.next_delay(attempts, schedule, rng=rng) for _ in range(200)]
        assert base * 0.8 <= min(delays) and max(delays) <= base * 1.2
        assert max(delays) - min(delays) > base * 0.2  # it does jitter
    assert webhooks.next_delay(1, schedule, retry_after_s=60, rng=rng) == 60
    assert webhooks.next_delay(1, schedule, retry_after_s=10**9, rng=rng) == 10800
    assert webhooks.next_delay(3, schedule, retry_after_s=1, rng=rng) >= 96


def test_signatures_match_the_standard_webhooks_package() -> None:
    secret = webhooks.new_secret()
    body = b'{"type":"x","timestamp":"t","data":{}}'
    when = int(time.time())
    expected = Webhook(secret).sign("evt_1", dt.datetime.fromtimestamp(when, dt.UTC), body)
    assert sign(secret, "evt_1", when, body) == expected


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("93.184.216.34", None),
        ("2606:2800:220:1:248:1893:25c8:1946", None),
        ("127.0.0.1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("fe80::1", "a link-local address"),
        ("ff02::1", "a multicast address"),
        ("fd00::1", "a private address"),
        ("0.0.0.0", "an unspecified address"),
    ],
)
def test_address_rules(address: str, refused: str | None) -> None:
    import ipaddress

    assert address_refusal(ipaddress.ip_address(address)) == refused


def test_urls() -> None:
    target = parse_url("https://Example.COM/a/b?c=d")
    assert (target.host, target.port, target.path, target.host_header) == (
        "example.com", 443, "/a/b?c=d", "example.com",
    )  # fmt: skip
    assert parse_url("http://[::1]:8080").host_header == "[::1]:8080"
    assert parse_url("http://bücher.example/").host == "xn--bcher-kva.example"
    for bad in ("http://a b/", "http://h/#frag", "javascript:alert(1)", "http://" + "a" * 2050):
        with pytest.raises(UrlError):
            parse_url(bad)
