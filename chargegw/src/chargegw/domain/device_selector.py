"""Target selectors shared by parameter-profile jobs and firmware upgrade jobs.

A selector names devices in one of three shapes:

- ``{"device_ids": ["04000001", ...]}``: these (all must be known);
- ``{"device_type": 39, "firmware": "312"}``: devices of this type code, ``firmware``
  optional and compared with the version as stored (decimal for AP3000; BKV sockets
  report no type code, so this form matches none of them);
- ``{"all": true}``: every device of the protocol.

:func:`parse_selector` checks the shape; :func:`select_devices` resolves it against the
``devices`` table. Both raise :class:`SelectorError` with a message for the operator.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from chargegw.store.database import Connection

SELECTOR_FORMS = frozenset({"device_ids", "device_type", "all"})
PROTOCOL_NAMES = {"ap3000": "AP3000", "bkv": "BKV"}
#: device type codes are one byte on the wire (ap3000.md 11.9)
MAX_DEVICE_TYPE = 0xFF


class SelectorError(ValueError):
    """A selector that is malformed or names nothing usable."""


@dataclasses.dataclass(frozen=True)
class Selector:
    """A parsed selector: exactly one of the three forms is set."""

    device_ids: tuple[str, ...] | None = None
    device_type: int | None = None
    firmware: str | None = None
    all: bool = False


def parse_selector(raw: Any) -> Selector:
    """The selector ``raw`` (decoded JSON), or ``SelectorError``."""
    if not isinstance(raw, dict) or len(raw.keys() & SELECTOR_FORMS) != 1:
        raise SelectorError(
            'expected one of {"device_ids": [...]}, {"device_type": n, "firmware": "..."}'
            ' or {"all": true}'
        )
    if "device_ids" in raw:
        ids = raw["device_ids"]
        if set(raw) != {"device_ids"} or not (
            isinstance(ids, list) and ids and all(isinstance(i, str) and i for i in ids)
        ):
            raise SelectorError("device_ids must be a non-empty list of device ids")
        return Selector(device_ids=tuple(dict.fromkeys(ids)))
    if "device_type" in raw:
        device_type, firmware = raw["device_type"], raw.get("firmware")
        if (
            not set(raw) <= {"device_type", "firmware"}
            or not isinstance(device_type, int)
            or isinstance(device_type, bool)
            or not (firmware is None or isinstance(firmware, str))
        ):
            raise SelectorError("device_type must be an integer, firmware a string")
        if not 0 <= device_type <= MAX_DEVICE_TYPE:
            raise SelectorError(f"device_type must be 0-{MAX_DEVICE_TYPE} (a type code byte)")
        return Selector(device_type=device_type, firmware=firmware)
    if raw != {"all": True}:
        raise SelectorError('expected {"all": true}')
    return Selector(all=True)


async def select_devices(conn: Connection, selector: Selector, protocol: str) -> list[str]:
    """The ids of the ``protocol`` devices ``selector`` names; ``SelectorError`` unless
    it names at least one (and, for a list, only known devices of that protocol)."""
    name = PROTOCOL_NAMES.get(protocol, protocol)
    if selector.device_ids is not None:
        ids = list(selector.device_ids)
        rows = await conn.fetch(
            "SELECT device_id, protocol FROM devices WHERE device_id = ANY($1::text[])", ids
        )
        protocols = {r["device_id"]: r["protocol"] for r in rows}
        unknown = [i for i in ids if i not in protocols]
        if unknown:
            raise SelectorError(f"unknown devices: {', '.join(unknown)}")
        other = [i for i in ids if protocols[i] != protocol]
        if other:
            raise SelectorError(f"not {name} devices: {', '.join(other)}")
        return ids
    if selector.device_type is not None:
        rows = await conn.fetch(
            """SELECT device_id FROM devices
               WHERE protocol = $3 AND device_type = $1
                 AND ($2::text IS NULL OR firmware = $2) ORDER BY device_id""",
            selector.device_type,
            selector.firmware,
            protocol,
        )
    else:
        rows = await conn.fetch(
            "SELECT device_id FROM devices WHERE protocol = $1 ORDER BY device_id", protocol
        )
    if not rows:
        raise SelectorError(f"no {name} device matches")
    return [r["device_id"] for r in rows]
