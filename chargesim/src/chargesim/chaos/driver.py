"""The simulated fleet and what happens on it: piles that start and end sessions on their
own, and a driver that starts, stops and duplicates sessions through the HTTP API and
swipes cards. Every API call is recorded for the invariant checks."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from collections.abc import Collection, Sequence
from typing import Any

import httpx

from chargesim import (
    Ap3000Intervals,
    BkvIntervals,
    SimulatedAp3000Pile,
    SimulatedBkvGateway,
    SimulatedPile,
    Simulator,
    make_ap3000_piles,
    make_bkv_gateways,
)
from chargesim.chaos.options import AP3000_HEARTBEAT_S, BKV_HEARTBEAT_S, BKV_STATUS_S, ChaosOptions

#: a port the driver just acted on is left alone this long (real seconds)
_RESERVE_S = 15.0
#: HTTP requests in flight at most
_CONCURRENCY = 16


def make_fleet(opts: ChaosOptions) -> list[SimulatedPile]:
    """The piles of a run: AP3000 piles and BKV gateways with short resend intervals, so
    that unacknowledged reports come back within the run."""
    ap3000_intervals = Ap3000Intervals(
        settlement_resend_s=120.0, settlement_gap_s=20.0, full_after_s=900.0
    )
    fleet: list[SimulatedPile] = []
    fleet += make_ap3000_piles(
        opts.ap3000_piles,
        ports=opts.ap3000_ports,
        heartbeat_s=AP3000_HEARTBEAT_S,
        intervals=ap3000_intervals,
    )
    fleet += make_bkv_gateways(
        opts.bkv_gateways,
        sockets=opts.bkv_sockets,
        heartbeat_s=BKV_HEARTBEAT_S,
        intervals=BkvIntervals(status_s=BKV_STATUS_S, end_report_resend_s=50.0),
    )
    return fleet


@dataclasses.dataclass(slots=True)
class ApiCall:
    """One HTTP request of the driver and its answer (``status`` None: no answer)."""

    action: str
    method: str
    path: str
    at: float
    status: int | None = None
    body: Any = None
    error: str | None = None
    idempotency_key: str | None = None
    #: requests made together (a duplicate pair, a start and its stop) share a group
    group: int | None = None
    device_id: str | None = None
    port: int | None = None

    @property
    def accepted(self) -> bool:
        return self.status == 202

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class Slot:
    """One port of one pile, as the driver addresses it."""

    pile: SimulatedPile
    device_id: str
    #: 1-based, like the API
    port: int

    @property
    def socket(self) -> int:
        return int(self.device_id.rsplit("-", 1)[1])

    def session(self) -> Any:
        """The running session on the port (None when idle)."""
        if isinstance(self.pile, SimulatedAp3000Pile):
            return self.pile.ports[self.port - 1].session
        assert isinstance(self.pile, SimulatedBkvGateway)
        return self.pile.jack(self.socket, self.port - 1).session

    def plugged(self) -> bool:
        if isinstance(self.pile, SimulatedAp3000Pile):
            return self.pile.ports[self.port - 1].plugged
        assert isinstance(self.pile, SimulatedBkvGateway)
        return self.pile.jack(self.socket, self.port - 1).plugged

    def unplug(self) -> None:
        if isinstance(self.pile, SimulatedAp3000Pile):
            self.pile.unplug(self.port - 1)
        else:
            assert isinstance(self.pile, SimulatedBkvGateway)
            self.pile.unplug(self.socket, self.port - 1)

    def plug(self) -> None:
        if isinstance(self.pile, SimulatedAp3000Pile):
            self.pile.plug(self.port - 1)
        else:
            assert isinstance(self.pile, SimulatedBkvGateway)
            self.pile.plug(self.socket, self.port - 1)


def slots_of(sim: Simulator) -> list[Slot]:
    """Every port of every pile of the simulator."""
    out: list[Slot] = []
    for pile in sim.piles:
        if isinstance(pile, SimulatedAp3000Pile):
            out += [Slot(pile, pile.phy_id, p.index + 1) for p in pile.ports]
        elif isinstance(pile, SimulatedBkvGateway):
            for device_id in pile.device_ids():
                out += [Slot(pile, device_id, port) for port in (1, 2)]
    return out


class ActivityDriver:
    """Sessions through the API and at the piles, at ``opts.activity`` actions per
    second per 100 piles; every API call lands in :attr:`calls`."""

    #: action -> weight
    WEIGHTS: dict[str, int] = {
        "api_start": 30,
        "api_start_duplicate_key": 6,
        "api_start_duplicate": 4,
        "api_start_then_stop": 8,
        "api_stop": 10,
        "card_swipe": 8,
        "device_start": 18,
        "device_end": 10,
    }

    def __init__(
        self,
        opts: ChaosOptions,
        sim: Simulator,
        api: str,
        rng: random.Random,
        *,
        cards: Sequence[str] = (),
        unknown_cards: Sequence[str] = (),
        planned: Collection[str] = (),
    ) -> None:
        self.opts = opts
        self.sim = sim
        self.api = api
        self.rng = rng
        self.cards = list(cards)
        self.unknown_cards = list(unknown_cards)
        self.planned = set(planned)
        self.slots = slots_of(sim)
        self.calls: list[ApiCall] = []
        self.actions: dict[str, int] = dict.fromkeys(self.WEIGHTS, 0)
        self.swipes = 0
        self.device_starts = 0
        self._reserved: dict[tuple[str, int], float] = {}
        self._groups = itertools.count(1)
        self._keys = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(_CONCURRENCY)
        self._client: httpx.AsyncClient | None = None

    async def run(self, duration_s: float) -> None:
        """Act for ``duration_s`` seconds, then wait for the requests in flight."""
        rate = self.opts.activity * self.opts.piles / 100.0
        names = list(self.WEIGHTS)
        weights = [self.WEIGHTS[n] for n in names]
        loop = asyncio.get_running_loop()
        end = loop.time() + duration_s
        async with httpx.AsyncClient(base_url=self.api, timeout=10.0) as client:
            self._client = client
            try:
                while loop.time() < end:
                    await asyncio.sleep(self.rng.expovariate(rate))
                    action = self.rng.choices(names, weights)[0]
                    self._spawn(self._act(action))
                if self._tasks:
                    await asyncio.gather(*list(self._tasks), return_exceptions=True)
            finally:
                for task in list(self._tasks):
                    task.cancel()
                self._client = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- choosing ports ------------------------------------------------------------------

    def _free(self, slot: Slot) -> bool:
        until = self._reserved.get((slot.device_id, slot.port), 0.0)
        return (
            until < time.monotonic()
            and slot.pile.connected
            and slot.plugged()
            and slot.session() is None
        )

    def _pick(self, want: str, protocol: str | None = None) -> Slot | None:
        """A random port that is idle (``want="idle"``) or charging."""
        for _ in range(20):
            slot = self.rng.choice(self.slots)
            if protocol is not None and slot.pile.protocol != protocol:
                continue
            if want == "idle" and self._free(slot):
                self._reserved[(slot.device_id, slot.port)] = time.monotonic() + _RESERVE_S
                return slot
            if want == "charging" and slot.session() is not None:
                return slot
        return None

    def _start_body(self, slot: Slot, *, long: bool = False) -> dict[str, Any]:
        if long:  # outlives any fault: only the stop should end it
            return {"mode": "time", "duration_min": 60}
        roll = self.rng.random()
        if roll < 0.7:
            return {"mode": "time", "duration_min": self.rng.randint(1, 8)}
        if roll < 0.9:
            return {"mode": "energy", "energy_kwh": round(self.rng.uniform(0.01, 0.08), 2)}
        return {"mode": "full"}

    # --- actions -------------------------------------------------------------------------

    async def _act(self, action: str) -> None:
        self.actions[action] += 1
        if action == "api_start":
            slot = self._pick("idle")
            if slot is not None:
                await self._post(action, slot, "start", self._start_body(slot))
        elif action == "api_start_duplicate_key":
            slot = self._pick("idle")
            if slot is not None:
                body, group = self._start_body(slot), next(self._groups)
                key = f"chaos-{self.opts.seed}-{next(self._keys)}"
                await asyncio.gather(
                    self._post(action, slot, "start", body, key=key, group=group),
                    self._post(action, slot, "start", body, key=key, group=group),
                )
        elif action == "api_start_duplicate":
            slot = self._pick("idle")
            if slot is not None:
                body, group = self._start_body(slot), next(self._groups)
                await asyncio.gather(
                    self._post(action, slot, "start", body, group=group),
                    self._post(action, slot, "start", body, group=group),
                )
        elif action == "api_start_then_stop":
            slot = self._pick("idle")
            if slot is not None:
                group = next(self._groups)
                start = await self._post(
                    action, slot, "start", self._start_body(slot, long=True), group=group
                )
                if start.accepted:
                    await self._post(action, slot, "stop", None, group=group)
        elif action == "api_stop":
            slot = self._pick("charging")
            if slot is not None:
                await self._post(action, slot, "stop", None)
        elif action == "card_swipe":
            await self._swipe()
        elif action == "device_start":
            self._device_start()
        elif action == "device_end":
            slot = self._pick("charging")
            if slot is not None:  # unplugged and plugged in again: the session ends
                slot.unplug()
                slot.plug()

    async def _post(
        self,
        action: str,
        slot: Slot,
        verb: str,
        body: dict[str, Any] | None,
        *,
        key: str | None = None,
        group: int | None = None,
    ) -> ApiCall:
        path = f"/api/v1/devices/{slot.device_id}/ports/{slot.port}/{verb}"
        call = ApiCall(
            action,
            "POST",
            path,
            time.time(),
            idempotency_key=key,
            group=group,
            device_id=slot.device_id,
            port=slot.port,
        )
        self.calls.append(call)
        headers = {"Idempotency-Key": key} if key else {}
        assert self._client is not None
        async with self._limit:
            try:
                response = await self._client.post(path, json=body, headers=headers)
            except httpx.HTTPError as exc:
                call.error = f"{type(exc).__name__}: {exc}"
                return call
        call.status = response.status_code
        try:
            call.body = response.json()
        except ValueError:
            call.body = response.text[:300]
        return call

    async def _swipe(self) -> None:
        if not self.cards:
            return
        slot = None
        for _ in range(10):
            candidate = self._pick("idle", "ap3000")
            if candidate is not None and candidate.device_id in self.planned:
                slot = candidate
                break
        if slot is None or not isinstance(slot.pile, SimulatedAp3000Pile):
            return
        pool = self.unknown_cards if self.unknown_cards and self.rng.random() < 0.1 else self.cards
        if await slot.pile.swipe_card(slot.port - 1, self.rng.choice(pool)):
            self.swipes += 1

    def _device_start(self) -> None:
        slot = self._pick("idle")
        if slot is None:
            return
        session: Any
        if isinstance(slot.pile, SimulatedAp3000Pile):
            if self.rng.random() < 0.8:
                session = slot.pile.start_local(
                    slot.port - 1, duration_s=60.0 * self.rng.randint(1, 8)
                )
            else:
                session = slot.pile.start_local(
                    slot.port - 1, energy_kwh=round(self.rng.uniform(0.01, 0.06), 2)
                )
        else:
            assert isinstance(slot.pile, SimulatedBkvGateway)
            roll = self.rng.random()
            socket, port = slot.socket, slot.port - 1
            if roll < 0.45:
                session = slot.pile.start_local(socket, port, amount_cent=self.rng.randint(1, 5))
            elif roll < 0.85:
                session = slot.pile.start_local(socket, port, duration_min=self.rng.randint(1, 8))
            else:
                session = slot.pile.start_local(
                    socket, port, energy_kwh=round(self.rng.uniform(0.01, 0.06), 3)
                )
        if session is not None:
            self.device_starts += 1


async def set_up_billing(
    api: str, sim: Simulator, rng: random.Random, *, cards: int = 40
) -> tuple[list[str], list[str], set[str]]:
    """Rate plans for about half the devices and cards with varied balances (a few too
    small for a whole session, so shortfalls happen). Returns the registered cards,
    some unregistered ones, and the devices with a plan."""
    plans = [
        {"name": "chaos-hourly", "kind": "per_hour", "parameters": {"cent_per_hour": 120}},
        {"name": "chaos-kwh", "kind": "per_kwh", "parameters": {"cent_per_kwh": 150}},
        {
            "name": "chaos-fee",
            "kind": "fee_tier",
            "parameters": {
                "service_fee_mode": "energy",
                "utc_offset_min": 480,
                "tiers": [
                    {"until": "08:00", "electricity_cent_per_kwh": 30, "service_cent": 20},
                    {"until": "24:00", "electricity_cent_per_kwh": 60, "service_cent": 40},
                ],
            },
        },
    ]
    registered = [f"C4{n:06X}" for n in range(1, cards + 1)]
    unknown = [f"D5{n:06X}" for n in range(1, 6)]
    planned: set[str] = set()
    device_ids = [d for pile in sim.piles for d in pile.device_ids()]
    limit = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=api, timeout=10.0) as client:

        async def call(method: str, path: str, body: dict[str, Any]) -> bool:
            async with limit:
                for _ in range(5):
                    try:
                        response = await client.request(method, path, json=body)
                    except httpx.HTTPError:
                        await asyncio.sleep(1.0)
                        continue
                    if response.status_code < 500:
                        return response.status_code in (200, 201, 409)
                    await asyncio.sleep(1.0)
                return False

        for plan in plans:
            await call("POST", "/api/v1/rate-plans", plan)

        async def card(card_id: str, balance: int) -> None:
            if not await call(
                "POST", "/api/v1/cards", {"card_id": card_id, "balance_cent": balance}
            ):
                registered.remove(card_id)

        async def device_plan(device_id: str, name: str) -> None:
            if await call("PUT", f"/api/v1/devices/{device_id}/rate-plan", {"plan": name}):
                planned.add(device_id)

        jobs = [card(c, rng.choice([2, 5, 50, 300, 1000, 5000])) for c in list(registered)]
        for device_id in device_ids:
            if rng.random() < 0.6:
                name = rng.choice(["chaos-hourly", "chaos-kwh", "chaos-fee"])
                jobs.append(device_plan(device_id, name))
        await asyncio.gather(*jobs)
    return registered, unknown, planned
