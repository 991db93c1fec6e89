"""Sessions of the operator console: a signed-in browser's cookie, by its token's hash.

A session names the API key it was opened with by the key's hash
(:func:`chargegw.domain.auth.hash_key`); each request authenticates that hash again
(:func:`chargegw.domain.auth.authenticate_hash`), so the key's scopes, limits, expiry and
revocation apply to the console exactly as to the API. The token and the CSRF token are
random (256 bits); only the token's SHA-256 is stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import secrets

import asyncpg

from chargegw.store.database import Connection

__all__ = ["Session", "close", "open_session", "purge_expired", "session_for"]

#: ``last_used_at`` is written at most this often per session
TOUCH_INTERVAL_S = 60.0


@dataclasses.dataclass(frozen=True)
class Session:
    """A live console session (never its token)."""

    key_hash: str
    csrf_token: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def open_session(
    conn: Connection, key_hash: str, *, lifetime_s: float
) -> tuple[str, Session]:
    """A new session for the key with ``key_hash``: its token (for the cookie) and what it
    holds. Expired sessions are removed on the way."""
    token = secrets.token_urlsafe(32)
    session = Session(key_hash=key_hash, csrf_token=secrets.token_urlsafe(32))
    await conn.execute("DELETE FROM console_sessions WHERE expires_at < now()")
    await conn.execute(
        """INSERT INTO console_sessions (token_hash, key_hash, csrf_token, expires_at)
           VALUES ($1, $2, $3, now() + make_interval(secs => $4))""",
        _digest(token),
        key_hash,
        session.csrf_token,
        float(lifetime_s),
    )
    return token, session


async def session_for(conn: Connection, token: str, *, idle_timeout_s: float) -> Session | None:
    """The live session of ``token``; None for an unknown, expired or idle one."""
    if not token or len(token) > 128:
        return None
    row = await conn.fetchrow(
        """SELECT key_hash, csrf_token,
                  extract(epoch FROM now() - last_used_at)::float8 AS idle_s
             FROM console_sessions
            WHERE token_hash = $1 AND expires_at > now()
              AND last_used_at > now() - make_interval(secs => $2)""",
        _digest(token),
        float(idle_timeout_s),
    )
    if row is None:
        return None
    if row["idle_s"] >= TOUCH_INTERVAL_S:
        # a read-only database (a standby, an outage) keeps sessions working for reads
        with contextlib.suppress(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute(
                "UPDATE console_sessions SET last_used_at = now() WHERE token_hash = $1",
                _digest(token),
            )
    return Session(key_hash=row["key_hash"], csrf_token=row["csrf_token"])


async def close(conn: Connection, token: str) -> None:
    """End the session of ``token`` (signing out)."""
    await conn.execute("DELETE FROM console_sessions WHERE token_hash = $1", _digest(token))


async def purge_expired(conn: Connection) -> int:
    """Remove ended sessions; the number removed."""
    status = await conn.execute("DELETE FROM console_sessions WHERE expires_at < now()")
    return int(status.split()[-1])
