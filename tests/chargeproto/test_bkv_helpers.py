"""Status byte, reason tables, ids, hex parsing, message construction helpers."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import chargeproto
from chargeproto import ABSENT, bkv

GW = "82231214002700"


def test_status_byte_0x98_reads_as_the_guide_annotates() -> None:
    assert bkv.status_flags(0x98) == {
        "online": True,
        "metering_ok": True,
        "charging": True,
        "no_load": True,
        "temperature_ok": True,
        "current_ok": True,
        "power_ok": True,
    }


def test_status_byte_0xb0_sets_the_metering_bit() -> None:
    flags = bkv.status_flags(0xB0)
    assert flags["online"] and flags["charging"] and not flags["metering_ok"]


@given(st.integers(0, 255))
def test_status_flags_invert(bits: int) -> None:
    assert bkv.status_bits_from_flags(**bkv.status_flags(bits)) == bits & ~0x40


def test_reason_table_built_in_is_empty_and_renders_unknown() -> None:
    assert bkv.END_REASONS.text(8) == "unknown (0x08)"
    message = bkv.decode(
        "fcfe003c00150000000001860044594530050028180151362d200098001700000002000100240"
        "7e406080e150702000f0000050024000000000000000037fcee"
    )
    assert message.to_fields()["end_reason_text"] == "unknown (0x02)"


def test_reason_table_from_a_mapping() -> None:
    table = bkv.load_reason_table({"0x08": "no load", 2: "amount used up", "9": "x"})
    assert table.text(8) == "no load" and table.text(2) == "amount used up"
    assert table.text(9) == "x" and 3 not in table
    with pytest.raises(bkv.ReasonTableError):
        bkv.load_reason_table({"eight": "no"})
    with pytest.raises(bkv.ReasonTableError):
        bkv.load_reason_table({300: "no"})


def test_reason_table_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "reasons.yaml"
    path.write_text("8: no load\n")
    fake = types.ModuleType("yaml")
    fake.safe_load = lambda fh: {8: fh.read().split(": ")[1].strip()}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "yaml", fake)
    assert bkv.load_reason_table(path).text(8) == "no load"


def test_reason_table_yaml_needs_pyyaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "reasons.yaml"
    path.write_text("8: no load\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ImportError, match="PyYAML"):
        bkv.load_reason_table(path)


def test_socket_id() -> None:
    assert bkv.socket_id(GW, 1) == "82231214002700-1"
    with pytest.raises(chargeproto.EncodeError):
        bkv.socket_id("8223121400270", 1)
    with pytest.raises(chargeproto.EncodeError):
        bkv.socket_id(GW, 256)


def test_parse_hex() -> None:
    assert chargeproto.parse_hex("fc fe:00") == b"\xfc\xfe\x00"
    with pytest.raises(chargeproto.HexSyntaxError):
        chargeproto.parse_hex("0g")
    with pytest.raises(chargeproto.HexSyntaxError):
        chargeproto.parse_hex("abc")


def test_create_fills_the_tlv_header() -> None:
    message = bkv.SetParams.create(GW, 0x1F6F78C3, socket=2, power_limit_w=700.0)
    assert message.bkv_seq == 0x1F6F78C3 and message.bkv_gateway_id == GW
    decoded = bkv.decode(bkv.encode(message))
    assert decoded == message
    assert decoded.to_fields()["power_limit_w"] == 700.0


def test_node_delete_encodes_but_decodes_as_unknown() -> None:
    frame = bkv.encode(bkv.NodeDelete(GW, 5, socket=3, mac="350030701247"))
    message = bkv.decode(frame)
    assert isinstance(message, bkv.UnknownSubCommand)
    assert (message.sub_cmd, message.params_hex) == (0x0A, "03350030701247")


def test_state_reply_with_sub_command_0x1d_round_trips() -> None:
    reply = bkv.decode(
        "fcfe00350015001c91ee018600445945300500211c01513629150080000008ef0000000100000000"
        "0180000008ef000000010000000077fcee"
    )
    assert isinstance(reply, bkv.SocketState)
    as_1d = bkv.SocketState1D(**{f.name: getattr(reply, f.name) for f in dataclasses.fields(reply)})
    frame = bkv.encode(as_1d)
    again = bkv.decode(frame)
    assert type(again) is bkv.SocketState1D and again.to_fields()["sub_cmd"] == 0x1D


def test_card_order_by_time_has_no_tier_part() -> None:
    order = bkv.CardOrder(GW, 1, 1, 0, 26, 1, 1, 48000, 0.0)
    assert order.amount_cent is ABSENT
    fields = bkv.decode(bkv.encode(order)).to_fields()
    assert "tiers" not in fields and fields["inner_length"] == 10


def test_message_classes_are_exported() -> None:
    for cls in bkv.MESSAGE_CLASSES:
        assert cls.__name__ in bkv.__all__
        assert getattr(bkv, cls.__name__) is cls
    assert "bkv" in chargeproto.__all__ and "StreamDecoder" in chargeproto.__all__


def test_bkv_code_is_sans_io() -> None:
    for path in Path(bkv.__file__).parent.glob("*.py"):
        text = path.read_text()
        for module in ("import socket", "import asyncio", "import time", "datetime.now"):
            assert module not in text, (path, module)
