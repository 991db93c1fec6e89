"""Stream decoding: BKV alone, and mixed connections through the detecting decoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import chargeproto
from chargeproto import ap3000, bkv

settings.register_profile("stream", max_examples=100, deadline=None)
settings.load_profile("stream")

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
BKV_VECTORS: list[dict[str, Any]] = json.loads((FIXTURES / "bkv.json").read_text())
AP_VECTORS: list[dict[str, Any]] = json.loads((FIXTURES / "ap3000.json").read_text())

BKV_FRAMES = [bytes.fromhex(v["hex"]) for v in BKV_VECTORS if v["valid"]]
AP_UP = [
    bytes.fromhex(v["hex"])
    for v in AP_VECTORS
    if v["direction"] == "up" and v["command"] not in ("iccid", "link")
]
ICCID = next(bytes.fromhex(v["hex"]) for v in AP_VECTORS if v["command"] == "iccid")
LINK = b"link"
BKV_STREAM = b"".join(BKV_FRAMES)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


def feed_all(decoder: Any, chunks: list[bytes]) -> list[chargeproto.Event]:
    events: list[chargeproto.Event] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
        assert decoder.buffered <= 4096
    return events


def messages(events: list[chargeproto.Event]) -> list[bytes]:
    return [e.raw for e in events if isinstance(e, chargeproto.MessageReceived)]


def errors(events: list[chargeproto.Event]) -> list[chargeproto.DecodeError]:
    return [e.error for e in events if isinstance(e, chargeproto.StreamError)]


# --- BKV alone ---------------------------------------------------------------------------


def test_each_vector_byte_by_byte() -> None:
    for frame in BKV_FRAMES:
        decoder = bkv.BkvStreamDecoder()
        events = feed_all(decoder, [frame[i : i + 1] for i in range(len(frame))])
        assert len(events) == 1 and isinstance(events[0], chargeproto.MessageReceived)
        assert events[0].message == bkv.decode(frame)
        assert events[0].protocol == "bkv"
        assert decoder.buffered == 0


def test_all_vectors_in_one_chunk() -> None:
    events = bkv.BkvStreamDecoder().feed(BKV_STREAM)
    assert messages(events) == BKV_FRAMES
    assert not errors(events)


@given(cuts=st.lists(st.integers(0, len(BKV_STREAM)), max_size=40))
def test_random_split(cuts: list[int]) -> None:
    events = feed_all(bkv.BkvStreamDecoder(), split(BKV_STREAM, cuts))
    assert messages(events) == BKV_FRAMES
    assert not errors(events)


def test_bad_checksum_is_reported_and_the_stream_continues() -> None:
    broken = next(bytes.fromhex(v["hex"]) for v in BKV_VECTORS if v.get("defects") == ["checksum"])
    good = BKV_FRAMES[0]
    events = bkv.BkvStreamDecoder().feed(good + broken + good)
    assert messages(events) == [good, good]
    assert [type(e) for e in errors(events)] == [chargeproto.ChecksumError]


def test_garbage_wrong_tail_and_bad_length_resynchronise() -> None:
    good = BKV_FRAMES[1]
    bad_length = b"\xfc\xfe\x00\x05"  # below the 17-byte minimum
    huge = b"\xfc\xff\xff\xff"  # above max_frame
    wrong_tail = bytearray(good)
    wrong_tail[-1] = 0x00
    data = b"junk" + good + bad_length + huge + bytes(wrong_tail) + b"\x00\xfc" + good
    events = feed_all(bkv.BkvStreamDecoder(), [data])
    assert messages(events) == [good, good]
    kinds = {type(e) for e in errors(events)}
    assert chargeproto.LengthError in kinds and chargeproto.TailError in kinds
    assert chargeproto.GarbageError in kinds


def test_iccid_and_link_are_tolerated() -> None:
    events = bkv.BkvStreamDecoder().feed(ICCID + BKV_FRAMES[0] + LINK + BKV_FRAMES[1])
    assert isinstance(events[0], chargeproto.IccidReceived)
    assert isinstance(events[2], chargeproto.KeepaliveReceived)
    assert messages(events) == BKV_FRAMES[:2]


def test_frame_bytes_inside_a_payload_do_not_split_it() -> None:
    payload = bytes.fromhex("fcfe0015fcee" * 3)
    frame = bkv.build_frame("up", 0x4242, 7, "82231214002700", payload)
    events = feed_all(bkv.BkvStreamDecoder(), [frame[:5], frame[5:]])
    assert messages(events) == [frame]
    message = events[0].message  # type: ignore[union-attr]
    assert isinstance(message, bkv.UnknownMessage)


# --- fuzz: only DecodeError, bounded buffer -----------------------------------------------


@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=10))
def test_arbitrary_bytes_only_produce_events(data: bytes, cuts: list[int]) -> None:
    for decoder in (bkv.BkvStreamDecoder(max_frame=256), chargeproto.StreamDecoder()):
        for event in feed_all(decoder, split(data, cuts)):
            if isinstance(event, chargeproto.StreamError):
                assert isinstance(event.error, chargeproto.DecodeError)
        assert decoder.buffered <= 4096


@given(
    frame=st.sampled_from(BKV_FRAMES),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_frames_raise_only_decode_errors(
    frame: bytes, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(frame)
    for position, value in flips:
        data[position % len(data)] = value
    try:
        message = bkv.decode(bytes(data))
    except chargeproto.DecodeError:
        pass
    else:
        assert bkv.decode(bkv.encode(message)) == message
    decoder = bkv.BkvStreamDecoder(max_frame=256)
    events = decoder.feed(bytes(data) + frame)
    for event in events:
        if isinstance(event, chargeproto.StreamError):
            assert isinstance(event.error, chargeproto.DecodeError)
    # the intact frame after the mutated one is found, unless a corrupt length field
    # still waits for bytes that would include it
    assert messages(events)[-1:] == [frame] or decoder.buffered > 0


@given(
    payload=st.binary(max_size=300),
    command=st.sampled_from([0x0000, 0x0005, 0x0007, 0x0015, 0x1000, 0x4242]),
    direction=st.sampled_from(["up", "down"]),
)
def test_well_framed_random_payloads_raise_only_decode_errors(
    payload: bytes, command: int, direction: str
) -> None:
    frame = bkv.build_frame(direction, command, 1, "82231214002700", payload)
    try:
        message = bkv.decode(frame)
    except chargeproto.DecodeError:
        return
    assert bkv.decode(bkv.encode(message)) == message
    message.to_fields()


def test_buffer_is_bounded_while_waiting_for_a_long_frame() -> None:
    decoder = bkv.BkvStreamDecoder(max_frame=256)
    head = b"\xfc\xfe\x00\xfc"  # announces 256 bytes: the largest allowed
    events = decoder.feed(head + b"\x00" * 250)
    assert not events and decoder.buffered == 254
    events = decoder.feed(b"\x00" * 10)
    assert decoder.buffered < 256
    assert errors(events)


# --- mixed connections through the detecting decoder ----------------------------------------

AP_CONNECTION = ICCID + AP_UP[0] + LINK + b"".join(AP_UP[1:])


@given(
    ap_cuts=st.lists(st.integers(0, len(AP_CONNECTION)), max_size=30),
    bkv_cuts=st.lists(st.integers(0, len(BKV_STREAM)), max_size=30),
    order=st.lists(st.booleans(), max_size=80),
)
def test_two_connections_random_split(
    ap_cuts: list[int], bkv_cuts: list[int], order: list[bool]
) -> None:
    connections = {
        "ap3000": (chargeproto.StreamDecoder(), split(AP_CONNECTION, ap_cuts)),
        "bkv": (chargeproto.StreamDecoder(), split(BKV_STREAM, bkv_cuts)),
    }
    seen: dict[str, list[chargeproto.Event]] = {"ap3000": [], "bkv": []}
    # interleave the two connections' chunks in a random order
    turns = iter(order)
    while any(chunks for _, chunks in connections.values()):
        name = "ap3000" if next(turns, True) else "bkv"
        decoder, chunks = connections[name]
        if not chunks:
            name = "bkv" if name == "ap3000" else "ap3000"
            decoder, chunks = connections[name]
        seen[name].extend(decoder.feed(chunks.pop(0)))
        assert decoder.buffered <= 4096
    ap_decoder, _ = connections["ap3000"]
    bkv_decoder, _ = connections["bkv"]
    assert ap_decoder.protocol == "ap3000" and bkv_decoder.protocol == "bkv"
    assert messages(seen["ap3000"]) == AP_UP
    assert messages(seen["bkv"]) == BKV_FRAMES
    assert not errors(seen["ap3000"]) and not errors(seen["bkv"])
    assert isinstance(seen["ap3000"][0], chargeproto.IccidReceived)
    assert sum(isinstance(e, chargeproto.KeepaliveReceived) for e in seen["ap3000"]) == 1
    for event in seen["ap3000"]:
        if isinstance(event, chargeproto.MessageReceived):
            assert event.message == ap3000.decode(event.raw, "up")


def test_detection_skips_garbage_and_reports_preamble() -> None:
    decoder = chargeproto.StreamDecoder()
    events = decoder.feed(b"\x00\x01" + LINK + ICCID + b"zz")
    assert decoder.protocol is None
    kinds = [type(e) for e in events]
    assert kinds == [
        chargeproto.StreamError,
        chargeproto.KeepaliveReceived,
        chargeproto.IccidReceived,
        chargeproto.StreamError,
    ]
    assert isinstance(events[0].error, chargeproto.ProtocolDetectionError)  # type: ignore[union-attr]
    events = decoder.feed(b"\xfc")
    assert not events and decoder.buffered == 1
    events = decoder.feed(BKV_FRAMES[0][1:])
    assert decoder.protocol == "bkv"
    assert messages(events) == [BKV_FRAMES[0]]
