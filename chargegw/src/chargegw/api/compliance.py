"""Protocol compliance per firmware: ``GET /api/v1/compliance`` and per device.

The counts and the score are :mod:`chargegw.domain.compliance`'s (docs/compliance.md).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel

from chargegw.api.deps import Pool
from chargegw.api.errors import error_responses
from chargegw.domain import compliance
from chargegw.domain.compliance import DeviceCompliance, FirmwareCompliance

__all__ = ["router"]

#: waiting for a pooled connection longer than this means the database is unavailable
ACQUIRE_TIMEOUT_S = 5.0


class ComplianceReport(BaseModel):
    """Every (protocol, device type, firmware) counted, lowest score first."""

    items: list[FirmwareCompliance]


router = APIRouter(prefix="/api/v1", tags=["compliance"])


@router.get("/compliance", summary="Protocol compliance per firmware")
async def firmware_compliance(
    pool: Pool,
    *,
    protocol: Annotated[
        str | None, Query(max_length=16, description="one protocol (`ap3000`, `bkv`)")
    ] = None,
    firmware: Annotated[
        str | None, Query(max_length=64, description="one firmware version (`312`)")
    ] = None,
    device_id: Annotated[
        str | None, Query(max_length=64, description="only what this device showed")
    ] = None,
    top: Annotated[
        int, Query(ge=1, le=len(compliance.Kind), description="deviation kinds listed per entry")
    ] = compliance.TOP,
) -> ComplianceReport:
    """Per (protocol, device type, firmware): the devices and frames counted, the
    score (100 minus the weighted deviations per 1,000 frames, at least 0) and the
    heaviest deviations with example frames. Counts reach the database every
    ``compliance_flush_s``."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        items = await compliance.report(
            conn, protocol=protocol, firmware=firmware, device_id=device_id, top=top
        )
    return ComplianceReport(items=items)


@router.get(
    "/compliance/devices/{device_id}",
    summary="Protocol compliance of one device",
    responses=error_responses((404, "Nothing was counted for this device")),
)
async def device_compliance(
    pool: Pool,
    device_id: Annotated[str, Path(max_length=64)],
) -> DeviceCompliance:
    """The device's counts per firmware it was counted under, every deviation kind."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        found = await compliance.device_report(conn, device_id)
    if found is None:
        raise HTTPException(404, f"nothing was counted for device {device_id}")
    return found
