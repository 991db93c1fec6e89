"""The HTTP load of the load test (chargesim.loadtest.http): its schedule, its client's
response parser, the report's aggregation, and one small run against a real chargegw.
No timing: speed belongs to ``nox -s load-http``."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import itertools
from pathlib import Path

import pytest

from chargesim.loadtest import http
from chargesim.loadtest.http import (
    DETAIL,
    LIST,
    ORDERS,
    START,
    STOP,
    Fleet,
    HttpError,
    HttpLoadSpec,
    ResponseParser,
)
from chargesim.loadtest.markdown import write_section
from chargesim.loadtest.runner import LoadOptions, run_loadtest
from chargesim.loadtest.stats import Histogram

# --- the spec and the schedule -------------------------------------------------------------


def test_spec_parses_keys_and_keeps_defaults() -> None:
    assert http.parse_spec("default") == HttpLoadSpec()
    assert http.parse_spec("") == HttpLoadSpec()
    spec = http.parse_spec("detail=200, start=5,stop-after=0,duration=30,processes=2,page=10")
    assert spec.detail_rate == 200.0 and spec.start_rate == 5.0
    assert spec.stop_after_s == 0.0 and spec.duration_s == 30.0
    assert spec.processes == 2 and spec.page == 10
    assert spec.list_rate == HttpLoadSpec().list_rate
    assert spec.rates()[STOP] == 0.0  # no stops without stop_after


@pytest.mark.parametrize(
    "text",
    ["detail", "speed=3", "detail=fast", "detail=-1", "duration=0", "page=0", "processes=0",
     "detail=0,list=0,orders=0,start=0", "timeout=0", "connections=0"],
)  # fmt: skip
def test_spec_refuses_what_cannot_run(text: str) -> None:
    with pytest.raises(ValueError):
        http.parse_spec(text)


def test_arrivals_keep_a_fixed_rate_within_the_duration() -> None:
    times = [t for t, _ in http.arrival_times(50.0, 2.0, phase=0.25)]
    assert len(times) == http.arrival_count(50.0, 2.0, 0.25) == 100
    assert times[0] == pytest.approx(0.25 / 50)
    assert all(b - a == pytest.approx(1 / 50) for a, b in itertools.pairwise(times))
    assert times[-1] < 2.0
    assert list(http.arrival_times(0.0, 10.0)) == []
    assert http.arrival_count(0.0, 10.0) == 0


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_workers_share_the_arrivals_exactly(workers: int) -> None:
    whole = list(http.arrival_times(33.0, 3.0, phase=0.5))
    parts = [list(http.arrival_times(33.0, 3.0, worker=k, workers=workers, phase=0.5))
             for k in range(workers)]  # fmt: skip
    merged = sorted(itertools.chain.from_iterable(parts))
    assert merged == whole
    for k, part in enumerate(parts):  # each takes every workers-th arrival: evenly spaced
        assert all(j % workers == k for _, j in part)


def test_schedule_is_time_ordered_and_matches_the_plan() -> None:
    spec = HttpLoadSpec(
        detail_rate=100, list_rate=4, orders_rate=2, start_rate=10, stop_after_s=1.5, duration_s=5
    )
    arrivals = list(http.schedule(spec))
    assert [a.t for a in arrivals] == sorted(a.t for a in arrivals)
    counts = collections.Counter(a.endpoint for a in arrivals)
    assert counts == http.planned(spec)
    assert counts == {DETAIL: 500, LIST: 20, ORDERS: 10, START: 50, STOP: 35}
    assert all(0 <= a.t < spec.duration_s for a in arrivals)
    starts = {a.seq: a.t for a in arrivals if a.endpoint == START}
    for stop in (a for a in arrivals if a.endpoint == STOP):  # the same port, 1.5 s later
        assert stop.t == pytest.approx(starts[stop.seq] + 1.5)


def test_schedule_split_over_processes_is_the_same_load() -> None:
    spec = HttpLoadSpec(detail_rate=90, start_rate=9, duration_s=4, processes=3)
    whole = sorted(http.schedule(spec), key=lambda a: (a.t, a.endpoint))
    parts = [list(http.schedule(spec, k, 3)) for k in range(3)]
    assert sorted(itertools.chain.from_iterable(parts), key=lambda a: (a.t, a.endpoint)) == whole


def test_fleet_ids_and_distinct_control_targets() -> None:
    fleet = Fleet(id_start=1, ap3000=3, ap3000_ports=2, bkv=2, bkv_sockets=2)
    ids = fleet.device_ids()
    assert len(ids) == 3 + 2 * 2 and len(set(ids)) == len(ids)
    assert ids[0] == "04000001"  # as the load piles register (runner._probe_targets)
    assert ids[3].endswith("-1") and ids[4].endswith("-2")
    targets = fleet.control_targets(seed=1)
    assert len(targets) == len(set(targets)) == 3 * 2 + 4 * 2
    assert targets == fleet.control_targets(seed=1) != fleet.control_targets(seed=2)
    assert {port for _, port in targets} == {1, 2}


# --- the client ------------------------------------------------------------------------------

_OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"a": true}'
_CHUNKED = (
    b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'4;ext=1\r\n{"co\r\n7\r\nmmand":\r\n3\r\n 7}\r\n0\r\nX-Trailer: 1\r\n\r\n'
)


@pytest.mark.parametrize("size", [1, 2, 5, 17, 1000])
def test_parser_reads_responses_in_any_chunks(size: int) -> None:
    data = _OK + _CHUNKED + _OK
    parser = ResponseParser()
    got = []
    for at in range(0, len(data), size):
        got.extend(parser.feed(data[at : at + size]))
    assert [r.status for r in got] == [200, 202, 200]
    assert got[0].body == b'{"a": true}' and got[0].headers["content-type"] == "application/json"
    assert got[1].body == b'{"command": 7}'
    assert all(r.keep_alive for r in got)
    assert parser.eof() is None


def test_parser_skips_interim_and_reads_bodiless_and_close_delimited() -> None:
    parser = ResponseParser()
    got = parser.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
    assert [(r.status, r.body) for r in got] == [(204, b"")]
    assert parser.feed(b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\npart one, ") == []
    assert parser.feed(b"part two") == []
    last = parser.eof()
    assert last is not None and last.body == b"part one, part two" and not last.keep_alive


def test_parser_joins_repeated_headers_case_insensitively() -> None:
    (response,) = ResponseParser().feed(
        b"HTTP/1.1 429 Too Many\r\nVary: a\r\nVARY: b\r\nContent-Length: 0\r\n\r\n"
    )
    assert response.status == 429 and response.headers["vary"] == "a, b"


@pytest.mark.parametrize(
    "data",
    [
        b"SMTP 220 hello\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd",
    ],
)
def test_parser_refuses_what_is_not_http(data: bytes) -> None:
    with pytest.raises(HttpError):
        ResponseParser().feed(data)


def test_parser_says_when_a_response_is_cut_short() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc") == []
    with pytest.raises(HttpError):
        parser.eof()


def test_requests_are_keep_alive_http11() -> None:
    get = http.build_request("GET", "/api/v1/devices?limit=5", "127.0.0.1:80", [("A", "b")])
    assert get == b"GET /api/v1/devices?limit=5 HTTP/1.1\r\nHost: 127.0.0.1:80\r\nA: b\r\n\r\n"
    post = http.build_request("POST", "/x", "h", body=b'{"mode":"full"}')
    head, body = post.split(b"\r\n\r\n")
    assert b"Content-Length: 15" in head and b"Content-Type: application/json" in head
    assert body == b'{"mode":"full"}'
    empty = http.build_request("POST", "/stop", "h")
    assert empty.endswith(b"Content-Length: 0\r\n\r\n")


def test_worker_builds_each_endpoints_request() -> None:
    spec = HttpLoadSpec(page=25)
    fleet = Fleet(id_start=1, ap3000=2, ap3000_ports=2, bkv=1, bkv_sockets=1)
    config = http.WorkerConfig(spec, "http://127.0.0.1:8080", fleet)
    assert http.WorkerConfig.from_json(config.to_json()) == config
    worker = http.Worker(config, key="k1")
    detail, _, _ = worker.request_for(http.Arrival(0.0, DETAIL, 0))
    assert detail.startswith(b"GET /api/v1/devices/") and b"Authorization: Bearer k1" in detail
    worker.cursor = "abc="
    listing, _, _ = worker.request_for(http.Arrival(0.0, LIST, 0))
    assert listing.startswith(b"GET /api/v1/devices?limit=25&cursor=abc%3D HTTP/1.1")
    orders, _, _ = worker.request_for(http.Arrival(0.0, ORDERS, 0))
    assert orders.startswith(b"GET /api/v1/orders?limit=25 ")
    start, device, port = worker.request_for(http.Arrival(0.0, START, 3))
    stop, device2, port2 = worker.request_for(http.Arrival(5.0, STOP, 3))
    assert (device, port) == (device2, port2) == worker.targets[3]
    assert start.startswith(f"POST /api/v1/devices/{device}/ports/{port}/start ".encode())
    assert start.endswith(b'{"mode":"full"}')
    assert stop.startswith(f"POST /api/v1/devices/{device}/ports/{port}/stop ".encode())


# --- the report ------------------------------------------------------------------------------


def _result(**overrides: object) -> dict[str, object]:
    result: dict[str, object] = {
        "scheduled": {DETAIL: 4, START: 2, STOP: 2},
        "latency_ms": {DETAIL: [1.0, 2.0, 3.0], START: [10.0, 20.0], STOP: [5.0]},
        "statuses": {DETAIL: {"200": 2, "500": 1, "timeout": 1}, START: {"202": 2},
                     STOP: {"409": 1, "ConnectionResetError": 1}},
        "commands": [],
        "lag_ms": {"count": 8, "p50": 0.1, "p90": 0.2, "p99": 0.3, "max": 0.4},
        "cpu_s": 1.5,
        "wall_s": 10.0,
        "connections_opened": 3,
        "connections_retried": 0,
    }  # fmt: skip
    result.update(overrides)
    return result


def test_quantiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    q = http.quantiles(reversed(values))
    assert q == {"count": 100, "p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert http.quantiles([]) == {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}


def test_endpoint_report_merges_processes_and_separates_errors() -> None:
    spec = HttpLoadSpec(detail_rate=0.4, list_rate=0, orders_rate=0, start_rate=0.2)
    out = http.endpoint_report(spec, [_result(), _result()], window_s=10.0)
    assert list(out) == [DETAIL, START, STOP]  # endpoints without a rate are left out
    detail = out[DETAIL]
    assert detail["scheduled"] == 8 and detail["sent_per_s"] == 0.8
    assert detail["answered_per_s"] == 0.6 and detail["ok"] == 4
    assert detail["latency_ms"]["count"] == 6 and detail["latency_ms"]["max"] == 3.0
    assert detail["statuses"] == {"200": 4, "500": 2, "timeout": 2}
    assert detail["errors"] == {"500": 2, "timeout": 2}
    assert out[STOP]["errors"] == {"ConnectionResetError": 2}  # 409 after a refused start: ok
    assert out[STOP]["ok"] == 2 and out[START]["errors"] == {}


def test_ack_report_times_from_the_due_moment_to_the_answer() -> None:
    t = 1_700_000_000.0

    def at(epoch: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(epoch, dt.UTC)

    commands = [
        {"kind": START, "command_id": 1, "t_api": t},
        {"kind": START, "command_id": 2, "t_api": t},
        {"kind": START, "command_id": 3, "t_api": t},
        {"kind": START, "command_id": 4, "t_api": t},
        {"kind": STOP, "command_id": 5, "t_api": t},
    ]
    rows = {
        1: {"status": "failed", "sent_at": at(t + 0.01), "finished_at": at(t + 0.03)},
        2: {"status": "acked", "sent_at": at(t + 0.02), "finished_at": at(t + 0.05)},
        3: {"status": "dead", "sent_at": None, "finished_at": at(t + 9)},
        5: {"status": "sent", "sent_at": "2023-11-14T22:13:20.5+00:00", "finished_at": None},
    }  # fmt: skip
    out = http.ack_report(commands, rows)
    start = out[START]
    assert start["accepted"] == 4
    assert start["outcomes"] == {"acked": 1, "dead": 1, "failed": 1, "no row": 1}
    assert start["api_to_answer_ms"]["count"] == 2  # a dead command was not answered
    assert start["api_to_answer_ms"]["p50"] == pytest.approx(30.0, abs=0.01)
    assert start["api_to_answer_ms"]["max"] == pytest.approx(50.0, abs=0.01)
    assert start["api_to_sent_ms"]["count"] == 2
    assert out[STOP]["outcomes"] == {"sent": 1}
    assert out[STOP]["api_to_sent_ms"]["p50"] == pytest.approx(500.0, abs=0.01)


def test_round_trips_between_two_marks() -> None:
    before, after = Histogram(), Histogram()
    for value in (1.0, 2.0, 300.0):
        before.add(value)
        after.add(value)
    for value in [1.0] * 98 + [40.0, 50.0]:
        after.add(value)
    window = http.rtt_between(before, after)
    assert window.total == 100
    assert window.percentile(50) == pytest.approx(1.0, rel=0.05)
    assert window.percentile(99) == pytest.approx(40.0, rel=0.05)
    # the 300 ms was before the window: its max is the top bucket's edge, not 300
    assert window.max == pytest.approx(50.0, rel=0.05)
    after.add(500.0)
    assert http.rtt_between(before, after).max == 500.0
    marks = http.window_rtt(Histogram(), before, after, before_s=15.0)
    assert marks["before"]["count"] == 3 and marks["during"]["count"] == 101


def _report(http_load: dict[str, object]) -> dict[str, object]:
    return {
        "command": "python -m chargesim.loadtest --http-load default",
        "date": "2025-01-01T00:00:00+00:00",
        "machine": {"cpu_model": "cpu", "cores": 2, "memory_gib": 24.0},
        "versions": {"python": "3.12", "postgresql": "16"},
        "runs": {"chargegw": {"piles": {"ap3000": 8, "bkv": 2}, "http_load": http_load}},
    }


def test_report_renders_its_own_section(tmp_path: Path) -> None:
    spec = HttpLoadSpec(detail_rate=0.4, list_rate=0, orders_rate=0, start_rate=0.2, duration_s=10)
    t = 1_700_000_000.0
    result = _result(commands=[{"kind": START, "command_id": 1, "t_api": t}])
    rows = {1: {"status": "failed", "sent_at": None, "finished_at": dt.datetime.fromtimestamp(
        t + 0.02, dt.UTC)}}  # fmt: skip
    rtt = http.window_rtt(Histogram(), Histogram(), Histogram(), 15.0)
    load = http.http_report(spec, [result], rows, rtt=rtt, server_cpu_percent=(20.0, 80.0))
    assert load["client"]["cpu_percent"] == [15.0]
    # 60 % of a core more for 6 answers in 10 s: 1 s of CPU each
    assert load["server_cpu_ms_per_request"] == pytest.approx(1000.0)
    assert load["commands"][START]["outcomes"] == {"failed": 1}
    lines = http.summary_lines(load)
    assert any("device_detail" in line for line in lines)
    target = tmp_path / "bench.md"
    target.write_text(f"# B\n\nkeep\n\n{http.BEGIN}\nold\n{http.END}\n\ntail\n")
    http.update_section(target, _report(load))
    text = target.read_text()
    assert "old" not in text and text.startswith("# B\n\nkeep") and text.endswith("tail\n")
    assert "| device_detail | 0.4 |" in text and "| start | 1 | failed 1 |" in text
    write_section(target, "<!-- x:begin -->", "<!-- x:end -->", "new")  # appended
    assert target.read_text().endswith("<!-- x:begin -->\nnew\n<!-- x:end -->\n")


def test_report_of_a_load_that_did_not_run() -> None:
    assert http.summary_lines({"error": "no time"}) == ["  HTTP load: no time"]
    assert "did not run: no time" in http.render(_report({"error": "no time"}))


# --- a whole run (real chargegw, real piles; what is checked does not depend on speed) ---


async def test_run_with_an_http_load(db_dsn: str) -> None:
    spec = HttpLoadSpec(
        detail_rate=20,
        list_rate=2,
        orders_rate=2,
        start_rate=2,
        stop_after_s=1.0,
        duration_s=3.0,
        delay_s=1.0,
        page=5,
        timeout_s=5.0,
    )
    opts = LoadOptions(
        piles=30,
        bkv_share=0.3,
        duration_s=20.0,
        ramp_s=1.0,
        settle_s=3.0,
        accel=60.0,
        source_addrs=("127.0.0.2", "127.0.0.3"),
        report=None,
        quiet=True,
        start="chargegw",
        dsn=db_dsn,
        http_load=spec,
    )
    report = await asyncio.wait_for(run_loadtest(opts, argv=["loadtest"]), 120)
    load = report["runs"]["chargegw"]["http_load"]
    assert "error" not in load, load
    endpoints = load["endpoints"]
    assert list(endpoints) == [DETAIL, LIST, ORDERS, START, STOP]
    assert endpoints[DETAIL]["scheduled"] == 60 and endpoints[START]["scheduled"] == 6
    for name, block in endpoints.items():
        assert block["errors"] == {}, (name, block["statuses"])
        assert block["latency_ms"]["count"] == block["scheduled"] > 0
    assert endpoints[START]["statuses"] == {"202": 6}
    start = load["commands"][START]
    assert start["accepted"] == 6
    assert set(start["outcomes"]) <= {"failed", "acked"}  # every start answered by its pile
    assert start["api_to_answer_ms"]["count"] == 6
    rtt = load["heartbeat_rtt_ms"]
    assert rtt["before"]["count"] > 0 and rtt["during"]["count"] > 0
    assert load["client"]["processes"] == 1
