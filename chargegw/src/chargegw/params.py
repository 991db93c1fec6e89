"""AP3000 device parameters with read-back verification.

A parameter group is only *verified* when the device reads it back: the API stores
what is desired and enqueues the set command (0x83-0x86) followed by its read-back
(0x90-0x93). Every read-back reply, whoever asked for it, is compared field by field
with what is desired: ``verified`` when they agree, ``mismatch`` with a per-field diff
when they do not.

Statuses: ``pending`` (commands queued), ``applying`` (the device accepted the set
command, the read-back is outstanding), ``verified``, ``mismatch``, ``failed`` (the
device refused the set command, or a command died).
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from chargeproto import EncodeError, Message, ap3000

from .core import split_device_id
from .drivers import ap3000_commands
from .outbox import Priority

if TYPE_CHECKING:
    from .outbox import Outbox

log = structlog.get_logger("chargegw.params")


@dataclasses.dataclass(frozen=True)
class Group:
    """One AP3000 parameter group: its set command, read-back command and reply."""

    name: str
    set_command: str
    read_command: str
    set_class: type[ap3000.Ap3000Message]
    set_reply: type[ap3000.Ap3000Message]
    read_reply: type[ap3000.Ap3000Message]

    @property
    def fields(self) -> tuple[str, ...]:
        skip = {"phy_id", "msg_id", "trailing_hex"}
        return tuple(f.name for f in dataclasses.fields(self.set_class) if f.name not in skip)

    @property
    def float_fields(self) -> frozenset[str]:
        return frozenset(
            f.name for f in dataclasses.fields(self.set_class) if "float" in str(f.type)
        )


GROUPS: dict[str, Group] = {
    "running1": Group(
        "running1",
        "set_running_params1",
        "read_running_params1",
        ap3000.SetRunningParams1,
        ap3000.SetRunningParams1Reply,
        ap3000.RunningParams1,
    ),
    "running2": Group(
        "running2",
        "set_running_params2",
        "read_running_params2",
        ap3000.SetRunningParams2,
        ap3000.SetRunningParams2Reply,
        ap3000.RunningParams2,
    ),
    "limits": Group(
        "limits",
        "set_limits",
        "read_limits",
        ap3000.SetLimits,
        ap3000.SetLimitsReply,
        ap3000.Limits,
    ),
    "card": Group(
        "card",
        "set_card_params",
        "read_card_params",
        ap3000.SetCardParams,
        ap3000.SetCardParamsReply,
        ap3000.CardParams,
    ),
}
#: reply class -> group, for the driver's hook
_BY_READ_REPLY: dict[type[Message], Group] = {g.read_reply: g for g in GROUPS.values()}
_BY_SET_REPLY: dict[type[Message], Group] = {g.set_reply: g for g in GROUPS.values()}
#: reply classes the driver hands to :func:`on_reply`
REPLIES = frozenset({*_BY_READ_REPLY, *_BY_SET_REPLY})
#: wire resolution of every float field of these groups (all are 0.1 units, ap3000.md 9.4-9.6)
RESOLUTION = 0.1
#: fields shown masked by the API (card keys are secrets)
SECRET_FIELDS = frozenset({"user_card_key", "new_card_key"})


class ParamsError(ValueError):
    """A parameter request that cannot be sent; names the group and field."""

    def __init__(self, message: str, group: str | None, field: str | None) -> None:
        super().__init__(message)
        self.group = group
        self.field = field


class DeviceNotFoundError(LookupError):
    """The device is not known."""


class UnsupportedDeviceError(ValueError):
    """The device speaks a protocol whose parameters are not supported yet."""


def quantize(group: Group, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as the device will hold them: floats rounded to the wire resolution."""
    out = dict(values)
    for name in group.float_fields & out.keys():
        value = out[name]
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = round(round(value / RESOLUTION) * RESOLUTION, 6)
    return out


def prepare(
    device_id: str, group_name: str, values: dict[str, Any], base: dict[str, Any] | None
) -> dict[str, Any]:
    """The full desired values of a group: ``values`` over ``base`` (the last desired or
    reported values), validated against the AP3000 definition; ``ParamsError`` if not."""
    group = GROUPS.get(group_name)
    if group is None:
        raise ParamsError(
            f"unknown parameter group {group_name!r}; known: {', '.join(GROUPS)}", group_name, None
        )
    if not isinstance(values, dict) or not values:
        raise ParamsError(f"{group_name}: expected an object of fields", group_name, None)
    unknown = sorted(set(values) - set(group.fields))
    if unknown:
        raise ParamsError(
            f"{group_name}: unknown field {unknown[0]!r}; known: {', '.join(group.fields)}",
            group_name,
            unknown[0],
        )
    known = {k: v for k, v in (base or {}).items() if k in group.fields}
    desired = {**known, **values}
    try:
        ap3000_commands.validate(device_id, group.set_command, desired)
    except EncodeError as exc:
        raise ParamsError(f"{group_name}: {exc}", group_name, exc.field) from None
    return quantize(group, desired)


async def apply(
    outbox: Outbox,
    conn: asyncpg.pool.PoolConnectionProxy,
    device_id: str,
    body: dict[str, Any],
    *,
    expires_s: float,
) -> dict[str, dict[str, Any]]:
    """Store ``body`` (group -> fields) as desired for ``device_id`` and queue each group's
    set command and read-back, inside the caller's transaction (wake the outbox after it
    commits). Everything is validated before anything is queued: ``ParamsError``,
    ``DeviceNotFoundError`` or ``UnsupportedDeviceError`` otherwise.

    Returns group -> ``desired``, ``set_command_id``, ``read_command_id``."""
    row = await conn.fetchrow(
        "SELECT protocol FROM devices WHERE device_id = $1 FOR UPDATE", device_id
    )
    if row is None:
        raise DeviceNotFoundError(f"device {device_id} not found")
    if row["protocol"] != "ap3000":
        raise UnsupportedDeviceError(
            f"parameters of {row['protocol']} devices are not supported yet"
        )
    existing = {
        r["group"]: r
        for r in await conn.fetch(
            """SELECT "group", desired, reported FROM device_params WHERE device_id = $1""",
            device_id,
        )
    }
    desired: dict[str, dict[str, Any]] = {}
    phy = split_device_id(device_id)[0]
    for name, values in body.items():  # validate everything before sending anything
        old = existing.get(name)
        base = None
        if old is not None:
            base = json.loads(old["desired"] or old["reported"] or "null")
        desired[name] = prepare(phy, name, values, base)
    accepted: dict[str, dict[str, Any]] = {}
    for name, values in desired.items():
        group = GROUPS[name]
        ids = []
        for command, params in ((group.set_command, values), (group.read_command, {})):
            ids.append(
                await outbox.submit(
                    conn,
                    device_id=device_id,
                    protocol="ap3000",
                    name=command,
                    params=params,
                    priority=Priority.PARAMETER,
                    expires_s=expires_s,
                )
            )
        await conn.execute(
            """INSERT INTO device_params (device_id, "group", desired, desired_at,
                                          status, diff, verified_at, failure_reason,
                                          set_command_id, read_command_id)
               VALUES ($1, $2, $3, now(), 'pending', NULL, NULL, NULL, $4, $5)
               ON CONFLICT (device_id, "group") DO UPDATE SET
                   desired = excluded.desired, desired_at = now(),
                   status = 'pending', diff = NULL, verified_at = NULL,
                   failure_reason = NULL, set_command_id = excluded.set_command_id,
                   read_command_id = excluded.read_command_id""",
            device_id,
            name,
            json.dumps(values),
            ids[0],
            ids[1],
        )
        accepted[name] = {"desired": values, "set_command_id": ids[0], "read_command_id": ids[1]}
    return accepted


async def mark_dead_commands(conn: asyncpg.pool.PoolConnectionProxy, device_ids: list[str]) -> None:
    """Groups of ``device_ids`` whose queued set or read-back failed or died: ``failed``."""
    await conn.execute(
        """UPDATE device_params p SET status = 'failed',
                  failure_reason = c.name || ' ' || c.status
                      || coalesce(': ' || coalesce(c.result_text, c.dead_reason), '')
           FROM commands c
           WHERE p.device_id = ANY($1::text[]) AND p.status IN ('pending', 'applying')
             AND c.command_id IN (p.set_command_id, p.read_command_id)
             AND c.status IN ('failed', 'dead')""",
        device_ids,
    )


def compare(
    group: Group, desired: dict[str, Any], reported: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Fields of ``desired`` the device reports otherwise: field -> desired, reported."""
    diff: dict[str, dict[str, Any]] = {}
    for name, want in desired.items():
        have = reported.get(name)
        if name in group.float_fields and isinstance(want, int | float) and have is not None:
            same = isinstance(have, int | float) and abs(want - have) < RESOLUTION / 2
        elif isinstance(want, str) and isinstance(have, str):
            same = want.upper() == have.upper()
        else:
            same = want == have
        if not same:
            diff[name] = {"desired": want, "reported": have}
    return diff


def reported_fields(group: Group, message: Message) -> dict[str, Any]:
    fields = message.to_fields()
    return {k: v for k, v in fields.items() if k in group.fields}


async def on_reply(
    pool: asyncpg.Pool | None, device_id: str, message: Message, command_id: int | None
) -> None:
    """A set or read-back reply from ``device_id`` (``command_id``: the outbox command it
    answered, if any)."""
    if pool is None:
        return
    group = _BY_READ_REPLY.get(type(message))
    if group is not None:
        await _read_back(pool, device_id, group, reported_fields(group, message))
        return
    group = _BY_SET_REPLY.get(type(message))
    if group is None or command_id is None:
        return
    result = getattr(message, "result", None)
    if result == 0:
        await pool.execute(
            """UPDATE device_params SET status = 'applying'
               WHERE device_id = $1 AND "group" = $2 AND set_command_id = $3
                 AND status = 'pending'""",
            device_id,
            group.name,
            command_id,
        )
        return
    text = message.to_fields().get("result_text")
    await pool.execute(
        """UPDATE device_params SET status = 'failed', failure_reason = $4
           WHERE device_id = $1 AND "group" = $2 AND set_command_id = $3""",
        device_id,
        group.name,
        command_id,
        f"the device refused {group.set_command}: {text or result}",
    )


async def _read_back(
    pool: asyncpg.Pool, device_id: str, group: Group, reported: dict[str, Any]
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM devices WHERE device_id = $1", device_id):
            return
        row = await conn.fetchrow(
            """SELECT desired, status FROM device_params
               WHERE device_id = $1 AND "group" = $2 FOR UPDATE""",
            device_id,
            group.name,
        )
        if row is None or row["desired"] is None:
            await conn.execute(
                """INSERT INTO device_params (device_id, "group", reported, reported_at)
                   VALUES ($1, $2, $3, now())
                   ON CONFLICT (device_id, "group")
                   DO UPDATE SET reported = excluded.reported, reported_at = now()""",
                device_id,
                group.name,
                json.dumps(reported),
            )
            return
        if row["status"] == "failed":  # the set was refused: keep saying so
            await conn.execute(
                """UPDATE device_params SET reported = $3, reported_at = now()
                   WHERE device_id = $1 AND "group" = $2""",
                device_id,
                group.name,
                json.dumps(reported),
            )
            return
        diff = compare(group, json.loads(row["desired"]), reported)
        status = "mismatch" if diff else "verified"
        await conn.execute(
            """UPDATE device_params SET reported = $3, reported_at = now(), status = $4,
                      diff = $5,
                      verified_at = CASE WHEN $4 = 'verified' THEN now() ELSE verified_at END
               WHERE device_id = $1 AND "group" = $2""",
            device_id,
            group.name,
            json.dumps(reported),
            status,
            json.dumps(diff) if diff else None,
        )
    log.info("parameters read back", device_id=device_id, group=group.name, status=status)
