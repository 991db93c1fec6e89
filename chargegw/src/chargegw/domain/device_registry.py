"""The device registry: the devices a gateway serves when ``device_registry_mode`` is
``enforce`` (with ``log`` every device is served, and those not registered are logged and
counted; with ``off`` the registry is not consulted).

The registry holds what a connection states in every frame it sends:

- AP3000: the physical id (8 hex digits, ``04CEAA40``) of the pile, or of the host (main
  unit) that speaks for piles; behind a host, the host and each of its piles are
  registered;
- BKV: the gateway id (14 hex digits, ``82231214002700``); its sockets
  (``<gateway_id>-<n>``) are served with it and are not registered one by one.

Ids are stored in upper case; which protocol an id belongs to follows from its length.

Every change moves ``device_registry_revision`` (a trigger, in the changing transaction,
whoever changes the table). Each process keeps a copy of the ids (:class:`RegistryCache`),
polls the revision every ``device_registry_refresh_s`` and reloads the copy when it
moved, so a change applies on every worker within about that long; ids removed while
their device is connected are reported (``on_removed``) so that the gateway closes those
connections. While the database cannot be reached the last copy stays in force.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import re
from collections.abc import Callable, Iterable
from typing import Final

import asyncpg
import structlog
from pydantic import BaseModel, Field

from chargegw.domain.pages import Page, Where, page_of
from chargegw.domain.refusals import InvalidError
from chargegw.metrics import Metrics
from chargegw.net.transport import DeviceLink
from chargegw.store.database import Connection
from chargegw.store.errors import DB_ERRORS, reason

__all__ = [
    "ID_FIELDS",
    "MAX_IDS_PER_REQUEST",
    "RegisteredDevice",
    "RegistryCache",
    "RegistryMode",
    "add",
    "get",
    "normalise",
    "page",
    "registry_id",
    "remove",
]

log = structlog.get_logger("chargegw.domain.device_registry")


class RegistryMode(str, enum.Enum):
    """What the gateway does with a device that is not registered."""

    #: the registry is not consulted
    OFF = "off"
    #: served, logged and counted (to find the devices to register before enforcing)
    LOG = "log"
    #: refused: its connection is closed before anything is answered or stored
    ENFORCE = "enforce"


#: the frame field that carries the registered id, by protocol
ID_FIELDS: Final = {"ap3000": "phy_id", "bkv": "gateway_id"}
#: the form of a registered id, by protocol (upper case, as the codecs give them)
_ID_FORMATS: Final = {
    "ap3000": re.compile(r"[0-9A-F]{8}"),
    "bkv": re.compile(r"[0-9A-F]{14}"),
}
_BKV_SOCKET: Final = re.compile(r"[0-9A-F]{14}-\d+")
#: ids one request may add or remove
MAX_IDS_PER_REQUEST: Final = 1000
#: a note is for people: short
MAX_NOTE_LENGTH: Final = 200
#: a registry query of the refresh loop gives up after this long (a hung database must
#: not hang the loop; the last copy stays in force meanwhile)
_QUERY_TIMEOUT_S: Final = 10.0
#: unregistered ids counted per connection at most (a host speaks for a few dozen piles)
_MAX_NOTES: Final = 64


class RegisteredDevice(BaseModel):
    """A device id in the registry."""

    device_id: str = Field(
        description="AP3000 physical id (pile or host) or BKV gateway id", examples=["04CEAA40"]
    )
    protocol: str = Field(examples=["ap3000"])
    note: str | None = Field(description="free text, e.g. where the device is installed")
    created_at: dt.datetime
    created_by: str | None = Field(description="the API key that registered it")


def normalise(
    device_id: str, protocol: str | None = None, *, field: str = "device_id"
) -> tuple[str, str]:
    """The registered form of ``device_id`` and its protocol; ``InvalidError`` (naming
    ``field``) if it is neither an AP3000 physical id nor a BKV gateway id, or not one of
    ``protocol``."""
    text = device_id.strip().upper()
    found = next((p for p, form in _ID_FORMATS.items() if form.fullmatch(text)), None)
    if found is None:
        why = "8 hex digits (AP3000 physical id) or 14 (BKV gateway id)"
        if _BKV_SOCKET.fullmatch(text):
            why = f"a BKV gateway id: register the gateway {text.partition('-')[0]}, not a socket"
        raise InvalidError({"error": f"{device_id!r} is not {why}", "field": field})
    if protocol is not None and protocol != found:
        raise InvalidError(
            {"error": f"{device_id!r} is a {found} id, not {protocol}", "field": field}
        )
    return text, found


def registry_id(protocol: str, message: object) -> str | None:
    """The id a frame of ``protocol`` states, as the registry holds it (None: none)."""
    name = ID_FIELDS.get(protocol)
    value = getattr(message, name, None) if name is not None else None
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------- the repository


async def add(
    conn: Connection,
    devices: Iterable[tuple[str, str]],
    *,
    note: str | None,
    created_by: str | None,
) -> list[str]:
    """Register (device id, protocol) pairs in normalised form; the ids that were not
    registered before (those already registered keep their note)."""
    # in id order: two requests with the same ids in another order lock them in one order
    # (no deadlock between them)
    pairs = dict(sorted(devices))
    rows = await conn.fetch(
        """INSERT INTO device_registry (device_id, protocol, note, created_by)
           SELECT d, p, $3, $4 FROM unnest($1::text[], $2::text[]) AS t(d, p)
           ON CONFLICT (device_id) DO NOTHING
           RETURNING device_id""",
        list(pairs),
        list(pairs.values()),
        note,
        created_by,
    )
    return sorted(r["device_id"] for r in rows)


async def remove(conn: Connection, device_ids: Iterable[str]) -> list[str]:
    """Unregister ids in normalised form; those that were registered."""
    rows = await conn.fetch(
        "DELETE FROM device_registry WHERE device_id = ANY($1::text[]) RETURNING device_id",
        sorted(device_ids),
    )
    return sorted(r["device_id"] for r in rows)


async def get(conn: Connection, device_id: str) -> RegisteredDevice | None:
    """One registered id (normalised form), or None."""
    row = await conn.fetchrow(
        """SELECT device_id, protocol, note, created_at, created_by
           FROM device_registry WHERE device_id = $1""",
        device_id,
    )
    return None if row is None else RegisteredDevice(**dict(row))


async def page(
    conn: Connection, *, protocol: str | None, after: str | None, limit: int
) -> Page[RegisteredDevice]:
    """Registered ids in id order, after ``after``."""
    where = Where()
    if protocol is not None:
        where.add("protocol = {}", protocol)
    if after is not None:
        where.add("device_id > {}", after)
    rows = await conn.fetch(
        f"""SELECT device_id, protocol, note, created_at, created_by FROM device_registry
            {where.sql()} ORDER BY device_id {where.limit(limit)}""",
        *where.args,
    )
    return page_of([RegisteredDevice(**dict(r)) for r in rows], limit)


async def _revision(conn: Connection | asyncpg.Pool) -> int:
    revision = await conn.fetchval(
        "SELECT revision FROM device_registry_revision", timeout=_QUERY_TIMEOUT_S
    )
    return int(revision)


async def _snapshot(conn: Connection | asyncpg.Pool) -> tuple[int, frozenset[str]]:
    """The revision and the ids it stands for (one statement: one snapshot)."""
    row = await conn.fetchrow(
        """SELECT r.revision, ARRAY(SELECT device_id FROM device_registry) AS ids
           FROM device_registry_revision r""",
        timeout=_QUERY_TIMEOUT_S,
    )
    assert row is not None
    return int(row["revision"]), frozenset(row["ids"])


# ---------------------------------------------------------------- each process's copy


class RegistryCache:
    """This process's copy of the registry (:meth:`load` at start, then :meth:`run`)."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool | None],
        metrics: Metrics,
        *,
        mode: RegistryMode,
        refresh_s: float,
        on_removed: Callable[[frozenset[str]], None] = lambda removed: None,
    ) -> None:
        self._pool = pool
        self.metrics = metrics
        self.mode = mode
        self.refresh_s = refresh_s
        self.on_removed = on_removed
        self.ids: frozenset[str] = frozenset()
        #: the revision :attr:`ids` stand for; None before the first load
        self.revision: int | None = None
        self._failing: str | None = None

    async def load(self) -> None:
        """Read the whole registry (the database must be reachable)."""
        pool = self._pool()
        assert pool is not None
        self._take(*await _snapshot(pool))

    async def refresh(self) -> bool:
        """Reload the copy if the revision moved; whether it did. Database errors
        propagate (the last copy stays)."""
        pool = self._pool()
        if pool is None:
            return False
        if self.revision is not None and await _revision(pool) == self.revision:
            return False
        self._take(*await _snapshot(pool))
        return True

    async def run(self) -> None:
        """Poll the revision every ``refresh_s``; a database outage is logged once and
        leaves the last copy in force."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except DB_ERRORS as exc:
                if self._failing is None:
                    log.warning(
                        "cannot read the device registry; the last copy stays in force",
                        reason=reason(exc),
                        ids=len(self.ids),
                    )
                self._failing = reason(exc)
                continue
            except Exception:
                # a defect (in ``on_removed``, say) must not stop the refreshes: the copy
                # was taken before the callback ran
                log.exception("device registry refresh failed")
                continue
            if self._failing is not None:
                log.info("device registry readable again", ids=len(self.ids))
                self._failing = None

    def _take(self, revision: int, ids: frozenset[str]) -> None:
        removed = self.ids - ids if self.revision is not None else frozenset()
        if self.revision is not None and ids != self.ids:
            log.info(
                "device registry changed",
                revision=revision,
                ids=len(ids),
                added=len(ids - self.ids),
                removed=len(removed),
            )
        self.ids, self.revision = ids, revision
        self.metrics.device_registry_ids.set(len(ids))
        if removed:
            self.on_removed(removed)

    def admits(self, link: DeviceLink, device_id: str) -> bool:
        """Whether a frame stating ``device_id`` on ``link`` may be served: always in
        ``log`` mode, only if registered in ``enforce``. An id not registered is counted
        once per connection (in ``log`` mode also logged once per connection)."""
        if device_id in self.ids:
            return True
        notes = link.notes
        if notes is None:
            notes = link.notes = set()
        if device_id not in notes and len(notes) < _MAX_NOTES:
            notes.add(device_id)
            self.metrics.device_unregistered_total.inc()
            if self.mode is RegistryMode.LOG:
                log.info(
                    "device not in the registry (served: device_registry_mode is log)",
                    device_id=device_id,
                    connection=link.id,
                    remote=link.remote,
                )
        return self.mode is not RegistryMode.ENFORCE
