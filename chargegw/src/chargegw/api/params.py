"""The parameter API: desired AP3000 and BKV parameters, applied and verified by
read-back; profiles (versioned) and the paced jobs that apply them.

Group bodies are the models :mod:`.param_models` generates from the groups' tables;
:func:`chargegw.domain.params.prepare` checks them, a 422 naming ``group`` and ``field``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from chargegw.api import errors
from chargegw.api.deps import Pool, Services, refused
from chargegw.api.errors import api_error, error_responses
from chargegw.api.param_models import ParamGroups, groups_of
from chargegw.api.selectors import SelectorBody
from chargegw.domain import params_store
from chargegw.domain.device_selector import SelectorError
from chargegw.domain.params import (
    ANY_DEVICE,
    GROUPS,
    DeviceNotFoundError,
    ParamsError,
    UnsupportedDeviceError,
    apply,
    masked,
    prepare,
)
from chargegw.domain.params_store import DeviceParams, ParamJob, ParamJobSummary, Profile
from chargegw.domain.refusals import RequestError

__all__ = ["router"]

#: defaults of a profile job's pace (as firmware upgrade jobs)
DEFAULT_RATE_PER_MIN = 60
DEFAULT_CONCURRENCY = 10
#: largest rate and concurrency accepted
MAX_PACE = 100_000
#: most jobs one list answers
MAX_JOBS = 1000

PROFILE_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
#: versions are ``integer`` columns
INT32_MAX = 2**31 - 1


class ProfileCreate(BaseModel):
    """A parameter profile: a named set of whole groups, validated for the protocol."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=PROFILE_NAME_PATTERN, description="1-64 of A-Z a-z 0-9 . _ -")
    protocol: Literal["ap3000", "bkv"] = "ap3000"
    groups: ParamGroups = Field(description="whole groups: there is no device to complete them")


class ProfileUpdate(BaseModel):
    """A profile's new groups (a new version); the protocol cannot change."""

    model_config = ConfigDict(extra="forbid")

    protocol: Literal["ap3000", "bkv"] | None = Field(
        None, description="if given, the profile's own"
    )
    groups: ParamGroups


class ProfileApply(BaseModel):
    """Apply a profile to the devices a selector names, paced."""

    model_config = ConfigDict(extra="forbid")

    selector: SelectorBody
    rate_per_min: int = Field(
        DEFAULT_RATE_PER_MIN, ge=1, le=MAX_PACE, description="devices started in any 60 s"
    )
    concurrency: int = Field(
        DEFAULT_CONCURRENCY, ge=1, le=MAX_PACE, description="devices in progress at a time"
    )


class GroupAccepted(BaseModel):
    """A group queued: its set command and read-back."""

    status: Literal["pending"] = "pending"
    desired: dict[str, Any] = Field(description="as the device will hold them (secrets masked)")
    set_command_id: int
    read_command_id: int | None = Field(description="none for groups without a read-back")


class ParamsAccepted(BaseModel):
    """Groups queued for a device; follow them with ``GET .../params``."""

    device_id: str
    groups: dict[str, GroupAccepted]


class ProfileList(BaseModel):
    """Every profile's current version, by name."""

    items: list[Profile]


class JobList(BaseModel):
    """Profile jobs, newest first, without their devices."""

    items: list[ParamJobSummary]


class _ParamsRoute(APIRoute):
    """A route of the parameter API: its validation errors name the ``group`` too (null
    unless the error is inside a group), as every 422 of this API does."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                response = await errors.validation_exception_handler(request, exc)
                body = json.loads(bytes(response.body))
                body["error"].setdefault("group", _group_of(exc))
                return errors.error_response(response.status_code, body)

        return route


def _group_of(exc: RequestValidationError) -> str | None:
    """The parameter group the first error is inside, if any."""
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        if loc[:1] != ["body"]:
            continue
        if len(loc) > 1 and loc[1] in GROUPS:
            return loc[1]
        if len(loc) > 2 and loc[1] == "groups":
            return loc[2]
    return None


router = APIRouter(prefix="/api/v1", tags=["parameters"], route_class=_ParamsRoute)

_PROFILE_NOT_FOUND = (404, "No such profile")


def _params_error(exc: ParamsError) -> HTTPException:
    return api_error(422, str(exc), field=exc.field, group=exc.group)


def _profile_groups(protocol: str, body: BaseModel) -> dict[str, dict[str, Any]]:
    """A profile's groups, validated as for a device of ``protocol`` (whole groups:
    there is no device to complete a partial one from); 422 otherwise."""
    groups = groups_of(body)
    if not groups:
        raise api_error(422, "no parameter group given", field="groups", group=None)
    prepared: dict[str, dict[str, Any]] = {}
    for group, values in groups.items():
        try:
            prepared[group] = prepare(protocol, ANY_DEVICE[protocol], group, values, None)
        except ParamsError as exc:
            raise _params_error(exc) from None
    return prepared


@router.put(
    "/devices/{device_id}/params",
    status_code=202,
    summary="Set parameter groups; each is verified by reading it back",
    responses=error_responses((404, "No such device")),
)
async def put_params(
    pool: Pool, services: Services, device_id: str, body: ParamGroups
) -> ParamsAccepted:
    """Everything is validated before anything is queued: a 422 names the group and
    the field. Fields not given keep their last desired or reported value."""
    groups = groups_of(body)
    if not groups:
        raise api_error(422, "no parameter group given", field=None, group=None)
    async with pool.acquire() as conn, conn.transaction():
        try:
            applied = await apply(
                services.outbox,
                conn,
                device_id,
                groups,
                expires_s=services.command_expiry_s,
            )
        except DeviceNotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        except UnsupportedDeviceError as exc:
            raise api_error(422, str(exc), field=None, group=None) from None
        except ParamsError as exc:
            raise _params_error(exc) from None
    services.outbox.wake(device_id)
    return ParamsAccepted(
        device_id=device_id,
        groups={
            name: GroupAccepted(
                desired=masked(a["desired"]),
                set_command_id=a["set_command_id"],
                read_command_id=a["read_command_id"],
            )
            for name, a in applied.items()
        },
    )


@router.get(
    "/devices/{device_id}/params",
    summary="Desired and reported parameters, verification state and diff per group",
    responses=error_responses((404, "No such device")),
)
async def get_params(pool: Pool, device_id: str) -> DeviceParams:
    """A queued set or read-back that failed or died leaves its group failed."""
    async with pool.acquire() as conn, conn.transaction():
        found = await params_store.device_params(conn, device_id)
    if found is None:
        raise HTTPException(404, f"device {device_id} not found")
    return found


@router.post(
    "/param-profiles",
    status_code=201,
    summary="Create a parameter profile: a named, validated set of parameter groups",
    responses=error_responses((409, "A profile of that name exists")),
)
async def create_profile(pool: Pool, body: ProfileCreate) -> Profile:
    """Version 1 of the profile."""
    prepared = _profile_groups(body.protocol, body.groups)
    try:
        async with pool.acquire() as conn, conn.transaction():
            return await params_store.create_profile(conn, body.name, body.protocol, prepared)
    except RequestError as exc:
        raise refused(exc) from None


@router.put(
    "/param-profiles/{name}",
    summary="Change a profile's groups: a new version (jobs keep the one they applied)",
    responses=error_responses(_PROFILE_NOT_FOUND),
)
async def update_profile(pool: Pool, name: str, body: ProfileUpdate) -> Profile:
    """The protocol stays the profile's: create another profile for another one."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            protocol = await params_store.lock_profile(conn, name)
            if body.protocol is not None and body.protocol != protocol:
                raise api_error(
                    422,
                    f"protocol: the profile is for {protocol} devices;"
                    " create another profile for another protocol",
                    field="protocol",
                    group=None,
                )
            prepared = _profile_groups(protocol, body.groups)
            return await params_store.add_version(conn, name, prepared)
    except RequestError as exc:
        raise refused(exc) from None


@router.get("/param-profiles", summary="Parameter profiles (their current versions)")
async def list_profiles(pool: Pool) -> ProfileList:
    """By name."""
    async with pool.acquire() as conn:
        return ProfileList(items=await params_store.list_profiles(conn))


@router.get(
    "/param-profiles/{name}",
    summary="One parameter profile; ?version=n for an earlier version",
    responses=error_responses((404, "No such profile or version")),
)
async def get_profile(
    pool: Pool,
    name: str,
    version: Annotated[
        int | None, Query(ge=0, le=INT32_MAX, description="an earlier version")
    ] = None,
) -> Profile:
    """The current version unless ``version`` is given."""
    try:
        async with pool.acquire() as conn:
            return await params_store.get_profile(conn, name, version)
    except RequestError as exc:
        raise refused(exc) from None


@router.post(
    "/param-profiles/{name}/apply",
    status_code=202,
    summary="Apply a profile to the devices a selector names, paced; answers the job",
    responses=error_responses(_PROFILE_NOT_FOUND),
)
async def apply_profile(pool: Pool, services: Services, name: str, body: ProfileApply) -> ParamJob:
    """At most ``rate_per_min`` devices start in any 60 s and at most ``concurrency``
    are in progress at a time."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            job_id = await params_store.create_job(
                conn,
                name,
                body.selector,
                rate_per_min=body.rate_per_min,
                concurrency=body.concurrency,
            )
            woken = await services.start_param_job(conn, job_id)
            job = await params_store.job(conn, job_id)
    except SelectorError as exc:
        raise api_error(422, f"selector: {exc}", field="selector") from None
    except RequestError as exc:
        raise refused(exc) from None
    assert job is not None
    for device_id in woken:
        services.outbox.wake(device_id)
    services.kick_params()
    return job


@router.get("/param-jobs", summary="Profile jobs, newest first (without devices)")
async def list_jobs(
    pool: Pool,
    limit: Annotated[
        int, Query(description=f"jobs to list; values outside 1-{MAX_JOBS} are clamped")
    ] = 100,
) -> JobList:
    """``GET /param-jobs/{job_id}`` has each job's devices."""
    async with pool.acquire() as conn:
        items = await params_store.recent_jobs(conn, max(1, min(limit, MAX_JOBS)))
    return JobList(items=items)


@router.get(
    "/param-jobs/{job_id}",
    summary="A profile apply job: per-device progress and counts",
    responses=error_responses((404, "No such job")),
)
async def get_job(pool: Pool, job_id: int) -> ParamJob:
    """Each device's status is derived from its groups' (and stored)."""
    async with pool.acquire() as conn, conn.transaction():
        found = await params_store.job(conn, job_id)
    if found is None:
        raise HTTPException(404, f"parameter job {job_id} not found")
    return found
