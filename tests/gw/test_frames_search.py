"""Searching the audit log (``GET /api/v1/frames``) and exporting it (``chargegw frames
export``): a gateway with a simulated AP3000 pile and a BKV gateway, searched with each
filter and paged, exported as a capture (read back) and as a pcap (read by tshark)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from click.testing import CliRunner, Result

from chargegw.api import frames as frames_api
from chargegw.app import Gateway
from chargegw.capture import frame_bytes, read_capture
from chargegw.cli import main
from chargegw.domain import auth
from chargesim import SimulatedAp3000Pile, Simulator
from chargesim.bkv import BkvIntervals, SimulatedBkvGateway

from .waiting import api_client, eventually, eventually_json

PILE = "04000001"
BOX = "82231214000001"
SOCKET = f"{BOX}-1"
COLUMNS = "id, received_at, connection_id, device_id, direction, protocol, command, hex, error"


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.2}


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(gateway, frames_api.router) as api:
        yield api


async def _session(gateway: Gateway, api: httpx.AsyncClient) -> str:
    """A pile and a BKV gateway connect; the pile charges by time until settled, and a
    stranger sends garbage. The pile's order number."""
    pile = SimulatedAp3000Pile(PILE, ports=2, heartbeat_s=180)
    box = SimulatedBkvGateway(BOX, sockets=1, heartbeat_s=600, intervals=BkvIntervals(status_s=60))
    sim = Simulator("127.0.0.1", gateway.server.port, [pile, box], accel=120, jitter=0, seed=1)
    async with sim:
        for device in (PILE, SOCKET):
            await eventually_json(api, f"/api/v1/devices/{device}", "online", {True})
        response = await api.post(
            f"/api/v1/devices/{PILE}/ports/1/start", json={"mode": "time", "duration_min": 2}
        )
        assert response.status_code == 202, response.text
        order_no: str = response.json()["order_no"]
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"})
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
        writer.write(b"not a charging pile at all")
        await writer.drain()

        async def garbage_stored() -> bool:
            await gateway.writer.drained()
            assert gateway.pool is not None
            return bool(
                await gateway.pool.fetchval("SELECT count(*) FROM frames WHERE error IS NOT NULL")
            )

        await eventually(garbage_stored, what="the garbage recorded as an error frame")
        writer.close()
    await gateway.writer.drained()
    return order_no


async def _rows(gateway: Gateway, where: str, *args: Any) -> list[asyncpg.Record]:
    assert gateway.pool is not None
    rows: list[asyncpg.Record] = await gateway.pool.fetch(
        f"SELECT {COLUMNS} FROM frames WHERE {where} ORDER BY received_at, id", *args
    )
    return rows


async def _all(api: httpx.AsyncClient, params: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Every item of a search, following the cursor; and the number of pages."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await api.get("/api/v1/frames", params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["items"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages


def _ids(items: list[dict[str, Any]]) -> list[int]:
    return [item["id"] for item in items]


async def test_search_by_each_filter_and_page_with_the_cursor(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    order_no = await _session(gateway, client)
    pile_rows = await _rows(gateway, "device_id = $1", PILE)
    assert len(pile_rows) >= 8

    # a device, in pages of 4: the same frames as the table, oldest first
    items, pages = await _all(client, {"device_id": PILE, "limit": 4})
    assert _ids(items) == [r["id"] for r in pile_rows]
    assert pages == -(-len(pile_rows) // 4)
    first = items[0]
    assert set(first) == {
        "id",
        "received_at",
        "connection_id",
        "device_id",
        "direction",
        "protocol",
        "command",
        "hex",
        "error",
        "decoded",
    }
    decoded = [i for i in items if i["decoded"] is not None]
    assert decoded and all(i["decoded"]["protocol"] == "ap3000" for i in decoded)
    # the server's commands are labelled by their kind (0x82: start)
    labels = {(i["direction"], i["decoded"]["command"]): i["command"] for i in decoded}
    assert labels.pop(("out", "0x82")) == "start"
    assert all(code == label for (_, code), label in labels.items())

    # two devices: both, still in one order
    both, _ = await _all(client, {"device_id": [PILE, SOCKET], "limit": 1000})
    socket_rows = await _rows(gateway, "device_id = $1", SOCKET)
    assert socket_rows
    assert sorted(_ids(both)) == sorted(r["id"] for r in [*pile_rows, *socket_rows])
    assert [(i["received_at"], i["id"]) for i in both] == sorted(
        (i["received_at"], i["id"]) for i in both
    )

    # a gateway: its own frames and those of the devices behind it
    boxed, _ = await _all(client, {"gateway_id": BOX})
    box_rows = await _rows(gateway, "device_id = ANY($1::text[])", [BOX, SOCKET])
    assert _ids(boxed) == [r["id"] for r in box_rows]
    assert {i["device_id"] for i in boxed} == {BOX, SOCKET}

    # a connection: with its frames that name no device (the ICCID)
    connection = pile_rows[0]["connection_id"]
    on_connection, _ = await _all(client, {"connection_id": connection})
    connection_rows = await _rows(gateway, "connection_id = $1", connection)
    assert _ids(on_connection) == [r["id"] for r in connection_rows]
    assert {i["device_id"] for i in on_connection} == {PILE, None}

    # a direction, a command (repeatable, in any case)
    out = await client.get("/api/v1/frames", params={"device_id": PILE, "direction": "out"})
    assert {i["direction"] for i in out.json()["items"]} == {"out"}
    commands = sorted({r["command"] for r in pile_rows if r["command"]})[:2]
    picked, _ = await _all(client, {"device_id": PILE, "command": [c.upper() for c in commands]})
    assert _ids(picked) == [r["id"] for r in pile_rows if r["command"] in commands]

    # a window
    middle = pile_rows[len(pile_rows) // 2]["received_at"]
    window = {"device_id": PILE, "since": middle.isoformat()}
    later, _ = await _all(client, window)
    assert _ids(later) == [r["id"] for r in pile_rows if r["received_at"] >= middle]

    # errors only: the stranger's garbage
    errors, _ = await _all(client, {"errors_only": "true"})
    error_rows = await _rows(gateway, "error IS NOT NULL")
    assert _ids(errors) == [r["id"] for r in error_rows] and errors
    assert all(i["error"] and i["decoded"] is None for i in errors)

    # around an order: its device, from before its start command to after its settlement
    around, _ = await _all(client, {"order_no": order_no.lower()})
    assert around and {i["device_id"] for i in around} == {PILE}
    assert pile_rows[-1]["id"] in _ids(around)  # settled less than a minute ago
    start = [i for i in around if i["direction"] == "out" and i["command"] == "start"]
    assert start, "the order's start command is among its frames"
    # with a device filter, only that device's frames: none of another device
    assert (await _all(client, {"order_no": order_no, "device_id": SOCKET}))[0] == []


@pytest.mark.parametrize(
    ("params", "field", "text"),
    [
        ({"device_id": "NOPE"}, "device_id", "no such device"),
        ({"gateway_id": "NOPE"}, "gateway_id", "no such gateway"),
        ({"order_no": "NOPE"}, "order_no", "no such order"),
        ({"command": "0x1"}, "command", "as the audit log labels it"),
        ({"command": "DROP TABLE"}, "command", "as the audit log labels it"),
        ({"direction": "sideways"}, "direction", ""),
        ({"since": "2024-05-02T00:00:00Z", "until": "2024-05-01T00:00:00Z"}, "since", "after"),
        ({"since": "2024-01-01T00:00:00Z", "until": "2024-03-01T00:00:00Z"}, "since", "31 days"),
        ({"order_no": "X", "since": "2024-05-01T00:00:00Z"}, "since", "order_no sets the window"),
        ({"cursor": "bm90IG91cnM"}, "cursor", "malformed"),
        ({"limit": 0}, "limit", ""),
        ({"device_id": "x" * 65}, "device_id", "1 to 64"),
        ({"errors_only": "maybe"}, "errors_only", ""),
    ],
)
async def test_bad_filters_are_422_on_their_field(
    client: httpx.AsyncClient, params: dict[str, Any], field: str, text: str
) -> None:
    response = await client.get("/api/v1/frames", params=params)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and text in error["message"], error


async def test_a_key_limited_to_a_device_sees_only_its_frames(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    order_no = await _session(gateway, client)
    assert gateway.pool is not None
    async with gateway.pool.acquire() as conn:
        _, key = await auth.create_key(
            conn, auth.NewKey("partner", scopes=["read"], allowed_device_ids=[PILE])
        )
    headers = {"Authorization": f"Bearer {key}"}
    async with api_client(gateway, frames_api.router, auth_required=True) as partner:
        for params in ({"device_id": PILE}, {"order_no": order_no}):
            response = await partner.get("/api/v1/frames", params=params, headers=headers)
            assert response.status_code == 200, response.text
            assert {i["device_id"] for i in response.json()["items"]} == {PILE}
        for params in ({"device_id": SOCKET}, {"gateway_id": BOX}, {}, {"errors_only": "true"}):
            response = await partner.get("/api/v1/frames", params=params, headers=headers)
            assert response.status_code == 403, (params, response.text)


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, ["frames", "export", *args])


async def test_export_jsonl_reads_back_as_the_database_frames(
    gateway: Gateway, client: httpx.AsyncClient, db_dsn: str, tmp_path: Path
) -> None:
    since = datetime.now(UTC) - timedelta(minutes=5)
    order_no = await _session(gateway, client)
    until = datetime.now(UTC) + timedelta(seconds=1)
    out = tmp_path / "session.jsonl"
    window = ["--since", since.isoformat(), "--until", until.isoformat()]
    result = await asyncio.to_thread(
        _invoke, ["--device", PILE, "--gateway", BOX, *window, "--out", str(out), "--dsn", db_dsn]
    )
    assert result.exit_code == 0, result.output
    capture = read_capture(out)
    assert capture.problems == []
    devices = await _rows(gateway, "device_id = ANY($1::text[])", [PILE, BOX, SOCKET])
    connections = sorted({r["connection_id"] for r in devices})
    orphans = await _rows(
        gateway, "device_id IS NULL AND connection_id = ANY($1::text[])", connections
    )
    expected = sorted([*devices, *orphans], key=lambda r: (r["received_at"], r["id"]))
    assert [
        (f.frame_id, f.at, f.connection, f.device_id, f.direction, f.protocol, f.command, f.hex)
        for f in capture.frames
    ] == [
        (
            r["id"],
            r["received_at"],
            r["connection_id"],
            r["device_id"],
            r["direction"],
            r["protocol"],
            r["command"],
            r["hex"],
        )
        for r in expected
    ]
    assert any("**" in f.hex for f in capture.frames), "the ICCID stays masked"
    assert capture.header["source"] == "chargegw frames export"
    assert (
        capture.header["filters"]["devices"] == [PILE]
        and capture.header["filters"]["gateway"] == BOX
    )
    assert capture.state is not None
    orders = {o["order_no"]: o for o in capture.state["orders"]}
    assert orders[order_no]["status"] == "settled" and orders[order_no]["device_id"] == PILE
    assert {(p["device_id"], p["port"]) for p in capture.state["ports"]} >= {(PILE, 1), (SOCKET, 1)}
    assert [s["order_no"] for s in capture.state["settlements"]] == [order_no]

    # one connection, without the state
    single = tmp_path / "one.jsonl"
    args = ["--device", PILE, "--connection", connections[0], *window, "--no-state"]
    result = await asyncio.to_thread(_invoke, [*args, "--out", str(single), "--dsn", db_dsn])
    assert result.exit_code == 0, result.output
    one = read_capture(single)
    assert one.state is None and {f.connection for f in one.frames} == {connections[0]}

    # to standard output
    result = await asyncio.to_thread(_invoke, [*args, "--dsn", db_dsn])
    assert result.exit_code == 0, result.output
    # the same frames after the header (whose created_at differs)
    assert result.stdout.splitlines()[1:] == single.read_text().splitlines()[1:]


async def test_export_pcap_opens_in_tshark(
    gateway: Gateway, client: httpx.AsyncClient, db_dsn: str, tmp_path: Path
) -> None:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed (Debian: apt-get install tshark)")
    since = datetime.now(UTC) - timedelta(minutes=5)
    await _session(gateway, client)
    until = datetime.now(UTC) + timedelta(seconds=1)
    window = ["--since", since.isoformat(), "--until", until.isoformat(), "--dsn", db_dsn]
    jsonl, pcap = tmp_path / "s.jsonl", tmp_path / "s.pcap"
    for out, extra in ((jsonl, []), (pcap, ["--format", "pcap"])):
        result = await asyncio.to_thread(
            _invoke, ["--device", PILE, "--device", SOCKET, *window, *extra, "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
    frames = read_capture(jsonl).frames
    shown = await asyncio.to_thread(
        subprocess.run,
        [tshark, "-r", str(pcap), "-T", "fields", "-e", "tcp.payload"],
        capture_output=True,
        text=True,
        check=True,
    )
    payloads = [line.replace(":", "") for line in shown.stdout.splitlines()]
    assert len(payloads) == len(frames)
    assert payloads == [frame_bytes(f.hex).hex() for f in frames]


async def test_export_refuses_bad_input_and_writes_nothing(db_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    window = ["--since", "2024-05-01T00:00:00Z", "--until", "2024-05-02T00:00:00Z"]
    cases = {
        "no such device or gateway: NOPE": ["--device", "NOPE", *window],
        "no such device or gateway: G": ["--gateway", "G", *window],
        "name at least one device": [*window],
        "is after until": [
            "--device",
            "X",
            "--since",
            "2024-05-02T00:00:00Z",
            "--until",
            "2024-05-01T00:00:00Z",
        ],
    }
    for message, args in cases.items():
        result = await asyncio.to_thread(_invoke, [*args, "--out", str(out), "--dsn", db_dsn])
        assert (result.exit_code, message in result.output) == (2, True), (args, result.output)
    assert list(tmp_path.iterdir()) == []
    unwritable = await asyncio.to_thread(
        _invoke, ["--device", "X", *window, "--out", str(tmp_path / "no" / "x"), "--dsn", db_dsn]
    )
    assert unwritable.exit_code == 2 and "is not a directory" in unwritable.output
    not_a_time = await asyncio.to_thread(
        _invoke, ["--device", "X", "--since", "soon", "--until", "x"]
    )
    assert not_a_time.exit_code == 2 and "ISO 8601" in not_a_time.output
