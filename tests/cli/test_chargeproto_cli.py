"""`chargeproto decode` and `chargeproto encode` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import chargeproto
from chargeproto import ap3000, bkv
from chargeproto._cli import main

HEARTBEAT = "444e5910003b37ab0401002198080200000905ee02"
START = "444e5926003b37ab040200820064010000010100001234567812345678123456781234567880708813f808"
SETTLEMENT = (
    "444e5928003b37ab04010003100ee80330000101000000000120190901180000130030380102030405e8034405"
)


def run(*args: str, stdin: str | None = None) -> tuple[int, str]:
    """Exit status and standard output (warnings go to standard error)."""
    code, out, _ = run_full(*args, stdin=stdin)
    return code, out


def run_full(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_decode_argument_prints_one_json_object_per_frame() -> None:
    code, out = run("decode", HEARTBEAT, SETTLEMENT)
    assert code == 0
    first, second = (json.loads(line) for line in out.splitlines())
    assert first == {
        "protocol": "ap3000",
        "direction": "up",
        "command": "0x21",
        "name": "Heartbeat",
        "length": 16,
        "phy_id": "04AB373B",
        "phy_id_type": 4,
        "phy_id_number": 11220795,
        "phy_id_qr": "3b37ab04",
        "msg_id": 1,
        "checksum": 0x02EE,
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


# --- BKV --------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
BKV_VECTORS = {v["name"]: v for v in json.loads((ROOT / "fixtures" / "bkv.json").read_text())}
BKV_HEARTBEAT = BKV_VECTORS["bkv_0x0000_heartbeat"]["hex"]
BKV_START = BKV_VECTORS["bkv_0x0015_0x07_control_start_corrected"]["hex"]
BKV_END = BKV_VECTORS["bkv_0x0015_0x02_end_report"]["hex"]
BKV_CLUSTER = BKV_VECTORS["bkv_0x1000_0x1017_status_cluster"]["hex"]
ICCID_HEX = "3839383630343438313631383730303634383135"  # "89860448161870064815"
LINK_HEX = "6c696e6b"


def test_bkv_decode_json_shape_names_the_command_and_lifts_gateway_and_seq() -> None:
    code, out = run("decode", BKV_HEARTBEAT, BKV_START, BKV_CLUSTER)
    heartbeat, start, cluster = (json.loads(line) for line in out.splitlines())
    assert code == 0
    assert list(heartbeat) == [
        "protocol",
        "direction",
        "command",
        "name",
        "length",
        "seq",
        "gateway_id",
        "checksum",
        "fields",
    ]
    assert heartbeat["length"] == 46 and heartbeat["checksum"] == 0xCA
    assert heartbeat["protocol"] == "bkv"
    assert heartbeat["command"] == "0x0000" and heartbeat["name"] == "Heartbeat"
    assert heartbeat["gateway_id"] == "82200520004869" and heartbeat["seq"] == 0
    assert heartbeat["fields"]["iccid"] == "89860463112070319417"
    for record in (heartbeat, start, cluster):
        head = {"gateway_id", "seq", "command", "direction", "length", "checksum"}
        assert not head & set(record["fields"])
    # the header says down: it wins over the default --direction up
    assert start["direction"] == "down"
    assert start["command"] == "0x0015/0x07" and start["name"] == "ChargeControl"
    assert start["seq"] == 0x001C9A51 and start["gateway_id"] == "86004459453005"
    assert start["fields"]["duration_min"] == 240 and start["fields"]["charge_mode_text"]
    assert cluster["command"] == "0x1000/0x1017" and cluster["name"] == "StatusCluster"
    assert cluster["gateway_id"] == "82231214002700"
    jack = cluster["fields"]["sockets"][0]["ports"][1]
    assert jack["voltage_v"] == 227.5 and jack["online"] is True and jack["port"] == 1


def test_bkv_header_direction_overrides_the_option() -> None:
    code, out = run("decode", "--direction", "down", BKV_END)
    assert code == 0
    assert json.loads(out)["direction"] == "up"
    assert json.loads(out)["name"] == "EndReport"


def test_bkv_unknown_sub_command_and_container_are_named_by_their_codes() -> None:
    unknown_sub = bkv.encode(bkv.UnknownSubCommand("82231214002700", 7, 0x0015, 0x99, "AB"))
    container = bkv.encode(
        bkv.TlvContainer(
            gateway_id="82231214002700", seq=3, bkv_cmd=0x1013, raw_items=(bkv.TlvItem(0x44, "01"),)
        )
    )
    code, out = run("decode", unknown_sub.hex(), container.hex())
    first, second = (json.loads(line) for line in out.splitlines())
    assert code == 0
    assert first["command"] == "0x0015/0x99" and first["name"] == "UnknownSubCommand"
    assert first["fields"]["params_hex"] == "AB"
    assert second["command"] == "0x1000/0x1013" and second["name"] == "TlvContainer"
    assert second["fields"]["tag_44"] == "01"


def test_bkv_table_shows_frame_header_and_tlv_items_with_offsets() -> None:
    code, out = run("decode", "--format", "table", BKV_CLUSTER)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "bkv up 0x1000/0x1017 StatusCluster"
    assert "       0  fc fe                     header=fc fe (up)" in lines
    assert "       4  10 00                     command=0x1000" in lines
    assert "      11  82 23 12 14 00 27 00      gateway_id=82231214002700" in lines
    assert "      18  04 01 01 10 17            bkv_cmd=0x1017" in lines
    assert "      44  65 01 94                  sockets[0] (group 0x94)" in lines
    assert "      80  04 01 95 08 e3            sockets[0].ports[0].voltage_v=227.5" in lines
    assert "     146  30                        checksum=0x30" in lines
    assert "     147  fc ee                     tail=fc ee" in lines


def test_bkv_table_of_a_sub_command_uses_the_layout_spans() -> None:
    code, out = run("decode", "--format", "table", BKV_START)
    assert code == 0
    assert "      18  00 08                     inner_length=8" in out
    assert "      20  07                        sub_cmd=0x07" in out
    assert "      24  01                        charge_mode=1 (by time)" in out
    assert "      25  00 f0                     duration_min=240" in out


def test_stream_detects_ap3000_behind_an_iccid_and_link() -> None:
    capture = ICCID_HEX + LINK_HEX + HEARTBEAT + SETTLEMENT + LINK_HEX
    code, out = run("decode", "--stream", capture)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [line["command"] for line in lines] == ["iccid", "link", "0x21", "0x03", "link"]
    assert {line["protocol"] for line in lines} == {"ap3000"}
    assert lines[0]["fields"] == {"iccid": "89860448161870064815"}


def test_stream_detects_bkv_and_reports_garbage_between_frames() -> None:
    capture = ICCID_HEX + BKV_HEARTBEAT + "0102" + BKV_CLUSTER + BKV_END
    code, out = run("decode", "--stream", capture)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line.get("command") for line in lines] == [
        "iccid",
        "0x0000",
        None,
        "0x1000/0x1017",
        "0x0015/0x02",
    ]
    assert lines[0]["protocol"] == "bkv"
    assert lines[2]["kind"] == "garbage" and lines[2]["hex"] == "0102"
    assert code == 1


def test_stream_table_covers_bkv_frames() -> None:
    code, out = run("decode", "--stream", "--format", "table", ICCID_HEX + BKV_END)
    assert code == 0
    assert out.startswith("bkv up iccid\n  iccid: 89860448161870064815\n")
    assert "bkv up 0x0015/0x02 EndReport" in out
    assert "energy_kwh=0.08" in out


def test_bkv_bad_checksum_is_reported_with_its_kind_and_the_rest_decodes() -> None:
    broken = BKV_END[:-6] + "00" + BKV_END[-4:]  # checksum byte 0x41 -> 0x00
    code, out = run("decode", broken, BKV_HEARTBEAT)
    first, second = (json.loads(line) for line in out.splitlines())
    assert code == 1
    assert first["kind"] == "checksum" and first["hex"] == broken
    assert "error" in first
    assert second["name"] == "Heartbeat"


def test_input_of_neither_protocol_is_a_detection_error() -> None:
    code, out = run("decode", "0102030405")
    assert code == 1
    assert json.loads(out)["kind"] == "detection"


def test_bkv_encode_round_trips_a_control_command() -> None:
    _, out = run("decode", BKV_START)
    code, hex_out = run("encode", out.strip())
    assert code == 0
    assert hex_out.strip() == BKV_START


def test_bkv_encode_from_hand_written_json() -> None:
    record = {
        "protocol": "bkv",
        "command": "0x0015/0x07",
        "gateway_id": "86004459453005",
        "seq": 0x001C9A51,
        "fields": {
            "socket": 2,
            "port": 0,
            "switch": 1,
            "charge_mode": 1,
            "duration_min": 240,
            "energy_kwh": 0,
        },
    }
    code, out = run("encode", json.dumps(record))
    assert code == 0 and out.strip() == BKV_START
    del record["command"]
    record["name"] = "ChargeControl"
    assert run("encode", json.dumps(record))[1].strip() == BKV_START


def test_bkv_encode_fills_the_tlv_header_items_from_the_frame() -> None:
    record = {
        "protocol": "bkv",
        "command": "0x1000/0x1017",
        "gateway_id": "82231214002700",
        "seq": 9,
        "fields": {"result": 1},
    }
    code, out = run("encode", json.dumps(record))
    assert code == 0
    ack = bkv.decode(out.strip())
    assert isinstance(ack, bkv.StatusClusterAck) and ack.success
    assert ack.bkv_seq == 9 and ack.bkv_gateway_id == "82231214002700"


def test_bkv_encode_reports_bad_records() -> None:
    base = {"protocol": "bkv", "gateway_id": "86004459453005", "seq": 1}
    cases = [
        ({**base, "command": "0x0015/0x07", "fields": {"socket": 1}}, "missing"),
        ({**base, "command": "0x0015/0x07", "fields": {"bogus": 1}}, "bogus"),
        ({**base, "name": "ChargeControl", "fields": {"sub_cmd": 8}}, "sub_cmd"),
        ({**base, "name": "NoSuchMessage", "fields": {}}, "NoSuchMessage"),
        ({**base, "command": "0x15/07", "fields": {}}, "0x15/07"),
        ({**base, "gateway_id": "1234", "command": "0x0015/0x1d", "fields": {"socket": 1}}, "1234"),
    ]
    for record, word in cases:
        code, out = run("encode", json.dumps(record))
        assert code == 1, record
        assert word in json.loads(out)["error"], (record, out)


@pytest.mark.parametrize(
    "name", sorted(n for n, v in BKV_VECTORS.items() if v["valid"]), ids=lambda n: n
)
def test_bkv_decode_output_encodes_back_to_the_vector(name: str) -> None:
    vector = BKV_VECTORS[name]
    code, out = run("decode", vector["hex"])
    assert code == 0
    code, hex_out = run("encode", out.strip())
    assert code == 0, hex_out
    # the record keeps a TLV item order other than the default (``tlv_order``)
    assert hex_out.strip() == vector["hex"]


def test_iccid_and_link_outside_a_stream_belong_to_no_protocol() -> None:
    code, out = run("decode", ICCID_HEX, LINK_HEX)
    assert code == 0
    assert [(r["protocol"], r["command"]) for r in map(json.loads, out.splitlines())] == [
        (None, "iccid"),
        (None, "link"),
    ]


# --- AP3000 direction: frames do not say who sent them ----------------------------------


def _ap3000(command: int, payload: str) -> str:
    return ap3000.build_frame(0x04AB373B, 5, command, bytes.fromhex(payload)).hex()


def test_server_frame_without_direction_is_decoded_as_down_with_a_warning() -> None:
    code, out, err = run_full("decode", START)
    record = json.loads(out)
    assert code == 0
    assert record["direction"] == "down" and record["name"] == "ChargeControl"
    assert "trailing_hex" not in record["fields"]
    assert "0x82 fits direction down (ChargeControl)" in err
    assert "--direction" in err


def test_device_frame_without_direction_decodes_up_silently() -> None:
    code, out, err = run_full("decode", HEARTBEAT, SETTLEMENT)
    assert code == 0 and err == ""
    assert [json.loads(line)["direction"] for line in out.splitlines()] == ["up", "up"]


def test_explicit_direction_is_obeyed_with_a_warning_when_the_other_fits() -> None:
    code, out, err = run_full("decode", "--direction", "up", START)
    assert code == 0
    assert json.loads(out)["name"] == "ChargeControlReply"
    assert "fits direction down (ChargeControl) better; decoded as up as asked" in err
    code, out, err = run_full("decode", "--direction", "down", START)
    assert code == 0 and err == ""


def test_explicit_direction_that_does_not_fit_says_which_does() -> None:
    reply = _ap3000(0x03, "00")  # a SettlementReply: too short for an up Settlement
    code, out = run("decode", "--direction", "up", reply)
    record = json.loads(out)
    assert code == 1
    assert record["kind"] == "truncated"
    assert "it fits direction down (SettlementReply): try --direction down" in record["error"]


def test_frame_that_fits_neither_direction_is_an_error() -> None:
    empty = _ap3000(0x03, "")  # 0x03 needs 29 bytes up and 1 byte down
    code, out = run("decode", empty)
    record = json.loads(out)
    assert code == 1
    assert "fits neither direction" in record["error"]
    assert "Settlement" in record["error"] and "SettlementReply" in record["error"]
    truncated = _ap3000(0x06, "010203")  # 0x06 exists up only
    code, out = run("decode", truncated)
    assert code == 1 and json.loads(out)["kind"] == "truncated"


def test_frame_that_fits_both_directions_is_decoded_up_with_a_warning() -> None:
    code, out, err = run_full("decode", _ap3000(0x8D, "00"))
    assert code == 0
    assert json.loads(out)["name"] == "SetWorkModeReply"
    assert "fits both directions" in err and "SetWorkMode" in err


def test_command_without_layout_stays_unknown_and_up() -> None:
    code, out, err = run_full("decode", _ap3000(0x99, "abcd"))
    record = json.loads(out)
    assert code == 0 and err == ""
    assert record["name"] == "UnknownMessage" and record["direction"] == "up"
    assert record["fields"] == {"payload_hex": "ABCD"}


def test_stream_of_server_frames_decodes_each_in_its_direction() -> None:
    ack = _ap3000(0x03, "00")
    code, out, err = run_full("decode", "--stream", START + ack + HEARTBEAT)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [(r["name"], r["direction"]) for r in lines] == [
        ("ChargeControl", "down"),
        ("SettlementReply", "down"),
        ("Heartbeat", "up"),
    ]
    assert err.count("warning:") == 2


# --- the record API is what the command line prints ---------------------------------


AP3000_VECTORS = [
    v
    for v in json.loads((ROOT / "fixtures" / "ap3000.json").read_text())
    if v["valid"] and v["command"] not in ("iccid", "link")
]


@pytest.mark.parametrize("vector", AP3000_VECTORS, ids=lambda v: v["name"])
def test_decode_prints_to_record_and_encode_reads_it_back(vector: dict[str, object]) -> None:
    hex_text = str(vector["hex"])
    code, out = run("decode", "--direction", str(vector["direction"]), hex_text)
    assert code == 0
    record = json.loads(out)
    message = ap3000.decode(hex_text, str(vector["direction"]))
    assert record == json.loads(json.dumps(chargeproto.to_record(message)))
    # the vectors' frame-level names are the record's
    expected = vector["fields"]
    assert isinstance(expected, dict)
    for key in ("length", "phy_id", "phy_id_type", "phy_id_number", "phy_id_qr", "checksum"):
        if key in expected:
            assert record[key] == expected[key], key
    code, hex_out = run("encode", out.strip())
    assert code == 0, hex_out
    assert chargeproto.from_record(record) == message


def test_bkv_record_keeps_a_non_default_item_order() -> None:
    vector = BKV_VECTORS["bkv_0x1000_0x1007_fee_mode_start_corrected"]
    code, out = run("decode", vector["hex"])
    record = json.loads(out)
    assert code == 0
    assert record["fields"]["tag_f4"] == "02" and record["fields"]["tlv_order"]
    assert run("encode", out.strip())[1].strip() == vector["hex"]


def test_encode_error_names_the_field() -> None:
    record = {"command": "0x87", "phy_id": "04AB373B", "phy_id_qr": "40aace04", "fields": {}}
    code, out = run("encode", json.dumps(record))
    assert code == 1
    assert json.loads(out)["field"] == "phy_id_qr"


def test_encode_accepts_the_sticker_form_of_the_physical_id() -> None:
    record = {"command": "0x87", "phy_id_type": 4, "phy_id_number": 11220795, "msg_id": 9}
    code, out = run("encode", json.dumps(record))
    assert code == 0
    message = ap3000.decode(out.strip(), "down")
    assert isinstance(message, ap3000.Reboot) and message.phy_id == "04AB373B"


def test_python_dash_m_runs_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chargeproto", "decode", HEARTBEAT],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "Heartbeat"
    version = subprocess.run(
        [sys.executable, "-m", "chargeproto", "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert chargeproto.__version__ in version.stdout
