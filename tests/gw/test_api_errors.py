"""The API's one error shape, and bad input that never becomes a 500.

Against a real gateway and PostgreSQL through the in-process client (``api`` fixture):
NUL characters, integers past 64 bits, NaN and Infinity are refused with a 422 whose
body serialises; wrong methods answer 405 with every allowed method; routers' string and
dict errors come out in the same shape; the docs pages load nothing from elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, HTTPException, Query

from chargegw.api import params
from chargegw.api.app import ApiState, create_app
from chargegw.api.errors import INT64_MAX, INT64_MIN, api_error
from chargegw.app import Gateway

from .waiting import api_client

START = "/api/v1/devices/04CEAA40/ports/1/start"
JSON = {"content-type": "application/json"}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The ``error`` object of a ``status`` answer, checked against the documented shape."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["field"] is None or isinstance(error["field"], str), error
    for detail in error["details"]:
        assert set(detail) == {"location", "field", "type", "message"}, detail
    return error


# ---------------------------------------------------------------- a router of test routes

extra = APIRouter(prefix="/api/v1/test")


@extra.get("/plain")
async def plain() -> None:
    raise HTTPException(409, "port 1 has an open order")


@extra.get("/dict")
async def with_fields() -> None:
    raise HTTPException(
        422, {"error": "unknown command 'x'", "field": "command", "commands": ["a"]}
    )


@extra.get("/helper")
async def helper() -> None:
    raise api_error(409, "order 7 is charging: stop it instead", code="order_running", order_no="7")


@extra.get("/busy")
async def busy() -> None:
    raise HTTPException(503, "firmware store busy")


@extra.get("/bug")
async def bug() -> None:
    raise RuntimeError("a defect")


@extra.get("/numbers")
async def numbers(
    count: Annotated[int | None, Query()] = None,
    ratio: Annotated[float | None, Query()] = None,
    ids: Annotated[list[int] | None, Query()] = None,
) -> dict[str, Any]:
    return {"count": count, "ratio": ratio, "ids": ids}


@extra.get("/one-path")
async def read_one() -> dict[str, str]:
    return {"method": "GET"}


@extra.put("/one-path")
async def write_one() -> dict[str, str]:
    return {"method": "PUT"}


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(gateway, extra) as c:
        yield c


# ---------------------------------------------------------------- the shape


async def test_unknown_device_and_unknown_path_are_404_in_the_shape(
    api: httpx.AsyncClient,
) -> None:
    error = error_of(await api.get("/api/v1/devices/04CEAA40"), 404)
    assert error == {
        "code": "not_found",
        "message": "device 04CEAA40 not found",
        "field": None,
        "details": [],
    }
    assert error_of(await api.get("/api/v1/nowhere"), 404)["code"] == "not_found"


async def test_validation_errors_list_every_problem(api: httpx.AsyncClient) -> None:
    response = await api.get("/api/v1/devices", params={"limit": "0", "protocol": "ocpp"})
    error = error_of(response, 422)
    assert error["code"] == "validation_failed"
    assert error["field"] == "protocol" or error["field"] == "limit"
    assert {(d["location"], d["field"]) for d in error["details"]} == {
        ("query", "limit"),
        ("query", "protocol"),
    }
    assert "limit: " in error["message"] and "protocol: " in error["message"]


async def test_a_body_error_names_the_field_by_its_path(api: httpx.AsyncClient) -> None:
    response = await api.post(START, json={"mode": "time", "duration_min": "long"})
    error = error_of(response, 422)
    assert [(d["location"], d["field"]) for d in error["details"]] == [("body", "duration_min")]


async def test_router_errors_strings_and_dicts_map_onto_the_shape(
    client: httpx.AsyncClient,
) -> None:
    assert error_of(await client.get("/api/v1/test/plain"), 409) == {
        "code": "conflict",
        "message": "port 1 has an open order",
        "field": None,
        "details": [],
    }
    assert error_of(await client.get("/api/v1/test/dict"), 422) == {
        "code": "validation_failed",
        "message": "unknown command 'x'",
        "field": "command",
        "details": [],
        "commands": ["a"],
    }
    assert error_of(await client.get("/api/v1/test/helper"), 409) == {
        "code": "order_running",
        "message": "order 7 is charging: stop it instead",
        "field": None,
        "details": [],
        "order_no": "7",
    }


async def test_a_router_503_keeps_retry_after_and_says_why(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/test/busy")
    error = error_of(response, 503)
    assert (error["code"], error["reason"]) == ("service_unavailable", "firmware store busy")
    assert int(response.headers["Retry-After"]) > 0


async def test_a_defect_is_a_500_in_the_shape(gateway: Gateway) -> None:
    state = ApiState(
        pool=gateway.pool, metrics=gateway.metrics, readiness=gateway.readiness, auth_required=False
    )
    # the exception goes on to the server, which logs it with its traceback
    transport = httpx.ASGITransport(app=create_app(state, [extra]), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        error = error_of(await c.get("/api/v1/test/bug"), 500)
    assert error == {
        "code": "internal_error",
        "message": "internal server error",
        "field": None,
        "details": [],
    }


async def test_401_is_in_the_shape_with_www_authenticate(gateway: Gateway) -> None:
    async with api_client(gateway, auth_required=True, api_keys=frozenset({"k" * 32})) as c:
        response = await c.get("/api/v1/devices")
    assert error_of(response, 401)["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


# ---------------------------------------------------------------- input PostgreSQL cannot hold


def only_detail(response: httpx.Response) -> tuple[str | None, str | None, str]:
    """(location, field, type) of the one problem of a 422."""
    (detail,) = error_of(response, 422)["details"]
    return detail["location"], detail["field"], detail["type"]


async def test_a_nul_character_in_a_path_or_query_value_is_422(api: httpx.AsyncClient) -> None:
    for url, expected in [
        ("/api/v1/devices/%00", ("path", "device_id", "nul_character")),
        ("/api/v1/devices/04CE%00AA40/events", ("path", "device_id", "nul_character")),
        ("/api/v1/orders?device_id=a%00b", ("query", "device_id", "nul_character")),
        ("/api/v1/devices?gateway_id=%00", ("query", "gateway_id", "nul_character")),
    ]:
        assert only_detail(await api.get(url)) == expected, url


async def test_an_id_past_64_bits_is_422_and_the_largest_is_looked_up(
    api: httpx.AsyncClient,
) -> None:
    for command_id in (str(INT64_MAX + 1), str(INT64_MIN - 1), "9" * 400):
        response = await api.get(f"/api/v1/commands/{command_id}")
        assert only_detail(response) == ("path", "command_id", "out_of_range"), command_id
    assert error_of(await api.get(f"/api/v1/commands/{INT64_MAX}"), 404)["code"] == "not_found"


async def test_query_numbers_past_64_bits_or_not_finite_are_422(
    client: httpx.AsyncClient,
) -> None:
    for query, expected in [
        ({"count": str(2**63)}, ("query", "count", "out_of_range")),
        ({"ids": ["1", str(-(2**63) - 1)]}, ("query", "ids", "out_of_range")),
        ({"ratio": "nan"}, ("query", "ratio", "finite_number")),
        ({"ratio": "inf"}, ("query", "ratio", "finite_number")),
        ({"ratio": "1e400"}, ("query", "ratio", "finite_number")),
    ]:
        response = await client.get("/api/v1/test/numbers", params=query)
        assert only_detail(response) == expected, query
    query = {"count": str(INT64_MAX), "ratio": "1.5e300", "ids": ["1", str(INT64_MIN)]}
    response = await client.get("/api/v1/test/numbers", params=query)
    assert response.status_code == 200, response.text
    assert response.json() == {"count": INT64_MAX, "ratio": 1.5e300, "ids": [1, INT64_MIN]}


async def test_json_that_postgresql_cannot_hold_is_422_and_serialises(
    api: httpx.AsyncClient,
) -> None:
    for body, field, kind in [
        (b'{"mode": "energy", "energy_kwh": NaN}', "energy_kwh", "finite_number"),
        (b'{"mode": "energy", "energy_kwh": Infinity}', "energy_kwh", "finite_number"),
        (b'{"mode": "energy", "energy_kwh": -Infinity}', "energy_kwh", "finite_number"),
        (b'{"mode": "energy", "energy_kwh": 1e400}', "energy_kwh", "finite_number"),
        (b'{"mode": "time", "duration_min": 9223372036854775808}', "duration_min", "out_of_range"),
        (b'{"mode": "time", "duration_min": 1e30}', "duration_min", "out_of_range"),
        (b'{"mode": "time", "order_no": "ab\\u0000"}', "order_no", "nul_character"),
        (b'{"mode": "time", "order_no": "\\ud800"}', "order_no", "invalid_unicode"),
    ]:
        response = await api.post(START, content=body, headers=JSON)
        assert only_detail(response) == ("body", field, kind), body


async def test_nested_json_values_are_checked_too(api: httpx.AsyncClient) -> None:
    body = b'{"command": "query", "params": {"list": [1, {"x\\u0000": NaN}]}}'
    response = await api.post("/api/v1/devices/04CEAA40/commands", content=body, headers=JSON)
    error = error_of(response, 422)
    assert {(d["field"], d["type"]) for d in error["details"]} == {
        ("params.list.1.x\x00", "nul_character"),
        ("params.list.1.x\x00", "finite_number"),
    }
    # free-form values are the command's to check: a large integer is not refused here
    body = b'{"command": "query", "params": {"n": 99999999999999999999}}'
    response = await api.post("/api/v1/devices/04CEAA40/commands", content=body, headers=JSON)
    assert error_of(response, 404)["message"] == "device 04CEAA40 not found"


async def test_json_values_of_another_type_than_declared_are_422(api: httpx.AsyncClient) -> None:
    modify = "/api/v1/devices/04CEAA40/ports/1/modify"
    for url, body, expected in [
        (START, {"mode": "time", "duration_min": "60"}, ("body", "duration_min", "int_type")),
        (START, {"mode": "time", "duration_min": 60.5}, ("body", "duration_min", "int_type")),
        (START, {"mode": "energy", "energy_kwh": "1.5"}, ("body", "energy_kwh", "float_type")),
        (modify, {"duration_min": 5, "stop_when_full": 0}, ("body", "stop_when_full", "bool_type")),
    ]:
        assert only_detail(await api.post(url, json=body)) == expected, body
    # an integral number is an integer, as in JSON Schema
    response = await api.post(START, json={"mode": "time", "duration_min": 60.0})
    assert error_of(response, 404)["code"] == "not_found"


async def test_a_number_is_not_a_timestamp(api: httpx.AsyncClient) -> None:
    for value in ("0", "0.5", "1714550400"):
        response = await api.get("/api/v1/orders", params={"until": value})
        assert only_detail(response) == ("query", "until", "iso_8601"), value
    response = await api.get("/api/v1/orders", params={"until": "2024-05-01T08:00:00Z"})
    assert response.status_code == 200, response.text


async def test_an_object_where_a_parameter_wants_a_number_is_422(gateway: Gateway) -> None:
    body = {"name": "p1", "groups": {"qr_code": {"main_screen_type": {}, "qr_data": ""}}}
    async with api_client(gateway, params.router) as client:
        response = await client.post("/api/v1/param-profiles", json=body)
    error = error_of(response, 422)
    assert (error["group"], error["field"]) == ("qr_code", "main_screen_type"), error


async def test_a_body_that_is_not_utf8_is_422(api: httpx.AsyncClient) -> None:
    response = await api.post(START, content=b'{"mode": "\xff"}', headers=JSON)
    assert only_detail(response) == ("body", None, "json_invalid")


# ---------------------------------------------------------------- methods


async def test_a_wrong_method_is_405_with_allow(api: httpx.AsyncClient) -> None:
    response = await api.delete("/api/v1/devices")
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "GET"
    response = await api.post("/healthz")
    assert (response.status_code, response.headers["Allow"]) == (405, "GET")


async def test_allow_lists_the_methods_of_every_route_of_the_path(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.put("/api/v1/test/one-path")).json() == {"method": "PUT"}
    response = await client.delete("/api/v1/test/one-path")
    error_of(response, 405)
    assert response.headers["Allow"] == "GET, PUT"


# ---------------------------------------------------------------- OpenAPI and docs


async def test_openapi_documents_the_error_shape_and_64_bit_integers(
    api: httpx.AsyncClient,
) -> None:
    spec = (await api.get("/openapi.json")).json()
    assert spec["info"]["title"] == "chargegw HTTP API"
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert set(schemas["ErrorResponse"]["properties"]) == {"error"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) < 400 or path in ("/readyz",):
                    continue
                ref = response["content"]["application/json"]["schema"]["$ref"]
                expected = "UnavailableResponse" if status == "503" else "ErrorResponse"
                assert ref == f"#/components/schemas/{expected}", (method, path, status)
            for parameter in operation.get("parameters", []):
                for schema in [parameter["schema"], *parameter["schema"].get("anyOf", [])]:
                    if schema.get("type") == "integer":
                        assert "maximum" in schema and "minimum" in schema, (path, parameter)
    command = spec["paths"]["/api/v1/commands/{command_id}"]["get"]["parameters"][0]
    assert command["schema"]["maximum"] == INT64_MAX


_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_only_local_assets(api: httpx.AsyncClient, page: str) -> None:
    response = await api.get(page)
    assert response.status_code == 200
    html = response.text
    urls = [a or b for a, b in _URL.findall(html)]
    assert urls, html
    assert "//" not in "".join(urls), urls
    assert "cdn" not in html and "googleapis" not in html
    for url in urls:
        asset = await api.get(url)
        assert asset.status_code == 200, url
        assert asset.content, url
    types = {url.rsplit(".", 1)[-1]: (await api.get(url)).headers["content-type"] for url in urls}
    assert types.get("js", "text/javascript").split(";")[0] in {
        "text/javascript",
        "application/javascript",
    }


async def test_static_assets_ship_with_their_licences(api: httpx.AsyncClient) -> None:
    for name in ("swagger-ui/LICENSE", "swagger-ui/NOTICE", "redoc/LICENSE"):
        assert (await api.get(f"/static/{name}")).status_code == 200, name
    response = await api.post("/static/redoc/redoc.standalone.js")
    assert (response.status_code, response.headers["Allow"]) == (405, "GET, HEAD")
