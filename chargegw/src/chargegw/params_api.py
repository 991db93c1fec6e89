"""The parameter API: desired AP3000 parameters, applied and verified by read-back."""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any

import asyncpg
from fastapi import APIRouter, HTTPException

from .audit import mask_text
from .core import split_device_id
from .outbox import Priority
from .params import GROUPS, SECRET_FIELDS, ParamsError, prepare

if TYPE_CHECKING:
    from .service import Gateway


def make_params_router(gateway: Gateway) -> APIRouter:
    """The parameter endpoints of ``gateway``."""
    router = APIRouter(prefix="/api/v1", tags=["parameters"])

    def pool() -> asyncpg.Pool:
        if gateway.pool is None:
            raise HTTPException(503, "database unavailable")
        return gateway.pool

    @router.put(
        "/devices/{device_id}/params",
        status_code=202,
        summary="Set parameter groups; each is verified by reading it back",
    )
    async def put_params(device_id: str, body: dict[str, dict[str, Any]]) -> dict[str, Any]:
        if not body:
            raise HTTPException(422, {"error": "no parameter group given", "groups": [*GROUPS]})
        accepted: dict[str, Any] = {}
        async with pool().acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT protocol FROM devices WHERE device_id = $1 FOR UPDATE", device_id
            )
            if row is None:
                raise HTTPException(404, f"device {device_id} not found")
            if row["protocol"] != "ap3000":
                raise HTTPException(
                    422, f"parameters of {row['protocol']} devices are not supported yet"
                )
            existing = {
                r["group"]: r
                for r in await conn.fetch(
                    """SELECT "group", desired, reported FROM device_params
                       WHERE device_id = $1""",
                    device_id,
                )
            }
            desired: dict[str, dict[str, Any]] = {}
            phy = split_device_id(device_id)[0]
            for name, values in body.items():  # validate everything before sending anything
                old = existing.get(name)
                base = None
                if old is not None:
                    base = json.loads(old["desired"] or old["reported"] or "null")
                try:
                    desired[name] = prepare(phy, name, values, base)
                except ParamsError as exc:
                    raise HTTPException(
                        422, {"error": str(exc), "group": exc.group, "field": exc.field}
                    ) from None
            for name, values in desired.items():
                group = GROUPS[name]
                ids = []
                for command, params in ((group.set_command, values), (group.read_command, {})):
                    ids.append(
                        await gateway.outbox.submit(
                            conn,
                            device_id=device_id,
                            protocol="ap3000",
                            name=command,
                            params=params,
                            priority=Priority.PARAMETER,
                            expires_s=gateway.settings.command_expiry_s,
                        )
                    )
                await conn.execute(
                    """INSERT INTO device_params (device_id, "group", desired, desired_at,
                                                  status, diff, verified_at, failure_reason,
                                                  set_command_id, read_command_id)
                       VALUES ($1, $2, $3, now(), 'pending', NULL, NULL, NULL, $4, $5)
                       ON CONFLICT (device_id, "group") DO UPDATE SET
                           desired = excluded.desired, desired_at = now(),
                           status = 'pending', diff = NULL, verified_at = NULL,
                           failure_reason = NULL, set_command_id = excluded.set_command_id,
                           read_command_id = excluded.read_command_id""",
                    device_id,
                    name,
                    json.dumps(values),
                    ids[0],
                    ids[1],
                )
                accepted[name] = {
                    "status": "pending",
                    "desired": _masked(values),
                    "set_command_id": ids[0],
                    "read_command_id": ids[1],
                }
        gateway.outbox.wake(device_id)
        return {"device_id": device_id, "groups": accepted}

    @router.get(
        "/devices/{device_id}/params",
        summary="Desired and reported parameters, verification state and diff per group",
    )
    async def get_params(device_id: str) -> dict[str, Any]:
        async with pool().acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT 1 FROM devices WHERE device_id = $1", device_id):
                raise HTTPException(404, f"device {device_id} not found")
            # a queued set or read-back that failed or died leaves the group failed
            await conn.execute(
                """UPDATE device_params p SET status = 'failed',
                          failure_reason = c.name || ' ' || c.status
                              || coalesce(': ' || coalesce(c.result_text, c.dead_reason), '')
                   FROM commands c
                   WHERE p.device_id = $1 AND p.status IN ('pending', 'applying')
                     AND c.command_id IN (p.set_command_id, p.read_command_id)
                     AND c.status IN ('failed', 'dead')""",
                device_id,
            )
            rows = await conn.fetch(
                """SELECT * FROM device_params WHERE device_id = $1 ORDER BY "group" """,
                device_id,
            )
        groups: dict[str, Any] = {}
        for r in rows:
            groups[r["group"]] = {
                "status": r["status"],
                "desired": _masked(_json(r["desired"])),
                "reported": _masked(_json(r["reported"])),
                "diff": _json(r["diff"]),
                "desired_at": _time(r["desired_at"]),
                "reported_at": _time(r["reported_at"]),
                "verified_at": _time(r["verified_at"]),
                "failure_reason": r["failure_reason"],
                "set_command_id": r["set_command_id"],
                "read_command_id": r["read_command_id"],
            }
            diff = groups[r["group"]]["diff"]
            if diff:
                for name in SECRET_FIELDS & diff.keys():
                    diff[name] = {k: _mask(v) for k, v in diff[name].items()}
        return {"device_id": device_id, "groups": groups}

    return router


def _json(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw


def _masked(values: Any) -> Any:
    if not isinstance(values, dict):
        return values
    return {k: _mask(v) if k in SECRET_FIELDS else v for k, v in values.items()}


def _mask(value: Any) -> Any:
    return mask_text(value) if isinstance(value, str) else value


def _time(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
