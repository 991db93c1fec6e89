"""The resource routers: module-level routers whose helpers stand alone, a typed OpenAPI
document (request and response models, parameter groups generated from their tables,
every status documented), and the few answers they changed (timestamps with ``Z``, bans
in pages, a stop on a port the device does not have). Real PostgreSQL for the answers."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from chargegw.api import cluster as cluster_routes
from chargegw.api.app import ApiState, create_app
from chargegw.api.commands import StartRequest, start_command_params
from chargegw.api.deps import refused
from chargegw.api.param_models import group_schema
from chargegw.api.routers import ROUTERS
from chargegw.app import Gateway
from chargegw.domain.params import GROUPS
from chargegw.domain.refusals import ConflictError, InvalidError, NotFoundError
from chargegw.metrics import Metrics

from .waiting import api_client

ZULU = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    """The OpenAPI document of everything a gateway serves."""
    state = ApiState(pool=None, metrics=Metrics(), readiness=dict)
    document: dict[str, Any] = create_app(state, routers=ROUTERS).openapi()
    return document


def _schema(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = spec["components"]["schemas"][name]
    return found


# ---------------------------------------------------------------- helpers, alone


def test_start_parameters_per_protocol() -> None:
    body = StartRequest(mode="energy", energy_kwh=1.5, balance_cent=300)
    assert start_command_params("ap3000", 2, body, "AB" * 16) == {
        "port": 1,
        "rate_mode": 2,
        "charge_limit": 150,
        "balance_cent": 300,
        "order_id": "AB" * 16,
    }
    timed = StartRequest(mode="time", duration_min=60)
    assert start_command_params("ap3000", 1, timed, "CD" * 16)["charge_limit"] == 3600
    assert start_command_params("bkv", 1, timed, "CD" * 16)["port"] == 0


def test_refusals_map_to_statuses() -> None:
    assert refused(NotFoundError("no")).status_code == 404
    assert refused(ConflictError("busy")).status_code == 409
    invalid = refused(InvalidError({"error": "bad", "field": "port"}))
    assert (invalid.status_code, invalid.detail) == (422, {"error": "bad", "field": "port"})


def test_group_schemas_come_from_the_field_tables() -> None:
    running1 = group_schema(GROUPS["running1"])["properties"]
    # the reference's range narrows the wire's u8
    assert (running1["float_percent"]["minimum"], running1["float_percent"]["maximum"]) == (1, 100)
    # a u16 in 0.1 W
    assert running1["unplug_power_w"] == {
        "type": "number",
        "minimum": 0,
        "maximum": 6553.5,
        "description": "kept at a resolution of 0.1",
    }
    card_mode = group_schema(GROUPS["card_mode"])["properties"]["tc_card_mode"]
    assert card_mode["enum"] == [0, 1, 3, 4, 5, 6]
    card = group_schema(GROUPS["card"])["properties"]
    assert card["user_card_key"]["pattern"] == "^([0-9A-Fa-f]{2}){6}$"
    socket = group_schema(GROUPS["socket_params"])
    assert socket["additionalProperties"] is False
    assert socket["properties"]["overcurrent_limit_a"]["maximum"] == 65.535
    for group in GROUPS.values():
        assert set(group_schema(group)["properties"]) == set(group.fields), group.name


# ---------------------------------------------------------------- the OpenAPI document


def test_every_operation_is_typed_and_documents_its_errors(spec: dict[str, Any]) -> None:
    for path, operations in spec["paths"].items():
        if not path.startswith("/api/v1/"):
            continue
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            responses = operation["responses"]
            success = [code for code in responses if code.startswith("2")]
            assert len(success) == 1, where
            content = responses[success[0]].get("content", {})
            assert content or success == ["204"], where
            if "application/json" in content:
                schema = content["application/json"]["schema"]
                assert "$ref" in schema or "oneOf" in schema, (where, schema)
            assert {"401", "422", "503"} <= set(responses), where
            for code in set(responses) - {"401", "422", "503", *success}:
                assert responses[code]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"
                }, (where, code)
            body = operation.get("requestBody", {}).get("content", {})
            if "application/json" in body:
                assert "$ref" in body["application/json"]["schema"], where


def test_documented_statuses_of_changed_routes(spec: dict[str, Any]) -> None:
    paths = spec["paths"]
    assert {"404", "409"} <= set(
        paths["/api/v1/devices/{device_id}/ports/{port}/stop"]["post"]["responses"]
    )
    assert {"404", "409"} <= set(paths["/api/v1/firmware/{firmware_id}"]["delete"]["responses"])
    assert {"404", "409"} <= set(paths["/api/v1/upgrade-jobs/{job_id}/cancel"]["post"]["responses"])


def test_csv_and_hex_and_groups_are_in_the_schema(spec: dict[str, Any]) -> None:
    report = spec["paths"]["/api/v1/reports/reconciliation"]["get"]["responses"]["200"]
    assert set(report["content"]) == {"application/json", "text/csv"}
    hex_id = "^([0-9A-Fa-f]{2}){1,32}$"
    assert _schema(spec, "CardCreate")["properties"]["card_id"]["pattern"] == hex_id
    card = spec["paths"]["/api/v1/cards/{card_id}"]["get"]["parameters"][0]
    assert card["schema"]["pattern"] == hex_id
    assert _schema(spec, "StartRequest")["properties"]["order_no"]["anyOf"][0]["pattern"]
    groups = _schema(spec, "ParamGroups")
    assert set(groups["properties"]) == set(GROUPS)
    assert groups["properties"]["running1"]["$ref"].endswith("/Running1Params")
    assert _schema(spec, "Running1Params")["properties"]["float_percent"]["maximum"] == 100
    put = spec["paths"]["/api/v1/devices/{device_id}/params"]["put"]["requestBody"]
    assert put["content"]["application/json"]["schema"]["$ref"].endswith("/ParamGroups")
    assert _schema(spec, "ProfileApply")["properties"]["selector"]["title"] == "Selector"


# ---------------------------------------------------------------- answers


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(gateway, cluster_routes.router) as c:
        yield c


async def test_cluster_timestamps_are_utc_with_z(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    assert gateway.pool is not None
    await gateway.pool.execute(
        """INSERT INTO device_sessions (device_id, owner, connection_id, since, window_start)
           VALUES ('04000001', $1, 'c-1', now(), now())""",
        gateway.owner,
    )
    nodes = (await client.get("/api/v1/nodes")).json()
    mine = next(p for p in nodes["items"] if p["owner"] == gateway.owner)
    assert ZULU.match(mine["started_at"]) and ZULU.match(mine["heartbeat_at"]), mine
    assert nodes["answered_by"] == gateway.owner
    session = (await client.get("/api/v1/devices/04000001/session")).json()
    assert ZULU.match(session["since"]), session
    assert (session["connected"], session["owner"]) == (True, gateway.owner)


async def test_bans_come_in_pages(gateway: Gateway, client: httpx.AsyncClient) -> None:
    assert gateway.pool is not None
    until = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    for n, device_id in enumerate(["04000003", "04000001", "04000002"]):
        await gateway.pool.execute(
            "INSERT INTO device_bans (device_id, until, reason) VALUES ($1, $2, 'flapping')",
            device_id,
            until + dt.timedelta(minutes=n // 2),  # two end together: the id breaks the tie
        )
    first = (await client.get("/api/v1/bans", params={"limit": 2})).json()
    assert [b["device_id"] for b in first["items"]] == ["04000001", "04000003"]
    assert all(ZULU.match(b["until"]) and ZULU.match(b["since"]) for b in first["items"])
    rest = await client.get("/api/v1/bans", params={"limit": 2, "cursor": first["next_cursor"]})
    assert [b["device_id"] for b in rest.json()["items"]] == ["04000002"]
    assert rest.json()["next_cursor"] is None
    foreign = await client.get("/api/v1/bans", params={"cursor": "eyJrIjoieCIsInYiOltdfQ"})
    assert foreign.status_code == 422


async def test_stop_on_a_port_the_device_lacks_is_422_like_start(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    assert gateway.pool is not None
    await gateway.pool.execute(
        "INSERT INTO devices (device_id, protocol, online, port_count)"
        " VALUES ('04000009', 'ap3000', true, 2)"
    )
    url = "/api/v1/devices/04000009/ports/{}/{}"
    assert (await client.post(url.format(3, "stop"))).status_code == 422
    start = await client.post(url.format(3, "start"), json={"mode": "full"})
    assert start.status_code == 422
    assert (await client.post(url.format(2, "stop"))).status_code == 409  # no open order
    assert (await client.post("/api/v1/devices/0400000A/ports/1/stop")).status_code == 404
    assert await gateway.pool.fetchval("SELECT count(*) FROM commands") == 0


def _flat_routes(routers: list[Any]) -> list[Any]:
    from fastapi.routing import APIRoute

    return [route for router in routers for route in router.routes if isinstance(route, APIRoute)]


def test_match_order_keeps_which_route_answers() -> None:
    """The read API is matched early (the device detail is the most frequent call), and
    every request still reaches the route it reached with the read API matched last:
    sample paths fill each parameter with "x" and with every literal segment that another
    route has at that position (``/api/v1/devices/registry``)."""
    from chargegw.api import devices
    from chargegw.api.app import _paths_overlap, match_order

    assert _paths_overlap("/api/v1/devices/{device_id}", "/api/v1/devices/registry")
    assert not _paths_overlap("/api/v1/devices/{device_id}", "/api/v1/devices/{d}/events")
    assert not _paths_overlap("/api/v1/orders", "/api/v1/devices")
    assert _paths_overlap("/static/{rest:path}", "/static/a/b")
    ordered = match_order(ROUTERS, devices.router)
    assert sorted(map(id, ordered)) == sorted(map(id, [*ROUTERS, devices.router]))
    assert ordered.index(devices.router) < len(ordered) // 2
    before = _flat_routes([*ROUTERS, devices.router])
    after = _flat_routes(ordered)
    literals: dict[int, set[str]] = {}
    for route in before:
        for i, segment in enumerate(route.path.split("/")):
            if "{" not in segment:
                literals.setdefault(i, set()).add(segment)
    samples: set[tuple[str, str]] = set()
    for route in before:
        segments = route.path.split("/")
        for method in route.methods:
            samples.add((method, "/".join("x" if "{" in s else s for s in segments)))
            for i, segment in enumerate(segments):
                for literal in literals.get(i, ()) if "{" in segment else ():
                    filled = [literal if j == i else ("x" if "{" in s else s)
                              for j, s in enumerate(segments)]  # fmt: skip
                    samples.add((method, "/".join(filled)))

    def answering(routes: list[Any], method: str, path: str) -> Any:
        return next(
            (r.endpoint for r in routes if r.path_regex.match(path) and method in r.methods),
            None,
        )

    for method, path in sorted(samples):
        assert answering(after, method, path) is answering(before, method, path), (method, path)
