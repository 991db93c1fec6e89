"""The parameter API: desired AP3000 parameters, applied and verified by read-back."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import TYPE_CHECKING, Any

import asyncpg
from fastapi import APIRouter, HTTPException

from .audit import mask_text
from .device_selector import SelectorError, parse_selector, select_devices
from .params import (
    GROUPS,
    SECRET_FIELDS,
    DeviceNotFoundError,
    ParamsError,
    UnsupportedDeviceError,
    apply,
    mark_dead_commands,
    prepare,
)

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
        async with pool().acquire() as conn, conn.transaction():
            try:
                applied = await apply(
                    gateway.outbox,
                    conn,
                    device_id,
                    body,
                    expires_s=gateway.settings.command_expiry_s,
                )
            except DeviceNotFoundError as exc:
                raise HTTPException(404, str(exc)) from None
            except UnsupportedDeviceError as exc:
                raise HTTPException(422, str(exc)) from None
            except ParamsError as exc:
                raise HTTPException(422, _params_error(exc)) from None
        accepted = {
            name: {"status": "pending", **a, "desired": _masked(a["desired"])}
            for name, a in applied.items()
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
            await mark_dead_commands(conn, [device_id])
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

    @router.post(
        "/param-profiles",
        status_code=201,
        summary="Create a parameter profile: a named, validated set of parameter groups",
    )
    async def create_profile(body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name")
        if not isinstance(name, str) or not _PROFILE_NAME.fullmatch(name):
            raise HTTPException(
                422, {"error": "name: 1-64 of A-Z a-z 0-9 . _ -", "group": None, "field": "name"}
            )
        protocol = body.get("protocol", "ap3000")
        if protocol != "ap3000":
            raise HTTPException(
                422,
                {
                    "error": f"profiles for {protocol!r} devices are not supported yet",
                    "group": None,
                    "field": "protocol",
                },
            )
        groups = body.get("groups")
        if not isinstance(groups, dict) or not groups:
            raise HTTPException(
                422, {"error": "no parameter group given", "group": None, "field": "groups"}
            )
        prepared: dict[str, dict[str, Any]] = {}
        for group, values in groups.items():  # a profile carries whole groups
            try:
                prepared[group] = prepare(_ANY_PHY, group, values, None)
            except ParamsError as exc:
                raise HTTPException(422, _params_error(exc)) from None
        row = await pool().fetchrow(
            """INSERT INTO param_profiles (name, protocol, groups) VALUES ($1, $2, $3)
               ON CONFLICT (name) DO NOTHING RETURNING *""",
            name,
            protocol,
            json.dumps(prepared),
        )
        if row is None:
            raise HTTPException(409, f"parameter profile {name} exists")
        return _profile(row)

    @router.get("/param-profiles", summary="Parameter profiles")
    async def list_profiles() -> dict[str, Any]:
        rows = await pool().fetch("SELECT * FROM param_profiles ORDER BY name")
        return {"items": [_profile(r) for r in rows]}

    @router.get("/param-profiles/{name}", summary="One parameter profile")
    async def get_profile(name: str) -> dict[str, Any]:
        row = await pool().fetchrow("SELECT * FROM param_profiles WHERE name = $1", name)
        if row is None:
            raise HTTPException(404, f"parameter profile {name} not found")
        return _profile(row)

    @router.post(
        "/param-profiles/{name}/apply",
        status_code=202,
        summary="Apply a profile to the devices a selector names; answers the job",
    )
    async def apply_profile(name: str, body: dict[str, Any]) -> dict[str, Any]:
        selector = body.get("selector")
        async with pool().acquire() as conn, conn.transaction():
            profile = await conn.fetchrow("SELECT * FROM param_profiles WHERE name = $1", name)
            if profile is None:
                raise HTTPException(404, f"parameter profile {name} not found")
            device_ids = await _select(conn, selector)
            groups: dict[str, Any] = _json(profile["groups"])
            job_id = await conn.fetchval(
                """INSERT INTO param_jobs (profile, selector) VALUES ($1, $2)
                   RETURNING job_id""",
                name,
                json.dumps(selector),
            )
            for device_id in device_ids:
                try:
                    applied = await apply(
                        gateway.outbox,
                        conn,
                        device_id,
                        groups,
                        expires_s=gateway.settings.command_expiry_s,
                    )
                except ParamsError as exc:
                    raise HTTPException(
                        422, {**_params_error(exc), "device_id": device_id}
                    ) from None
                await conn.execute(
                    """INSERT INTO param_job_devices (job_id, device_id, set_command_ids)
                       VALUES ($1, $2, $3)""",
                    job_id,
                    device_id,
                    json.dumps({g: a["set_command_id"] for g, a in applied.items()}),
                )
            job = await _job(conn, job_id)
        for device_id in device_ids:
            gateway.outbox.wake(device_id)
        return job

    @router.get(
        "/param-jobs/{job_id}",
        summary="A profile apply job: per-device progress and counts",
    )
    async def get_job(job_id: int) -> dict[str, Any]:
        async with pool().acquire() as conn, conn.transaction():
            return await _job(conn, job_id)

    return router


_PROFILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: a physical id to validate profiles with (the encoding does not depend on it)
_ANY_PHY = "00000000"
#: a device's job status from its groups' statuses: the first that any group has
_PRECEDENCE = ("failed", "mismatch", "superseded", "applying", "pending")
JOB_STATUSES = ("pending", "applying", "verified", "mismatch", "failed", "superseded")


def _selector_error(message: str) -> HTTPException:
    return HTTPException(422, {"error": f"selector: {message}", "field": "selector"})


async def _select(conn: asyncpg.pool.PoolConnectionProxy, selector: Any) -> list[str]:
    """The AP3000 device ids ``selector`` names; 422 unless it names at least one."""
    try:
        return await select_devices(conn, parse_selector(selector), "ap3000")
    except SelectorError as exc:
        raise _selector_error(str(exc)) from None


async def _job(conn: asyncpg.pool.PoolConnectionProxy, job_id: int) -> dict[str, Any]:
    """The job with each device's progress derived from ``device_params`` (and stored)."""
    job = await conn.fetchrow("SELECT * FROM param_jobs WHERE job_id = $1", job_id)
    if job is None:
        raise HTTPException(404, f"parameter job {job_id} not found")
    members = await conn.fetch(
        "SELECT * FROM param_job_devices WHERE job_id = $1 ORDER BY device_id", job_id
    )
    await mark_dead_commands(conn, [m["device_id"] for m in members])
    params = await conn.fetch(
        """SELECT p.* FROM device_params p JOIN param_job_devices j USING (device_id)
           WHERE j.job_id = $1""",
        job_id,
    )
    by_device: dict[str, dict[str, Any]] = {}
    for p in params:
        by_device.setdefault(p["device_id"], {})[p["group"]] = p
    counts = dict.fromkeys(JOB_STATUSES, 0)
    devices = []
    for m in members:
        groups: dict[str, Any] = {}
        for group, set_command_id in _json(m["set_command_ids"]).items():
            p = by_device.get(m["device_id"], {}).get(group)  # type: ignore[assignment]
            if p is None or p["set_command_id"] != set_command_id:
                groups[group] = {"status": "superseded"}
                continue
            groups[group] = {"status": p["status"]}
            if p["failure_reason"]:
                groups[group]["failure_reason"] = p["failure_reason"]
            diff = _json(p["diff"])
            if diff:
                for name in SECRET_FIELDS & diff.keys():
                    diff[name] = {k: _mask(v) for k, v in diff[name].items()}
                groups[group]["diff"] = diff
        statuses = {g["status"] for g in groups.values()}
        status = next((s for s in _PRECEDENCE if s in statuses), "verified")
        if status != m["status"]:
            await conn.execute(
                """UPDATE param_job_devices SET status = $3
                   WHERE job_id = $1 AND device_id = $2""",
                job_id,
                m["device_id"],
                status,
            )
        counts[status] += 1
        devices.append({"device_id": m["device_id"], "status": status, "groups": groups})
    done = counts["pending"] == counts["applying"] == 0
    return {
        "job_id": job_id,
        "profile": job["profile"],
        "selector": _json(job["selector"]),
        "created_at": _time(job["created_at"]),
        "state": "done" if done else "running",
        "total": len(devices),
        "counts": counts,
        "devices": devices,
    }


def _profile(row: asyncpg.Record) -> dict[str, Any]:
    groups = _json(row["groups"])
    return {
        "name": row["name"],
        "protocol": row["protocol"],
        "groups": {g: _masked(v) for g, v in groups.items()},
        "created_at": _time(row["created_at"]),
    }


def _params_error(exc: ParamsError) -> dict[str, Any]:
    return {"error": str(exc), "group": exc.group, "field": exc.field}


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
