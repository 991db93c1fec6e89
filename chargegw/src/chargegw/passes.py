"""Periodic passes of background engines (firmware upgrades, parameter jobs)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from .store.writer import TRANSIENT_DB_ERRORS

log = structlog.get_logger("chargegw.passes")


async def run_passes(
    tick: Callable[[], Awaitable[None]],
    wakeup: asyncio.Event,
    interval_s: Callable[[], float],
    what: str,
) -> None:
    """Run ``tick`` every ``interval_s()`` seconds, sooner when ``wakeup`` is set, until
    cancelled. A pass that fails is logged (a warning while the database is away) and the
    next one runs as usual: the state is in the database, so nothing is lost."""
    while True:
        wakeup.clear()
        try:
            await tick()
        except asyncio.CancelledError:
            raise
        except TRANSIENT_DB_ERRORS as exc:
            log.warning(f"{what} pass failed: database away, retrying", error=str(exc))
        except Exception:
            log.exception(f"{what} pass failed, retrying")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), interval_s())
