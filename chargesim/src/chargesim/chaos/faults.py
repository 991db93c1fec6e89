"""The fault driver: what goes wrong during a chaos run, and when.

Database faults (outages, read-only periods) and worker kills follow a schedule drawn
from the seed at the start; connection drops come every few seconds; the pile-level
switches (lost ACKs, changed readings on resends, omitted tags) are re-drawn for every
pile in epochs. Everything done is logged in :attr:`FaultDriver.events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

from chargesim import SimulatedBkvGateway, Simulator
from chargesim.chaos.platform import Database, GatewayProcess

#: seconds between two pile-switch epochs and between two rounds of dropped connections
_EPOCH_S = 15.0
_DROP_EVERY_S = 10.0


@dataclasses.dataclass(slots=True)
class FaultEvent:
    """One fault injected: when (seconds from the start of the chaos phase), what, and
    until when for faults with a length."""

    kind: str
    at: float
    until: float | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    wall: float = dataclasses.field(default_factory=time.time)
    until_wall: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class Planned:
    """A scheduled fault: ``kind`` at ``at`` seconds, lasting ``length`` (0: instant)."""

    kind: str
    at: float
    length: float = 0.0


def plan(kinds: tuple[str, ...], duration_s: float, rng: random.Random) -> list[Planned]:
    """The schedule of kills and database faults for a chaos phase of ``duration_s``.

    Database faults never overlap; they fall between 10 % of the phase and 8 s before
    its end, so the platform has them all behind it before the quiet period. Outages
    last 5-40 s, read-only periods 5-30 s (shorter in short runs)."""
    start, end = 0.1 * duration_s, duration_s - 8.0
    out: list[Planned] = []
    db: list[tuple[str, float]] = []
    if "outage" in kinds:
        longest = min(40.0, max(6.0, duration_s / 5))
        db += [
            ("outage", rng.uniform(5.0, longest)) for _ in range(max(1, round(duration_s / 150)))
        ]
    if "readonly" in kinds:
        longest = min(30.0, max(6.0, duration_s / 7))
        db += [
            ("readonly", rng.uniform(5.0, longest)) for _ in range(max(1, round(duration_s / 200)))
        ]
    rng.shuffle(db)
    if db:
        slot = (end - start) / len(db)
        for index, (kind, wanted) in enumerate(db):
            length = min(wanted, slot * 0.8)
            at = start + index * slot + rng.uniform(0.0, slot - length)
            out.append(Planned(kind, at, length))
    if "kill" in kinds:
        for _ in range(max(1, round(duration_s / 90))):
            out.append(Planned("kill", rng.uniform(start, end)))
    return sorted(out, key=lambda p: p.at)


class FaultDriver:
    """Injects the faults of ``opts.faults`` into the platform and the piles."""

    def __init__(
        self,
        kinds: tuple[str, ...],
        database: Database,
        gateway: GatewayProcess,
        sim: Simulator,
        rng: random.Random,
        say: Callable[[str], None],
    ) -> None:
        self.kinds = kinds
        self.database = database
        self.gateway = gateway
        self.sim = sim
        self.rng = rng
        self.say = say
        self.events: list[FaultEvent] = []
        self.last_kill_wall: float | None = None
        self._t0 = 0.0

    def _now(self) -> float:
        return asyncio.get_running_loop().time() - self._t0

    async def run(self, duration_s: float) -> None:
        """Inject faults for ``duration_s`` seconds; every fault is over when it returns."""
        self._t0 = asyncio.get_running_loop().time()
        schedule = plan(self.kinds, duration_s, self.rng)
        self.say(
            "fault schedule: "
            + ", ".join(f"{p.kind}@{p.at:.0f}s/{p.length:.0f}s" for p in schedule)
            if schedule
            else "fault schedule: no kills or database faults"
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._scheduled(schedule))
                if "drop" in self.kinds:
                    tg.create_task(self._drops(duration_s))
                if {"lose_acks", "changed_readings", "omit_tags"} & set(self.kinds):
                    tg.create_task(self._epochs(duration_s))
        finally:
            await self.heal()

    async def _scheduled(self, schedule: list[Planned]) -> None:
        async with asyncio.TaskGroup() as tg:  # a kill may fall inside a database fault
            for planned in schedule:
                wait = planned.at - self._now()
                if wait > 0:
                    await asyncio.sleep(wait)
                if planned.kind == "kill":
                    self._kill()
                else:
                    tg.create_task(self._database_fault(planned.kind, planned.length))

    def _kill(self) -> None:
        pids = self.gateway.worker_pids()
        event = FaultEvent("kill", self._now())
        if not pids:
            event.error = "no worker running"
        else:
            pid = self.rng.choice(sorted(pids))
            self.gateway.kill_worker(pid)
            event.detail = {"pid": pid}
            self.last_kill_wall = time.time()
        self.events.append(event)
        self.say(f"[{event.at:.0f}s] SIGKILL worker {event.detail.get('pid', '-')}")

    async def _database_fault(self, kind: str, length: float) -> None:
        event = FaultEvent(kind, self._now())
        self.events.append(event)
        begin, end = (
            (self.database.outage_begin, self.database.outage_end)
            if kind == "outage"
            else (self.database.readonly_begin, self.database.readonly_end)
        )
        self.say(f"[{event.at:.0f}s] database {kind} for {length:.0f}s")
        try:
            await begin()
            await asyncio.sleep(length)
        except Exception as exc:  # an admin connection that failed: say so, go on
            event.error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                await end()
            except Exception as exc:
                event.error = f"{type(exc).__name__}: {exc}"
            event.until = self._now()
            event.until_wall = time.time()
            self.say(f"[{event.until:.0f}s] database {kind} over")

    async def _drops(self, duration_s: float) -> None:
        piles = self.sim.piles
        while self._now() < duration_s - 5.0:
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * _DROP_EVERY_S)
            count = max(1, round(len(piles) * self.rng.uniform(0.02, 0.05)))
            victims = self.rng.sample(piles, min(count, len(piles)))
            for pile in victims:
                pile.drop_connection("chaos: connection dropped")
            self.events.append(
                FaultEvent("drop", self._now(), detail={"piles": [p.pile_id for p in victims]})
            )

    async def _epochs(self, duration_s: float) -> None:
        while self._now() < duration_s - 5.0:
            counts = {"lose_acks": 0, "changed_readings": 0, "omit_tags": 0}
            for pile in self.sim.piles:
                faults = pile.faults
                lose = "lose_acks" in self.kinds and self.rng.random() < 0.3
                faults.lose_acks = 0.5 if lose else 0.0
                counts["lose_acks"] += lose
                if isinstance(pile, SimulatedBkvGateway):
                    changed = "changed_readings" in self.kinds and self.rng.random() < 0.5
                    omit = "omit_tags" in self.kinds and self.rng.random() < 0.5
                    faults.resend_changed_readings = 1.0 if changed else 0.0
                    faults.omit_optional_tags = 0.5 if omit else 0.0
                    counts["changed_readings"] += changed
                    counts["omit_tags"] += omit
            self.events.append(FaultEvent("pile_switches", self._now(), detail=counts))
            await asyncio.sleep(_EPOCH_S)

    def database_windows(self) -> list[tuple[float, float]]:
        """(begin, end) wall-clock times of the database faults so far (an unfinished one
        ends now)."""
        return [
            (e.wall, e.until_wall if e.until_wall is not None else time.time())
            for e in self.events
            if e.kind in ("outage", "readonly")
        ]

    async def heal(self) -> None:
        """Every fault off: pile switches cleared, the database allowed and writable."""
        for pile in self.sim.piles:
            pile.faults.lose_acks = 0.0
            pile.faults.resend_changed_readings = 0.0
            pile.faults.omit_optional_tags = 0.0
        with contextlib.suppress(Exception):
            await self.database.heal()
