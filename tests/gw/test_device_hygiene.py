"""Device-port hygiene (issue 13): the identification deadline, the cap on unidentified
connections per source address, the network allow-list, and the device registry with
its API. Real TCP, real PostgreSQL; the IPv4-mapped address case (a listener that the
gateway never opens dual-stack) on a stand-in transport."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from chargegw.api import registry as registry_routes
from chargegw.app import Gateway
from chargegw.config import ConfigError, load_settings, parse_networks
from chargegw.domain import device_registry
from chargegw.metrics import Metrics
from chargegw.net.transport import DeviceLink, DeviceServer
from chargegw.store.errors import DB_ERRORS
from chargeproto import ap3000, bkv

from .conftest import database_outage, settings_for
from .piles import RawBkvGateway, RawPile
from .test_transport_units import FakeTransport, NullHandler
from .waiting import api_client, eventually

#: a BKV gateway heartbeat of the guide (gateway 82200520004869)
BKV_HEARTBEAT = bytes.fromhex(
    "fcfe002e0000000000000182200520004869383938363034363331313230373033313934313763562e3172"
    "3436001fcafcee"
)
BKV_GATEWAY = "82200520004869"
#: the SIM of a connection that never identifies itself (not the piles' ICCID: a newer
#: connection with the same SIM closes the older one)
OTHER_ICCID = b"89860448161870064899"
REGISTRY = "/api/v1/devices/registry"


def refused(gateway: Gateway, rule: str) -> float:
    """chargegw_device_connections_refused_total{rule}."""
    value = gateway.metrics.registry.get_sample_value(
        "chargegw_device_connections_refused_total", {"rule": rule}
    )
    return value or 0.0


def unidentified(gateway: Gateway) -> float:
    value = gateway.metrics.registry.get_sample_value("chargegw_device_connections_unidentified")
    return value or 0.0


class Silent:
    """A plain TCP connection that sends only what the test gives it."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, port: int, data: bytes = b"") -> Silent:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        if data:
            self.writer.write(data)
            await self.writer.drain()
        return self

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection within ``timeout`` (nothing is sent
        to these connections, so any data is a failure too)."""
        assert self.reader is not None
        try:
            data = await asyncio.wait_for(self.reader.read(1024), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        assert data == b"", f"the server sent {data!r}"
        return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@pytest.fixture
async def silent() -> AsyncIterator[list[Silent]]:
    """Connections the test opens, closed after it."""
    opened: list[Silent] = []
    yield opened
    for connection in opened:
        connection.close()


async def _open(opened: list[Silent], port: int, data: bytes = b"") -> Silent:
    connection = await Silent().open(port, data)
    opened.append(connection)
    return connection


# ---------------------------------------------------------------- identification deadline


@pytest.mark.settings(device_identify_timeout_s=1.0)
async def test_a_connection_that_does_not_identify_itself_in_time_is_closed(
    gateway: Gateway, silent: list[Silent]
) -> None:
    port = gateway.server.port
    pile = await RawPile("04000030").connect(port)
    await pile.register()
    await pile.expect(ap3000.RegistrationReply)
    started = time.monotonic()
    quiet = await _open(silent, port)
    # an ICCID preamble and a keepalive are not frames: they do not identify a device
    chatty = await _open(silent, port, OTHER_ICCID + b"link")
    half = await _open(silent, port, ap3000.encode(ap3000.TimeRequest("04000031", 1))[:-3])

    for connection in (quiet, chatty, half):
        assert await connection.closed_by_server(timeout=6.0)
    assert time.monotonic() - started >= 1.0  # not before the deadline
    assert refused(gateway, "identify_timeout") == 3
    await eventually(lambda: unidentified(gateway) == 0)

    await pile.heartbeat()  # the pile that identified itself in time is still served
    await pile.expect(ap3000.HeartbeatReply)
    await pile.close()


@pytest.mark.settings(device_identify_timeout_s=0.3)
async def test_a_connection_we_stopped_reading_from_is_not_timed_out(gateway: Gateway) -> None:
    gateway.server.set_paused(True)  # as when the database is backlogged
    pile = await RawPile("04000032").connect(gateway.server.port, iccid=None)
    await pile.register()  # waits unread in the gateway's socket buffer
    await asyncio.sleep(1.0)  # the deadline passes, more than once, while paused
    gateway.server.set_paused(False)
    await pile.expect(ap3000.RegistrationReply)  # read now, identified, answered
    assert refused(gateway, "identify_timeout") == 0
    await pile.close()


async def test_the_deadline_is_thirty_seconds_unless_configured() -> None:
    assert load_settings(env={}).device_identify_timeout_s == 30.0


# ---------------------------------------------------------------- per-source cap


@pytest.mark.settings(device_max_unidentified_per_source=3)
async def test_unidentified_connections_per_source_address_are_capped(
    gateway: Gateway, silent: list[Silent]
) -> None:
    port = gateway.server.port
    piles = [await RawPile(f"0400004{n}").connect(port, iccid=None) for n in range(3)]
    await eventually(lambda: unidentified(gateway) == 3)

    extra = await _open(silent, port)  # a fourth silent one from 127.0.0.1: closed at once
    assert await extra.closed_by_server(timeout=5.0)
    assert refused(gateway, "per_source") == 1

    for pile in piles:  # identified connections do not count (piles behind one NAT)
        await pile.register()
        await pile.expect(ap3000.RegistrationReply)
    await eventually(lambda: unidentified(gateway) == 0)
    more = [await _open(silent, port) for _ in range(3)]
    await eventually(lambda: unidentified(gateway) == 3)
    assert refused(gateway, "per_source") == 1
    assert len(gateway.server.links) == 6 and len(more) == 3
    for pile in piles:
        await pile.close()


@pytest.mark.settings(device_max_unidentified_per_source=1, overload_lag_s=0.2)
async def test_a_worker_behind_holds_no_silence_against_connections_and_says_so(
    gateway: Gateway, silent: list[Silent], api: httpx.AsyncClient
) -> None:
    """While the event loop lags (overload), connections may be silent only because the
    worker has not read them: the per-source cap does not refuse them; /readyz and the
    metrics say the worker is behind until the lag stays low."""
    port = gateway.server.port
    await _open(silent, port)
    await eventually(lambda: unidentified(gateway) == 1)
    gateway._loop_lag(0.5)  # as the process-health probe reports a late wake-up
    assert (
        gateway.metrics.registry.get_sample_value(
            "chargegw_worker_behind", {"worker": str(gateway.worker)}
        )
        == 1
    )
    ready = await api.get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["checks"]["load"] is False and "0.50 s behind" in body["reasons"]["load"]
    more = await _open(silent, port)
    await eventually(lambda: unidentified(gateway) == 2)
    assert refused(gateway, "per_source") == 0
    assert not await more.closed_by_server(timeout=0.3)
    for lag in (0.15, 0.05, 0.05, 0.05):  # 0.15: not below half the limit, starts over
        gateway._loop_lag(lag)
    assert gateway.server.behind
    gateway._loop_lag(0.05)
    assert not gateway.server.behind
    assert (await api.get("/readyz")).json()["checks"]["load"] is True
    await _open(silent, port)  # caught up: the cap holds again
    await eventually(lambda: refused(gateway, "per_source") == 1)


# ---------------------------------------------------------------- network allow-list


@pytest.mark.settings(device_allowed_networks="10.0.0.0/8,2001:db8::/32")
async def test_a_pile_from_outside_the_allowed_networks_is_refused_at_accept(
    gateway: Gateway, silent: list[Silent]
) -> None:
    registration = ap3000.Registration(
        "04000050",
        1,
        firmware_version=126,
        port_count=2,
        virtual_id=0,
        device_type=0x21,
        work_mode=0,
        power_board_version=0,
    )
    pile = await _open(silent, gateway.server.port, ap3000.encode(registration))
    assert await pile.closed_by_server(timeout=5.0)  # and nothing answered
    assert refused(gateway, "network") == 1
    assert gateway.metrics.registry.get_sample_value("chargegw_connections_accepted_total") == 0
    await gateway.writer.drained()
    assert gateway.pool is not None
    assert await gateway.pool.fetchval("SELECT count(*) FROM devices") == 0
    assert await gateway.pool.fetchval("SELECT count(*) FROM frames") == 0


@pytest.mark.settings(device_allowed_networks="10.0.0.0/8, 127.0.0.0/8")
async def test_a_pile_from_an_allowed_network_is_served(gateway: Gateway) -> None:
    pile = await RawPile("04000051").connect(gateway.server.port)
    await pile.register()
    await pile.expect(ap3000.RegistrationReply)
    assert refused(gateway, "network") == 0
    await pile.close()


class _PeerTransport(FakeTransport):
    def __init__(self, peer: tuple[Any, ...]) -> None:
        super().__init__()
        self.peer = peer

    def get_extra_info(self, name: str) -> Any:
        return self.peer if name == "peername" else None


@pytest.mark.parametrize(
    ("allowed", "peer", "admitted"),
    [
        ("127.0.0.0/8", ("::ffff:127.0.0.1", 4000, 0, 0), True),  # IPv4-mapped: IPv4
        ("::1/128", ("::ffff:127.0.0.1", 4000, 0, 0), False),
        ("::1", ("::1", 4000, 0, 0), True),
        ("2001:db8::/32", ("2001:db8::7", 4000, 0, 0), True),
        ("10.0.0.0/8", ("10.9.8.7", 4000), True),
        ("10.0.0.0/8", ("11.0.0.1", 4000), False),
    ],
)
def test_the_allow_list_matches_the_address_a_peer_connects_from(
    allowed: str, peer: tuple[Any, ...], admitted: bool
) -> None:
    metrics = Metrics()
    server = DeviceServer(
        NullHandler(),
        metrics,
        max_frame=512,
        max_connections=10,
        accept_rate=100,
        idle_timeout_s=60,
        write_queue_limit=1024,
        allowed_networks=parse_networks(allowed),
    )
    link = DeviceLink(server)
    transport = _PeerTransport(peer)
    link.connection_made(transport)  # type: ignore[arg-type]
    assert transport.closed is not admitted
    assert (link.close_reason == "network") is not admitted
    if admitted:
        assert link.source == peer[0].removeprefix("::ffff:")


@pytest.mark.parametrize("value", ["10.0.0.1/8", "10.0.0.0/33", "not-a-network", "10.0.0.0/8,,x"])
def test_a_bad_network_is_a_configuration_error_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"CHARGEGW_DEVICE_ALLOWED_NETWORKS": value})
    assert "CHARGEGW_DEVICE_ALLOWED_NETWORKS" in str(caught.value)


# ---------------------------------------------------------------- the registry


@pytest.fixture
async def registry_api(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(gateway, registry_routes.router) as client:
        yield client


async def _register(api: httpx.AsyncClient, *device_ids: str) -> None:
    response = await api.post(REGISTRY, json={"device_ids": list(device_ids)})
    assert response.status_code == 200, response.text


def _served_soon(gateway: Gateway, device_id: str) -> Any:
    """The registry of ``gateway`` has taken in ``device_id`` (a poll away)."""
    return eventually(lambda: device_id in gateway.registry.ids, timeout=5.0)


@pytest.mark.settings(device_registry_mode="enforce", device_registry_refresh_s=0.1)
async def test_registry_enforce_serves_registered_devices_only(
    gateway: Gateway, registry_api: httpx.AsyncClient
) -> None:
    assert gateway.pool is not None
    port = gateway.server.port
    await _register(registry_api, "04000061")
    await _served_soon(gateway, "04000061")

    registered = await RawPile("04000061").connect(port)
    await registered.register()
    await registered.expect(ap3000.RegistrationReply)

    # with the registered pile's SIM: refused, and the registered pile is not disturbed
    stranger = await RawPile("04000062").connect(port)
    await stranger.register()
    assert await stranger.closed_by_server(timeout=5.0)
    assert stranger.received == []  # nothing answered
    assert refused(gateway, "unregistered") == 1
    await registered.heartbeat()
    await registered.expect(ap3000.HeartbeatReply)

    box = await RawBkvGateway().connect(port)  # a BKV gateway not registered (yet)
    await box.send_raw(BKV_HEARTBEAT)
    assert await box.closed_by_server(timeout=5.0)
    assert box.received == []
    assert refused(gateway, "unregistered") == 2

    await gateway.writer.drained()
    rows = await gateway.pool.fetch("SELECT device_id FROM devices")
    assert [r["device_id"] for r in rows] == ["04000061"]  # no row for the refused
    gateways = await gateway.pool.fetch("SELECT gateway_id FROM gateways ORDER BY 1")
    assert [g["gateway_id"] for g in gateways] == ["04000061"]

    await _register(registry_api, BKV_GATEWAY.lower())  # any case
    await _served_soon(gateway, BKV_GATEWAY)
    box = await RawBkvGateway().connect(port)
    await box.send_raw(BKV_HEARTBEAT)
    await box.expect(bkv.HeartbeatReply)
    other = dataclasses.replace(bkv.decode(BKV_HEARTBEAT), gateway_id="82200520009999")
    await box.send_raw(bkv.encode(other))  # another gateway's id on that connection
    assert await box.closed_by_server(timeout=5.0)
    await registered.close()


@pytest.mark.settings(device_registry_mode="enforce", device_registry_refresh_s=0.1)
async def test_a_device_removed_from_the_registry_is_disconnected_within_seconds(
    gateway: Gateway, registry_api: httpx.AsyncClient
) -> None:
    port = gateway.server.port
    await _register(registry_api, "04000071", "04000072", BKV_GATEWAY)
    await _served_soon(gateway, BKV_GATEWAY)
    removed, kept = RawPile("04000071"), RawPile("04000072")
    for pile in (removed, kept):
        await pile.connect(port, iccid=None)
        await pile.register()
        await pile.expect(ap3000.RegistrationReply)
    box = await RawBkvGateway().connect(port)
    await box.send_raw(BKV_HEARTBEAT)
    await box.expect(bkv.HeartbeatReply)

    answer = await registry_api.delete(f"{REGISTRY}/04000071")
    assert answer.status_code == 200 and answer.json()["removed"] == ["04000071"]
    answer = await registry_api.request("DELETE", REGISTRY, json={"device_ids": [BKV_GATEWAY]})
    assert answer.json() == {"removed": [BKV_GATEWAY], "not_registered": []}
    assert await removed.closed_by_server(timeout=5.0)
    assert await box.closed_by_server(timeout=5.0)
    assert refused(gateway, "unregistered") == 2

    await kept.heartbeat()  # the others stay
    await kept.expect(ap3000.HeartbeatReply)
    assert gateway.pool is not None
    await eventually(
        lambda: gateway.pool.fetchval(  # type: ignore[union-attr]
            "SELECT offline_reason FROM devices WHERE device_id = '04000071'"
        ),
        lambda why: why == "unregistered",
    )
    await kept.close()


@pytest.mark.settings(device_registry_mode="log")
async def test_registry_log_mode_serves_and_counts_unregistered_devices(
    gateway: Gateway,
) -> None:
    pile = await RawPile("04000081").connect(gateway.server.port)
    await pile.register()
    await pile.expect(ap3000.RegistrationReply)
    await pile.heartbeat()
    await pile.expect(ap3000.HeartbeatReply)
    counted = gateway.metrics.registry.get_sample_value("chargegw_device_unregistered_total")
    assert counted == 1  # once per connection and id, not per frame
    assert refused(gateway, "unregistered") == 0
    await pile.close()


async def test_with_the_registry_off_nothing_is_checked(
    gateway: Gateway, registry_api: httpx.AsyncClient
) -> None:
    pile = await RawPile("04000091").connect(gateway.server.port)
    await pile.register()
    await pile.expect(ap3000.RegistrationReply)
    assert gateway.metrics.registry.get_sample_value("chargegw_device_unregistered_total") == 0
    await pile.close()


# ---------------------------------------------------------------- the registry API


async def test_registry_api_adds_lists_and_removes_idempotently(
    registry_api: httpx.AsyncClient,
) -> None:
    api = registry_api
    body = {"device_ids": ["04ceaa40", "82231214002700", "04CEAA40"], "note": "block 7"}
    first = await api.post(REGISTRY, json=body)
    assert first.status_code == 200
    assert first.json() == {"added": ["04CEAA40", "82231214002700"], "already_registered": []}
    again = await api.post(REGISTRY, json={"device_ids": ["04CEAA40", "04000001"]})
    assert again.json() == {"added": ["04000001"], "already_registered": ["04CEAA40"]}

    one = (await api.get(f"{REGISTRY}/04ceaa40")).json()
    assert one["device_id"] == "04CEAA40" and one["protocol"] == "ap3000"
    assert one["note"] == "block 7" and one["created_at"]
    assert one["created_by"] == "local"  # the key making the call: none needed on 127.0.0.1
    assert (await api.get(f"{REGISTRY}/04000002")).status_code == 404

    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await api.get(REGISTRY, params=params)).json()
        seen += [item["device_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["04000001", "04CEAA40", "82231214002700"]
    bkv_only = (await api.get(REGISTRY, params={"protocol": "bkv"})).json()
    assert [i["device_id"] for i in bkv_only["items"]] == ["82231214002700"]

    gone = await api.request("DELETE", REGISTRY, json={"device_ids": ["04000001", "04000009"]})
    assert gone.json() == {"removed": ["04000001"], "not_registered": ["04000009"]}
    assert (await api.delete(f"{REGISTRY}/04CEAA40")).status_code == 200
    missing = await api.delete(f"{REGISTRY}/04CEAA40")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    left = (await api.get(REGISTRY)).json()
    assert [i["device_id"] for i in left["items"]] == ["82231214002700"]


#: (body, the field the 422 names, words of its message) of requests refused whole
MALFORMED: list[tuple[dict[str, Any], str, str]] = [
    ({"device_ids": ["04CEAA4"]}, "device_ids.0", "8 hex digits"),
    ({"device_ids": ["04CEAA40", "zz"]}, "device_ids.1", "8 hex digits"),
    ({"device_ids": ["82231214002700-1"]}, "device_ids.0", "register the gateway 82231214002700"),
    ({"device_ids": ["04CEAA40"], "protocol": "bkv"}, "device_ids.0", "ap3000 id, not bkv"),
    ({"device_ids": ["82231214002700"], "protocol": "ap3000"}, "device_ids.0", "bkv id"),
    ({"device_ids": []}, "device_ids", "at least 1"),
    ({"device_ids": ["%08X" % n for n in range(1001)]}, "device_ids", "at most 1000"),
    ({"device_ids": ["04CEAA40"], "protocol": "ocpp"}, "protocol", ""),
    ({"device_ids": ["04CEAA40"], "colour": "red"}, "colour", ""),
    ({"device_ids": ["04CEAA40"], "note": "x" * 201}, "note", ""),
    ({"device_ids": ["0" * 65]}, "device_ids.0", ""),
    ({"device_ids": "04CEAA40"}, "device_ids", ""),
]


async def test_registry_api_refuses_malformed_ids_naming_the_field(
    registry_api: httpx.AsyncClient,
) -> None:
    for body, field, words in MALFORMED:
        answer = await registry_api.post(REGISTRY, json=body)
        assert answer.status_code == 422, (body, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "validation_failed" and error["field"] == field, (body, error)
        assert words in error["message"], (body, error)
    listed = (await registry_api.get(REGISTRY)).json()
    assert listed["items"] == []  # nothing of a refused request is registered


async def test_registry_api_reports_every_bad_id_and_checks_paths_and_cursors(
    registry_api: httpx.AsyncClient,
) -> None:
    answer = await registry_api.post(REGISTRY, json={"device_ids": ["x", "04CEAA40", "y"]})
    details = answer.json()["error"]["details"]
    assert [d["field"] for d in details] == ["device_ids.0", "device_ids.2"]
    removal = await registry_api.request("DELETE", REGISTRY, json={"device_ids": ["nope"]})
    assert removal.status_code == 422 and removal.json()["error"]["field"] == "device_ids.0"
    path = await registry_api.get(f"{REGISTRY}/not-an-id")
    assert path.status_code == 422 and path.json()["error"]["field"] == "device_id"
    cursor = await registry_api.get(REGISTRY, params={"cursor": "garbage"})
    assert cursor.status_code == 422 and cursor.json()["error"]["field"] == "cursor"


async def test_the_registry_is_loaded_at_start_and_outlives_a_database_outage(
    db_dsn: str, pg_server_dsn: str
) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:  # registered before the gateway starts: served at once, no poll in between
        await device_registry.add(conn, [("04000101", "ap3000")], note=None, created_by="ops")
    finally:
        await conn.close()
    gateway = Gateway(
        settings_for(db_dsn, device_registry_mode="enforce", device_registry_refresh_s=0.1)
    )
    await gateway.start(http=False)
    try:
        port = gateway.server.port
        pile = await RawPile("04000101").connect(port, iccid=None)
        await pile.register()
        await pile.expect(ap3000.RegistrationReply)
        async with database_outage(pg_server_dsn, db_dsn):
            with pytest.raises(DB_ERRORS):
                await gateway.registry.refresh()
            assert gateway.registry.ids == {"04000101"}  # the last copy stays in force
            await pile.heartbeat()
            await pile.expect(ap3000.HeartbeatReply)
            stranger = await RawPile("04000102").connect(port, iccid=None)
            await stranger.register()
            assert await stranger.closed_by_server(timeout=5.0)
        await pile.close()
    finally:
        await gateway.stop()
