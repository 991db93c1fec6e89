"""The overload profile (``--profile overload``): capacity, 150 % of it, then 50 %.

Once every pile is online (or ``--settle`` s after the ramp) and the configured rate has
run for ``BASE_S`` seconds (the steady window of the usual report), the profile

1. measures the capacity, unless ``--capacity`` gives it: the offered rate doubles every
   ``STEP_S`` seconds, starting from twice the configured rate, until the server falls
   behind (it answers less than 90 % of what was sent, or the heartbeat p99 of the step
   exceeds 1 s), the generators cannot send the rate, or ``MAX_STEPS`` steps have run;
   the capacity is the most answered frames/s of a step; then 50 % of it is offered until
   the round trip is back under 100 ms (at most ``COOLDOWN_S``);
2. offers 150 % of the capacity for ``--overload-s`` seconds;
3. offers 50 % for ``--recover-s`` seconds; then the run ends.

A rate is an acceleration sent to every generator (``{"cmd": "rate", "accel": X}``). The
figures come from the generators' stats lines, one window per whole second (counter
deltas and the round trips answered in it), from the runner's per-second samples (piles
online, server CPU) and from /readyz and /metrics, read once a second. Verdicts:
``all_piles_held`` (no disconnect and every pile online throughout overload and
recovery), ``rtt_recovered_after_s`` (from the drop to 50 % to the first stretch of
``RTT_HOLD_S`` one-second windows with a heartbeat p99 under ``RTT_LIMIT_MS``) and
``recovered_within_30s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import httpx

from chargesim.loadtest.stats import Histogram

if TYPE_CHECKING:
    from chargesim.loadtest.runner import LoadOptions, Phase

#: ``--profile`` values; the first is the default (ramp, steady, optional storm)
PROFILES: Final = ("steady", "overload")
OVERLOAD_SHARE: Final = 1.5
RECOVER_SHARE: Final = 0.5
#: the round trip counts as recovered under this p99, held for RTT_HOLD_S seconds
RTT_LIMIT_MS: Final = 100.0
RTT_HOLD_S: Final = 5.0
RECOVERY_LIMIT_S: Final = 30.0
#: the configured rate runs this long once all piles are online, before the capacity
BASE_S: Final = 5.0
#: capacity search: steps of STEP_S seconds, each offering STEP_FACTOR times the last
STEP_S: Final = 6.0
STEP_FACTOR: Final = 2.0
MAX_STEPS: Final = 5
#: a step is saturated when the server answers less than this share of what was sent ...
ANSWERED_SHARE: Final = 0.9
#: ... or when the heartbeat p99 of the step exceeds this
SATURATED_P99_MS: Final = 1000.0
#: the generators are the limit when they send less than this share of the offered rate
SENT_SHARE: Final = 0.85
#: the overload counts as reached when the piles sent this multiple of the capacity
OVERLOADED_SHARE: Final = round(OVERLOAD_SHARE * SENT_SHARE, 3)
#: after the capacity search, wait at most this long for the round trip to come back (its
#: last step, at twice a rate the server could answer, leaves a backlog that 50 % drains
#: in about as long as the step ran over: a recovery measured after a shorter cooldown
#: would include the search's backlog)
COOLDOWN_S: Final = 90.0
COOLDOWN_HOLD_S: Final = 3.0
#: no pile beats more often than this (the wheel's tick is 50 ms; the gateway limits
#: frames per connection): a rate that needs more is capped
MAX_BEATS_PER_S: Final = 10.0
_SLACK_S: Final = 10.0
_HEALTH_TIMEOUT_S: Final = 2.0
_HEALTH_IN_FLIGHT: Final = 3
_LOG_EVERY_S: Final = 5.0
#: Prometheus samples read once a second: reads paused, overload, shedding, back-pressure
#: (whatever the server names them), and a few queues
_WATCHED: Final = re.compile(r"paus|overload|throttl|shed|pressure|saturat")
_WATCHED_NAMES: Final = frozenset(
    {
        "chargegw_event_loop_lag_seconds_sum",
        "chargegw_event_loop_lag_seconds_count",
        "chargegw_batch_queue_depth",
        "chargegw_db_buffered_rows",
        "chargegw_connections_current",
    }
)
_SAMPLE: Final = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{[^}]*\})?\s+(\S+)", re.M)
_LAG_SUM: Final = "chargegw_event_loop_lag_seconds_sum"
_LAG_COUNT: Final = "chargegw_event_loop_lag_seconds_count"
#: counters of a generator's stats line taken per window
WINDOW_COUNTERS: Final = (
    "frames_out",
    "frames_in",
    "heartbeats",
    "heartbeats_unanswered",
    "closed_by_server",
    "connection_errors",
)


def planned_length_s(opts: LoadOptions) -> float:
    """The longest the overload profile runs: the ramp and settle, the base, the capacity
    search and its cooldown (none with ``--capacity``), overload, recovery, a margin."""
    search = 0.0 if opts.capacity is not None else MAX_STEPS * STEP_S + COOLDOWN_S
    return (
        opts.ramp_s + opts.settle_s + BASE_S + search + opts.overload_s + opts.recover_s + _SLACK_S
    )


# --- windows -------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Window:
    """One generator's figures over one stats interval (``start``, ``end``]: epoch s."""

    start: float
    end: float
    deltas: dict[str, int]
    rtt: Histogram
    #: heartbeats awaiting a reply at the end of the window
    awaited: int = 0
    #: CPU seconds the generator used in the window
    cpu_s: float = 0.0


def window_of(previous: Mapping[str, Any] | None, line: Mapping[str, Any]) -> Window:
    """The window a stats line closes; ``previous``: the generator's stats line before
    (None for its first, whose counters count from zero)."""
    before = previous or {}
    end = float(line.get("window_end") or round(float(line["t"])))
    start = float(before.get("window_end") or end - 1.0)
    return Window(
        start=start,
        end=end,
        deltas={k: int(line.get(k) or 0) - int(before.get(k) or 0) for k in WINDOW_COUNTERS},
        rtt=Histogram.from_json(line.get("rtt_window") or {}),
        awaited=int(line.get("heartbeats_awaited") or 0),
        cpu_s=max(0.0, float(line.get("cpu_s") or 0.0) - float(before.get("cpu_s") or 0.0)),
    )


@dataclasses.dataclass(slots=True)
class Second:
    """Every generator's windows that end at the same whole second, added up."""

    end: int
    deltas: dict[str, int]
    rtt: Histogram
    awaited: int = 0
    windows: int = 0
    cpu_s: float = 0.0


def per_second(windows: Iterable[Window]) -> list[Second]:
    """The windows of all generators added up by the second they end at, in order."""
    seconds: dict[int, Second] = {}
    for window in windows:
        key = round(window.end)
        second = seconds.get(key)
        if second is None:
            second = seconds[key] = Second(key, dict.fromkeys(WINDOW_COUNTERS, 0), Histogram())
        for name, value in window.deltas.items():
            second.deltas[name] += value
        second.rtt.merge(window.rtt)
        second.awaited += window.awaited
        second.windows += 1
        second.cpu_s += window.cpu_s
    return [seconds[key] for key in sorted(seconds)]


@dataclasses.dataclass(slots=True)
class Measure:
    """Rates and totals of the windows whose middle lies in a time range."""

    seconds: float
    totals: dict[str, int]
    rates: dict[str, float]
    rtt: Histogram
    #: CPU of the generators, percent of one core (summed over them)
    cpu_percent: float = 0.0


def measure(windows_by_gen: Iterable[Sequence[Window]], lo: float, hi: float) -> Measure:
    """Figures of every generator's windows centred in [``lo``, ``hi``): totals of the
    counters, and rates summed over the generators, each its counts over the time its
    windows cover (a late window covers more than a second, the next one less)."""
    totals = dict.fromkeys(WINDOW_COUNTERS, 0)
    rates = dict.fromkeys(WINDOW_COUNTERS, 0.0)
    rtt = Histogram()
    longest = cpu = 0.0
    for windows in windows_by_gen:
        inside = [w for w in windows if lo <= (w.start + w.end) / 2.0 < hi]
        covered = sum(w.end - w.start for w in inside)
        longest = max(longest, covered)
        for window in inside:
            rtt.merge(window.rtt)
            for name, value in window.deltas.items():
                totals[name] += value
        if covered > 0:
            for name in WINDOW_COUNTERS:
                rates[name] += sum(w.deltas[name] for w in inside) / covered
            cpu += 100.0 * sum(w.cpu_s for w in inside) / covered
    return Measure(seconds=longest, totals=totals, rates=rates, rtt=rtt, cpu_percent=cpu)


def rtt_recovered_after(
    p99s: Iterable[tuple[float, float | None]],
    since: float,
    until: float,
    *,
    limit_ms: float = RTT_LIMIT_MS,
    hold_s: float = RTT_HOLD_S,
) -> float | None:
    """Seconds from ``since`` (the drop to 50 %) to the start of the first stretch of
    ``hold_s`` seconds, ending by ``until``, of one-second windows whose heartbeat p99 is
    under ``limit_ms``; None if there is none.

    ``p99s``: (window end, p99) per one-second window. A window without a round trip
    (p99 None) or a missing second breaks a stretch: no answer is not a fast answer.
    """
    start: float | None = None
    previous: float | None = None
    for end, p99 in sorted(p99s, key=lambda item: item[0]):
        if end <= since or end > until:
            continue
        if previous is not None and end - previous > 1.5:
            start = None
        previous = end
        if p99 is None or p99 >= limit_ms:
            start = None
            continue
        if start is None:
            start = max(since, end - 1.0)
        if end - start >= hold_s - 1e-9:
            return round(start - since, 1)
    return None


def server_samples(text: str) -> dict[str, float]:
    """The watched samples of a Prometheus text page, summed over their label sets."""
    out: dict[str, float] = {}
    for name, value in _SAMPLE.findall(text):
        if name.endswith(("_created", "_bucket")):
            continue
        if name in _WATCHED_NAMES or _WATCHED.search(name):
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(value)
    return out


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _rate(value: float) -> float:
    return round(value, 1)


# --- the driver ----------------------------------------------------------------------------


class Stage(enum.Enum):
    """Where the profile is; the report's phases group them."""

    RAMP = "ramp"
    BASE = "base"
    STEP = "step"
    COOLDOWN = "cooldown"
    OVERLOAD = "overload"
    RECOVERY = "recovery"
    DONE = "done"


#: report phase of each stage
_PHASE_OF: Final = {
    Stage.RAMP: "ramp",
    Stage.BASE: "ramp",
    Stage.STEP: "capacity",
    Stage.COOLDOWN: "capacity",
    Stage.OVERLOAD: "overload",
    Stage.RECOVERY: "recovery",
}
PHASES: Final = ("ramp", "capacity", "overload", "recovery")


class OverloadProfile:
    """The overload profile inside one :class:`~chargesim.loadtest.runner.Phase`: the
    phase's loop calls :meth:`tick` once a second and stops when :attr:`done`."""

    def __init__(
        self,
        phase: Phase,
        t0: float,
        *,
        accel_for: Callable[[float], float],
        offered_at: Callable[[float], float],
    ) -> None:
        """``accel_for``: the acceleration for an offered rate (frames/s) of this fleet;
        ``offered_at``: the inverse."""
        self.phase = phase
        self.opts = phase.opts
        self.t0 = t0
        self.accel_for = accel_for
        self.offered_at = offered_at
        self.stage = Stage.RAMP
        self.since = t0
        self.done = False
        self.capacity: float | None = self.opts.capacity
        self.limited_by: str | None = None
        self.cooldown_back: bool | None = None
        self.steps: list[dict[str, Any]] = []
        #: (from, offered frames/s, accel): every rate the generators were given
        self.rates: list[tuple[float, float, float]] = [
            (t0, offered_at(self.opts.accel), self.opts.accel)
        ]
        #: phase name -> (start, server CPU seconds then)
        self.marks: dict[str, tuple[float, float]] = {}
        self.ended: tuple[float, float] | None = None
        self.health: list[dict[str, Any]] = []
        self._health_task: asyncio.Task[None] | None = None
        self._next_log = 0.0

    # --- live --------------------------------------------------------------------------

    @property
    def left_base(self) -> bool:
        """The rate is no longer the configured one."""
        return self.stage not in (Stage.RAMP, Stage.BASE)

    def start(self, cpu_s: float) -> None:
        """Begin: mark the ramp, read /readyz and /metrics once a second from now on."""
        self.marks["ramp"] = (self.t0, cpu_s)
        if self.phase.http is not None and self.phase.server.api is not None:
            task = asyncio.create_task(self._health_loop(self.phase.http, self.phase.server.api))
            self._health_task = task
            self.phase._tasks.add(task)  # cancelled by the phase if it fails
            task.add_done_callback(self.phase._tasks.discard)

    async def close(self) -> None:
        """Stop reading /readyz and /metrics."""
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def tick(self, now: float, cpu_s: float, steady_due: bool) -> None:
        """Move on when the current stage is over (called once a second)."""
        stage, elapsed, opts = self.stage, now - self.since, self.opts
        if stage is Stage.RAMP:
            if steady_due:
                self._enter(Stage.BASE, now, cpu_s)
        elif stage is Stage.BASE:
            if elapsed >= BASE_S:
                if self.capacity is None:
                    await self._step(now, cpu_s, self.rates[-1][1] * STEP_FACTOR)
                else:
                    self.limited_by = "given"
                    await self._overload(now, cpu_s)
        elif stage is Stage.STEP:
            if elapsed >= STEP_S:
                await self._end_step(now, cpu_s)
        elif stage is Stage.COOLDOWN:
            back = self._rtt_back(now, COOLDOWN_HOLD_S)
            if back or elapsed >= COOLDOWN_S:
                self.cooldown_back = back
                await self._overload(now, cpu_s)
        elif stage is Stage.OVERLOAD:
            if elapsed >= opts.overload_s:
                assert self.capacity is not None
                self._enter(Stage.RECOVERY, now, cpu_s)
                await self._set_rate(now, self.capacity * RECOVER_SHARE)
        elif stage is Stage.RECOVERY and elapsed >= opts.recover_s:
            self.ended = (now, cpu_s)
            self.stage = Stage.DONE
            self.done = True
            self.phase.log("overload profile: done")
        logged = (Stage.STEP, Stage.OVERLOAD, Stage.RECOVERY)
        if self.stage in logged and now - self.since >= 1.0 and now >= self._next_log:
            self._next_log = now + _LOG_EVERY_S
            self._log_second(now)

    def _enter(self, stage: Stage, now: float, cpu_s: float) -> None:
        phase = _PHASE_OF[stage]
        if phase not in self.marks:
            self.marks[phase] = (now, cpu_s)
        self.stage, self.since = stage, now

    def _capped(self, target: float) -> tuple[float, float]:
        """(accel, offered frames/s) for ``target``, with no pile beating faster than
        MAX_BEATS_PER_S."""
        opts = self.opts
        most = MAX_BEATS_PER_S * min(opts.ap3000_heartbeat_s, opts.bkv_heartbeat_s)
        accel = min(self.accel_for(target), most)
        return accel, self.offered_at(accel)

    async def _set_rate(self, now: float, target: float) -> tuple[float, float]:
        accel, offered = self._capped(target)
        for gen in self.phase.gens:
            await gen.send({"cmd": "rate", "accel": accel})
        self.rates.append((now, offered, accel))
        self.phase.log(
            f"overload profile, {self.stage.value}: offering {offered:,.0f} frames/s "
            f"(accel {accel:.3g})"
        )
        return accel, offered

    async def _step(self, now: float, cpu_s: float, target: float) -> None:
        self._enter(Stage.STEP, now, cpu_s)
        accel, offered = await self._set_rate(now, target)
        self.steps.append(
            {
                "from": now,
                "target_per_s": _rate(target),
                "offered_per_s": _rate(offered),
                "accel": round(accel, 3),
            }
        )

    async def _end_step(self, now: float, cpu_s: float) -> None:
        step = self.steps[-1]
        m = measure(self._windows(), step["from"] + 1.0, now)
        sent, answered = m.rates["frames_out"], m.rates["frames_in"]
        p99 = m.rtt.percentile(99)
        saturated = sent > 0 and (
            answered < ANSWERED_SHARE * sent or (p99 is not None and p99 > SATURATED_P99_MS)
        )
        generators = sent < SENT_SHARE * step["offered_per_s"]
        capped = step["offered_per_s"] < step["target_per_s"] * 0.999
        step.update(
            to=now,
            sent_per_s=_rate(sent),
            answered_per_s=_rate(answered),
            rtt_p50_ms=_ms(m.rtt.percentile(50)),
            rtt_p99_ms=_ms(p99),
            saturated=saturated,
        )
        self.phase.log(
            f"capacity step {len(self.steps)}: offered {step['offered_per_s']:,.0f}/s, sent "
            f"{sent:,.0f}/s, answered {answered:,.0f}/s, heartbeat p99 {_ms(p99)} ms"
            + (" (saturated)" if saturated else "")
        )
        if not (saturated or generators or capped or len(self.steps) >= MAX_STEPS):
            await self._step(now, cpu_s, step["offered_per_s"] * STEP_FACTOR)
            return
        self.limited_by = (
            "server"
            if saturated
            else "generators"
            if generators
            else "fleet"
            if capped
            else "steps"
        )
        self.capacity = max(float(s["answered_per_s"]) for s in self.steps)
        if self.capacity <= 0:
            from chargesim.loadtest.runner import LoadTestError

            raise LoadTestError("the capacity search saw no answers from the server")
        self.phase.log(
            f"capacity: {self.capacity:,.0f} answered frames/s (limited by {self.limited_by})"
        )
        self._enter(Stage.COOLDOWN, now, cpu_s)
        await self._set_rate(now, self.capacity * RECOVER_SHARE)

    async def _overload(self, now: float, cpu_s: float) -> None:
        assert self.capacity is not None
        self._enter(Stage.OVERLOAD, now, cpu_s)
        await self._set_rate(now, self.capacity * OVERLOAD_SHARE)

    def _windows(self) -> list[list[Window]]:
        return [g.windows for g in self.phase.gens]

    def _recent(self, since: float) -> list[Second]:
        return per_second(w for g in self.phase.gens for w in g.windows if w.end > since)

    def _rtt_back(self, now: float, hold_s: float) -> bool:
        p99s = [(float(s.end), s.rtt.percentile(99)) for s in self._recent(self.since)]
        return rtt_recovered_after(p99s, self.since, now, hold_s=hold_s) is not None

    def _log_second(self, now: float) -> None:
        recent = self._recent(now - 3.0)
        if not recent:
            return
        last = recent[-1]
        online = self.phase.timeline[-1]["online"] if self.phase.timeline else None
        health = self.health[-1] if self.health else {}
        self.phase.log(
            f"[{self.stage.value} {now - self.since:4.0f}s] sent {last.deltas['frames_out']}/s "
            f"answered {last.deltas['frames_in']}/s | heartbeat p99 "
            f"{_ms(last.rtt.percentile(99))} ms, awaited {last.awaited} | online {online} | "
            f"readyz {health.get('readyz')}"
        )

    async def _health_loop(self, http: httpx.AsyncClient, api: str) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            due = math.floor(time.time()) + 1.0
            while True:
                await asyncio.sleep(max(0.0, due - time.time()))
                if len(tasks) < _HEALTH_IN_FLIGHT:  # a server that does not answer
                    task = asyncio.create_task(self._health_sample(http, api, due))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                due += 1.0
                if due <= time.time():
                    due = math.floor(time.time()) + 1.0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _health_sample(self, http: httpx.AsyncClient, api: str, second: float) -> None:
        record: dict[str, Any] = {"second": round(second)}
        started = time.monotonic()
        ready, metrics = await asyncio.gather(
            _get(http, api + "/readyz"), _get(http, api + "/metrics")
        )
        if isinstance(ready, httpx.Response):
            record["readyz"] = ready.status_code
            record["readyz_ms"] = round((time.monotonic() - started) * 1000.0, 1)
            if ready.status_code != 200:
                with contextlib.suppress(ValueError):
                    body = ready.json()
                    record["not_ready"] = sorted(
                        k for k, ok in (body.get("checks") or {}).items() if not ok
                    )
                    record["reasons"] = body.get("reasons") or {}
        else:
            record["readyz"] = ready
        if isinstance(metrics, httpx.Response) and metrics.status_code == 200:
            record["metrics"] = server_samples(metrics.text)
        self.health.append(record)

    # --- the report --------------------------------------------------------------------

    def report(self, finals: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Phases, the per-second timeline, the capacity search and the verdicts."""
        opts, t0 = self.opts, self.t0
        windows = self._windows()
        seconds = per_second(w for ws in windows for w in ws)
        end = (
            self.ended[0]
            if self.ended is not None
            else max([time.time()] + [float(s.end) for s in seconds])
        )
        spans = self._spans(end)
        tail = self._tail(finals)
        phases = {
            name: self._phase_report(name, lo, hi, windows, tail if name == spans[-1][0] else {})
            for name, lo, hi in spans
        }
        timeline = self._timeline(seconds, spans)
        for name, phase in phases.items():
            entries = [e for e in timeline if e["phase"] == name]
            phase["rtt_p99_worst_1s_ms"] = max(
                (e["rtt_p99_ms"] for e in entries if e["rtt_p99_ms"] is not None), default=None
            )
            phase["event_loop_lag_ms_max"] = max(
                (e["event_loop_lag_ms"] for e in entries if "event_loop_lag_ms" in e),
                default=None,
            )
        held = [phases[name] for name in ("overload", "recovery") if name in phases]
        all_held: bool | None = None
        if "overload" in phases:
            all_held = all(
                p["disconnects"] == 0 and p["online_min"] == opts.piles for p in held
            ) and ("recovery" in phases)
        recovered: float | None = None
        if "recovery" in phases:
            _, lo, hi = next(span for span in spans if span[0] == "recovery")
            recovered = rtt_recovered_after(
                [(float(s.end), s.rtt.percentile(99)) for s in seconds], lo, hi
            )
        capacity = self.capacity
        overload = phases.get("overload")
        share = None if overload is None or not capacity else overload["sent_per_s"] / capacity
        share = None if share is None else round(share, 2)
        return {
            "completed": self.done,
            "capacity": {
                "frames_per_s": None if capacity is None else _rate(capacity),
                "measured": opts.capacity is None,
                "limited_by": self.limited_by,
                "steps": [
                    {k: (round(v - t0, 1) if k in ("from", "to") else v) for k, v in s.items()}
                    for s in self.steps
                ],
                "cooldown_rtt_back": self.cooldown_back,
            },
            "settings": {
                "overload_share": OVERLOAD_SHARE,
                "recover_share": RECOVER_SHARE,
                "overload_s": opts.overload_s,
                "recover_s": opts.recover_s,
                "rtt_limit_ms": RTT_LIMIT_MS,
                "rtt_hold_s": RTT_HOLD_S,
            },
            "verdicts": {
                "all_piles_held": all_held,
                "rtt_recovered_after_s": recovered,
                "recovered_within_30s": recovered is not None and recovered <= RECOVERY_LIMIT_S,
                # the overload was real: the piles sent well above the capacity
                "overload_sent_share": share,
                "overload_reached": None if share is None else share >= OVERLOADED_SHARE,
            },
            "phases": phases,
            "timeline": timeline,
        }

    def _spans(self, end: float) -> list[tuple[str, float, float]]:
        starts = [(name, self.marks[name][0]) for name in PHASES if name in self.marks]
        return [
            (name, start, starts[i + 1][1] if i + 1 < len(starts) else end)
            for i, (name, start) in enumerate(starts)
        ]

    def _tail(self, finals: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Counts after each generator's last window (up to its final report)."""
        tail = dict.fromkeys(WINDOW_COUNTERS, 0)
        for gen, final in zip(self.phase.gens, finals, strict=True):
            for name in WINDOW_COUNTERS:
                seen = sum(w.deltas[name] for w in gen.windows)
                tail[name] += max(0, int(final.get(name) or 0) - seen)
        return tail

    def _cpu_percent(self, name: str) -> float | None:
        """Server CPU % from the phase's start to the next one's (or the profile's end)."""
        marks = [self.marks[n] for n in PHASES if n in self.marks]
        if self.ended is not None:
            marks.append(self.ended)
        start = self.marks[name]
        stop = marks[marks.index(start) + 1] if marks.index(start) + 1 < len(marks) else None
        if stop is None or stop[0] <= start[0]:
            return None
        return round(100.0 * (stop[1] - start[1]) / (stop[0] - start[0]), 1)

    def _offered_mean(self, lo: float, hi: float) -> float:
        """The configured offered rate over [lo, hi), time-weighted."""
        if hi <= lo:
            return self._rate_at(lo)[0]
        total = 0.0
        for i, (at, rate, _) in enumerate(self.rates):
            until = self.rates[i + 1][0] if i + 1 < len(self.rates) else hi
            total += rate * max(0.0, min(until, hi) - max(at, lo))
        return total / (hi - lo)

    def _phase_report(
        self,
        name: str,
        lo: float,
        hi: float,
        windows: Sequence[Sequence[Window]],
        tail: Mapping[str, int],
    ) -> dict[str, Any]:
        t0 = self.t0
        m = measure(windows, lo, hi)
        totals = {k: v + tail.get(k, 0) for k, v in m.totals.items()}
        samples = [e for e in self.phase.timeline if lo <= t0 + e["t"] <= hi]
        online = [e["online"] for e in samples]
        connected = [e["connected"] for e in samples]
        cpu = [e["server_cpu_percent"] for e in samples if e.get("server_cpu_percent") is not None]
        health = sorted(
            (h for h in self.health if lo <= h["second"] - 0.5 < hi), key=lambda h: h["second"]
        )
        readyz: dict[str, int] = {}
        for h in health:
            key = str(h.get("readyz"))
            readyz[key] = readyz.get(key, 0) + 1
        return {
            "from_s": round(lo - t0, 1),
            "to_s": round(hi - t0, 1),
            "seconds": round(hi - lo, 1),
            "offered_per_s": _rate(self._offered_mean(lo, hi)),
            "sent_per_s": _rate(m.rates["frames_out"]),
            "answered_per_s": _rate(m.rates["frames_in"]),
            "online_min": min(online, default=None),
            "online_max": max(online, default=None),
            "connected_min": min(connected, default=None),
            "closed_by_server": totals["closed_by_server"],
            "connection_errors": totals["connection_errors"],
            "disconnects": totals["closed_by_server"] + totals["connection_errors"],
            "heartbeats": totals["heartbeats"],
            "heartbeats_unanswered": totals["heartbeats_unanswered"],
            "heartbeat_rtt_ms": m.rtt.summary(),
            "server_cpu_percent": self._cpu_percent(name),
            "server_cpu_percent_max": max(cpu, default=None),
            "generator_cpu_percent": round(m.cpu_percent, 1),
            "readyz": readyz,
            "server_metrics": _metric_summary(health),
        }

    def _rate_at(self, at: float) -> tuple[float, float]:
        current = self.rates[0]
        for change in self.rates:
            if change[0] <= at:
                current = change
        return current[1], current[2]

    def _timeline(
        self, seconds: Sequence[Second], spans: Sequence[tuple[str, float, float]]
    ) -> list[dict[str, Any]]:
        t0 = self.t0
        samples = {round(t0 + e["t"]): e for e in self.phase.timeline}
        health = {h["second"]: h for h in self.health}
        out: list[dict[str, Any]] = []
        previous_metrics: dict[str, float] = {}
        for second in seconds:
            middle = second.end - 0.5
            phase = next((name for name, lo, hi in spans if lo <= middle < hi), None)
            if phase is None:
                continue
            sample = samples.get(second.end, {})
            h = health.get(second.end, {})
            entry: dict[str, Any] = {
                "t": round(second.end - t0),
                "phase": phase,
                "offered_per_s": _rate(self._rate_at(middle)[0]),
                "sent_per_s": second.deltas["frames_out"],
                "answered_per_s": second.deltas["frames_in"],
                "rtt_count": second.rtt.total,
                "rtt_p50_ms": _ms(second.rtt.percentile(50)),
                "rtt_p99_ms": _ms(second.rtt.percentile(99)),
                "heartbeats_unanswered": second.deltas["heartbeats_unanswered"],
                "heartbeats_awaited": second.awaited,
                "disconnects": second.deltas["closed_by_server"]
                + second.deltas["connection_errors"],
                "online": sample.get("online"),
                "server_cpu_percent": sample.get("server_cpu_percent"),
                "generator_cpu_percent": round(100.0 * second.cpu_s, 1),
                "readyz": h.get("readyz"),
            }
            if h.get("not_ready"):
                entry["not_ready"] = h["not_ready"]
            metrics = h.get("metrics")
            if metrics:
                entry["server_metrics"] = metrics
                lag = _lag_ms(previous_metrics, metrics)
                if lag is not None:
                    entry["event_loop_lag_ms"] = lag
                previous_metrics = metrics
            out.append(entry)
        return out


async def _get(http: httpx.AsyncClient, url: str) -> httpx.Response | str:
    try:
        return await http.get(url, timeout=_HEALTH_TIMEOUT_S)
    except httpx.TimeoutException:
        return "timeout"
    except httpx.HTTPError as exc:
        return type(exc).__name__


def _lag_ms(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """The mean event-loop lag between two /metrics samples (all workers), ms."""
    if _LAG_SUM not in before or _LAG_SUM not in after:
        return None
    count = after.get(_LAG_COUNT, 0.0) - before.get(_LAG_COUNT, 0.0)
    if count <= 0:
        return None
    return round((after[_LAG_SUM] - before[_LAG_SUM]) / count * 1000.0, 2)


def _metric_summary(health: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per watched metric over a phase: first, last and largest value."""
    series: dict[str, list[float]] = {}
    for h in health:
        for name, value in (h.get("metrics") or {}).items():
            series.setdefault(name, []).append(value)
    return {
        name: {"first": values[0], "last": values[-1], "max": max(values)}
        for name, values in sorted(series.items())
    }
