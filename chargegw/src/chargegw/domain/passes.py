"""Periodic passes of background engines (firmware upgrades, parameter jobs)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from chargegw.store.errors import is_unavailable, reason

log = structlog.get_logger("chargegw.domain.passes")


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
        except Exception as exc:
            if is_unavailable(exc):
                log.warning(
                    f"{what} pass failed: database unavailable, retrying", reason=reason(exc)
                )
            else:
                log.exception(f"{what} pass failed, retrying")
        # asyncio.timeout, not wait_for: in Python 3.11 wait_for returns normally when it
        # is cancelled just as the event is set, and the cancellation is lost (the task
        # then never ends: a gateway stopping waited for it forever)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s()):
                await wakeup.wait()
