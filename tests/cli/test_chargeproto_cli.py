"""`chargeproto decode` and `chargeproto encode` as a user runs them."""

from __future__ import annotations

import json

from click.testing import CliRunner

from chargeproto._cli import main

HEARTBEAT = "444e5910003b37ab0401002198080200000905ee02"
START = "444e5926003b37ab040200820064010000010100001234567812345678123456781234567880708813f808"
SETTLEMENT = (
    "444e5928003b37ab04010003100ee80330000101000000000120190901180000130030380102030405e8034405"
)


def run(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), input=stdin)
    return result.exit_code, result.output


def test_decode_argument_prints_one_json_object_per_frame() -> None:
    code, out = run("decode", HEARTBEAT, SETTLEMENT)
    assert code == 0
    first, second = (json.loads(line) for line in out.splitlines())
    assert first == {
        "protocol": "ap3000",
        "direction": "up",
        "command": "0x21",
        "name": "Heartbeat",
        "phy_id": "04AB373B",
        "msg_id": 1,
        "fields": {
            "voltage_v": 220.0,
            "ports": [
                {"port": 0, "status": 0, "status_text": "idle"},
                {"port": 1, "status": 0, "status_text": "idle"},
            ],
            "signal_strength": 9,
            "temperature_c": -60,
            "port_count": 2,
        },
    }
    assert second["fields"]["stop_reason"] == 1
    assert second["fields"]["stop_reason_text"] == "full, stopped by itself"


def test_decode_reads_stdin_lines_with_comments_and_spacing() -> None:
    stdin = f"# a capture\n{HEARTBEAT}\n\n44 4e 59 09 00 3b 37 ab 04 b9 00 22 f0 02  # get time\n"
    code, out = run("decode", stdin=stdin)
    assert code == 0
    assert [json.loads(line)["command"] for line in out.splitlines()] == ["0x21", "0x22"]


def test_decode_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "frames.txt"
    path.write_text(f"{HEARTBEAT}\n{SETTLEMENT}\n")
    code, out = run("decode", "--file", str(path))
    assert code == 0 and len(out.splitlines()) == 2


def test_direction_down_selects_the_server_layout() -> None:
    code, out = run("decode", "--direction", "down", START)
    record = json.loads(out)
    assert code == 0
    assert record["name"] == "ChargeControl"
    assert record["fields"]["duration_s"] == 0
    assert record["fields"]["balance_cent"] == 356


def test_bad_input_is_reported_and_the_rest_still_decodes() -> None:
    broken = HEARTBEAT[:-4] + "0000"  # wrong checksum
    code, out = run("decode", "zz", broken, HEARTBEAT)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert lines[0]["kind"] == "hex" and lines[0]["hex"] == "zz"
    assert lines[1]["kind"] == "checksum" and lines[1]["hex"] == broken
    assert lines[2]["command"] == "0x21"


def test_table_format_shows_offsets_bytes_and_values() -> None:
    code, out = run("decode", "--format", "table", HEARTBEAT)
    assert code == 0
    assert "ap3000 up 0x21 Heartbeat" in out
    assert "     12  98 08                     voltage_v=220.0" in out
    assert "checksum=0x02EE" in out


def test_stream_mode_splits_a_capture_and_reports_a_partial_tail() -> None:
    capture = "3839383630343438313631383730303634383135" + HEARTBEAT + "6c696e6b" + "444e59"
    code, out = run("decode", "--stream", capture)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line.get("command") for line in lines[:3]] == ["iccid", "0x21", "link"]
    assert lines[0]["fields"] == {"iccid": "89860448161870064815"}
    assert "error" in lines[3] and lines[3]["hex"] == "444e59"
    assert code == 1


def test_encode_round_trips_decode_output() -> None:
    _, out = run("decode", "--direction", "down", START)
    code, hex_out = run("encode", out.strip())
    assert code == 0
    assert hex_out.strip() == START


def test_encode_accepts_convenience_names_and_reports_bad_values() -> None:
    record = {
        "command": "0x82",
        "phy_id": "04AB373B",
        "msg_id": 2,
        "fields": {
            "rate_mode": 2,
            "balance_cent": 0,
            "port": 0,
            "charge_command": 1,
            "energy_kwh": 1.5,
            "order_id": "00" * 16,
        },
    }
    code, out = run("encode", json.dumps(record))
    assert code == 0
    assert (
        json.loads(run("decode", "--direction", "down", out.strip())[1])["fields"]["charge_limit"]
        == 150
    )
    record["fields"]["port"] = 300  # type: ignore[index]
    code, out = run("encode", json.dumps(record))
    assert code == 1
    assert "port" in json.loads(out)["error"]


def test_encode_rejects_unknown_commands_and_fields() -> None:
    code, out = run("encode", '{"command": "0x99", "phy_id": "04AB373B", "fields": {}}')
    assert code == 1 and "0x99" in json.loads(out)["error"]
    code, out = run(
        "encode",
        '{"command": "0x87", "phy_id": "04AB373B", "fields": {"bogus": 1}}',
    )
    assert code == 1 and "bogus" in json.loads(out)["error"]
    code, out = run("encode", "not json")
    assert code == 1
