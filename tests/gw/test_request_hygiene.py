"""HTTP request hygiene over real HTTP: body sizes (413), failed authentications per source
address (429 without a key check), and the control-call rate limits per key and overall
(429 with ``Retry-After``); the limiters themselves with time passed in.

The gateway serves its API with uvicorn on a free port of 127.0.0.1; uvicorn takes the
client address from ``X-Forwarded-For`` for a peer on 127.0.0.1 (its default
``FORWARDED_ALLOW_IPS``), which is how these tests call from several addresses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from chargegw.api.guard import Guard
from chargegw.api.limits import (
    ControlLimiter,
    FailedAuthLimiter,
    HttpLimits,
    TokenBucket,
    address_key,
    is_control,
)
from chargegw.app import Gateway
from chargegw.config import Settings

from .conftest import settings_for
from .waiting import eventually, free_port

KEY = "hygiene-test-key-0123456789abcdef"
OTHER = "hygiene-other-key-0123456789abcdef"
MIB = 1024 * 1024


def _as(key: str | None = KEY, source: str | None = None) -> dict[str, str]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    if source is not None:
        headers["X-Forwarded-For"] = source
    return headers


@dataclasses.dataclass
class Served:
    gateway: Gateway
    client: httpx.AsyncClient

    def metric(self, name: str, **labels: str) -> float:
        value = self.gateway.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


@pytest.fixture
async def served(db_dsn: str, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """A gateway serving its API over real HTTP with two configured keys; a test's
    ``settings`` marker adds settings."""
    marker = request.node.get_closest_marker("settings")
    port = free_port()
    settings = settings_for(
        db_dsn, http_port=port, api_keys=f"{KEY},{OTHER}", **(marker.kwargs if marker else {})
    )
    gateway = Gateway(settings)
    await gateway.start()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits
        ) as client:
            yield Served(gateway, client)
    finally:
        await gateway.stop()


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


async def _healthy(served: Served) -> None:
    assert (await served.client.get("/healthz")).status_code == 200
    assert (await served.client.get("/api/v1/devices", headers=_as())).status_code == 200


# ---------------------------------------------------------------- requests in flight


@pytest.mark.settings(http_max_in_flight=2)
async def test_past_its_requests_in_flight_a_worker_answers_503_busy_at_once(
    served: Served,
) -> None:
    """Two requests in progress (their bodies still arriving) fill the cap: the next is
    answered 503 ``busy`` without waiting, health, readiness and metrics are served, and
    an event stream, answering already, holds no slot."""
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"card_no":'
        await release.wait()
        yield b'"HOLD0001"}'

    async with served.client.stream(
        "GET", "/api/v1/events/stream", headers=_as()
    ) as stream:  # answered at once: not in flight any more
        assert stream.status_code == 200
        held = [
            asyncio.create_task(
                served.client.post("/api/v1/cards", content=slow_body(), headers=_as())
            )
            for _ in range(2)
        ]

        await eventually(lambda: served.metric("chargegw_api_requests_in_flight"), lambda n: n == 2)

        async def busy() -> httpx.Response:
            return await served.client.get("/api/v1/devices", headers=_as())

        refused = await busy()
        error = _error(refused, 503, "busy")
        assert refused.headers["Retry-After"] == "1" and error["retry_after_s"] == 1
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await served.client.get(path)).status_code in (200, 503), path
        assert (await served.client.get("/healthz")).status_code == 200
        assert served.metric("chargegw_api_busy_total") >= 1
        release.set()
        assert all(r.status_code < 500 for r in await asyncio.gather(*held))
    assert (await busy()).status_code == 200


# ---------------------------------------------------------------- body sizes


async def test_a_10_mb_json_body_is_refused_before_it_is_read(served: Served) -> None:
    body = json.dumps({"card_id": "C1", "note": "x" * (10 * MIB)}).encode()
    started = time.monotonic()
    for headers in (_as(), _as(None)):  # refused before the key is even looked at
        response = await served.client.post(
            "/api/v1/cards", content=body, headers={**headers, "Content-Type": "application/json"}
        )
        error = _error(response, 413, "payload_too_large")
        assert error["field"] == "body" and error["limit_bytes"] == MIB
    assert time.monotonic() - started < 10
    assert served.metric("chargegw_api_body_too_large_total") == 2
    await _healthy(served)


async def test_a_chunked_body_is_refused_once_it_passes_the_limit(served: Served) -> None:
    chunks_sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        yield b'{"card_id": "C1", "note": "'
        for _ in range(128):  # 2 MiB, no Content-Length
            chunks_sent += 1
            yield b"x" * (16 * 1024)
        yield b'"}'

    response = await served.client.post(
        "/api/v1/cards", content=chunks(), headers={**_as(), "Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    error = _error(response, 413, "payload_too_large")
    assert error["limit_bytes"] == MIB and chunks_sent == 128
    assert served.metric("chargegw_api_body_too_large_total") == 1
    await _healthy(served)
    # just under the limit passes the check (and is a card)
    fits = json.dumps({"card_id": "C2", "note": "x" * (MIB // 2)}).encode()
    response = await served.client.post(
        "/api/v1/cards", content=fits, headers={**_as(), "Content-Type": "application/json"}
    )
    assert response.status_code != 413, response.text


@pytest.mark.settings(http_max_body_bytes=64 * 1024, firmware_max_bytes=300_000)
async def test_the_firmware_upload_takes_images_up_to_its_own_limit(served: Served) -> None:
    image = random.Random(3).randbytes(250_000)
    query = {"protocol": "ap3000", "family": "0xE0", "device_type": "39", "version": "313"}
    headers = {**_as(), "Content-Type": "application/octet-stream"}

    async def streamed(data: bytes) -> AsyncIterator[bytes]:
        for at in range(0, len(data), 32 * 1024):
            yield data[at : at + 32 * 1024]

    response = await served.client.post(
        "/api/v1/firmware", content=image, params=query, headers=headers
    )
    assert response.status_code == 201, response.text
    assert response.json()["size_bytes"] == len(image)
    response = await served.client.post(
        "/api/v1/firmware",
        content=streamed(image),
        params={**query, "version": "314"},
        headers=headers,
    )
    assert response.status_code == 201, response.text
    # past the firmware limit: declared, and streamed
    too_big = image + image
    response = await served.client.post(
        "/api/v1/firmware", content=too_big, params=query, headers=headers
    )
    assert _error(response, 413, "payload_too_large")["limit_bytes"] == 300_000
    response = await served.client.post(
        "/api/v1/firmware", content=streamed(too_big), params=query, headers=headers
    )
    assert _error(response, 413, "payload_too_large")["limit_bytes"] == 300_000
    # everything else keeps the general limit
    note = json.dumps({"card_id": "C1", "note": "x" * 100_000}).encode()
    response = await served.client.post(
        "/api/v1/cards", content=note, headers={**_as(), "Content-Type": "application/json"}
    )
    assert _error(response, 413, "payload_too_large")["limit_bytes"] == 64 * 1024
    listed = (await served.client.get("/api/v1/firmware", headers=_as())).json()["items"]
    assert len(listed) == 2
    await _healthy(served)


# ---------------------------------------------------------------- failed authentications


async def _flood(port: int, requests: list[bytes], connections: int) -> list[int]:
    """Send whole HTTP/1.1 ``requests`` over ``connections`` keep-alive connections, each
    waiting for one answer before its next request; the statuses. (A plain client:
    httpx manages about 80 requests a second here.)"""
    statuses: list[int] = []

    async def connection(mine: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in mine:
                writer.write(request)
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                length = next(
                    int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
                statuses.append(int(head[0].split()[1]))
        finally:
            writer.close()

    await asyncio.gather(*(connection(requests[i::connections]) for i in range(connections)))
    return statuses


def _raw_get(path: str, key: str, source: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"X-Forwarded-For: {source}\r\n\r\n"
    ).encode()


async def test_a_key_guessing_address_is_answered_429_without_key_checks(served: Served) -> None:
    guesser, bystander = "203.0.113.7", "198.51.100.2"
    port = int(served.client.base_url.port or 0)
    guesses = [
        _raw_get("/api/v1/devices", f"cgw_guess{n:06d}abcdefghijklmnopqrstuvwxyz", guesser)
        for n in range(1500)
    ]
    started = time.monotonic()
    statuses = await _flood(port, guesses, connections=16)
    elapsed = time.monotonic() - started
    answered_401, answered_429 = statuses.count(401), statuses.count(429)
    assert answered_401 + answered_429 == 1500, sorted(set(statuses))
    # the burst (10), and what was already in flight when the block began
    assert answered_401 <= 10 + 16, answered_401
    # every 401 was a key lookup (unknown keys are not cached); no 429 was
    assert served.metric("chargegw_api_auth_refused_total", reason="unknown_key") == answered_401
    assert served.metric("chargegw_api_rate_limited_total", scope="auth") == answered_429
    print(f"1500 wrong keys in {elapsed:.2f} s ({1500 / elapsed:.0f}/s): {answered_401} checked")

    # a good key from another address is served; from the blocked one it is not checked
    assert (
        await served.client.get("/api/v1/devices", headers=_as(KEY, bystander))
    ).status_code == 200
    blocked = await served.client.get("/api/v1/devices", headers=_as(KEY, guesser))
    error = _error(blocked, 429, "rate_limited")
    assert error["scope"] == "auth" and 1 <= int(blocked.headers["Retry-After"]) <= 60
    # the health and metrics endpoints stay open to it
    assert (await served.client.get("/healthz", headers=_as(None, guesser))).status_code == 200


# slow refills (one failure per 10 s): a slow machine does not refill the bucket meanwhile
@pytest.mark.settings(auth_failure_burst=2, auth_failures_per_minute=6, auth_block_s=1.0)
async def test_a_block_ends_and_successes_do_not_refill_it(served: Served) -> None:
    source = "192.0.2.44"
    # a success in between does not reset the count
    assert (
        await served.client.get("/api/v1/devices", headers=_as("nope", source))
    ).status_code == 401
    assert (await served.client.get("/api/v1/devices", headers=_as(KEY, source))).status_code == 200
    assert (
        await served.client.get("/api/v1/devices", headers=_as(None, source))
    ).status_code == 401
    third = await served.client.get("/api/v1/devices", headers=_as("nope", source))
    assert third.status_code == 401  # the failure that finds the bucket empty starts a block
    assert (await served.client.get("/api/v1/devices", headers=_as(KEY, source))).status_code == 429

    async def status() -> int:
        response = await served.client.get("/api/v1/devices", headers=_as(KEY, source))
        return response.status_code

    await eventually(status, lambda code: code == 200, what="the block over", timeout=5)


@pytest.mark.settings(auth_failures_per_minute=0)
async def test_the_failed_auth_limit_can_be_turned_off(served: Served) -> None:
    for _ in range(15):
        response = await served.client.get("/api/v1/devices", headers=_as("nope"))
        assert response.status_code == 401


# ---------------------------------------------------------------- control rate limits

_STOP = "/api/v1/devices/NOPE0001/ports/1/stop"


@pytest.mark.settings(control_rate_per_key=0.5, control_burst_per_key=3, control_rate_global=0)
async def test_control_calls_are_limited_per_key(served: Served) -> None:
    client = served.client
    for _ in range(3):  # counted whatever the answer (no such device: 404)
        assert (await client.post(_STOP, headers=_as(KEY))).status_code == 404
    refused = await client.post(_STOP, headers=_as(KEY))
    error = _error(refused, 429, "rate_limited")
    assert error["scope"] == "key" and 1 <= int(refused.headers["Retry-After"]) <= 2
    assert error["retry_after_s"] == int(refused.headers["Retry-After"])
    # another key, reads and calls that are not control calls are not limited
    assert (await client.post(_STOP, headers=_as(OTHER))).status_code == 404
    assert (await client.get("/api/v1/devices", headers=_as(KEY))).status_code == 200
    plan = {"name": "p", "tiers": []}
    assert (await client.post("/api/v1/rate-plans", json=plan, headers=_as(KEY))).status_code != 429
    assert served.metric("chargegw_api_rate_limited_total", scope="key") == 1

    async def status() -> int:
        return (await client.post(_STOP, headers=_as(KEY))).status_code

    await eventually(status, lambda code: code == 404, what="a token again", timeout=10)


@pytest.mark.settings(control_rate_per_key=0, control_rate_global=0.5)
async def test_control_calls_are_limited_overall(served: Served) -> None:
    client = served.client
    assert (await client.post(_STOP, headers=_as(KEY))).status_code == 404
    for key in (OTHER, KEY):  # one call per 2 s for all keys together
        refused = await client.post(_STOP, headers=_as(key))
        assert _error(refused, 429, "rate_limited")["scope"] == "global"
        assert 1 <= int(refused.headers["Retry-After"]) <= 2
    assert served.metric("chargegw_api_rate_limited_total", scope="global") == 2


@pytest.mark.settings(
    control_rate_per_key=0.2,
    control_burst_per_key=1,
    control_rate_global=0,
    rate_limit_all_writes=True,
)
async def test_every_write_can_count_as_a_control_call(served: Served) -> None:
    client = served.client
    card = {"card_id": "C9", "balance_cent": 0}
    assert (await client.post("/api/v1/cards", json=card, headers=_as())).status_code != 429
    refused = await client.post("/api/v1/cards", json=card, headers=_as())
    assert _error(refused, 429, "rate_limited")["scope"] == "key"


async def test_openapi_documents_413_and_429(served: Served) -> None:
    spec = (await served.client.get("/openapi.json")).json()
    start = spec["paths"]["/api/v1/devices/{device_id}/ports/{port}/start"]["post"]
    assert "Retry-After" in start["responses"]["429"]["headers"]
    assert "413" in start["responses"]
    assert "429" in spec["paths"]["/api/v1/audit/calls"]["get"]["responses"]


# ---------------------------------------------------------------- the limiters alone


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)
    assert bucket.take(100.5) == 0.0
    assert bucket.take(1000.0) == 0.0 and bucket.tokens == pytest.approx(2.0)


def test_failed_auth_limiter_blocks_expires_and_stays_bounded() -> None:
    limiter = FailedAuthLimiter(per_minute=60, burst=2, block_s=10, max_addresses=3)
    assert not limiter.failed("a", 0.0) and not limiter.failed("a", 0.0)
    assert limiter.blocked("a", 0.0) == 0.0
    assert limiter.failed("a", 0.0)  # out of tokens: the block starts
    assert limiter.blocked("a", 4.0) == pytest.approx(6.0)
    assert not limiter.failed("a", 5.0)  # a failure while blocked does not restart it
    assert limiter.blocked("a", 10.0) == 0.0
    for name in "bcd":
        limiter.failed(name, 11.0)
    assert len(limiter) == 3 and limiter.blocked("a", 11.0) == 0.0  # forgotten first


def test_addresses_count_by_ipv4_or_ipv6_64() -> None:
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("::ffff:198.51.100.3") == "198.51.100.3"
    assert address_key(None) == "unknown" and address_key("host.example") == "host.example"


def test_control_limiter_divides_its_rates_among_workers() -> None:
    limiter = ControlLimiter(per_key=20, per_key_burst=40, overall=500, workers=4)
    assert (limiter.per_key, limiter.per_key_burst, limiter.overall) == (5, 10, 125)
    assert all(limiter.take("k", 0.0) is None for _ in range(10))
    refused = limiter.take("k", 0.0)
    assert refused is not None and refused[0] == "key" and refused[1] == pytest.approx(0.2)
    assert limiter.take("other", 0.0) is None
    # refused overall: the key's token is given back
    tight = ControlLimiter(per_key=10, per_key_burst=2, overall=1, workers=1)
    assert tight.take("k", 0.0) is None
    refused = tight.take("k", 0.0)
    assert refused is not None and refused[0] == "global"
    assert tight.take("k", 1.0) is None  # one key token left, and a new overall one


def test_limits_come_from_the_settings() -> None:
    settings = Settings(workers=4, http_max_body_bytes=5000, auth_failures_per_minute=0)
    limits = HttpLimits.from_settings(settings)
    assert limits.workers == 4 and limits.max_body_bytes == 5000
    guard = Guard(limits)
    assert guard.auth_failures is None and guard.control.per_key == 5
    assert limits.body_limit("POST", "/api/v1/firmware") == settings.firmware_max_bytes
    assert limits.body_limit("POST", "/api/v1/cards") == 5000


@pytest.mark.parametrize(
    ("method", "path", "control"),
    [
        ("POST", "/api/v1/devices/04CEAA40/ports/1/start", True),
        ("POST", "/api/v1/devices/04CEAA40/ports/2/stop", True),
        ("POST", "/api/v1/devices/04CEAA40/ports/2/modify", True),
        ("POST", "/api/v1/devices/04CEAA40/commands", True),
        ("PUT", "/api/v1/devices/04CEAA40/params", True),
        ("POST", "/api/v1/orders/ABC/cancel", True),
        ("POST", "/api/v1/param-profiles/night/apply", True),
        ("POST", "/api/v1/upgrade-jobs", True),
        ("POST", "/api/v1/upgrade-jobs/3/cancel", True),
        ("GET", "/api/v1/devices/04CEAA40/commands", False),
        ("POST", "/api/v1/cards", False),
        ("PUT", "/api/v1/devices/04CEAA40/rate-plan", False),
        ("POST", "/api/v1/firmware", False),
    ],
)
def test_control_calls_are_the_ones_that_create_commands_or_orders(
    method: str, path: str, control: bool
) -> None:
    assert is_control(method, path) is control
    assert is_control(method, path, all_writes=True) is (method != "GET")
