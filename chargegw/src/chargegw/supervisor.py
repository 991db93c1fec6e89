"""``chargegw serve --workers N``: one supervisor process and N gateway workers.

The supervisor prepares what the workers share (the embedded PostgreSQL when no DSN is
configured, the migrations, the port numbers when 0 asks for free ones), then starts
the workers. Each worker is a full gateway: it binds the device port and the HTTP port
with SO_REUSEPORT, so the kernel spreads new connections over the workers, and any
worker answers any API call (commands reach the worker holding the device through the
database, see outbox.py and cluster.py).

A worker that dies is started again (with a growing pause if it keeps dying); its
devices reconnect to the other workers meanwhile. SIGTERM or SIGINT to the supervisor
drains every worker (service.Gateway.drain); a second signal stops them at once.

Metrics: the supervisor makes a fresh directory for prometheus-client's multiprocess
mode and names it to the workers (``PROMETHEUS_MULTIPROC_DIR``, in their environment
only), so whichever worker answers ``GET /metrics`` reports all of them. When a worker
dies its live gauges are removed (``mark_process_dead``); its counters stay, so sums over
the node never go backwards. The directory is deleted when the supervisor exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

import structlog
from prometheus_client import multiprocess

from chargegw.config import Settings
from chargegw.logs import configure_logging
from chargegw.metrics import MULTIPROC_ENV
from chargegw.net.transport import bound_socket

log = structlog.get_logger("chargegw.supervisor")

#: a worker that ran at least this long before dying is restarted without delay
_STABLE_S = 30.0


def worker_main(values: dict[str, Any], index: int) -> None:
    """Entry point of one worker process (spawned, so it imports afresh)."""
    settings = Settings(**values)
    configure_logging(settings.log_format, settings.log_level)
    structlog.contextvars.bind_contextvars(worker=index)
    # the supervisor forwards SIGTERM; a terminal's Ctrl-C reaches the whole process
    # group, and must not count as a second signal here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from chargegw.app import run

    async def main() -> None:
        stop = asyncio.Event()
        force = asyncio.Event()

        def signalled() -> None:
            (force if stop.is_set() else stop).set()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, signalled)
        await run(settings, stop, worker=index, force=force)

    asyncio.run(main())


def _metrics_dir() -> str:
    """A fresh directory for the workers' metric files (under ``$TMPDIR``)."""
    try:
        return tempfile.mkdtemp(prefix="chargegw-metrics-")
    except OSError as exc:
        from chargegw.app import StartupError

        raise StartupError(
            f"cannot create the workers' metrics directory ({exc.strerror or exc}); "
            "point TMPDIR at a writable directory"
        ) from None


class Supervisor:
    """Starts, watches and stops the worker processes of one node."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, BaseProcess] = {}
        self._started: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._stopping = False
        self._reserved: list[socket.socket] = []
        #: the workers' metric files (multiprocess mode), made fresh by :meth:`run`
        self.metrics_dir: str | None = None

    def prepare(self) -> Settings:
        """Database and ports for the workers; returns the settings they run with."""
        settings = self.settings.model_copy()
        from chargegw.app import check_listen_addresses
        from chargegw.store.database import connect_pool, migrate, start_embedded

        # before anything starts: a port held by another program (no worker holds it yet)
        check_listen_addresses(settings)
        if not settings.dsn:
            log.info(
                "no DSN configured, starting the embedded PostgreSQL",
                data_dir=settings.data_dir,
            )
            settings.dsn = start_embedded(settings.data_dir)

        async def migrated() -> None:
            pool = await connect_pool(settings.dsn, min_size=1, max_size=1)
            try:
                async with pool.acquire() as conn:
                    await migrate(conn)
            finally:
                await pool.close()

        asyncio.run(migrated())
        if settings.device_port == 0:
            settings.device_port = self._reserve(settings.device_host)
        if settings.http_port == 0:
            settings.http_port = self._reserve(settings.http_host)
        return settings

    def _reserve(self, host: str) -> int:
        """A free port the workers then share: held (bound, not listening) until they stop."""
        sock = bound_socket(host, 0, reuse_port=True)
        self._reserved.append(sock)
        return int(sock.getsockname()[1])

    def run(self) -> int:
        """Run the workers until a signal; returns the exit status."""
        # never a previous run's files: their counters would be added to this run's
        self.metrics_dir = _metrics_dir()
        try:
            settings = self.prepare()
            values = settings.model_dump()
            return self._supervise(settings, values)
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _supervise(self, settings: Settings, values: dict[str, Any]) -> int:
        signal.signal(signal.SIGTERM, self._signalled)
        signal.signal(signal.SIGINT, self._signalled)
        for index in range(settings.workers):
            self._start(index, values)
        log.info(
            "serving",
            workers=settings.workers,
            node=settings.node,
            device_port=settings.device_port,
            http_port=settings.http_port,
        )
        while not self._stopping:
            time.sleep(0.2)
            for index, process in list(self._workers.items()):
                if process.is_alive() or self._stopping:
                    continue
                ran = time.monotonic() - self._started[index]
                failures = 0 if ran >= _STABLE_S else self._failures.get(index, 0) + 1
                self._failures[index] = failures
                pause = min(2.0 ** (failures - 1), 30.0) if failures else 0.0
                log.warning(
                    "worker died, starting it again",
                    worker=index,
                    pid=process.pid,
                    exit_code=process.exitcode,
                    pause_s=pause,
                )
                del self._workers[index]
                self._forget_metrics(process)
                time.sleep(pause)
                if not self._stopping:
                    self._start(index, values)
        return self._wait_for_workers(settings)

    def _forget_metrics(self, process: BaseProcess) -> None:
        """A dead worker's live gauges leave the node's scrape; its counters stay."""
        if self.metrics_dir is not None and process.pid is not None:
            multiprocess.mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    def _start(self, index: int, values: dict[str, Any]) -> None:
        process = self._context.Process(
            target=worker_main, args=(values, index), name=f"chargegw-worker-{index}"
        )
        # the spawned worker inherits the environment as it is now; the supervisor's own
        # (and that of a test running it in-process) stays as it was
        previous = os.environ.get(MULTIPROC_ENV)
        if self.metrics_dir is not None:
            os.environ[MULTIPROC_ENV] = self.metrics_dir
        try:
            process.start()
        finally:
            if previous is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous
        self._workers[index] = process
        self._started[index] = time.monotonic()
        log.info("worker started", worker=index, pid=process.pid)

    def _signalled(self, signum: int, _frame: Any) -> None:
        self._stopping = True
        for process in self._workers.values():
            if process.is_alive() and process.pid is not None:
                # the first signal drains, a second one stops at once (worker_main)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def _wait_for_workers(self, settings: Settings) -> int:
        deadline = time.monotonic() + settings.drain_timeout_s + 30.0
        for process in self._workers.values():
            process.join(max(deadline - time.monotonic(), 0.1))
        status = 0
        for index, process in self._workers.items():
            if process.is_alive():
                log.error("worker did not stop, killing it", worker=index, pid=process.pid)
                process.kill()
                process.join(5)
                status = 1
        for sock in self._reserved:
            sock.close()
        log.info("all workers stopped")
        return status
