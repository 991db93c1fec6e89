"""The firmware API: the image store and upgrade jobs (docs/firmware.md).

Images are uploaded as the raw request body (``application/octet-stream``) with their
metadata as query parameters: one request, no multipart parser needed, and the bytes
go to the database as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg
from fastapi import APIRouter, HTTPException, Request, Response

from chargegw.domain.device_selector import SelectorError, parse_selector
from chargegw.domain.firmware import (
    FAMILIES,
    ConflictError,
    FirmwareError,
    NotFoundError,
    cancel_job,
    create_job,
    delete_image,
    engine_for,
    job_view,
    store_image,
    validate_image,
)

if TYPE_CHECKING:
    from chargegw.app import Gateway


def make_firmware_router(gateway: Gateway) -> APIRouter:
    """The firmware and upgrade-job endpoints of ``gateway`` (starts its upgrade engine)."""
    router = APIRouter(prefix="/api/v1", tags=["firmware"])
    engine = engine_for(gateway)

    def pool() -> asyncpg.Pool:
        if gateway.pool is None:
            raise HTTPException(503, "database unavailable")
        return gateway.pool

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
        protocol: str | None = None,
        family: str | None = None,
        device_type: str | None = None,
        version: str | None = None,
        packet_size: int | None = None,
        ftp_host: str | None = None,
        ftp_port: int | None = None,
        file_name: str | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        limit = gateway.settings.firmware_max_bytes
        for name, value in (("protocol", protocol), ("family", family), ("version", version)):
            if not value:
                raise _unprocessable(f"{name} is required", name)
        assert protocol is not None and family is not None and version is not None
        if device_type is None:  # a BKV OTA's target: the gateway (the only one documented)
            device_type = "1" if protocol == "bkv" else ""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _unprocessable(f"the image is larger than {limit} bytes", "body")
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
            raise _unprocessable(str(exc), exc.field) from None
        async with pool().acquire() as conn, conn.transaction():
            row = await store_image(conn, spec, bytes(body))
        return _image(row)

    @router.get("/firmware", summary="Firmware images in the store")
    async def list_images() -> dict[str, Any]:
        rows = await pool().fetch(
            "SELECT * FROM firmware_images WHERE deleted_at IS NULL ORDER BY firmware_id"
        )
        return {"items": [_image(r) for r in rows]}

    @router.get("/firmware/{firmware_id}", summary="One firmware image's metadata")
    async def get_image(firmware_id: int) -> dict[str, Any]:
        row = await pool().fetchrow(
            "SELECT * FROM firmware_images WHERE firmware_id = $1 AND deleted_at IS NULL",
            firmware_id,
        )
        if row is None:
            raise HTTPException(404, f"firmware {firmware_id} not found")
        return _image(row)

    @router.delete(
        "/firmware/{firmware_id}",
        status_code=204,
        summary="Delete an image (refused while an upgrade job uses it)",
    )
    async def remove_image(firmware_id: int) -> Response:
        async with pool().acquire() as conn, conn.transaction():
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
    )
    async def create(body: dict[str, Any]) -> dict[str, Any]:
        firmware_id = body.get("firmware_id")
        if not _integer(firmware_id, 1):
            raise _unprocessable("firmware_id must be the id of an uploaded image", "firmware_id")
        assert isinstance(firmware_id, int)
        concurrency = body.get("concurrency", 10)
        if not _integer(concurrency, 1):
            raise _unprocessable("concurrency must be an integer of at least 1", "concurrency")
        rate = body.get("rate_per_min", 60)
        if not _integer(rate, 1):
            raise _unprocessable("rate_per_min must be an integer of at least 1", "rate_per_min")
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise _unprocessable("force must be true or false", "force")
        unknown = sorted(set(body) - _JOB_FIELDS)
        if unknown:
            raise _unprocessable(f"unknown field {unknown[0]!r}", unknown[0])
        raw_selector = body.get("selector")
        async with pool().acquire() as conn, conn.transaction():
            try:
                selector = parse_selector(raw_selector)
                job_id = await create_job(
                    conn,
                    firmware_id=firmware_id,
                    selector_raw=raw_selector,
                    selector=selector,
                    concurrency=concurrency,
                    rate_per_min=rate,
                    force=force,
                )
            except SelectorError as exc:
                raise _unprocessable(f"selector: {exc}", "selector") from None
            except FirmwareError as exc:
                raise _unprocessable(str(exc), exc.field) from None
            except ConflictError as exc:
                raise HTTPException(409, str(exc)) from None
            job = await job_view(conn, job_id)
        engine.kick()
        return job

    @router.get("/upgrade-jobs", summary="Upgrade jobs, newest first, with their counts")
    async def list_jobs(limit: int = 50) -> dict[str, Any]:
        items = []
        async with pool().acquire() as conn:
            for r in await conn.fetch(
                "SELECT job_id FROM upgrade_jobs ORDER BY job_id DESC LIMIT $1",
                max(1, min(limit, 500)),
            ):
                view = await job_view(conn, r["job_id"])
                view.pop("devices")
                items.append(view)
        return {"items": items}

    @router.get(
        "/upgrade-jobs/{job_id}",
        summary="An upgrade job: per-device state (queued, transferring n/m, rebooting,"
        " verified, failed with the reason)",
    )
    async def get_job(job_id: int) -> dict[str, Any]:
        async with pool().acquire() as conn:
            try:
                return await job_view(conn, job_id)
            except NotFoundError as exc:
                raise HTTPException(404, str(exc)) from None

    @router.post(
        "/upgrade-jobs/{job_id}/cancel",
        summary="Cancel a job: queued and transferring devices stop",
    )
    async def cancel(job_id: int) -> dict[str, Any]:
        async with pool().acquire() as conn, conn.transaction():
            try:
                await cancel_job(conn, job_id)
            except NotFoundError as exc:
                raise HTTPException(404, str(exc)) from None
            except ConflictError as exc:
                raise HTTPException(409, str(exc)) from None
            job = await job_view(conn, job_id)
        engine.kick()
        return job

    return router


_JOB_FIELDS = frozenset({"firmware_id", "selector", "concurrency", "rate_per_min", "force"})


def _integer(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _unprocessable(message: str, field: str | None) -> HTTPException:
    return HTTPException(422, {"error": message, "field": field})


def _image(row: asyncpg.Record) -> dict[str, Any]:
    family = FAMILIES[row["family"]]
    out: dict[str, Any] = {
        "firmware_id": row["firmware_id"],
        "protocol": row["protocol"],
        "family": row["family"],
        "target": family.target,
        "device_type": row["device_type"],
        "version": row["version"],
        "size_bytes": row["size_bytes"],
        "sha256": row["sha256"],
        "note": row["note"],
        "created_at": row["created_at"].isoformat().replace("+00:00", "Z"),
    }
    if row["protocol"] == "ap3000":
        out.update(
            packet_size=row["packet_size"],
            total_packets=row["total_packets"],
            check_packet=family.check_packet,
            image_checksum=row["image_checksum"],
        )
    else:
        out.update(ftp_host=row["ftp_host"], ftp_port=row["ftp_port"], file_name=row["file_name"])
    return out


__all__ = ["make_firmware_router"]
