"""The parameter API's repository: a device's groups, profiles (versioned) and the jobs
that apply them, as typed views (the verification engine is :mod:`chargegw.domain.params`).

Secret fields (card keys) leave masked.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from chargegw.domain.device_selector import parse_selector, select_devices
from chargegw.domain.params import fail_dead_commands, masked
from chargegw.domain.refusals import ConflictError, NotFoundError
from chargegw.store.database import Connection

#: a device's job status from its groups' statuses: the first that any group has
_PRECEDENCE = ("failed", "mismatch", "superseded", "applying", "pending", "acknowledged")
#: a device's status in a profile job
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


def _json(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw


def _masked_groups(raw: Any) -> dict[str, Any]:
    return {g: masked(v) for g, v in (_json(raw) or {}).items()}


class _Sparse(BaseModel):
    """A view whose optional keys in ``_OMITTED`` are left out while they are None."""

    _OMITTED: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if not (k in self._OMITTED and v is None)}


class GroupState(BaseModel):
    """A parameter group of a device: desired and reported values and how they compare."""

    status: str | None = Field(
        description="pending, applying, verified, acknowledged, mismatch or failed"
    )
    desired: dict[str, Any] | None
    reported: dict[str, Any] | None
    diff: dict[str, Any] | None = Field(description="field -> desired and reported values")
    desired_at: dt.datetime | None
    reported_at: dt.datetime | None
    acknowledged_at: dt.datetime | None
    verified_at: dt.datetime | None
    checked_at: dt.datetime | None
    failure_reason: str | None
    set_command_id: int | None
    read_command_id: int | None
    job_id: int | None = Field(description="the profile job that set it, if one did")


class DeviceParams(BaseModel):
    """A device's parameter groups by name."""

    device_id: str
    groups: dict[str, GroupState]


class Profile(BaseModel):
    """A parameter profile: a named, validated set of groups, versioned."""

    name: str
    protocol: Literal["ap3000", "bkv"]
    version: int
    groups: dict[str, dict[str, Any]]
    created_at: dt.datetime
    updated_at: dt.datetime = Field(description="when this version was made")


class JobGroup(_Sparse):
    """A group of a device in a profile job."""

    _OMITTED = frozenset({"failure_reason", "diff"})

    status: str
    failure_reason: str | None = None
    diff: dict[str, Any] | None = None


class JobDevice(_Sparse):
    """A device of a profile job: its status, and its groups once it started."""

    _OMITTED = frozenset({"failure_reason", "groups"})

    device_id: str
    status: str = Field(description=", ".join(JOB_STATUSES))
    started_at: dt.datetime | None
    failure_reason: str | None = Field(None, description="why it was refused before starting")
    groups: dict[str, JobGroup] | None = None


class ParamJobSummary(BaseModel):
    """A profile job: which version of which profile, to which devices, how fast."""

    job_id: int
    profile: str
    profile_version: int
    protocol: str
    selector: dict[str, Any]
    rate_per_min: int
    concurrency: int
    created_at: dt.datetime
    finished_at: dt.datetime | None


class ParamJob(ParamJobSummary):
    """A profile job with each device's progress and the counts per status."""

    groups: dict[str, dict[str, Any]]
    state: Literal["running", "done"]
    total: int
    counts: dict[str, int]
    devices: list[JobDevice]


def _summary(job: Any) -> dict[str, Any]:
    return {
        "job_id": job["job_id"],
        "profile": job["profile"],
        "profile_version": job["profile_version"],
        "protocol": job["protocol"],
        "selector": _json(job["selector"]),
        "rate_per_min": job["rate_per_min"],
        "concurrency": job["concurrency"],
        "created_at": job["created_at"],
        "finished_at": job["finished_at"],
    }


def _profile(row: Any) -> Profile:
    return Profile(
        name=row["name"],
        protocol=row["protocol"],
        version=row["version"],
        groups=_masked_groups(row["groups"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


# --- a device's groups -------------------------------------------------------------------


async def device_params(conn: Connection, device_id: str) -> DeviceParams | None:
    """A device's groups (a set or read-back that died leaves its group failed first);
    None for an unknown device. Inside the caller's transaction."""
    if not await conn.fetchval("SELECT 1 FROM devices WHERE device_id = $1", device_id):
        return None
    await fail_dead_commands(conn, [device_id])
    rows = await conn.fetch(
        """SELECT "group", status, desired, reported, diff, desired_at, reported_at,
                  acknowledged_at, verified_at, checked_at, failure_reason, set_command_id,
                  read_command_id, job_id
           FROM device_params WHERE device_id = $1 ORDER BY "group" """,
        device_id,
    )
    groups = {
        r["group"]: GroupState(
            status=r["status"],
            desired=masked(_json(r["desired"])),
            reported=masked(_json(r["reported"])),
            diff=masked(_json(r["diff"])),
            desired_at=r["desired_at"],
            reported_at=r["reported_at"],
            acknowledged_at=r["acknowledged_at"],
            verified_at=r["verified_at"],
            checked_at=r["checked_at"],
            failure_reason=r["failure_reason"],
            set_command_id=r["set_command_id"],
            read_command_id=r["read_command_id"],
            job_id=r["job_id"],
        )
        for r in rows
    }
    return DeviceParams(device_id=device_id, groups=groups)


# --- profiles ----------------------------------------------------------------------------

_PROFILE_COLUMNS = "name, protocol, version, groups, created_at, updated_at"


async def create_profile(
    conn: Connection, name: str, protocol: str, groups: dict[str, dict[str, Any]]
) -> Profile:
    """Store a profile's first version (inside the caller's transaction);
    ``ConflictError`` when one of that name exists."""
    row = await conn.fetchrow(
        f"""INSERT INTO param_profiles (name, protocol, groups) VALUES ($1, $2, $3)
            ON CONFLICT (name) DO NOTHING RETURNING {_PROFILE_COLUMNS}""",
        name,
        protocol,
        json.dumps(groups),
    )
    if row is None:
        raise ConflictError(f"parameter profile {name} exists")
    await conn.execute(
        """INSERT INTO param_profile_versions (name, version, groups, created_at)
           VALUES ($1, 1, $2, $3)""",
        name,
        json.dumps(groups),
        row["created_at"],
    )
    return _profile(row)


async def lock_profile(conn: Connection, name: str) -> str:
    """Lock a profile for a new version (inside the caller's transaction); its protocol.
    ``NotFoundError`` if there is none."""
    protocol = await conn.fetchval(
        "SELECT protocol FROM param_profiles WHERE name = $1 FOR UPDATE", name
    )
    if protocol is None:
        raise NotFoundError(f"parameter profile {name} not found")
    return str(protocol)


async def add_version(conn: Connection, name: str, groups: dict[str, dict[str, Any]]) -> Profile:
    """A locked profile's next version (:func:`lock_profile`): jobs keep the one they
    applied."""
    row = await conn.fetchrow(
        f"""UPDATE param_profiles SET groups = $2, version = version + 1, updated_at = now()
            WHERE name = $1 RETURNING {_PROFILE_COLUMNS}""",
        name,
        json.dumps(groups),
    )
    assert row is not None
    await conn.execute(
        """INSERT INTO param_profile_versions (name, version, groups, created_at)
           VALUES ($1, $2, $3, $4)""",
        name,
        row["version"],
        json.dumps(groups),
        row["updated_at"],
    )
    return _profile(row)


async def list_profiles(conn: Connection) -> list[Profile]:
    """Every profile's current version, by name."""
    rows = await conn.fetch(f"SELECT {_PROFILE_COLUMNS} FROM param_profiles ORDER BY name")
    return [_profile(r) for r in rows]


async def get_profile(conn: Connection, name: str, version: int | None = None) -> Profile:
    """A profile, at ``version`` if given (its ``updated_at``: when that version was
    made); ``NotFoundError`` naming what is missing."""
    row = await conn.fetchrow(
        f"SELECT {_PROFILE_COLUMNS} FROM param_profiles WHERE name = $1", name
    )
    if row is None:
        raise NotFoundError(f"parameter profile {name} not found")
    profile = _profile(row)
    if version is None or version == profile.version:
        return profile
    old = await conn.fetchrow(
        """SELECT groups, created_at FROM param_profile_versions
           WHERE name = $1 AND version = $2""",
        name,
        version,
    )
    if old is None:
        raise NotFoundError(f"parameter profile {name} has no version {version}")
    return profile.model_copy(
        update={
            "version": version,
            "groups": _masked_groups(old["groups"]),
            "updated_at": old["created_at"],
        }
    )


# --- jobs --------------------------------------------------------------------------------


async def create_job(
    conn: Connection, profile_name: str, selector: Any, *, rate_per_min: int, concurrency: int
) -> int:
    """A job applying the profile's current version to the devices ``selector`` names,
    all queued (inside the caller's transaction); its id. ``NotFoundError`` without the
    profile; ``SelectorError`` unless the selector names devices of its protocol."""
    profile = await conn.fetchrow(
        "SELECT protocol, version, groups FROM param_profiles WHERE name = $1", profile_name
    )
    if profile is None:
        raise NotFoundError(f"parameter profile {profile_name} not found")
    device_ids = await select_devices(conn, parse_selector(selector), profile["protocol"])
    job_id: int = await conn.fetchval(
        """INSERT INTO param_jobs (profile, profile_version, protocol, groups, selector,
                                   rate_per_min, concurrency)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING job_id""",
        profile_name,
        profile["version"],
        profile["protocol"],
        profile["groups"],
        json.dumps(selector),
        rate_per_min,
        concurrency,
    )
    await conn.execute(
        """INSERT INTO param_job_devices (job_id, device_id, status)
           SELECT $1, d, 'queued' FROM unnest($2::text[]) AS d""",
        job_id,
        device_ids,
    )
    return job_id


_JOB_COLUMNS = """job_id, profile, profile_version, protocol, groups, selector, rate_per_min,
    concurrency, created_at, finished_at"""


async def recent_jobs(conn: Connection, limit: int) -> list[ParamJobSummary]:
    """The newest ``limit`` jobs, newest first, without their devices."""
    rows = await conn.fetch(
        f"SELECT {_JOB_COLUMNS} FROM param_jobs ORDER BY job_id DESC LIMIT $1", limit
    )
    return [ParamJobSummary(**_summary(r)) for r in rows]


async def job(conn: Connection, job_id: int) -> ParamJob | None:
    """The job with each device's progress derived from ``device_params`` (and stored
    as the device's job status); None if there is none. Inside the caller's transaction."""
    row = await conn.fetchrow(f"SELECT {_JOB_COLUMNS} FROM param_jobs WHERE job_id = $1", job_id)
    if row is None:
        return None
    members = await conn.fetch(
        """SELECT device_id, status, started_at, failure_reason FROM param_job_devices
           WHERE job_id = $1 ORDER BY device_id""",
        job_id,
    )
    started = [m["device_id"] for m in members if m["started_at"] is not None]
    await fail_dead_commands(conn, started)
    params = await conn.fetch(
        """SELECT p.device_id, p."group", p.status, p.failure_reason, p.diff, p.job_id
           FROM device_params p JOIN param_job_devices j USING (device_id)
           WHERE j.job_id = $1 AND j.started_at IS NOT NULL""",
        job_id,
    )
    by_device: dict[str, dict[str, Any]] = {}
    for p in params:
        by_device.setdefault(p["device_id"], {})[p["group"]] = p
    job_groups: dict[str, Any] = _json(row["groups"])
    counts = dict.fromkeys(JOB_STATUSES, 0)
    devices = []
    for m in members:
        groups: dict[str, JobGroup] | None = None
        failure = None
        if m["started_at"] is None:  # queued, or refused before anything was sent
            status = m["status"]
            failure = m["failure_reason"] or None
        else:
            groups = {}
            for group in job_groups:
                p = by_device.get(m["device_id"], {}).get(group)
                if p is None or p["job_id"] != job_id:
                    groups[group] = JobGroup(status="superseded")
                    continue
                diff = _json(p["diff"])
                groups[group] = JobGroup(
                    status=p["status"],
                    failure_reason=p["failure_reason"] or None,
                    diff=masked(diff) if diff else None,
                )
            statuses = {g.status for g in groups.values()}
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
        devices.append(
            JobDevice(
                device_id=m["device_id"],
                status=status,
                started_at=m["started_at"],
                failure_reason=failure,
                groups=groups,
            )
        )
    done = counts["queued"] == counts["pending"] == counts["applying"] == 0
    return ParamJob(
        **_summary(row),
        groups=_masked_groups(row["groups"]),
        state="done" if done else "running",
        total=len(devices),
        counts=counts,
        devices=devices,
    )
