"""The read model of gateways and devices: their last known state, ports and event log,
as the API shows them (their audit frames: :mod:`chargegw.domain.frames`).

Lists are keyset pages (:mod:`chargegw.domain.pages`) after the key of the previous
page's last item; every query is bounded by ``QUERY_TIMEOUT_S``. ICCIDs leave masked.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from pydantic import BaseModel, Field

from chargegw.domain.pages import Page, Where, page_of
from chargegw.store.database import Connection

#: longest a read query may run
QUERY_TIMEOUT_S = 10.0


class Gateway(BaseModel):
    """A gateway: the owner of one TCP connection (an AP3000 pile or a BKV gateway)."""

    gateway_id: str = Field(examples=["82231214002700"])
    protocol: str = Field(examples=["bkv"])
    online: bool
    iccid: str | None = Field(
        description="SIM ICCID, masked: first 6 and last 4 characters kept",
        examples=["898604**********1234"],
    )
    imei: str | None
    firmware: str | None
    remote_addr: str | None = Field(examples=["203.0.113.7:50122"])
    connected_at: dt.datetime | None
    last_seen_at: dt.datetime | None
    device_count: int = Field(description="devices (sockets, piles) behind this gateway")


class Device(BaseModel):
    """A charging device, by its canonical chargeproto id."""

    device_id: str = Field(
        description="AP3000: the physical id (`04CEAA40`); BKV: `<gateway_id>-<socket_no>`",
        examples=["04CEAA40"],
    )
    protocol: str = Field(examples=["ap3000"])
    gateway_id: str | None
    phy_id: str | None
    socket_no: int | None
    device_type: int | None
    firmware: str | None
    port_count: int | None
    online: bool
    offline_reason: str | None
    last_seen_at: dt.datetime | None
    last_heartbeat_at: dt.datetime | None
    signal_strength: int | None
    temperature_c: int | None
    voltage_v: float | None
    qr_number: str | None = Field(
        None,
        description="AP3000: the number printed under the pile's QR code (the physical id "
        "without its type byte, in decimal); null for BKV",
        examples=["13544000"],
    )
    iccid: str | None = Field(
        None,
        description="SIM ICCID of the device, masked: first 6 and last 4 characters kept",
        examples=["898604**********4815"],
    )


def qr_number(protocol: str, device_id: str) -> str | None:
    """The number under an AP3000 pile's QR code (ap3000 physical id ``04CEAA40``:
    ``CEAA40`` in decimal, 13544000); None for other devices."""
    if protocol != "ap3000" or len(device_id) != 8:
        return None
    try:
        return str(int(device_id[2:], 16))
    except ValueError:
        return None


def _device_fields(row: Any) -> dict[str, Any]:
    values = dict(row)
    values["iccid"] = mask_iccid(values.get("iccid"))
    values["qr_number"] = qr_number(values["protocol"], values["device_id"])
    return values


_HEX = re.compile(r"[0-9A-Fa-f]{8}")


def search_terms(q: str) -> tuple[str, str | None, str | None]:
    """What a search for ``q`` matches: a LIKE prefix of ids (wildcards escaped); the id
    suffix of an AP3000 QR number (digits: ``13544000`` gives ``CEAA40``); the device id of
    a QR code's URL (its last 8 hex digits are the id in wire order: ``40aace04`` is
    ``04CEAA40``)."""
    q = q.strip()
    like = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    suffix = None
    if q.isdigit() and len(q) <= 8 and int(q) < 1 << 24:
        suffix = "%06X" % int(q)
    from_url = None
    parts = [p for p in re.split(r"[/?#=&]", q) if _HEX.fullmatch(p)] if "/" in q else []
    if parts:
        from_url = bytes.fromhex(parts[-1])[::-1].hex().upper()
    return like, suffix, from_url


class Port(BaseModel):
    """The last reported state of one port."""

    port: int = Field(description="port number, 1-based on both protocols", ge=1)
    status: str = Field(
        description="idle, charging, occupied, full, float, fault or unknown",
        examples=["charging"],
    )
    status_code: int | None = Field(description="the raw status code the device sent")
    status_text: str | None
    power_w: float | None
    voltage_v: float | None
    current_a: float | None
    energy_kwh: float | None
    temperature_c: int | None
    reported_at: dt.datetime


class DeviceDetail(Device):
    """A device with the last reported state of each of its ports."""

    ports: list[Port]
    quirks: list[str] = Field(
        default_factory=list,
        description="the quirk profiles active for the device (docs/quirks.md): those its "
        "connection uses while it is held by this process, else those its stored type "
        "and firmware match",
        examples=[["ap3000-short-charge-reply"]],
    )


class DeviceEvent(BaseModel):
    """One row of a device's event log (online/offline transitions, alarms, ...)."""

    id: int
    at: dt.datetime
    kind: str = Field(examples=["offline"])
    reason: str | None = Field(examples=["heartbeat_timeout"])
    detail: dict[str, Any]


def mask_iccid(iccid: str | None) -> str | None:
    """Keep the first 6 and last 4 characters, ``*`` between; too short: all ``*``."""
    if iccid is None:
        return None
    if len(iccid) <= 10:
        return "*" * len(iccid)
    return iccid[:6] + "*" * (len(iccid) - 10) + iccid[-4:]


def json_object(value: Any) -> dict[str, Any]:
    """A jsonb value as a dict, whether or not the pool has a jsonb codec."""
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else {"value": value}


#: a gateway's last word: an AP3000 pile that is its own gateway moves only its device's
#: time (one row update per frame instead of two); a pile now behind a host is not its own
#: gateway any more
_GATEWAY_SEEN = """GREATEST(g.last_seen_at, (SELECT d.last_seen_at FROM devices d
                                      WHERE d.device_id = g.gateway_id
                                        AND d.gateway_id = g.gateway_id)) AS last_seen_at"""


async def list_gateways(
    conn: Connection,
    *,
    protocol: str | None,
    online: bool | None,
    after: str | None,
    limit: int,
) -> Page[Gateway]:
    """Gateways ordered by id, after the gateway ``after``."""
    where = Where()
    if protocol is not None:
        where.add("g.protocol = {}", protocol)
    if online is not None:
        where.add("g.online = {}", online)
    if after is not None:
        where.add("g.gateway_id > {}", after)
    query = f"""
        SELECT g.gateway_id, g.protocol, g.online, g.iccid, g.imei, g.firmware,
               g.remote_addr, g.connected_at, {_GATEWAY_SEEN},
               (SELECT count(*) FROM devices d WHERE d.gateway_id = g.gateway_id)
                   AS device_count
          FROM gateways g {where.sql()}
         ORDER BY g.gateway_id {where.limit(limit)}"""
    rows = await conn.fetch(query, *where.args, timeout=QUERY_TIMEOUT_S)
    items = [Gateway(**{**dict(r), "iccid": mask_iccid(r["iccid"])}) for r in rows]
    return page_of(items, limit)


async def get_gateway(conn: Connection, gateway_id: str) -> Gateway | None:
    """One gateway (ICCID masked); None if it is not known."""
    row = await conn.fetchrow(
        f"""SELECT g.gateway_id, g.protocol, g.online, g.iccid, g.imei, g.firmware,
                  g.remote_addr, g.connected_at, {_GATEWAY_SEEN},
                  (SELECT count(*) FROM devices d WHERE d.gateway_id = g.gateway_id)
                      AS device_count
             FROM gateways g WHERE g.gateway_id = $1""",
        gateway_id,
        timeout=QUERY_TIMEOUT_S,
    )
    return None if row is None else Gateway(**{**dict(row), "iccid": mask_iccid(row["iccid"])})


_DEVICE_COLUMNS = """device_id, protocol, gateway_id, phy_id, socket_no, device_type,
    firmware, port_count, online, offline_reason, last_seen_at, last_heartbeat_at,
    signal_strength, temperature_c, voltage_v, iccid"""


async def list_devices(
    conn: Connection,
    *,
    protocol: str | None,
    online: bool | None,
    gateway_id: str | None,
    after: str | None,
    limit: int,
    q: str | None = None,
) -> Page[Device]:
    """Devices ordered by device id, after the device ``after``, optionally filtered;
    ``q`` searches (:func:`search_terms`): a device or gateway id prefix, an AP3000 QR
    number or QR code URL, the last digits of an ICCID."""
    where = Where()
    if q is not None and q.strip():
        like, suffix, from_url = search_terms(q)
        where.add(
            """(device_id ILIKE {} || '%' OR gateway_id ILIKE {} || '%'
                OR (length({}) >= 4 AND iccid LIKE '%' || {})
                OR (protocol = 'ap3000' AND substr(device_id, 3) = {})
                OR device_id = {})""",
            like,
            like,
            like,
            like,
            suffix,
            from_url,
        )
    if protocol is not None:
        where.add("protocol = {}", protocol)
    if online is not None:
        where.add("online = {}", online)
    if gateway_id is not None:
        where.add("gateway_id = {}", gateway_id)
    if after is not None:
        where.add("device_id > {}", after)
    query = f"""SELECT {_DEVICE_COLUMNS} FROM devices {where.sql()}
                ORDER BY device_id {where.limit(limit)}"""
    rows = await conn.fetch(query, *where.args, timeout=QUERY_TIMEOUT_S)
    return page_of([Device(**_device_fields(r)) for r in rows], limit)


#: the columns of a port (:class:`Port`'s fields), in the order the detail selects them
_PORT_COLUMNS = (
    "port",
    "status",
    "status_code",
    "status_text",
    "power_w",
    "voltage_v",
    "current_a",
    "energy_kwh",
    "temperature_c",
    "reported_at",
)
#: a port's report time (``ports p`` joined to ``devices d``): its own, or its device's
#: for the ports the device's last periodic report covered (migration 0023)
PORT_REPORTED_AT = "port_reported_at(p.reported_at, p.port, d.reported_ports, d.ports_reported_at)"
#: the ports' columns as the detail selects them
_PORT_SELECT = ", ".join((*_PORT_COLUMNS[:-1], PORT_REPORTED_AT))


async def get_device(conn: Connection, device_id: str) -> DeviceDetail | None:
    """A device with its ports; None if it is not known. One query: the ports come as
    an array of rows beside the device's columns (the most frequent API read)."""
    row = await conn.fetchrow(
        f"""SELECT {_DEVICE_COLUMNS},
                   ARRAY(SELECT ROW({_PORT_SELECT}) FROM ports p
                          WHERE p.device_id = d.device_id ORDER BY p.port) AS ports
              FROM devices d WHERE device_id = $1""",
        device_id,
        timeout=QUERY_TIMEOUT_S,
    )
    if row is None:
        return None
    fields = _device_fields(row)
    ports = [Port(**dict(zip(_PORT_COLUMNS, p, strict=True))) for p in fields.pop("ports")]
    return DeviceDetail(**fields, ports=ports)


async def device_exists(conn: Connection, device_id: str) -> bool:
    """Whether ``device_id`` is a known device."""
    found = await conn.fetchval(
        "SELECT 1 FROM devices WHERE device_id = $1", device_id, timeout=QUERY_TIMEOUT_S
    )
    return found is not None


async def list_events(
    conn: Connection,
    device_id: str,
    *,
    since: dt.datetime | None,
    until: dt.datetime | None,
    kind: str | None,
    after: tuple[dt.datetime, int] | None,
    limit: int,
) -> Page[DeviceEvent]:
    """A device's events in ``[since, until)`` ordered by (at, id), after the key ``after``."""
    where = Where()
    where.add("device_id = {}", device_id)
    if since is not None:
        where.add("at >= {}", since)
    if until is not None:
        where.add("at < {}", until)
    if kind is not None:
        where.add("kind = {}", kind)
    if after is not None:
        where.add("(at, id) > ({}, {})", *after)
    query = f"""SELECT id, at, kind, reason, detail FROM device_events {where.sql()}
                ORDER BY at, id {where.limit(limit)}"""
    rows = await conn.fetch(query, *where.args, timeout=QUERY_TIMEOUT_S)
    items = [DeviceEvent(**{**dict(r), "detail": json_object(r["detail"])}) for r in rows]
    return page_of(items, limit)
