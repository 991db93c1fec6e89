"""Run many simulated piles against one server address."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Iterable, Iterator
from types import TracebackType

from chargesim._timing import Timing
from chargesim.pile import LedgerEntry, SimulatedPile

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class SimulatorStats:
    """A snapshot of the counters of every pile."""

    piles: int
    connected: int
    connects: int
    connect_failures: int
    frames_sent: int
    frames_received: int
    decode_errors: int
    #: ``(protocol, piles, connected)`` per protocol, in the order first added
    by_protocol: tuple[tuple[str, int, int], ...] = ()

    def line(self) -> str:
        """One status line for people."""
        piles = connected = ""
        if self.by_protocol:
            piles = " (" + ", ".join(f"{p} {n}" for p, n, _ in self.by_protocol) + ")"
            connected = " (" + ", ".join(f"{p} {c}" for p, _, c in self.by_protocol) + ")"
        return (
            f"piles {self.piles}{piles} connected {self.connected}{connected} "
            f"sent {self.frames_sent} received {self.frames_received} "
            f"connects {self.connects} failures {self.connect_failures} "
            f"errors {self.decode_errors}"
        )


class Simulator:
    """A set of simulated piles connected to ``server_host:server_port``.

    Piles of any protocol mix freely (AP3000 piles, BKV gateways).

    ``accel`` divides every protocol interval of every pile; ``jitter`` spreads
    intervals by plus or minus that fraction, and start times over
    ``jitter * heartbeat`` (real seconds) so piles do not all connect at once.
    ``seed`` makes the random choices (jitter, power, garbage) reproducible, and fixes
    each pile's fault decisions and the ids it makes up (``pile.seed``, see
    :meth:`SimulatedPile.roll`).
    Use ``async with Simulator(...) as sim:`` or ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        server_host: str = "127.0.0.1",
        server_port: int = 8900,
        piles: Iterable[SimulatedPile] = (),
        *,
        accel: float = 1.0,
        jitter: float = 0.1,
        seed: int | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> None:
        self.server_host = server_host
        self.server_port = server_port
        self.timing = Timing(accel, jitter)
        self.seed = seed
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self._rng = random.Random(seed)
        self._piles: dict[str, SimulatedPile] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False
        #: exceptions that ended a pile's task (a bug, not a network failure)
        self.errors: list[tuple[str, BaseException]] = []
        for pile in piles:
            self.add(pile)

    # --- piles ---------------------------------------------------------------------------

    def add(self, pile: SimulatedPile) -> None:
        """Add a pile; it starts at once if the simulator is running."""
        if pile.pile_id in self._piles:
            raise ValueError(f"duplicate pile id {pile.pile_id}")
        self._piles[pile.pile_id] = pile
        if self._running:
            self._launch(pile)

    def __getitem__(self, pile_id: str) -> SimulatedPile:
        return self._piles[pile_id.upper()]

    def __contains__(self, pile_id: object) -> bool:
        return isinstance(pile_id, str) and pile_id.upper() in self._piles

    def __iter__(self) -> Iterator[SimulatedPile]:
        return iter(list(self._piles.values()))

    def __len__(self) -> int:
        return len(self._piles)

    @property
    def piles(self) -> list[SimulatedPile]:
        """Every pile, in the order added."""
        return list(self._piles.values())

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    async def start(self) -> None:
        """Start every pile (each after a jittered delay)."""
        if self._running:
            return
        self._running = True
        for pile in self._piles.values():
            self._launch(pile)

    def _launch(self, pile: SimulatedPile) -> None:
        pile.reconnect_min_s = self.reconnect_min_s
        pile.reconnect_max_s = self.reconnect_max_s
        seed = f"{self.seed}:{pile.pile_id}" if self.seed is not None else None
        rng = random.Random(seed) if seed is not None else random.Random()
        if seed is None:  # fault decisions as random as the rest
            seed = f"{rng.getrandbits(64)}:{pile.pile_id}"
        spread = self.timing.jitter * self.timing.real(pile.heartbeat_s)
        delay = self._rng.uniform(0.0, spread)
        task = asyncio.create_task(
            pile.run(
                self.server_host,
                self.server_port,
                timing=self.timing,
                rng=rng,
                start_delay_s=delay,
                seed=seed,
            ),
            name=f"sim-pile-{pile.pile_id}",
        )
        self._tasks[pile.pile_id] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        pile_id = task.get_name().removeprefix("sim-pile-")
        if self._tasks.get(pile_id) is task:
            del self._tasks[pile_id]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("simulated pile %s stopped: %r", pile_id, exc, exc_info=exc)
            self.errors.append((pile_id, exc))

    async def stop(self) -> None:
        """Stop every pile and close their connections."""
        self._running = False
        for pile in self._piles.values():
            pile.stopping()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- observation ---------------------------------------------------------------------

    def stats(self) -> SimulatorStats:
        """Counters summed over every pile."""
        piles = list(self._piles.values())
        counts: dict[str, list[int]] = {}
        for pile in piles:
            count = counts.setdefault(pile.protocol, [0, 0])
            count[0] += 1
            count[1] += pile.connected
        return SimulatorStats(
            piles=len(piles),
            connected=sum(p.connected for p in piles),
            connects=sum(p.stats.connects for p in piles),
            connect_failures=sum(p.stats.connect_failures for p in piles),
            frames_sent=sum(p.stats.frames_sent for p in piles),
            frames_received=sum(p.stats.frames_received for p in piles),
            decode_errors=sum(p.stats.decode_errors for p in piles),
            by_protocol=tuple((p, n, c) for p, (n, c) in counts.items()),
        )

    def ledger(self) -> list[LedgerEntry]:
        """Every session every pile ended (:attr:`SimulatedPile.ledger`), pile by pile."""
        return [entry for pile in self._piles.values() for entry in pile.ledger]

    def unacknowledged(self) -> list[LedgerEntry]:
        """Ended sessions whose report a pile still holds unacknowledged."""
        return [entry for pile in self._piles.values() for entry in pile.unacknowledged()]

    def charging(self) -> set[tuple[str, int]]:
        """``(device_id, port)`` (1-based) of every port charging now, on every pile."""
        return {key for pile in self._piles.values() for key in pile.charging()}

    async def wait_connected(self, count: int | None = None, *, timeout: float = 10.0) -> None:
        """Wait until ``count`` piles (default: all) are connected."""
        want = len(self._piles) if count is None else count
        async with asyncio.timeout(timeout):
            while sum(p.connected for p in self._piles.values()) < want:
                await asyncio.sleep(0.02)
