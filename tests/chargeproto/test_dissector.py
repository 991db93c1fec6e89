"""The generated Wireshark dissector, run by Debian's tshark on pcaps that
``chargegw.capture.write_pcap`` writes: every field it shows equals the value
``chargeproto decode`` gives (the record of :func:`chargeproto.to_record`), and
every value of the record is shown, except those the dissector documents as not
shown (values derived in Python, TLV bookkeeping, ``None`` temperatures).

tshark runs as root here; Wireshark 4.0 loads Lua scripts for root
(``run_user_scripts_when_superuser`` is true in its init.lua). Each run gets a
private, empty configuration directory (``WIRESHARK_CONFIG_DIR`` and ``HOME``), so
no personal plugin or preference of the machine takes part.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ap3000_support import raw_payloads
from bkv_support import FIXED, TLV, fixed_message, tlv_container, tlv_message
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from chargegw import capture
from chargeproto import ap3000, bkv, to_record
from chargeproto._cli import main
from chargeproto._dissector import (
    AP3000_PORT,
    BKV_PORT,
    dissector_field_types,
    dissector_lua,
    raw_fallbacks,
)

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(
    TSHARK is None, reason="tshark is not installed (Debian package tshark)"
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
AP3000_VECTORS = [
    v
    for v in json.loads((FIXTURES / "ap3000.json").read_text())
    if v.get("valid") and v["command"] not in ("iccid", "link")
]
BKV_VECTORS = [v for v in json.loads((FIXTURES / "bkv.json").read_text()) if v.get("valid")]

#: dissector fields that are not in the record: the frame's bytes as such
FRAME_ONLY = {"header", "tail", "checksum.status", "direction_byte", "preamble"}
#: record keys the dissector does not show (bookkeeping of the lossless record form)
NOT_SHOWN = {"tlv_order", "raw_items", "tlv_markers", "field_notes"}
_START = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

FIELD_TYPES = dissector_field_types()
CONTAINERS = {key for key, ftype in FIELD_TYPES.items() if ftype == "none"}


# --- running tshark -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sent:
    """A frame as written to the pcap: its protocol, direction and bytes."""

    protocol: str
    direction: str  # "up" (device) or "down" (server)
    data: bytes


def _frames(connection: str, sent: Sequence[Sent]) -> Iterator[capture.CaptureFrame]:
    for i, frame in enumerate(sent):
        yield capture.CaptureFrame(
            at=_START + timedelta(milliseconds=i),
            direction="in" if frame.direction == "up" else "out",
            connection=connection,
            protocol=frame.protocol,
            hex=frame.data.hex(),
        )


@pytest.fixture(scope="module")
def lua(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lua") / "chargeproto.lua"
    result = CliRunner().invoke(main, ["dissector", "--out", str(path)])
    assert result.exit_code == 0, result.output
    return path


def tshark(lua: Path, pcap: Path, *options: str) -> list[list[ET.Element]]:
    """The ap3000/bkv protocol subtrees of each packet (a list per packet)."""
    assert TSHARK is not None
    config = pcap.parent / "wireshark-config"
    config.mkdir(exist_ok=True)
    env = {**os.environ, "WIRESHARK_CONFIG_DIR": str(config), "HOME": str(config)}
    result = subprocess.run(
        [TSHARK, "-n", "-X", f"lua_script:{lua}", "-r", str(pcap), "-T", "pdml", *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Lua: Error" not in result.stderr and "lua_script" not in result.stderr, result.stderr
    root = ET.fromstring(result.stdout)
    errors = [f.get("showname") for f in root.iter("field") if f.get("name") == "_ws.lua.error"]
    assert not errors, errors
    packets = root.findall("packet")
    return [
        [proto for proto in packet.findall("proto") if proto.get("name") in ("ap3000", "bkv")]
        for packet in packets
    ]


def write_pcap(path: Path, connections: dict[str, Sequence[Sent]]) -> Path:
    frames = [f for conn, sent in connections.items() for f in _frames(conn, sent)]
    with path.open("wb") as out:
        capture.write_pcap(out, frames)
    return path


# --- what the dissector shows, as record paths -------------------------------------------


def shown_fields(proto: ET.Element) -> dict[str, list[ET.Element]]:
    """Record path (``ports[1].status``, ``tag_98``) -> the PDML fields shown for it."""
    out: dict[str, list[ET.Element]] = {}
    _walk(proto, proto.get("name", ""), "", out)
    return out


def _walk(elem: ET.Element, prefix: str, path: str, out: dict[str, list[ET.Element]]) -> None:
    counters: dict[str, int] = {}
    for child in elem.findall("field"):
        name = child.get("name", "")
        if name == "bkv.tlv.raw":  # a raw TLV item, at any depth
            tag = next(c for c in child.findall("field") if c.get("name") == "bkv.tlv.tag")
            out.setdefault(f"{path}tag_{int(tag.get('show', ''), 16):02x}", []).append(child)
            continue
        if not name.startswith(prefix + "."):
            continue  # text items, expert info
        rel = name[len(prefix) + 1 :]
        if name in CONTAINERS:
            index = counters.get(rel, 0)
            counters[rel] = index + 1
            _walk(child, name, f"{path}{rel}[{index}].", out)
        else:
            out.setdefault(path + rel, []).append(child)


def flatten(value: Any, path: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(item, f"{path}.{key}" if path else key, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            flatten(item, f"{path}[{i}]", out)
    else:
        out[path] = value
    return out


def expected_fields(data: bytes, protocol: str, direction: str) -> tuple[dict[str, Any], set[str]]:
    """The flattened record ``chargeproto decode`` prints for the frame, and the paths
    of the values the codec derives in Python (not shown by the dissector)."""
    message = ap3000.decode(data, direction) if protocol == "ap3000" else bkv.decode(data)
    record = to_record(message, frame=data)
    head = {k: v for k, v in record.items() if k not in ("fields", "protocol", "name")}
    head["message"] = record["name"]
    head["command"] = int(record["command"].split("/")[0], 16)
    fields = {k: v for k, v in record["fields"].items() if k not in NOT_SHOWN}
    for key in ("unknown_command", "unknown_sub_cmd"):
        if fields.get(key) is True:  # the flag bkv's to_fields adds for a raw payload
            del fields[key]
    flat = flatten(fields, "", flatten(head, "", {}))
    for key in list(flat):  # the bookkeeping of nested TLV records too
        if NOT_SHOWN & {part.split("[")[0] for part in key.split(".")}:
            del flat[key]
    derived = set(flatten(message.derived_fields(), "", {}))
    return flat, derived


_LABEL_ESCAPE = re.compile(r"\\(?:[0-7]{3}|[abfnrtv])")


def comparable(label: str, expected: str) -> tuple[str, str]:
    """Text with control characters, as shown and as expected, reduced to what
    Wireshark's escaping keeps unambiguous: it escapes some control characters
    (``\\t``, ``\\026``), keeps others (newline) and leaves a backslash as it is,
    so ``\\v`` may be either. Both sides drop what looks like an escape, then
    backslashes, spaces and control characters."""

    def printable(text: str) -> str:
        return "".join(c for c in text if c.isprintable() and c != " ")

    return (
        printable(_LABEL_ESCAPE.sub("", label)).replace("\\", ""),
        printable(_LABEL_ESCAPE.sub("", expected)).replace("\\", ""),
    )


def same(element: ET.Element, expected: Any) -> bool:
    show = element.get("show", "")
    if isinstance(expected, bool):
        return show == ("1" if expected else "0")
    if isinstance(expected, int):
        return int(show, 0) == expected
    if isinstance(expected, float):
        return bool(math.isclose(float(show), expected, rel_tol=1e-12, abs_tol=1e-12))
    if isinstance(expected, str) and element.get("name", "").endswith(".tlv.raw"):
        return element.get("value", "").upper() == expected
    if "\\" not in show and expected.isprintable():
        return show == expected
    # text with control characters: "show" escapes them as "\x2" (ambiguous before a
    # hex digit); the label escapes them too, and is cut when long
    label = element.get("showname", "").split(": ", 1)[-1]
    shown, wanted = comparable(label, expected)
    if label.endswith("\u2026"):
        return wanted.startswith(shown[:-1])
    return shown == wanted


def check_frame(proto: ET.Element, sent: Sent) -> None:
    """Every field shown equals the record; every record value is shown."""
    shown = shown_fields(proto)
    expected, derived = expected_fields(sent.data, sent.protocol, sent.direction)
    where = f"{sent.protocol} {sent.direction} {sent.data.hex()}"
    for path, elements in shown.items():
        if path in FRAME_ONLY:
            continue
        if len(elements) == 1 and path in expected:
            assert same(elements[0], expected[path]), (
                where,
                path,
                elements[0].attrib,
                expected[path],
            )
            continue
        # a list of plain values (``tag_98`` repeated, an array of integers)
        for i, element in enumerate(elements):
            key = f"{path}[{i}]"
            if key not in expected and path in derived:
                continue
            assert key in expected, (where, path, "shown but not in the record")
            assert same(element, expected[key]), (where, key, element.attrib, expected[key])
    shown_paths = set(shown) | {f"{p}[{i}]" for p, e in shown.items() for i in range(len(e))}
    for path, value in expected.items():
        if path in shown_paths or value is None or path in derived:
            continue
        raise AssertionError((where, path, value, "in the record but not shown"))


def check_all(protos: Sequence[ET.Element], sent: Sequence[Sent]) -> None:
    assert [p.get("name") for p in protos] == [s.protocol for s in sent]
    for proto, frame in zip(protos, sent, strict=True):
        check_frame(proto, frame)


def _vector_frames(vectors: list[dict[str, Any]], protocol: str) -> list[Sent]:
    return [Sent(protocol, v["direction"], bytes.fromhex(v["hex"])) for v in vectors]


# --- tests -------------------------------------------------------------------------------


def test_the_generator_knows_every_converter() -> None:
    assert raw_fallbacks() == []


def test_ports_are_those_of_the_pcap_export() -> None:
    assert capture.PCAP_SERVER_PORT["ap3000"] == AP3000_PORT
    assert capture.PCAP_SERVER_PORT["bkv"] == BKV_PORT


def test_cli_writes_the_generated_file(tmp_path: Path) -> None:
    out = tmp_path / "chargeproto.lua"
    result = CliRunner().invoke(main, ["dissector", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == dissector_lua()
    assert "0x21" not in out.read_text().split("-- ===== the generic interpreter")[1]
    stdout = CliRunner().invoke(main, ["dissector"])
    assert stdout.exit_code == 0 and stdout.output == dissector_lua()


def test_cli_reports_an_unwritable_path(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["dissector", "--out", str(tmp_path / "no" / "x.lua")])
    assert result.exit_code != 0
    assert "Traceback" not in result.output and "x.lua" in result.output


def test_a_declaration_change_changes_the_dissector() -> None:
    before = dissector_lua()
    name = ap3000.Heartbeat.__name__
    ap3000.Heartbeat.__name__ = "RenamedHeartbeat"
    try:
        after = dissector_lua()
    finally:
        ap3000.Heartbeat.__name__ = name
    assert '"RenamedHeartbeat"' in after and '"RenamedHeartbeat"' not in before


@needs_tshark
def test_vendor_examples(lua: Path, tmp_path: Path) -> None:
    """Every valid vendor example of both protocols, one frame per segment."""
    ap = _vector_frames(AP3000_VECTORS, "ap3000")
    bk = _vector_frames(BKV_VECTORS, "bkv")
    pcap = write_pcap(tmp_path / "vendor.pcap", {"ap": ap, "bkv": bk})
    packets = tshark(lua, pcap)
    assert all(len(p) == 1 for p in packets)
    check_all([p[0] for p in packets], ap + bk)


@needs_tshark
def test_a_corrupted_checksum_is_flagged(lua: Path, tmp_path: Path) -> None:
    good_ap = bytes.fromhex(AP3000_VECTORS[0]["hex"])
    good_bkv = bytes.fromhex(BKV_VECTORS[0]["hex"])
    bad_ap = good_ap[:-2] + bytes([good_ap[-2] ^ 0xFF, good_ap[-1]])
    bad_bkv = good_bkv[:-3] + bytes([good_bkv[-3] ^ 0x01]) + good_bkv[-2:]
    pcap = write_pcap(
        tmp_path / "bad.pcap",
        {
            "ap": [Sent("ap3000", "up", good_ap), Sent("ap3000", "up", bad_ap)],
            "bkv": [Sent("bkv", "up", good_bkv), Sent("bkv", "up", bad_bkv)],
        },
    )
    protos = [p[0] for p in tshark(lua, pcap)]
    statuses = [shown_fields(p)["checksum.status"][0].get("show") for p in protos]
    assert statuses == ["1", "0", "1", "0"]
    experts = [
        [f.get("name") for f in p.iter("field") if f.get("name", "").endswith(".checksum.bad")]
        for p in protos
    ]
    assert experts == [[], ["ap3000.checksum.bad"], [], ["bkv.checksum.bad"]]


@needs_tshark
def test_several_frames_per_segment_and_frames_across_segments(lua: Path, tmp_path: Path) -> None:
    ap = _vector_frames(AP3000_VECTORS[:4], "ap3000")
    bk = _vector_frames(BKV_VECTORS[:4], "bkv")

    def segments(protocol: str, sent: list[Sent]) -> list[Sent]:
        both = sent[0].data + sent[2].data  # two device frames in one segment
        split = sent[2].data
        return [
            Sent(protocol, "up", both),
            Sent(protocol, "up", split[:7]),  # one frame in three segments
            Sent(protocol, "up", split[7:12]),
            Sent(protocol, "up", split[12:] + sent[0].data[:3]),  # and the next begins
            Sent(protocol, "up", sent[0].data[3:]),
        ]

    pcap = write_pcap(
        tmp_path / "segments.pcap",
        {"ap": segments("ap3000", ap), "bkv": segments("bkv", bk)},
    )
    protos = [proto for packet in tshark(lua, pcap) for proto in packet]
    expected = [ap[0], ap[2], ap[2], ap[0], bk[0], bk[2], bk[2], bk[0]]
    check_all(protos, expected)


@needs_tshark
def test_heuristic_and_preamble(lua: Path, tmp_path: Path) -> None:
    """With the TCP ports switched off, the heuristic finds both protocols; an ICCID
    before the first frame is shown as a preamble."""
    ap = _vector_frames(AP3000_VECTORS[:2], "ap3000")
    bk = _vector_frames(BKV_VECTORS[:2], "bkv")
    iccid = b"89860463112070319417"
    pcap = write_pcap(
        tmp_path / "heuristic.pcap",
        {"ap": [Sent("ap3000", "up", iccid + ap[0].data), ap[1]], "bkv": bk},
    )
    packets = tshark(lua, pcap, "-o", "ap3000.tcp_port:0", "-o", "bkv.tcp_port:0")
    first, *rest = packets
    assert shown_fields(first[0])["preamble"][0].get("show") == iccid.decode()
    check_all([first[1], *(p[0] for p in rest)], [ap[0], ap[1], *bk])


def _ap3000_frame(cls: type[ap3000.Ap3000Message]) -> st.SearchStrategy[Sent]:
    def build(args: tuple[int, int, tuple[Any, bytes, int]]) -> Sent:
        phy, msg_id, (_, payload, _) = args
        message = ap3000.decode(
            ap3000.build_frame(phy, msg_id, cls.command, payload), cls.direction
        )
        return Sent("ap3000", cls.direction.value, ap3000.encode(message))

    return st.tuples(
        st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF), raw_payloads(cls, max_items=3)
    ).map(build)


def _bkv_frame(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Sent]:
    def build(message: bkv.BkvMessage) -> Sent:
        return Sent("bkv", message.wire_direction.value, bkv.encode(message))

    return strategy.map(build)


ENCODED = st.tuples(
    *(_ap3000_frame(cls) for cls in ap3000.MESSAGE_CLASSES),
    *(_bkv_frame(fixed_message(cls)) for cls in FIXED),
    *(_bkv_frame(tlv_message(cls)) for cls in TLV),
    _bkv_frame(tlv_container()),
)


@needs_tshark
# no shrinking: every step would run tshark; the failing frame is in the assertion
@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(sent=ENCODED)
def test_frames_the_codec_encodes(lua: Path, tmp_path: Path, sent: tuple[Sent, ...]) -> None:
    """One frame of every registered message class (and a generic TLV container),
    encoded by the codec from generated values."""
    frames = [s for s in sent if len(s.data) <= 0xFFFF]
    pcap = write_pcap(tmp_path / "encoded.pcap", {f"c{i}": [s] for i, s in enumerate(frames)})
    packets = tshark(lua, pcap)
    check_all([p[0] for p in packets], frames)
