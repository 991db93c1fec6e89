"""The platform at a glance: what the console's overview shows (``GET /api/v1/overview``).

Every figure is one bounded query on an index (the devices table is read whole, grouped:
it holds one row per device). Alerts are the platform's own checks on the same figures,
each with a stable code, a severity and the values its message names (the console
translates ``alert.<code>``); docs/console.md lists them with their thresholds.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from chargegw.store.database import Connection

__all__ = ["Alert", "Overview", "overview"]

QUERY_TIMEOUT_S = 10.0
#: the window of the command figures
COMMAND_WINDOW_MIN = 15
#: at most this many (protocol, gateway) groups of devices are listed
MAX_GROUPS = 50
#: alert thresholds (docs/console.md)
OUTBOX_OLDEST_WARN_S = 120.0
SUCCESS_RATE_WARN = 0.9
SUCCESS_RATE_MIN_COMMANDS = 20
RECENT_OFFLINE_WARN = 0.1
RECENT_OFFLINE_MIN_DEVICES = 10


class ProtocolCount(BaseModel):
    protocol: str
    online: int
    offline: int


class GatewayCount(BaseModel):
    protocol: str
    gateway_id: str | None = Field(description="null: piles connected directly")
    online: int
    offline: int


class Commands(BaseModel):
    window_min: int = Field(description="the window of these figures, in minutes")
    per_minute: float = Field(description="commands finished per minute")
    acked: int
    failed: int
    dead: int
    success_rate: float | None = Field(description="acked / finished; null without any")


class Settlements(BaseModel):
    since: dt.datetime = Field(description="the start of today in the site's time zone")
    count: int
    revenue_cent: int


class Outbox(BaseModel):
    open: int = Field(description="commands pending or sent, not yet answered")
    oldest_s: float | None = Field(description="age of the oldest open command")


class Node(BaseModel):
    owner: str
    node: str
    worker: int
    pid: int
    started_at: dt.datetime
    heartbeat_age_s: float
    connections: int
    devices: int
    draining: bool


class Alert(BaseModel):
    code: str = Field(examples=["outbox_backlog"])
    severity: Literal["critical", "warning"]
    values: dict[str, str | int | float] = Field(
        default_factory=dict, description="the figures the alert's message names"
    )


class Overview(BaseModel):
    at: dt.datetime
    devices: list[ProtocolCount]
    gateways: list[GatewayCount] = Field(
        description=f"devices by protocol and gateway, the largest {MAX_GROUPS} groups"
    )
    charging: int = Field(description="orders charging now (starting, charging, stopping)")
    commands: Commands
    settlements_today: Settlements
    outbox: Outbox
    nodes: list[Node] = Field(description="the gateway processes alive")
    alerts: list[Alert]


async def overview(
    conn: Connection,
    *,
    timezone: str,
    process_timeout_s: float,
    not_ready: dict[str, str],
) -> Overview:
    """The figures and the alerts; ``not_ready`` are the failing readiness checks of the
    serving process with their reasons."""
    now = await conn.fetchval("SELECT now()", timeout=QUERY_TIMEOUT_S)
    groups = await conn.fetch(
        """SELECT protocol, gateway_id,
                  count(*) FILTER (WHERE online) AS online,
                  count(*) FILTER (WHERE NOT online) AS offline,
                  count(*) FILTER (WHERE NOT online
                                   AND last_seen_at > now() - interval '1 hour') AS recent_off
             FROM devices GROUP BY protocol, gateway_id
            ORDER BY count(*) DESC, protocol, gateway_id""",
        timeout=QUERY_TIMEOUT_S,
    )
    protocols: dict[str, ProtocolCount] = {}
    recent_off = 0
    for g in groups:
        total = protocols.setdefault(
            g["protocol"], ProtocolCount(protocol=g["protocol"], online=0, offline=0)
        )
        total.online += g["online"]
        total.offline += g["offline"]
        recent_off += g["recent_off"]
    charging = await conn.fetchval(
        "SELECT count(*) FROM orders WHERE status IN ('starting', 'charging', 'stopping')",
        timeout=QUERY_TIMEOUT_S,
    )
    finished = {
        r["status"]: r["n"]
        for r in await conn.fetch(
            """SELECT status, count(*) AS n FROM commands
                WHERE status IN ('acked', 'failed', 'dead')
                  AND finished_at > now() - make_interval(mins => $1)
                GROUP BY status""",
            COMMAND_WINDOW_MIN,
            timeout=QUERY_TIMEOUT_S,
        )
    }
    done = sum(finished.values())
    commands = Commands(
        window_min=COMMAND_WINDOW_MIN,
        per_minute=round(done / COMMAND_WINDOW_MIN, 2),
        acked=finished.get("acked", 0),
        failed=finished.get("failed", 0),
        dead=finished.get("dead", 0),
        success_rate=None if done == 0 else round(finished.get("acked", 0) / done, 4),
    )
    since = await conn.fetchval(
        "SELECT date_trunc('day', now() AT TIME ZONE $1) AT TIME ZONE $1",
        timezone,
        timeout=QUERY_TIMEOUT_S,
    )
    settled = await conn.fetchrow(
        """SELECT count(*) AS n, coalesce(sum(amount_cent), 0)::bigint AS cents
             FROM order_charges WHERE settled_at >= $1""",
        since,
        timeout=QUERY_TIMEOUT_S,
    )
    assert settled is not None  # an aggregate has its row
    outbox_row = await conn.fetchrow(
        """SELECT count(*) AS n, extract(epoch FROM now() - min(created_at))::float8 AS oldest
             FROM commands WHERE status IN ('pending', 'sent')""",
        timeout=QUERY_TIMEOUT_S,
    )
    nodes = [
        Node(**dict(r))
        for r in await conn.fetch(
            """SELECT owner, node, worker, pid, started_at, connections, devices, draining,
                      extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s
                 FROM cluster_processes WHERE stopped_at IS NULL
                ORDER BY node, worker""",
            timeout=QUERY_TIMEOUT_S,
        )
    ]
    review = await conn.fetchval(
        """SELECT count(*) FROM orders
            WHERE review_reason IS NOT NULL AND created_at > now() - interval '1 day'""",
        timeout=QUERY_TIMEOUT_S,
    )
    failed_upgrades = await conn.fetchval(
        """SELECT count(*) FROM upgrade_targets
            WHERE state = 'failed' AND updated_at > now() - interval '1 day'""",
        timeout=QUERY_TIMEOUT_S,
    )
    webhooks_off = await conn.fetchval(
        """SELECT count(*) FROM webhook_subscriptions
            WHERE NOT enabled AND disabled_reason IS NOT NULL""",
        timeout=QUERY_TIMEOUT_S,
    )
    assert outbox_row is not None
    outbox = Outbox(open=outbox_row["n"], oldest_s=outbox_row["oldest"])
    online = sum(p.online for p in protocols.values())
    alerts = _alerts(
        not_ready=not_ready,
        nodes=nodes,
        process_timeout_s=process_timeout_s,
        outbox=outbox,
        commands=commands,
        online=online,
        recent_off=recent_off,
        review=review,
        failed_upgrades=failed_upgrades,
        webhooks_off=webhooks_off,
    )
    return Overview(
        at=now,
        devices=sorted(protocols.values(), key=lambda p: p.protocol),
        gateways=[
            GatewayCount(
                protocol=g["protocol"],
                gateway_id=g["gateway_id"],
                online=g["online"],
                offline=g["offline"],
            )
            for g in groups[:MAX_GROUPS]
        ],
        charging=charging,
        commands=commands,
        settlements_today=Settlements(
            since=since, count=settled["n"], revenue_cent=settled["cents"]
        ),
        outbox=outbox,
        nodes=nodes,
        alerts=alerts,
    )


def _alerts(
    *,
    not_ready: dict[str, str],
    nodes: list[Node],
    process_timeout_s: float,
    outbox: Outbox,
    commands: Commands,
    online: int,
    recent_off: int,
    review: int,
    failed_upgrades: int,
    webhooks_off: int,
) -> list[Alert]:
    alerts = [
        Alert(code="not_ready", severity="critical", values={"check": check, "reason": reason})
        for check, reason in sorted(not_ready.items())
    ]
    for node in nodes:
        if node.heartbeat_age_s > process_timeout_s:
            alerts.append(
                Alert(
                    code="node_silent",
                    severity="critical",
                    values={"owner": node.owner, "seconds": round(node.heartbeat_age_s)},
                )
            )
    if outbox.oldest_s is not None and outbox.oldest_s > OUTBOX_OLDEST_WARN_S:
        alerts.append(
            Alert(
                code="outbox_backlog",
                severity="warning",
                values={"open": outbox.open, "seconds": round(outbox.oldest_s)},
            )
        )
    done = commands.acked + commands.failed + commands.dead
    if (
        commands.success_rate is not None
        and done >= SUCCESS_RATE_MIN_COMMANDS
        and commands.success_rate < SUCCESS_RATE_WARN
    ):
        alerts.append(
            Alert(
                code="command_failures",
                severity="warning",
                values={"percent": round(commands.success_rate * 100, 1), "count": done},
            )
        )
    seen = online + recent_off
    if seen >= RECENT_OFFLINE_MIN_DEVICES and recent_off / seen > RECENT_OFFLINE_WARN:
        alerts.append(
            Alert(code="devices_dropped", severity="warning", values={"count": recent_off})
        )
    if review:
        alerts.append(Alert(code="orders_review", severity="warning", values={"count": review}))
    if failed_upgrades:
        alerts.append(
            Alert(code="upgrades_failed", severity="warning", values={"count": failed_upgrades})
        )
    if webhooks_off:
        alerts.append(
            Alert(code="webhooks_disabled", severity="warning", values={"count": webhooks_off})
        )
    return alerts
