"""Every BKV vector of fixtures/bkv.json: valid ones decode to their fields and
re-encode byte-exact; invalid ones raise the error their defects name."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import chargeproto
from chargeproto import bkv

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
VECTORS: list[dict[str, Any]] = json.loads((FIXTURES / "bkv.json").read_text())
VALID = [v for v in VECTORS if v["valid"]]
INVALID = [v for v in VECTORS if not v["valid"]]

DEFECT_ERRORS: dict[str, type[chargeproto.DecodeError]] = {
    "hex": chargeproto.HexSyntaxError,
    "length": chargeproto.LengthError,
    "checksum": chargeproto.ChecksumError,
    "inner_length": chargeproto.InnerLengthError,
    "command_mismatch": chargeproto.CommandMismatchError,
    "tail": chargeproto.TailError,
    "header": chargeproto.HeaderError,
    "direction": chargeproto.DirectionError,
    "truncated": chargeproto.TruncatedError,
}
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\[\d+\]")


def lookup(fields: dict[str, Any], path: str) -> Any:
    cur: Any = fields
    for part in _PATH.findall(path):
        cur = cur[int(part[1:-1])] if part.startswith("[") else cur[part]
    return cur


def assert_same(actual: Any, expected: Any, path: str) -> None:
    if isinstance(expected, float) or isinstance(actual, float):
        assert isinstance(actual, int | float) and not isinstance(actual, bool), path
        assert actual == pytest.approx(expected, abs=1e-6), path
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    else:
        assert type(actual) is type(expected), f"{path}: {actual!r} vs {expected!r}"
        assert actual == expected, path


def test_counts() -> None:
    assert len(VECTORS) == 41
    assert len(INVALID) == 5
    assert sum(1 for v in VECTORS if v.get("corrected")) == 5


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_valid_vector_decodes_to_its_fields(vector: dict[str, Any]) -> None:
    message = bkv.decode(bytes.fromhex(vector["hex"]), expect_command=vector["command"])
    assert message.wire_direction.value == vector["direction"]
    fields = message.to_fields()
    for path, expected in vector["fields"].items():
        try:
            actual = lookup(fields, path)
        except (KeyError, IndexError):
            pytest.fail(f"{vector['name']}: {path} missing from {fields}")
        assert_same(actual, expected, path)


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_valid_vector_reencodes_byte_exact(vector: dict[str, Any]) -> None:
    frame = bytes.fromhex(vector["hex"])
    message = bkv.decode(frame)
    assert bkv.encode(message) == frame
    assert bkv.decode(bkv.encode(message)) == message


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_valid_vector_is_not_an_unknown_message(vector: dict[str, Any]) -> None:
    message = bkv.decode(vector["hex"])
    assert type(message) in bkv.MESSAGE_CLASSES
    assert not message.to_fields().get("unknown_command")


@pytest.mark.parametrize("vector", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vector_raises_a_defect_error(vector: dict[str, Any]) -> None:
    errors = tuple(DEFECT_ERRORS[d] for d in vector["defects"])
    with pytest.raises(errors):
        bkv.decode(vector["hex"], expect_command=vector["command"])


def test_command_mismatch_frame_is_itself_intact() -> None:
    vector = next(v for v in INVALID if "command_mismatch" in v["defects"])
    message = bkv.decode(vector["hex"])  # no expectation: an unknown 0x0005 sub-command
    assert isinstance(message, bkv.UnknownSubCommand)
    assert (message.outer_command, message.sub_cmd) == (0x0005, 0x17)
    assert bkv.encode(message) == bytes.fromhex(vector["hex"])
    with pytest.raises(chargeproto.CommandMismatchError):
        bkv.decode(vector["hex"], expect_command=0x0015)
    with pytest.raises(chargeproto.CommandMismatchError):
        bkv.decode(vector["hex"], expect_command=(0x0015, 0x17))


@pytest.mark.parametrize(
    "vector", [v for v in VECTORS if v.get("corrected")], ids=lambda v: v["name"]
)
def test_corrected_sibling_decodes(vector: dict[str, Any]) -> None:
    broken = next(v for v in VECTORS if v["name"] == vector["corrects"])
    assert not broken["valid"]
    assert bkv.decode(vector["hex"], expect_command=vector["command"]) is not None


def test_expect_command_accepts_the_matching_forms() -> None:
    frame = next(v for v in VALID if v["name"] == "bkv_0x0015_0x07_control_reply")["hex"]
    for form in (0x0015, (0x0015, 0x07), "0x0015/0x07", "0x0015"):
        assert isinstance(bkv.decode(frame, expect_command=form), bkv.ChargeControlReply)
    with pytest.raises(chargeproto.CommandMismatchError):
        bkv.decode(frame, expect_command="0x0015/0x1b")


def test_vector_decodings_are_json_ready() -> None:
    for vector in VALID:
        json.dumps(bkv.decode(vector["hex"]).to_fields())
