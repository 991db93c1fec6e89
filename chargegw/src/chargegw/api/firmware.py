"""The firmware API: the image store and upgrade jobs (docs/firmware.md).

Images are uploaded as the raw request body (``application/octet-stream``) with their
metadata as query parameters: one request, no multipart parser needed, and the bytes
go to the database as they are.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from chargegw.api.deps import Pool, Services
from chargegw.api.errors import api_error, error_responses
from chargegw.api.selectors import SelectorBody
from chargegw.domain import firmware_store
from chargegw.domain.device_selector import SelectorError, parse_selector
from chargegw.domain.firmware import (
    ConflictError,
    FirmwareError,
    NotFoundError,
    cancel_job,
    create_job,
    delete_image,
    store_image,
    validate_image,
)
from chargegw.domain.firmware_store import FirmwareImage, UpgradeJob, UpgradeJobSummary

__all__ = ["router"]

#: largest concurrency and rate of a job
MAX_PACE = 100_000
#: most jobs one list answers
MAX_JOBS = 500


class UpgradeJobCreate(BaseModel):
    """Upgrade the devices a selector names with an uploaded image, paced."""

    model_config = ConfigDict(extra="forbid")

    firmware_id: int = Field(ge=1, description="the id of an uploaded image")
    selector: SelectorBody
    concurrency: int = Field(10, ge=1, le=MAX_PACE, description="devices at a time")
    rate_per_min: int = Field(60, ge=1, le=MAX_PACE, description="devices started in any 60 s")
    force: bool = Field(False, description="upgrade devices that are charging too")


class ImageList(BaseModel):
    """The images in the store, oldest first."""

    items: list[FirmwareImage]


class JobList(BaseModel):
    """Upgrade jobs, newest first, without their devices."""

    items: list[UpgradeJobSummary]


router = APIRouter(prefix="/api/v1", tags=["firmware"])

_JOB_NOT_FOUND = (404, "No such upgrade job")


@router.post(
    "/firmware",
    status_code=201,
    summary="Upload a firmware image: raw body, metadata as query parameters",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def upload(
    request: Request,
    pool: Pool,
    services: Services,
    protocol: Annotated[Literal["ap3000", "bkv"], Query(description="ap3000 or bkv")],
    family: Annotated[
        str,
        Query(min_length=1, max_length=16, description="AP3000: 0xE0, 0xE1 ...; BKV: ota"),
    ],
    version: Annotated[
        str,
        Query(
            min_length=1,
            max_length=16,
            description="AP3000: the number the device reports (313 = V3.13); BKV: the "
            "gateway's version text",
        ),
    ],
    device_type: Annotated[
        str | None,
        Query(
            max_length=16,
            description="the device or host type code (39 or 0x27); BKV: the OTA target, 1",
        ),
    ] = None,
    packet_size: Annotated[int | None, Query(description="AP3000: checked, if given")] = None,
    ftp_host: Annotated[str | None, Query(max_length=64, description="BKV: IPv4")] = None,
    ftp_port: Annotated[int | None, Query(description="BKV: default 21")] = None,
    file_name: Annotated[str | None, Query(max_length=64, description="BKV")] = None,
    note: Annotated[str | None, Query(max_length=200)] = None,
) -> FirmwareImage:
    """The image is checked against the protocol reference (a 422 names the field);
    its size is at most ``firmware_max_bytes``."""
    limit = services.firmware_max_bytes
    if device_type is None:  # a BKV OTA's target: the gateway (the only one documented)
        device_type = "1" if protocol == "bkv" else ""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise api_error(422, f"the image is larger than {limit} bytes", field="body")
    try:
        spec = validate_image(
            protocol=protocol,
            family=family,
            device_type=device_type,
            version=version,
            packet_size=packet_size,
            body=bytes(body),
            max_bytes=limit,
            ftp_host=ftp_host,
            ftp_port=ftp_port,
            file_name=file_name,
            note=note,
        )
    except FirmwareError as exc:
        raise api_error(422, str(exc), field=exc.field) from None
    async with pool.acquire() as conn, conn.transaction():
        row = await store_image(conn, spec, bytes(body))
    return firmware_store.image_view(row)


@router.get("/firmware", summary="Firmware images in the store")
async def list_images(pool: Pool) -> ImageList:
    """Oldest first; deleted images are not listed."""
    async with pool.acquire() as conn:
        return ImageList(items=await firmware_store.list_images(conn))


@router.get(
    "/firmware/{firmware_id}",
    summary="One firmware image's metadata",
    responses=error_responses((404, "No such image")),
)
async def get_image(pool: Pool, firmware_id: int) -> FirmwareImage:
    """The bytes are not served back."""
    async with pool.acquire() as conn:
        image = await firmware_store.get_image(conn, firmware_id)
    if image is None:
        raise HTTPException(404, f"firmware {firmware_id} not found")
    return image


@router.delete(
    "/firmware/{firmware_id}",
    status_code=204,
    summary="Delete an image (refused while an upgrade job uses it)",
    response_class=Response,
    responses=error_responses((404, "No such image"), (409, "An upgrade job uses the image")),
)
async def remove_image(pool: Pool, firmware_id: int) -> Response:
    """The image's bytes go; its metadata stays for the jobs that used it."""
    async with pool.acquire() as conn, conn.transaction():
        try:
            await delete_image(conn, firmware_id)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        except ConflictError as exc:
            raise HTTPException(409, str(exc)) from None
    return Response(status_code=204)


@router.post(
    "/upgrade-jobs",
    status_code=202,
    summary="Upgrade the devices a selector names; answers the job",
    responses=error_responses((409, "A single named device is being upgraded already")),
)
async def create(pool: Pool, services: Services, body: UpgradeJobCreate) -> UpgradeJob:
    """Devices whose reported type does not fit the image, or that another upgrade is
    running on, are recorded ``failed`` with the reason; a single named device answers
    422 or 409 instead."""
    async with pool.acquire() as conn, conn.transaction():
        try:
            selector = parse_selector(body.selector)
            job_id = await create_job(
                conn,
                firmware_id=body.firmware_id,
                selector_raw=body.selector,
                selector=selector,
                concurrency=body.concurrency,
                rate_per_min=body.rate_per_min,
                force=body.force,
            )
        except SelectorError as exc:
            raise api_error(422, f"selector: {exc}", field="selector") from None
        except FirmwareError as exc:
            raise api_error(422, str(exc), field=exc.field) from None
        except ConflictError as exc:
            raise HTTPException(409, str(exc)) from None
        job = await firmware_store.job(conn, job_id)
    services.kick_firmware()
    return job


@router.get("/upgrade-jobs", summary="Upgrade jobs, newest first, with their counts")
async def list_jobs(
    pool: Pool,
    limit: Annotated[
        int, Query(description=f"jobs to list; values outside 1-{MAX_JOBS} are clamped")
    ] = 50,
) -> JobList:
    """Without the devices of each job (``GET /upgrade-jobs/{job_id}`` has them)."""
    async with pool.acquire() as conn:
        items = await firmware_store.recent_jobs(conn, max(1, min(limit, MAX_JOBS)))
    return JobList(items=items)


@router.get(
    "/upgrade-jobs/{job_id}",
    summary="An upgrade job: per-device state (queued, transferring n/m, rebooting,"
    " verified, failed with the reason)",
    responses=error_responses(_JOB_NOT_FOUND),
)
async def get_job(pool: Pool, job_id: int) -> UpgradeJob:
    """Every device's state and progress, and the counts per state."""
    async with pool.acquire() as conn:
        try:
            return await firmware_store.job(conn, job_id)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from None


@router.post(
    "/upgrade-jobs/{job_id}/cancel",
    summary="Cancel a job: queued and transferring devices stop",
    responses=error_responses(_JOB_NOT_FOUND, (409, "The job is finished")),
)
async def cancel(pool: Pool, services: Services, job_id: int) -> UpgradeJob:
    """Packets not sent yet are withdrawn; rebooting devices are still verified."""
    async with pool.acquire() as conn, conn.transaction():
        try:
            await cancel_job(conn, job_id)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        except ConflictError as exc:
            raise HTTPException(409, str(exc)) from None
        job = await firmware_store.job(conn, job_id)
    services.kick_firmware()
    return job
