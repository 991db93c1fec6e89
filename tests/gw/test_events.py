"""One event model: every change the triggers report becomes an event with the right
subjects and a payload that fits its published JSON Schema; ids grow in commit order;
the catalogue, the triggers and the documentation agree; the hub survives the database
going away; retention keeps what webhook deliveries still need.

Real PostgreSQL, a real gateway with a simulated AP3000 pile over TCP.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jsonschema_rs
import pytest

from chargegw.api import events as events_api
from chargegw.app import Gateway
from chargegw.domain.event_types import DATA_SCHEMAS, ENVELOPE_SCHEMA, EVENT_TYPES
from chargegw.domain.events import EventFilter, purge_batch
from chargesim import SimulatedAp3000Pile, Simulator

from .conftest import database_outage
from .waiting import api_client, eventually, first

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "chargegw" / "src" / "chargegw" / "store" / "migrations"
PHY = "04000001"
ACCEL = 120.0
#: a type that is never stored as an event: a ping's body is its delivery's payload
#: (webhook.disabled is written by the webhook engine with emit_event: done so here)
NOT_STORED = {"webhook.ping"}


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.2, "events_sequence_s": 0.2}


async def _all_events(api: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    """Every event of the pull API (all pages)."""
    items: list[dict[str, Any]] = []
    query: dict[str, Any] = {"limit": 1000, **params}
    while True:
        page = (await api.get("/api/v1/events", params=query)).json()
        items += page["items"]
        if page["next_cursor"] is None:
            return items
        query["cursor"] = page["next_cursor"]


def _types(events: list[dict[str, Any]]) -> set[str]:
    return {e["type"] for e in events}


def _metric(gateway: Gateway, name: str) -> float:
    value = gateway.metrics.registry.get_sample_value(f"chargegw_{name}")
    return 0.0 if value is None else value


async def _sql_events(pool: asyncpg.Pool, order_no: str) -> None:
    """What no cheap scenario causes, as the engines write it."""
    async with pool.acquire() as conn, conn.transaction():
        for kind, reason, detail in [
            ("alarm", "over_temperature", '{"port": 1, "code": 3}'),
            ("param_verified", "verified", '{"job_id": 7, "group": "running1"}'),
            ("param_mismatch", "mismatch", '{"job_id": 7, "group": "running1"}'),
            ("param_failed", "refused", '{"job_id": 7, "group": "running1"}'),
            ("param_drift", "drift", '{"group": "running1"}'),
            ("upgrade_started", "sending", '{"job_id": 9, "version": "2.0"}'),
            ("upgrade_verified", "version_reported", '{"job_id": 9, "version": "2.0"}'),
            ("upgrade_failed", "refused", '{"job_id": 9}'),
            (
                "card_swipe",
                "accepted",
                f'{{"card_id": "1234567890", "port": 2, "balance_cent": 500, '
                f'"order_no": "{order_no}"}}',
            ),
        ]:
            await conn.execute(
                "INSERT INTO device_events (device_id, at, kind, reason, detail)"
                " VALUES ($1, now(), $2, $3, $4::jsonb)",
                PHY,
                kind,
                reason,
                detail,
            )
        await conn.execute(
            "UPDATE ports SET status = 'fault', status_code = 9 WHERE device_id = $1 AND port = 2",
            PHY,
        )
        await conn.execute(
            """INSERT INTO orders (order_no, device_id, port, protocol, status)
               VALUES ('C0FFEE', $1, 2, 'ap3000', 'pending')""",
            PHY,
        )
        await conn.execute("UPDATE orders SET status = 'cancelled' WHERE order_no = 'C0FFEE'")
        command_id = await conn.fetchval(
            """INSERT INTO commands (device_id, protocol, name, priority, status, expires_at)
               VALUES ($1, 'ap3000', 'query', 5, 'pending', now()) RETURNING command_id""",
            PHY,
        )
        await conn.execute(
            "UPDATE commands SET status = 'dead', dead_reason = 'offline' WHERE command_id = $1",
            command_id,
        )
        await conn.execute(
            """INSERT INTO device_bans (device_id, until, reason)
               VALUES ($1, now() + interval '1 hour', 'operator')""",
            PHY,
        )
        await conn.execute("DELETE FROM device_bans WHERE device_id = $1", PHY)
        await conn.execute(
            """SELECT emit_event('webhook.disabled', NULL, NULL, NULL, NULL, NULL,
                                 jsonb_build_object('subscription_id', 1, 'reason', 'gone'))"""
        )


#: the subjects each family of types must name (besides its type, id and time)
_SUBJECTS: dict[str, tuple[str, ...]] = {
    "device.": ("device_id", "gateway_id", "protocol"),
    "port.": ("device_id", "gateway_id", "protocol", "port"),
    "order.": ("device_id", "gateway_id", "protocol", "port", "order_no"),
    "command.": ("device_id", "gateway_id", "protocol", "command_id"),
    "card.": ("device_id", "gateway_id", "protocol", "port"),
    "param.": ("device_id", "gateway_id", "protocol"),
    "upgrade.": ("device_id", "gateway_id", "protocol", "job_id"),
    "ban.": ("device_id",),
    "webhook.": (),
}


async def test_every_event_type_is_produced_with_its_subjects_and_fits_its_schema(
    gateway: Gateway,
) -> None:
    assert gateway.pool is not None
    pile = SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180, plugged=[True, False])
    sim = Simulator("127.0.0.1", gateway.server.port, [pile], accel=ACCEL, jitter=0, seed=1)
    async with api_client(gateway, events_api.router) as api:
        async with sim:
            await sim.wait_connected(1, timeout=10)
            await eventually(
                lambda: _all_events(api, types="port.status_changed", device_id=PHY),
                lambda got: len(got) >= 2,
                what="both ports reported",
            )
            started = await api.post(f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "full"})
            order_no = started.json()["order_no"]
            await eventually(
                lambda: _all_events(api, types="order.progress"), what="a progress sample"
            )
            assert (await api.post(f"/api/v1/devices/{PHY}/ports/1/stop")).status_code == 202
            refused = await api.post(f"/api/v1/devices/{PHY}/ports/2/start", json={"mode": "full"})
            assert refused.status_code == 202
            await pile.swipe_card(1, "99887766")  # not registered: refused
            await eventually(
                lambda: _all_events(api),
                lambda got: {"order.settled", "order.failed", "card.swipe_refused"} <= _types(got),
                what="the order settled, the refused one failed, the swipe refused",
            )
        await eventually(lambda: _all_events(api, types="device.offline"), what="the pile offline")
        await _sql_events(gateway.pool, order_no)
        events = await eventually(
            lambda: _all_events(api),
            lambda got: set(EVENT_TYPES) - NOT_STORED <= _types(got),
            what="every type of the catalogue",
        )
        schema = (await api.get("/openapi.json")).json()

    assert [e["id"] for e in events] == list(range(1, len(events) + 1))  # dense, in order
    for event in events:
        name = event["type"]
        family = name.split(".")[0] + "."
        missing = [s for s in _SUBJECTS[family] if event[s] is None]
        assert not missing, f"{name} lacks {missing}: {event}"
        if family in ("device.", "port.", "order.", "command.", "card.", "param.", "upgrade."):
            assert (event["device_id"], event["gateway_id"], event["protocol"]) == (
                PHY,
                PHY,
                "ap3000",
            )
        if name.startswith("order.") and event["order_no"] != "C0FFEE":
            assert event["order_no"] in (order_no, refused.json()["order_no"])
        # it fits the schema the OpenAPI document publishes for its type ...
        model = events_api.EVENT_MODELS[name].__name__
        validator = jsonschema_rs.validator_for(
            {"$ref": f"#/components/schemas/{model}", "components": schema["components"]}
        )
        problems = [e.message for e in validator.iter_errors(event)]
        assert not problems, f"{name}: {problems} in {event}"
        # ... and names no key the catalogue does not document
        documented = set(ENVELOPE_SCHEMA) | set(EVENT_TYPES[name].data)
        assert set(event) <= documented, f"{name}: undocumented {set(event) - documented}"
    # the start's ack names its order; the stop reached `stopping` before the settlement
    acked = [e for e in events if e["type"] == "command.acked" and e["order_no"] == order_no]
    assert acked
    mine = [
        e["type"] for e in events if e["order_no"] == order_no and e["type"] != "order.progress"
    ]
    assert mine.index("order.started") < mine.index("order.stopping") < mine.index("order.settled")


async def test_ids_follow_the_commit_order_not_the_write_order(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as a, db_pool.acquire() as b:
        first_written = a.transaction()
        await first_written.start()
        await a.execute("SELECT emit_event('ban.placed', 'A', NULL, NULL, NULL, NULL, '{}')")
        await b.execute("SELECT emit_event('ban.placed', 'B', NULL, NULL, NULL, NULL, '{}')")
        assert await db_pool.fetchval("SELECT sequence_events()") == 1  # B only: A is open
        await first_written.commit()
        assert await db_pool.fetchval("SELECT sequence_events()") == 2
    rows = {r["device_id"]: r for r in await db_pool.fetch("SELECT device_id, pk, id FROM events")}
    assert rows["A"]["pk"] < rows["B"]["pk"]  # A wrote first ...
    assert rows["A"]["id"] > rows["B"]["id"]  # ... and committed last


async def test_concurrent_writers_and_sequencers_give_dense_ids_a_reader_never_misses(
    db_dsn: str,
) -> None:
    """Writers commit small transactions, several sequencers race, a reader follows with
    ``id > last``: it meets every event exactly once, and the ids are 1..N."""
    writers, per_writer = 4, 60
    pool = await asyncpg.create_pool(db_dsn, min_size=8, max_size=8)
    assert pool is not None
    done = asyncio.Event()

    async def write(n: int) -> None:
        for i in range(per_writer):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "SELECT emit_event('ban.placed', $1, NULL, NULL, NULL, NULL, '{}')",
                    f"W{n}-{i:03d}",
                )
                if i % 3 == 0:
                    await asyncio.sleep(0.001)  # commit late: out of write order

    async def sequence() -> None:
        while not done.is_set():
            await pool.fetchval("SELECT sequence_events(7)")

    seen: list[int] = []

    async def read() -> None:
        last = 0
        while len(seen) < writers * per_writer:
            rows = await pool.fetch("SELECT id FROM events WHERE id > $1 ORDER BY id", last)
            for row in rows:
                seen.append(row["id"])
                last = row["id"]
            await asyncio.sleep(0)

    try:
        async with asyncio.timeout(60):
            sequencers = [asyncio.create_task(sequence()) for _ in range(3)]
            reader = asyncio.create_task(read())
            await asyncio.gather(*(write(n) for n in range(writers)))
            await reader
            done.set()
            await asyncio.gather(*sequencers)
    finally:
        await pool.close()
    assert seen == list(range(1, writers * per_writer + 1))


def test_every_type_the_sql_can_emit_is_in_the_catalogue() -> None:
    emitted: set[str] = set()
    for path in sorted(MIGRATIONS.glob("*.sql")):
        text = path.read_text()
        emitted |= set(re.findall(r"'([a-z_]+\.[a-z_]+)'", text))
        # `'command.' || NEW.status` for the ends a command can have
        if "'command.' || NEW.status" in text:
            statuses = re.search(r"NEW\.status IN \(([^)]*)\)", text)
            assert statuses is not None
            emitted |= {f"command.{s}" for s in re.findall(r"'([a-z]+)'", statuses.group(1))}
    assert emitted, "no event type found in the migrations"
    assert emitted <= set(EVENT_TYPES), f"not in the catalogue: {emitted - set(EVENT_TYPES)}"


def test_every_data_key_has_a_json_type_and_none_shadows_the_envelope() -> None:
    for spec in EVENT_TYPES.values():
        assert set(spec.data) <= set(DATA_SCHEMAS), spec.name
        # a data key equal to an envelope key must be the same thing (a swipe's port)
        assert set(spec.data) & set(ENVELOPE_SCHEMA) <= {"port"}, spec.name


def test_the_documentation_lists_the_catalogue_as_the_code_defines_it() -> None:
    doc = (ROOT / "docs" / "events.md").read_text()
    for spec in EVENT_TYPES.values():
        keys = ", ".join(f"`{k}`" for k in spec.data)
        row = f"| `{spec.name}` | {spec.description} | {keys} |"
        assert row in doc, f"docs/events.md lacks or misstates: {row}"
    catalogue = doc.split("## The catalogue", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", catalogue, re.MULTILINE))
    assert listed == set(EVENT_TYPES)


# ---------------------------------------------------------------- the hub


async def _emit(pool: asyncpg.Pool, device_id: str, count: int = 1) -> None:
    await pool.execute(
        "SELECT emit_event('ban.placed', $1, NULL, NULL, NULL, NULL, '{}')"
        " FROM generate_series(1, $2)",
        device_id,
        count,
    )


async def test_the_hub_survives_a_database_outage_and_catches_up_without_a_gap(
    gateway: Gateway, db_pool: asyncpg.Pool, pg_server_dsn: str, db_dsn: str
) -> None:
    hub = gateway.events
    async with hub.subscribe(EventFilter(device_ids=frozenset({"X"}))) as sub:
        sub.go_live()
        got: list[int] = []

        async def receive(count: int) -> None:
            while len(got) < count:
                got.extend(e.id for e in await sub.next_batch(5.0))

        await _emit(db_pool, "X", 3)
        await asyncio.wait_for(receive(3), 10)
        woken: list[int] = []
        hub.add_wakeup(woken.append)
        async with database_outage(pg_server_dsn, db_dsn):
            await eventually(lambda: not hub.connected, what="the hub noticed the outage")
        # written as soon as the database is back, before the hub listens again: their
        # notifications are lost, the catch-up after reconnecting finds them
        pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
        assert pool is not None
        try:
            await _emit(pool, "X", 5)
            await _emit(pool, "Y", 2)
            await _emit(pool, "X", 2)
        finally:
            await pool.close()
        await asyncio.wait_for(receive(10), 15)
    assert got == list(range(1, 4)) + list(range(4, 9)) + [11, 12]
    assert woken and woken[-1] == 12
    assert _metric(gateway, "event_hub_reconnects_total") >= 1
    assert hub.connected


async def test_a_failing_wakeup_does_not_stop_the_others(
    gateway: Gateway, db_pool: asyncpg.Pool
) -> None:
    def broken(_: int) -> None:
        raise RuntimeError("a bug in a wake-up")

    woken: list[int] = []
    gateway.events.add_wakeup(broken)
    gateway.events.add_wakeup(woken.append)
    await _emit(db_pool, "X", 2)
    await eventually(lambda: woken, lambda w: w and w[-1] == 2, what="woken with id 2")
    await _emit(db_pool, "X", 1)
    await eventually(lambda: woken, lambda w: w[-1] == 3, what="woken again with id 3")


# ---------------------------------------------------------------- retention


async def _subscription(conn: asyncpg.Connection) -> int:
    sub_id: int = await conn.fetchval(
        """INSERT INTO webhook_subscriptions (url, event_types, secret)
           VALUES ('http://127.0.0.1:9/hook', '{ban.*}', 'whsec_dGVzdA==') RETURNING id"""
    )
    return sub_id


async def test_retention_deletes_old_events_with_finished_deliveries_and_keeps_open_ones(
    gateway: Gateway, db_pool: asyncpg.Pool
) -> None:
    async with db_pool.acquire() as conn:
        await _subscription(conn)
        await conn.execute(
            """SELECT emit_event('ban.placed', 'OLD' || n, NULL, NULL, NULL, NULL, '{}',
                                 now() - interval '40 days')
                 FROM generate_series(1, 5) AS n"""
        )
        await conn.execute("SELECT emit_event('ban.placed', 'NEW', NULL, NULL, NULL, NULL, '{}')")
        await first(
            lambda: conn.fetchval("SELECT count(*) = 6 FROM events WHERE id IS NOT NULL"),
            "the six events sequenced",
        )
        # OLD2's delivery is still pending; the others are finished
        await conn.execute(
            """UPDATE webhook_deliveries d SET status = 'delivered', finished_at = now()
                 FROM events e WHERE e.pk = d.event_pk AND e.device_id <> 'OLD2'"""
        )
    assert await gateway.events.purge_expired() == 4
    left = await db_pool.fetch("SELECT device_id FROM events ORDER BY id")
    assert [r["device_id"] for r in left] == ["OLD2", "NEW"]
    deliveries = await db_pool.fetchval("SELECT count(*) FROM webhook_deliveries")
    assert deliveries == 2  # OLD2's open one, NEW's
    assert await db_pool.fetchval("SELECT purged_through FROM event_retention") == 5
    assert _metric(gateway, "events_deleted_total") == 4

    # once its delivery is finished, the kept event goes too
    await db_pool.execute("UPDATE webhook_deliveries SET status = 'failed'")
    assert await gateway.events.purge_expired() == 1
    assert await db_pool.fetchval("SELECT count(*) FROM events") == 1
    assert await gateway.events.purge_expired() == 0


async def test_retention_runs_in_one_process_at_a_time(db_pool: asyncpg.Pool) -> None:
    await db_pool.execute(
        """SELECT emit_event('ban.placed', 'OLD', NULL, NULL, NULL, NULL, '{}',
                             now() - interval '40 days')"""
    )
    await db_pool.fetchval("SELECT sequence_events()")
    async with db_pool.acquire() as one, db_pool.acquire() as other, one.transaction():
        step = await purge_batch(one, retention_days=30, batch=100)
        assert step is not None and step.deleted == 1
        async with other.transaction():
            assert await purge_batch(other, retention_days=30, batch=100) is None


async def test_a_delivery_cannot_point_at_a_missing_event(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as conn:
        sub_id = await _subscription(conn)
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                """INSERT INTO webhook_deliveries (subscription_id, event_pk, ordering_key)
                   VALUES ($1, 424242, 'X')""",
                sub_id,
            )
