"""Process health of one gateway worker, for its metrics: event-loop lag, memory, files, CPU.

:class:`ProcessHealth` runs as a task on the worker's event loop. Every ``tick_s`` it
sleeps and observes how much later than asked the loop woke it up
(``chargegw_event_loop_lag_seconds``): a loop blocked by a slow callback, or starved of
CPU, shows there first. Every ``sample_s`` it reads the resident memory, the open file
descriptors and their limit, and the CPU time used. Every figure carries the worker index
(``worker`` label), so one scrape of a node shows each of its workers.

It also schedules the garbage collector's full passes. A worker holds a few hundred
objects per connected pile that live as long as the connection; CPython's automatic full
collection walks all of them every few seconds under traffic (100 ms and more at 20,000
piles, a pause of every connection's answers) and finds nothing. So every ``gc_full_s``
the probe collects once in full and then freezes what survived (``gc.freeze``): the
automatic passes in between only walk what is newer. Frozen objects that become garbage
are found by the next full pass (it unfreezes first).
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import time
from collections.abc import Callable

import structlog

from chargegw.metrics import Metrics

__all__ = ["ProcessHealth", "open_fds", "resident_bytes"]

log = structlog.get_logger("chargegw.process_health")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """The process's resident memory now (Linux ``/proc``; None where unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def open_fds() -> int | None:
    """The number of file descriptors the process has open (None where unavailable)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


class ProcessHealth:
    """Measures and publishes one worker's health until cancelled."""

    def __init__(
        self,
        metrics: Metrics,
        worker: int,
        workers: int,
        *,
        tick_s: float = 0.5,
        sample_s: float = 5.0,
        on_lag: Callable[[float], None] | None = None,
        gc_full_s: float = 300.0,
    ) -> None:
        self.tick_s = tick_s
        #: a full collection, then a freeze, this often (0: CPython's own schedule only)
        self.gc_full_s = gc_full_s
        #: told every lag measured (the gateway's overload state follows it)
        self.on_lag = on_lag
        self.sample_s = sample_s
        label = str(worker)
        self._metrics = metrics
        self._lag = metrics.event_loop_lag_seconds.labels(label)
        self._rss = metrics.process_resident_memory_bytes.labels(label)
        self._fds = metrics.process_open_fds.labels(label)
        self._max_fds = metrics.process_max_fds.labels(label)
        self._cpu = metrics.process_cpu_seconds_total.labels(label)
        self._up = metrics.worker_up.labels(label)
        self._cpu_seen = 0.0
        metrics.workers_configured.set(workers)
        metrics.worker_starts_total.labels(label).inc()

    def sample(self) -> None:
        """Read memory, files and CPU now."""
        rss = resident_bytes()
        if rss is not None:
            self._rss.set(rss)
        fds = open_fds()
        if fds is not None:
            self._fds.set(fds)
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            self._max_fds.set(soft)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        if cpu > self._cpu_seen:
            self._cpu.inc(cpu - self._cpu_seen)
            self._cpu_seen = cpu

    def collect_and_freeze(self) -> float:
        """A full collection of everything (the frozen objects too), then freeze what
        survived; returns the seconds it took."""
        started = time.monotonic()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        return time.monotonic() - started

    async def run(self) -> None:
        """Measure until cancelled; ``worker_up`` is 1 meanwhile."""
        self._up.set(1)
        next_sample = 0.0
        next_gc = time.monotonic() + min(self.gc_full_s, 60.0)  # the first once piles are in
        try:
            while True:
                now = time.monotonic()
                if self.gc_full_s > 0 and now >= next_gc:
                    took = self.collect_and_freeze()
                    log.debug("full garbage collection", seconds=round(took, 3))
                    next_gc = time.monotonic() + self.gc_full_s
                if now >= next_sample:
                    try:
                        self.sample()
                    except OSError as exc:  # a full fd table must not stop the lag probe
                        log.warning("process health sample failed", error=repr(exc))
                    next_sample = now + self.sample_s
                asked = time.monotonic()
                await asyncio.sleep(self.tick_s)
                lag = max(time.monotonic() - asked - self.tick_s, 0.0)
                self._lag.observe(lag)
                # the frames counted in memory, for the scrapes other workers answer
                self._metrics.flush_frames()
                if self.on_lag is not None:
                    self.on_lag(lag)
        finally:
            self._up.set(0)
