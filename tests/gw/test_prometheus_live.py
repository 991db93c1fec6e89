"""The dashboard and the alert rules against a real Prometheus (Debian's `prometheus`)
scraping `chargegw serve --workers 2` under simulated traffic, and the node exporter for
the disk figures: every panel's query returns series, every rule reads only metrics that
exist, and a database outage makes ChargegwDatabaseWriteFailures go pending.

Skipped when prometheus or prometheus-node-exporter is missing, except in CI (CI=true),
where it fails. The promtool checks of the same files are in tests/test_prometheus_rules.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from chargesim import Faults, SimulatedAp3000Pile, Simulator, make_ap3000_piles, make_bkv_gateways

from ..promql import (
    RULE_FILES,
    dashboard_queries,
    metric_names,
    rules,
    tool,
)
from .conftest import database_outage
from .waiting import eventually, free_port, wait_http

BKV_SOCKET = "82231214000001-1"
#: pile id -> faults: each makes one outcome the panels and rules count
FAULTY = {
    "04000003": Faults(answer_only_resend=True),  # a resend, then acked
    "04000004": Faults(refuse_with=1),  # refused
    "04000005": Faults(silent=True),  # timeout: dead, "no answer"
    "04000006": Faults(garbage=3),  # decode errors
}
LEAVING = "04000007"  # registers, leaves: its start expires ("offline")
#: short timings so every outcome happens within seconds
GATEWAY_ENV = {
    "CHARGEGW_LOG_FORMAT": "json",
    "CHARGEGW_ACK_TIMEOUT_S": "1",
    "CHARGEGW_COMMAND_EXPIRY_S": "1",
    "CHARGEGW_OUTBOX_SCAN_S": "0.5",
    "CHARGEGW_COMMAND_SPACING_S": "0.1",
    "CHARGEGW_DEVICE_IDENTIFY_TIMEOUT_S": "1",
}


@contextlib.asynccontextmanager
async def _process(
    args: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A subprocess writing to ``log`` (a file: nobody has to read a pipe), ended with
    SIGTERM (SIGKILL after 30 s) when the block ends."""
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *args, stdout=out, stderr=asyncio.subprocess.STDOUT, env=env
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()


def _prometheus_config(path: Path, gateway: str, node: str) -> None:
    """deploy/prometheus/prometheus.yml with this test's targets, 1 s scrapes and rule
    evaluations, and the repository's rule files."""
    config = yaml.safe_load((RULE_FILES[0].parents[1] / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(p) for p in RULE_FILES]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["chargegw"]["static_configs"][0]["targets"] = [gateway]
    jobs["node"]["static_configs"][0]["targets"] = [node]
    path.write_text(yaml.safe_dump(config))


class _Prometheus:
    """The HTTP API of a Prometheus server."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def names(self) -> set[str]:
        body = (await self.client.get("/api/v1/label/__name__/values")).json()
        return set(body["data"])

    async def query(self, expr: str) -> list[dict[str, Any]]:
        response = await self.client.get("/api/v1/query", params={"query": expr})
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def alert_states(self, name: str) -> set[str]:
        body = (await self.client.get("/api/v1/alerts")).json()
        return {a["state"] for a in body["data"]["alerts"] if a["labels"]["alertname"] == name}


async def test_every_panel_and_rule_works_on_prometheus_scraping_two_workers(
    pg_server_dsn: str, db_dsn: str, tmp_path: Path
) -> None:
    prometheus = tool("prometheus")
    node_exporter = tool("prometheus-node-exporter", "prometheus-node-exporter")
    device_port, http_port, prom_port, node_port = (free_port() for _ in range(4))
    base = f"http://127.0.0.1:{http_port}"
    config = tmp_path / "prometheus.yml"
    _prometheus_config(config, f"127.0.0.1:{http_port}", f"127.0.0.1:{node_port}")
    serve = [sys.executable, "-m", "chargegw", "serve", "--workers", "2"]
    serve += ["--device-host", "127.0.0.1", "--device-port", str(device_port)]
    serve += ["--http-port", str(http_port), "--data-dir", str(tmp_path)]
    async with contextlib.AsyncExitStack() as stack:
        gateway = await stack.enter_async_context(
            _process(
                serve, tmp_path / "serve.log", {**os.environ, **GATEWAY_ENV, "CHARGEGW_DSN": db_dsn}
            )
        )
        await stack.enter_async_context(
            _process(
                [
                    node_exporter,
                    f"--web.listen-address=127.0.0.1:{node_port}",
                    "--collector.disable-defaults",
                    "--collector.filesystem",
                    # the defaults leave out overlay, the root of many CI containers
                    "--collector.filesystem.fs-types-exclude=^(tmpfs|ramfs|squashfs|proc|sysfs|cgroup2?|devtmpfs|devpts|mqueue|nsfs|autofs)$",
                ],
                tmp_path / "node.log",
            )
        )
        prom = await stack.enter_async_context(
            _process(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                tmp_path / "prometheus.log",
            )
        )
        try:
            await wait_http(f"{base}/readyz", timeout=60, process=gateway)
            await wait_http(f"http://127.0.0.1:{prom_port}/-/ready", timeout=30, process=prom)
        except AssertionError as exc:
            logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.log"))
            raise AssertionError(f"{exc}\n{logs}") from None
        api = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=10))
        prom_api = _Prometheus(
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{prom_port}", timeout=10)
            )
        )
        await _traffic(stack, api, device_port)
        await _panels_and_rules_see_the_metrics(prom_api)
        await _database_outage_makes_the_write_failure_alert_pending(
            prom_api, pg_server_dsn, db_dsn
        )


async def _traffic(stack: contextlib.AsyncExitStack, api: httpx.AsyncClient, port: int) -> None:
    """Piles of both protocols, each start outcome, a settlement of each protocol, a
    resend, decode errors and a refused connection."""
    piles: list[Any] = [*make_ap3000_piles(2), *make_bkv_gateways(1, sockets=1)]
    piles += [SimulatedAp3000Pile(phy, faults=faults) for phy, faults in FAULTY.items()]
    sim = Simulator("127.0.0.1", port, piles, accel=60, seed=14)
    await stack.enter_async_context(sim)
    leaving = Simulator("127.0.0.1", port, [SimulatedAp3000Pile(LEAVING)], accel=60, seed=15)
    async with leaving:
        await _online(api, {LEAVING})
    await _online(api, {"04000001", "04000002", "04000003", "04000004", "04000005", BKV_SOCKET})
    await eventually(lambda: _online_ids(api), lambda ids: LEAVING not in ids, timeout=20)

    # a connection that never says who it is: refused for identify_timeout after 1 s
    quiet = socket.create_connection(("127.0.0.1", port))
    stack.callback(quiet.close)

    expected = {
        "04000001": {"acked"},
        "04000002": {"acked"},
        BKV_SOCKET: {"acked"},
        "04000003": {"acked"},
        "04000004": {"failed"},
        "04000005": {"dead"},
        LEAVING: {"dead"},
    }
    commands = {}
    for device, _ in expected.items():
        response = await api.post(
            f"/api/v1/devices/{device}/ports/1/start", json={"mode": "time", "duration_min": 1}
        )
        assert response.status_code == 202, response.text
        commands[device] = response.json()["command_id"]

    async def statuses() -> dict[str, str]:
        return {
            device: (await api.get(f"/api/v1/commands/{command}")).json()["status"]
            for device, command in commands.items()
        }

    await eventually(
        statuses,
        lambda got: all(got[d] in expected[d] for d in expected),
        what="every start finished as its pile made it",
        timeout=20,
        interval=0.2,
    )
    # the 1-minute sessions end after 1 s (accel 60) and settle
    settled = {}
    for device in ("04000001", BKV_SOCKET):
        command = (await api.get(f"/api/v1/commands/{commands[device]}")).json()
        settled[device] = command["order_no"]

    async def orders() -> set[str]:
        return {
            (await api.get(f"/api/v1/orders/{order}")).json()["status"]
            for order in settled.values()
        }

    await eventually(orders, lambda got: got == {"settled"}, timeout=20, interval=0.2)


async def _online_ids(api: httpx.AsyncClient) -> set[str]:
    body = (await api.get("/api/v1/devices", params={"online": "true", "limit": 100})).json()
    return {d["device_id"] for d in body["items"]}


async def _online(api: httpx.AsyncClient, devices: set[str]) -> None:
    await eventually(
        lambda: _online_ids(api),
        lambda ids: devices <= ids,
        what=f"{sorted(devices)} online",
        timeout=20,
        interval=0.2,
    )


async def _panels_and_rules_see_the_metrics(prom: _Prometheus) -> None:
    """Every metric a rule or a panel reads exists in Prometheus; every panel query
    returns series; every rule expression evaluates."""
    rule_exprs = [(rule.get("alert") or rule["record"], rule["expr"]) for rule in rules()]
    panels = dashboard_queries()
    needed = {(where, name) for where, expr in rule_exprs + panels for name in metric_names(expr)}

    async def missing() -> list[tuple[str, str]]:
        names = await prom.names()
        return sorted((where, name) for where, name in needed if name not in names)

    # recording rules run every second and the rates need two scrapes: wait for them
    await eventually(
        missing,
        lambda got: not got,
        what="every metric the rules and panels read in Prometheus",
        timeout=20,
        interval=0.5,
    )

    for _, expr in rule_exprs:
        await prom.query(expr)  # evaluates (an alert that does not fire returns nothing)
    # one scrape shows both workers: the per-worker panels have a line for each
    workers = await prom.query("chargegw_worker_up == 1")
    assert sorted(w["metric"]["worker"] for w in workers) == ["0", "1"]

    async def empty_panels() -> list[tuple[str, str]]:
        return [(title, expr) for title, expr in panels if not await prom.query(expr)]

    await eventually(
        empty_panels,
        lambda empty: not empty,
        what="every panel query returning series",
        timeout=15,
        interval=0.5,
    )


async def _database_outage_makes_the_write_failure_alert_pending(
    prom: _Prometheus, pg_server_dsn: str, db_dsn: str
) -> None:
    alert = "ChargegwDatabaseWriteFailures"
    assert await prom.alert_states(alert) == set()
    async with database_outage(pg_server_dsn, db_dsn):
        states: set[str] = await eventually(
            lambda: prom.alert_states(alert),
            lambda got: bool(got & {"pending", "firing"}),
            what=f"{alert} pending",
            timeout=30,
            interval=0.5,
        )
    assert states <= {"pending", "firing"}
