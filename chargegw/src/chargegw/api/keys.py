"""The API-key API: create, list, rotate and revoke the keys partners use (``admin``).

A key is shown once, in the answer that creates it (``POST /api/v1/api-keys`` or
``.../rotate``); lists show its first characters (``prefix``) to recognise it. Revoking
takes effect on every process within a second (domain/auth.py ``KeyListener``).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from chargegw.api.deps import Pool, refused
from chargegw.api.errors import error_responses
from chargegw.api.pagination import DEFAULT_LIMIT, Cursor, Limit, decode_cursor, encode_cursor
from chargegw.domain import auth
from chargegw.domain.auth import MAX_LIFETIME_S, MAX_OVERLAP_S, NewKey, Scope, StoredKey
from chargegw.domain.refusals import RequestError

__all__ = ["router"]

KeyId = Annotated[int, Path(ge=1, description="the key's id")]
_Id = Annotated[str, Field(min_length=1, max_length=64)]
_NOT_FOUND = (404, "No such API key")
#: the answers that show a key must not be kept by caches or proxies
_NO_STORE = {"Cache-Control": "no-store"}
#: how long a rotated key keeps working by default
DEFAULT_OVERLAP_S = 86400.0


class KeyCreate(BaseModel):
    """A key to create: what it may do, from where, until when."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"not": {"required": ["expires_at", "expires_in_s"]}},
    )

    name: str = Field(min_length=1, max_length=auth.MAX_NAME_LENGTH, examples=["billing app"])
    scopes: list[Scope] = Field(
        min_length=1,
        description="read, control (start/stop/modify, commands), billing (cards, plans, "
        "reconciliation), config (parameters, firmware), admin (keys, webhooks, bans, "
        "nodes; implies every scope)",
        examples=[["read", "control"]],
    )
    allowed_device_ids: list[_Id] | None = Field(
        None,
        min_length=1,
        max_length=auth.MAX_LISTED_IDS,
        description="the devices the key may act on; null: any (see allowed_gateway_ids)",
    )
    allowed_gateway_ids: list[_Id] | None = Field(
        None,
        min_length=1,
        max_length=auth.MAX_LISTED_IDS,
        description="the key may act on these gateways and the devices behind them; null: "
        "any. With both lists, a device is allowed when either allows it",
    )
    allowed_networks: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None,
        min_length=1,
        max_length=auth.MAX_NETWORKS,
        description="client networks (CIDR; an address alone is one host); null: any",
        examples=[["203.0.113.0/24", "2001:db8::/32"]],
    )
    expires_at: dt.datetime | None = Field(
        None,
        description="when the key stops working, in the future (at most one of this and "
        "expires_in_s)",
    )
    expires_in_s: float | None = Field(
        None, gt=0, le=MAX_LIFETIME_S, description="seconds from now until the key stops working"
    )
    hmac_required: bool = Field(
        False, description="every request must be signed (x-chargegw-signature)"
    )


class ApiKey(BaseModel):
    """A stored key: never the key or its hash."""

    key_id: int
    name: str
    prefix: str | None = Field(
        description="the key's first characters, to recognise it (null for old keys)",
        examples=["cgw_Ab3x"],
    )
    scopes: list[Scope]
    allowed_device_ids: list[str] | None
    allowed_gateway_ids: list[str] | None
    allowed_networks: list[str] | None
    expires_at: dt.datetime | None
    hmac_required: bool
    rotated_from: int | None = Field(description="the key this one replaced")
    created_at: dt.datetime
    last_used_at: dt.datetime | None = Field(
        description="the last use a process recorded (about once a minute per process)"
    )
    revoked_at: dt.datetime | None
    status: Literal["active", "expired", "revoked"]


class ApiKeyCreated(ApiKey):
    """A new key, with the key itself: shown this once."""

    key: str = Field(description="send as Authorization: Bearer <key>; shown only now")


class Rotated(ApiKeyCreated):
    """The new key; the old one works until ``previous_expires_at``."""

    previous_expires_at: dt.datetime


class KeyRotation(BaseModel):
    """How long the old key keeps working beside the new one."""

    model_config = ConfigDict(extra="forbid")

    overlap_s: float = Field(DEFAULT_OVERLAP_S, ge=0, le=MAX_OVERLAP_S)


#: a rotation without a body: the default overlap
_DEFAULT_ROTATION = KeyRotation.model_validate({})


class KeyPage(BaseModel):
    """A page of keys, by id."""

    items: list[ApiKey]
    next_cursor: str | None


router = APIRouter(prefix="/api/v1", tags=["api-keys"])


def _model(key: StoredKey) -> ApiKey:
    return ApiKey.model_validate(key, from_attributes=True)


@router.post(
    "/api-keys",
    status_code=201,
    summary="Create an API key (shown once)",
    response_model=ApiKeyCreated,
)
async def create_key(pool: Pool, body: KeyCreate, response: Response) -> ApiKeyCreated:
    """The answer holds the key itself; store it, it is not shown again."""
    spec = NewKey(
        name=body.name,
        scopes=body.scopes,
        allowed_device_ids=body.allowed_device_ids,
        allowed_gateway_ids=body.allowed_gateway_ids,
        allowed_networks=body.allowed_networks,
        expires_at=body.expires_at,
        expires_in_s=body.expires_in_s,
        hmac_required=body.hmac_required,
    )
    async with pool.acquire() as conn:
        try:
            key_id, key = await auth.create_key(conn, spec)
        except RequestError as exc:
            raise refused(exc) from None
        stored = await auth.get_key(conn, key_id)
    assert stored is not None
    response.headers.update(_NO_STORE)
    return ApiKeyCreated(**_model(stored).model_dump(), key=key)


@router.get("/api-keys", summary="API keys, by id (never the keys)")
async def list_keys(pool: Pool, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> KeyPage:
    """Revoked and expired keys included (``status``)."""
    after = None if cursor is None else int(decode_cursor(cursor, "api-keys", (int,))[0])
    async with pool.acquire() as conn:
        keys = await auth.list_keys(conn, after=after, limit=limit + 1)
    more = len(keys) > limit
    keys = keys[:limit]
    next_cursor = encode_cursor("api-keys", [keys[-1].key_id]) if more else None
    return KeyPage(items=[_model(k) for k in keys], next_cursor=next_cursor)


@router.get(
    "/api-keys/{key_id}",
    summary="One API key (never the key)",
    responses=error_responses(_NOT_FOUND),
)
async def get_key(pool: Pool, key_id: KeyId) -> ApiKey:
    async with pool.acquire() as conn:
        key = await auth.get_key(conn, key_id)
    if key is None:
        raise HTTPException(404, f"API key {key_id} not found")
    return _model(key)


@router.post(
    "/api-keys/{key_id}/rotate",
    status_code=201,
    summary="Replace a key: a new one now, the old one until the overlap ends",
    response_model=Rotated,
    responses=error_responses(_NOT_FOUND, (409, "The key is revoked or expired")),
)
async def rotate_key(
    pool: Pool, key_id: KeyId, response: Response, body: KeyRotation = _DEFAULT_ROTATION
) -> Rotated:
    """The new key has the old one's name, scopes, limits and expiry; the old one stops
    working ``overlap_s`` from now (default a day), or earlier if it was to expire sooner."""
    overlap_s = body.overlap_s
    async with pool.acquire() as conn:
        try:
            new_id, key, previous_expires_at = await auth.rotate_key(conn, key_id, overlap_s)
        except RequestError as exc:
            raise refused(exc) from None
        stored = await auth.get_key(conn, new_id)
    assert stored is not None
    response.headers.update(_NO_STORE)
    return Rotated(**_model(stored).model_dump(), key=key, previous_expires_at=previous_expires_at)


async def _revoke(pool: Pool, key_id: int) -> ApiKey:
    async with pool.acquire() as conn:
        await auth.revoke_key(conn, key_id)
        key = await auth.get_key(conn, key_id)
    if key is None:
        raise HTTPException(404, f"API key {key_id} not found")
    return _model(key)


@router.post(
    "/api-keys/{key_id}/revoke",
    summary="Revoke a key: every process refuses it within a second",
    responses=error_responses(_NOT_FOUND),
)
async def revoke_key(pool: Pool, key_id: KeyId) -> ApiKey:
    """Revoking a revoked key changes nothing (the answer shows when it was revoked)."""
    return await _revoke(pool, key_id)


@router.delete(
    "/api-keys/{key_id}",
    summary="Revoke a key (the row stays, for the audit trail)",
    responses=error_responses(_NOT_FOUND),
)
async def delete_key(pool: Pool, key_id: KeyId) -> ApiKey:
    """The same as ``POST .../revoke``."""
    return await _revoke(pool, key_id)
