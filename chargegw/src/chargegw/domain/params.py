"""Device parameters with read-back verification, for AP3000 and BKV devices.

A parameter group is only *verified* when the device reads it back: the API stores
what is desired and queues the group's set command followed by its read-back through
the outbox (AP3000 0x83-0x86 / 0x90-0x93, BKV 0x1000/0x1011 / 0x1012). Every read-back
reply, whoever asked for it, is compared field by field, at the wire resolution, with
what is desired: ``verified`` when they agree, ``mismatch`` with a per-field diff when
they do not. Groups the protocol can only set (AP3000 0x97 mute, 0x8D work mode, 0x8F
card mode, 0x8E QR code; BKV 0x0015/0x1B voice windows) are ``acknowledged`` on the
device's positive reply, never ``verified`` by it; the work mode is verified later by
the 0x20 registration, which reports it.

Statuses of a group (:class:`ParamStatus`, the table :data:`GROUP_STATES`)::

    (none) | any --values queued (PUT, job, drift correction)--> pending
    pending --set accepted--> applying       (the read-back is outstanding)
    pending --set accepted, no read-back--> acknowledged
    pending | applying --set refused, a command failed or died--> failed
    any --read-back equals desired--> verified
    any --read-back differs--> mismatch     (mismatch --reapplied--> pending)

A group never ends: new desired values start it again, and every read-back is compared.
A read-back moves a group in progress only when it answers the group's own read-back
(or, for a group without one, once the set command reached the device), and a failed
group only when it is a drift check and the device did not refuse the set.

Drift: after a device reconnects (AP3000: a 0x20 registration that does not answer a
0x81 query; BKV: the first status of a socket on a new connection) its desired groups
are read back again, batched and paced (``params_drift_checks_per_s``). Values that
differ are a ``param_drift`` event and are set again when ``params_reapply_on_drift``
is on. Every status change writes its ``device_events`` row in the same transaction.

Profile jobs (``param_jobs``) start their devices at most ``rate_per_min`` in any 60 s
and with at most ``concurrency`` in progress; any process may start them, under the
job row's lock (``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import json
import re
import time
import types
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import structlog

from chargegw.audit import mask_text
from chargegw.core import EventKind
from chargegw.domain.machine import StateMachine, state_values
from chargegw.domain.outbox import CommandStatus, Priority
from chargegw.domain.passes import run_passes
from chargegw.domain.ports import (
    CommandCheck,
    EngineContext,
    Inbound,
    MessageHooks,
    command_name,
)
from chargegw.store.database import Connection
from chargeproto import EncodeError, Message, ap3000, bkv

if TYPE_CHECKING:
    from chargegw.domain.outbox import Outbox
    from chargegw.net.transport import DeviceLink

log = structlog.get_logger("chargegw.domain.params")


# --- the state machine of a group --------------------------------------------------------


class ParamStatus(str, enum.Enum):
    """``device_params.status`` of a group with desired values."""

    PENDING = "pending"
    APPLYING = "applying"
    VERIFIED = "verified"
    ACKNOWLEDGED = "acknowledged"
    MISMATCH = "mismatch"
    FAILED = "failed"


class ParamEvent(str, enum.Enum):
    """What moves a group."""

    #: desired values stored, their set command (and read-back) queued
    QUEUED = "queued"
    #: the desired values set again after a drift (``params_reapply_on_drift``)
    REAPPLIED = "reapplied"
    #: the device accepted the set command; its read-back follows
    SET_ACCEPTED = "set_accepted"
    #: the device accepted the set command of a group without a read-back
    ACKNOWLEDGED = "acknowledged"
    #: the device refused the set command, or the set or read-back failed or died
    FAILED = "failed"
    #: a read-back (or a report such as the 0x20 work mode) equals the desired values
    MATCHED = "matched"
    #: ... differs from them
    DIFFERS = "differs"


_P = ParamStatus
#: (from, event) -> to; from None: the group had no desired values
GROUP_STATES: Final = StateMachine[ParamStatus, ParamEvent](
    "parameter group",
    {
        **{(state, ParamEvent.QUEUED): _P.PENDING for state in (None, *ParamStatus)},
        (_P.MISMATCH, ParamEvent.REAPPLIED): _P.PENDING,
        (_P.PENDING, ParamEvent.SET_ACCEPTED): _P.APPLYING,
        (_P.PENDING, ParamEvent.ACKNOWLEDGED): _P.ACKNOWLEDGED,
        (_P.PENDING, ParamEvent.FAILED): _P.FAILED,
        (_P.APPLYING, ParamEvent.FAILED): _P.FAILED,
        **{(state, ParamEvent.MATCHED): _P.VERIFIED for state in ParamStatus},
        **{(state, ParamEvent.DIFFERS): _P.MISMATCH for state in ParamStatus},
    },
)


class MemberStatus(str, enum.Enum):
    """``param_job_devices.status``: ``queued`` until the job starts the device, then
    ``pending`` (or ``failed``: its groups do not fit it); once started, the job view
    stores the summary of its groups' statuses (or ``superseded``)."""

    QUEUED = "queued"
    PENDING = "pending"
    APPLYING = "applying"
    VERIFIED = "verified"
    ACKNOWLEDGED = "acknowledged"
    MISMATCH = "mismatch"
    FAILED = "failed"
    SUPERSEDED = "superseded"


# --- groups ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FieldRule:
    """A range the protocol reference gives beyond what the field's wire size allows
    (the codec checks sizes, types and lengths)."""

    #: the only values allowed
    values: frozenset[int] | None = None
    low: float | None = None
    high: float | None = None
    #: a check of its own: the error message, or None
    check: Callable[[Any], str | None] | None = None
    #: where the range comes from
    source: str = ""

    def error(self, value: Any) -> str | None:
        """Why ``value`` is out of range, or None."""
        if self.check is not None:
            return self.check(value)
        if self.values is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)  # a list or an object is not hashable
            or value not in self.values
        ):
            allowed = ", ".join(str(v) for v in sorted(self.values))
            return f"must be one of {allowed} ({self.source}), got {value!r}"
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None  # the codec names the type error
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            return f"must be {self.low:g}-{self.high:g} ({self.source}), got {value!r}"
        return None


_NO_VALUES: Final[Mapping[str, Any]] = types.MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class Group:
    """One parameter group: the command that sets it, the one that reads it back (None:
    the protocol has none) and its fields."""

    name: str
    protocol: str
    set_command: str
    read_command: str | None
    fields: tuple[str, ...]
    #: float fields -> their wire resolution (0.1 W, 0.001 A ...)
    resolution: Mapping[str, float]
    #: where the group is defined
    reference: str
    #: the set command may carry only some fields (BKV 0x1011: "only the parameters to
    #: change"); otherwise it carries the whole group
    partial: bool = False
    #: fields of the set command that are not parameters (reserved bytes, the jack)
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=lambda: _NO_VALUES)
    rules: Mapping[str, FieldRule] = dataclasses.field(default_factory=lambda: _NO_VALUES)

    def payload(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The set command's parameters for ``values``."""
        return {**self.fixed, **values}


_AP3000_SKIP = frozenset({"phy_id", "msg_id", "trailing_hex"})


def _ap3000(
    name: str,
    set_cls: type[ap3000.Ap3000Message],
    read_cls: type[ap3000.Ap3000Message] | None,
    reference: str,
    *,
    fixed: Mapping[str, Any] = _NO_VALUES,
    rules: Mapping[str, FieldRule] = _NO_VALUES,
) -> Group:
    names = [f.name for f in dataclasses.fields(set_cls) if f.name not in _AP3000_SKIP]
    floats = {
        f.name: 0.1  # every AP3000 power and voltage travels in 0.1 units (ap3000.md 5)
        for f in dataclasses.fields(set_cls)
        if "float" in str(f.type)
    }
    command = command_name(set_cls)
    read = None if read_cls is None else command_name(read_cls)
    return Group(
        name,
        "ap3000",
        command,
        read,
        tuple(n for n in names if n not in fixed),
        types.MappingProxyType(floats),
        reference,
        fixed=types.MappingProxyType(dict(fixed)),
        rules=types.MappingProxyType(dict(rules)),
    )


_HHMM = re.compile(r"(?:[01]\d|2[0-3]):[0-5]\d")


def _periods_error(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) > 2:
        return "a list of at most 2 periods (bkv.md 7.8)"
    for period in value:
        if not isinstance(period, dict) or set(period) != {"start", "end"}:
            return 'each period is {"start": "HH:MM", "end": "HH:MM"} (bkv.md 7.8)'
        for moment in (period["start"], period["end"]):
            if not (isinstance(moment, str) and _HHMM.fullmatch(moment)):
                return f"{moment!r} is not a time of day HH:MM, 00:00-23:59 (bkv.md 7.8)"
    return None


_ON_OFF_AP = frozenset({0, 1})
_BKV_PARAMS: Final = (
    "full_charge_power_w",
    "trickle_threshold_pct",
    "full_charge_delay_s",
    "no_load_power_w",
    "no_load_delay_s",
    "max_charge_duration_min",
    "high_temperature_c",
    "power_limit_w",
    "overcurrent_limit_a",
    "key_base_amount_cent",
    "anti_pulse_time_raw",
)


def _voice_window(name: str, port: int) -> Group:
    on_off = FieldRule(values=_ON_OFF_AP, source="bkv.md 11.5")
    return Group(
        name,
        "bkv",
        "voice_window",
        None,
        ("buzzer", "voice", "periods"),
        _NO_VALUES,
        f"bkv.md 7.8 (jack {'AB'[port]})",
        fixed=types.MappingProxyType({"port": port}),
        rules=types.MappingProxyType(
            {"buzzer": on_off, "voice": on_off, "periods": FieldRule(check=_periods_error)}
        ),
    )


_GROUP_LIST: Final = (
    _ap3000(
        "running1",
        ap3000.SetRunningParams1,
        ap3000.ReadRunningParams1,
        "ap3000.md 9.4",
        rules={"float_percent": FieldRule(low=1, high=100, source="ap3000.md 9.4")},
    ),
    _ap3000(
        "running2",
        ap3000.SetRunningParams2,
        ap3000.ReadRunningParams2,
        "ap3000.md 9.5",
        rules={"qr_light": FieldRule(values=_ON_OFF_AP, source="ap3000.md 9.5")},
    ),
    _ap3000(
        "limits",
        ap3000.SetLimits,
        ap3000.ReadLimits,
        "ap3000.md 9.6",
        # "at most 2000 W on dual/multi-port devices, 3500 W on high-power models"
        rules={"overload_power_w": FieldRule(low=0, high=3500, source="ap3000.md 9.6")},
    ),
    _ap3000("card", ap3000.SetCardParams, ap3000.ReadCardParams, "ap3000.md 9.7"),
    _ap3000(
        "mute",
        ap3000.SetRunningParams3,
        None,
        "ap3000.md 9.19",
        rules={"mute_mode": FieldRule(values=_ON_OFF_AP, source="ap3000.md 11.17")},
    ),
    _ap3000(
        "work_mode",
        ap3000.SetWorkMode,
        None,
        "ap3000.md 9.13",
        rules={"work_mode": FieldRule(values=_ON_OFF_AP, source="ap3000.md 9.13")},
    ),
    _ap3000(
        "card_mode",
        ap3000.SetTcCardMode,
        None,
        "ap3000.md 9.15",
        rules={
            "tc_card_mode": FieldRule(
                values=frozenset({0, 1, 3, 4, 5, 6}), source="ap3000.md 11.12"
            )
        },
    ),
    _ap3000(
        "qr_code",
        ap3000.SetQrCode,
        None,
        "ap3000.md 9.14",
        fixed={"reserved": "000000"},  # "unused, send zeros"
        rules={"main_screen_type": FieldRule(values=_ON_OFF_AP, source="ap3000.md 11.17")},
    ),
    Group(
        "socket_params",
        "bkv",
        "set_params",
        "query_params",
        _BKV_PARAMS,
        types.MappingProxyType(
            {
                "full_charge_power_w": 0.1,
                "no_load_power_w": 0.1,
                "power_limit_w": 0.1,
                "overcurrent_limit_a": 0.001,
            }
        ),
        "bkv.md 9.7",
        partial=True,
        rules=types.MappingProxyType(
            {"trickle_threshold_pct": FieldRule(low=0, high=100, source="bkv.md 9.3: %")}
        ),
    ),
    _voice_window("voice_window_a", 0),
    _voice_window("voice_window_b", 1),
)
#: every group by name (names are unique across protocols)
GROUPS: Final[Mapping[str, Group]] = types.MappingProxyType({g.name: g for g in _GROUP_LIST})
#: protocol -> its groups
PROTOCOL_GROUPS: Final[Mapping[str, Mapping[str, Group]]] = types.MappingProxyType(
    {
        protocol: types.MappingProxyType({g.name: g for g in _GROUP_LIST if g.protocol == protocol})
        for protocol in ("ap3000", "bkv")
    }
)

#: AP3000 reply class -> (group, "set" or "read")
_AP3000_REPLIES: Final[dict[type[Message], tuple[Group, str]]] = {
    ap3000.SetRunningParams1Reply: (GROUPS["running1"], "set"),
    ap3000.RunningParams1: (GROUPS["running1"], "read"),
    ap3000.SetRunningParams2Reply: (GROUPS["running2"], "set"),
    ap3000.RunningParams2: (GROUPS["running2"], "read"),
    ap3000.SetLimitsReply: (GROUPS["limits"], "set"),
    ap3000.Limits: (GROUPS["limits"], "read"),
    ap3000.SetCardParamsReply: (GROUPS["card"], "set"),
    ap3000.CardParams: (GROUPS["card"], "read"),
    ap3000.SetRunningParams3Reply: (GROUPS["mute"], "set"),
    ap3000.SetWorkModeReply: (GROUPS["work_mode"], "set"),
    ap3000.SetTcCardModeReply: (GROUPS["card_mode"], "set"),
    ap3000.SetQrCodeReply: (GROUPS["qr_code"], "set"),
}
#: reply classes handed to :func:`on_reply`, by protocol
PROTOCOL_REPLIES: Final[Mapping[str, frozenset[type[Message]]]] = types.MappingProxyType(
    {
        "ap3000": frozenset(_AP3000_REPLIES),
        "bkv": frozenset({bkv.SetParamsReply, bkv.ParamsReport, bkv.VoiceWindowReply}),
    }
)
REPLIES: Final = frozenset().union(*PROTOCOL_REPLIES.values())
#: fields shown masked by the API and in events (card keys are secrets)
SECRET_FIELDS: Final = frozenset({"user_card_key", "new_card_key"})
#: statuses of a group whose commands are still on their way
IN_PROGRESS: Final = frozenset({ParamStatus.PENDING, ParamStatus.APPLYING})
#: a command in these ended without doing its work
_GAVE_UP: Final = frozenset({CommandStatus.FAILED, CommandStatus.DEAD})
#: a command in these is still on its way
_ON_ITS_WAY: Final = frozenset({CommandStatus.PENDING, CommandStatus.SENT})
#: a set command in these reached the device
_DELIVERED: Final = frozenset({CommandStatus.SENT, CommandStatus.ACKED})
#: groups read back after a reconnect (and ``failed`` ones the device did not refuse)
_CHECKABLE: Final = frozenset(
    {ParamStatus.VERIFIED, ParamStatus.ACKNOWLEDGED, ParamStatus.MISMATCH}
)


def _command_status(value: str | None) -> CommandStatus | None:
    """A joined command's status (None: no such command, or purged)."""
    return None if value is None else CommandStatus(value)


#: a device id to validate profiles with, per protocol (the encoding does not depend
#: on the physical id; a BKV socket needs a socket number)
ANY_DEVICE: Final[Mapping[str, str]] = types.MappingProxyType(
    {"ap3000": "00000000", "bkv": "00000000000000-1"}
)


def reply_group(message: Message) -> tuple[Group, str] | None:
    """The group a device's reply concerns and whether it answers the set command
    (``"set"``) or the read-back (``"read"``)."""
    found = _AP3000_REPLIES.get(type(message))
    if found is not None:
        return found
    if isinstance(message, bkv.SetParamsReply):
        return GROUPS["socket_params"], "set"
    if isinstance(message, bkv.ParamsReport):
        return GROUPS["socket_params"], "read"
    if isinstance(message, bkv.VoiceWindowReply) and message.port in (0, 1):
        return GROUPS[("voice_window_a", "voice_window_b")[message.port]], "set"
    return None


def _success(group: Group, message: Message) -> bool:
    result = getattr(message, "result", None)
    return result == (0 if group.protocol == "ap3000" else 1)


# --- validation ------------------------------------------------------------------------


class ParamsError(ValueError):
    """A parameter request that cannot be sent; names the group and field."""

    def __init__(self, message: str, group: str | None, field: str | None) -> None:
        super().__init__(message)
        self.group = group
        self.field = field


class DeviceNotFoundError(LookupError):
    """The device is not known."""


class UnsupportedDeviceError(ValueError):
    """The device speaks a protocol without parameter groups."""


def quantize(group: Group, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as the device will hold them: floats rounded to the wire resolution."""
    out = dict(values)
    for name in group.resolution.keys() & out.keys():
        value, step = out[name], group.resolution[name]
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = round(round(value / step) * step, 6)
    return out


#: protocol -> its command encoding, which checks set commands (the drivers' codecs,
#: installed by the composition root: :func:`use_encodings`)
_ENCODINGS: dict[str, CommandCheck] = {}


def use_encodings(encodings: Mapping[str, CommandCheck]) -> None:
    """Check set commands with ``encodings`` (protocol -> the driver's command codec)."""
    _ENCODINGS.update(encodings)


def prepare(
    protocol: str,
    device_id: str,
    group_name: str,
    values: Any,
    base: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The desired values of a group of a ``protocol`` device: ``values`` over ``base``
    (the last desired or reported values), validated against the reference's ranges and
    the codec; ``ParamsError`` naming the group and field if not."""
    groups = PROTOCOL_GROUPS.get(protocol, {})
    group = groups.get(group_name)
    if group is None:
        raise ParamsError(
            f"unknown parameter group {group_name!r} for {protocol} devices;"
            f" known: {', '.join(groups)}",
            group_name,
            None,
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
    for name, value in desired.items():
        rule = group.rules.get(name)
        problem = None if rule is None else rule.error(value)
        if problem is not None:
            raise ParamsError(f"{group_name}: {name} {problem}", group_name, name)
    encoding = _ENCODINGS.get(group.protocol)
    if encoding is None:
        raise RuntimeError(f"no {group.protocol} command encoding installed (use_encodings)")
    try:
        encoding.validate(device_id, group.set_command, group.payload(desired))
    except EncodeError as exc:
        raise ParamsError(f"{group_name}: {exc}", group_name, exc.field) from None
    return quantize(group, desired)


# --- applying --------------------------------------------------------------------------


async def apply(
    outbox: Outbox,
    conn: Connection,
    device_id: str,
    body: Mapping[str, Any],
    *,
    expires_s: float,
    job_id: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Store ``body`` (group -> fields) as desired for ``device_id`` and queue each group's
    set command and read-back, inside the caller's transaction (wake the outbox after it
    commits). Everything is validated before anything is queued: ``ParamsError``,
    ``DeviceNotFoundError`` or ``UnsupportedDeviceError`` otherwise. ``job_id``: the
    profile job applying it.

    Returns group -> ``desired``, ``set_command_id``, ``read_command_id``."""
    row = await conn.fetchrow(
        "SELECT protocol FROM devices WHERE device_id = $1 FOR UPDATE", device_id
    )
    if row is None:
        raise DeviceNotFoundError(f"device {device_id} not found")
    protocol = row["protocol"]
    if protocol not in PROTOCOL_GROUPS:
        raise UnsupportedDeviceError(f"{protocol} devices have no parameter groups")
    existing = {
        r["group"]: r
        for r in await conn.fetch(
            """SELECT "group", desired, reported FROM device_params WHERE device_id = $1""",
            device_id,
        )
    }
    desired: dict[str, dict[str, Any]] = {}
    for name, values in body.items():  # validate everything before sending anything
        old = existing.get(name)
        base = None
        if old is not None:
            base = _json(old["desired"]) or _json(old["reported"])
        desired[name] = prepare(protocol, device_id, name, values, base)
    accepted: dict[str, dict[str, Any]] = {}
    for name, values in desired.items():
        set_id, read_id = await _queue(
            outbox, conn, device_id, GROUPS[name], values, expires_s=expires_s, job_id=job_id
        )
        accepted[name] = {"desired": values, "set_command_id": set_id, "read_command_id": read_id}
    return accepted


async def _queue(
    outbox: Outbox,
    conn: Connection,
    device_id: str,
    group: Group,
    values: dict[str, Any],
    *,
    expires_s: float,
    job_id: int | None,
    reapply: bool = False,
) -> tuple[int, int | None]:
    """Queue ``group``'s set command (and read-back) and mark the group ``pending``;
    ``reapply``: the desired values stay as they are (a drift correction)."""
    ids: list[int | None] = []
    for command, params in ((group.set_command, group.payload(values)), (group.read_command, {})):
        if command is None:
            ids.append(None)
            continue
        ids.append(
            await outbox.submit(
                conn,
                device_id=device_id,
                protocol=group.protocol,
                name=command,
                params=params,
                priority=Priority.PARAMETER,
                expires_s=expires_s,
            )
        )
    set_id, read_id = ids
    assert set_id is not None
    if reapply:
        target, sources = GROUP_STATES.step(ParamEvent.REAPPLIED)
        done = await conn.execute(
            """UPDATE device_params SET status = $5, diff = NULL, failure_reason = NULL,
                      refused = false, set_command_id = $3, read_command_id = $4
               WHERE device_id = $1 AND "group" = $2 AND status = ANY($6::text[])""",
            device_id,
            group.name,
            set_id,
            read_id,
            target,
            sources,
        )
        if done != "UPDATE 1":  # the caller holds the row's lock: a bug, not a race
            raise RuntimeError(f"{device_id} {group.name}: reapplied, but not a mismatch")
        return set_id, read_id
    # new desired values replace whatever was going on (from any state)
    await conn.execute(
        """INSERT INTO device_params (device_id, "group", desired, desired_at, status,
                                      set_command_id, read_command_id, job_id)
           VALUES ($1, $2, $3, now(), $7, $4, $5, $6)
           ON CONFLICT (device_id, "group") DO UPDATE SET
               desired = excluded.desired, desired_at = now(),
               status = excluded.status, diff = NULL, verified_at = NULL,
               acknowledged_at = NULL, failure_reason = NULL, refused = false,
               set_command_id = excluded.set_command_id,
               read_command_id = excluded.read_command_id, job_id = excluded.job_id""",
        device_id,
        group.name,
        json.dumps(values),
        set_id,
        read_id,
        job_id,
        GROUP_STATES.step(ParamEvent.QUEUED)[0],
    )
    return set_id, read_id


# --- events ----------------------------------------------------------------------------


def masked(values: Any) -> Any:
    """``values`` (fields, or a diff) with card keys masked."""
    if not isinstance(values, dict):
        return values
    return {k: _mask(v) if k in SECRET_FIELDS else v for k, v in values.items()}


def _mask(value: Any) -> Any:
    if isinstance(value, dict):  # a diff entry
        return {k: _mask(v) for k, v in value.items()}
    return mask_text(value) if isinstance(value, str) else value


async def _event(
    conn: Connection,
    device_id: str,
    kind: EventKind,
    group: str,
    reason: str | None,
    detail: Mapping[str, Any],
) -> None:
    await conn.execute(
        """INSERT INTO device_events (device_id, at, kind, reason, detail)
           VALUES ($1, now(), $2, $3, $4)""",
        device_id,
        kind.value,
        reason,
        json.dumps({"group": group, **{k: masked(v) for k, v in detail.items()}}),
    )


def _row_detail(row: Any) -> dict[str, Any]:
    return {
        "set_command_id": row["set_command_id"],
        "read_command_id": row["read_command_id"],
        "job_id": row["job_id"],
    }


async def fail_dead_commands(conn: Connection, device_ids: list[str] | None = None) -> int:
    """Groups (of ``device_ids``, or all) whose queued set or read-back failed or died:
    ``failed`` (``refused`` when the device answered the set command negatively); groups
    without a read-back whose set command the device acknowledged: ``acknowledged``.
    Each with its event, in the caller's transaction. Returns the groups changed."""
    target, sources = GROUP_STATES.step(ParamEvent.FAILED)
    failed = await conn.fetch(
        """WITH dead AS (
               SELECT p.device_id, p."group",
                      (SELECT c.command_id FROM commands c
                       WHERE c.command_id IN (p.set_command_id, p.read_command_id)
                         AND c.status = ANY($2::text[])
                       ORDER BY c.command_id LIMIT 1) AS command_id
               FROM device_params p
               WHERE p.status = ANY($5::text[])
                 AND ($1::text[] IS NULL OR p.device_id = ANY($1::text[]))
                 AND EXISTS (SELECT 1 FROM commands c
                             WHERE c.command_id IN (p.set_command_id, p.read_command_id)
                               AND c.status = ANY($2::text[]))
               FOR UPDATE OF p SKIP LOCKED)
           UPDATE device_params p SET status = $4,
                  refused = (c.status = $3 AND c.command_id = p.set_command_id),
                  failure_reason = c.name || ' ' || c.status
                      || coalesce(': ' || coalesce(c.result_text, c.dead_reason), '')
           FROM dead JOIN commands c ON c.command_id = dead.command_id
           WHERE p.device_id = dead.device_id AND p."group" = dead."group"
           RETURNING p.*""",
        device_ids,
        state_values(_GAVE_UP),
        CommandStatus.FAILED.value,
        target,
        sources,
    )
    for row in failed:
        await _event(
            conn,
            row["device_id"],
            EventKind.PARAM_FAILED,
            row["group"],
            row["failure_reason"],
            {"desired": _json(row["desired"]), "refused": row["refused"], **_row_detail(row)},
        )
    target, sources = GROUP_STATES.step(ParamEvent.ACKNOWLEDGED)
    acknowledged = await conn.fetch(
        """UPDATE device_params p SET status = $3,
                  acknowledged_at = coalesce(c.finished_at, now())
           FROM commands c
           WHERE p.status = ANY($4::text[]) AND p.read_command_id IS NULL
             AND ($1::text[] IS NULL OR p.device_id = ANY($1::text[]))
             AND c.command_id = p.set_command_id AND c.status = $2
           RETURNING p.*""",
        device_ids,
        CommandStatus.ACKED.value,
        target,
        sources,
    )
    for row in acknowledged:
        await _acknowledged_event(conn, row)
    return len(failed) + len(acknowledged)


async def _acknowledged_event(conn: Connection, row: Any) -> None:
    await _event(
        conn,
        row["device_id"],
        EventKind.PARAM_VERIFIED,
        row["group"],
        None,
        {
            "status": ParamStatus.ACKNOWLEDGED.value,
            "desired": _json(row["desired"]),
            "note": "the protocol has no read-back: acknowledged by the device",
            **_row_detail(row),
        },
    )


# --- replies ---------------------------------------------------------------------------


def compare(
    group: Group, desired: Mapping[str, Any], reported: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Fields of ``desired`` the device reports otherwise: field -> desired, reported."""
    diff: dict[str, dict[str, Any]] = {}
    for name, want in desired.items():
        have = reported.get(name)
        step = group.resolution.get(name)
        if step is not None and isinstance(want, int | float) and have is not None:
            same = isinstance(have, int | float) and abs(want - have) < step / 2
        elif isinstance(want, str) and isinstance(have, str):
            same = want.upper() == have.upper()
        else:
            same = want == have
        if not same:
            diff[name] = {"desired": want, "reported": have}
    return diff


def reported_fields(group: Group, message: Message) -> dict[str, Any]:
    """The group's fields a read-back reply carries."""
    fields = message.to_fields()
    return {k: v for k, v in fields.items() if k in group.fields}


async def on_reply(
    ctx: EngineContext, device_id: str, message: Message, command_id: int | None
) -> None:
    """A set or read-back reply from ``device_id`` (``command_id``: the outbox command it
    answered, if any)."""
    if ctx.pool is None:
        return
    found = reply_group(message)
    if found is None:
        return
    group, kind = found
    if kind == "read":
        if isinstance(message, bkv.ParamsReport) and message.result != 1:
            return  # no values (the socket failed the query); the outbox fails the command
        reported = reported_fields(group, message)
        async with ctx.pool.acquire() as conn, conn.transaction():
            row = await _locked(conn, device_id, group.name)
            outcome = await _evaluate(ctx, conn, group, device_id, row, reported, command_id)
        _after(ctx, device_id, outcome)
        return
    if command_id is None:
        return
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await _set_answered(conn, device_id, group, message, command_id)
    if row is not None and row["job_id"] is not None and row["status"] != _P.APPLYING.value:
        engine_for(ctx).kick()  # a job's slot may be free


async def _set_answered(
    conn: Connection, device_id: str, group: Group, message: Message, command_id: int
) -> asyncpg.Record | None:
    """The device answered ``group``'s set command ``command_id``: ``applying`` (the
    read-back follows), ``acknowledged`` (there is none) or ``failed`` (refused)."""
    row: asyncpg.Record | None
    if _success(group, message):
        acknowledged, without_read = GROUP_STATES.step(ParamEvent.ACKNOWLEDGED)
        applying, with_read = GROUP_STATES.step(ParamEvent.SET_ACCEPTED)
        row = await conn.fetchrow(
            """UPDATE device_params SET acknowledged_at = now(),
                      status = CASE WHEN read_command_id IS NULL THEN $4 ELSE $5 END
               WHERE device_id = $1 AND "group" = $2 AND set_command_id = $3
                 AND status = ANY(CASE WHEN read_command_id IS NULL THEN $6::text[]
                                       ELSE $7::text[] END)
               RETURNING *""",
            device_id,
            group.name,
            command_id,
            acknowledged,
            applying,
            without_read,
            with_read,
        )
        if row is not None and row["status"] == acknowledged:
            await _acknowledged_event(conn, row)
        return row
    text = message.to_fields().get("result_text")
    result = getattr(message, "result", None)
    reason = f"the device refused {group.set_command}: {text or result}"
    failed, sources = GROUP_STATES.step(ParamEvent.FAILED)
    row = await conn.fetchrow(
        """UPDATE device_params SET status = $5, refused = true, failure_reason = $4
           WHERE device_id = $1 AND "group" = $2 AND set_command_id = $3
             AND status = ANY($6::text[])
           RETURNING *""",
        device_id,
        group.name,
        command_id,
        reason,
        failed,
        sources,
    )
    if row is not None:
        await _event(
            conn,
            device_id,
            EventKind.PARAM_FAILED,
            group.name,
            reason,
            {"desired": _json(row["desired"]), "refused": True, **_row_detail(row)},
        )
    return row


async def _locked(conn: Connection, device_id: str, group: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT p.*, s.status AS set_status, r.status AS check_status
           FROM device_params p
           LEFT JOIN commands s ON s.command_id = p.set_command_id
           LEFT JOIN commands r ON r.command_id = p.check_command_id
           WHERE p.device_id = $1 AND p."group" = $2 FOR UPDATE OF p""",
        device_id,
        group,
    )
    return row


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What a comparison did: commands queued (wake the outbox), a job slot may be free."""

    queued: bool = False
    job_id: int | None = None


def _after(ctx: EngineContext, device_id: str, outcome: _Outcome) -> None:
    """After the transaction of :func:`_evaluate` committed."""
    if outcome.queued:
        ctx.outbox.wake(device_id)
    if outcome.job_id is not None:
        engine_for(ctx).kick()


async def _record(
    conn: Connection, device_id: str, group: Group, reported: Mapping[str, Any]
) -> None:
    await conn.execute(
        """INSERT INTO device_params (device_id, "group", reported, reported_at)
           VALUES ($1, $2, $3, now())
           ON CONFLICT (device_id, "group")
           DO UPDATE SET reported = excluded.reported, reported_at = now()""",
        device_id,
        group.name,
        json.dumps(dict(reported)),
    )


async def _evaluate(
    ctx: EngineContext,
    conn: Connection,
    group: Group,
    device_id: str,
    row: asyncpg.Record | None,
    reported: Mapping[str, Any],
    command_id: int | None,
    *,
    check: bool = False,
) -> _Outcome:
    """Compare what ``device_id`` reports for ``group`` (``row`` locked, from
    :func:`_locked`) with what is desired, and move the group on. ``command_id``: the
    read-back it answers; ``check``: it is a drift check (a registration's report)."""
    if row is None or row["desired"] is None:
        if await conn.fetchval("SELECT 1 FROM devices WHERE device_id = $1", device_id):
            await _record(conn, device_id, group, reported)
        return _Outcome()
    status = ParamStatus(row["status"])
    set_status = _command_status(row["set_status"])
    if status in IN_PROGRESS and set_status in _GAVE_UP:
        # the set was refused or died, and its answer is not processed yet: fail the
        # group first (a read-back after a refused set says nothing about the set)
        await fail_dead_commands(conn, [device_id])
        await _record(conn, device_id, group, reported)
        return _Outcome(job_id=row["job_id"])
    own = command_id is not None and command_id == row["read_command_id"]
    check = check or (command_id is not None and command_id == row["check_command_id"])
    # a group without a read-back is reported another way (the work mode by 0x20): that
    # report answers the set once the set command has reached the device
    as_result = own or (
        status in IN_PROGRESS and group.read_command is None and set_status in _DELIVERED
    )
    if (status in IN_PROGRESS and not as_result) or (
        status is _P.FAILED and (row["refused"] or not check)
    ):
        await _record(conn, device_id, group, reported)  # the set may not have arrived yet
        return _Outcome()
    desired = _json(row["desired"])
    diff = compare(group, desired, reported)
    detail = {"desired": desired, "reported": dict(reported), **_row_detail(row)}
    job = row["job_id"] if status in IN_PROGRESS else None
    if not diff:
        verified = GROUP_STATES.check(status, ParamEvent.MATCHED)
        await conn.execute(
            """UPDATE device_params SET reported = $3, reported_at = now(),
                      status = $4, diff = NULL, failure_reason = NULL, verified_at = now()
               WHERE device_id = $1 AND "group" = $2 AND status = $5""",
            device_id,
            group.name,
            json.dumps(dict(reported)),
            verified.value,
            status.value,
        )
        if status is not verified:
            await _event(
                conn,
                device_id,
                EventKind.PARAM_VERIFIED,
                group.name,
                None,
                {"status": verified.value, "previous_status": status.value, **detail},
            )
        log.info("parameters verified", device_id=device_id, group=group.name)
        return _Outcome(job_id=job)
    mismatch = GROUP_STATES.check(status, ParamEvent.DIFFERS)
    await conn.execute(
        """UPDATE device_params SET reported = $3, reported_at = now(), status = $5,
                  diff = $4
           WHERE device_id = $1 AND "group" = $2 AND status = $6""",
        device_id,
        group.name,
        json.dumps(dict(reported)),
        json.dumps(diff),
        mismatch.value,
        status.value,
    )
    if as_result:  # the device did not take what was just set
        await _event(
            conn, device_id, EventKind.PARAM_MISMATCH, group.name, None, {"diff": diff, **detail}
        )
        log.info("parameters differ after setting", device_id=device_id, group=group.name)
        return _Outcome(job_id=job)
    reapply = check and ctx.settings.params_reapply_on_drift
    if check or status is not _P.MISMATCH:
        await _event(
            conn,
            device_id,
            EventKind.PARAM_DRIFT,
            group.name,
            None,
            {
                "diff": diff,
                "previous_status": status.value,
                "source": "reconnect" if check else "read-back",
                "reapplied": reapply,
                **detail,
            },
        )
    log.info("parameters drifted", device_id=device_id, group=group.name, reapplied=reapply)
    if not reapply:
        return _Outcome()
    await _queue(
        ctx.outbox,
        conn,
        device_id,
        group,
        desired,
        expires_s=ctx.settings.command_expiry_s,
        job_id=row["job_id"],
        reapply=True,
    )
    return _Outcome(queued=True)


# --- reconnects ------------------------------------------------------------------------


def on_registration(ctx: EngineContext, device_id: str, work_mode: Any, *, query: bool) -> None:
    """An AP3000 0x20 from ``device_id`` (``query``: it answers a 0x81 query): unless it
    answers a query the device (re)started, so its desired groups are read back; the
    work mode it reports is the read-back of the ``work_mode`` group."""
    reported = None
    if isinstance(work_mode, int) and not isinstance(work_mode, bool):
        reported = {"work_mode": work_mode & 1}  # bit 0 is what 0x8D sets (ap3000.md 11.10)
    if not query or reported is not None:
        engine_for(ctx).note(device_id, check=not query, work_mode=reported)


def on_device_seen(ctx: EngineContext, link: DeviceLink, device_id: str) -> None:
    """A BKV socket reported on ``link``: its first report on a connection is a
    reconnect, after which its desired groups are read back."""
    seen = link.reported
    if seen is None:
        seen = link.reported = set()
    if device_id not in seen:
        seen.add(device_id)
        engine_for(ctx).note(device_id, check=True)


def listen(ctx: EngineContext, driver: MessageHooks) -> None:
    """Register with ``driver`` for what concerns parameters: set and read-back replies;
    AP3000 0x20 registrations (a restart, and the work mode); BKV socket reports (the
    first on a connection is a reconnect)."""

    def reply(inbound: Inbound[Message]) -> None:
        if inbound.device_id is not None:
            answer = on_reply(ctx, inbound.device_id, inbound.message, inbound.answered)
            ctx.run(answer, "params")

    def registered(inbound: Inbound[ap3000.Registration]) -> None:
        if inbound.device_id is not None:
            query = inbound.answered is not None  # the 0x20 answers a 0x81 query
            work_mode = inbound.message.work_mode
            on_registration(ctx, inbound.device_id, work_mode, query=query)

    def seen(inbound: Inbound[Message]) -> None:
        if inbound.device_id is not None:
            on_device_seen(ctx, inbound.link, inbound.device_id)

    for cls in PROTOCOL_REPLIES.get(driver.protocol, ()):
        driver.on(cls, reply)
    if driver.protocol == "ap3000":
        driver.on(ap3000.Registration, registered)
    elif driver.protocol == "bkv":
        for report in (bkv.StatusCluster, bkv.SocketState, bkv.SocketState1D):
            driver.on(report, seen)


@dataclasses.dataclass
class _Note:
    check: bool
    work_mode: dict[str, Any] | None


# --- the engine ------------------------------------------------------------------------

#: devices looked up per drift-check transaction
_DRIFT_LOOKUP: Final = 500


class ParamsEngine:
    """One process's share of the parameter work: drift checks of devices that
    reconnected here, and (shared by all processes) profile job starts and commands
    that died."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self._wakeup = asyncio.Event()
        #: devices to check, oldest first
        self._notes: dict[str, _Note] = {}
        self._tokens = 0.0
        self._refilled = time.monotonic()

    def kick(self) -> None:
        """Run a pass soon (a job was created, a slot was freed)."""
        self._wakeup.set()

    def note(self, device_id: str, *, check: bool, work_mode: dict[str, Any] | None = None) -> None:
        """Check ``device_id`` at the next pass (``check``: read its groups back)."""
        old = self._notes.pop(device_id, None)
        if old is not None:
            check = check or old.check
            work_mode = work_mode or old.work_mode
        self._notes[device_id] = _Note(check, work_mode)

    async def run(self) -> None:
        """Passes every ``params_tick_s`` (sooner when kicked) until cancelled."""
        await run_passes(
            self.tick, self._wakeup, lambda: self.ctx.settings.params_tick_s, "parameter"
        )

    async def tick(self) -> None:
        """One pass: dead commands, drift checks, job starts."""
        pool = self.ctx.pool
        if pool is None:
            return
        async with pool.acquire() as conn, conn.transaction():
            await fail_dead_commands(conn)
        await self._drift_checks(pool)
        jobs = await pool.fetch(
            "SELECT job_id FROM param_jobs WHERE finished_at IS NULL ORDER BY job_id"
        )
        for job in jobs:
            async with pool.acquire() as conn, conn.transaction():
                woken = await start_ready(self.ctx, conn, job["job_id"])
            for device_id in woken:
                self.ctx.outbox.wake(device_id)

    def _budget(self) -> int:
        """Drift checks allowed now (a token bucket of ``params_drift_checks_per_s``,
        one second deep)."""
        rate = max(self.ctx.settings.params_drift_checks_per_s, 0.001)
        now = time.monotonic()
        self._tokens = min(rate, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        return int(self._tokens)

    async def _drift_checks(self, pool: asyncpg.Pool) -> None:
        """Read back the desired groups of devices that reconnected, at most
        ``params_drift_checks_per_s`` devices per second (devices with nothing desired
        cost one lookup in a batch, not a check)."""
        budget = self._budget()
        while self._notes and budget > 0:
            batch = dict(itertools.islice(self._notes.items(), _DRIFT_LOOKUP))
            for device_id in batch:
                del self._notes[device_id]
            woken: list[str] = []
            later: dict[str, _Note] = {}
            async with pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    """SELECT p.*, s.status AS set_status, r.status AS check_status
                       FROM device_params p
                       LEFT JOIN commands s ON s.command_id = p.set_command_id
                       LEFT JOIN commands r ON r.command_id = p.check_command_id
                       WHERE p.device_id = ANY($1::text[]) AND p.desired IS NOT NULL
                       ORDER BY p.device_id, p."group"
                       FOR UPDATE OF p SKIP LOCKED""",
                    list(batch),
                )
                by_device: dict[str, list[asyncpg.Record]] = {}
                for row in rows:
                    by_device.setdefault(row["device_id"], []).append(row)
                # a group another transaction holds (its ack being written) was skipped:
                # the device's note waits for the next pass, or its report would be lost
                busy = {
                    r["device_id"]
                    for r in await conn.fetch(
                        """SELECT device_id, count(*) AS n FROM device_params
                           WHERE device_id = ANY($1::text[]) AND desired IS NOT NULL
                           GROUP BY device_id""",
                        list(batch),
                    )
                    if r["n"] > len(by_device.get(r["device_id"], ()))
                }
                for device_id, note in batch.items():
                    if device_id in busy:
                        later[device_id] = note
                        continue
                    if device_id not in by_device:
                        continue
                    if budget <= 0:
                        later[device_id] = note
                        continue
                    budget -= 1
                    self._tokens -= 1
                    for row in by_device[device_id]:
                        if await self._check(conn, row, note):
                            woken.append(device_id)
            self._notes = {**later, **self._notes}  # the rest first, next time
            for device_id in dict.fromkeys(woken):
                self.ctx.outbox.wake(device_id)

    async def _check(self, conn: Connection, row: asyncpg.Record, note: _Note) -> bool:
        """One group of a reconnected device; True if a command was queued."""
        group = GROUPS[row["group"]]
        device_id = row["device_id"]
        if group.name == "work_mode" and note.work_mode is not None:
            outcome = await _evaluate(
                self.ctx, conn, group, device_id, row, note.work_mode, None, check=note.check
            )
            if outcome.job_id is not None:
                self.kick()
            return outcome.queued
        status = ParamStatus(row["status"])
        checkable = status in _CHECKABLE or (status is _P.FAILED and not row["refused"])
        if not note.check or group.read_command is None or not checkable:
            return False
        if _command_status(row["check_status"]) in _ON_ITS_WAY:
            return False  # the last check is still on its way
        command_id = await self.ctx.outbox.submit(
            conn,
            device_id=device_id,
            protocol=group.protocol,
            name=group.read_command,
            params={},
            priority=Priority.PARAMETER,
            expires_s=self.ctx.settings.command_expiry_s,
        )
        await conn.execute(
            """UPDATE device_params SET check_command_id = $3, checked_at = now()
               WHERE device_id = $1 AND "group" = $2""",
            device_id,
            group.name,
            command_id,
        )
        return True


_ENGINES: weakref.WeakKeyDictionary[Any, ParamsEngine] = weakref.WeakKeyDictionary()


def engine_for(ctx: EngineContext) -> ParamsEngine:
    """The gateway's engine; created, and its passes started, on first use (by the API
    router or a driver hook, whichever comes first)."""
    engine = _ENGINES.get(ctx)
    if engine is None:
        engine = ParamsEngine(ctx)
        _ENGINES[ctx] = engine
        ctx.run(engine.run(), "params-engine")
    return engine


# --- profile jobs ----------------------------------------------------------------------


async def start_ready(ctx: EngineContext, conn: Connection, job_id: int) -> list[str]:
    """Start the queued devices of job ``job_id`` that its pace allows now, inside the
    caller's transaction (under the job row's lock: another process holding it skips
    the job). Marks the job finished when nothing is queued or in progress. Returns
    the devices to wake after the commit."""
    job = await conn.fetchrow(
        """SELECT * FROM param_jobs WHERE job_id = $1 AND finished_at IS NULL
           FOR UPDATE SKIP LOCKED""",
        job_id,
    )
    if job is None:
        return []
    counts = await conn.fetchrow(
        """SELECT (SELECT count(DISTINCT device_id) FROM device_params
                   WHERE job_id = $1 AND status = ANY($2::text[])) AS active,
                  (SELECT count(*) FROM param_job_devices
                   WHERE job_id = $1 AND status = $3) AS queued,
                  (SELECT count(*) FROM param_job_devices
                   WHERE job_id = $1 AND started_at > now() - interval '60 s') AS recent""",
        job_id,
        state_values(IN_PROGRESS),
        MemberStatus.QUEUED.value,
    )
    assert counts is not None
    if counts["queued"] == 0 and counts["active"] == 0:
        await conn.execute("UPDATE param_jobs SET finished_at = now() WHERE job_id = $1", job_id)
        log.info("parameter job finished", job_id=job_id)
        return []
    slots = min(job["concurrency"] - counts["active"], job["rate_per_min"] - counts["recent"])
    if slots <= 0 or counts["queued"] == 0:
        return []
    candidates = await conn.fetch(
        """SELECT m.device_id FROM param_job_devices m
           LEFT JOIN device_sessions s ON s.device_id = m.device_id
           WHERE m.job_id = $1 AND m.status = $3
           ORDER BY (s.owner IS NULL), m.device_id LIMIT $2
           FOR UPDATE OF m SKIP LOCKED""",
        job_id,
        slots,
        MemberStatus.QUEUED.value,
    )
    groups: dict[str, Any] = _json(job["groups"])
    woken = []
    for candidate in candidates:
        device_id = candidate["device_id"]
        try:
            async with conn.transaction():
                applied = await apply(
                    ctx.outbox,
                    conn,
                    device_id,
                    groups,
                    expires_s=ctx.settings.command_expiry_s,
                    job_id=job_id,
                )
        except (ParamsError, DeviceNotFoundError, UnsupportedDeviceError) as exc:
            await conn.execute(
                """UPDATE param_job_devices SET status = $4, failure_reason = $3
                   WHERE job_id = $1 AND device_id = $2 AND status = $5""",
                job_id,
                device_id,
                str(exc),
                MemberStatus.FAILED.value,
                MemberStatus.QUEUED.value,
            )
            for group in groups:
                await _event(
                    conn, device_id, EventKind.PARAM_FAILED, group, str(exc), {"job_id": job_id}
                )
            continue
        await conn.execute(
            """UPDATE param_job_devices SET status = $4, started_at = now(),
                      set_command_ids = $3
               WHERE job_id = $1 AND device_id = $2 AND status = $5""",
            job_id,
            device_id,
            json.dumps({g: a["set_command_id"] for g, a in applied.items()}),
            MemberStatus.PENDING.value,
            MemberStatus.QUEUED.value,
        )
        woken.append(device_id)
    if woken:
        log.info("parameter job started devices", job_id=job_id, devices=len(woken))
    return woken


def _json(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw
