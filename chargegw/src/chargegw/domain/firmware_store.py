"""The firmware API's repository: images in the store and upgrade jobs, as typed views
(the upgrade engine and its SQL are in :mod:`chargegw.domain.firmware`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import asyncpg
from pydantic import BaseModel, Field

from chargegw.domain import firmware
from chargegw.store.database import Connection


class _Image(BaseModel):
    firmware_id: int
    family: str = Field(description="AP3000: the upgrade command (0xE0 ...); BKV: ota")
    target: str = Field(description="what the family upgrades: device (a pile), host or gateway")
    device_type: int = Field(description="the device or host type code the image is for")
    version: str
    size_bytes: int
    sha256: str | None
    note: str | None
    created_at: dt.datetime


class Ap3000Image(_Image):
    """An AP3000 image, sent to the device in packets."""

    protocol: Literal["ap3000"]
    packet_size: int
    total_packets: int
    check_packet: bool = Field(description="the transfer ends with a check packet")
    image_checksum: int | None


class BkvImage(_Image):
    """A BKV OTA: the gateway downloads the file from the FTP server itself."""

    protocol: Literal["bkv"]
    ftp_host: str | None
    ftp_port: int | None
    file_name: str | None


FirmwareImage = Annotated[Ap3000Image | BkvImage, Field(discriminator="protocol")]


class JobFirmware(BaseModel):
    """The image an upgrade job installs."""

    firmware_id: int
    protocol: str
    family: str
    device_type: int
    version: str


class UpgradeTarget(BaseModel):
    """One device of an upgrade job."""

    device_id: str
    state: str = Field(description="queued, transferring, rebooting, verified, failed or cancelled")
    progress: str = Field(description="acknowledged/total packets", examples=["12/40"])
    acked_packets: int
    total_packets: int
    waiting: str | None = Field(description="what the transfer waits for, if anything")
    failure_reason: str | None
    previous_version: str | None
    reported_version: str | None
    restarts: int
    started_at: dt.datetime | None
    transferred_at: dt.datetime | None
    finished_at: dt.datetime | None


class UpgradeJobSummary(BaseModel):
    """An upgrade job with its counts per state."""

    job_id: int
    firmware: JobFirmware
    selector: dict[str, Any]
    concurrency: int
    rate_per_min: int
    force: bool
    created_at: dt.datetime
    cancelled_at: dt.datetime | None
    finished_at: dt.datetime | None
    state: str = Field(description="running, done or cancelled")
    total: int
    counts: dict[str, int] = Field(description="devices by state")


class UpgradeJob(UpgradeJobSummary):
    """An upgrade job with every device's state and progress."""

    devices: list[UpgradeTarget]


_IMAGE_COLUMNS = """firmware_id, protocol, family, device_type, version, packet_size,
    total_packets, size_bytes, sha256, image_checksum, ftp_host, ftp_port, file_name, note,
    created_at"""


def image_view(row: asyncpg.Record | Mapping[str, Any]) -> Ap3000Image | BkvImage:
    """An image row as the API shows it (with what its family implies)."""
    family = firmware.FAMILIES[row["family"]]
    common = {
        "firmware_id": row["firmware_id"],
        "family": row["family"],
        "target": family.target,
        "device_type": row["device_type"],
        "version": row["version"],
        "size_bytes": row["size_bytes"],
        "sha256": row["sha256"],
        "note": row["note"],
        "created_at": row["created_at"],
    }
    if row["protocol"] == "ap3000":
        return Ap3000Image(
            **common,
            protocol="ap3000",
            packet_size=row["packet_size"],
            total_packets=row["total_packets"],
            check_packet=family.check_packet,
            image_checksum=row["image_checksum"],
        )
    return BkvImage(
        **common,
        protocol="bkv",
        ftp_host=row["ftp_host"],
        ftp_port=row["ftp_port"],
        file_name=row["file_name"],
    )


async def list_images(conn: Connection) -> list[Ap3000Image | BkvImage]:
    """The images in the store (not deleted), oldest first."""
    rows = await conn.fetch(
        f"""SELECT {_IMAGE_COLUMNS} FROM firmware_images WHERE deleted_at IS NULL
            ORDER BY firmware_id"""
    )
    return [image_view(r) for r in rows]


async def get_image(conn: Connection, firmware_id: int) -> Ap3000Image | BkvImage | None:
    """An image's metadata; None if there is none (or it was deleted)."""
    row = await conn.fetchrow(
        f"""SELECT {_IMAGE_COLUMNS} FROM firmware_images
            WHERE firmware_id = $1 AND deleted_at IS NULL""",
        firmware_id,
    )
    return None if row is None else image_view(row)


async def job(conn: Connection, job_id: int) -> UpgradeJob:
    """A job with every target (``firmware.NotFoundError`` if there is none)."""
    return UpgradeJob.model_validate(await firmware.job_view(conn, job_id))


async def recent_jobs(conn: Connection, limit: int) -> list[UpgradeJobSummary]:
    """The newest ``limit`` jobs, newest first, with their counts."""
    rows = await conn.fetch("SELECT job_id FROM upgrade_jobs ORDER BY job_id DESC LIMIT $1", limit)
    items = []
    for row in rows:
        view = await firmware.job_view(conn, row["job_id"])
        view.pop("devices")
        items.append(UpgradeJobSummary.model_validate(view))
    return items
