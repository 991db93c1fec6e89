"""The load-test harness: correctness only (templates, baseline replies, small real runs).

Never timing: the runs are 30 piles for a few seconds and assert on what must hold at any
speed (every pile connected, no decode error, a probe acknowledged end to end).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
from typing import Any

import pytest

from chargeproto import MessageReceived, StreamDecoder, ap3000, bkv
from chargesim.loadtest import frames
from chargesim.loadtest.baseline import BaselineLink, BaselineServer
from chargesim.loadtest.runner import (
    LoadOptions,
    LoadTestError,
    parse_addrs,
    plan_generators,
    run_loadtest,
)
from chargesim.loadtest.stats import Histogram, percentiles

# --- templates ---------------------------------------------------------------------------


@pytest.mark.parametrize(("ports", "sockets"), [(1, 1), (2, 2), (10, 4), (16, 16)])
@pytest.mark.parametrize("number", [1, 4321, 999_999])
def test_patched_frames_equal_chargeproto_encoding(ports: int, sockets: int, number: int) -> None:
    frames.check_templates(frames.Ap3000Frames(ports), frames.BkvFrames(sockets), number)


def test_templates_patch_msg_ids_across_the_wrap() -> None:
    ap = frames.Ap3000Frames(2)
    phy_id, phy, _ = frames.ap3000_identity(77, 2)
    for msg_id in (0, 1, 0xFF, 0x100, 0xFFFF):
        built = ap.heartbeat.build(phy, msg_id)
        assert bytes(built) == ap3000.encode(frames.ap3000_heartbeat(phy_id, msg_id, 2))


# --- the baseline's replies --------------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def _feed(link: BaselineLink, data: bytes, chunk: int) -> None:
    for at in range(0, len(data), chunk):
        piece = data[at : at + chunk]
        link.server.view[: len(piece)] = piece
        link.buffer_updated(len(piece))


def _decoded(data: bytes) -> list[Any]:
    events = StreamDecoder("down").feed(data)
    assert all(isinstance(e, MessageReceived) for e in events), events
    return [e.message for e in events]  # type: ignore[union-attr]


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_baseline_answers_ap3000_as_chargeproto_would(chunk: int) -> None:
    link = BaselineLink(BaselineServer())
    transport = _Transport()
    link.connection_made(transport)  # type: ignore[arg-type]
    phy_id, _, iccid = frames.ap3000_identity(42, 2)
    stream = b"".join(
        (
            iccid,
            ap3000.encode(frames.ap3000_registration(phy_id, 7, 2)),
            ap3000.encode(ap3000.TimeRequest(phy_id, 8)),
            b"link",
            ap3000.encode(frames.ap3000_heartbeat(phy_id, 0xFFFF, 2)),
            ap3000.encode(ap3000.LocateReply(phy_id, 9, result=0)),  # not answered
        )
    )
    before = int(time.time())
    _feed(link, stream, chunk)
    replies = _decoded(bytes(transport.data))
    assert [type(m) for m in replies] == [
        ap3000.RegistrationReply,
        ap3000.TimeReply,
        ap3000.HeartbeatReply,
    ]
    assert replies[0] == ap3000.RegistrationReply(phy_id, 7, result=0)
    assert replies[2] == ap3000.HeartbeatReply(phy_id, 0xFFFF, result=0)
    assert replies[1].msg_id == 8 and before <= replies[1].timestamp_unix <= time.time() + 1
    assert link.server.counters.frames_in == 4
    assert link.server.counters.bad_frames == link.server.counters.garbage_bytes == 0


@pytest.mark.parametrize("chunk", [1, 13, 4096])
def test_baseline_answers_bkv_as_chargeproto_would(chunk: int) -> None:
    link = BaselineLink(BaselineServer())
    transport = _Transport()
    link.connection_made(transport)  # type: ignore[arg-type]
    gateway_id = frames.bkv_identity(3)[0]
    cluster = frames.bkv_status_cluster(gateway_id, 2)
    stream = b"".join(
        (
            bkv.encode(frames.bkv_heartbeat(gateway_id)),
            bkv.encode(frames.bkv_connect_report(gateway_id, 1, dt.datetime(2026, 1, 2, 3, 4, 5))),
            bkv.encode(cluster),
        )
    )
    _feed(link, stream, chunk)
    replies = _decoded(bytes(transport.data))
    assert [type(m) for m in replies] == [bkv.HeartbeatReply, bkv.StatusClusterAck]
    heartbeat_reply, ack = replies
    assert heartbeat_reply.gateway_id == gateway_id and heartbeat_reply.seq == 0
    server_time = dt.datetime.fromisoformat(heartbeat_reply.server_time)
    now = dt.datetime.now(dt.timezone(dt.timedelta(hours=8))).replace(tzinfo=None)
    assert abs((server_time - now).total_seconds()) < 5
    # byte for byte what the gateway's driver sends (drivers/bkv.py: _ack)
    expected = bkv.StatusClusterAck.create(
        gateway_id,
        0,
        bkv_seq=cluster.bkv_seq,
        bkv_gateway_id=cluster.bkv_gateway_id,
        result=1,
    )
    assert ack == expected
    assert bkv.encode(ack) == bkv.encode(expected)


def test_baseline_skips_garbage_and_bad_checksums() -> None:
    link = BaselineLink(BaselineServer())
    transport = _Transport()
    link.connection_made(transport)  # type: ignore[arg-type]
    phy_id, _, _ = frames.ap3000_identity(5, 2)
    good = ap3000.encode(frames.ap3000_heartbeat(phy_id, 3, 2))
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    _feed(link, b"\x00\x01zz" + bytes(bad) + good, 4096)
    assert _decoded(bytes(transport.data)) == [ap3000.HeartbeatReply(phy_id, 3, result=0)]
    assert link.server.counters.bad_frames == 1


# --- planning and statistics -------------------------------------------------------------


def test_source_address_ranges() -> None:
    assert parse_addrs("127.0.0.2-127.0.0.4,127.0.1.1") == (
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.1.1",
    )
    with pytest.raises(LoadTestError):
        parse_addrs("127.0.0.9-127.0.0.2")


def test_generators_split_the_fleet_without_overlap() -> None:
    opts = LoadOptions(piles=1001, bkv_share=0.3, generators=3, start="baseline")
    configs = plan_generators(opts, "127.0.0.1", 9)
    assert sum(c.ap3000_count for c in configs) == opts.ap3000_piles == 701
    assert sum(c.bkv_count for c in configs) == opts.bkv_piles == 300
    for before, after in itertools.pairwise(configs):
        assert after.ap3000_start == before.ap3000_start + before.ap3000_count
        assert after.bkv_start == before.bkv_start + before.bkv_count
        assert after.addr_offset == before.addr_offset + before.piles
    too_many = LoadOptions(piles=50_000, generators=1, start="baseline")
    with pytest.raises(LoadTestError, match="open-file limit"):
        plan_generators(too_many, "127.0.0.1", 9)


def test_histogram_and_percentiles() -> None:
    hist = Histogram()
    for value in range(1, 101):
        hist.add(float(value))
    merged = Histogram.from_json(hist.to_json())
    merged.merge(hist)
    assert merged.total == 200 and merged.max == 100.0
    p50 = merged.percentile(50)
    assert p50 is not None and 50.0 <= p50 <= 53.0
    assert percentiles([3.0, 1.0, 2.0]) == {"count": 3, "p50": 2.0, "p99": 3.0, "max": 3.0}


# --- small real runs ---------------------------------------------------------------------

_REPORT_KEYS = {
    "server",
    "piles",
    "connections",
    "steady",
    "server_processes",
    "memory",
    "frames",
    "database",
    "errors",
    "heartbeat_rtt_ms",
    "storm",
    "latency",
    "generators",
    "timeline",
}


def _small(**overrides: Any) -> LoadOptions:
    values: dict[str, Any] = {
        "piles": 30,
        "bkv_share": 0.3,
        "duration_s": 6.0,
        "ramp_s": 1.0,
        "settle_s": 3.0,
        "accel": 60.0,
        "source_addrs": ("127.0.0.2", "127.0.0.3"),
        "report": None,
        "quiet": True,
        **overrides,
    }
    return LoadOptions(**values)


def _check_run(run: dict[str, Any], piles: int) -> None:
    assert set(run) >= _REPORT_KEYS
    assert run["connections"]["held_min"] == run["connections"]["held_max"] == piles
    assert run["connections"]["all_online_after_s"] is not None
    errors = run["errors"]
    assert errors["decode_errors"] == 0
    assert errors["unintended_disconnects"] == 0
    assert errors["unexpected_input"] == 0
    assert run["frames"]["to_server_per_s"] > 0 and run["frames"]["from_server_per_s"] > 0
    assert run["heartbeat_rtt_ms"]["count"] > 0
    assert run["memory"]["server_rss_kib_steady"] > 0
    assert run["server_processes"]


async def test_run_against_the_baseline_with_a_storm(tmp_path: Any) -> None:
    report_path = tmp_path / "report.json"
    opts = _small(
        start="baseline",
        workers=2,
        storm_at_s=3.5,
        storm_window_s=1.0,
        report=str(report_path),
    )
    report = await asyncio.wait_for(run_loadtest(opts, argv=["chargegw", "loadtest"]), 60)
    assert {"command", "date", "machine", "versions", "options", "runs"} <= set(report)
    assert report_path.exists()
    run = report["runs"]["baseline"]
    _check_run(run, 30)
    assert len(run["server_processes"]) == 2  # SO_REUSEPORT: parent and one child
    storm = run["storm"]
    assert storm["dropped"] == 30 and storm["back_online"] == 30
    assert storm["all_back_after_s"] is not None
    assert run["errors"]["heartbeats_unanswered"] == 0


async def test_run_against_chargegw_with_latency_probes(db_dsn: str) -> None:
    opts = _small(start="chargegw", dsn=db_dsn, latency_probes=3, duration_s=9.0)
    report = await asyncio.wait_for(run_loadtest(opts, argv=["chargegw", "loadtest"]), 120)
    run = report["runs"]["chargegw"]
    _check_run(run, 30)
    assert run["database"]["rows_per_s"] > 0
    latency = run["latency"]
    assert latency["probes"] == 3
    assert latency["outcomes"] == {"acked": 3}
    legs = latency["legs_ms"]
    assert legs["total"]["count"] == legs["api_to_pile"]["count"] == 3
    for item in latency["items"]:
        assert item["t_api"] <= item["pile_received"] <= item["pile_replied"]
        assert item["pile_replied"] <= item["finished_at"] + 0.05
