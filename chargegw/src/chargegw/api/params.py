"""The parameter API: desired AP3000 and BKV parameters, applied and verified by
read-back; profiles (versioned) and the paced jobs that apply them."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import TYPE_CHECKING, Any

import asyncpg
from fastapi import APIRouter, HTTPException

from chargegw.domain.device_selector import SelectorError, parse_selector, select_devices
from chargegw.domain.params import (
    ANY_DEVICE,
    PROTOCOL_GROUPS,
    DeviceNotFoundError,
    ParamsError,
    UnsupportedDeviceError,
    apply,
    engine_for,
    fail_dead_commands,
    masked,
    prepare,
    start_ready,
)
from chargegw.store.database import Connection

if TYPE_CHECKING:
    from chargegw.app import Gateway

#: defaults of a profile job's pace (as firmware upgrade jobs)
DEFAULT_RATE_PER_MIN = 60
DEFAULT_CONCURRENCY = 10
#: largest rate and concurrency accepted
MAX_PACE = 100_000


def make_params_router(gateway: Gateway) -> APIRouter:
    """The parameter endpoints of ``gateway``."""
    router = APIRouter(prefix="/api/v1", tags=["parameters"])

    def pool() -> asyncpg.Pool:
        if gateway.pool is None:
            raise HTTPException(503, "database unavailable")
        engine_for(gateway)  # drift checks, job starts and dead commands need it running
        return gateway.pool

    @router.put(
        "/devices/{device_id}/params",
        status_code=202,
        summary="Set parameter groups; each is verified by reading it back",
    )
    async def put_params(device_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if not body:
            raise HTTPException(
                422, {"error": "no parameter group given", "group": None, "field": None}
            )
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
                detail = {"error": str(exc), "group": None, "field": None}
                raise HTTPException(422, detail) from None
            except ParamsError as exc:
                raise HTTPException(422, _params_error(exc)) from None
        accepted = {
            name: {"status": "pending", **a, "desired": masked(a["desired"])}
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
            await fail_dead_commands(conn, [device_id])
            rows = await conn.fetch(
                """SELECT * FROM device_params WHERE device_id = $1 ORDER BY "group" """,
                device_id,
            )
        groups: dict[str, Any] = {}
        for r in rows:
            groups[r["group"]] = {
                "status": r["status"],
                "desired": masked(_json(r["desired"])),
                "reported": masked(_json(r["reported"])),
                "diff": masked(_json(r["diff"])),
                "desired_at": _time(r["desired_at"]),
                "reported_at": _time(r["reported_at"]),
                "acknowledged_at": _time(r["acknowledged_at"]),
                "verified_at": _time(r["verified_at"]),
                "checked_at": _time(r["checked_at"]),
                "failure_reason": r["failure_reason"],
                "set_command_id": r["set_command_id"],
                "read_command_id": r["read_command_id"],
                "job_id": r["job_id"],
            }
        return {"device_id": device_id, "groups": groups}

    @router.post(
        "/param-profiles",
        status_code=201,
        summary="Create a parameter profile: a named, validated set of parameter groups",
    )
    async def create_profile(body: dict[str, Any]) -> dict[str, Any]:
        _only(body, {"name", "protocol", "groups"})
        name = body.get("name")
        if not isinstance(name, str) or not _PROFILE_NAME.fullmatch(name):
            raise HTTPException(
                422, {"error": "name: 1-64 of A-Z a-z 0-9 . _ -", "group": None, "field": "name"}
            )
        protocol = body.get("protocol", "ap3000")
        if protocol not in PROTOCOL_GROUPS:
            raise HTTPException(
                422,
                {
                    "error": f"protocol: {protocol!r} is not one of {', '.join(PROTOCOL_GROUPS)}",
                    "group": None,
                    "field": "protocol",
                },
            )
        prepared = _profile_groups(protocol, body.get("groups"))
        async with pool().acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO param_profiles (name, protocol, groups) VALUES ($1, $2, $3)
                   ON CONFLICT (name) DO NOTHING RETURNING *""",
                name,
                protocol,
                json.dumps(prepared),
            )
            if row is None:
                raise HTTPException(409, f"parameter profile {name} exists")
            await conn.execute(
                """INSERT INTO param_profile_versions (name, version, groups, created_at)
                   VALUES ($1, 1, $2, $3)""",
                name,
                json.dumps(prepared),
                row["created_at"],
            )
        return _profile(row)

    @router.put(
        "/param-profiles/{name}",
        summary="Change a profile's groups: a new version (jobs keep the one they applied)",
    )
    async def update_profile(name: str, body: dict[str, Any]) -> dict[str, Any]:
        _only(body, {"protocol", "groups"})
        async with pool().acquire() as conn, conn.transaction():
            old = await conn.fetchrow(
                "SELECT * FROM param_profiles WHERE name = $1 FOR UPDATE", name
            )
            if old is None:
                raise HTTPException(404, f"parameter profile {name} not found")
            protocol = body.get("protocol", old["protocol"])
            if protocol != old["protocol"]:
                raise HTTPException(
                    422,
                    {
                        "error": f"protocol: the profile is for {old['protocol']} devices;"
                        " create another profile for another protocol",
                        "group": None,
                        "field": "protocol",
                    },
                )
            prepared = _profile_groups(protocol, body.get("groups"))
            row = await conn.fetchrow(
                """UPDATE param_profiles SET groups = $2, version = version + 1,
                          updated_at = now()
                   WHERE name = $1 RETURNING *""",
                name,
                json.dumps(prepared),
            )
            assert row is not None
            await conn.execute(
                """INSERT INTO param_profile_versions (name, version, groups, created_at)
                   VALUES ($1, $2, $3, $4)""",
                name,
                row["version"],
                json.dumps(prepared),
                row["updated_at"],
            )
        return _profile(row)

    @router.get("/param-profiles", summary="Parameter profiles (their current versions)")
    async def list_profiles() -> dict[str, Any]:
        rows = await pool().fetch("SELECT * FROM param_profiles ORDER BY name")
        return {"items": [_profile(r) for r in rows]}

    @router.get(
        "/param-profiles/{name}",
        summary="One parameter profile; ?version=n for an earlier version",
    )
    async def get_profile(name: str, version: int | None = None) -> dict[str, Any]:
        row = await pool().fetchrow("SELECT * FROM param_profiles WHERE name = $1", name)
        if row is None:
            raise HTTPException(404, f"parameter profile {name} not found")
        if version is None or version == row["version"]:
            return _profile(row)
        old = await pool().fetchrow(
            "SELECT * FROM param_profile_versions WHERE name = $1 AND version = $2",
            name,
            version,
        )
        if old is None:
            raise HTTPException(404, f"parameter profile {name} has no version {version}")
        return {
            **_profile(row),
            "version": version,
            "groups": _masked_groups(old["groups"]),
            "updated_at": _time(old["created_at"]),
        }

    @router.post(
        "/param-profiles/{name}/apply",
        status_code=202,
        summary="Apply a profile to the devices a selector names, paced; answers the job",
    )
    async def apply_profile(name: str, body: dict[str, Any]) -> dict[str, Any]:
        _only(body, {"selector", "rate_per_min", "concurrency"})
        rate = _pace(body, "rate_per_min", DEFAULT_RATE_PER_MIN)
        concurrency = _pace(body, "concurrency", DEFAULT_CONCURRENCY)
        selector = body.get("selector")
        async with pool().acquire() as conn, conn.transaction():
            profile = await conn.fetchrow("SELECT * FROM param_profiles WHERE name = $1", name)
            if profile is None:
                raise HTTPException(404, f"parameter profile {name} not found")
            device_ids = await _select(conn, selector, profile["protocol"])
            job_id = await conn.fetchval(
                """INSERT INTO param_jobs (profile, profile_version, protocol, groups, selector,
                                           rate_per_min, concurrency)
                   VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING job_id""",
                name,
                profile["version"],
                profile["protocol"],
                profile["groups"],
                json.dumps(selector),
                rate,
                concurrency,
            )
            await conn.execute(
                """INSERT INTO param_job_devices (job_id, device_id, status)
                   SELECT $1, d, 'queued' FROM unnest($2::text[]) AS d""",
                job_id,
                device_ids,
            )
            woken = await start_ready(gateway, conn, job_id)
            job = await _job(conn, job_id)
        for device_id in woken:
            gateway.outbox.wake(device_id)
        engine_for(gateway).kick()
        return job

    @router.get("/param-jobs", summary="Profile jobs, newest first (without devices)")
    async def list_jobs(limit: int = 100) -> dict[str, Any]:
        rows = await pool().fetch(
            "SELECT * FROM param_jobs ORDER BY job_id DESC LIMIT $1", max(1, min(limit, 1000))
        )
        return {"items": [_job_head(r) for r in rows]}

    @router.get(
        "/param-jobs/{job_id}",
        summary="A profile apply job: per-device progress and counts",
    )
    async def get_job(job_id: int) -> dict[str, Any]:
        async with pool().acquire() as conn, conn.transaction():
            return await _job(conn, job_id)

    return router


_PROFILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: a device's job status from its groups' statuses: the first that any group has
_PRECEDENCE = ("failed", "mismatch", "superseded", "applying", "pending", "acknowledged")
JOB_STATUSES = (
    "queued",
    "pending",
    "applying",
    "verified",
    "acknowledged",
    "mismatch",
    "failed",
    "superseded",
)


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HTTPException(
            422,
            {
                "error": f"unknown field {unknown[0]!r}; known: {', '.join(sorted(allowed))}",
                "group": None,
                "field": unknown[0],
            },
        )


def _pace(body: dict[str, Any], field: str, default: int) -> int:
    value = body.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_PACE:
        raise HTTPException(
            422,
            {"error": f"{field}: an integer 1-{MAX_PACE}", "group": None, "field": field},
        )
    return value


def _profile_groups(protocol: str, groups: Any) -> dict[str, dict[str, Any]]:
    """A profile's groups, validated as for a device of ``protocol`` (whole groups:
    there is no device to complete a partial one from); 422 otherwise."""
    if not isinstance(groups, dict) or not groups:
        raise HTTPException(
            422, {"error": "no parameter group given", "group": None, "field": "groups"}
        )
    prepared: dict[str, dict[str, Any]] = {}
    for group, values in groups.items():
        try:
            prepared[group] = prepare(protocol, ANY_DEVICE[protocol], group, values, None)
        except ParamsError as exc:
            raise HTTPException(422, _params_error(exc)) from None
    return prepared


def _selector_error(message: str) -> HTTPException:
    return HTTPException(422, {"error": f"selector: {message}", "field": "selector"})


async def _select(conn: Connection, selector: Any, protocol: str) -> list[str]:
    """The ``protocol`` device ids ``selector`` names; 422 unless it names at least one."""
    try:
        return await select_devices(conn, parse_selector(selector), protocol)
    except SelectorError as exc:
        raise _selector_error(str(exc)) from None


def _job_head(job: asyncpg.Record) -> dict[str, Any]:
    return {
        "job_id": job["job_id"],
        "profile": job["profile"],
        "profile_version": job["profile_version"],
        "protocol": job["protocol"],
        "selector": _json(job["selector"]),
        "rate_per_min": job["rate_per_min"],
        "concurrency": job["concurrency"],
        "created_at": _time(job["created_at"]),
        "finished_at": _time(job["finished_at"]),
    }


async def _job(conn: Connection, job_id: int) -> dict[str, Any]:
    """The job with each device's progress derived from ``device_params`` (and stored)."""
    job = await conn.fetchrow("SELECT * FROM param_jobs WHERE job_id = $1", job_id)
    if job is None:
        raise HTTPException(404, f"parameter job {job_id} not found")
    members = await conn.fetch(
        "SELECT * FROM param_job_devices WHERE job_id = $1 ORDER BY device_id", job_id
    )
    started = [m["device_id"] for m in members if m["started_at"] is not None]
    await fail_dead_commands(conn, started)
    params = await conn.fetch(
        """SELECT p.* FROM device_params p JOIN param_job_devices j USING (device_id)
           WHERE j.job_id = $1 AND j.started_at IS NOT NULL""",
        job_id,
    )
    by_device: dict[str, dict[str, Any]] = {}
    for p in params:
        by_device.setdefault(p["device_id"], {})[p["group"]] = p
    job_groups: dict[str, Any] = _json(job["groups"])
    counts = dict.fromkeys(JOB_STATUSES, 0)
    devices = []
    for m in members:
        device: dict[str, Any] = {"device_id": m["device_id"]}
        if m["started_at"] is None:  # queued, or refused before anything was sent
            status = m["status"]
            if m["failure_reason"]:
                device["failure_reason"] = m["failure_reason"]
        else:
            groups: dict[str, Any] = {}
            for group in job_groups:
                p = by_device.get(m["device_id"], {}).get(group)
                if p is None or p["job_id"] != job_id:
                    groups[group] = {"status": "superseded"}
                    continue
                groups[group] = {"status": p["status"]}
                if p["failure_reason"]:
                    groups[group]["failure_reason"] = p["failure_reason"]
                diff = _json(p["diff"])
                if diff:
                    groups[group]["diff"] = masked(diff)
            statuses = {g["status"] for g in groups.values()}
            status = next((s for s in _PRECEDENCE if s in statuses), "verified")
            device["groups"] = groups
            if status != m["status"]:
                await conn.execute(
                    """UPDATE param_job_devices SET status = $3
                       WHERE job_id = $1 AND device_id = $2""",
                    job_id,
                    m["device_id"],
                    status,
                )
        device["status"] = status
        device["started_at"] = _time(m["started_at"])
        counts[status] += 1
        devices.append(device)
    done = counts["queued"] == counts["pending"] == counts["applying"] == 0
    return {
        **_job_head(job),
        "groups": _masked_groups(job["groups"]),
        "state": "done" if done else "running",
        "total": len(devices),
        "counts": counts,
        "devices": devices,
    }


def _profile(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "name": row["name"],
        "protocol": row["protocol"],
        "version": row["version"],
        "groups": _masked_groups(row["groups"]),
        "created_at": _time(row["created_at"]),
        "updated_at": _time(row["updated_at"]),
    }


def _masked_groups(raw: Any) -> dict[str, Any]:
    return {g: masked(v) for g, v in _json(raw).items()}


def _params_error(exc: ParamsError) -> dict[str, Any]:
    return {"error": str(exc), "group": exc.group, "field": exc.field}


def _json(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw


def _time(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
