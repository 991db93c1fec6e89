"""The AP3000 stream decoder: reassembly in any chunking, resynchronisation after
garbage and bad frames, a bounded buffer, and nothing but events on hostile input."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from ap3000_support import FRAME_VECTORS, STRING_VECTORS, vector_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

import chargeproto
from chargeproto import ap3000

UP_FRAMES = [vector_bytes(v) for v in FRAME_VECTORS if v["direction"] == "up"]
DOWN_FRAMES = [vector_bytes(v) for v in FRAME_VECTORS if v["direction"] == "down"]
HEARTBEAT = bytes.fromhex("444e5910003b37ab0401002198080200000905ee02")
EVENT_TYPES = (
    chargeproto.MessageReceived,
    chargeproto.IccidReceived,
    chargeproto.KeepaliveReceived,
    chargeproto.StreamError,
)


def heartbeat(msg_id: int, voltage: float = 220.0) -> bytes:
    message = ap3000.Heartbeat(
        "04CEAA40",
        msg_id,
        voltage,
        (ap3000.PortState(0, 1), ap3000.PortState(1, 0)),
        9,
        25,
    )
    return ap3000.encode(message)


def expected(item: bytes, direction: str = "up") -> chargeproto.Event:
    if item == b"link":
        return chargeproto.KeepaliveReceived()
    if item.startswith(b"89"):
        return chargeproto.IccidReceived(item.decode("ascii"), item)
    return chargeproto.MessageReceived("ap3000", ap3000.decode(item, direction), item)


def feed_chunks(
    decoder: ap3000.Ap3000StreamDecoder, data: bytes, cuts: list[int]
) -> list[chargeproto.Event]:
    """Feed ``data`` split at ``cuts``, checking the buffer bound after every feed."""
    events: list[chargeproto.Event] = []
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for start, end in itertools.pairwise(bounds):
        events += decoder.feed(data[start:end])
        assert decoder.buffered <= decoder.max_frame
    return events


def raw_of(events: list[chargeproto.Event]) -> bytes:
    return b"".join(e.raw for e in events)


iccids = st.text("0123456789ABCDEFabcdef", min_size=18, max_size=18).map(
    lambda tail: ("89" + tail).encode("ascii")
)
items = st.one_of(
    st.sampled_from(UP_FRAMES),
    st.builds(heartbeat, st.integers(0, 0xFFFF), st.integers(0, 6553).map(lambda v: v / 10)),
    st.sampled_from([vector_bytes(v) for v in STRING_VECTORS]),
    iccids,
    st.just(b"link"),
)


@settings(max_examples=150)
@given(sequence=st.lists(items, max_size=12), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_items_in_any_chunking(sequence: list[bytes], cuts: list[int]) -> None:
    decoder = ap3000.Ap3000StreamDecoder()
    events = feed_chunks(decoder, b"".join(sequence), cuts)
    assert events == [expected(item) for item in sequence]
    assert decoder.buffered == 0


@settings(max_examples=50)
@given(sequence=st.lists(st.sampled_from(DOWN_FRAMES), max_size=10), data=st.data())
def test_server_frames_decode_down(sequence: list[bytes], data: Any) -> None:
    stream = b"".join(sequence)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    decoder = ap3000.Ap3000StreamDecoder("down")
    events = feed_chunks(decoder, stream, cuts)
    assert events == [expected(item, "down") for item in sequence]
    assert all(e.message.direction is chargeproto.Direction.DOWN for e in events)


def test_down_decoder_uses_down_layouts() -> None:
    start = bytes.fromhex(
        "444e5926003b37ab040200820064010000010100001234567812345678123456781234567880708813f808"
    )
    (event,) = ap3000.Ap3000StreamDecoder("down").feed(start)
    assert isinstance(event.message, ap3000.ChargeControl)
    (event,) = ap3000.Ap3000StreamDecoder("up").feed(start)
    assert isinstance(event.message, ap3000.ChargeControlReply)


# --- garbage, bad checksums, bad lengths ------------------------------------------------

_NOT_A_START = st.binary(min_size=1, max_size=60).map(
    lambda b: bytes(x for x in b if x not in b"Dl8") or b"\x00"
)


@settings(max_examples=100)
@given(garbage=_NOT_A_START)
def test_garbage_before_a_header_is_one_error(garbage: bytes) -> None:
    decoder = ap3000.Ap3000StreamDecoder()
    events = decoder.feed(garbage + HEARTBEAT)
    assert len(events) == 2
    error, message = events
    assert isinstance(error, chargeproto.StreamError)
    assert isinstance(error.error, chargeproto.GarbageError)
    assert error.raw == garbage
    assert message == expected(HEARTBEAT)


@settings(max_examples=100)
@given(garbage=st.binary(max_size=60))
def test_any_garbage_before_a_frame_is_skipped(garbage: bytes) -> None:
    decoder = ap3000.Ap3000StreamDecoder()
    events = decoder.feed(garbage + HEARTBEAT)
    assert events[-1] == expected(HEARTBEAT)
    assert all(isinstance(e, EVENT_TYPES) for e in events)
    assert raw_of(events) == garbage + HEARTBEAT


def test_garbage_with_candidate_bytes_is_still_one_error() -> None:
    garbage = b"xxDNxlinxx8x89zzD"
    events = ap3000.Ap3000StreamDecoder().feed(garbage + HEARTBEAT)
    assert [type(e) for e in events] == [chargeproto.StreamError, chargeproto.MessageReceived]
    assert isinstance(events[0].error, chargeproto.GarbageError)
    assert events[0].raw == garbage


def test_bad_checksum_then_next_frame() -> None:
    bad = HEARTBEAT[:-1] + bytes([HEARTBEAT[-1] ^ 0xFF])
    following = heartbeat(2)
    events = ap3000.Ap3000StreamDecoder().feed(bad + following)
    assert len(events) == 2
    assert isinstance(events[0], chargeproto.StreamError)
    assert isinstance(events[0].error, chargeproto.ChecksumError)
    assert events[0].raw == bad
    assert events[0].error.expected == int.from_bytes(HEARTBEAT[-2:], "little")
    assert events[1] == expected(following)


@pytest.mark.parametrize("frame", UP_FRAMES[:6])
def test_bad_checksum_each_position(frame: bytes) -> None:
    """Any corrupted payload byte gives a checksum error; the next frame survives."""
    for index in range(12, len(frame) - 2):
        bad = bytearray(frame)
        bad[index] ^= 0x01
        events = ap3000.Ap3000StreamDecoder().feed(bytes(bad) + HEARTBEAT)
        errors = [e for e in events if isinstance(e, chargeproto.StreamError)]
        assert isinstance(errors[0].error, chargeproto.ChecksumError)
        assert events[-1] == expected(HEARTBEAT)
        assert raw_of(events) == bytes(bad) + HEARTBEAT


def test_length_above_max_frame() -> None:
    decoder = ap3000.Ap3000StreamDecoder(max_frame=64)
    huge = b"DNY" + (0xFFF0).to_bytes(2, "little") + bytes(200)
    events = decoder.feed(huge)
    assert isinstance(events[0], chargeproto.StreamError)
    assert isinstance(events[0].error, chargeproto.LengthError)
    assert events[0].error.actual == 0xFFF0
    assert decoder.buffered <= decoder.max_frame
    events = decoder.feed(HEARTBEAT)
    assert events[-1] == expected(HEARTBEAT)
    assert decoder.buffered == 0


def test_length_below_minimum() -> None:
    short = b"DNY" + (8).to_bytes(2, "little")
    events = ap3000.Ap3000StreamDecoder().feed(short + HEARTBEAT)
    assert isinstance(events[0].error, chargeproto.LengthError)
    assert events[-1] == expected(HEARTBEAT)


def test_length_error_raw_is_what_was_dropped() -> None:
    """Every byte fed is reported exactly once, by exactly one event."""
    data = b"DNY" + (0xFFF0).to_bytes(2, "little") + HEARTBEAT
    events = ap3000.Ap3000StreamDecoder().feed(data)
    assert raw_of(events) == data
    assert events[-1] == expected(HEARTBEAT)


def test_largest_documented_frame_fits_the_default_bound() -> None:
    packet = ap3000.LegacyFirmwarePacket("04CEAA40", 1, 3, 1, "AB" * 256)
    frame = ap3000.encode(packet)
    assert len(frame) == 274
    (event,) = ap3000.Ap3000StreamDecoder("down").feed(frame)
    assert event.message == packet


def test_buffer_stays_bounded_while_waiting() -> None:
    decoder = ap3000.Ap3000StreamDecoder(max_frame=64)
    header = b"DNY" + (59).to_bytes(2, "little")
    decoder.feed(header)
    for _ in range(200):
        decoder.feed(b"\x00")
        assert decoder.buffered <= decoder.max_frame
    decoder.feed(HEARTBEAT)
    assert decoder.buffered <= decoder.max_frame


def test_max_frame_must_admit_an_empty_frame() -> None:
    with pytest.raises(ValueError):
        ap3000.Ap3000StreamDecoder(max_frame=13)


# --- fuzz ---------------------------------------------------------------------------------


def _check_fuzz(decoder: ap3000.Ap3000StreamDecoder, data: bytes, cuts: list[int]) -> None:
    events = feed_chunks(decoder, data, cuts)
    for event in events:
        assert isinstance(event, EVENT_TYPES)
        if isinstance(event, chargeproto.StreamError):
            assert isinstance(event.error, chargeproto.DecodeError)
            assert event.raw
        elif isinstance(event, chargeproto.MessageReceived):
            assert event.message == ap3000.decode(event.raw, decoder.direction)
    # every byte is either reported once, in order, or still buffered
    assert raw_of(events) == data[: len(data) - decoder.buffered]


@settings(max_examples=200)
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=30),
    direction=st.sampled_from(["up", "down"]),
    max_frame=st.sampled_from([14, 64, 512]),
)
def test_fuzz_arbitrary_bytes(data: bytes, cuts: list[int], direction: str, max_frame: int) -> None:
    _check_fuzz(ap3000.Ap3000StreamDecoder(direction, max_frame=max_frame), data, cuts)


_mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10_000), st.integers(0, 255)
)


@settings(max_examples=200)
@given(
    frames=st.lists(st.sampled_from(UP_FRAMES + DOWN_FRAMES + [b"link"]), min_size=1, max_size=8),
    mutations=st.lists(_mutation, max_size=6),
    cuts=st.lists(st.integers(0, 600), max_size=20),
    direction=st.sampled_from(["up", "down"]),
)
def test_fuzz_mutated_frames(
    frames: list[bytes], mutations: list[tuple[str, int, int]], cuts: list[int], direction: str
) -> None:
    data = bytearray(b"".join(frames))
    for kind, position, value in mutations:
        index = position % (len(data) + 1)
        if kind == "insert":
            data.insert(index, value)
        elif data and index < len(data):
            if kind == "flip":
                data[index] ^= 1 << (value % 8)
            else:
                del data[index]
    _check_fuzz(ap3000.Ap3000StreamDecoder(direction), bytes(data), cuts)


def test_decoded_pile_ids_are_one_object_per_id_and_the_table_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long-running receiver keeps pile ids in many tables: every frame's decoded id is
    the same object, and a sender of ever new ids costs a bounded table."""
    import chargeproto._texts as texts
    from chargeproto import StreamDecoder, shared_text

    first, second = StreamDecoder().feed(heartbeat(1)), StreamDecoder().feed(heartbeat(2))
    assert isinstance(first[0], chargeproto.MessageReceived)
    assert isinstance(second[0], chargeproto.MessageReceived)
    assert first[0].message.phy_id is second[0].message.phy_id
    monkeypatch.setattr(texts, "MAX_SHARED_TEXTS", 100)
    for n in range(1000):
        shared_text(f"id-{n}")
    assert len(texts._texts) <= 100
    assert shared_text("04CEAA40") == "04CEAA40"
