"""The overload profile's pure parts: rates, windows, the recovery verdict, the generator's
rate change on its timer wheel (driven by a fake loop clock: nothing sleeps, nothing is
timed)."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from chargesim.loadtest import overload
from chargesim.loadtest.piles import CONNECTED, Generator, GeneratorConfig
from chargesim.loadtest.runner import LoadOptions, LoadTestError, accel_for_rate, offered_rate
from chargesim.loadtest.stats import Histogram

# --- the rate for a target -------------------------------------------------------------------


def test_accel_for_a_target_rate_follows_the_pile_mix() -> None:
    opts = LoadOptions(piles=1000, bkv_share=0.2, accel=7.0, start="baseline")
    # per unit of accel: 800 AP3000 heartbeats per 180 s; 200 BKV heartbeats per 60 s, and
    # every fifth beat a status cluster per socket (2): 1.4 frames a beat
    per_accel = 800 / 180 + 200 / 60 * 1.4
    assert accel_for_rate(opts, 100 * per_accel) == pytest.approx(100.0)
    for target in (1.0, 911.0, 25_000.0):
        accel = accel_for_rate(opts, target)
        assert offered_rate(dataclasses.replace(opts, accel=accel)) == pytest.approx(target)
    only_ap3000 = LoadOptions(piles=900, bkv_share=0.0, start="baseline")
    assert accel_for_rate(only_ap3000, 500.0) == pytest.approx(100.0)


def test_the_overload_profile_checks_its_options() -> None:
    opts = LoadOptions(piles=10, start="baseline", profile="overload", duration_s=60.0)
    with pytest.raises(LoadTestError, match="--duration"):
        opts.check()
    opts.duration_s = overload.planned_length_s(opts)
    opts.check()
    # a given capacity skips the search: a shorter run suffices
    given = dataclasses.replace(opts, capacity=2000.0)
    assert overload.planned_length_s(given) < overload.planned_length_s(opts)
    for bad in (
        {"storm_at_s": 20.0},
        {"latency_probes": 3},
        {"capacity": -1.0},
        {"recover_s": 2.0},
        {"profile": "burst"},
    ):
        with pytest.raises(LoadTestError):
            dataclasses.replace(opts, **bad).check()


# --- windows ----------------------------------------------------------------------------------


def _hist(*values: float) -> dict[str, Any]:
    hist = Histogram()
    for value in values:
        hist.add(value)
    return hist.to_json()


def _line(end: float, rtt: tuple[float, ...] = (), **counters: int) -> dict[str, Any]:
    return {
        "type": "stats",
        "t": end + 0.003,
        "window_end": end,
        "rtt_window": _hist(*rtt),
        **counters,
    }


def _windows(lines: list[dict[str, Any]]) -> list[overload.Window]:
    """The windows of one generator's stats lines, each against the one before."""
    before: list[dict[str, Any] | None] = [None, *lines[:-1]]
    return [overload.window_of(b, line) for b, line in zip(before, lines, strict=True)]


def test_windows_take_counter_deltas_and_add_up_by_second() -> None:
    gen_a = [
        _line(100.0, (2.0,), frames_out=50, frames_in=40, heartbeats=20),
        _line(101.0, (3.0, 400.0), frames_out=150, frames_in=90, heartbeats=60),
        _line(102.0, (), frames_out=250, frames_in=190, heartbeats=100, closed_by_server=1),
    ]
    gen_b = [
        _line(101.0, (5.0,), frames_out=30, frames_in=30, heartbeats_unanswered=2),
        _line(102.0, (6.0,), frames_out=130, frames_in=130, heartbeats_unanswered=2),
    ]
    windows = [_windows(gen_a), _windows(gen_b)]
    first, second = windows[0][0], windows[0][1]
    assert (first.start, first.end) == (99.0, 100.0)
    assert first.deltas["frames_out"] == 50  # counted from zero
    assert (second.start, second.end) == (100.0, 101.0)
    assert second.deltas["frames_out"] == 100 and second.deltas["frames_in"] == 50
    assert second.rtt.total == 2
    seconds = overload.per_second(itertools.chain.from_iterable(windows))
    assert [s.end for s in seconds] == [100, 101, 102]
    assert [s.windows for s in seconds] == [1, 2, 2]
    assert seconds[1].deltas["frames_out"] == 130
    assert seconds[1].deltas["heartbeats_unanswered"] == 2
    assert seconds[2].deltas["heartbeats_unanswered"] == 0
    assert seconds[2].deltas["closed_by_server"] == 1
    assert seconds[1].rtt.total == 3
    p99 = seconds[1].rtt.percentile(99)
    assert p99 is not None and p99 >= 380.0
    assert seconds[2].rtt.percentile(50) is not None  # B's 6 ms; A answered none
    # windows centred in [100, 102): each generator's rate over the time it covers
    m = overload.measure(windows, 100.0, 102.0)
    assert m.rates["frames_out"] == pytest.approx((100 + 100) / 2 + (30 + 100) / 2)
    assert m.totals["frames_in"] == 50 + 100 + 30 + 100
    assert m.rtt.total == 4


def test_a_late_window_counts_over_the_time_it_covers() -> None:
    lines = [
        _line(10.0, frames_in=0),
        _line(12.0, frames_in=300),  # one second skipped: this window covers two
        _line(13.0, frames_in=400),
    ]
    windows = _windows(lines)
    m = overload.measure([windows], 10.0, 14.0)
    assert m.seconds == pytest.approx(3.0)
    assert m.rates["frames_in"] == pytest.approx(400 / 3)


def test_watched_server_samples() -> None:
    text = "\n".join(
        (
            "# HELP chargegw_frames_throttled_total Times reads were paused",
            'chargegw_frames_throttled_total{scope="connection"} 3.0',
            'chargegw_frames_throttled_total{scope="process"} 4.0',
            'chargegw_frames_throttled_created{scope="process"} 1.7e9',
            "chargegw_reads_paused 12.0",
            'chargegw_event_loop_lag_seconds_bucket{worker="0",le="0.1"} 9.0',
            'chargegw_event_loop_lag_seconds_sum{worker="0"} 0.5',
            'chargegw_event_loop_lag_seconds_count{worker="0"} 10.0',
            'chargegw_frames_total{protocol="bkv",direction="in",command="x"} 99.0',
        )
    )
    assert overload.server_samples(text) == {
        "chargegw_frames_throttled_total": 7.0,
        "chargegw_reads_paused": 12.0,
        "chargegw_event_loop_lag_seconds_sum": 0.5,
        "chargegw_event_loop_lag_seconds_count": 10.0,
    }


# --- the recovery verdict -----------------------------------------------------------------------


def _p99s(start: int, values: list[float | None]) -> list[tuple[float, float | None]]:
    return [(float(start + i), value) for i, value in enumerate(values)]


def test_round_trip_recovered_when_five_seconds_stay_under_the_limit() -> None:
    drop = 100.4
    # window ends 101.. : the window ending at 101 straddles the drop
    p99s = _p99s(99, [900.0, 950.0, 800.0, 300.0, 120.0, 90.0, 80.0, 70.0, 60.0, 50.0, 40.0])
    # under 100 ms from the window (103, 104] on, five seconds held at 108
    assert overload.rtt_recovered_after(p99s, drop, 140.0) == pytest.approx(2.6)
    assert overload.rtt_recovered_after(p99s, drop, 108.0) == pytest.approx(2.6)
    assert overload.rtt_recovered_after(p99s, drop, 107.5) is None  # the recovery ended first


def test_a_relapse_restarts_the_hold() -> None:
    values: list[float | None] = [50.0, 50.0, 50.0, 150.0, 50.0, 50.0, 50.0, 50.0, 50.0]
    p99s = _p99s(101, values)
    assert overload.rtt_recovered_after(p99s, 100.0, 200.0) == pytest.approx(4.0)


def test_recovered_at_once_counts_from_the_drop() -> None:
    p99s = _p99s(101, [10.0] * 10)
    assert overload.rtt_recovered_after(p99s, 100.5, 200.0) == 0.0


def test_no_answer_or_a_missing_second_is_not_a_recovery() -> None:
    silent: list[float | None] = [50.0, 50.0, None, 50.0, 50.0, 50.0, 50.0]
    assert overload.rtt_recovered_after(_p99s(101, silent), 100.0, 200.0) is None
    gap = [*_p99s(101, [50.0, 50.0, 50.0]), *_p99s(106, [50.0, 50.0, 50.0])]
    assert overload.rtt_recovered_after(gap, 100.0, 200.0) is None
    assert overload.rtt_recovered_after(_p99s(101, [500.0] * 30), 100.0, 200.0) is None
    assert overload.rtt_recovered_after([], 100.0, 200.0) is None


# --- the generator: rate changes and round trips, on a fake clock ------------------------------


class _Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Loop:
    """The part of an event loop the timer wheel uses, with a clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[tuple[float, int, Callable[[], None], _Handle]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle()
        heapq.heappush(self._timers, (self.now + delay, next(self._order), callback, handle))
        return handle

    def advance_to(self, t: float) -> None:
        while self._timers and self._timers[0][0] <= t:
            when, _, callback, handle = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not handle.cancelled:
                callback()
        self.now = t


def _generator(loop: _Loop, **config: Any) -> Generator:
    values = {"host": "127.0.0.1", "port": 9, "jitter": 0.0, "accel": 10.0, **config}
    return Generator(GeneratorConfig(**values), lambda item: None, loop=loop)  # type: ignore[arg-type]


def test_a_rate_change_moves_every_pending_beat_and_the_ones_after() -> None:
    loop = _Loop()
    gen = _generator(loop, ap3000_count=2, bkv_count=1)
    ap1, ap2, gw = gen.piles
    for pile, delay in ((ap1, 3.0), (ap2, 12.0), (gw, 1.5)):
        pile.state = CONNECTED
        gen.wheel.schedule(pile, delay)
    start = loop.now
    assert gen.set_rate(30.0) == 3  # three times faster: a third of the time left
    assert [p.due - start for p in gen.piles] == pytest.approx([1.0, 4.0, 0.5])
    loop.advance_to(start + 1.2)
    assert gen.counters.heartbeats == 2  # ap1 at +1.0, the gateway at +0.5
    # the next beats at the new interval (AP3000 180 s / 30, BKV 60 s / 30), counted from
    # when the beat was due, not from the tick that fired it
    assert ap1.due == pytest.approx(start + 1.0 + 6.0)
    assert gw.due == pytest.approx(start + 0.5 + 2.0)
    loop.advance_to(start + 3.05)  # ap1's old moment: its stale entry does not fire
    assert gen.counters.heartbeats == 3  # only the gateway's second beat
    # slower again: six times the time left
    now = loop.now
    left = ap2.due - now
    gen.set_rate(5.0)
    assert ap2.due - now == pytest.approx(left * 6.0)
    loop.advance_to(now + left * 6.0 - 0.1)
    beats = gen.counters.heartbeats
    loop.advance_to(now + left * 6.0 + 0.1)
    assert gen.counters.heartbeats == beats + 1
    with pytest.raises(ValueError):
        gen.set_rate(0.0)


def test_heartbeat_replies_are_matched_to_their_heartbeats() -> None:
    loop = _Loop()
    gen = _generator(loop, ap3000_count=1, bkv_count=1)
    ap, gw = gen.piles
    for hb_id in (1, 2, 3):
        ap.heartbeat_sent(hb_id)
    assert gen.counters.heartbeats_unanswered == 2
    assert ap.awaited() == 3
    ap.heartbeat_answered(2)  # 1 is given up; 2 is measured
    assert ap.awaited() == 1 and gen.rtt_window.total == 1
    ap.heartbeat_answered(77)  # a heartbeat the pile sent to answer a query
    assert ap.awaited() == 1 and gen.rtt_window.total == 1
    ap.heartbeat_answered(3)
    assert ap.awaited() == 0 and gen.rtt_window.total == 2
    for _ in range(3):
        gw.heartbeat_sent(0)
    for expected in (2, 1, 0, 0):  # BKV replies echo seq 0: oldest first
        gw.heartbeat_answered(None)
        assert gw.awaited() == expected
    assert gen.rtt_window.total == 5 and gen.rtt.total == 5
    lines: list[dict[str, Any]] = []
    gen.out = lines.append
    gen.flush(1234.0)
    (line,) = lines
    assert line["window_end"] == 1234.0 and line["heartbeats_awaited"] == 0
    assert Histogram.from_json(line["rtt_window"]).total == 5
    assert gen.rtt_window.total == 0 and gen.rtt.total == 5  # the window starts afresh
