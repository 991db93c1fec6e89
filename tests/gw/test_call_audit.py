"""The audit trail of API calls: what is recorded over real HTTP (a start with its order and
command, refused keys, masked secrets), ``GET /api/v1/audit/calls`` with its filters and
pages, and the writer: group commit, a database outage, refused rows, shutdown, purge."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import asyncpg
import httpx
import pytest
import structlog
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from chargegw.api.app import ApiState, create_app
from chargegw.api.guard import Guard, HttpLimits
from chargegw.app import Gateway
from chargegw.domain import call_audit
from chargegw.domain.call_audit import CallAuditWriter, CallRecord
from chargegw.metrics import Metrics
from chargesim import SimulatedAp3000Pile, Simulator

from .conftest import database_outage, settings_for
from .waiting import eventually, free_port

KEY = "audit-test-key-0123456789abcdef0"
OTHER = "audit-other-key-0123456789abcdef"
PHY = "04000A01"
CALLS = "/api/v1/audit/calls"


def _as(key: str | None = KEY, source: str | None = None, **extra: str) -> dict[str, str]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    if source is not None:
        headers["X-Forwarded-For"] = source
    return {**headers, **extra}


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Served:
    gateway: Gateway
    client: httpx.AsyncClient

    async def calls(self, **filters: Any) -> list[dict[str, Any]]:
        response = await self.client.get(CALLS, params=filters, headers=_as())
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items


@pytest.fixture
async def served(db_dsn: str) -> AsyncIterator[Served]:
    port = free_port()
    gateway = Gateway(settings_for(db_dsn, http_port=port, api_keys=f"{KEY},{OTHER}"))
    await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield Served(gateway, client)
    finally:
        await gateway.stop()


@pytest.fixture
def audit_log(monkeypatch: pytest.MonkeyPatch) -> list[MutableMapping[str, Any]]:
    """What ``chargegw.domain.call_audit`` logs (a logger of its own: loggers cached
    earlier in the session ignore ``capture_logs``)."""
    capture = structlog.testing.LogCapture()
    monkeypatch.setattr(call_audit, "log", structlog.wrap_logger(None, processors=[capture]))
    return capture.entries


def _row(path: str = "/api/v1/x", **fields: Any) -> CallRecord:
    values: dict[str, Any] = {
        "at": dt.datetime.now(dt.UTC),
        "request_id": "r1",
        "key_id": "k1",
        "key_name": None,
        "key_fingerprint": None,
        "auth_failure": None,
        "source": "127.0.0.1",
        "method": "POST",
        "path": path,
        "query": "",
        "body": None,
        "body_excerpt": None,
        "body_bytes": 0,
        "status": 202,
        "duration_ms": 1.5,
        "device_id": None,
        "order_nos": [],
        "command_ids": [],
        "job_ids": [],
        "resource_id": None,
        **fields,
    }
    return CallRecord(**values)


# ---------------------------------------------------------------- what is recorded


async def test_a_start_and_a_stop_are_on_record_before_their_answer(served: Served) -> None:
    gateway, client = served.gateway, served.client
    pile = SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180)
    async with Simulator("127.0.0.1", gateway.server.port, [pile], jitter=0, seed=1) as sim:
        await sim.wait_connected(1, timeout=10)

        async def known() -> bool:
            response = await client.get(f"/api/v1/devices/{PHY}", headers=_as())
            return response.status_code == 200

        await eventually(known, what=f"{PHY} registered")
        response = await client.post(
            f"/api/v1/devices/{PHY}/ports/1/start",
            json={"mode": "time", "duration_min": 10},
            headers=_as(**{"X-Request-Id": "partner-req-0001"}),
        )
        assert response.status_code == 202, response.text
        started = response.json()
        assert response.headers["X-Request-Id"] == "partner-req-0001"
        # on record already: the answer waited for the row's commit
        assert gateway.pool is not None
        row = await gateway.pool.fetchrow(
            "SELECT * FROM call_audit WHERE request_id = 'partner-req-0001'"
        )
        assert row is not None
        stop = await client.post(f"/api/v1/devices/{PHY}/ports/1/stop", headers=_as())
        assert stop.status_code == 202, stop.text
    items = await served.calls(order_no=started["order_no"])
    assert [i["path"].rsplit("/", 1)[1] for i in items] == ["stop", "start"]
    stopped, start = items
    assert start["request_id"] == "partner-req-0001"
    assert start["method"] == "POST" and start["status"] == 202
    assert start["key_id"] is not None and start["key_id"].startswith("config:")
    assert start["key_fingerprint"] == _fingerprint(KEY) and start["auth_failure"] is None
    assert start["source"] == "127.0.0.1" and start["device_id"] == PHY
    assert start["order_nos"] == [started["order_no"]]
    assert start["command_ids"] == [started["command_id"]]
    assert start["body"] == {"mode": "time", "duration_min": 10}
    assert start["body_bytes"] == len(b'{"mode":"time","duration_min":10}')
    assert start["duration_ms"] > 0 and start["at"] <= stopped["at"]
    assert stopped["command_ids"] == [stop.json()["command_id"]]
    assert stopped["request_id"] == stop.headers["X-Request-Id"]
    # reads are not audited
    assert await served.calls(method="GET") == []


async def test_refused_keys_are_on_record_with_their_reason_and_fingerprint(
    served: Served,
) -> None:
    client = served.client
    wrong = "cgw_not-a-key-0123456789abcdefghijklmnopq"
    assert (
        await client.get("/api/v1/devices", headers=_as(wrong, "203.0.113.9"))
    ).status_code == 401
    assert (await client.post("/api/v1/cards", json={}, headers=_as(None))).status_code == 401
    assert (await client.get("/api/v1/devices", headers=_as())).status_code == 200
    refused = await served.calls(status=401)
    assert [(i["method"], i["auth_failure"]) for i in refused] == [
        ("POST", "missing_key"),
        ("GET", "unknown_key"),
    ]
    missing, unknown = refused
    assert unknown["key_id"] is None and unknown["key_fingerprint"] == _fingerprint(wrong)
    assert unknown["source"] == "203.0.113.9"
    assert missing["key_fingerprint"] is None and missing["source"] == "127.0.0.1"
    assert wrong not in json.dumps(refused)


async def test_secrets_are_masked_in_bodies_and_queries(served: Served) -> None:
    secrets = {
        "password": "hunter2-password",
        "api_key": "cgw_livekey0123456789abcdefghij",
        "webhookSecret": "whsec_c2VjcmV0c2VjcmV0c2VjcmV0",
        "token": 123456789,
    }
    body = {
        "command": "set_qr_code",
        "params": {
            **secrets,
            "key_id": 7,
            "nested": [{"access_token": "tok-abcdef-987654"}],
            "note": "use cgw_otherkey0123456789abcdefgh or whsec_dGhpc2lzYXNlY3JldA== here",
            "holder": None,
        },
    }
    response = await served.client.post(
        "/api/v1/devices/NOPE0001/commands",
        json=body,
        params={"token": "query-token-abc123", "page": "2"},
        headers=_as(),
    )
    assert response.status_code == 404, response.text
    (item,) = await served.calls(device_id="NOPE0001")
    params = item["body"]["params"]
    assert params["password"] == params["api_key"] == params["webhookSecret"] == "***"
    assert params["token"] == "***" and params["key_id"] == 7 and params["holder"] is None
    assert params["nested"] == [{"access_token": "***"}]
    assert params["note"] == "use cgw_*** or whsec_*** here"
    assert item["query"] == "token=***&page=2"
    stored = json.dumps(item)
    for value in [*map(str, secrets.values()), "tok-abcdef", "query-token", "cgw_other", KEY]:
        assert value not in stored, value
    # a body above 8 KiB keeps a masked excerpt of 8 KiB
    long = {"command": "set_qr_code", "params": {"secret": "s3cr3t-value", "pad": "x" * 20000}}
    response = await served.client.post(
        "/api/v1/devices/NOPE0002/commands", json=long, headers=_as()
    )
    (item,) = await served.calls(device_id="NOPE0002")
    assert item["body"] is None and item["body_bytes"] > 20000
    assert len(item["body_excerpt"].encode()) == call_audit.BODY_LIMIT
    assert '"secret": "***"' in item["body_excerpt"] and "s3cr3t" not in item["body_excerpt"]


async def test_values_postgresql_cannot_hold_are_stored_escaped(served: Served) -> None:
    response = await served.client.post(
        "/api/v1/devices/A%00B/commands", json={"command": "reboot"}, headers=_as()
    )
    assert response.status_code == 422, response.text
    (item,) = await served.calls(status=422)
    assert item["path"] == "/api/v1/devices/A\\x00B/commands"
    # NaN is not JSON: jsonb would refuse the whole row
    response = await served.client.post(
        "/api/v1/devices/NAN00001/commands",
        content=b'{"command": "reboot", "params": {"x": NaN, "y": 1e400}}',
        headers=_as(**{"Content-Type": "application/json"}),
    )
    assert response.status_code == 422, response.text
    (item,) = await served.calls(device_id="NAN00001")
    assert item["body"] == {"command": "reboot", "params": {"x": "nan", "y": "inf"}}


# ---------------------------------------------------------------- reading it back


async def test_filters_and_pages(served: Served) -> None:
    client = served.client
    for n in range(5):
        await client.post(f"/api/v1/devices/AAAA000{n}/ports/1/stop", headers=_as(KEY))
    for _ in range(3):
        await client.post(
            "/api/v1/devices/BBBB0001/commands", json={"command": "reboot"}, headers=_as(OTHER)
        )
    await client.post("/api/v1/orders/ffff0000ffff0000ffff0000ffff0000/cancel", headers=_as(OTHER))
    await client.get("/api/v1/devices", headers=_as("wrong-key-000000000000"))
    everything = await served.calls(limit=1000)
    assert len(everything) == 10
    assert [i["id"] for i in everything] == sorted((i["id"] for i in everything), reverse=True)

    key_of = {i["key_fingerprint"]: i["key_id"] for i in everything if i["key_id"]}
    mine = await served.calls(key_id=key_of[_fingerprint(KEY)])
    assert len(mine) == 5 and all(i["path"].startswith("/api/v1/devices/AAAA") for i in mine)
    assert len(await served.calls(key_id=key_of[_fingerprint(OTHER)])) == 4
    assert len(await served.calls(path="/api/v1/devices/AAAA0003/")) == 1
    assert len(await served.calls(path="/api/v1/devices/AAAA")) == 5
    assert len(await served.calls(path="/api/v1/devices/%")) == 0  # a prefix, no wildcards
    assert len(await served.calls(device_id="BBBB0001")) == 3
    assert len(await served.calls(method="GET")) == 1
    assert len(await served.calls(status=401, method="GET")) == 1
    assert len(await served.calls(status=404)) == 9
    cancelled = await served.calls(order_no="FFFF0000FFFF0000FFFF0000FFFF0000")
    assert [i["path"] for i in cancelled] == [
        "/api/v1/orders/ffff0000ffff0000ffff0000ffff0000/cancel"
    ]
    middle = everything[4]["at"]
    newer = await served.calls(since=middle)
    older = await served.calls(until=middle)
    assert len(newer) + len(older) == 10 and all(i["at"] >= middle for i in newer)

    pages: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get(CALLS, params=params, headers=_as())).json()
        pages.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [i["id"] for i in pages] == [i["id"] for i in everything]

    for bad in (
        {"cursor": "not-a-cursor"},
        {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        {"status": "99"},
        {"method": "BREW"},
    ):
        response = await client.get(CALLS, params=bad, headers=_as())
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["field"] == next(iter(bad))


# ---------------------------------------------------------------- the writer


async def test_rows_arriving_together_share_one_commit(db_pool: asyncpg.Pool) -> None:
    writer = CallAuditWriter(lambda: db_pool, Metrics())
    stored = await asyncio.gather(*(writer.record(_row(request_id=f"r{n}")) for n in range(200)))
    assert all(stored)
    transactions = await db_pool.fetchval("SELECT count(DISTINCT xmin::text) FROM call_audit")
    assert await db_pool.fetchval("SELECT count(*) FROM call_audit") == 200
    assert transactions < 20, transactions
    await writer.close()


async def test_rows_are_held_while_the_database_is_away_and_stored_after(
    pg_server_dsn: str,
    db_dsn: str,
    db_pool: asyncpg.Pool,
    audit_log: list[MutableMapping[str, Any]],
) -> None:
    metrics = Metrics()
    writer = CallAuditWriter(lambda: db_pool, metrics, timeout_s=1.0)
    assert await writer.record(_row(request_id="before"))
    async with database_outage(pg_server_dsn, db_dsn):
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert not await writer.record(_row(request_id="during-1"))
        assert not await writer.record(_row(request_id="during-2"))  # no second wait
        assert loop.time() - started < 3.0
        assert writer.unsaved == 2
        assert metrics.registry.get_sample_value("chargegw_api_audit_unsaved") == 2
    await eventually(writer.retry, lambda _: writer.unsaved == 0, what="held rows stored")
    ids = [
        r["request_id"]
        for r in await db_pool.fetch("SELECT request_id FROM call_audit ORDER BY id")
    ]
    assert ids == ["before", "during-1", "during-2"]
    assert [e["event"] for e in audit_log] == [
        "call audit rows held: the database is unavailable",
        "call audit rows stored again",
    ]
    await writer.close()


async def test_a_row_the_database_refuses_is_logged_and_the_others_stored(
    db_pool: asyncpg.Pool, audit_log: list[MutableMapping[str, Any]]
) -> None:
    metrics = Metrics()
    writer = CallAuditWriter(lambda: db_pool, metrics)
    rows = [_row(request_id="a"), _row(request_id="bad", body="{not json"), _row(request_id="c")]
    await asyncio.gather(*(writer.record(r) for r in rows))
    stored = {r["request_id"] for r in await db_pool.fetch("SELECT request_id FROM call_audit")}
    assert stored == {"a", "c"} and writer.unsaved == 0
    refused = [e for e in audit_log if e["event"] == "call audit row refused by the database"]
    assert [e["request_id"] for e in refused] == ["bad"]
    assert (
        metrics.registry.get_sample_value("chargegw_api_audit_lost_total", {"reason": "rejected"})
        == 1
    )
    await writer.close()


async def test_rows_still_held_at_shutdown_go_to_the_log(
    audit_log: list[MutableMapping[str, Any]],
) -> None:
    writer = CallAuditWriter(lambda: None, Metrics(), max_unsaved=2)
    for n in range(3):
        assert not await writer.record(_row(request_id=f"r{n}"))
    assert writer.unsaved == 2  # the oldest overflowed: logged
    await writer.close()
    lost = [(e["event"], e["request_id"]) for e in audit_log if e["log_level"] == "error"]
    assert lost == [
        ("call audit row not stored: too many held", "r0"),
        ("call audit row not stored: the process stops", "r1"),
        ("call audit row not stored: the process stops", "r2"),
    ]


async def test_purge_removes_old_rows_one_process_at_a_time(db_pool: asyncpg.Pool) -> None:
    writer = CallAuditWriter(lambda: db_pool)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=100)
    for n in range(7):
        await writer.record(_row(request_id=f"old{n}", at=old))
    await writer.record(_row(request_id="new"))
    async with db_pool.acquire() as other, other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock(hashtext('chargegw.call_audit_purge'))")
        assert await call_audit.purge(db_pool, 90) == 0  # another process is purging
    assert await call_audit.purge(db_pool, 90, batch=3) == 7
    assert [r["request_id"] for r in await db_pool.fetch("SELECT request_id FROM call_audit")] == [
        "new"
    ]
    await writer.close()


def test_secret_names() -> None:
    for name in ("secret", "api_key", "apiKey", "X-Api-Key", "password", "access_token", "keys"):
        assert call_audit.is_secret_name(name), name
    for name in ("key_id", "holder", "monkey", "keyboard", "order_no", "tokenizer"):
        assert not call_audit.is_secret_name(name), name


def test_created_refs_reads_orders_commands_and_jobs() -> None:
    answer = {
        "id": 12,
        "order_no": "AB",
        "command_id": 5,
        "groups": [{"set_command_id": 6, "read_command_id": None}, {"set_command_id": 7}],
        "job_id": 3,
        "items": [{"order_no": "AB"}, {"command_ids": [8, 9]}],
    }
    refs = call_audit.created_refs(answer)
    assert refs.order_nos == ["AB"] and sorted(refs.command_ids) == [5, 6, 7, 8, 9]
    assert refs.job_ids == [3] and refs.resource_id == "12"
    assert call_audit.created_refs([1, "x", None]) == call_audit.Refs([], [], [], None)


# ---------------------------------------------------------------- unusual answers

broken = APIRouter(prefix="/api/v1/test")


@broken.post("/crash")
async def crash(body: dict[str, int]) -> None:
    raise RuntimeError(f"a defect with {body}")


@broken.post("/long")
async def long() -> StreamingResponse:
    async def parts() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 4096

    return StreamingResponse(parts(), media_type="application/octet-stream")


async def test_a_crash_and_a_long_answer_are_on_record(db_pool: asyncpg.Pool) -> None:
    writer = CallAuditWriter(lambda: db_pool)
    state = ApiState(
        pool=db_pool,
        metrics=Metrics(),
        readiness=dict,
        auth_required=False,
        guard=Guard(HttpLimits(), audit=writer),
    )
    transport = httpx.ASGITransport(
        app=create_app(state, routers=[broken]), raise_app_exceptions=False
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/api/v1/test/crash", json={"a": 1})).status_code == 500
        long_answer = await client.post("/api/v1/test/long")
        assert long_answer.status_code == 200 and len(long_answer.content) == 40 * 4096
    rows = await db_pool.fetch("SELECT path, status, key_id, body FROM call_audit ORDER BY id")
    assert [(r["path"], r["status"], r["key_id"]) for r in rows] == [
        ("/api/v1/test/crash", 500, "local"),
        ("/api/v1/test/long", 200, "local"),
    ]
    assert json.loads(rows[0]["body"]) == {"a": 1}
    await writer.close()
