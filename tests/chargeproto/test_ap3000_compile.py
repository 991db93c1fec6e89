"""Structural checks (not timings): construct compiles every declaration without
falling back to its interpreter, and the hot path runs no construct code at all."""

from __future__ import annotations

import functools
from typing import Any

import construct as cs
import pytest

from chargeproto import ap3000

HOT = [
    ap3000.Heartbeat,
    ap3000.LegacyHeartbeat,
    ap3000.PowerHeartbeat,
    ap3000.Settlement,
    ap3000.ChargeControl,
    ap3000.ChargeControlReply,
    ap3000.Registration,
]
CLASSES = ap3000.MESSAGE_CLASSES
CLASS_IDS = [f"{c.__name__}-{c.command:#04x}-{c.direction.value}" for c in CLASSES]


@functools.cache
def _compiled(cls: type[ap3000.Ap3000Message]) -> Any:
    return cls.WIRE.compile()


def test_hot_messages_are_the_expected_commands() -> None:
    assert [(c.command, c.direction.value) for c in HOT] == [
        (0x21, "up"),
        (0x01, "up"),
        (0x06, "up"),
        (0x03, "up"),
        (0x82, "down"),
        (0x82, "up"),
        (0x20, "up"),
    ]


@pytest.mark.parametrize("cls", HOT, ids=[c.__name__ for c in HOT])
def test_hot_message_compiles_without_interpreter_fallback(
    cls: type[ap3000.Ap3000Message],
) -> None:
    compiled = _compiled(cls)
    assert isinstance(compiled, cs.Compiled)
    assert compiled.module.linkedinstances == {}
    assert compiled.module.linkedparsers == {}


@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
def test_every_declaration_compiles_without_interpreter_fallback(
    cls: type[ap3000.Ap3000Message],
) -> None:
    compiled = _compiled(cls)
    assert compiled.module.linkedinstances == {}, f"{cls.__name__} falls back to the interpreter"
    assert compiled.module.linkedparsers == {}
    assert "linkedinstances[" not in compiled.source
    assert "linkedparsers[" not in compiled.source


@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
def test_generated_codec_does_not_use_construct(cls: type[ap3000.Ap3000Message]) -> None:
    codec = cls.codec
    for source in (codec.decode_source, codec.encode_source):
        assert "construct" not in source
        assert "Container" not in source
        assert "cs." not in source
    for function in (codec.decode, codec._encode):
        used = {
            name: function.__globals__[name]
            for name in function.__code__.co_names
            if name in function.__globals__
        }
        for name, value in used.items():
            module = getattr(value, "__module__", "") or ""
            assert not module.startswith("construct"), (cls.__name__, name, module)
    compile(codec.decode_source, "<check>", "exec")
    compile(codec.encode_source, "<check>", "exec")


def test_hot_path_does_not_call_construct() -> None:
    """Decoding and encoding a heartbeat never enters construct (traced, not timed)."""
    import sys

    frame = bytes.fromhex("444e5910003b37ab0401002198080200000905ee02")
    entered: list[str] = []

    def tracer(frame_: Any, event: str, arg: Any) -> None:
        if event == "call" and "construct" in frame_.f_code.co_filename:
            entered.append(frame_.f_code.co_name)

    sys.setprofile(tracer)
    try:
        for cls_frame in (frame,):
            message = ap3000.decode(cls_frame)
            ap3000.encode(message)
    finally:
        sys.setprofile(None)
    assert entered == []
