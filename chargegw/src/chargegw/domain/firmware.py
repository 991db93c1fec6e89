"""Firmware upgrades: the image store and the engine that drives piles through them.

**Images** are uploaded with their metadata (protocol, command family, device type,
version) and kept in PostgreSQL large objects with their sha256 and, for AP3000, the
u32 byte sum the check packet carries. A BKV OTA image is an FTP address and file name:
the gateway downloads the file itself (bkv.md 8).

**Jobs** name their targets with a selector (device_selector.py). A target is a pile
(0xE0, 0xE1, 0xF8), a host (0xFA, 0xF9, 0xE2: its gateway id) or a BKV gateway (OTA).
Per target:

``queued`` -> ``transferring`` (packet n of m) -> ``rebooting`` -> ``verified``, or
``failed`` with a reason at any point (``cancelled`` by the operator). The table
(:data:`TARGET_STATES`, :class:`TargetState`)::

    (none) --job created--> queued;  (none) --another upgrade runs--> failed
    queued --started--> transferring --transferred--> rebooting
    transferring | rebooting --the device asks again, resends exhausted--> transferring
    queued | transferring | rebooting --new version reported--> verified
    queued | transferring | rebooting --refused, timed out--> failed
    queued | transferring --cancelled--> cancelled
    verified, failed, cancelled: final

- A target starts when the job has a free slot (``concurrency`` upgrades in progress,
  ``rate_per_min`` starts in any 60 s), the device is online and, unless the job is
  forced, idle. Its reported type is checked against the image first: a mismatch fails
  it before a byte is sent.
- Every packet is a command row in the outbox (priority FIRMWARE). The outbox's result
  (:func:`on_command_finished`) sends the next packet: the reply is checked with
  chargeproto's :func:`~chargeproto.ap3000.verify_replies`; "resend" and "checksum
  error" replies and unanswered packets send the same packet again, at most
  ``firmware_packet_resends`` times (0xF8/0xF9: after two failed retransmissions the
  transfer restarts from packet 1); refusals (wrong type, no check packet) fail at once.
- A device that asks for firmware (0x05, an unsolicited 0xFA with packet 0, 0x15)
  restarts the transfer from packet 1. A device that goes offline keeps its
  acknowledged packets: the transfer resumes after the last one when it is back.
- After the last packet the target is ``rebooting`` until the device reports a version
  (0x20 / 0x01 for piles, 0x20 ``power_board_version`` for 0xE1, 0x11 for hosts, 0x35
  for 0xE2, the heartbeat for BKV gateways): the new version verifies it; another
  version on a new connection (after the reboot) fails it. Without a report within
  ``firmware_reboot_timeout_s`` (BKV: ``firmware_ota_timeout_s``) the version last
  stored decides.

Everything is state in PostgreSQL: the replies that drive transfers come through the
outbox of the process holding the device, and a periodic pass in every process
(``firmware_tick_s``) starts queued targets, resumes stalled transfers (a crash between
a reply and the next packet, a device back online) and applies timeouts, claiming rows
with ``FOR UPDATE SKIP LOCKED``. Nothing lives only in memory: the ``watch`` set of
targets in progress is a filter, refreshed every pass, that spares the database a query
for every heartbeat.

Gateway-level targets (hosts, BKV gateways) are not session devices: their commands are
queued under a device behind them (``via_device_id``), which shares their connection,
and addressed on the wire to the gateway (``phy_id`` of the command).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import hashlib
import ipaddress
import json
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeAlias

import asyncpg
import structlog

from chargegw.core import EventKind, PortStatus
from chargegw.domain.device_selector import PROTOCOL_NAMES, Selector, SelectorError, select_devices
from chargegw.domain.machine import StateMachine, state_values
from chargegw.domain.orders import OPEN_STATUSES
from chargegw.domain.outbox import CommandStatus, Priority
from chargegw.domain.passes import run_passes
from chargegw.domain.ports import EngineContext, Inbound, MessageHooks
from chargegw.store.causes import apply as apply_cause
from chargegw.store.database import Connection
from chargeproto import ABSENT, Message, ap3000, bkv

log = structlog.get_logger("chargegw.domain.firmware")

#: a row of the database (an image, a target joined with its job and image) or a copy
Row: TypeAlias = "asyncpg.Record | Mapping[str, Any]"


class TargetState(str, enum.Enum):
    """``upgrade_targets.state``."""

    QUEUED = "queued"
    TRANSFERRING = "transferring"
    REBOOTING = "rebooting"
    VERIFIED = "verified"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TargetEvent(str, enum.Enum):
    """What moves an upgrade target."""

    #: the job is created with the target
    CREATED = "created"
    #: a slot is free and the device may start: the first packet is queued
    STARTED = "started"
    #: the device asked for firmware, or a packet failed too often (0xF8/0xF9): packet 1
    RESTARTED = "restarted"
    #: the last packet is acknowledged (BKV: the OTA frame is sent)
    TRANSFERRED = "transferred"
    #: the device reports the image's version (or did before it started)
    VERIFIED = "verified"
    #: refused (by the checks or the device), resends exhausted, too long offline or
    #: without a version report, another version after the reboot
    FAILED = "failed"
    #: the operator cancelled the job
    CANCELLED = "cancelled"


_T = TargetState
#: (from, event) -> to; from None: the target's row does not exist yet
TARGET_STATES: Final = StateMachine[TargetState, TargetEvent](
    "upgrade target",
    {
        (None, TargetEvent.CREATED): _T.QUEUED,
        (None, TargetEvent.FAILED): _T.FAILED,
        (_T.QUEUED, TargetEvent.STARTED): _T.TRANSFERRING,
        (_T.TRANSFERRING, TargetEvent.TRANSFERRED): _T.REBOOTING,
        (_T.TRANSFERRING, TargetEvent.RESTARTED): _T.TRANSFERRING,
        (_T.REBOOTING, TargetEvent.RESTARTED): _T.TRANSFERRING,
        (_T.QUEUED, TargetEvent.VERIFIED): _T.VERIFIED,  # it runs the version already
        (_T.TRANSFERRING, TargetEvent.VERIFIED): _T.VERIFIED,
        (_T.REBOOTING, TargetEvent.VERIFIED): _T.VERIFIED,
        (_T.QUEUED, TargetEvent.FAILED): _T.FAILED,
        (_T.TRANSFERRING, TargetEvent.FAILED): _T.FAILED,
        (_T.REBOOTING, TargetEvent.FAILED): _T.FAILED,
        (_T.QUEUED, TargetEvent.CANCELLED): _T.CANCELLED,
        (_T.TRANSFERRING, TargetEvent.CANCELLED): _T.CANCELLED,
    },
)
#: targets in progress (one per device at a time: a unique index)
ACTIVE: Final = frozenset({_T.QUEUED, _T.TRANSFERRING, _T.REBOOTING})
#: targets whose commands are on their way or whose reboot is awaited
MOVING: Final = frozenset({_T.TRANSFERRING, _T.REBOOTING})
#: commands that will not change any more
_FINISHED_COMMANDS: Final = frozenset(
    {CommandStatus.ACKED, CommandStatus.FAILED, CommandStatus.DEAD}
)
#: the partial unique index's predicate, which ``ON CONFLICT`` must repeat (no parameters)
_ACTIVE_SQL: Final = "state IN ({})".format(", ".join(f"'{v}'" for v in state_values(ACTIVE)))


class Waiting(str, enum.Enum):
    """Why a target does not move on (``upgrade_targets.waiting``)."""

    OFFLINE = "offline"
    #: a port charges (only a forced job upgrades a busy device)
    CHARGING = "charging"
    #: the device has not reported its type yet
    UNKNOWN_TYPE = "unknown_type"


#: physical-id type codes of AP3000 hosts (ap3000.md 4)
HOST_ID_TYPES: Final = frozenset({0x09, 0x0A})
#: BKV OTA targets (bkv.md 11.5): 1 = the gateway (DTU), the only documented one
BKV_OTA_TARGETS: Final = {1: "gateway (DTU)"}
#: port statuses and order statuses that make a device busy (not upgraded unless forced)
BUSY_PORTS: Final = (PortStatus.CHARGING.value, PortStatus.FLOAT.value)
OPEN_ORDERS: Final = OPEN_STATUSES


@dataclasses.dataclass(frozen=True)
class Family:
    """An upgrade command family: how packets are built and replies read."""

    name: str
    protocol: str
    #: "device" (a pile), "host" (an AP3000 host) or "gateway" (a BKV gateway)
    target: str
    packet_size: int = 0
    #: the 0xE0-style check packet is appended (ap3000.md 9.22)
    check_packet: bool = False
    #: an empty packet first asks the host to enter upgrade mode (0xFA)
    trigger: bool = False
    #: failed transmissions of one packet after which the transfer restarts (0xF8/0xF9)
    restart_after: int | None = None
    #: reply results that ask for the same packet again
    resend_results: frozenset[int] = frozenset({1})
    #: what reports the version after the upgrade
    report: str = "pile"

    @property
    def command(self) -> str:
        """The outbox command name of a packet."""
        return f"firmware_{self.name.lower()}"


#: 0xE0/0xE1/0xE2 replies that ask for the packet again: packet error, image checksum
#: wrong (ap3000.md 11.13); 3-5 (wrong type, no check packet) are refusals
_E_RESEND: Final = frozenset({1, 2})
FAMILIES: Final[dict[str, Family]] = {
    f.name: f
    for f in (
        Family("0xE0", "ap3000", "device", 200, True, resend_results=_E_RESEND),
        Family("0xE1", "ap3000", "device", 200, True, resend_results=_E_RESEND, report="board"),
        Family("0xE2", "ap3000", "host", 200, True, resend_results=_E_RESEND, report="subdevices"),
        Family("0xF8", "ap3000", "device", 256, restart_after=3),
        Family("0xF9", "ap3000", "host", 256, restart_after=3, report="host"),
        Family("0xFA", "ap3000", "host", 200, trigger=True, report="host"),
        Family("ota", "bkv", "gateway", report="bkv"),
    )
}
_BY_COMMAND: Final = {f.command: f for f in FAMILIES.values()}

#: ap3000.md 11.9: device type -> the families that upgrade it (1/2/3 are what old
#: firmwares report; 0x02 is an old LoRa device (0xE0) with firmware 1.xx, else 0xF8)
PILE_FAMILIES: Final[dict[int, frozenset[str]]] = {
    **dict.fromkeys((0x01, 0x03, 0x04, 0x06, 0x07, 0x70, 0x71), frozenset({"0xF8"})),
    0x02: frozenset({"0xE0", "0xF8"}),
    **dict.fromkeys(
        (0x05, 0x08, 0x09, 0x0A, 0x0B, 0x10, 0x14, *range(0x20, 0x2A), 0x30),
        frozenset({"0xE0"}),
    ),
}
#: ap3000.md 11.14: host type -> its upgrade family
HOST_FAMILIES: Final[dict[int, str]] = {
    0x01: "0xF9",
    **dict.fromkeys((0x02, 0x03, 0x04, 0x05, 0x50, 0x51), "0xFA"),
}


def pile_family(device_type: int, firmware: str | None) -> str | None:
    """The family that upgrades a pile of ``device_type`` with ``firmware``, or None."""
    families = PILE_FAMILIES.get(device_type)
    if families is None:
        return None
    if len(families) == 1:
        return next(iter(families))
    major = int(firmware) // 100 if firmware and firmware.isdigit() else None
    return "0xE0" if major == 1 else "0xF8"


class FirmwareError(ValueError):
    """A request that cannot be accepted; names the field (HTTP 422)."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


class ConflictError(Exception):
    """A request that conflicts with an upgrade in progress (HTTP 409)."""


class NotFoundError(LookupError):
    """An image or job that does not exist (HTTP 404)."""


# === images ===========================================================================


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Validated metadata of an upload."""

    protocol: str
    family: str
    device_type: int
    version: str
    packet_size: int | None
    ftp_host: str | None = None
    ftp_port: int | None = None
    file_name: str | None = None
    note: str | None = None


def normalize_family(protocol: str, raw: str) -> str:
    """``E0``, ``0xe0``, ``e0`` -> ``0xE0``; ``ota`` for BKV; ``FirmwareError`` else."""
    text = raw.strip()
    if protocol == "bkv":
        if text.lower() in ("ota", "0x0007", "0007"):
            return "ota"
        raise FirmwareError("BKV firmware is upgraded by OTA (0x0007): family 'ota'", "family")
    code = text.upper().removeprefix("0X")
    name = f"0x{code}"
    if name not in FAMILIES or name == "ota":
        known = ", ".join(n for n in FAMILIES if n != "ota")
        raise FirmwareError(f"unknown AP3000 upgrade family {raw!r}; known: {known}", "family")
    return name


def validate_image(
    *,
    protocol: str,
    family: str,
    device_type: str | int,
    version: str,
    packet_size: int | None,
    body: bytes,
    max_bytes: int,
    ftp_host: str | None = None,
    ftp_port: int | None = None,
    file_name: str | None = None,
    note: str | None = None,
) -> ImageSpec:
    """Check an upload against the protocol reference; ``FirmwareError`` names the field."""
    if protocol not in ("ap3000", "bkv"):
        raise FirmwareError("protocol must be 'ap3000' or 'bkv'", "protocol")
    name = normalize_family(protocol, family)
    fam = FAMILIES[name]
    if device_type == "":
        raise FirmwareError("device_type is required", "device_type")
    try:
        type_code = int(device_type, 0) if isinstance(device_type, str) else int(device_type)
    except ValueError:
        raise FirmwareError(f"device_type {device_type!r} is not a number", "device_type") from None
    if len(body) > max_bytes:
        raise FirmwareError(f"the image is larger than {max_bytes} bytes", "body")
    if protocol == "bkv":
        return _validate_ota(type_code, version, body, ftp_host, ftp_port, file_name, note)
    if not body:
        raise FirmwareError("the image is empty", "body")
    if packet_size is not None and packet_size != fam.packet_size:
        raise FirmwareError(
            f"{name} packets carry {fam.packet_size} bytes, not {packet_size}", "packet_size"
        )
    if fam.target == "host" and name != "0xE2":
        if HOST_FAMILIES.get(type_code) is None:
            raise FirmwareError(
                f"host type 0x{type_code:02X} is not in the host type table (ap3000.md 11.14)",
                "device_type",
            )
        if HOST_FAMILIES[type_code] != name:
            raise FirmwareError(
                f"host type 0x{type_code:02X} upgrades with {HOST_FAMILIES[type_code]},"
                f" not {name} (ap3000.md 11.14)",
                "family",
            )
    else:
        families = PILE_FAMILIES.get(type_code)
        if families is None:
            raise FirmwareError(
                f"device type 0x{type_code:02X} is not in the device type table (ap3000.md 11.9)",
                "device_type",
            )
        wanted = {"0xE0"} if name in ("0xE1", "0xE2") else {name}
        if not families & wanted:
            raise FirmwareError(
                f"device type 0x{type_code:02X} upgrades with {', '.join(sorted(families))},"
                f" not {name} (ap3000.md 11.9)",
                "family",
            )
    if not version.isdigit() or int(version) > 0xFFFF:
        raise FirmwareError(
            "an AP3000 version is the number the device reports, 0-65535 (313 = V3.13)",
            "version",
        )
    packets = -(-len(body) // fam.packet_size) + fam.check_packet
    if packets > 0xFFFF:
        raise FirmwareError("the image needs more than 65535 packets", "body")
    return ImageSpec(protocol, name, type_code, str(int(version)), fam.packet_size, note=note)


def _validate_ota(
    target: int,
    version: str,
    body: bytes,
    ftp_host: str | None,
    ftp_port: int | None,
    file_name: str | None,
    note: str | None,
) -> ImageSpec:
    if target not in BKV_OTA_TARGETS:
        raise FirmwareError(
            "the BKV OTA target (device_type) must be 1, the gateway: no other is documented",
            "device_type",
        )
    if not version or len(version.encode("ascii", "replace")) > 8 or not version.isascii():
        raise FirmwareError(
            "a BKV version is the gateway's version text, 1-8 ASCII characters", "version"
        )
    try:
        address = ipaddress.IPv4Address(ftp_host or "")
    except ValueError:
        raise FirmwareError(
            "ftp_host must be an IPv4 address (the 0x0007 frame carries 4 bytes)", "ftp_host"
        ) from None
    port = 21 if ftp_port is None else ftp_port
    if not 1 <= port <= 0xFFFF:
        raise FirmwareError("ftp_port must be 1-65535", "ftp_port")
    if not file_name or not file_name.isascii() or len(file_name) > 13:
        raise FirmwareError("file_name must be 1-13 ASCII characters (bkv.md 8)", "file_name")
    del body  # the gateway downloads the file itself; an uploaded copy is only recorded
    return ImageSpec("bkv", "ota", target, version, None, str(address), port, file_name, note=note)


async def store_image(conn: Connection, spec: ImageSpec, body: bytes) -> asyncpg.Record:
    """Insert an image (its bytes as a large object) inside the caller's transaction."""
    fam = FAMILIES[spec.family]
    total = 0
    checksum = None
    if spec.protocol == "ap3000":
        check = (spec.device_type, int(spec.version)) if fam.check_packet else None
        total = len(ap3000.split_image(body, packet_size=fam.packet_size, check_packet=check))
        checksum = ap3000.image_checksum(body)
    row: asyncpg.Record | None = await conn.fetchrow(
        """INSERT INTO firmware_images (protocol, family, device_type, version, packet_size,
                                        total_packets, size_bytes, sha256, image_checksum,
                                        image_oid, ftp_host, ftp_port, file_name, note)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                   CASE WHEN $10::bytea IS NULL THEN NULL ELSE lo_from_bytea(0, $10) END,
                   $11, $12, $13, $14)
           RETURNING *""",
        spec.protocol,
        spec.family,
        spec.device_type,
        spec.version,
        spec.packet_size,
        total,
        len(body),
        hashlib.sha256(body).hexdigest() if body else None,
        checksum,
        body or None,
        spec.ftp_host,
        spec.ftp_port,
        spec.file_name,
        spec.note,
    )
    assert row is not None
    return row


async def delete_image(conn: Connection, firmware_id: int) -> None:
    """Remove an image's bytes (its row stays for the jobs that used it); refused
    (``ConflictError``) while a job with targets in progress uses it."""
    row = await conn.fetchrow(
        """SELECT * FROM firmware_images WHERE firmware_id = $1 AND deleted_at IS NULL
           FOR UPDATE""",
        firmware_id,
    )
    if row is None:
        raise NotFoundError(f"firmware {firmware_id} not found")
    jobs = await conn.fetch(
        """SELECT DISTINCT j.job_id FROM upgrade_jobs j JOIN upgrade_targets t USING (job_id)
           WHERE j.firmware_id = $1 AND t.state = ANY($2::text[]) ORDER BY j.job_id""",
        firmware_id,
        state_values(ACTIVE),
    )
    if jobs:
        ids = ", ".join(str(j["job_id"]) for j in jobs)
        raise ConflictError(f"firmware {firmware_id} is in use by upgrade job(s) {ids}")
    if row["image_oid"] is not None:
        await conn.execute("SELECT lo_unlink($1)", row["image_oid"])
    await conn.execute(
        """UPDATE firmware_images SET deleted_at = now(), image_oid = NULL
           WHERE firmware_id = $1""",
        firmware_id,
    )


# === targets: who they are, whether they fit =============================================


@dataclasses.dataclass(frozen=True)
class Check:
    """What a target's stored state says about starting an upgrade on it."""

    #: the image must not be sent: the reason (the target fails)
    refused: str | None = None
    #: not now (the target waits)
    waiting: Waiting | None = None
    via: str | None = None
    version: str | None = None


def _hex(code: int | None) -> str:
    return "unknown" if code is None else f"0x{code:02X}"


def _id_type(phy_id: str) -> int | None:
    """The type code of an AP3000 physical id (its first two hex digits)."""
    try:
        return int(phy_id[:2], 16)
    except ValueError:
        return None


async def check_target(conn: Connection, image: Row, target_id: str, *, force: bool) -> Check:
    """Whether ``image`` may go to ``target_id`` now (the device type and family it
    reported, online, idle unless ``force``)."""
    fam = FAMILIES[image["family"]]
    if fam.target == "device":
        return await _check_pile(conn, image, fam, target_id, force)
    gateway = await conn.fetchrow("SELECT * FROM gateways WHERE gateway_id = $1", target_id)
    if gateway is None:
        return Check(refused=f"{target_id} is not a known gateway")
    if gateway["protocol"] != fam.protocol:
        return Check(refused=f"{target_id} is a {gateway['protocol']} gateway")
    behind = [
        r["device_id"]
        for r in await conn.fetch(
            """SELECT device_id FROM devices WHERE gateway_id = $1 AND online
               ORDER BY device_id""",
            target_id,
        )
    ]
    if fam.target == "host":
        if _id_type(target_id) not in HOST_ID_TYPES:
            return Check(refused=f"{target_id} is not an AP3000 host (id type 0x09/0x0A)")
        refused = await _host_refusal(conn, image, fam, target_id)
        if refused is not None:
            if isinstance(refused, Waiting):
                return Check(waiting=refused)
            return Check(refused=refused)
    version = gateway["firmware"]
    if fam.report == "subdevices":
        version = await _subdevice_version(conn, target_id, image["device_type"])
    if not behind:  # commands reach a gateway through a device behind it
        return Check(waiting=Waiting.OFFLINE, version=version)
    busy_scope = behind if fam.target == "gateway" or fam.report == "subdevices" else []
    if busy_scope and not force and await _busy(conn, busy_scope):
        return Check(waiting=Waiting.CHARGING, via=behind[0], version=version)
    return Check(via=behind[0], version=version)


async def _check_pile(
    conn: Connection, image: Row, fam: Family, device_id: str, force: bool
) -> Check:
    device = await conn.fetchrow("SELECT * FROM devices WHERE device_id = $1", device_id)
    if device is None:
        return Check(refused=f"{device_id} is not a known device")
    if device["protocol"] != "ap3000":
        return Check(refused=f"{device_id} is a {device['protocol']} device")
    if _id_type(device_id) in HOST_ID_TYPES:
        return Check(refused=f"{device_id} is a host: use a host image (0xFA, 0xF9, 0xE2)")
    reported = device["device_type"]
    if reported is None:
        return Check(waiting=Waiting.UNKNOWN_TYPE)
    if reported != image["device_type"]:
        return Check(
            refused=f"the device reports type {_hex(reported)}, the image is for"
            f" {_hex(image['device_type'])}"
        )
    expected = pile_family(reported, device["firmware"])
    if expected is None:
        return Check(
            refused=f"device type {_hex(reported)} is not in the reference's table"
            " (ap3000.md 11.9): its upgrade command is unknown"
        )
    attributes = device["attributes"]
    if isinstance(attributes, str):
        attributes = json.loads(attributes)
    version = device["firmware"]
    if fam.name == "0xE1":
        board = (attributes or {}).get("power_board_version")
        if expected != "0xE0" or not board:
            return Check(refused="the device reports no power board (power_board_version 0)")
        version = str(board)
    elif expected != fam.name:
        return Check(
            refused=f"device type {_hex(reported)} with firmware {device['firmware']}"
            f" upgrades with {expected}, the image is {fam.name} (ap3000.md 11.9)"
        )
    if not device["online"]:
        return Check(waiting=Waiting.OFFLINE, version=version)
    if not force and await _busy(conn, [device_id]):
        return Check(waiting=Waiting.CHARGING, via=device_id, version=version)
    return Check(via=device_id, version=version)


async def host_type(conn: Connection, host_id: str) -> int | None:
    """The host type of the host's last 0x11 heartbeat (kept in its event detail)."""
    detail = await conn.fetchval(
        """SELECT detail FROM device_events
           WHERE device_id = $1 AND kind = 'report' AND reason = 'HostHeartbeat'
           ORDER BY at DESC, id DESC LIMIT 1""",
        host_id,
    )
    if detail is None:
        return None
    value = (json.loads(detail) if isinstance(detail, str) else detail).get("host_type")
    return value if isinstance(value, int) else None


async def _host_refusal(
    conn: Connection, image: Row, fam: Family, host_id: str
) -> str | Waiting | None:
    """Why ``image`` cannot go to the host (or what it waits for), or None."""
    if fam.name == "0xE2":  # the image is for sub-devices of its type behind the host
        found = await conn.fetchval(
            "SELECT count(*) FROM devices WHERE gateway_id = $1 AND device_type = $2",
            host_id,
            image["device_type"],
        )
        if not found:
            return f"no device of type {_hex(image['device_type'])} is behind this host"
        return None
    reported = await host_type(conn, host_id)
    if reported is None:
        return Waiting.UNKNOWN_TYPE
    if reported != image["device_type"]:
        return (
            f"the host reports type {_hex(reported)}, the image is for {_hex(image['device_type'])}"
        )
    expected = HOST_FAMILIES.get(reported)
    if expected != fam.name:
        return (
            f"host type {_hex(reported)} upgrades with {expected or 'an unknown command'},"
            f" the image is {fam.name} (ap3000.md 11.14)"
        )
    return None


async def _subdevice_version(conn: Connection, host_id: str, device_type: int) -> str | None:
    versions = [
        int(r["firmware"])
        for r in await conn.fetch(
            """SELECT firmware FROM devices WHERE gateway_id = $1 AND device_type = $2
               AND firmware ~ '^[0-9]+$'""",
            host_id,
            device_type,
        )
    ]
    return str(min(versions)) if versions else None


async def _busy(conn: Connection, device_ids: list[str]) -> bool:
    busy: bool = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM ports WHERE device_id = ANY($1::text[])
                          AND status = ANY($2::text[]))
               OR EXISTS (SELECT 1 FROM orders WHERE device_id = ANY($1::text[])
                          AND status = ANY($3::text[]))""",
        device_ids,
        list(BUSY_PORTS),
        list(OPEN_ORDERS),
    )
    return busy


async def select_targets(conn: Connection, family: Family, selector: Selector) -> list[str]:
    """The targets of a job: piles by the shared device selector, hosts and BKV gateways
    by the same selector shapes over the gateways; ``SelectorError`` if none."""
    if family.target == "device":
        return await select_devices(conn, selector, family.protocol)
    hosts = family.target == "host"
    where = "protocol = $1" + (" AND substr(gateway_id, 1, 2) IN ('09', '0A')" if hosts else "")
    what = "AP3000 host" if hosts else f"{PROTOCOL_NAMES[family.protocol]} gateway"
    if selector.device_ids is not None:
        ids = list(selector.device_ids)
        known = {
            r["gateway_id"]
            for r in await conn.fetch(
                f"SELECT gateway_id FROM gateways WHERE {where} AND gateway_id = ANY($2::text[])",
                family.protocol,
                ids,
            )
        }
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise SelectorError(f"not known as {what}s: {', '.join(unknown)}")
        return ids
    rows = await conn.fetch(
        f"SELECT gateway_id, firmware FROM gateways WHERE {where} ORDER BY gateway_id",
        family.protocol,
    )
    found = []
    for r in rows:
        if selector.firmware is not None and r["firmware"] != selector.firmware:
            continue
        if selector.device_type is not None:
            kind = await host_type(conn, r["gateway_id"]) if hosts else 1
            if kind != selector.device_type:
                continue
        found.append(r["gateway_id"])
    if not found:
        raise SelectorError(f"no {what} matches")
    return found


# === jobs ===============================================================================


async def create_job(
    conn: Connection,
    *,
    firmware_id: int,
    selector_raw: Any,
    selector: Selector,
    concurrency: int,
    rate_per_min: int,
    force: bool,
) -> int:
    """Create a job inside the caller's transaction; returns its id.

    Targets whose reported type does not fit the image, or that another upgrade is
    running on, are recorded ``failed`` with the reason; a single explicitly named
    target answers ``FirmwareError`` (422) or ``ConflictError`` (409) instead.
    """
    image = await conn.fetchrow(
        "SELECT * FROM firmware_images WHERE firmware_id = $1 AND deleted_at IS NULL",
        firmware_id,
    )
    if image is None:
        raise FirmwareError(f"firmware {firmware_id} not found", "firmware_id")
    fam = FAMILIES[image["family"]]
    targets = await select_targets(conn, fam, selector)
    single = selector.device_ids is not None and len(targets) == 1
    job_id: int = await conn.fetchval(
        """INSERT INTO upgrade_jobs (firmware_id, selector, concurrency, rate_per_min, force)
           VALUES ($1, $2, $3, $4, $5) RETURNING job_id""",
        firmware_id,
        json.dumps(selector_raw),
        concurrency,
        rate_per_min,
        force,
    )
    for target_id in targets:
        check = await check_target(conn, image, target_id, force=force)
        if check.refused is not None and single:
            raise FirmwareError(f"{target_id}: {check.refused}", "selector")
        inserted = await conn.fetchval(
            f"""INSERT INTO upgrade_targets (job_id, target_id, state, total_packets,
                                             previous_version)
                VALUES ($1, $2, $5, $3, $4)
                ON CONFLICT (target_id) WHERE {_ACTIVE_SQL}
                DO NOTHING RETURNING target_id""",
            job_id,
            target_id,
            image["total_packets"],
            check.version,
            TARGET_STATES.check(None, TargetEvent.CREATED).value,
        )
        if inserted is None:
            other = await conn.fetchval(
                """SELECT job_id FROM upgrade_targets WHERE target_id = $1
                   AND state = ANY($2::text[])""",
                target_id,
                state_values(ACTIVE),
            )
            if single:
                raise ConflictError(f"{target_id} is being upgraded by job {other}")
            await _insert_failed(
                conn, job_id, target_id, image, f"another upgrade is in progress (job {other})"
            )
        elif check.refused is not None:
            await _finish(conn, job_id, target_id, image, TargetEvent.FAILED, check.refused)
    return job_id


async def _insert_failed(
    conn: Connection, job_id: int, target_id: str, image: Row, reason: str
) -> None:
    await conn.execute(
        """INSERT INTO upgrade_targets (job_id, target_id, state, total_packets,
                                        failure_reason, finished_at)
           VALUES ($1, $2, $5, $3, $4, now())""",
        job_id,
        target_id,
        image["total_packets"],
        reason,
        TARGET_STATES.check(None, TargetEvent.FAILED).value,
    )
    await _event(conn, target_id, EventKind.UPGRADE_FAILED, reason, job_id, image, {})


async def cancel_job(conn: Connection, job_id: int) -> list[str]:
    """Cancel a job: queued and transferring targets stop (packets not sent yet are
    withdrawn); rebooting ones are still verified. Returns the devices to wake."""
    job = await conn.fetchrow("SELECT * FROM upgrade_jobs WHERE job_id = $1 FOR UPDATE", job_id)
    if job is None:
        raise NotFoundError(f"upgrade job {job_id} not found")
    if job["finished_at"] is not None or job["cancelled_at"] is not None:
        raise ConflictError(f"upgrade job {job_id} is already finished")
    cancelled, sources = TARGET_STATES.step(TargetEvent.CANCELLED)
    rows = await conn.fetch(
        """UPDATE upgrade_targets SET state = $2, failure_reason = 'cancelled',
                  finished_at = now(), updated_at = now(), waiting = NULL
           WHERE job_id = $1 AND state = ANY($3::text[])
           RETURNING command_id, via_device_id""",
        job_id,
        cancelled,
        sources,
    )
    await _withdraw(conn, [r["command_id"] for r in rows], "cancelled")
    await conn.execute("UPDATE upgrade_jobs SET cancelled_at = now() WHERE job_id = $1", job_id)
    return [r["via_device_id"] for r in rows if r["via_device_id"]]


async def _withdraw(conn: Connection, command_ids: list[int | None], reason: str) -> None:
    """Packets not sent yet are withdrawn; one on the wire is answered and ignored."""
    ids = [c for c in command_ids if c is not None]
    if ids:
        await apply_cause(conn)  # the call that cancels the job, or what ended it
        await conn.execute(
            """UPDATE commands SET status = $3, dead_reason = $2, finished_at = now()
               WHERE command_id = ANY($1::bigint[]) AND status = $4""",
            ids,
            reason,
            CommandStatus.DEAD.value,
            CommandStatus.PENDING.value,
        )


async def job_view(conn: Connection, job_id: int) -> dict[str, Any]:
    """The job with every target's state and progress."""
    job = await conn.fetchrow(
        """SELECT j.*, i.protocol, i.family, i.device_type, i.version
           FROM upgrade_jobs j JOIN firmware_images i USING (firmware_id)
           WHERE j.job_id = $1""",
        job_id,
    )
    if job is None:
        raise NotFoundError(f"upgrade job {job_id} not found")
    rows = await conn.fetch(
        "SELECT * FROM upgrade_targets WHERE job_id = $1 ORDER BY target_id", job_id
    )
    counts = {state.value: 0 for state in TargetState}
    devices = []
    for r in rows:
        counts[r["state"]] += 1
        devices.append(
            {
                "device_id": r["target_id"],
                "state": r["state"],
                "progress": f"{r['acked_packets']}/{r['total_packets']}",
                "acked_packets": r["acked_packets"],
                "total_packets": r["total_packets"],
                "waiting": r["waiting"],
                "failure_reason": r["failure_reason"],
                "previous_version": r["previous_version"],
                "reported_version": r["reported_version"],
                "restarts": r["restarts"],
                "started_at": _time(r["started_at"]),
                "transferred_at": _time(r["transferred_at"]),
                "finished_at": _time(r["finished_at"]),
            }
        )
    active = any(counts[s.value] for s in ACTIVE)
    state = "running" if active else "cancelled" if job["cancelled_at"] else "done"
    return {
        "job_id": job_id,
        "firmware": {
            "firmware_id": job["firmware_id"],
            "protocol": job["protocol"],
            "family": job["family"],
            "device_type": job["device_type"],
            "version": job["version"],
        },
        "selector": _json(job["selector"]),
        "concurrency": job["concurrency"],
        "rate_per_min": job["rate_per_min"],
        "force": job["force"],
        "created_at": _time(job["created_at"]),
        "cancelled_at": _time(job["cancelled_at"]),
        "finished_at": _time(job["finished_at"]),
        "state": state,
        "total": len(devices),
        "counts": counts,
        "devices": devices,
    }


async def _finish(
    conn: Connection,
    job_id: int,
    target_id: str,
    image: Row,
    event: TargetEvent,
    reason: str | None,
    *,
    reported: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """A target in progress ends ``verified`` or ``failed`` (``event``); its event row in
    the same transaction."""
    state, sources = TARGET_STATES.step(event)
    row = await conn.fetchrow(
        """UPDATE upgrade_targets SET state = $3, failure_reason = $4, finished_at = now(),
                  updated_at = now(), reported_version = coalesce($5, reported_version),
                  command_id = NULL, waiting = NULL
           WHERE job_id = $1 AND target_id = $2 AND state = ANY($6::text[])
           RETURNING command_id, previous_version""",
        job_id,
        target_id,
        state,
        reason,
        reported,
        sources,
    )
    if row is None:  # the callers hold the row's lock in a state the event leaves
        log.warning("upgrade target already ended", job_id=job_id, device_id=target_id)
        return
    verified = event is TargetEvent.VERIFIED
    kind = EventKind.UPGRADE_VERIFIED if verified else EventKind.UPGRADE_FAILED
    extra = {"reported_version": reported, **(detail or {})}
    extra["previous_version"] = row["previous_version"]
    await _event(conn, target_id, kind, reason, job_id, image, extra)


async def _event(
    conn: Connection,
    target_id: str,
    kind: EventKind,
    reason: str | None,
    job_id: int,
    image: Row,
    detail: dict[str, Any],
) -> None:
    await conn.execute(
        """INSERT INTO device_events (device_id, at, kind, reason, detail)
           VALUES ($1, now(), $2, $3, $4)""",
        target_id,
        kind.value,
        reason,
        json.dumps(
            {
                "job_id": job_id,
                "firmware_id": image["firmware_id"],
                "family": image["family"],
                "version": image["version"],
                **detail,
            }
        ),
    )


def _json(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw


def _time(value: Any) -> str | None:
    if value is None:
        return None
    text: str = value.isoformat().replace("+00:00", "Z")
    return text


# === the engine =========================================================================


@dataclasses.dataclass(frozen=True)
class _Result:
    """A finished packet command, as the outbox left it in ``commands``."""

    status: CommandStatus
    attempts: int
    result_code: int | None
    result_text: str | None
    dead_reason: str | None
    reply: dict[str, Any]


_TARGET_SQL = """SELECT t.*, j.force, j.firmware_id, i.family, i.version, i.device_type,
                        i.total_packets AS image_packets, i.ftp_host, i.ftp_port,
                        i.file_name, i.protocol
                 FROM upgrade_targets t JOIN upgrade_jobs j USING (job_id)
                 JOIN firmware_images i USING (firmware_id)"""
#: images whose packets are kept in memory (they never change)
_IMAGE_CACHE = 4


class UpgradeEngine:
    """One process's share of the upgrade work (see the module docstring)."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        #: targets in progress anywhere (refreshed every pass): a filter for reports;
        #: None until the first pass, when every report is looked up
        self.watch: set[str] | None = None
        self._packets: collections.OrderedDict[int, list[bytes]] = collections.OrderedDict()
        self._wakeup = asyncio.Event()

    @property
    def settings(self) -> Any:
        return self.ctx.settings

    def kick(self) -> None:
        """Run a pass soon (a slot was freed, a job was created)."""
        self._wakeup.set()

    async def run(self) -> None:
        """Passes every ``firmware_tick_s`` (sooner when kicked) until cancelled."""
        await run_passes(self.tick, self._wakeup, lambda: self.settings.firmware_tick_s, "firmware")

    async def tick(self) -> None:
        """One pass: watch list, stalled transfers, timeouts, starts, finished jobs."""
        pool = self.ctx.pool
        if pool is None:
            return
        # a job stays open while any of its targets is in progress: none open, no work
        jobs = await pool.fetch(
            "SELECT job_id FROM upgrade_jobs WHERE finished_at IS NULL ORDER BY job_id"
        )
        if not jobs:
            self.watch = set()
            return
        if self.watch is None:
            self.watch = set()
        rows = await pool.fetch(
            "SELECT target_id FROM upgrade_targets WHERE state = ANY($1::text[])",
            state_values(MOVING),
        )
        self.watch = {r["target_id"] for r in rows}
        await self._recover(pool)
        await self._timeouts(pool)
        for job in jobs:
            await self._start_ready(pool, job["job_id"])

    # -- packets --

    async def _image_packets(self, conn: Connection, t: Row) -> list[bytes]:
        firmware_id = t["firmware_id"]
        packets = self._packets.get(firmware_id)
        if packets is None:
            data = await conn.fetchval(
                """SELECT lo_get(image_oid) FROM firmware_images
                   WHERE firmware_id = $1 AND image_oid IS NOT NULL""",
                firmware_id,
            )
            if data is None:
                raise FirmwareError(f"the bytes of firmware {firmware_id} are gone", None)
            fam = FAMILIES[t["family"]]
            check = (t["device_type"], int(t["version"])) if fam.check_packet else None
            packets = [
                chunk
                for _, _, chunk in ap3000.split_image(
                    bytes(data), packet_size=fam.packet_size, check_packet=check
                )
            ]
            self._packets[firmware_id] = packets
            while len(self._packets) > _IMAGE_CACHE:
                self._packets.popitem(last=False)
        self._packets.move_to_end(firmware_id)
        return packets

    async def _send(
        self, conn: Connection, t: Row, packet: int, sends: int, wake: list[str]
    ) -> None:
        """Queue ``packet`` (0: the 0xFA trigger; BKV: the OTA frame) for ``t``."""
        fam = FAMILIES[t["family"]]
        via = t["via_device_id"]
        params: dict[str, Any]
        if fam.protocol == "bkv":
            params = {
                "target": t["device_type"],
                "ftp_ip": t["ftp_host"],
                "ftp_port": t["ftp_port"],
                "file_name": t["file_name"],
            }
        elif packet == 0:
            params = {}
        else:
            packets = await self._image_packets(conn, t)
            params = {
                "total_packets": len(packets),
                "packet_index": packet,
                "firmware": packets[packet - 1].hex(),
            }
        if fam.target == "host":
            params["phy_id"] = t["target_id"]
        command_id = await self.ctx.outbox.submit(
            conn,
            device_id=via,
            protocol=fam.protocol,
            name=fam.command,
            params=params,
            priority=Priority.FIRMWARE,
            expires_s=self.settings.command_expiry_s,
        )
        await conn.execute(
            """UPDATE upgrade_targets SET command_id = $3, command_packet = $4,
                      packet_sends = $5, waiting = NULL, waiting_since = NULL,
                      updated_at = now()
               WHERE job_id = $1 AND target_id = $2""",
            t["job_id"],
            t["target_id"],
            command_id,
            packet,
            sends,
        )
        wake.append(via)

    def _wake(self, devices: list[str]) -> None:
        for device_id in dict.fromkeys(devices):
            self.ctx.outbox.wake(device_id)

    # -- starting --

    async def _start_ready(self, pool: asyncpg.Pool, job_id: int) -> None:
        wake: list[str] = []
        async with pool.acquire() as conn, conn.transaction():
            job = await conn.fetchrow(
                """SELECT * FROM upgrade_jobs WHERE job_id = $1 AND finished_at IS NULL
                   FOR UPDATE SKIP LOCKED""",
                job_id,
            )
            if job is None:
                return
            counts = await conn.fetchrow(
                """SELECT count(*) FILTER (WHERE state = ANY($2::text[])) AS active,
                          count(*) FILTER (WHERE state = $3) AS queued,
                          count(*) FILTER (WHERE started_at > now() - interval '60 s')
                              AS recent
                   FROM upgrade_targets WHERE job_id = $1""",
                job_id,
                state_values(MOVING),
                _T.QUEUED.value,
            )
            assert counts is not None
            if counts["active"] == 0 and counts["queued"] == 0:
                await conn.execute(
                    "UPDATE upgrade_jobs SET finished_at = now() WHERE job_id = $1", job_id
                )
                log.info("upgrade job finished", job_id=job_id)
                return
            slots = min(
                job["concurrency"] - counts["active"], job["rate_per_min"] - counts["recent"]
            )
            if slots <= 0 or counts["queued"] == 0 or job["cancelled_at"] is not None:
                return
            candidates = await conn.fetch(
                _TARGET_SQL
                + """ WHERE t.job_id = $1 AND t.state = $3
                      ORDER BY t.checked_at NULLS FIRST, t.target_id LIMIT $2
                      FOR UPDATE OF t SKIP LOCKED""",
                job_id,
                max(slots * 4, 50),
                _T.QUEUED.value,
            )
            for t in candidates:
                if slots <= 0:
                    break
                if await self._start(conn, t, wake):
                    slots -= 1
        self._wake(wake)

    async def _start(self, conn: Connection, t: Row, wake: list[str]) -> bool:
        """Start ``t`` if it may start now; True if it took a slot."""
        check = await check_target(conn, t, t["target_id"], force=t["force"])
        job_id, target_id = t["job_id"], t["target_id"]
        if check.refused is not None:
            await _finish(conn, job_id, target_id, t, TargetEvent.FAILED, check.refused)
            return False
        if check.waiting is not None:
            await conn.execute(
                """UPDATE upgrade_targets SET checked_at = now(), waiting = $3,
                          waiting_since = CASE WHEN waiting IS DISTINCT FROM $3 THEN now()
                                               ELSE waiting_since END
                   WHERE job_id = $1 AND target_id = $2""",
                job_id,
                target_id,
                check.waiting.value,
            )
            return False
        if check.version is not None and check.version == t["version"]:
            await _finish(
                conn,
                job_id,
                target_id,
                t,
                TargetEvent.VERIFIED,
                None,
                reported=check.version,
                detail={"already": True},
            )
            return False
        current = TargetState(t["state"])
        await conn.execute(
            """UPDATE upgrade_targets SET state = $5, started_at = now(),
                      checked_at = now(), via_device_id = $3, acked_packets = 0,
                      restarts = 0, previous_version = $4, updated_at = now()
               WHERE job_id = $1 AND target_id = $2 AND state = $6""",
            job_id,
            target_id,
            check.via,
            check.version,
            TARGET_STATES.check(current, TargetEvent.STARTED).value,
            current.value,
        )
        await _event(
            conn,
            target_id,
            EventKind.UPGRADE_STARTED,
            None,
            job_id,
            t,
            {"previous_version": check.version, "total_packets": t["total_packets"]},
        )
        fam = FAMILIES[t["family"]]
        started = {**dict(t), "via_device_id": check.via}
        await self._send(conn, started, 0 if fam.trigger or fam.protocol == "bkv" else 1, 0, wake)
        if self.watch is not None:
            self.watch.add(target_id)
        log.info("upgrade started", job_id=job_id, device_id=target_id, family=fam.name)
        return True

    # -- replies --

    async def on_result(self, command_id: int) -> None:
        """A packet command finished (the outbox's result hook)."""
        pool = self.ctx.pool
        if pool is None:
            return
        wake: list[str] = []
        async with pool.acquire() as conn, conn.transaction():
            t = await conn.fetchrow(
                _TARGET_SQL + " WHERE t.command_id = $1 FOR UPDATE OF t", command_id
            )
            if t is None or t["state"] != _T.TRANSFERRING.value:
                return  # withdrawn, restarted or cancelled meanwhile
            ended = await self._advance(conn, t, await _command_result(conn, command_id), wake)
        self._wake(wake)
        if ended:
            self.kick()

    async def _advance(
        self, conn: Connection, t: Row, res: _Result | None, wake: list[str]
    ) -> bool:
        """Move ``t`` on after its command finished; True if the target ended."""
        fam = FAMILIES[t["family"]]
        packet = t["command_packet"] or 0
        if res is None:  # purged: send it again
            await self._send(conn, t, packet, t["packet_sends"], wake)
            return False
        if res.status in (CommandStatus.PENDING, CommandStatus.SENT):  # its result will come
            return False
        sends = t["packet_sends"] + res.attempts
        what = "the OTA command" if fam.protocol == "bkv" else f"packet {packet}"
        if packet == 0 and fam.trigger:
            what = "the upgrade trigger"
        if res.status is CommandStatus.ACKED:
            if fam.protocol == "bkv":
                await self._transferred(conn, t)
                return False
            if packet == 0:
                await self._send(conn, t, 1, 0, wake)
                return False
            index = res.reply.get("packet_index")
            base = t["acked_packets"]
            shifted = index - base if isinstance(index, int) and index > base else 0
            progress = ap3000.verify_replies(t["total_packets"] - base, [(0, shifted)])
            if progress.errors:
                why = f"the device acknowledged packet {index}, expected {packet}"
                return await self._again(conn, t, fam, packet, sends, why, wake)
            await conn.execute(
                """UPDATE upgrade_targets SET acked_packets = $3, updated_at = now()
                   WHERE job_id = $1 AND target_id = $2""",
                t["job_id"],
                t["target_id"],
                base + 1,
            )
            if progress.complete:
                await self._transferred(conn, t)
            else:
                await self._send(conn, t, base + 2, 0, wake)
            return False
        if res.status is CommandStatus.FAILED:
            code = res.result_code
            text = f"{res.result_text or 'result'} ({code})"
            resend = fam.resend_results if packet else frozenset({1})
            if code in resend or (packet == 0 and fam.trigger):
                return await self._again(conn, t, fam, packet, sends, text, wake)
            await _finish(
                conn,
                t["job_id"],
                t["target_id"],
                t,
                TargetEvent.FAILED,
                f"the device refused {what}: {text}",
            )
            return True
        reason = res.dead_reason or "no answer"
        if reason in ("no answer",):
            return await self._again(conn, t, fam, packet, sends, "no answer", wake)
        if reason.startswith("cannot encode") or reason.startswith("no driver"):
            await _finish(
                conn, t["job_id"], t["target_id"], t, TargetEvent.FAILED, f"{what}: {reason}"
            )
            return True
        # offline, taken over, withdrawn: resume after the last acknowledged packet
        # once the device is back (the pass does it)
        await conn.execute(
            """UPDATE upgrade_targets SET command_id = NULL, waiting = $3,
                      waiting_since = coalesce(waiting_since, now()), updated_at = now()
               WHERE job_id = $1 AND target_id = $2""",
            t["job_id"],
            t["target_id"],
            Waiting.OFFLINE.value,
        )
        return False

    async def _again(
        self,
        conn: Connection,
        t: Row,
        fam: Family,
        packet: int,
        sends: int,
        why: str,
        wake: list[str],
    ) -> bool:
        """Send ``packet`` once more, restart (0xF8/0xF9) or fail: True if it ended."""
        limit = 1 + self.settings.firmware_packet_resends
        if fam.restart_after is not None and sends >= fam.restart_after and packet:
            return await self._restart(conn, t, f"packet {packet} failed {sends} times", wake)
        if sends >= limit:
            what = f"packet {packet}" if packet else "the upgrade trigger"
            await _finish(
                conn,
                t["job_id"],
                t["target_id"],
                t,
                TargetEvent.FAILED,
                f"{what} sent {sends} times: {why}",
            )
            return True
        log.info("firmware packet again", device_id=t["target_id"], packet=packet, why=why)
        await self._send(conn, t, packet, sends, wake)
        return False

    async def _restart(self, conn: Connection, t: Row, why: str, wake: list[str]) -> bool:
        """Start the transfer over from packet 1; True if the target failed instead."""
        await _withdraw(conn, [t["command_id"]], "superseded")
        if t["restarts"] >= self.settings.firmware_max_restarts:
            await _finish(
                conn,
                t["job_id"],
                t["target_id"],
                t,
                TargetEvent.FAILED,
                f"restarted {t['restarts']} times, then: {why}",
            )
            return True
        current = TargetState(t["state"])
        await conn.execute(
            """UPDATE upgrade_targets SET state = $3, acked_packets = 0,
                      restarts = restarts + 1, transferred_at = NULL, done_connection = NULL,
                      updated_at = now()
               WHERE job_id = $1 AND target_id = $2 AND state = $4""",
            t["job_id"],
            t["target_id"],
            TARGET_STATES.check(current, TargetEvent.RESTARTED).value,
            current.value,
        )
        log.info("firmware transfer restarted", device_id=t["target_id"], why=why)
        await self._send(conn, t, 1, 0, wake)
        return False

    async def _transferred(self, conn: Connection, t: Row) -> None:
        link = self.ctx.sessions.link_of(t["via_device_id"])
        connection = link.id if link is not None else None
        if connection is None:
            connection = await conn.fetchval(
                "SELECT connection_id FROM devices WHERE device_id = $1", t["via_device_id"]
            )
        current = TargetState(t["state"])
        await conn.execute(
            """UPDATE upgrade_targets SET state = $4, transferred_at = now(),
                      acked_packets = total_packets, command_id = NULL,
                      done_connection = $3, updated_at = now()
               WHERE job_id = $1 AND target_id = $2 AND state = $5""",
            t["job_id"],
            t["target_id"],
            connection,
            TARGET_STATES.check(current, TargetEvent.TRANSFERRED).value,
            current.value,
        )
        log.info("firmware transferred", device_id=t["target_id"], job_id=t["job_id"])

    # -- the pass: stalls and timeouts --

    async def _recover(self, pool: asyncpg.Pool) -> None:
        """Transfers whose command finished unprocessed (a crash), was lost, or that
        wait for their device to come back."""
        wake: list[str] = []
        ended = False
        async with pool.acquire() as conn, conn.transaction():
            stalled = await conn.fetch(
                _TARGET_SQL
                + """ LEFT JOIN commands c ON c.command_id = t.command_id
                      WHERE t.state = $1
                        AND (t.command_id IS NULL OR c.command_id IS NULL
                             OR c.status = ANY($2::text[]))
                      ORDER BY t.updated_at LIMIT 200
                      FOR UPDATE OF t SKIP LOCKED""",
                _T.TRANSFERRING.value,
                state_values(_FINISHED_COMMANDS),
            )
            for t in stalled:  # locked: t is the row's latest version
                if t["command_id"] is not None:
                    result = await _command_result(conn, t["command_id"])
                    ended |= await self._advance(conn, t, result, wake)
                    continue
                ended |= await self._resume(conn, t, wake)
        self._wake(wake)
        if ended:
            self.kick()

    async def _resume(self, conn: Connection, t: Row, wake: list[str]) -> bool:
        """A transfer without a command: resume after the last acknowledged packet once
        the device is back (a gateway: through any device behind it)."""
        fam = FAMILIES[t["family"]]
        via = t["via_device_id"]
        online = await conn.fetchval("SELECT online FROM devices WHERE device_id = $1", via)
        if not online and fam.target != "device":
            via = await conn.fetchval(
                """SELECT device_id FROM devices WHERE gateway_id = $1 AND online
                   ORDER BY device_id LIMIT 1""",
                t["target_id"],
            )
            online = via is not None
        if not online:
            since = t["waiting_since"]
            timeout = self.settings.firmware_offline_timeout_s
            if since is not None and await conn.fetchval(
                "SELECT $1::timestamptz < now() - make_interval(secs => $2)", since, timeout
            ):
                reason = f"offline for more than {timeout:g} s during the transfer"
                await _finish(conn, t["job_id"], t["target_id"], t, TargetEvent.FAILED, reason)
                return True
            await conn.execute(
                """UPDATE upgrade_targets SET waiting = $3,
                          waiting_since = coalesce(waiting_since, now())
                   WHERE job_id = $1 AND target_id = $2""",
                t["job_id"],
                t["target_id"],
                Waiting.OFFLINE.value,
            )
            return False
        await conn.execute(
            "UPDATE upgrade_targets SET via_device_id = $3 WHERE job_id = $1 AND target_id = $2",
            t["job_id"],
            t["target_id"],
            via,
        )
        resumed = {**dict(t), "via_device_id": via}
        acked = t["acked_packets"]
        first = 0 if fam.protocol == "bkv" or (fam.trigger and acked == 0) else acked + 1
        log.info("firmware transfer resumed", device_id=t["target_id"], packet=first)
        await self._send(conn, resumed, first, 0, wake)
        return False

    async def _timeouts(self, pool: asyncpg.Pool) -> None:
        """Rebooting too long: the stored version decides. Queued and offline too long:
        failed."""
        ended = False
        async with pool.acquire() as conn, conn.transaction():
            late = await conn.fetch(
                _TARGET_SQL
                + """ WHERE t.state = $3 AND t.transferred_at < now()
                          - make_interval(secs => CASE WHEN i.protocol = 'bkv' THEN $1::float8
                                                       ELSE $2::float8 END)
                      FOR UPDATE OF t SKIP LOCKED""",
                self.settings.firmware_ota_timeout_s,
                self.settings.firmware_reboot_timeout_s,
                _T.REBOOTING.value,
            )
            for t in late:
                stored = await self._stored_version(conn, t)
                if stored == t["version"]:
                    await _finish(
                        conn,
                        t["job_id"],
                        t["target_id"],
                        t,
                        TargetEvent.VERIFIED,
                        None,
                        reported=stored,
                    )
                else:
                    reason = (
                        f"no version report after the transfer; the device last reported"
                        f" {stored or 'nothing'}, expected {t['version']}"
                    )
                    await _finish(
                        conn,
                        t["job_id"],
                        t["target_id"],
                        t,
                        TargetEvent.FAILED,
                        reason,
                        reported=stored,
                    )
                ended = True
            offline = await conn.fetch(
                _TARGET_SQL
                + """ WHERE t.state = $2 AND t.waiting IS NOT NULL
                        AND t.waiting <> $3
                        AND t.waiting_since < now() - make_interval(secs => $1)
                      FOR UPDATE OF t SKIP LOCKED""",
                self.settings.firmware_offline_timeout_s,
                _T.QUEUED.value,
                Waiting.CHARGING.value,
            )
            for t in offline:
                reason = (
                    f"{t['waiting']} for more than {self.settings.firmware_offline_timeout_s:g} s"
                )
                await _finish(conn, t["job_id"], t["target_id"], t, TargetEvent.FAILED, reason)
                ended = True
        if ended:
            self.kick()

    async def _stored_version(self, conn: Connection, t: Row) -> str | None:
        fam = FAMILIES[t["family"]]
        target_id = t["target_id"]
        if fam.report == "pile":
            value: str | None = await conn.fetchval(
                "SELECT firmware FROM devices WHERE device_id = $1", target_id
            )
            return value
        if fam.report == "board":
            value = await conn.fetchval(
                "SELECT attributes->>'power_board_version' FROM devices WHERE device_id = $1",
                target_id,
            )
            return value
        if fam.report == "subdevices":
            return await _subdevice_version(conn, target_id, t["device_type"])
        value = await conn.fetchval(
            "SELECT firmware FROM gateways WHERE gateway_id = $1", target_id
        )
        return value

    # -- what devices say --

    async def version_report(
        self, target_id: str, report: str, version: str, connection: str
    ) -> None:
        """``target_id`` reports ``version`` (``report``: pile, board, host, subdevices
        or bkv) on ``connection``."""
        pool = self.ctx.pool
        if pool is None:
            return
        async with pool.acquire() as conn, conn.transaction():
            t = await conn.fetchrow(
                _TARGET_SQL
                + """ WHERE t.target_id = $1 AND t.state = ANY($2::text[])
                      FOR UPDATE OF t""",
                target_id,
                state_values(MOVING),
            )
            if t is None or FAMILIES[t["family"]].report != report:
                return
            rebooting = t["state"] == _T.REBOOTING.value
            if version == t["version"] and (
                rebooting or t["acked_packets"] >= t["total_packets"] - 1
            ):
                await _finish(
                    conn, t["job_id"], target_id, t, TargetEvent.VERIFIED, None, reported=version
                )
                log.info("upgrade verified", device_id=target_id, version=version)
            elif rebooting and report != "subdevices" and connection != t["done_connection"]:
                reason = f"rebooted and reports version {version}, expected {t['version']}"
                await _finish(
                    conn, t["job_id"], target_id, t, TargetEvent.FAILED, reason, reported=version
                )
                log.warning("upgrade not applied", device_id=target_id, version=version)
            else:  # before the reboot (or sub-devices still updating): noted only
                await conn.execute(
                    """UPDATE upgrade_targets SET reported_version = $3
                       WHERE job_id = $1 AND target_id = $2""",
                    t["job_id"],
                    target_id,
                    version,
                )
                return
        self.kick()

    async def restart_request(self, target_id: str, families: frozenset[str], source: str) -> bool:
        """The device asks for firmware (0x05, 0xFA packet 0, 0x15): an upgrade in
        progress starts over from packet 1. True if there is one."""
        pool = self.ctx.pool
        if pool is None:
            return False
        wake: list[str] = []
        async with pool.acquire() as conn, conn.transaction():
            t = await conn.fetchrow(
                _TARGET_SQL
                + """ WHERE t.target_id = $1 AND t.state = ANY($2::text[])
                      FOR UPDATE OF t""",
                target_id,
                state_values(MOVING),
            )
            if t is None or t["family"] not in families:
                return False
            ended = await self._restart(conn, t, f"the device asked for firmware ({source})", wake)
        self._wake(wake)
        if ended:
            self.kick()
        return not ended


async def _command_result(conn: Connection, command_id: int) -> _Result | None:
    """The command as the outbox left it (None: purged); ``status`` may still be open."""
    row = await conn.fetchrow(
        """SELECT status, attempts, result_code, result_text, dead_reason, reply
           FROM commands WHERE command_id = $1""",
        command_id,
    )
    if row is None:
        return None
    reply = _json(row["reply"]) or {}
    return _Result(
        CommandStatus(row["status"]),
        row["attempts"],
        row["result_code"],
        row["result_text"],
        row["dead_reason"],
        reply if isinstance(reply, dict) else {},
    )


# === wiring: one engine per gateway, hooks for the outbox and the drivers ===============

_ENGINES: weakref.WeakKeyDictionary[Any, UpgradeEngine] = weakref.WeakKeyDictionary()


def engine_for(ctx: EngineContext) -> UpgradeEngine:
    """The gateway's engine; created, and its passes started, on first use (by the
    API router, the outbox hook or a driver hook, whichever comes first)."""
    engine = _ENGINES.get(ctx)
    if engine is None:
        engine = UpgradeEngine(ctx)
        _ENGINES[ctx] = engine
        ctx.run(engine.run(), "firmware-engine")
    return engine


async def on_command_finished(ctx: EngineContext, command_id: int, name: str) -> None:
    """The outbox's result hook: a packet command drives its transfer on."""
    if name not in _BY_COMMAND:
        return
    try:
        await engine_for(ctx).on_result(command_id)
    except Exception:  # the pass resumes the transfer from the database
        log.exception("firmware result not processed", command_id=command_id)


#: AP3000 messages that concern upgrades (:func:`on_ap3000`)
AP3000_MESSAGES: Final = frozenset(
    {
        ap3000.Registration,
        ap3000.LegacyHeartbeat,
        ap3000.HostHeartbeat,
        ap3000.SubDeviceVersions,
        ap3000.UpgradeRequest,
        ap3000.HostFirmwareReply,
        ap3000.HostFirmwareRequest,
    }
)
_PILE_FAMILIES: Final = frozenset({"0xE0", "0xE1", "0xF8"})


def listen(ctx: EngineContext, driver: MessageHooks) -> None:
    """Register with ``driver`` for what concerns upgrades: version reports and
    requests for firmware (AP3000), the heartbeat's version (BKV OTA)."""
    if driver.protocol == "ap3000":
        for cls in AP3000_MESSAGES:
            driver.on(cls, lambda inbound: on_ap3000(ctx, inbound))
    elif driver.protocol == "bkv":
        driver.on(bkv.Heartbeat, lambda inbound: on_bkv_heartbeat(ctx, inbound))


def on_ap3000(ctx: EngineContext, inbound: Inbound[Message]) -> None:
    """An AP3000 frame that may concern an upgrade (``inbound.owner``: the device, or the
    host speaking for itself; ``inbound.answered``: the command it answered, if any)."""
    engine = engine_for(ctx)
    message, owner, link = inbound.message, inbound.owner, inbound.link
    if isinstance(message, ap3000.HostFirmwareRequest):  # 0x15 always gets an answer
        ctx.run(_legacy_host_request(engine, message, inbound.reply), "firmware-0x15")
        return
    if engine.watch is not None and owner not in engine.watch:
        return
    if isinstance(message, ap3000.Registration):
        ctx.run(engine.version_report(owner, "pile", str(message.firmware_version), link.id), "fw")
        board = message.power_board_version
        if board is not ABSENT:
            ctx.run(engine.version_report(owner, "board", str(board), link.id), "fw")
    elif isinstance(message, ap3000.LegacyHeartbeat | ap3000.HostHeartbeat):
        report = "host" if isinstance(message, ap3000.HostHeartbeat) else "pile"
        ctx.run(engine.version_report(owner, report, str(message.firmware_version), link.id), "fw")
    elif isinstance(message, ap3000.SubDeviceVersions):
        for entry in message.entries:
            version = str(entry.min_firmware_version)
            ctx.run(_subdevice_report(engine, owner, entry.device_type, version, link.id), "fw")
    elif isinstance(message, ap3000.UpgradeRequest):
        ctx.run(_restart(engine, owner, _PILE_FAMILIES, "0x05"), "firmware-restart")
    elif (
        isinstance(message, ap3000.HostFirmwareReply)
        and inbound.answered is None
        and message.packet_index == 0
    ):
        ctx.run(_restart(engine, owner, frozenset({"0xFA"}), "0xFA packet 0"), "firmware-restart")


async def _restart(
    engine: UpgradeEngine, target_id: str, families: frozenset[str], source: str
) -> None:
    await engine.restart_request(target_id, families, source)


async def _subdevice_report(
    engine: UpgradeEngine, host_id: str, device_type: int, version: str, connection: str
) -> None:
    pool = engine.ctx.pool
    if pool is None:
        return
    wanted = await pool.fetchval(
        """SELECT i.device_type FROM upgrade_targets t JOIN upgrade_jobs j USING (job_id)
           JOIN firmware_images i USING (firmware_id)
           WHERE t.target_id = $1 AND t.state = ANY($2::text[])""",
        host_id,
        state_values(MOVING),
    )
    if wanted == device_type:
        await engine.version_report(host_id, "subdevices", version, connection)


async def _legacy_host_request(
    engine: UpgradeEngine, m: ap3000.HostFirmwareRequest, reply: Callable[[Message], None]
) -> None:
    """0x15: answered 0 (0xF9 packets follow, from packet 1) when an upgrade of this host
    is in progress, else 1."""
    restarted = await engine.restart_request(m.phy_id, frozenset({"0xF9"}), "0x15")
    reply(ap3000.HostFirmwareRequestReply(m.phy_id, m.msg_id, result=0 if restarted else 1))


def on_bkv_heartbeat(ctx: EngineContext, inbound: Inbound[bkv.Heartbeat]) -> None:
    """A BKV gateway's heartbeat carries its version: an OTA upgrade may be verified."""
    message = inbound.message
    engine = engine_for(ctx)
    watched = engine.watch is None or message.gateway_id in engine.watch
    if watched and message.firmware_version:
        version = message.firmware_version.strip()
        ctx.run(engine.version_report(message.gateway_id, "bkv", version, inbound.link.id), "fw")


__all__ = [
    "ACTIVE",
    "AP3000_MESSAGES",
    "FAMILIES",
    "HOST_FAMILIES",
    "PILE_FAMILIES",
    "TARGET_STATES",
    "ConflictError",
    "Family",
    "FirmwareError",
    "ImageSpec",
    "NotFoundError",
    "TargetEvent",
    "TargetState",
    "UpgradeEngine",
    "cancel_job",
    "check_target",
    "create_job",
    "delete_image",
    "engine_for",
    "job_view",
    "listen",
    "normalize_family",
    "on_ap3000",
    "on_bkv_heartbeat",
    "on_command_finished",
    "pile_family",
    "select_targets",
    "store_image",
    "validate_image",
]
