"""API keys: generating, storing (hashed), scoping, rotating, revoking and checking them;
signed requests.

A request to the API carries ``Authorization: Bearer <key>``. A key is valid when it is one
of the configured keys (``CHARGEGW_API_KEYS``, comma-separated; never stored; every scope,
no limits) or a stored key (``chargegw apikey create``, ``POST /api/v1/api-keys``) that is
neither revoked nor expired. Stored keys are kept only as ``sha256:<hex>`` of the key: they
are 32 random bytes, so a fast hash is enough (there is nothing to guess), and the
plaintext is shown once, at creation.

A stored key carries what it may do (:class:`ApiKeyInfo`): its scopes (``read``,
``control``, ``billing``, ``config``, ``admin``; ``admin`` implies the others), optionally
the devices and gateways it may act on, the networks it may be used from, an expiry, and
whether its requests must be signed (:func:`check_signature`).

Positive lookups are cached per process (:class:`KeyCache`). Every change that can make a
key refuse requests is announced by a trigger on ``chargegw_api_keys``; each process's
:class:`KeyListener` drops the key from its cache at once, so a revocation takes effect on
every worker within a second. While a process is not listening (starting, or its
notification connection is down) its cache keeps entries for
:data:`UNLISTENED_CACHE_TTL_S` only. Failed lookups are not cached.

Without any key, configured or stored, the API does not authenticate; the gateway then
listens for HTTP on 127.0.0.1 only (:func:`effective_http_host`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import asyncpg
import structlog

from chargegw.config import peer_address
from chargegw.domain.refusals import ConflictError, InvalidError, NotFoundError
from chargegw.store.database import Connection
from chargegw.store.errors import DB_ERRORS

__all__ = [
    "ALL_SCOPES",
    "CHANNEL",
    "DEFAULT_CACHE_TTL_S",
    "KEY_PREFIX",
    "LOCAL_KEY",
    "NO_KEYS_WARNING",
    "SIGNATURE_TOLERANCE_S",
    "UNLISTENED_CACHE_TTL_S",
    "ApiKeyInfo",
    "KeyCache",
    "KeyListener",
    "KeyRefusedError",
    "Network",
    "NewKey",
    "Reason",
    "Scope",
    "StoredKey",
    "auth_mode",
    "authenticate",
    "check_signature",
    "command_device",
    "configured_info",
    "configured_keys",
    "create_key",
    "device_gateways",
    "effective_http_host",
    "generate_key",
    "get_key",
    "hash_key",
    "list_keys",
    "order_device",
    "parse_keys",
    "parse_networks",
    "parse_scopes",
    "record_nonce",
    "revoke_key",
    "rotate_key",
    "sign",
    "verify",
]

log = structlog.get_logger("chargegw.auth")

#: every generated key starts with this, so leaked keys are easy to recognise
KEY_PREFIX = "cgw_"
#: characters of a key kept (``cgw_`` and 4 random ones) to recognise it in lists
SHOWN_PREFIX_LENGTH = len(KEY_PREFIX) + 4
#: a presented key longer than this is rejected without hashing or a lookup
MAX_KEY_LENGTH = 256
#: a process that hears of key changes keeps a key it found valid this long
DEFAULT_CACHE_TTL_S = 60.0
#: ... and this long while it does not hear of them (its notification connection is down)
UNLISTENED_CACHE_TTL_S = 1.0
DEFAULT_CACHE_SIZE = 1024
#: how long a key lookup may wait for a pooled connection, and run
LOOKUP_TIMEOUT_S = 5.0
#: ``last_used_at`` is written at most this often per key and process
TOUCH_INTERVAL_S = 60.0
#: the notification channel of key changes (payload: the key id)
CHANNEL = "chargegw_api_keys"
LOOPBACK_HOST = "127.0.0.1"
NO_KEYS_WARNING = (
    "no API keys configured: the HTTP API listens on 127.0.0.1 only; "
    "set CHARGEGW_API_KEYS or run `chargegw apikey create`"
)
MAX_NAME_LENGTH = 200
MAX_LISTED_IDS = 10_000
MAX_NETWORKS = 1000
MAX_LIFETIME_S = 10 * 365 * 86400.0
MAX_OVERLAP_S = 30 * 86400.0

#: a signed request's timestamp may differ from the server's clock by this much
SIGNATURE_TOLERANCE_S = 300
#: request ids are kept this long: past the window on both sides, with room for clock skew
#: between the nodes (a replay needs a timestamp inside the window, so a request id older
#: than twice the window cannot be replayed)
NONCE_RETENTION_S = 3 * SIGNATURE_TOLERANCE_S
ID_HEADER = "x-chargegw-id"
TIMESTAMP_HEADER = "x-chargegw-timestamp"
SIGNATURE_HEADER = "x-chargegw-signature"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_:\-]{1,128}$")
_MAX_SIGNATURE_HEADER = 1024


class Scope(enum.StrEnum):
    """What a key may do; ``admin`` implies every other scope."""

    READ = "read"
    CONTROL = "control"
    BILLING = "billing"
    CONFIG = "config"
    ADMIN = "admin"


ALL_SCOPES: frozenset[Scope] = frozenset(Scope)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Reason(enum.StrEnum):
    """Why a request was refused: a stable word for logs, metrics and the call audit."""

    MISSING_KEY = "missing_key"
    UNKNOWN_KEY = "unknown_key"
    KEY_EXPIRED = "key_expired"
    KEY_REVOKED = "key_revoked"
    SIGNATURE_MISSING = "signature_missing"
    SIGNATURE_INVALID = "signature_invalid"
    SIGNATURE_STALE = "signature_stale"
    SIGNATURE_REPLAYED = "signature_replayed"
    NETWORK = "network"
    SCOPE = "scope"
    DEVICE = "device"
    #: a console session that is unknown, expired or idle too long
    SESSION_EXPIRED = "session_expired"
    #: a change through a console session without its CSRF token, or a cross-site one
    CSRF = "csrf"


class KeyRefusedError(Exception):
    """A request refused for its key, its signature or what the key may do."""

    def __init__(self, reason: Reason, message: str, *, key_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        #: the key's id when it was identified (an expired, revoked or limited key)
        self.key_id = key_id


# ---------------------------------------------------------------- keys


def generate_key() -> str:
    """A new random key: ``cgw_`` and 43 URL-safe characters (32 random bytes)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """What is stored for ``key``: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def parse_keys(value: str | Iterable[str] | None) -> frozenset[str]:
    """Keys from a comma-separated string (or an iterable); blanks dropped, spaces stripped."""
    if value is None:
        return frozenset()
    parts = value.split(",") if isinstance(value, str) else value
    return frozenset(p.strip() for p in parts if p.strip())


def configured_keys(settings: object) -> frozenset[str]:
    """The keys of ``settings.api_keys`` (``CHARGEGW_API_KEYS``); none if it has no such field."""
    return parse_keys(getattr(settings, "api_keys", None))


def _matching_configured(configured: Iterable[str], presented: str) -> str | None:
    """The configured key equal to ``presented``, compared in constant time (as hashes, so
    lengths agree) against every one."""
    digest = hashlib.sha256(presented.encode()).digest()
    found = None
    for key in configured:
        if hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest()):
            found = key
    return found


# ---------------------------------------------------------------- who is calling


@dataclasses.dataclass(frozen=True)
class ApiKeyInfo:
    """Who is calling, and what the key may do: what a request carries on
    ``request.state.api_key`` (never the key or its hash).

    ``key_id`` is a stable identity for logs, audit rows and rate limits: the stored key's
    id (``"12"``), ``"config:<first 8 hex of sha256>"`` for a configured key, ``"local"``
    when the API runs without keys. ``None`` in ``allowed_*`` means "any".
    """

    key_id: str
    name: str
    scopes: frozenset[Scope]
    allowed_device_ids: frozenset[str] | None = None
    allowed_gateway_ids: frozenset[str] | None = None
    allowed_networks: tuple[Network, ...] | None = None
    hmac_required: bool = False
    #: the ``api_keys`` row; None for configured keys and the local mode
    stored_id: int | None = None
    expires_at: dt.datetime | None = None

    def has_scope(self, scope: Scope) -> bool:
        """Whether the key may do what ``scope`` covers."""
        return Scope.ADMIN in self.scopes or scope in self.scopes

    @property
    def limited_to_devices(self) -> bool:
        """The key may act only on some devices (or the devices of some gateways)."""
        return self.allowed_device_ids is not None or self.allowed_gateway_ids is not None

    def allows_address(self, host: str | None) -> bool:
        """Whether a request from ``host`` (the client address) may use the key."""
        if self.allowed_networks is None:
            return True
        address = peer_address(host)
        if address is None:
            return False
        return any(address in network for network in self.allowed_networks)


#: the identity of requests while the API runs without keys (loopback only)
LOCAL_KEY = ApiKeyInfo(key_id="local", name="local (no API keys)", scopes=ALL_SCOPES)


def configured_info(key: str) -> ApiKeyInfo:
    """The identity of a configured key: every scope, no limits."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return ApiKeyInfo(key_id=f"config:{digest}", name="configured key", scopes=ALL_SCOPES)


# ---------------------------------------------------------------- what a new key may do


def parse_scopes(values: Iterable[str], *, field: str = "scopes") -> frozenset[Scope]:
    """Scope names as scopes; :class:`InvalidError` naming ``field`` for an unknown or
    empty list."""
    scopes: set[Scope] = set()
    for value in values:
        try:
            scopes.add(Scope(value.strip().lower()))
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise InvalidError(
                {"error": f"unknown scope {value!r} (known: {known})", "field": field}
            ) from None
    if not scopes:
        raise InvalidError({"error": "a key needs at least one scope", "field": field})
    return frozenset(scopes)


def parse_networks(
    values: Iterable[str] | None, *, field: str = "allowed_networks"
) -> tuple[Network, ...] | None:
    """CIDR blocks (``10.0.0.0/8``; a single address is a /32 or /128); None stays None.

    Host bits must be zero (``10.0.0.1/8`` is refused, naming ``10.0.0.0/8``): PostgreSQL's
    ``cidr`` refuses them too, and a typo there would open more than was meant.
    """
    if values is None:
        return None
    networks: list[Network] = []
    for value in values:
        text = value.strip()
        if "%" in text:  # a zone (fe80::1%eth0) names an interface of one host, not a network
            raise InvalidError({"error": f"{value!r}: no zone ids (%...)", "field": field})
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                message = f"{value!r} is not a network (CIDR such as 10.0.0.0/8)"
                raise InvalidError({"error": message, "field": field}) from None
            raise InvalidError(
                {"error": f"{value!r} has host bits set: did you mean {loose}?", "field": field}
            ) from None
        if network not in networks:
            networks.append(network)
    if not networks:
        raise InvalidError({"error": "must not be empty (null: any network)", "field": field})
    if len(networks) > MAX_NETWORKS:
        raise InvalidError({"error": f"at most {MAX_NETWORKS} networks", "field": field})
    return tuple(networks)


def _parse_ids(values: Iterable[str] | None, field: str) -> list[str] | None:
    if values is None:
        return None
    ids = list(dict.fromkeys(v.strip() for v in values))
    if not ids:
        raise InvalidError({"error": "must not be empty (null: any)", "field": field})
    if any(not v or len(v) > 64 for v in ids):
        raise InvalidError({"error": "ids are 1 to 64 characters", "field": field})
    if len(ids) > MAX_LISTED_IDS:
        raise InvalidError({"error": f"at most {MAX_LISTED_IDS} ids", "field": field})
    return ids


@dataclasses.dataclass(frozen=True)
class NewKey:
    """What a key to be created may do (checked by :func:`create_key`)."""

    name: str
    scopes: Iterable[str] = (Scope.ADMIN,)
    allowed_device_ids: Sequence[str] | None = None
    allowed_gateway_ids: Sequence[str] | None = None
    allowed_networks: Sequence[str] | None = None
    #: when the key stops working; at most one of this and ``expires_in_s``
    expires_at: dt.datetime | None = None
    expires_in_s: float | None = None
    hmac_required: bool = False


@dataclasses.dataclass(frozen=True)
class StoredKey:
    """A stored key as listed: never its hash or plaintext."""

    key_id: int
    name: str
    #: the key's first characters (``cgw_ab12``); None for keys made before they were kept
    prefix: str | None
    scopes: tuple[str, ...]
    allowed_device_ids: tuple[str, ...] | None
    allowed_gateway_ids: tuple[str, ...] | None
    allowed_networks: tuple[str, ...] | None
    expires_at: dt.datetime | None
    hmac_required: bool
    rotated_from: int | None
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None
    #: active, expired or revoked (by the database's clock)
    status: str

    @property
    def active(self) -> bool:
        return self.status == "active"


_KEY_COLUMNS = """key_id, name, key_prefix, scopes, allowed_device_ids, allowed_gateway_ids,
    allowed_networks, expires_at, hmac_required, rotated_from, created_at, last_used_at,
    revoked_at,
    CASE WHEN revoked_at IS NOT NULL THEN 'revoked'
         WHEN expires_at IS NOT NULL AND expires_at <= now() THEN 'expired'
         ELSE 'active' END AS status"""


def _stored(row: asyncpg.Record) -> StoredKey:
    def strings(value: Any) -> tuple[str, ...] | None:
        return None if value is None else tuple(str(v) for v in value)

    return StoredKey(
        key_id=int(row["key_id"]),
        name=row["name"],
        prefix=row["key_prefix"],
        scopes=tuple(s.value for s in Scope if s.value in row["scopes"]),
        allowed_device_ids=strings(row["allowed_device_ids"]),
        allowed_gateway_ids=strings(row["allowed_gateway_ids"]),
        allowed_networks=strings(row["allowed_networks"]),
        expires_at=row["expires_at"],
        hmac_required=row["hmac_required"],
        rotated_from=row["rotated_from"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
        status=row["status"],
    )


async def create_key(
    conn: Connection, name: str | NewKey, *, rotated_from: int | None = None
) -> tuple[int, str]:
    """Store a new key (a name alone: every scope, no limits); return its id and the key
    (the only time it is seen). :class:`InvalidError` names the field that is wrong."""
    spec = name if isinstance(name, NewKey) else NewKey(name=name)
    clean = spec.name.strip()
    if not clean:
        raise InvalidError({"error": "an API key needs a name", "field": "name"})
    if len(clean) > MAX_NAME_LENGTH:
        raise InvalidError({"error": f"at most {MAX_NAME_LENGTH} characters", "field": "name"})
    scopes = parse_scopes(spec.scopes)
    networks = parse_networks(spec.allowed_networks)
    devices = _parse_ids(spec.allowed_device_ids, "allowed_device_ids")
    gateways = _parse_ids(spec.allowed_gateway_ids, "allowed_gateway_ids")
    if spec.expires_at is not None and spec.expires_in_s is not None:
        raise InvalidError(
            {"error": "give expires_at or expires_in_s, not both", "field": "expires_in_s"}
        )
    if spec.expires_in_s is not None and not 0 < spec.expires_in_s <= MAX_LIFETIME_S:
        raise InvalidError(
            {"error": f"must be above 0 and at most {MAX_LIFETIME_S:g}", "field": "expires_in_s"}
        )
    if spec.expires_at is not None and spec.expires_at.tzinfo is None:
        raise InvalidError({"error": "needs a time zone", "field": "expires_at"})
    key = generate_key()
    async with conn.transaction():
        row = await conn.fetchrow(
            """INSERT INTO api_keys (name, key_hash, key_prefix, scopes, allowed_device_ids,
                                     allowed_gateway_ids, allowed_networks, expires_at,
                                     hmac_required, rotated_from)
               VALUES ($1, $2, $3, $4, $5, $6, $7,
                       coalesce($8, now() + make_interval(secs => $9)), $10, $11)
               RETURNING key_id, expires_at IS NOT NULL AND expires_at <= now() AS expired""",
            clean,
            hash_key(key),
            key[:SHOWN_PREFIX_LENGTH],
            sorted(s.value for s in scopes),
            devices,
            gateways,
            list(networks) if networks is not None else None,
            spec.expires_at,
            spec.expires_in_s,
            spec.hmac_required,
            rotated_from,
        )
        assert row is not None
        if row["expired"]:
            raise InvalidError({"error": "must be in the future", "field": "expires_at"})
    return int(row["key_id"]), key


async def get_key(conn: Connection, key_id: int) -> StoredKey | None:
    """One stored key, or None."""
    row = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = $1", key_id)
    return None if row is None else _stored(row)


async def list_keys(
    conn: Connection, *, after: int | None = None, limit: int | None = None
) -> list[StoredKey]:
    """Stored keys, revoked and expired ones included, by id (after ``after``)."""
    rows = await conn.fetch(
        f"""SELECT {_KEY_COLUMNS} FROM api_keys
             WHERE $1::bigint IS NULL OR key_id > $1
             ORDER BY key_id LIMIT $2""",
        after,
        limit,
    )
    return [_stored(r) for r in rows]


async def revoke_key(conn: Connection, key_id: int) -> bool:
    """Revoke a key; False if there is no such key or it was already revoked. Every
    process stops accepting it when the transaction commits (the trigger's notification)."""
    revoked = await conn.fetchval(
        """UPDATE api_keys SET revoked_at = now()
            WHERE key_id = $1 AND revoked_at IS NULL RETURNING key_id""",
        key_id,
    )
    return revoked is not None


async def rotate_key(
    conn: Connection, key_id: int, overlap_s: float
) -> tuple[int, str, dt.datetime]:
    """Replace a key: a new one with the same name, scopes, limits and expiry (shown once),
    and the old one expiring ``overlap_s`` from now (or earlier, if it was to expire
    sooner). Returns the new id, the new key and when the old one stops working.

    :class:`NotFoundError` for no such key, :class:`ConflictError` for a revoked or
    expired one.
    """
    if not 0 <= overlap_s <= MAX_OVERLAP_S:
        raise InvalidError(
            {"error": f"must be from 0 to {MAX_OVERLAP_S:g} seconds", "field": "overlap_s"}
        )
    async with conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = $1 FOR UPDATE", key_id
        )
        if row is None:
            raise NotFoundError(f"API key {key_id} not found")
        old = _stored(row)
        if not old.active:
            raise ConflictError(f"API key {key_id} is {old.status}: create a new key instead")
        new_id, key = await create_key(
            conn,
            NewKey(
                name=old.name,
                scopes=old.scopes,
                allowed_device_ids=old.allowed_device_ids,
                allowed_gateway_ids=old.allowed_gateway_ids,
                allowed_networks=old.allowed_networks,
                expires_at=old.expires_at,
                hmac_required=old.hmac_required,
            ),
            rotated_from=key_id,
        )
        old_expires = await conn.fetchval(
            """UPDATE api_keys
                  SET expires_at = least(coalesce(expires_at, 'infinity'),
                                         now() + make_interval(secs => $2))
                WHERE key_id = $1 RETURNING expires_at""",
            key_id,
            float(overlap_s),
        )
    return new_id, key, old_expires


async def touch_key(conn: Connection, key_id: int) -> None:
    """Record that a key was used now (best effort: a read-only standby still checks keys)."""
    with contextlib.suppress(asyncpg.ReadOnlySQLTransactionError):
        await conn.execute(
            "UPDATE api_keys SET last_used_at = now() WHERE key_id = $1",
            key_id,
            timeout=LOOKUP_TIMEOUT_S,
        )


# ---------------------------------------------------------------- the subjects of requests


async def device_gateways(conn: Connection, device_ids: Iterable[str]) -> dict[str, str | None]:
    """The gateway of each known device (None when it has none); unknown ones are left out."""
    rows = await conn.fetch(
        "SELECT device_id, gateway_id FROM devices WHERE device_id = ANY($1::text[])",
        list(device_ids),
    )
    return {r["device_id"]: r["gateway_id"] for r in rows}


async def order_device(conn: Connection, order_no: str) -> str | None:
    """The device of an order, None for an unknown order."""
    device: str | None = await conn.fetchval(
        "SELECT device_id FROM orders WHERE order_no = $1", order_no
    )
    return device


async def command_device(conn: Connection, command_id: int) -> str | None:
    """The device of a command, None for an unknown command."""
    device: str | None = await conn.fetchval(
        "SELECT device_id FROM commands WHERE command_id = $1", command_id
    )
    return device


# ---------------------------------------------------------------- checking


@dataclasses.dataclass
class _Entry:
    info: ApiKeyInfo
    added: float
    #: monotonic time the key expires, None if it does not
    expires: float | None


class KeyCache:
    """Stored keys found valid, by hash, for ``ttl_s`` seconds while :attr:`listening`
    (a :class:`KeyListener` drops changed keys at once), for ``unlistened_ttl_s`` while
    not. A key's own expiry is kept with it: an expired key is looked up again.

    Bounded: beyond ``max_entries`` the oldest entry is dropped. ``clock`` is injectable
    for tests.
    """

    def __init__(
        self,
        ttl_s: float = DEFAULT_CACHE_TTL_S,
        max_entries: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        unlistened_ttl_s: float = UNLISTENED_CACHE_TTL_S,
    ) -> None:
        self.ttl_s = ttl_s
        self.unlistened_ttl_s = unlistened_ttl_s
        self.max_entries = max_entries
        self.clock = clock
        #: a listener hears of key changes now (set by :class:`KeyListener`)
        self.listening = False
        #: bumped by every invalidation: a lookup that began before one is not cached
        self.generation = 0
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._touched: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def effective_ttl_s(self) -> float:
        """How long an entry is trusted now."""
        return self.ttl_s if self.listening else min(self.ttl_s, self.unlistened_ttl_s)

    def get(self, key_hash: str) -> ApiKeyInfo | None:
        """The cached key, None if it is not cached (or no longer trusted)."""
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        now = self.clock()
        if now - entry.added >= self.effective_ttl_s or (
            entry.expires is not None and now >= entry.expires
        ):
            del self._entries[key_hash]
            return None
        return entry.info

    def add(
        self,
        key_hash: str,
        info: ApiKeyInfo,
        *,
        generation: int | None = None,
        expires_in_s: float | None = None,
    ) -> None:
        """Cache ``info``, unless the cache was invalidated since ``generation`` (the
        lookup's answer may predate the change)."""
        if generation is not None and generation != self.generation:
            return
        now = self.clock()
        expires = None if expires_in_s is None else now + expires_in_s
        self._entries.pop(key_hash, None)
        self._entries[key_hash] = _Entry(info, now, expires)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, stored_id: int) -> None:
        """Drop a stored key (it changed)."""
        self.generation += 1
        for key_hash in [h for h, e in self._entries.items() if e.info.stored_id == stored_id]:
            del self._entries[key_hash]

    def clear(self) -> None:
        """Drop everything (changes may have been missed)."""
        self.generation += 1
        self._entries.clear()

    def touch_due(self, stored_id: int) -> bool:
        """Whether ``last_used_at`` of the key is to be written now; notes that it is."""
        now = self.clock()
        last = self._touched.get(stored_id)
        if last is not None and now - last < TOUCH_INTERVAL_S:
            return False
        if len(self._touched) >= self.max_entries:
            self._touched.clear()
        self._touched[stored_id] = now
        return True


class NeedsDatabaseError(Exception):
    """The key may be a stored one, and there is no database to ask."""


def _info(row: asyncpg.Record) -> ApiKeyInfo:
    def ids(value: Any) -> frozenset[str] | None:
        return None if value is None else frozenset(value)

    networks = row["allowed_networks"]
    return ApiKeyInfo(
        key_id=str(row["key_id"]),
        name=row["name"],
        scopes=frozenset(Scope(s) for s in row["scopes"]),
        allowed_device_ids=ids(row["allowed_device_ids"]),
        allowed_gateway_ids=ids(row["allowed_gateway_ids"]),
        allowed_networks=None if networks is None else tuple(networks),
        hmac_required=row["hmac_required"],
        stored_id=int(row["key_id"]),
        expires_at=row["expires_at"],
    )


async def authenticate(
    pool: asyncpg.Pool | None,
    configured: Iterable[str],
    presented: str | None,
    *,
    cache: KeyCache,
) -> ApiKeyInfo:
    """Who presents ``presented``: a configured key, or an active stored one.

    :class:`KeyRefusedError` for no key, an unknown, expired or revoked one;
    :class:`NeedsDatabaseError` when the key might be a stored one and ``pool`` is None.
    Configured keys and cached ones are checked without the database; a lookup also
    records ``last_used_at`` (at most once a minute per key and process). Database errors
    propagate: the caller decides whether that is a 503.
    """
    if not presented:
        raise KeyRefusedError(
            Reason.MISSING_KEY, "missing API key: send Authorization: Bearer <key>"
        )
    if len(presented) > MAX_KEY_LENGTH:
        raise KeyRefusedError(Reason.UNKNOWN_KEY, "invalid API key")
    configured_key = _matching_configured(configured, presented)
    if configured_key is not None:
        return configured_info(configured_key)
    return await authenticate_hash(pool, (), hash_key(presented), cache=cache)


async def authenticate_hash(
    pool: asyncpg.Pool | None,
    configured: Iterable[str],
    key_hash: str,
    *,
    cache: KeyCache,
) -> ApiKeyInfo:
    """Who holds the key whose :func:`hash_key` is ``key_hash``: what a console session
    keeps instead of the key. Refusals and errors as :func:`authenticate`."""
    for key in configured:
        if hmac.compare_digest(hash_key(key), key_hash):
            return configured_info(key)
    cached = cache.get(key_hash)
    if cached is not None:
        return cached
    if pool is None:
        raise NeedsDatabaseError
    generation = cache.generation
    async with pool.acquire(timeout=LOOKUP_TIMEOUT_S) as conn:
        row = await conn.fetchrow(
            """SELECT key_id, name, scopes, allowed_device_ids, allowed_gateway_ids,
                      allowed_networks, hmac_required, expires_at, revoked_at,
                      extract(epoch FROM expires_at - now())::float8 AS expires_in_s
                 FROM api_keys WHERE key_hash = $1""",
            key_hash,
            timeout=LOOKUP_TIMEOUT_S,
        )
        if row is None:
            raise KeyRefusedError(Reason.UNKNOWN_KEY, "invalid API key")
        key_id = str(row["key_id"])
        if row["revoked_at"] is not None:
            raise KeyRefusedError(Reason.KEY_REVOKED, "API key revoked", key_id=key_id)
        if row["expires_in_s"] is not None and row["expires_in_s"] <= 0:
            raise KeyRefusedError(Reason.KEY_EXPIRED, "API key expired", key_id=key_id)
        info = _info(row)
        if cache.touch_due(int(row["key_id"])):
            await touch_key(conn, int(row["key_id"]))
    cache.add(key_hash, info, generation=generation, expires_in_s=row["expires_in_s"])
    return info


async def verify(
    pool: asyncpg.Pool | None,
    configured_keys: Iterable[str],
    presented: str | None,
    *,
    cache: KeyCache | None = None,
) -> bool:
    """Whether ``presented`` is a configured key or an active stored one (False without a
    database for a key that is not configured). Database errors propagate."""
    try:
        await authenticate(pool, configured_keys, presented, cache=cache or KeyCache())
    except (KeyRefusedError, NeedsDatabaseError):
        return False
    return True


async def auth_mode(settings_keys: str | Iterable[str] | None, pool: asyncpg.Pool) -> bool:
    """Whether the API must authenticate: some key is configured, or stored and active.

    Decided once at start: a key created while the gateway runs without any takes effect
    at the next start.
    """
    if parse_keys(settings_keys):
        return True
    stored = await pool.fetchval(
        """SELECT EXISTS (SELECT 1 FROM api_keys
                           WHERE revoked_at IS NULL
                             AND (expires_at IS NULL OR expires_at > now()))"""
    )
    return bool(stored)


# ---------------------------------------------------------------- signed requests


def sign(key: str, request_id: str, timestamp: int, body: bytes) -> str:
    """The ``x-chargegw-signature`` of a request: ``v1,`` and the base64 HMAC-SHA256, keyed
    with the API key, of ``<id>.<timestamp>.<body>`` (the Standard Webhooks scheme)."""
    mac = hmac.new(key.encode(), f"{request_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def check_signature(
    key: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> tuple[str, int]:
    """Check a signed request's headers against ``body``; return its id and timestamp.

    :class:`KeyRefusedError` when a header is missing or malformed, the timestamp is more
    than :data:`SIGNATURE_TOLERANCE_S` from ``now`` (Unix seconds), or no ``v1`` signature
    of the header (several may be sent, separated by spaces) matches. Whether the id was
    seen before is :func:`record_nonce`'s to say.
    """
    request_id = headers.get(ID_HEADER)
    stamp = headers.get(TIMESTAMP_HEADER)
    signatures = headers.get(SIGNATURE_HEADER)
    if not (request_id and stamp and signatures):
        missing = [
            name
            for name, value in (
                (ID_HEADER, request_id),
                (TIMESTAMP_HEADER, stamp),
                (SIGNATURE_HEADER, signatures),
            )
            if not value
        ]
        raise KeyRefusedError(
            Reason.SIGNATURE_MISSING, f"signed request without {', '.join(missing)}"
        )
    if not _REQUEST_ID.match(request_id):
        raise KeyRefusedError(
            Reason.SIGNATURE_INVALID, f"{ID_HEADER} must be 1 to 128 of A-Z a-z 0-9 _ - :"
        )
    if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 12:
        raise KeyRefusedError(Reason.SIGNATURE_INVALID, f"{TIMESTAMP_HEADER} must be Unix seconds")
    timestamp = int(stamp)
    now = time.time() if now is None else now
    if abs(now - timestamp) > SIGNATURE_TOLERANCE_S:
        raise KeyRefusedError(
            Reason.SIGNATURE_STALE,
            f"{TIMESTAMP_HEADER} is more than {SIGNATURE_TOLERANCE_S} s from the server's clock",
        )
    if len(signatures) > _MAX_SIGNATURE_HEADER:
        raise KeyRefusedError(Reason.SIGNATURE_INVALID, "invalid request signature")
    expected = sign(key, request_id, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, s.encode()) for s in signatures.split(" ") if s):
        raise KeyRefusedError(Reason.SIGNATURE_INVALID, "invalid request signature")
    return request_id, timestamp


async def record_nonce(pool: asyncpg.Pool, key_id: str, request_id: str) -> bool:
    """Note a signed request's id for its key; False if it was seen within the retention
    (a replay), whichever process saw it."""
    async with pool.acquire(timeout=LOOKUP_TIMEOUT_S) as conn:
        fresh = await conn.fetchval(
            """INSERT INTO api_request_nonces (key_ref, nonce) VALUES ($1, $2)
               ON CONFLICT (key_ref, nonce) DO UPDATE SET seen_at = now()
                WHERE api_request_nonces.seen_at < now() - make_interval(secs => $3)
               RETURNING true""",
            key_id,
            request_id,
            float(NONCE_RETENTION_S),
            timeout=LOOKUP_TIMEOUT_S,
        )
    return bool(fresh)


async def delete_old_nonces(conn: Connection, *, batch: int = 10_000) -> int:
    """Forget request ids past the retention, a batch at a time; how many went."""
    deleted = 0
    while True:
        status = await conn.execute(
            """DELETE FROM api_request_nonces WHERE ctid = ANY (ARRAY(
                   SELECT ctid FROM api_request_nonces
                    WHERE seen_at < now() - make_interval(secs => $1) LIMIT $2))""",
            float(NONCE_RETENTION_S),
            batch,
        )
        count = int(status.split()[-1])
        deleted += count
        if count < batch:
            return deleted


class KeyListener:
    """Hears of key changes (``LISTEN chargegw_api_keys``) on a connection of its own and
    drops changed keys from ``cache``; reconnects after losing the connection, clearing
    the cache (changes may have been missed). While it does not listen, the cache trusts
    entries for a second only. Also deletes old request ids of signed requests.

    ``await run()`` until cancelled; :attr:`listening` says whether it hears now.
    """

    def __init__(
        self,
        dsn: Callable[[], str],
        cache: KeyCache,
        *,
        ping_s: float = 1.0,
        cleanup_s: float = 60.0,
    ) -> None:
        self._dsn = dsn
        self.cache = cache
        self.ping_s = ping_s
        self.cleanup_s = cleanup_s
        self.connections = 0

    @property
    def listening(self) -> bool:
        return self.cache.listening

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            self.cache.forget(int(str(payload)))
        except ValueError:
            self.cache.clear()

    async def run(self) -> None:
        """Listen until cancelled."""
        delay = 0.5
        while True:
            try:
                conn = await asyncpg.connect(self._dsn(), timeout=5)
            except DB_ERRORS as exc:
                log.warning("cannot open the API key notification connection", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.5
            try:
                await conn.add_listener(CHANNEL, self._notified)
                self.cache.clear()  # what changed while nobody listened
                self.cache.listening = True
                self.connections += 1
                await self._serve(conn)
            except DB_ERRORS as exc:
                log.warning("API key notification connection lost", error=str(exc))
            finally:
                self.cache.listening = False
                self.cache.clear()
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)
            await asyncio.sleep(delay)

    async def _serve(self, conn: asyncpg.Connection) -> None:
        cleaned = -1e18
        loop = asyncio.get_running_loop()
        while not conn.is_closed():
            if loop.time() - cleaned >= self.cleanup_s:
                cleaned = loop.time()
                try:
                    await delete_old_nonces(conn)
                except asyncpg.PostgresError as exc:  # a read-only standby: not our problem
                    log.debug("old request ids not deleted", error=str(exc))
            await asyncio.sleep(self.ping_s)
            # a cheap round trip notices a dead server sooner than TCP would
            await conn.execute("SELECT 1", timeout=5)


# ---------------------------------------------------------------- the HTTP listener's host


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def effective_http_host(host: str, auth_required: bool) -> tuple[str, str | None]:
    """The address to bind the HTTP API to, and a warning to log if there is one.

    With authentication, ``host`` as configured. Without, a loopback ``host`` is kept and
    any other is replaced by 127.0.0.1; the warning says so in both cases.
    """
    if auth_required:
        return host, None
    if _is_loopback(host):
        return host, NO_KEYS_WARNING
    return LOOPBACK_HOST, f"{NO_KEYS_WARNING} (http_host {host!r} ignored)"
