"""``chargegw replay``: export -> replay yields no difference, a changed reply yields
exactly that difference, bad lines are reported and the rest replayed,
``--record-baseline`` round trip, and a live target is refused."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from chargegw.app import Gateway
from chargegw.capture import parse_lines, read_capture, write_capture
from chargegw.cli import main
from chargegw.replay.engine import live_refusal, replay
from chargegw.replay.report import Outcome, ReplayReport
from chargeproto import ap3000, bkv
from chargesim import SimulatedAp3000Pile, Simulator
from chargesim.bkv import BkvIntervals, SimulatedBkvGateway

from .conftest import settings_for
from .waiting import eventually, eventually_json

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "captures"
VENDOR = CORPUS / "vendor_ap3000.jsonl"
PILE = "04000001"
SOCKET = "82231214000001-1"


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.2}


def _outcomes(report: ReplayReport) -> dict[str, set[Outcome]]:
    """The outcomes per reply class name."""
    out: dict[str, set[Outcome]] = {}
    for result in report.connections:
        for reply in result.replies:
            out.setdefault(reply.key.split()[1], set()).add(reply.outcome)
    return out


@pytest.fixture
def heartbeat_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deliberate change: the gateway answers every AP3000 heartbeat with result 1."""
    encode = ap3000.encode

    def changed(message: Any, *args: Any, **kwargs: Any) -> bytes:
        if isinstance(message, ap3000.HeartbeatReply):
            message = dataclasses.replace(message, result=1)
        return encode(message, *args, **kwargs)

    monkeypatch.setattr(ap3000, "encode", changed)


async def _known(gateway: Gateway, device: str) -> None:
    async def stored() -> bool:
        await gateway.writer.drained()
        assert gateway.pool is not None
        row = await gateway.pool.fetchval("SELECT 1 FROM devices WHERE device_id = $1", device)
        return bool(row) and gateway.sessions.link_of(device) is not None

    await eventually(stored, what=f"{device} connected and stored")


async def test_export_then_replay_yields_no_difference(
    gateway: Gateway, api: httpx.AsyncClient, pg_server_dsn: str
) -> None:
    export = pytest.importorskip(
        "chargegw.ops.frames_export", reason="needs the audit-log export (chargegw frames export)"
    )
    export_frames = export.export_frames

    since = datetime.now(UTC) - timedelta(seconds=1)
    pile = SimulatedAp3000Pile(PILE, ports=2, heartbeat_s=180)
    box = SimulatedBkvGateway(
        SOCKET.split("-", maxsplit=1)[0],
        sockets=1,
        heartbeat_s=600,
        intervals=BkvIntervals(status_s=60, end_report_resend_s=60),
    )
    sim = Simulator("127.0.0.1", gateway.server.port, [pile, box], accel=120, jitter=0, seed=1)
    async with sim:
        await _known(gateway, PILE)
        await _known(gateway, SOCKET)
        for device in (PILE, SOCKET):
            response = await api.post(
                f"/api/v1/devices/{device}/ports/1/start",
                json={"mode": "time", "duration_min": 2},
            )
            assert response.status_code == 202, response.text
            order_no = response.json()["order_no"]
            await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"})

        def every_end_report_answered() -> bool:
            # a copy resent before the first ACK arrived is answered too: closing before
            # that answer is written would leave a report without its reply in the capture
            acks = box.received_messages(bkv.CardEndAck) + box.received_messages(bkv.FeeModeEndAck)
            return len(acks) >= box.bkv_stats.end_reports_sent

        await eventually(every_end_report_answered, what="an answer to every end report sent")
    await gateway.writer.drained()
    assert gateway.pool is not None
    async with gateway.pool.acquire() as conn:
        frames, state = await export_frames(
            conn,
            device_ids=[PILE, SOCKET.split("-", maxsplit=1)[0], SOCKET],
            since=since,
            until=datetime.now(UTC),
        )
    text = io.StringIO()
    write_capture(text, frames, state=state)
    capture = parse_lines(text.getvalue().splitlines())
    assert not capture.problems and capture.state is not None

    report = await replay(capture, dsn=pg_server_dsn)

    assert not report.differs, "\n".join(report.lines())
    counts = report.summary()
    assert counts["identical"] + counts["volatile"] >= 8
    # the API's start commands are the server's own: listed, not compared
    assert counts["not_compared"] >= 2
    assert report.state_note is None and report.state_differences == []


async def test_a_changed_reply_is_exactly_that_difference(
    pg_server_dsn: str, heartbeat_refused: None
) -> None:
    report = await replay(read_capture(VENDOR), dsn=pg_server_dsn)

    assert report.differs
    outcomes = _outcomes(report)
    assert outcomes.pop("HeartbeatReply") == {Outcome.DIFFERENT}
    assert all(found <= {Outcome.IDENTICAL, Outcome.VOLATILE} for found in outcomes.values())
    (changed,) = [
        reply
        for c in report.connections
        for reply in c.replies
        if reply.outcome is Outcome.DIFFERENT
    ]
    differences = {c.field: (c.old, c.new) for c in changed.changes if c.note is None}
    assert set(differences) == {"fields.result", "fields.result_text", "fields.success"}
    assert differences["fields.result"] == (0, 1)
    assert differences["fields.success"] == (True, False)
    assert report.summary()["different"] == 1
    text = "\n".join(report.lines())
    assert "fields.result: 0 -> 1" in text and "result: DIFFERENT" in text


async def test_a_capture_with_bad_lines_still_replays_the_rest(
    pg_server_dsn: str, tmp_path: Path
) -> None:
    lines = VENDOR.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    # the heartbeat 0x21 of 04AB373B, cut short: skipped, so its reply is missing
    cut = next(
        i for i, r in enumerate(records) if r.get("dir") == "in" and r.get("command") == "0x21"
    )
    records[cut]["hex"] = records[cut]["hex"][:-6]
    broken = [json.dumps(r) for r in records]
    broken.insert(3, "{not json")
    broken.insert(5, json.dumps({**records[cut], "protocol": "ocpp"}))
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(broken) + "\n", encoding="utf-8")

    capture = read_capture(path)
    report = await replay(capture, dsn=pg_server_dsn)

    assert [p.line for p in report.problems] == [4, 6]
    assert "not JSON" in report.problems[0].reason
    assert "unknown protocol 'ocpp'" in report.problems[1].reason
    skipped = [p for c in report.connections for p in c.skipped]
    assert len(skipped) == 1 and "not replayed" in skipped[0].reason
    summary = report.summary()
    assert summary["line_problems"] == 3 and summary["missing"] == 1
    assert summary["different"] == summary["added"] == 0
    assert summary["identical"] + summary["volatile"] >= 6  # the rest was replayed
    (missing,) = [r for c in report.connections for r in c.replies if r.outcome is Outcome.MISSING]
    assert missing.key.startswith("ap3000 HeartbeatReply")


def test_record_baseline_round_trip(
    pg_server_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "vendor.jsonl"
    shutil.copy(VENDOR, path)
    runner = CliRunner()
    args = ["replay", str(path), "--dsn", pg_server_dsn]

    with monkeypatch.context() as patch:
        encode = ap3000.encode

        def changed(message: Any, *a: Any, **k: Any) -> bytes:
            if isinstance(message, ap3000.HeartbeatReply):
                message = dataclasses.replace(message, result=1)
            return encode(message, *a, **k)

        patch.setattr(ap3000, "encode", changed)
        differs = runner.invoke(main, args)
        assert differs.exit_code == 1, differs.output
        recorded = runner.invoke(main, [*args, "--record-baseline"])
        assert recorded.exit_code == 0, recorded.output
        assert "fields.result: 0 -> 1" in recorded.output  # the diff is shown first
        assert "baseline recorded" in recorded.output
        same = runner.invoke(main, [*args, "--json"])
        assert same.exit_code == 0, same.output
        assert json.loads(same.output)["summary"]["different"] == 0

    back = runner.invoke(main, args)
    assert back.exit_code == 1 and "fields.result: 1 -> 0" in back.output
    capture = read_capture(path)
    assert not capture.problems and capture.header["baseline"]["by"].startswith("chargegw")
    assert [f.hex for f in capture.frames if f.direction == "in"] == [
        f.hex for f in read_capture(VENDOR).frames if f.direction == "in"
    ]


def test_bad_arguments_are_clear(tmp_path: Path) -> None:
    runner = CliRunner()
    dsn = "postgresql://nobody@127.0.0.1:1/x"
    missing = runner.invoke(main, ["replay", str(tmp_path / "nope.jsonl"), "--dsn", dsn])
    assert missing.exit_code == 2 and "cannot read" in missing.output
    bad_dsn = runner.invoke(main, ["replay", str(VENDOR), "--dsn", "x"])
    assert bad_dsn.exit_code == 2 and "postgresql:// URL" in bad_dsn.output
    no_server = runner.invoke(main, ["replay", str(VENDOR), "--dsn", dsn])
    assert no_server.exit_code == 2 and "cannot connect to the database server" in no_server.output
    both = runner.invoke(main, ["replay", str(VENDOR), "--fast", "--realtime"])
    assert both.exit_code == 2 and "choose one of" in both.output
    target = runner.invoke(main, ["replay", str(VENDOR), "--target", "nowhere"])
    assert target.exit_code == 2 and "HOST:PORT" in target.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n" + VENDOR.read_text(encoding="utf-8"), encoding="utf-8")
    baseline = runner.invoke(main, ["replay", str(broken), "--dsn", dsn, "--record-baseline"])
    assert baseline.exit_code == 2 and "line 1" in baseline.output


def test_a_target_that_cannot_be_checked_is_refused() -> None:
    result = CliRunner().invoke(main, ["replay", str(VENDOR), "--target", "127.0.0.1:9"])
    assert result.exit_code == 2
    assert "refusing to replay towards 127.0.0.1:9" in result.output
    assert "--target-api" in result.output and "--i-know-this-is-live" in result.output


async def test_live_target_refusal_rule(db_dsn: str) -> None:
    assert "not a loopback address" in (
        await live_refusal("192.0.2.1", set(), api="http://192.0.2.1:1") or ""
    )
    gateway = Gateway(settings_for(db_dsn, http_host="127.0.0.1", http_port=0))
    await gateway.start(http=True)
    try:
        assert gateway.http_url is not None
        api = gateway.http_url.removesuffix("/docs")
        pile = SimulatedAp3000Pile("04000777", ports=2, heartbeat_s=180)
        async with Simulator("127.0.0.1", gateway.server.port, [pile], jitter=0, seed=1):
            await _known(gateway, "04000777")
            # a pile that is not in the capture is online: real piles may be behind it
            refusal = await live_refusal("127.0.0.1", {"04AB373B"}, api=api)
            assert refusal is not None and "04000777" in refusal
            # the same pile is in the capture: nothing else would be reached
            assert await live_refusal("localhost", {"04000777"}, api=api) is None
        assert "cannot list" in (await live_refusal("127.0.0.1", set(), api=api + "/x") or "")
    finally:
        await gateway.stop()


def test_the_volatile_rules_are_documented() -> None:
    from chargegw.replay.rules import VOLATILE_RULES

    text = (Path(__file__).resolve().parents[2] / "docs" / "replay.md").read_text()
    for rule in VOLATILE_RULES:
        row = (
            f"| {rule.protocol or 'any'} | {f'`{rule.message}`' if rule.message else 'any'} "
            f"| `{rule.field}` | {rule.kind.value} | {rule.why} |"
        )
        assert row in text, f"docs/replay.md lacks the row {row}"


def test_masked_bytes_get_a_stand_in_per_device_and_a_valid_checksum() -> None:
    from chargegw.audit import mask_frame
    from chargegw.replay.frames import usable_bytes

    swipe = ap3000.CardSwipe(PILE, 7, card_id="1A2B3C4D", card_type=0, port=0, balance_cent=0)
    masked = mask_frame(swipe, ap3000.encode(swipe))
    assert "**" in masked
    one, again, other = (usable_bytes(masked, s) for s in (PILE, PILE, "04000002"))
    assert one == again != other
    ap3000.check_frame(one)  # the checksum was recomputed
    assert mask_frame(swipe, one) == masked  # only masked bytes were filled


def test_state_differences_ignore_generated_numbers_and_api_fields() -> None:
    from chargegw.replay.compare import compare_state

    recorded = {
        "orders": [
            {"order_no": "A1", "device_id": PILE, "port": 1, "status": "settled",
             "energy_kwh": 0.01, "device_initiated": False, "mode": "time"},
        ],
        "ports": [{"device_id": PILE, "port": 1, "status": "idle"}],
    }  # fmt: skip
    replayed = {
        "orders": [
            {"order_no": "B2", "device_id": PILE, "port": 1, "status": "settled",
             "energy_kwh": 0.01, "device_initiated": True, "mode": None},
        ],
        "ports": [{"device_id": PILE, "port": 1, "status": "idle"}],
    }  # fmt: skip
    assert compare_state(recorded, replayed) == []
    replayed["orders"][0]["energy_kwh"] = 0.02
    replayed["ports"][0]["status"] = "charging"
    assert [str(d) for d in compare_state(recorded, replayed)] == [
        f"order {PILE} port 1 #1: energy_kwh 0.01 -> 0.02",
        f"port {PILE} port 1: status 'idle' -> 'charging'",
    ]
