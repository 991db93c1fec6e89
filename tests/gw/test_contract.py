"""The API keeps its OpenAPI contract: schemathesis against the live server.

A real gateway (real uvicorn on a free port of 127.0.0.1, a fresh PostgreSQL database, an
API key required) with an AP3000 pile and a BKV gateway of the simulator connected over
TCP (so lists and reads answer real rows) serves ``/openapi.json``; the ``st`` command
line generates requests from it, schema-valid and schema-violating, in every phase
(examples, coverage, fuzzing, stateful), and runs every check it has. The test fails on
any 5xx, a response that does not match its schema, a status code, content type or
header the document does not give, a schema-violating request accepted, a schema-valid
one refused (a 422 is allowed only where validity depends on stored state:
``STATE_DEPENDENT_422``), a wrong method not answered 405 with ``Allow``, and a request
without the key not refused.

Bounded to stay within about a minute on two cores: a fixed seed, few examples per
operation, no coverage phase for the parameter-group bodies (``NO_COVERAGE_PHASE``).
``HYPOTHESIS_PROFILE=dev`` explores more (random seed, more examples, every phase
everywhere); the output names the seed and a ``curl`` line for every failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import httpx

from chargegw.app import Gateway
from chargesim import SimulatedAp3000Pile, SimulatedBkvGateway, Simulator

from .conftest import settings_for
from .waiting import eventually, free_port

KEY = "contract-test-key-0123456789abcdef"
HOOKS = Path(__file__).with_name("contract_hooks.py")
#: st exits within this; the test's own bound
TIMEOUT_S = 240.0

#: Operations that may refuse a schema-valid request with 422, and why: whether it is
#: valid depends on stored state (or the clock) that no schema can state. Every other
#: check still runs on them. Keep it short: remove an entry when its reason goes away.
STATE_DEPENDENT_422: dict[str, str] = {
    "GET /api/v1/devices/{device_id}/frames": "the window (31 days at most) ends now by default",
    "GET /api/v1/devices/{device_id}/timeline": "the window (31 days at most) ends now by default",
    "GET /api/v1/devices/{device_id}/events": "since after until: a relation of two parameters",
    "GET /api/v1/frames": "the named devices, gateway and order must exist; order_no or a "
    "window; the window (31 days at most) ends now by default",
    "POST /api/v1/devices/{device_id}/commands": "the device's protocol names its commands",
    "POST /api/v1/devices/{device_id}/ports/{port}/start": "the device's port count",
    "POST /api/v1/devices/{device_id}/ports/{port}/stop": "the device's port count",
    "POST /api/v1/devices/{device_id}/ports/{port}/modify": "the port count; BKV has no modify",
    "PUT /api/v1/devices/{device_id}/params": "the device's protocol and its stored values",
    "POST /api/v1/param-profiles": "a group is checked whole by its set command's codec",
    "PUT /api/v1/param-profiles/{name}": "a group is checked whole by its set command's codec",
    "POST /api/v1/param-profiles/{name}/apply": "the selector's devices must exist",
    "POST /api/v1/firmware": "the image's bytes and the families of the protocol",
    "POST /api/v1/upgrade-jobs": "an uploaded image; the selector's devices must exist",
    "POST /api/v1/rate-plans": "tiers in ascending order, the last until 23:59",
    "PUT /api/v1/devices/{device_id}/rate-plan": "the plan must exist",
    "GET /api/v1/audit/calls": "since after until: a relation of two parameters",
    "GET /api/v1/events": "a type pattern must match a type of the event catalogue",
    "POST /api/v1/api-keys": "expires_at must be in the future (the clock)",
    "POST /api/v1/devices/registry": "the protocol must be the ids' (a relation of fields)",
    "POST /api/v1/webhooks": "the URL's host must resolve to a public address (the network)",
    "PATCH /api/v1/webhooks/{webhook_id}": "the URL's host must resolve; lists may not be null",
    "POST /api/v1/webhooks/{webhook_id}/replay": "since or after_event_id, one of the two",
    "GET /api/v1/webhooks/{webhook_id}/deliveries": "a type pattern must match the catalogue",
}
#: Operations st cannot test: the event stream never ends, so every request would time
#: out (tests/gw/test_event_stream.py tests it over real HTTP)
NOT_TESTED = ("GET /api/v1/events/stream",)
#: what schemathesis accepts for a schema-valid request by default, and 422
_ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
#: Operations left out of the coverage phase unless HYPOTHESIS_PROFILE=dev (the other
#: phases still run), to keep the test within a minute: their parameter-group body makes
#: 750 coverage cases each, 60% of all; the groups' validation has tests of its own
#: (test_params*.py, test_param_profiles.py, test_api_errors.py).
NO_COVERAGE_PHASE = (
    "POST /api/v1/param-profiles",
    "PUT /api/v1/param-profiles/{name}",
    "PUT /api/v1/devices/{device_id}/params",
)


def schemathesis_config(dev: bool) -> str:
    """``schemathesis.toml``: 422 allowed for the operations of STATE_DEPENDENT_422, the
    coverage phase off for those of NO_COVERAGE_PHASE (unless ``dev``)."""
    uncovered = () if dev else NO_COVERAGE_PHASE
    accepted = (
        f"[[operations]]\ninclude-name = {json.dumps(name)}\n"
        f"checks.positive_data_acceptance.expected-statuses = {json.dumps(_ACCEPTED)}\n"
        + ("phases.coverage.enabled = false\n" if name in uncovered else "")
        for name in STATE_DEPENDENT_422
    )
    others = (
        f"[[operations]]\ninclude-name = {json.dumps(name)}\nphases.coverage.enabled = false\n"
        for name in uncovered
        if name not in STATE_DEPENDENT_422
    )
    return "\n".join([*accepted, *others])


def schemathesis_args(url: str, dev: bool) -> list[str]:
    """The ``st run`` command line against the OpenAPI document at ``url``."""
    args = [
        "run",
        url,
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--workers",  # one: hypothesis parses lambdas with ast in each worker thread,
        "1",  # and CPython 3.11's parser is not thread-safe (SystemError under load)
        "--generation-database",
        "none",
        # text holds no NUL and no lone surrogate (PostgreSQL takes neither): the API
        # refuses both with a 422 (test_api_errors.py), which JSON Schema cannot say of
        # free-form values
        "--generation-allow-x00",
        "false",
        "--generation-codec",
        "utf-8",
        "--request-timeout",
        "10",
        "--no-color",
        *(arg for name in NOT_TESTED for arg in ("--exclude-name", name)),
        "--output-truncate",
        "false",
    ]
    if dev:
        return [*args, "--max-examples", "50"]
    return [*args, "--max-examples", "5", "--seed", "20261203", "--no-shrink"]


async def run_schemathesis(url: str, cwd: Path) -> tuple[int, str]:
    """``st run`` against ``url``: its exit status and its report."""
    dev = os.environ.get("HYPOTHESIS_PROFILE") == "dev"
    config = cwd / "schemathesis.toml"
    config.write_text(schemathesis_config(dev))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        *schemathesis_args(url, dev),
        cwd=cwd,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(TIMEOUT_S):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def test_the_live_api_keeps_its_openapi_contract(db_dsn: str, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # st probes every operation with a wrong key, all from 127.0.0.1: the failed-auth
    # limit would block the run after ten (it has tests of its own: test_request_hygiene.py)
    gateway = Gateway(
        settings_for(db_dsn, http_port=port, api_keys=KEY, auth_failures_per_minute=0)
    )
    await gateway.start()
    fleet = [SimulatedAp3000Pile("04C0A001", ports=2), SimulatedBkvGateway("82231214002701")]
    try:
        async with (
            Simulator("127.0.0.1", gateway.server.port, fleet, jitter=0),
            httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}) as api,
        ):

            async def online() -> int:
                devices = (await api.get("/api/v1/devices", params={"online": "true"})).json()
                return len(devices["items"])

            await eventually(online, lambda n: n == 3, what="the pile and 2 BKV sockets online")
            status, report = await run_schemathesis(f"{base}/openapi.json", tmp_path)
    finally:
        await gateway.stop()
    assert status == 0, report
