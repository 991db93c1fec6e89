"""Which scope each API call needs, and which devices it concerns.

:data:`RULES` is the one table of scopes: ``(methods, route, scope)``, the first match
wins. Routes are matched by their template (``/api/v1/devices/{device_id}/params``), so
``{device_id}`` never matches a literal segment such as ``registry``; a pattern ending in
``/**`` matches the path itself and everything below it. In words:

- reads (GET, HEAD) anywhere under ``/api/v1`` need ``read``, except API keys, the call
  audit and webhooks (``admin``) and billing: cards, rate plans, a device's rate plan and
  reconciliation (``billing``);
- starting, stopping and modifying charging, other device commands and cancelling orders
  need ``control``; cards and rate plans ``billing``; parameters, profiles, firmware and
  upgrades ``config``; API keys, webhooks, bans, nodes and the device registry ``admin``;
- anything else: ``read`` for a read, ``admin`` for a write (:func:`rule_for`).

``admin`` implies every scope. A test walks every route of the OpenAPI document and
checks that each is matched by a row of the table (none falls to the default).

A key limited to devices or gateways (:attr:`ApiKeyInfo.limited_to_devices`) must name
the devices a request concerns, and every one it names must be allowed
(:func:`check_subjects`). A request names devices by its path (``device_id``,
``gateway_id``, an ``order_no`` or ``command_id``, whose device is looked up), by the
query parameters the route declares (``device_id``, ``gateway_id``, ``device_ids``,
``gateway_ids``; several values or comma-separated lists; an ``order_no``, whose device
is looked up), and by the fields its JSON body model declares (the same names, and a
job's ``selector`` of ``device_ids``). A request that names none (a list of every order,
a report over all devices, a selector by device type) is refused rather than filtered,
except on the rows marked ``neutral`` (the event-type catalogue): the list endpoints
take a ``device_id`` or ``gateway_id`` filter, and such a key passes its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Iterator
from typing import Any

import asyncpg
from fastapi import HTTPException, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel

from chargegw.domain import auth
from chargegw.domain.auth import ApiKeyInfo, KeyRefusedError, Reason, Scope

__all__ = [
    "READS",
    "RULES",
    "WRITES",
    "Rule",
    "Subjects",
    "check_subjects",
    "collect_subjects",
    "rule_for",
]

READS = frozenset({"GET", "HEAD"})
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_ANY = READS | WRITES | {"OPTIONS"}


@dataclasses.dataclass(frozen=True)
class Rule:
    """The scope the calls of ``methods`` to routes matching ``pattern`` need."""

    methods: frozenset[str]
    pattern: str
    scope: Scope
    #: the routes concern no device: keys limited to devices may call them
    neutral: bool = False
    #: a row of :data:`RULES` (False: the default for a route the table misses)
    listed: bool = True

    def matches(self, method: str, path: str) -> bool:
        """Whether a call of ``method`` to the route template ``path`` falls under the rule."""
        if method not in self.methods:
            return False
        if self.pattern.endswith("/**"):
            base = self.pattern[:-3]
            return path == base or path.startswith(base + "/")
        return path == self.pattern


RULES: tuple[Rule, ...] = (
    # admin, reads included
    Rule(_ANY, "/api/v1/api-keys/**", Scope.ADMIN),
    Rule(_ANY, "/api/v1/audit/**", Scope.ADMIN),
    Rule(_ANY, "/api/v1/webhooks/**", Scope.ADMIN),
    # billing, reads included
    Rule(_ANY, "/api/v1/cards/**", Scope.BILLING),
    Rule(_ANY, "/api/v1/rate-plans/**", Scope.BILLING),
    Rule(_ANY, "/api/v1/devices/{device_id}/rate-plan", Scope.BILLING),
    Rule(_ANY, "/api/v1/reports/reconciliation/**", Scope.BILLING),
    # control: charging and commands
    Rule(WRITES, "/api/v1/devices/{device_id}/ports/{port}/start", Scope.CONTROL),
    Rule(WRITES, "/api/v1/devices/{device_id}/ports/{port}/stop", Scope.CONTROL),
    Rule(WRITES, "/api/v1/devices/{device_id}/ports/{port}/modify", Scope.CONTROL),
    Rule(WRITES, "/api/v1/devices/{device_id}/commands", Scope.CONTROL),
    Rule(WRITES, "/api/v1/orders/**", Scope.CONTROL),
    # config: parameters and firmware
    Rule(WRITES, "/api/v1/devices/{device_id}/params", Scope.CONFIG),
    Rule(WRITES, "/api/v1/param-profiles/**", Scope.CONFIG),
    Rule(WRITES, "/api/v1/param-jobs/**", Scope.CONFIG),
    Rule(WRITES, "/api/v1/firmware/**", Scope.CONFIG),
    Rule(WRITES, "/api/v1/upgrade-jobs/**", Scope.CONFIG),
    # admin: the platform itself
    Rule(_ANY, "/api/v1/devices/registry/**", Scope.ADMIN),
    Rule(WRITES, "/api/v1/bans/**", Scope.ADMIN),
    Rule(WRITES, "/api/v1/nodes/**", Scope.ADMIN),
    # every other read
    Rule(READS, "/api/v1/event-types/**", Scope.READ, neutral=True),
    Rule(READS, "/api/v1/**", Scope.READ),
)

_DEFAULT_READ = Rule(READS, "/**", Scope.READ, listed=False)
_DEFAULT_WRITE = Rule(_ANY, "/**", Scope.ADMIN, listed=False)


def rule_for(method: str, path: str) -> Rule:
    """The rule of a call of ``method`` to the route template ``path`` (HEAD counts as
    GET); not listed: ``read`` for a read, ``admin`` for anything else."""
    method = method.upper()
    for rule in RULES:
        if rule.matches(method, path):
            return rule
    return _DEFAULT_READ if method in READS else _DEFAULT_WRITE


# ---------------------------------------------------------------- subjects

_DEVICE_NAMES = frozenset({"device_id", "device_ids"})
_GATEWAY_NAMES = frozenset({"gateway_id", "gateway_ids"})


@dataclasses.dataclass
class Subjects:
    """The devices, gateways, orders and commands a request names."""

    devices: set[str] = dataclasses.field(default_factory=set)
    gateways: set[str] = dataclasses.field(default_factory=set)
    orders: set[str] = dataclasses.field(default_factory=set)
    commands: set[int] = dataclasses.field(default_factory=set)
    #: why the request concerns devices it does not name (a selector by type), if it does
    unnamed: str | None = None

    @property
    def named(self) -> bool:
        return bool(self.devices or self.gateways or self.orders or self.commands)

    def add(self, name: str, value: Any) -> None:
        """Note the value(s) of a parameter or field called ``name``."""
        for text in _strings(value):
            if name in _DEVICE_NAMES:
                self.devices.add(text)
            elif name in _GATEWAY_NAMES:
                self.gateways.add(text)


def _strings(value: Any) -> Iterator[str]:
    values = value if isinstance(value, list) else [value]
    for item in values:
        if isinstance(item, str):
            yield from (part.strip() for part in item.split(",") if part.strip())


def _declared_query(route: APIRoute) -> set[str]:
    """The query parameters a route (or one of its dependencies) declares."""
    names: set[str] = set()
    stack = [route.dependant]
    while stack:
        current = stack.pop()
        stack.extend(current.dependencies)
        for field in current.query_params:
            annotation = field.field_info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                names.update(info.alias or n for n, info in annotation.model_fields.items())
            else:
                names.add(field.alias)
    return names


def _declared_body(route: APIRoute) -> set[str]:
    """The top-level fields of a route's JSON body model (none for other bodies)."""
    if route.body_field is None:
        return set()
    annotation = route.body_field.field_info.annotation
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return set()
    return {info.alias or name for name, info in annotation.model_fields.items()}


async def collect_subjects(request: Request) -> Subjects:
    """What the request names, from its path, its declared query parameters and the
    declared fields of its JSON body (read here; FastAPI keeps it for the route)."""
    subjects = Subjects()
    for name, value in request.path_params.items():
        if name == "order_no" and isinstance(value, str):
            subjects.orders.add(value)
        elif name == "command_id":
            with contextlib.suppress(TypeError, ValueError):  # the route's validation answers
                subjects.commands.add(int(value))
        else:
            subjects.add(name, value)
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return subjects
    declared = _declared_query(route) & (_DEVICE_NAMES | _GATEWAY_NAMES | {"order_no"})
    for name, value in request.query_params.multi_items():
        if name == "order_no" and name in declared:
            subjects.orders.add(value.upper())
        elif name in declared:
            subjects.add(name, value)
    fields = _declared_body(route)
    if fields & (_DEVICE_NAMES | _GATEWAY_NAMES | {"selector"}):
        body = await _json_body(request)
        if isinstance(body, dict):
            for name in fields & (_DEVICE_NAMES | _GATEWAY_NAMES):
                if name in body:
                    subjects.add(name, body[name])
            selector = body.get("selector") if "selector" in fields else None
            if isinstance(selector, dict):
                if "device_ids" in selector:
                    subjects.add("device_ids", selector["device_ids"])
                else:
                    subjects.unnamed = "its selector picks devices by type or all of them"
    return subjects


async def _json_body(request: Request) -> Any:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not (content_type == "application/json" or content_type.endswith("+json")):
        return None
    raw = await request.body()
    try:
        return json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return None  # the route's own validation answers for it


def _refuse(info: ApiKeyInfo, message: str) -> KeyRefusedError:
    return KeyRefusedError(Reason.DEVICE, message, key_id=info.key_id)


async def check_subjects(
    request: Request, info: ApiKeyInfo, rule: Rule, pool: asyncpg.Pool | None
) -> None:
    """:class:`KeyRefusedError` (``device``) unless a key limited to devices may make
    this request: it names at least one device (or the route is ``neutral``), and every
    device it names is allowed: listed, behind a listed gateway, or a listed gateway
    itself. Orders and commands count as their devices (an unknown one names nothing
    that exists: the route answers 404)."""
    if not info.limited_to_devices:
        return
    subjects = await collect_subjects(request)
    if subjects.unnamed is not None:
        raise _refuse(info, f"this key may act only on the devices it lists; {subjects.unnamed}")
    if not subjects.named:
        if rule.neutral:
            return
        raise _refuse(
            info,
            "this key may act only on some devices and this request names none: "
            "name them (device_id or gateway_id)",
        )
    devices_allowed = info.allowed_device_ids or frozenset()
    gateways_allowed = info.allowed_gateway_ids or frozenset()
    for gateway in sorted(subjects.gateways):
        if gateway not in gateways_allowed:
            raise _refuse(info, f"this key may not act on gateway {gateway}")
    devices = set(subjects.devices)
    behind: dict[str, str | None] = {}
    if subjects.orders or subjects.commands or gateways_allowed:
        async with _database(pool).acquire(timeout=auth.LOOKUP_TIMEOUT_S) as conn:
            for order_no in subjects.orders:
                devices.update(_known(await auth.order_device(conn, order_no)))
            for command_id in subjects.commands:
                devices.update(_known(await auth.command_device(conn, command_id)))
            unknown = devices - devices_allowed - gateways_allowed
            if unknown and gateways_allowed:
                behind = await auth.device_gateways(conn, unknown)
    for device_id in sorted(devices):
        if device_id in devices_allowed or device_id in gateways_allowed:
            continue
        if behind.get(device_id) in gateways_allowed:
            continue
        raise _refuse(info, f"this key may not act on device {device_id}")


def _known(device_id: str | None) -> Iterable[str]:
    return () if device_id is None else (device_id,)


def _database(pool: asyncpg.Pool | None) -> asyncpg.Pool:
    if pool is None:
        raise HTTPException(503, "database unavailable")
    return pool
