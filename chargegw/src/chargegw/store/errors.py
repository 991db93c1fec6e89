"""What a database error means: the database is unavailable, or one row is bad.

Two kinds of failure must never be confused, because one of them drops data:

- **Unavailable.** The server cannot take the statement now, whatever the rows are: no
  connection, a restart, a database that does not accept connections, a read-only standby
  after a failover (25006), a full disk (53100), missing permissions (42501), a
  serialization failure or deadlock (40xxx), a cancelled statement. Rows are held and the
  work is retried; readiness reports it; the HTTP API answers 503.
- **A bad row.** The server refuses one row's values: a data exception (class 22: out of
  range, invalid text, untranslatable character) or an integrity violation (class 23), or
  the client could not encode an argument. Only such rows may be set aside (written to the
  dead-letter table), never the rows around them.

Anything else (a syntax error, an undefined column) is a defect of this program; the batch
writer treats it as "unavailable" too, since dropping rows would lose data silently.
"""

from __future__ import annotations

import asyncpg
from asyncpg.exceptions import _base as asyncpg_base

#: the client could not encode a query argument (a value out of the column's range ...);
#: a subclass of InterfaceError, so it must be tested before the transient errors
_CLIENT_DATA_ERROR = asyncpg_base.DataError

#: errors that say "a row's values were refused"
ROW_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,  # SQLSTATE class 22
    asyncpg.exceptions.IntegrityConstraintViolationError,  # class 23
    _CLIENT_DATA_ERROR,
    UnicodeEncodeError,
)

#: every exception a database call can raise that is about the database, not the program
DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    ConnectionError,
    asyncpg.InterfaceError,
    asyncpg.PostgresError,
    asyncpg_base.InternalClientError,
    UnicodeEncodeError,
)

#: SQLSTATE classes (the first two characters) that mean "not now" rather than "not this"
_UNAVAILABLE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "28",  # invalid authorization (a password rotated under us)
        "3D",  # invalid catalog name: the database is gone
        "40",  # transaction rollback: serialization failure, deadlock
        "53",  # insufficient resources: disk full, out of memory, too many connections
        "54",  # program limit exceeded
        "55",  # object not in prerequisite state: "not accepting connections", lock timeouts
        "57",  # operator intervention: shutdown, "cannot connect now", statement cancelled
        "58",  # system error (I/O)
        "F0",  # configuration file error
        "XX",  # internal error
    }
)
#: single SQLSTATEs outside those classes that mean the same
_UNAVAILABLE_STATES = frozenset(
    {
        "25006",  # read-only SQL transaction: a standby after a failover
        "42501",  # insufficient privilege
    }
)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a server error, None for client-side errors."""
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_row_error(exc: BaseException) -> bool:
    """True if the server (or the client encoder) refused one row's values."""
    return isinstance(exc, ROW_ERRORS)


def is_unavailable(exc: BaseException) -> bool:
    """True if the database cannot take any statement now (retry later, answer 503)."""
    if is_row_error(exc):
        return False
    state = sqlstate(exc)
    if state is not None:
        return state in _UNAVAILABLE_STATES or state[:2] in _UNAVAILABLE_CLASSES
    return isinstance(
        exc,
        (
            OSError,
            TimeoutError,
            ConnectionError,
            asyncpg.InterfaceError,
            asyncpg_base.InternalClientError,
        ),
    )


def describe(exc: BaseException) -> str:
    """A short, log-safe description: the error class and SQLSTATE, no row values."""
    state = sqlstate(exc)
    name = type(exc).__name__
    return f"{name} ({state})" if state else name


def reason(exc: BaseException) -> str:
    """Why the database is unavailable, for readiness and logs (no row values)."""
    state = sqlstate(exc)
    if state == "25006":
        return "read-only database (a standby after a failover?)"
    if state == "42501":
        return "permission denied"
    if state is not None and state.startswith("53"):
        return f"insufficient resources ({state}): disk full, memory or connections"
    if state in ("55000", "57P03"):
        return "the database does not accept connections now"
    if state is not None and state.startswith("57"):
        return f"the server is shutting down or cancelled the statement ({state})"
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return "the database did not answer in time"
    if (state is not None and state.startswith("08")) or isinstance(exc, OSError | ConnectionError):
        return "cannot connect to the database"
    if isinstance(exc, asyncpg.InterfaceError) and "pool is closed" in str(exc):
        return "the connection pool is closed"
    if isinstance(exc, asyncpg.InterfaceError | asyncpg_base.InternalClientError):
        return "the connection to the database was lost"
    return describe(exc)
