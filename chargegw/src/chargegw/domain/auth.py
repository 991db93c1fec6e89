"""API keys: generating, storing (hashed), revoking and checking them.

A request to the API carries ``Authorization: Bearer <key>``. A key is valid when it is one
of the configured keys (``CHARGEGW_API_KEYS``, comma-separated; never stored) or a key
created with ``chargegw apikey create`` that has not been revoked. Created keys are stored
only as ``sha256:<hex>`` of the key: they are 32 random bytes, so a fast hash is enough
(there is nothing to guess), and the plaintext is shown once, at creation.

Positive database lookups are cached in memory for :data:`DEFAULT_CACHE_TTL_S` seconds, so
a revoked key stops working within that time on every node (no cross-node invalidation).
Failed lookups are not cached.

Without any key, configured or stored, the API does not authenticate; the gateway then
listens for HTTP on 127.0.0.1 only (:func:`effective_http_host`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Iterable

import asyncpg

from chargegw.store.database import Connection

__all__ = [
    "DEFAULT_CACHE_TTL_S",
    "KEY_PREFIX",
    "NO_KEYS_WARNING",
    "ApiKeyInfo",
    "KeyCache",
    "auth_mode",
    "configured_keys",
    "create_key",
    "effective_http_host",
    "generate_key",
    "hash_key",
    "list_keys",
    "parse_keys",
    "revoke_key",
    "verify",
]

#: every generated key starts with this, so leaked keys are easy to recognise
KEY_PREFIX = "cgw_"
#: a presented key longer than this is rejected without hashing or a lookup
MAX_KEY_LENGTH = 256
#: a revoked key keeps working on a node at most this long (cached positive lookups)
DEFAULT_CACHE_TTL_S = 60.0
DEFAULT_CACHE_SIZE = 1024
#: how long a key lookup may wait for a pooled connection, and run
LOOKUP_TIMEOUT_S = 5.0
LOOPBACK_HOST = "127.0.0.1"
NO_KEYS_WARNING = (
    "no API keys configured: the HTTP API listens on 127.0.0.1 only; "
    "set CHARGEGW_API_KEYS or run `chargegw apikey create`"
)


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


def _matches_configured(configured: Iterable[str], presented: str) -> bool:
    """Constant-time comparison against every configured key (hashes, so lengths agree)."""
    digest = hashlib.sha256(presented.encode()).digest()
    found = False
    for key in configured:
        found |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    return found


# ---------------------------------------------------------------- stored keys


@dataclasses.dataclass(frozen=True)
class ApiKeyInfo:
    """A stored key as listed: never its hash or plaintext."""

    key_id: int
    name: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


async def create_key(conn: Connection, name: str) -> tuple[int, str]:
    """Store a new key named ``name``; return its id and the key (the only time it is seen)."""
    name = name.strip()
    if not name:
        raise ValueError("an API key needs a name")
    key = generate_key()
    key_id = await conn.fetchval(
        "INSERT INTO api_keys (name, key_hash) VALUES ($1, $2) RETURNING key_id",
        name,
        hash_key(key),
    )
    return int(key_id), key


async def revoke_key(conn: Connection, key_id: int) -> bool:
    """Revoke a key; False if there is no such key or it was already revoked."""
    revoked = await conn.fetchval(
        """UPDATE api_keys SET revoked_at = now()
            WHERE key_id = $1 AND revoked_at IS NULL RETURNING key_id""",
        key_id,
    )
    return revoked is not None


async def list_keys(conn: Connection) -> list[ApiKeyInfo]:
    """Every stored key, revoked ones included, by id."""
    rows = await conn.fetch(
        """SELECT key_id, name, created_at, last_used_at, revoked_at
             FROM api_keys ORDER BY key_id"""
    )
    return [ApiKeyInfo(**dict(r)) for r in rows]


# ---------------------------------------------------------------- checking


class KeyCache:
    """Hashes of keys found valid in the database, each for ``ttl_s`` seconds.

    Bounded: beyond ``max_entries`` the oldest entry is dropped. ``clock`` is injectable
    for tests.
    """

    def __init__(
        self,
        ttl_s: float = DEFAULT_CACHE_TTL_S,
        max_entries: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._expires: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._expires)

    def hit(self, key_hash: str) -> bool:
        expires = self._expires.get(key_hash)
        if expires is None:
            return False
        if self.clock() >= expires:
            del self._expires[key_hash]
            return False
        return True

    def add(self, key_hash: str) -> None:
        self._expires.pop(key_hash, None)
        self._expires[key_hash] = self.clock() + self.ttl_s
        while len(self._expires) > self.max_entries:
            self._expires.popitem(last=False)

    def clear(self) -> None:
        self._expires.clear()


_default_cache = KeyCache()


async def verify(
    pool: asyncpg.Pool | None,
    configured_keys: Iterable[str],
    presented: str | None,
    *,
    cache: KeyCache | None = None,
) -> bool:
    """Whether ``presented`` is a configured key or an active stored one.

    Configured keys and cached lookups are checked without the database. Otherwise the key
    is looked up (which also records ``last_used_at``); with ``pool`` None that lookup is
    skipped and the answer is False. Database errors propagate: the caller decides whether
    that is a 503.
    """
    if not presented or len(presented) > MAX_KEY_LENGTH:
        return False
    if _matches_configured(configured_keys, presented):
        return True
    cache = _default_cache if cache is None else cache
    key_hash = hash_key(presented)
    if cache.hit(key_hash):
        return True
    if pool is None:
        return False
    async with pool.acquire(timeout=LOOKUP_TIMEOUT_S) as conn:
        found = await conn.fetchval(
            "SELECT key_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
            key_hash,
            timeout=LOOKUP_TIMEOUT_S,
        )
        if found is None:
            return False
        # best effort: a read-only database (a standby) still checks keys
        with contextlib.suppress(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute(
                "UPDATE api_keys SET last_used_at = now() WHERE key_id = $1",
                found,
                timeout=LOOKUP_TIMEOUT_S,
            )
    cache.add(key_hash)
    return True


async def auth_mode(settings_keys: str | Iterable[str] | None, pool: asyncpg.Pool) -> bool:
    """Whether the API must authenticate: some key is configured, or stored and not revoked.

    Decided once at start: a key created while the gateway runs without any takes effect
    at the next start.
    """
    if parse_keys(settings_keys):
        return True
    stored = await pool.fetchval("SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL)")
    return bool(stored)


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
