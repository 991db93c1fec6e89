"""The device registry API (scope ``admin``): the devices served when
``device_registry_mode`` is ``enforce``; see :mod:`chargegw.domain.device_registry`.

Adding and removing take lists (up to ``MAX_IDS_PER_REQUEST`` ids) and are idempotent:
the answer says which ids changed and which already were as asked. Every id of a request
is checked first; one malformed id refuses the whole request (422, one ``details`` entry
per bad id, ``field`` ``device_ids.<index>``). A change applies on every worker within
``device_registry_refresh_s``; with ``enforce``, a connected device whose id is removed
is disconnected then.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from chargegw.api.deps import Pool
from chargegw.api.errors import api_error, error_responses
from chargegw.api.pagination import DEFAULT_LIMIT, Cursor, Limit, decode_cursor, encode_cursor
from chargegw.domain import device_registry
from chargegw.domain.device_registry import (
    MAX_IDS_PER_REQUEST,
    MAX_NOTE_LENGTH,
    RegisteredDevice,
)
from chargegw.domain.refusals import InvalidError

__all__ = ["router"]


class Protocol(str, enum.Enum):
    """The protocol of a registered id."""

    AP3000 = "ap3000"
    BKV = "bkv"


#: documented, not enforced by pydantic: the handler's own check explains a mistake (a BKV
#: socket id, a protocol that does not fit)
_ID_PATTERN = r"^\s*([0-9A-Fa-f]{8}|[0-9A-Fa-f]{14})\s*$"
#: longer than any id: a typo is answered as malformed, a megabyte string is not read
_ID = Annotated[str, Field(max_length=64, json_schema_extra={"pattern": _ID_PATTERN})]
_IDS_DESCRIPTION = (
    "AP3000 physical ids (8 hex digits, piles and hosts) and BKV gateway ids (14 hex "
    f"digits), in any case; at most {MAX_IDS_PER_REQUEST}"
)


class RegistryAdd(BaseModel):
    """Ids to register."""

    model_config = ConfigDict(extra="forbid")

    device_ids: list[_ID] = Field(
        min_length=1,
        max_length=MAX_IDS_PER_REQUEST,
        description=_IDS_DESCRIPTION,
        examples=[["04CEAA40", "82231214002700"]],
    )
    protocol: Protocol | None = Field(
        None, description="if given, every id must be of this protocol"
    )
    note: str | None = Field(
        None, max_length=MAX_NOTE_LENGTH, description="kept with the ids added now"
    )


class RegistryRemove(BaseModel):
    """Ids to unregister."""

    model_config = ConfigDict(extra="forbid")

    device_ids: list[_ID] = Field(
        min_length=1, max_length=MAX_IDS_PER_REQUEST, description=_IDS_DESCRIPTION
    )


class RegistryAdded(BaseModel):
    """What a registration changed (ids in their registered, upper-case form)."""

    added: list[str] = Field(description="registered now")
    already_registered: list[str] = Field(description="registered before (unchanged)")


class RegistryRemoved(BaseModel):
    """What an unregistration changed (ids in their registered, upper-case form)."""

    removed: list[str] = Field(description="unregistered now")
    not_registered: list[str] = Field(description="were not registered")


class RegistryPage(BaseModel):
    """A page of registered ids, in id order."""

    items: list[RegisteredDevice]
    next_cursor: str | None


router = APIRouter(prefix="/api/v1/devices/registry", tags=["devices"])

_NOT_REGISTERED = (404, "The id is not registered")
DevicePath = Annotated[
    str,
    Path(
        max_length=64,
        description="AP3000 physical id or BKV gateway id, any case",
        json_schema_extra={"pattern": _ID_PATTERN},
    ),
]


def _checked(ids: list[str], protocol: Protocol | None) -> dict[str, str]:
    """id -> protocol for every id in registered form (duplicates once); 422 listing
    every malformed id."""
    problems: list[dict[str, Any]] = []
    found: dict[str, str] = {}
    wanted = None if protocol is None else protocol.value
    for index, text in enumerate(ids):
        try:
            device_id, kind = device_registry.normalise(text, wanted)
        except InvalidError as exc:
            detail = exc.detail
            message = detail["error"] if isinstance(detail, dict) else detail
            problems.append(
                {
                    "type": "value_error",
                    "loc": ("body", "device_ids", index),
                    "msg": message,
                    "input": text,
                }
            )
            continue
        found[device_id] = kind
    if problems:
        raise RequestValidationError(problems)
    return found


def _one(text: str) -> str:
    try:
        return device_registry.normalise(text)[0]
    except InvalidError as exc:
        detail = exc.detail
        message = detail["error"] if isinstance(detail, dict) else detail
        raise api_error(422, message, field="device_id") from None


def _caller(request: Request) -> str | None:
    """The API key making the request, as the authentication put it on the request."""
    key = getattr(request.state, "api_key", None)
    key_id = getattr(key, "key_id", None)
    return None if key_id is None else str(key_id)


@router.get("", summary="List the device registry")
async def list_registry(
    pool: Pool,
    protocol: Annotated[Protocol | None, Query(description="only ids of this protocol")] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> RegistryPage:
    """Registered ids in id order, with cursor pagination like the other lists."""
    after = None if cursor is None else decode_cursor(cursor, "registry", (str,))[0]
    async with pool.acquire() as conn:
        found = await device_registry.page(
            conn,
            protocol=None if protocol is None else protocol.value,
            after=after,
            limit=limit,
        )
    next_cursor = None
    if found.more:
        next_cursor = encode_cursor("registry", [found.items[-1].device_id])
    return RegistryPage(items=found.items, next_cursor=next_cursor)


@router.post("", summary="Register devices")
async def add_to_registry(pool: Pool, body: RegistryAdd, request: Request) -> RegistryAdded:
    """Idempotent: ids already registered are left as they are (with their note)."""
    wanted = _checked(body.device_ids, body.protocol)
    async with pool.acquire() as conn:
        added = await device_registry.add(
            conn, wanted.items(), note=body.note, created_by=_caller(request)
        )
    already = sorted(set(wanted) - set(added))
    return RegistryAdded(added=added, already_registered=already)


@router.delete("", summary="Unregister devices")
async def remove_from_registry(pool: Pool, body: RegistryRemove) -> RegistryRemoved:
    """Idempotent: ids that were not registered are listed as such. With ``enforce``,
    connected devices among them are disconnected within ``device_registry_refresh_s``."""
    wanted = _checked(body.device_ids, None)
    async with pool.acquire() as conn:
        removed = await device_registry.remove(conn, wanted)
    return RegistryRemoved(removed=removed, not_registered=sorted(set(wanted) - set(removed)))


@router.get(
    "/{device_id}",
    summary="One registered device",
    responses=error_responses(_NOT_REGISTERED),
)
async def get_registered(pool: Pool, device_id: DevicePath) -> RegisteredDevice:
    """The registry's entry of an id (any case)."""
    wanted = _one(device_id)
    async with pool.acquire() as conn:
        found = await device_registry.get(conn, wanted)
    if found is None:
        raise HTTPException(404, f"{wanted} is not registered")
    return found


@router.delete(
    "/{device_id}",
    summary="Unregister one device",
    responses=error_responses(_NOT_REGISTERED),
)
async def remove_one(pool: Pool, device_id: DevicePath) -> RegistryRemoved:
    """As ``DELETE /api/v1/devices/registry`` with one id, but 404 if it was not
    registered."""
    wanted = _one(device_id)
    async with pool.acquire() as conn:
        removed = await device_registry.remove(conn, [wanted])
    if not removed:
        raise HTTPException(404, f"{wanted} is not registered")
    return RegistryRemoved(removed=removed, not_registered=[])
