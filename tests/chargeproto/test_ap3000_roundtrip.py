"""Round trips for every AP3000 message class, with payloads generated from each
class's own construct declaration, and a check of the generated decoder against
construct's compiled parser."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import construct as cs
import pytest
from ap3000_support import groups_of, msg_ids, phy_ids, raw_payloads
from hypothesis import given, settings
from hypothesis import strategies as st

import chargeproto
from chargeproto import ap3000
from chargeproto._layout import OPT_PREFIX

CLASSES = ap3000.MESSAGE_CLASSES
CLASS_IDS = [f"{c.__name__}-{c.command:#04x}-{c.direction.value}" for c in CLASSES]


def test_every_registered_class_is_covered() -> None:
    assert set(CLASSES) == set(ap3000.REGISTRY.values())
    assert len(CLASSES) == len(ap3000.REGISTRY)
    for (command, direction), cls in ap3000.REGISTRY.items():
        assert (cls.command, cls.direction) == (command, direction)
        assert ap3000.message_class(command, direction) is cls


def _frame(cls: type[ap3000.Ap3000Message], phy: int, msg_id: int, payload: bytes) -> bytes:
    return ap3000.build_frame(phy, msg_id, cls.command, payload)


@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
@settings(max_examples=30)
@given(data=st.data(), phy=phy_ids, msg_id=msg_ids)
def test_roundtrip(cls: type[ap3000.Ap3000Message], data: Any, phy: int, msg_id: int) -> None:
    _, payload, _ = data.draw(raw_payloads(cls))
    frame = _frame(cls, phy, msg_id, payload)
    message = ap3000.decode(frame, cls.direction)
    assert type(message) is cls
    assert message.phy_id == "%08X" % phy
    assert message.msg_id == msg_id
    assert ap3000.encode(message) == frame
    assert ap3000.decode(ap3000.encode(message), cls.direction) == message
    # the JSON view is free of internal markers
    assert chargeproto.ABSENT not in message.to_fields().values()


_FREE = {d: [c for c in range(256) if ap3000.message_class(c, d) is None] for d in ("up", "down")}


@settings(max_examples=150)
@given(
    direction_command=st.sampled_from(["up", "down"]).flatmap(
        lambda d: st.tuples(st.just(d), st.sampled_from(_FREE[d]))
    ),
    payload=st.binary(max_size=64),
    phy=phy_ids,
    msg_id=msg_ids,
)
def test_roundtrip_unknown_message(
    direction_command: tuple[str, int], payload: bytes, phy: int, msg_id: int
) -> None:
    direction, command = direction_command
    frame = ap3000.build_frame(phy, msg_id, command, payload)
    message = ap3000.decode(frame, direction)
    assert isinstance(message, ap3000.UnknownMessage)
    assert message.unknown_command == command
    assert message.payload_hex == payload.hex().upper()
    assert message.unknown_direction == direction
    assert ap3000.encode(message) == frame
    assert ap3000.decode(ap3000.encode(message), direction) == message


def test_unknown_commands_exist_in_both_directions() -> None:
    """The unknown-message test above has codes to draw from."""
    assert _FREE["up"]
    assert _FREE["down"]


# --- the generated decoder against construct's compiled parser ---------------------------


@functools.cache
def _compiled(cls: type[ap3000.Ap3000Message]) -> Any:
    return cls.WIRE.compile()


def _flatten_container(container: Any) -> tuple[dict[str, Any], list[int]]:
    """Construct's parse result as {wire name: raw value}, plus the optional groups
    (by index) that parsed as None."""
    out: dict[str, Any] = {}
    absent: list[int] = []
    for key, value in container.items():
        if key.startswith("_io"):
            continue
        if key.startswith(OPT_PREFIX):
            if value is None:
                absent.append(int(key[len(OPT_PREFIX) :]))
            else:
                inner, inner_absent = _flatten_container(value)
                out.update(inner)
                absent += inner_absent
            continue
        if isinstance(value, cs.ListContainer):
            out[key] = [
                _flatten_container(v)[0] if isinstance(v, cs.Container) else v for v in value
            ]
        else:
            out[key] = value
    return out, absent


@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
@settings(max_examples=20)
@given(data=st.data())
def test_generated_code_matches_construct(cls: type[ap3000.Ap3000Message], data: Any) -> None:
    raw, payload, present = data.draw(raw_payloads(cls))
    _, optional = groups_of(cls)
    parsed, absent = _flatten_container(_compiled(cls).parse(payload))
    assert parsed == raw
    if present < len(optional):
        assert absent == [present]
    else:
        assert absent == []
    # and the generated decoder reads the same fields, in the same places
    spans = cls.codec.spans(payload, 0, len(payload))
    names = [name for name, _, _ in spans if name != "trailing_hex"]
    assert names == list(raw)


@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
@settings(max_examples=20)
@given(payload=st.binary(max_size=80))
def test_generated_decoder_agrees_with_construct_on_any_payload(
    cls: type[ap3000.Ap3000Message], payload: bytes
) -> None:
    """On arbitrary bytes, the generated decoder succeeds exactly when construct's
    parser does (construct ignores what follows the declaration, the generated decoder
    keeps it as trailing_hex). The reference here is construct's interpreter: its
    compiled ``Bytes(n)`` does not check for a short read (construct 2.10 quirk)."""
    frame = _frame(cls, 0x04CEAA40, 1, payload)
    try:
        cls.WIRE.parse(payload)
    except cs.ConstructError:
        construct_ok = False
    else:
        construct_ok = True
    try:
        message = ap3000.decode(frame, cls.direction)
    except chargeproto.DecodeError:
        assert not construct_ok, f"construct parses what the decoder rejects: {frame.hex()}"
        return
    assert construct_ok, f"the decoder accepts what construct rejects: {frame.hex()}"
    if not _lossy_text(cls):
        assert ap3000.encode(message) == frame


def _lossy_text(cls: type[ap3000.Ap3000Message]) -> bool:
    """Text fields are cut at the first NUL, so arbitrary bytes there cannot come back."""
    from chargeproto._units import Ascii

    return any(isinstance(cls.codec.converter(f.name), Ascii) for f in cls.codec.fields)


# --- hostile payloads ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
@settings(max_examples=20)
@given(payload=st.binary(max_size=300))
def test_random_payload_raises_only_decode_errors(
    cls: type[ap3000.Ap3000Message], payload: bytes
) -> None:
    frame = _frame(cls, 0x09D62684, 7, payload)
    try:
        message = ap3000.decode(frame, cls.direction)
    except chargeproto.DecodeError:
        return
    assert type(message) is cls
    message.to_fields()


@settings(max_examples=300)
@given(data=st.binary(max_size=300), direction=st.sampled_from(["up", "down"]))
def test_random_frames_raise_only_decode_errors(data: bytes, direction: str) -> None:
    for candidate in (data, b"DNY" + data):
        with contextlib.suppress(chargeproto.DecodeError):
            ap3000.decode(candidate, direction)


@settings(max_examples=300)
@given(
    command=st.integers(0, 0xFF),
    payload=st.binary(max_size=300),
    direction=st.sampled_from(["up", "down"]),
)
def test_random_payload_any_command_raises_only_decode_errors(
    command: int, payload: bytes, direction: str
) -> None:
    frame = ap3000.build_frame(0x04CEAA40, 1, command, payload)
    try:
        message = ap3000.decode(frame, direction)
    except chargeproto.DecodeError as exc:
        assert exc.offset is None or 0 <= exc.offset <= len(frame)
        return
    message.to_fields()
