"""Causes in the database: a transaction's cause, and audit-frame ids given in-process.

A transaction that changes an order's or a command's status names its cause with
:func:`apply` (a transaction-local setting); the tables' triggers copy it into the row
(``cause_kind``, ``cause_ref``, ``cause_frame_id``) and into the events the change emits
(migration 0019). The batch writer's rows carry their causes per row instead (one batch
holds the changes of many frames).

Frame ids (:class:`FrameIds`) are given by the gateway process, so the code that handles
a frame knows its id before the frame is written: ``epoch << 32 | counter``, where the
epoch comes from the ``frame_id_epochs`` sequence (one per writer start, the next fetched
in the background once half of the current one is used). No round trip per frame, no id
given twice, across processes and restarts; ids grow within a process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import structlog

from chargegw.causes import Cause, current
from chargegw.store.database import Connection
from chargegw.store.errors import reason

log = structlog.get_logger("chargegw.store.causes")

_APPLY = """SELECT set_config('chargegw.cause_kind', $1, true),
                   set_config('chargegw.cause_ref', coalesce($2, ''), true),
                   set_config('chargegw.cause_frame_id', coalesce($3::bigint::text, ''), true)"""


async def apply(conn: Connection, cause: Cause | None = None) -> None:
    """Make ``cause`` (default: the ambient one, see ``chargegw.causes``) the cause of
    what the rest of ``conn``'s transaction changes. Nothing known: nothing is set (a
    cause applied earlier in the transaction stays)."""
    if cause is None:
        cause = current()
        if cause is None:
            return
    await conn.execute(_APPLY, cause.kind, cause.ref, cause.frame_id)


#: bits of the counter within an epoch
EPOCH_BITS = 32


class FrameIds:
    """Audit-frame ids for one process (see the module doc). Call the object for the
    next id: None until :meth:`start` took an epoch, and if an epoch ran out while the
    database was away (the frame then gets its id from the database when written, and
    no cause can point at it). ``bits``: the counter's bits (smaller only in tests)."""

    def __init__(
        self, pool_factory: Callable[[], asyncpg.Pool | None], *, bits: int = EPOCH_BITS
    ) -> None:
        self._pool_factory = pool_factory
        self._bits = bits
        #: the next id and the first id that takes the slow path (prefetch, next epoch)
        self._next = 0
        self._limit = 0
        self._end = 0
        self._next_epoch: int | None = None
        self._prefetch: asyncio.Task[None] | None = None
        self._exhausted_logged = False

    def __call__(self) -> int | None:
        n = self._next
        if n < self._limit:
            self._next = n + 1
            return n
        return self._slow()

    def _slow(self) -> int | None:
        n = self._next
        if n < self._end:  # half of the epoch used: the next one is fetched meanwhile
            self._limit = self._end
            self._start_prefetch()
            self._next = n + 1
            return n
        if self._next_epoch is not None:
            self._use(self._next_epoch)
            self._next_epoch = None
            return self()
        if self._end and not self._exhausted_logged:
            self._exhausted_logged = True
            log.error("frame id epoch used up and no next epoch yet: frames get database ids")
        if self._end:
            self._start_prefetch()
        return None

    def _use(self, epoch: int) -> None:
        base = epoch << self._bits
        size = 1 << self._bits
        self._next = base
        self._limit = base + size // 2
        self._end = base + size
        self._exhausted_logged = False

    async def start(self) -> None:
        """Take the first epoch (the database must answer: the gateway starts with it)."""
        self._use(await self._fetch())

    async def _fetch(self) -> int:
        pool = self._pool_factory()
        if pool is None:
            raise ConnectionError("no database pool")
        epoch: int = await pool.fetchval("SELECT nextval('frame_id_epochs')", timeout=5)
        return epoch

    def _start_prefetch(self) -> None:
        if self._prefetch is None or self._prefetch.done():
            self._prefetch = asyncio.get_running_loop().create_task(
                self._prefetch_epoch(), name="frame-id-epoch"
            )

    async def _prefetch_epoch(self) -> None:
        delay = 0.5
        while self._next_epoch is None:
            try:
                self._next_epoch = await self._fetch()
            except Exception as exc:
                log.warning("next frame id epoch not fetched yet, retrying", reason=reason(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if self._next >= self._end:  # ran out meanwhile: from now on, ids again
            self._use(self._next_epoch)
            self._next_epoch = None

    async def close(self) -> None:
        if self._prefetch is not None and not self._prefetch.done():
            self._prefetch.cancel()
            await asyncio.gather(self._prefetch, return_exceptions=True)
