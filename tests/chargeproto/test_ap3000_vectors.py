"""Golden vectors: every AP3000 vector decodes to its fields and re-encodes byte-exact,
one byte at a time and all concatenated through the stream decoder as well."""

from __future__ import annotations

from typing import Any

import pytest
from ap3000_support import (
    DEFECT_ERRORS,
    FRAME_VECTORS,
    STRING_VECTORS,
    VECTORS,
    all_fields,
    same_value,
    vector_bytes,
)

import chargeproto
from chargeproto import ap3000


def _ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


def check_vector(vector: dict[str, Any]) -> None:
    """Assert what a frame vector promises: its fields, or the error of its defects."""
    if not vector["valid"]:
        expected = tuple(DEFECT_ERRORS[d] for d in vector["defects"] if d in DEFECT_ERRORS)
        assert expected, f"{vector['name']}: no AP3000 error for defects {vector['defects']}"
        with pytest.raises(chargeproto.DecodeError) as info:
            ap3000.decode(vector_bytes(vector), vector["direction"])
        assert isinstance(info.value, expected), (vector["name"], info.value)
        return
    frame = vector_bytes(vector)
    message = ap3000.decode(frame, vector["direction"])
    assert type(message).direction.value == vector["direction"]
    assert message.command == int(vector["command"], 16)
    decoded = all_fields(message, frame)
    wrong = {
        name: (decoded.get(name, "<missing>"), expected)
        for name, expected in vector["fields"].items()
        if name not in decoded or not same_value(decoded[name], expected)
    }
    assert not wrong, f"{vector['name']}: field -> (decoded, expected): {wrong}"
    assert ap3000.encode(message) == frame


def test_vector_file_is_complete() -> None:
    assert len(VECTORS) == 37
    assert len(STRING_VECTORS) == 3
    assert len({v["name"] for v in VECTORS}) == len(VECTORS)


@pytest.mark.parametrize("vector", FRAME_VECTORS, ids=_ids(FRAME_VECTORS))
def test_frame_vector(vector: dict[str, Any]) -> None:
    check_vector(vector)


@pytest.mark.parametrize("vector", FRAME_VECTORS, ids=_ids(FRAME_VECTORS))
def test_frame_vector_fields_are_canonical(vector: dict[str, Any]) -> None:
    """Nothing the vector lists is derived differently by ``to_fields`` and the frame."""
    if not vector["valid"]:
        pytest.skip("invalid vector")
    frame = vector_bytes(vector)
    message = ap3000.decode(frame, vector["direction"])
    fields = message.to_fields()
    # absent optional fields are absent, never None or a default
    assert all(value is not chargeproto.ABSENT for value in fields.values())
    # decoding twice gives equal, hashable (frozen) messages
    assert ap3000.decode(frame, vector["direction"]) == message
    hash(message)


_SYNTHETIC_DEFECTS = [
    ("checksum", lambda f: f[:-1] + bytes([f[-1] ^ 0x01])),
    ("length", lambda f: f[:3] + (len(f) - 4).to_bytes(2, "little") + f[5:]),
    ("header", lambda f: b"DNZ" + f[3:]),
    ("truncated", lambda f: f[:4]),
]


@pytest.mark.parametrize(
    ("defect", "damage"), _SYNTHETIC_DEFECTS, ids=[d for d, _ in _SYNTHETIC_DEFECTS]
)
def test_invalid_vector_path(defect: str, damage: Any) -> None:
    """The ``valid: false`` branch works, on damaged copies of a real vector."""
    good = FRAME_VECTORS[0]
    bad = dict(good, valid=False, defects=[defect], hex=damage(vector_bytes(good)).hex())
    check_vector(bad)


def test_invalid_vector_path_hex() -> None:
    good = FRAME_VECTORS[0]
    check_vector(dict(good, valid=False, defects=["hex"], hex=good["hex"][:-1] + "g"))


# --- the stream decoder ----------------------------------------------------------------


def expected_event(vector: dict[str, Any]) -> chargeproto.Event:
    raw = vector_bytes(vector)
    if vector["command"] == "iccid":
        assert vector["fields"]["iccid"] == raw.decode("ascii")
        return chargeproto.IccidReceived(vector["fields"]["iccid"], raw)
    if vector["command"] == "link":
        assert vector["fields"] == {"keepalive": True}
        return chargeproto.KeepaliveReceived(raw)
    return chargeproto.MessageReceived("ap3000", ap3000.decode(raw, vector["direction"]), raw)


@pytest.mark.parametrize("vector", VECTORS, ids=_ids(VECTORS))
def test_vector_one_byte_at_a_time(vector: dict[str, Any]) -> None:
    decoder = ap3000.Ap3000StreamDecoder(vector["direction"])
    events: list[chargeproto.Event] = []
    for byte in vector_bytes(vector):
        events += decoder.feed(bytes([byte]))
    assert events == [expected_event(vector)]
    assert decoder.buffered == 0


@pytest.mark.parametrize("direction", ["up", "down"])
def test_vectors_concatenated(direction: str) -> None:
    """All vectors of one direction (strings included) in a single feed."""
    vectors = [v for v in VECTORS if v["direction"] == direction and v["valid"]]
    assert vectors
    stream = b"".join(vector_bytes(v) for v in vectors)
    decoder = ap3000.Ap3000StreamDecoder(direction)
    events = decoder.feed(stream)
    assert not [e for e in events if isinstance(e, chargeproto.StreamError)]
    assert events == [expected_event(v) for v in vectors]
    assert decoder.buffered == 0


@pytest.mark.parametrize("direction", ["up", "down"])
def test_every_vector_concatenated_in_one_feed(direction: str) -> None:
    """The whole file, both directions, in one feed: framing does not depend on the
    direction, so every item comes back in order. Frames of the stream's own direction
    decode exactly; the other side's frames decode as this side's layout or are
    reported, whole, as a payload error, and the stream goes on."""
    stream = b"".join(vector_bytes(v) for v in VECTORS)
    decoder = ap3000.Ap3000StreamDecoder(direction)
    events = decoder.feed(stream)
    assert [e.raw for e in events] == [vector_bytes(v) for v in VECTORS]
    assert decoder.buffered == 0
    for event, vector in zip(events, VECTORS, strict=True):
        if vector["direction"] == direction or vector["command"] in ("iccid", "link"):
            assert event == expected_event(vector)
        elif isinstance(event, chargeproto.StreamError):
            assert isinstance(event.error, chargeproto.PayloadError | chargeproto.TruncatedError)
            with pytest.raises(type(event.error)):
                ap3000.decode(event.raw, direction)
        else:
            assert isinstance(event, chargeproto.MessageReceived)
            assert event.message == ap3000.decode(event.raw, direction)


def test_string_vectors_are_not_frames() -> None:
    for vector in STRING_VECTORS:
        with pytest.raises(chargeproto.DecodeError):
            ap3000.decode(vector_bytes(vector), vector["direction"])
